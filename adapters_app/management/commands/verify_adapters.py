"""Recheck every ready version's adapter files, for example after a disk incident."""

from __future__ import annotations

import logging

from django.core.management.base import BaseCommand, CommandError, CommandParser

from adapters_app.integrity import versions_verify
from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError, task_get

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Hash the adapter files of every ready and broken version: versions whose files are missing or "
        "differ from their sha256 become broken, broken ones whose files match again become ready. "
        "Exits with status 1 when a version is broken."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--task", help="Check only the versions of the task with this slug.")

    def handle(self, *args, **options) -> None:
        try:
            task = task_get(options["task"]) if options["task"] else None
            report = versions_verify(task=task, user=SYSTEM)
        except ServiceError as error:
            raise CommandError(error.message) from error

        for version, problem in report.newly_broken:
            self.stdout.write(self.style.ERROR(f"broken    {version}: {problem}"))
        for version in report.still_broken:
            self.stdout.write(self.style.WARNING(f"still broken {version}: {version.broken_reason}"))
        for version in report.restored:
            self.stdout.write(self.style.SUCCESS(f"restored  {version}: its files match its sha256 again"))
        broken = len(report.newly_broken) + len(report.still_broken)
        self.stdout.write(
            f"Checked {report.checked} versions: {broken} broken "
            f"({len(report.newly_broken)} newly), {len(report.restored)} restored."
        )
        if broken:
            raise CommandError(
                f"{broken} versions are broken; roll their tasks back, train new versions, import the "
                "adapters again or restore the files from a backup and run verify_adapters again."
            )
