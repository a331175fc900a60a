"""The admin site: open to trainers and maintainers as well as staff users.

Trainers edit golden prompts here and maintainers roll tasks back, so membership in the trainer
or maintainer group is enough to enter. Each model admin then decides by role what a user may
see and change (see admin.RoleAdmin). Users, groups and other Django models keep Django's own permissions.
"""

from __future__ import annotations

from django.contrib import admin
from django.contrib.admin.apps import AdminConfig
from django.http import HttpRequest


class LorawebAdminSite(admin.AdminSite):
    def has_permission(self, request: HttpRequest) -> bool:
        from .roles import Role, has_role

        user = request.user
        return user.is_active and (user.is_staff or has_role(user, Role.TRAINER))


class LorawebAdminConfig(AdminConfig):
    default_site = "adapters_app.admin_site.LorawebAdminSite"
