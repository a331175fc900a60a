"""Write every task, dataset, version, job and audit record, with their files, to one archive."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError
from training_app.archive import archive_export


class Command(BaseCommand):
    help = "Export the whole installation (rows and files) to a zip archive with a checksummed manifest."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path, help="Archive file to write, such as backup.zip.")
        parser.add_argument("--force", action="store_true", help="Replace the file if it exists.")

    def handle(self, *args, path: Path, force: bool, **options) -> None:
        if path.exists() and not force:
            raise CommandError(f"{path} already exists; choose another path or pass --force to replace it.")
        if not path.parent.is_dir():
            raise CommandError(f"The folder {path.parent} does not exist; create it first.")
        try:
            summary = archive_export(path, user=SYSTEM)
        except ServiceError as error:
            raise CommandError(error.message) from error
        self.stdout.write(
            f"Wrote {path}: {summary.tasks} tasks, {summary.datasets} datasets, {summary.versions} versions, "
            f"{summary.jobs} jobs, {summary.files} files ({summary.bytes} bytes)."
        )
