from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from adapters_app.roles import SYSTEM
from adapters_app.services import API_TOKEN_LIFETIMES, ServiceError, api_token_create, api_token_expiry

LIFETIME_CHOICES = [str(days) for days in API_TOKEN_LIFETIMES if days is not None] + ["never"]


class Command(BaseCommand):
    help = (
        "Create an API token for USERNAME and print it once (only its hash is stored). "
        "The token acts with the user's role."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="cli", help="Label shown in the token list (default: cli).")
        parser.add_argument(
            "--expires-days",
            choices=LIFETIME_CHOICES,
            default="never",
            help="Days until the token expires, or 'never' (default: never).",
        )

    def handle(self, *args, username: str, name: str, expires_days: str, **options):
        owner = get_user_model().objects.filter(username=username).first()
        if owner is None:
            raise CommandError(f"No user named {username!r}; create it first (python manage.py createsuperuser).")
        try:
            expires_at = api_token_expiry(None if expires_days == "never" else int(expires_days))
            token, secret = api_token_create(owner, name=name, user=SYSTEM, expires_at=expires_at)
        except ServiceError as error:
            raise CommandError(error.message) from error
        self.stdout.write(secret)
