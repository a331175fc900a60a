"""Dataset upload and training job pages."""

from __future__ import annotations

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.formats import date_format
from django.utils.timezone import localtime
from django.utils.translation import gettext as _
from django.views.decorators.http import require_http_methods, require_POST

from adapters_app.access import role_required
from adapters_app.models import Task
from adapters_app.roles import Role
from adapters_app.services import ServiceError

from . import services
from .charts import length_histogram_svg
from .forms import DatasetUploadForm, TrainForm
from .messages import job_log_lines
from .models import Dataset, TrainingJob
from .uploads import upload_over_limit


@role_required(Role.TRAINER)
@require_POST
def dataset_upload(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task, slug=slug)
    form = DatasetUploadForm(request.POST, request.FILES)
    problems: list[dict] = []
    total_problems = 0
    status = 400

    # Reading request.POST above ran the upload handlers, which may have cut the file off.
    if upload_over_limit(request):
        error = services.upload_too_large_error()
        return _upload_failed(request, task, form, error.message, status=error.status_code)

    if form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            outcome = services.dataset_upload(
                task, upload, original_name=upload.name, options=form.cleaned_data["options"], user=request.user
            )
        except services.DatasetRejected as rejected:
            problems = rejected.as_list()
            total_problems = rejected.total
            form.add_error(None, rejected.message)
        except ServiceError as error:
            status = error.status_code
            form.add_error(None, error.message)
        else:
            _announce_upload(request, outcome)
            return redirect("training_app:dataset_detail", pk=outcome.dataset.pk)

    return _upload_failed(request, task, form, None, status=status, problems=problems, total=total_problems)


def _upload_failed(
    request: HttpRequest,
    task: Task,
    form: DatasetUploadForm,
    error: str | None,
    *,
    status: int,
    problems: list[dict] | None = None,
    total: int = 0,
) -> HttpResponse:
    if error is not None:
        form.add_error(None, error)
    context = {"task": task, "upload_form": form, "problems": problems or [], "total_problems": total}
    return render(request, "training_app/upload_failed.html", context, status=status)


def _announce_upload(request: HttpRequest, outcome: services.UploadOutcome) -> None:
    dataset = outcome.dataset
    if outcome.created:
        messages.success(
            request,
            _("Dataset %(name)s stored with %(count)s examples.")
            % {"name": dataset.original_name, "count": dataset.num_examples},
        )
        return

    messages.info(
        request,
        _(
            "This file is identical to “%(name)s” (dataset #%(id)s, uploaded %(date)s), so that "
            "dataset is shown and no copy was stored. The options of this upload were not applied; "
            "to apply other options, delete that dataset first."
        )
        % {
            "name": dataset.original_name,
            "id": dataset.pk,
            "date": date_format(localtime(dataset.created_at), "Y-m-d H:i"),
        },
    )


@role_required(Role.VIEWER)
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset.objects.select_related("task"), pk=pk)
    context = {
        "dataset": dataset,
        "task": dataset.task,
        "preview": services.dataset_preview(dataset),
        "versions": services.dataset_versions(dataset),
        "encoding_note": services.encoding_note(dataset),
        "format_description": services.format_description(dataset),
        "histogram": length_histogram_svg(dataset.length_histogram),
    }
    return render(request, "training_app/dataset_detail.html", context)


@role_required(Role.MAINTAINER)
@require_http_methods(["GET", "POST"])
def dataset_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """Ask for confirmation (GET), then delete the dataset and its files (POST)."""
    dataset = get_object_or_404(Dataset.objects.select_related("task"), pk=pk)
    context = {"dataset": dataset, "task": dataset.task, "versions": services.dataset_versions(dataset)}

    if request.method == "POST":
        try:
            services.dataset_delete(dataset, user=request.user)
        except ServiceError as error:
            context["error"] = error.message
            return render(request, "training_app/dataset_confirm_delete.html", context, status=error.status_code)
        messages.success(request, _("Dataset %(name)s and its files were deleted.") % {"name": dataset.original_name})
        return redirect("adapters_app:task_detail", slug=dataset.task.slug)

    return render(request, "training_app/dataset_confirm_delete.html", context)


@role_required(Role.TRAINER)
def training_new(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task.objects.select_related("active_version"), slug=slug)
    form = TrainForm(request.POST or None, task=task)

    if request.method == "POST" and form.is_valid():
        try:
            job = services.training_start(
                task,
                dataset_ids=[dataset.pk for dataset in form.cleaned_data["datasets"]],
                warm_start=form.cleaned_data["start"] == TrainForm.START_ACTIVE,
                hyperparameters=form.hyperparameters(),
                user=request.user,
            )
        except ServiceError as error:
            form.add_error(None, error.message)
        else:
            messages.success(request, _("Training of %(version)s queued.") % {"version": job.version.label})
            return redirect("training_app:job_detail", pk=job.pk)

    return render(request, "training_app/train.html", {"task": task, "form": form})


@role_required(Role.VIEWER)
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(TrainingJob.objects.select_related("task", "version", "warm_start_from"), pk=pk)
    hyperparameters = {
        key: ", ".join(value) if isinstance(value, list) else value
        for key, value in job.hyperparameters.items()
        if value is not None
    }
    context = {"job": job, "task": job.task, "log_lines": job_log_lines(job.log), "hyperparameters": hyperparameters}
    return render(request, "training_app/job_detail.html", context)


@role_required(Role.VIEWER)
def job_status(request: HttpRequest, pk: int) -> JsonResponse:
    """State and progress for the job page's self-refresh."""
    job = get_object_or_404(TrainingJob.objects.select_related("version"), pk=pk)
    return JsonResponse(
        {
            "state": job.state,
            "state_display": job.get_state_display(),
            "progress": job.progress,
            "step": job.step,
            "total_steps": job.total_steps,
            "loss": job.last_loss,
            "error": job.error,
            "log": job_log_lines(job.log[-20:]),
            "final": job.is_final,
            "loss_history": job.loss_history,
            "eval_history": job.eval_history,
            "tokens_per_second": job.tokens_per_second,
            "eta_seconds": job.eta_seconds,
        }
    )


@role_required(Role.TRAINER)
@require_POST
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(TrainingJob, pk=pk)
    if job.is_final:
        messages.info(request, _("The job has already finished; there is nothing to cancel."))
    else:
        services.job_cancel(job, user=request.user)
        messages.success(request, _("Cancellation requested; the job stops after its current step."))
    return redirect("training_app:job_detail", pk=pk)
