"""Put a user in one role group (viewer, trainer or maintainer), or in none."""

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from adapters_app.roles import ROLE_GROUP_NAMES

NO_ROLE = "none"


class Command(BaseCommand):
    help = (
        "Give USERNAME the role ROLE (viewer, trainer or maintainer; each includes the ones before), "
        "or 'none' to take every role away. The user leaves the other role groups."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("role", choices=[*ROLE_GROUP_NAMES, NO_ROLE])

    def handle(self, *args, username: str, role: str, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}; create it first in Django admin (Users, then Add user).")

        groups = {group.name: group for group in Group.objects.filter(name__in=ROLE_GROUP_NAMES)}
        missing = sorted(set(ROLE_GROUP_NAMES) - set(groups))
        if missing:
            raise CommandError(f"Role groups {', '.join(missing)} are missing; run python manage.py migrate.")

        with transaction.atomic():
            user.groups.remove(*groups.values())
            if role != NO_ROLE:
                user.groups.add(groups[role])

        note = " (a superuser keeps every role)" if user.is_superuser else ""
        self.stdout.write(f"{username} now has the role {role}{note}.")
