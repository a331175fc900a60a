"""Restore an archive written by export_archive into an installation without tasks."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError
from training_app.archive import archive_import


class Command(BaseCommand):
    help = (
        "Import an archive made by export_archive. Every file is checked against the archive's manifest "
        "first; the installation must have no tasks yet."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="Archive file written by export_archive.")

    def handle(self, *args, path: Path, **options) -> None:
        if not path.is_file():
            raise CommandError(f"{path} is not a file; give the path of an archive written by export_archive.")
        try:
            summary = archive_import(path, user=SYSTEM)
        except ServiceError as error:
            raise CommandError(error.message) from error
        self.stdout.write(
            f"Imported {path}: {summary.tasks} tasks, {summary.datasets} datasets, {summary.versions} versions, "
            f"{summary.jobs} jobs, {summary.files} files ({summary.bytes} bytes). "
            "Run verify_adapters to recheck the adapter files in place."
        )
