from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from adapters_app.services import api_token_create


class Command(BaseCommand):
    help = "Create an API token for USERNAME and print it once (only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="Label shown in the token list (default: cli).")

    def handle(self, *args, username: str, name: str, **options):
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}; create it first (python manage.py createsuperuser).")
        token, secret = api_token_create(user, name=name)
        self.stdout.write(secret)
