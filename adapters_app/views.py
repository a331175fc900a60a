"""Dashboard, task pages and the playground. Each view calls one service and renders."""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.safestring import mark_safe
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from training_app.forms import DatasetUploadForm
from training_app.models import TrainingJob

from .forms import CompareForm, PlaygroundForm, ReasonForm, TaskForm
from .playground import (
    answer_label,
    playground_admissions,
    playground_answers,
    playground_events,
    playground_stream_start,
    playground_texts,
)
from .inference import Admission
from .models import ActivationEvent, AdapterVersion, Task
from .services import ServiceError, task_create, version_activate
from .compare import compare_versions, layer_map_svg
from .transfer import UploadedPart, export_response, version_import

logger = logging.getLogger(__name__)


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    tasks = Task.objects.select_related("active_version").prefetch_related(
        Prefetch("training_jobs", queryset=TrainingJob.objects.order_by("-created_at"))
    )
    rows = [{"task": task, "last_job": next(iter(task.training_jobs.all()), None)} for task in tasks]
    form = TaskForm(request.POST or None)

    if request.method == "POST" and form.is_valid():
        try:
            task = task_create(user=request.user, **form.cleaned_data)
        except ServiceError as error:
            form.add_error(None, error.message)
        else:
            messages.success(request, _("Task %(slug)s created. Upload a dataset to train its first version.") % {"slug": task.slug})
            return redirect("adapters_app:task_detail", slug=task.slug)

    return render(request, "adapters_app/dashboard.html", {"rows": rows, "form": form})


@login_required
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


@login_required
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


@login_required
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


@login_required
def version_export_view(request: HttpRequest, slug: str, number: int) -> HttpResponse:
    version = get_object_or_404(AdapterVersion.objects.select_related("task", "parent"), task__slug=slug, number=number)
    try:
        return export_response(version)
    except ServiceError as error:
        messages.error(request, error.message)
        return redirect("adapters_app:task_detail", slug=slug)


@login_required
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


@login_required
def task_compare(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task.objects.select_related("active_version"), slug=slug)
    ready = list(task.versions.filter(status=AdapterVersion.Status.READY).select_related("parent").order_by("number"))
    form = CompareForm(request.GET or None, versions=ready)
    comparison = None
    layer_maps: list[tuple[str, str, str]] = []

    if request.GET and form.is_valid():
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
    return render(request, "adapters_app/compare.html", context)


def _playground_form(request: HttpRequest) -> tuple[PlaygroundForm, list[Admission]]:
    """Build and validate the playground form, and admit its request when it was posted valid."""
    initial = {"task": request.GET.get("task")} if request.GET.get("task") else None
    form = PlaygroundForm(request.POST or None, initial=initial)
    admissions: list[Admission] = []
    if request.method == "POST" and form.is_valid():
        try:
            admissions = playground_admissions(form)
        except ServiceError as error:
            form.add_error(None, error.message)
    return form, admissions


@login_required
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
    return await sync_to_async(render)(request, "adapters_app/playground.html", context)


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
        prompt, admissions = await sync_to_async(_stream_form)(request)
        handles, events = await playground_stream_start(admissions, prompt)
    except ServiceError as error:
        return _error_response(error)

    response = StreamingHttpResponse(playground_events(admissions, handles, events), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response
