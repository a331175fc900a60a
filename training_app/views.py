"""Dataset upload and training job pages."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views.decorators.http import require_POST

from adapters_app.models import Task
from adapters_app.services import ServiceError

from . import services
from .forms import DatasetUploadForm, TrainForm
from .messages import job_log_lines
from .models import Dataset, TrainingJob


@login_required
@require_POST
def dataset_upload(request: HttpRequest, slug: str) -> HttpResponse:
    task = get_object_or_404(Task, slug=slug)
    form = DatasetUploadForm(request.POST, request.FILES)
    problems: list[dict] = []
    status = 400

    if form.is_valid():
        upload = form.cleaned_data["file"]
        try:
            outcome = services.dataset_upload(task, upload, original_name=upload.name, user=request.user)
        except services.DatasetRejected as rejected:
            problems = rejected.as_list()
            form.add_error(None, rejected.message)
        except ServiceError as error:
            status = error.status_code
            form.add_error(None, error.message)
        else:
            if outcome.created:
                messages.success(request, _("Dataset %(name)s stored.") % {"name": outcome.dataset.original_name})
            else:
                messages.info(request, _("This file was already uploaded to the task; showing the existing dataset."))
            return redirect("training_app:dataset_detail", pk=outcome.dataset.pk)

    return render(
        request,
        "training_app/upload_failed.html",
        {"task": task, "upload_form": form, "problems": problems},
        status=status,
    )


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset.objects.select_related("task"), pk=pk)
    train, validation = services.dataset_split(dataset)
    context = {
        "dataset": dataset,
        "task": dataset.task,
        "preview": train[:10],
        "validation_preview": validation[:5],
        "versions": [job.version for job in dataset.training_jobs.select_related("version").order_by("-created_at")],
    }
    return render(request, "training_app/dataset_detail.html", context)


@login_required
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


@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(TrainingJob.objects.select_related("task", "version", "warm_start_from"), pk=pk)
    hyperparameters = {
        key: ", ".join(value) if isinstance(value, list) else value
        for key, value in job.hyperparameters.items()
        if value is not None
    }
    context = {"job": job, "task": job.task, "log_lines": job_log_lines(job.log), "hyperparameters": hyperparameters}
    return render(request, "training_app/job_detail.html", context)


@login_required
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
        }
    )


@login_required
@require_POST
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(TrainingJob, pk=pk)
    if job.is_final:
        messages.info(request, _("The job has already finished; there is nothing to cancel."))
    else:
        services.job_cancel(job, user=request.user)
        messages.success(request, _("Cancellation requested; the job stops after its current step."))
    return redirect("training_app:job_detail", pk=pk)
