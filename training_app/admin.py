from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from adapters_app.admin import RoleAdmin

from .models import Dataset, TrainingJob


@admin.register(Dataset)
class DatasetAdmin(RoleAdmin, admin.ModelAdmin):
    list_display = ("original_name", "task", "format", "num_examples", "num_train", "num_validation", "created_at")
    list_filter = ("format", "task")
    search_fields = ("original_name", "sha256", "task__slug")
    list_select_related = ("task",)
    readonly_fields = (
        "task", "original_name", "stored_name", "format", "encoding", "sha256", "size_bytes", "num_examples",
        "num_train", "num_validation", "num_duplicates", "split_seed", "created_by", "created_at",
        "prepared_name", "shape", "compression", "delimiter", "encoding_detected", "max_length", "on_too_long",
        "drop_duplicates", "prompt_column", "completion_column", "num_truncated", "token_total", "token_mean",
        "token_p95", "token_max", "length_histogram", "preview",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Dataset | None = None) -> bool:
        # Deleting here would skip the check that no version used the dataset and leave its
        # files behind, so datasets are deleted from their own page or the API.
        return False


@admin.register(TrainingJob)
class TrainingJobAdmin(RoleAdmin, admin.ModelAdmin):
    list_display = ("pk", "task", "version", "state", "progress", "warm_start_from", "created_at", "finished_at")
    list_filter = ("state", "task")
    search_fields = ("task__slug", "error", "celery_task_id")
    list_select_related = ("task", "version", "warm_start_from")
    readonly_fields = (
        "task", "version", "warm_start_from", "hyperparameters", "state", "progress", "step", "total_steps",
        "last_loss", "loss_history", "log", "error", "cancel_requested", "celery_task_id", "worker_host",
        "heartbeat_at", "created_by", "created_at", "started_at", "finished_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
