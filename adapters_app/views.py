"""Dashboard, task pages and the playground. Each view calls one service and renders."""

from __future__ import annotations

import logging

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from training_app.forms import DatasetUploadForm
from training_app.models import TrainingJob

from .forms import PlaygroundForm, ReasonForm, TaskForm
from .inference import SamplingParams, complete
from .models import ActivationEvent, AdapterVersion, Task
from .services import ServiceError, task_create, version_activate
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
        "datasets": task.datasets.order_by("-created_at"),
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
def playground(request: HttpRequest) -> HttpResponse:
    initial = {"task": request.GET.get("task")} if request.GET.get("task") else None
    form = PlaygroundForm(request.POST or None, initial=initial)
    completion = None

    if request.method == "POST" and form.is_valid():
        params = SamplingParams(
            max_tokens=form.cleaned_data["max_tokens"],
            temperature=form.cleaned_data["temperature"],
            top_p=form.cleaned_data["top_p"],
        )
        try:
            completion = complete(form.model_name(), form.cleaned_data["prompt"], params)
        except ServiceError as error:
            form.add_error(None, error.message)

    return render(request, "adapters_app/playground.html", {"form": form, "completion": completion})
