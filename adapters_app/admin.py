"""Django admin for tasks, versions and the audit trail, with a rollback action."""

from __future__ import annotations

from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils.translation import gettext_lazy as _, ngettext

from .forms import ReasonForm
from .models import ActivationEvent, AdapterVersion, ApiToken, AuditEvent, GoldenPrompt, Task
from .roles import Role, has_role
from .services import ServiceError, api_token_revoke, task_rollback


class RoleAdmin:
    """Admin permissions from loraweb's roles instead of Django's per-model permissions.

    Mixed into ModelAdmin and inline classes. A class may still return False for an operation
    that makes no sense for its model, such as adding a version by hand.
    """

    view_role = Role.VIEWER
    add_role = Role.MAINTAINER
    change_role = Role.MAINTAINER
    delete_role = Role.MAINTAINER

    def has_module_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, self.view_role)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return has_role(request.user, self.view_role)

    def has_add_permission(self, request: HttpRequest, *args) -> bool:
        return has_role(request.user, self.add_role)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return has_role(request.user, self.change_role)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return has_role(request.user, self.delete_role)


class GoldenPromptInline(RoleAdmin, admin.TabularInline):
    model = GoldenPrompt
    extra = 1
    fields = ("prompt", "expected")
    add_role = change_role = delete_role = Role.TRAINER


@admin.register(Task)
class TaskAdmin(RoleAdmin, admin.ModelAdmin):
    # Trainers edit names, descriptions and golden prompts; the promotion policy decides what
    # becomes active, so only maintainers change it.
    add_role = change_role = Role.TRAINER
    inlines = [GoldenPromptInline]
    list_display = ("slug", "name", "active_version", "auto_activate", "base_model_id", "created_at")
    list_filter = ("auto_activate",)
    search_fields = ("slug", "name", "description")
    fieldsets = (
        (None, {"fields": ("slug", "name", "description", "base_model_id", "active_version", "created_by", "created_at")}),
        (_("Promotion policy"), {"fields": ("auto_activate", "min_improvement", "forgetting_tolerance")}),
    )
    readonly_fields = ("active_version", "base_model_id", "created_by", "created_at")
    list_select_related = ("active_version",)

    def get_readonly_fields(self, request: HttpRequest, obj=None) -> tuple[str, ...]:
        fields = tuple(super().get_readonly_fields(request, obj))
        if has_role(request.user, Role.MAINTAINER):
            return fields
        return fields + ("auto_activate", "min_improvement", "forgetting_tolerance")

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        # Deleting here would skip the audit record and leave the files behind; the task's
        # own "Delete task" page (or DELETE /api/v1/tasks/<slug>) does both.
        return False


@admin.register(AdapterVersion)
class AdapterVersionAdmin(RoleAdmin, admin.ModelAdmin):
    list_display = ("__str__", "task", "number", "status", "is_active_display", "parent", "created_at", "ready_at")
    list_filter = ("status", "task")
    search_fields = ("task__slug", "sha256", "promotion_note")
    list_select_related = ("task", "parent")
    actions = ["rollback_to_version"]
    # Versions are immutable once trained: every field is read-only here.
    readonly_fields = (
        "task", "number", "parent", "status", "hyperparameters", "base_model_id", "base_weight_hash",
        "storage_path", "sha256", "size_bytes", "metrics", "promotion_note", "created_at", "ready_at",
        "broken_reason", "broken_at",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_rollback_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, Role.MAINTAINER)

    @admin.display(description=_("active"), boolean=True)
    def is_active_display(self, obj: AdapterVersion) -> bool:
        return obj.is_active

    @admin.action(description=_("Roll back to this version"), permissions=["rollback"])
    def rollback_to_version(self, request: HttpRequest, queryset) -> HttpResponse | None:
        versions = list(queryset.select_related("task"))
        if len(versions) != 1:
            self.message_user(request, _("Select exactly one version to roll back to."), messages.ERROR)
            return None

        version = versions[0]
        form = ReasonForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            try:
                result = task_rollback(version, reason=form.cleaned_data["reason"], user=request.user)
            except ServiceError as error:
                self.message_user(request, error.message, messages.ERROR)
            else:
                self.message_user(request, result.message, messages.SUCCESS if result.changed else messages.INFO)
            return None

        context = {
            **self.admin_site.each_context(request),
            "title": _("Roll back %(task)s to %(version)s") % {"task": version.task.slug, "version": version.label},
            "version": version,
            "current": version.task.active_version,
            "form": form,
            "opts": self.model._meta,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/adapters_app/rollback_confirm.html", context)


@admin.register(ActivationEvent)
class ActivationEventAdmin(RoleAdmin, admin.ModelAdmin):
    list_display = ("created_at", "task", "kind", "from_version", "to_version", "actor", "reason")
    list_filter = ("kind", "task")
    search_fields = ("task__slug", "reason", "actor__username")
    list_select_related = ("task", "from_version", "to_version", "actor")
    readonly_fields = ("task", "from_version", "to_version", "kind", "actor", "reason", "created_at")

    # The audit trail is append-only.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(RoleAdmin, admin.ModelAdmin):
    view_role = Role.MAINTAINER
    list_display = ("name", "user", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("name", "user__username", "prefix")
    readonly_fields = ("user", "prefix", "key_hash", "created_at", "last_used_at")
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description=_("Revoke selected tokens"))
    def revoke(self, request: HttpRequest, queryset) -> None:
        count = 0
        for token in queryset.select_related("user"):
            try:
                count += api_token_revoke(token, user=request.user)
            except ServiceError as error:
                self.message_user(request, error.message, messages.ERROR)
                return
        self.message_user(request, ngettext("%d token revoked.", "%d tokens revoked.", count) % count)


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("created_at", "action", "object_repr", "actor_username", "reason")
    list_filter = ("action",)
    search_fields = ("object_repr", "actor_username", "reason")
    readonly_fields = ("created_at", "action", "object_repr", "actor", "actor_username", "reason", "details")

    # The audit log is append-only; maintainers read it.
    def has_module_permission(self, request: HttpRequest) -> bool:
        return has_role(request.user, Role.MAINTAINER)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return has_role(request.user, Role.MAINTAINER)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
