"""Dashboard, task pages and the playground. Each view calls one service and renders."""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.db.models import Count, Prefetch
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from loraweb.ratelimit import arate_limit_check, mark_rate_limited, rate_limit_form, user_identity
from training_app.forms import DatasetUploadForm
from training_app.models import TrainingJob

from .forms import CompareForm, PlaygroundForm, ReasonForm, TaskDeleteForm, TaskForm
from .playground import (
    answer_label,
    playground_admissions,
    playground_answers,
    playground_events,
    playground_stream_start,
    playground_texts,
)
from .access import require_page_role, role_required
from .inference import Admission
from .models import ActivationEvent, AdapterVersion, Task
from .roles import Role, require_role
from .services import ServiceError, task_create, version_activate
from .compare import compare_versions, layer_map_svg
from .transfer import UploadedPart, export_response, version_import

logger = logging.getLogger(__name__)


def _dashboard_row(task: Task) -> dict[str, object]:
    """Return what the dashboard shows of one task: its last job and its active version's mean eval loss."""
    losses = list(task.active_version.eval_loss().values()) if task.active_version else []
    return {
        "task": task,
        "last_job": next(iter(task.training_jobs.all()), None),
        "mean_eval_loss": sum(losses) / len(losses) if losses else None,
        "eval_dataset_count": len(losses),
    }


@role_required(Role.VIEWER)
def dashboard(request: HttpRequest) -> HttpResponse:
    tasks = (
        Task.objects.select_related("active_version")
        .annotate(dataset_count=Count("datasets"))
        .prefetch_related(
            Prefetch("training_jobs", queryset=TrainingJob.objects.select_related("version").order_by("-created_at"))
        )
    )
    rows = [_dashboard_row(task) for task in tasks]
    form = TaskForm(request.POST or None)
    if request.method == "POST":
        require_page_role(request, Role.TRAINER)

    if request.method == "POST" and form.is_valid():
        try:
            task = task_create(user=request.user, **form.cleaned_data)
        except ServiceError as error:
            form.add_error(None, error.message)
        else:
            messages.success(request, _("Task %(slug)s created. Upload a dataset to train its first version.") % {"slug": task.slug})
            return redirect("adapters_app:task_detail", slug=task.slug)

    return render(request, "adapters_app/dashboard.html", {"rows": rows, "form": form})


@role_required(Role.TRAINER)
@require_POST
def demo_load(request: HttpRequest) -> HttpResponse:
    from training_app.demo import demo_load_data

    tasks = demo_load_data(user=request.user)
    messages.success(
        request,
        _("Loaded demo tasks %(tasks)s with their datasets; open one and click “Train new version”.")
        % {"tasks": ", ".join(task.slug for task in tasks)},
    )
    return redirect("adapters_app:dashboard")


@role_required(Role.VIEWER)
def task_detail(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task.objects.select_related("active_version"), slug=slug)
    versions = list(task.versions.select_related("parent", "training_job").order_by("-number"))
    dataset_names = {f"dataset-{pk}": name for pk, name in task.datasets.values_list("pk", "original_name")}
    for version in versions:
        base_losses = version.metrics.get("base_eval_loss", {})
        version.loss_rows = [
            (dataset_names.get(key, key), loss, base_losses.get(key)) for key, loss in sorted(version.eval_loss().items())
        ]
    events = list(
        ActivationEvent.objects.filter(task=task).select_related("from_version", "to_version", "actor")[:20]
    )
    for event in events:
        # Automatic activations store the worker's note; show it in the viewer's language.
        automatic = event.kind == ActivationEvent.Kind.AUTO and event.to_version is not None
        event.display_reason = event.to_version.promotion_message() if automatic else event.reason
    context = {
        "task": task,
        "versions": versions,
        # Each dataset row names the versions trained on it.
        "datasets": task.datasets.order_by("-created_at").prefetch_related("training_jobs__version"),
        "jobs": task.training_jobs.select_related("version")[:10],
        "events": events,
        "upload_form": DatasetUploadForm(),
        "reason_form": ReasonForm(),
    }
    return render(request, "adapters_app/task_detail.html", context)


@role_required(Role.MAINTAINER)
@require_POST
def version_activate_view(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    version = get_object_or_404(AdapterVersion.objects.select_related("task"), task__slug=slug, number=number)
    form = ReasonForm(request.POST)
    if not form.is_valid():
        messages.error(request, _("Give a reason for the activation; it is kept in the audit trail."))
        return redirect("adapters_app:task_detail", slug=slug)

    try:
        result = version_activate(version, reason=form.cleaned_data["reason"], user=request.user)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        (messages.success if result.changed else messages.info)(request, result.message)
    return redirect("adapters_app:task_detail", slug=slug)


@role_required(Role.VIEWER)
def version_export_view(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    version = get_object_or_404(AdapterVersion.objects.select_related("task", "parent"), task__slug=slug, number=number)
    try:
        return export_response(version, user=request.user)
    except ServiceError as error:
        messages.error(request, error.message)
        return redirect("adapters_app:task_detail", slug=slug)


@role_required(Role.TRAINER)
@require_POST
def version_import_view(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task, slug=slug)
    files = request.FILES.getlist("files")
    if not files:
        messages.error(request, _("Choose a zip of a PEFT adapter folder, or its files, to import."))
        return redirect("adapters_app:task_detail", slug=slug)

    try:
        version = version_import(task, [UploadedPart(upload.name, upload) for upload in files], user=request.user)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, _("Imported the adapter as %(version)s; activate it when you are ready.") % {"version": version.label})
    return redirect("adapters_app:task_detail", slug=slug)


@role_required(Role.MAINTAINER)
def task_delete_view(request: HttpRequest, slug: str) -> HttpResponse:
    """Ask for confirmation (GET), then delete the task with its versions, datasets and files (POST)."""
    from training_app.deletion import task_delete

    task = get_object_or_404(Task.objects.select_related("active_version"), slug=slug)
    form = TaskDeleteForm(request.POST or None, task=task)
    context = {
        "task": task,
        "form": form,
        "versions": task.versions.count(),
        "datasets": task.datasets.count(),
        "jobs": task.training_jobs.count(),
    }

    if request.method == "POST" and form.is_valid():
        try:
            deletion = task_delete(task, user=request.user, reason=form.cleaned_data["reason"])
        except ServiceError as error:
            form.add_error(None, error.message)
            return render(request, "adapters_app/task_confirm_delete.html", context, status=error.status_code)
        messages.success(request, deletion.message)
        return redirect("adapters_app:dashboard")

    return render(request, "adapters_app/task_confirm_delete.html", context)


@role_required(Role.VIEWER)
def task_compare(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task.objects.select_related("active_version"), slug=slug)
    ready = list(task.versions.filter(status=AdapterVersion.Status.READY).select_related("parent").order_by("number"))
    form = CompareForm(request.GET or None, versions=ready)
    comparison = None
    layer_maps: list[tuple[str, str, str]] = []

    # A comparison generates answers like the playground does, so it counts against the same limit.
    if request.GET and form.is_valid() and not rate_limit_form(form, "playground", [user_identity(request.user)]):
        chosen = [version for version in ready if str(version.number) in form.cleaned_data["versions"]]
        comparison = compare_versions(
            task, chosen, include_base=form.cleaned_data["include_base"], prompts=form.prompt_list()
        )
        largest = max(
            [value for column in comparison.columns for value in (*column.update_norms.values(), *column.parent_shift.values())],
            default=0.0,
        )
        for column in comparison.columns:
            if column.version is None:
                continue
            update = layer_map_svg(column.update_norms, comparison.layers, largest, _("Size of B·A per layer"))
            shift = ""
            if column.parent_shift:
                shift = layer_map_svg(column.parent_shift, comparison.layers, largest, _("Change from the parent per layer"))
            layer_maps.append((column.label, mark_safe(update), mark_safe(shift)))

    context = {"task": task, "form": form, "comparison": comparison, "layer_maps": layer_maps}
    return mark_rate_limited(render(request, "adapters_app/compare.html", context), form)


def _playground_form(request: HttpRequest) -> tuple[PlaygroundForm, list[Admission]]:
    """Build and validate the playground form, and admit its request when it was posted valid."""
    initial = {"task": request.GET.get("task")} if request.GET.get("task") else None
    form = PlaygroundForm(request.POST or None, initial=initial)
    admissions: list[Admission] = []
    if request.method == "POST" and form.is_valid() and not rate_limit_form(form, "playground", [user_identity(request.user)]):
        try:
            admissions = playground_admissions(form)
        except ServiceError as error:
            form.add_error(None, error.message)
    return form, admissions


@role_required(Role.VIEWER)
async def playground(request: HttpRequest) -> HttpResponse:
    # Async, so that under ASGI the generation is awaited and no Django thread waits for it.
    form, admissions = await sync_to_async(_playground_form)(request)
    answers = []
    if admissions:
        try:
            completions = await playground_answers(admissions, form.cleaned_data["prompt"])
        except ServiceError as error:
            form.add_error(None, error.message)
        else:
            answers = [(answer_label(admission), completion) for admission, completion in zip(admissions, completions)]

    context = {"form": form, "answers": answers, "playground_texts": playground_texts()}
    response = await sync_to_async(render)(request, "adapters_app/playground.html", context)
    return mark_rate_limited(response, form)


def _stream_form(request: HttpRequest) -> tuple[str, list[Admission]]:
    form = PlaygroundForm(request.POST)
    if not form.is_valid():
        problems = [f"{field}: {' '.join(errors)}" if field != "__all__" else " ".join(errors) for field, errors in form.errors.items()]
        raise ServiceError(_("The form is invalid: %(problems)s") % {"problems": "; ".join(problems)}, code="invalid_form")
    return form.cleaned_data["prompt"], playground_admissions(form)


def _error_response(error: ServiceError) -> JsonResponse:
    response = JsonResponse({"error": {"message": error.message, "code": error.code}}, status=error.status_code)
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None:
        response["Retry-After"] = str(retry_after)
    return response


@require_POST
async def playground_stream(request: HttpRequest) -> HttpResponse:
    """Stream the playground's answers as server-sent events (see playground.playground_events)."""
    user = await request.auser()
    if not user.is_authenticated:
        return _error_response(ServiceError(_("Log in to use the playground."), code="login_required", status_code=401))
    try:
        await sync_to_async(require_role)(user, Role.VIEWER)
    except ServiceError as error:
        return _error_response(error)

    try:
        await arate_limit_check("playground", user_identity(user))
        prompt, admissions = await sync_to_async(_stream_form)(request)
        handles, events = await playground_stream_start(admissions, prompt)
    except ServiceError as error:
        return _error_response(error)

    response = StreamingHttpResponse(playground_events(admissions, handles, events), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
