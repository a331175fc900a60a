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
    # The examples as training reads them (after conversion, truncation and dropping
    # duplicates), one JSON object per line. Empty for datasets stored before this file
    # existed; those are parsed from the uploaded file again.
    prepared_name = models.CharField(max_length=255, blank=True)
    shape = models.CharField(_("layout"), max_length=32, blank=True)
    compression = models.CharField(_("compression"), max_length=16, blank=True)
    delimiter = models.CharField(_("delimiter"), max_length=1, blank=True)
    # True when the encoding was detected and the file converted to UTF-8 from it.
    encoding_detected = models.BooleanField(_("encoding detected"), default=False)
    # Upload options.
    max_length = models.PositiveIntegerField(_("maximum length (tokens)"), default=1024)
    on_too_long = models.CharField(_("examples over the maximum length"), max_length=16, default="reject")
    drop_duplicates = models.BooleanField(_("drop duplicates"), default=False)
    prompt_column = models.CharField(_("prompt column"), max_length=255, blank=True)
    completion_column = models.CharField(_("completion column"), max_length=255, blank=True)
    # Length statistics in GPT-2 tokens per example, as training counts them.
    num_truncated = models.PositiveIntegerField(_("truncated examples"), default=0)
    token_total = models.BigIntegerField(_("tokens"), default=0)
    token_mean = models.FloatField(_("mean tokens per example"), default=0.0)
    token_p95 = models.PositiveIntegerField(_("95th percentile of tokens per example"), default=0)
    token_max = models.PositiveIntegerField(_("maximum tokens per example"), default=0)
    # {"bin_width": w, "counts": [...]}: bar i counts examples of w*i to w*(i+1)-1 tokens.
    length_histogram = models.JSONField(default=dict, blank=True)
    # The first stored examples: [{"prompt", "completion", "tokens", "truncated"}, ...].
    preview = models.JSONField(default=list, blank=True)
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

    @property
    def has_statistics(self) -> bool:
        """Whether upload computed token statistics (datasets stored before that did not)."""
        return bool(self.prepared_name)


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
    # [step, loss] pairs of the training loss and of the validation points.
    loss_history = models.JSONField(default=list, blank=True)
    eval_history = models.JSONField(default=list, blank=True)
    tokens_seen = models.BigIntegerField(default=0)
    # Seconds since the worker started the run, as of the last progress write.
    elapsed_seconds = models.FloatField(default=0.0)
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

    @property
    def tokens_per_second(self) -> float | None:
        if not self.elapsed_seconds or not self.tokens_seen:
            return None
        return self.tokens_seen / self.elapsed_seconds

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the pace of the steps so far; None before the first step."""
        if self.is_final or not self.step or not self.total_steps:
            return None
        return self.elapsed_seconds / self.step * (self.total_steps - self.step)
