import os
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = (
        "Create the user 'admin' when no superuser exists. The password comes from "
        "LORAWEB_ADMIN_PASSWORD, else it is generated and printed once."
    )

    def handle(self, *args, **options):
        users = get_user_model()
        if users.objects.filter(is_superuser=True).exists():
            return

        password = os.environ.get("LORAWEB_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        users.objects.create_superuser("admin", "", password)
        if os.environ.get("LORAWEB_ADMIN_PASSWORD"):
            self.stdout.write("Created user 'admin' with the password from LORAWEB_ADMIN_PASSWORD.")
        else:
            self.stdout.write(f"Created user 'admin' with password: {password}  (shown only this once)")
