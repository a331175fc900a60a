"""Tasks, their adapter versions, the activation audit trail and API tokens."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.validators import RegexValidator
from django.db import models
from django.utils.translation import gettext_lazy as _
from django.utils.translation import pgettext

# Task slugs are also model names in the completions API (`slug` or `slug@v3`), so they
# must not contain "@" and should read well in a URL.
slug_validator = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$",
    _("Use 1 to 64 lowercase letters, digits or hyphens, starting and ending with a letter or digit."),
    code="invalid_slug",
)


class Task(models.Model):
    slug = models.CharField(_("slug"), max_length=64, unique=True, validators=[slug_validator])
    name = models.CharField(_("name"), max_length=200)
    description = models.TextField(_("description"), blank=True)
    base_model_id = models.CharField(_("base model"), max_length=300)
    active_version = models.ForeignKey(
        "AdapterVersion",
        verbose_name=_("active version"),
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    # Promotion policy: when a newly trained version becomes active without a person.
    auto_activate = models.BooleanField(
        _("activate automatically"),
        default=True,
        help_text=_("Activate a new version when it beats the active one on its new data without forgetting."),
    )
    min_improvement = models.FloatField(
        _("minimum improvement"),
        default=0.0,
        help_text=_("How much lower (in nats per token) the new data's eval loss must be than the active version's."),
    )
    forgetting_tolerance = models.FloatField(
        _("forgetting tolerance"),
        default=0.1,
        help_text=_("How much higher (in nats per token) the eval loss on an earlier dataset may get."),
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        verbose_name = _("task")
        verbose_name_plural = _("tasks")

    def __str__(self) -> str:
        return self.slug


class AdapterVersion(models.Model):
    class Status(models.TextChoices):
        TRAINING = "training", _("training")
        READY = "ready", _("ready")
        FAILED = "failed", _("failed")
        CANCELLED = "cancelled", _("cancelled")
        # The adapter files no longer match their sha256 or cannot be read; never served.
        BROKEN = "broken", _("broken")

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField(_("number"))
    parent = models.ForeignKey(
        "self",
        verbose_name=_("parent version"),
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="children",
    )
    status = models.CharField(
        _("status"), max_length=16, choices=Status.choices, default=Status.TRAINING
    )
    hyperparameters = models.JSONField(_("hyperparameters"), default=dict, blank=True)
    base_model_id = models.CharField(_("base model"), max_length=300, blank=True)
    base_weight_hash = models.CharField(_("base weight hash"), max_length=64, blank=True)
    # Relative to LORAWEB_ADAPTER_ROOT, so the adapter store can move between hosts.
    storage_path = models.CharField(_("storage path"), max_length=500, blank=True)
    sha256 = models.CharField(_("sha256"), max_length=64, blank=True)
    size_bytes = models.BigIntegerField(_("size in bytes"), null=True, blank=True)
    metrics = models.JSONField(_("metrics"), default=dict, blank=True)
    # Why a ready version is not active (or why it was activated automatically): the
    # English text for search and the API, and the code and parameters for display.
    promotion_note = models.TextField(_("promotion note"), blank=True)
    promotion = models.JSONField(_("promotion decision"), default=dict, blank=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    ready_at = models.DateTimeField(_("ready at"), null=True, blank=True)
    # Why the files of a once ready version were found unusable, and when.
    broken_reason = models.TextField(_("why it is broken"), blank=True)
    broken_at = models.DateTimeField(_("broken since"), null=True, blank=True)

    class Meta:
        ordering = ["task", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["task", "number"], name="unique_version_number_per_task")
        ]
        verbose_name = _("adapter version")
        verbose_name_plural = _("adapter versions")

    def __str__(self) -> str:
        return f"{self.task.slug}@v{self.number}"

    @property
    def label(self) -> str:
        return f"v{self.number}"

    @property
    def is_ready(self) -> bool:
        return self.status == self.Status.READY

    @property
    def is_broken(self) -> bool:
        return self.status == self.Status.BROKEN

    @property
    def is_active(self) -> bool:
        return self.task.active_version_id == self.pk

    def adapter_dir(self) -> Path:
        return Path(settings.LORAWEB_ADAPTER_ROOT) / self.storage_path

    def eval_loss(self) -> dict[str, float]:
        return dict(self.metrics.get("eval_loss", {}))

    def promotion_message(self) -> str:
        """Return the promotion note in the active language."""
        from .messages import PROMOTION_MESSAGES, render_message

        if not self.promotion.get("code"):
            return self.promotion_note
        return render_message(PROMOTION_MESSAGES, self.promotion["code"], self.promotion.get("params", {}))


class GoldenPrompt(models.Model):
    """A prompt with the answer a task should give, scored for every new version."""

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="golden_prompts")
    prompt = models.TextField(_("prompt"))
    expected = models.TextField(_("expected answer"))
    created_at = models.DateTimeField(_("created"), auto_now_add=True)

    class Meta:
        ordering = ["task", "pk"]
        verbose_name = _("golden prompt")
        verbose_name_plural = _("golden prompts")

    def __str__(self) -> str:
        return self.prompt[:60]


class ActivationEvent(models.Model):
    class Kind(models.TextChoices):
        AUTO = "auto", _("automatic after training")
        ACTIVATE = "activate", _("manual activation")
        ROLLBACK = "rollback", _("rollback")

    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="activation_events")
    from_version = models.ForeignKey(
        AdapterVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    to_version = models.ForeignKey(
        AdapterVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reason = models.TextField(_("reason"))
    created_at = models.DateTimeField(_("when"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name = _("activation event")
        verbose_name_plural = _("activation events")

    def __str__(self) -> str:
        return f"{self.task.slug}: {self.from_version or '-'} -> {self.to_version or '-'}"


class AuditEvent(models.Model):
    """A change that is kept as a record: a deletion, a version found broken, a restore.

    Activations have their own trail (ActivationEvent). The actor's username is copied, so the
    record still names them after the user is deleted.
    """

    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_username = models.CharField(_("actor"), max_length=150, blank=True)
    # Dotted names such as "task.delete", "dataset.delete", "version.broken".
    action = models.CharField(_("action"), max_length=64, db_index=True)
    object_repr = models.CharField(_("object"), max_length=300)
    reason = models.TextField(_("reason"), blank=True)
    details = models.JSONField(_("details"), default=dict, blank=True)
    created_at = models.DateTimeField(_("when"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        verbose_name = _("audit event")
        verbose_name_plural = _("audit events")

    def __str__(self) -> str:
        return f"{self.action} {self.object_repr}"


class ApiToken(models.Model):
    """A bearer token for the JSON API. Only a sha256 of the secret is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(_("name"), max_length=100)
    prefix = models.CharField(_("prefix"), max_length=12)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    last_used_at = models.DateTimeField(_("last used"), null=True, blank=True)
    expires_at = models.DateTimeField(_("expires"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked"), null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("API token")
        verbose_name_plural = _("API tokens")

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def state(self) -> str:
        """One of "revoked", "expired" or "active"."""
        from django.utils import timezone

        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"

    def get_state_display(self) -> str:
        return {
            "revoked": pgettext("token state", "revoked"),
            "expired": pgettext("token state", "expired"),
            "active": pgettext("token state", "active"),
        }[self.state]
