import logging

from django.core.management.base import BaseCommand, CommandError

from adapters_app.roles import SYSTEM
from training_app.demo import DemoError, demo_run, format_report


class Command(BaseCommand):
    help = (
        "Run the demo scenario through the running Celery worker: train spell-digits on A1, "
        "reverse-words on B1, retrain spell-digits on A2 from its active version, and print "
        "losses, exact-match accuracy and the checks."
    )

    def add_arguments(self, parser):
        parser.add_argument("--timeout", type=float, default=1800, help="Seconds to wait for each job (default 1800).")

    def handle(self, *args, timeout: float, **options):
        # Per-request INFO logs would bury the progress lines and the table.
        for name in ("adapters_app", "training_app"):
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            # The command acts for the installation, so the demo's rows record no user.
            result = demo_run(user=SYSTEM, report=self.stdout.write, timeout=timeout)
        except DemoError as error:
            raise CommandError(str(error)) from error
        self.stdout.write("")
        self.stdout.write(format_report(result))
        if not result.b_unchanged or result.base_hash_before != result.base_hash_after:
            raise CommandError("a demo check failed; see the table above")
