"""Uploaded datasets and the training jobs that turn them into adapter versions."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils.translation import gettext_lazy as _

from adapters_app.models import AdapterVersion, Task


class Dataset(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="datasets")
    # The client's file name is only displayed; the file is stored under a generated name.
    original_name = models.CharField(_("file name"), max_length=255)
    stored_name = models.CharField(max_length=255, unique=True)
    format = models.CharField(_("format"), max_length=16)
    encoding = models.CharField(_("encoding"), max_length=32)
    sha256 = models.CharField(_("sha256"), max_length=64)
    size_bytes = models.BigIntegerField(_("size in bytes"))
    num_examples = models.PositiveIntegerField(_("examples"))
    num_train = models.PositiveIntegerField(_("training examples"))
    num_validation = models.PositiveIntegerField(_("validation examples"))
    num_duplicates = models.PositiveIntegerField(_("duplicates"), default=0)
    split_seed = models.IntegerField(_("split seed"), default=0)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(_("uploaded"), auto_now_add=True)

    class Meta:
        ordering = ["task", "-created_at"]
        verbose_name = _("dataset")
        verbose_name_plural = _("datasets")

    def __str__(self) -> str:
        return f"{self.original_name} (#{self.pk})"

    @property
    def eval_key(self) -> str:
        """Key under which a version's metrics store the loss on this dataset's validation split."""
        return f"dataset-{self.pk}"


class TrainingJob(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", _("queued")
        RUNNING = "running", _("running")
        SUCCEEDED = "succeeded", _("succeeded")
        FAILED = "failed", _("failed")
        CANCELLED = "cancelled", _("cancelled")

    FINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="training_jobs")
    version = models.OneToOneField(
        AdapterVersion, on_delete=models.CASCADE, related_name="training_job"
    )
    datasets = models.ManyToManyField(Dataset, related_name="training_jobs")
    warm_start_from = models.ForeignKey(
        AdapterVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    hyperparameters = models.JSONField(_("hyperparameters"), default=dict)
    state = models.CharField(_("state"), max_length=16, choices=State.choices, default=State.QUEUED)
    progress = models.FloatField(_("progress"), default=0.0)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    last_loss = models.FloatField(null=True, blank=True)
    loss_history = models.JSONField(default=list, blank=True)
    log = models.JSONField(default=list, blank=True)
    error = models.TextField(_("error"), blank=True)
    cancel_requested = models.BooleanField(default=False)
    celery_task_id = models.CharField(max_length=64, blank=True)
    worker_host = models.CharField(max_length=255, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    started_at = models.DateTimeField(_("started"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished"), null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name = _("training job")
        verbose_name_plural = _("training jobs")

    def __str__(self) -> str:
        return f"job {self.pk} ({self.version})"

    @property
    def is_final(self) -> bool:
        return self.state in self.FINAL_STATES
