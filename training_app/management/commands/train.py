"""Train a new version of a task in this process, with a progress bar in the terminal."""

import json
import sys

from django.core.management.base import BaseCommand, CommandError

from adapters_app.roles import SYSTEM
from adapters_app.services import ServiceError, task_get
from training_app import services
from training_app.models import TrainingJob


class Command(BaseCommand):
    help = (
        "Train a new version of TASK on the given datasets, here and now rather than in the "
        "worker. The job, version and promotion are recorded exactly as for the web."
    )

    def add_arguments(self, parser):
        parser.add_argument("task", help="Slug of the task.")
        parser.add_argument("--dataset", type=int, action="append", required=True, help="Dataset id; repeat for several.")
        start = parser.add_mutually_exclusive_group()
        start.add_argument("--fresh", action="store_true", help="Start a fresh adapter even when a version is active.")
        start.add_argument("--warm-start", action="store_true", help="Continue from the active version (the default when there is one).")
        parser.add_argument("--preset", choices=["quick", "balanced", "thorough"], help="Named hyperparameter preset.")
        parser.add_argument(
            "--set", action="append", default=[], metavar="NAME=VALUE",
            help="Override one hyperparameter, value in JSON (e.g. --set epochs=2 --set learning_rate=0.001).",
        )

    def handle(self, *args, task: str, dataset: list[int], fresh: bool, warm_start: bool, preset, **options):
        hyperparameters = self._parse_overrides(options["set"])
        if preset:
            hyperparameters["preset"] = preset
        warm = None
        if fresh:
            warm = False
        elif warm_start:
            warm = True

        try:
            job = services.training_start(
                task_get(task),
                dataset_ids=dataset,
                warm_start=warm,
                hyperparameters=hyperparameters,
                enqueue=False,
                user=SYSTEM,
            )
        except ServiceError as error:
            raise CommandError(error.message) from error

        self.stdout.write(f"Training {job.task.slug} v{job.version.number} (job {job.pk})")
        services.training_run(job.pk, listener=self._draw)
        sys.stdout.write("\n")

        job.refresh_from_db()
        job.version.refresh_from_db()
        if job.state != TrainingJob.State.SUCCEEDED:
            raise CommandError(f"Job {job.pk} ended {job.state}: {job.error}")
        self.stdout.write(f"{job.version}: {job.version.promotion_note}")
        for key, loss in sorted(job.version.eval_loss().items()):
            self.stdout.write(f"  eval loss {key}: {loss:.4f}")

    @staticmethod
    def _parse_overrides(pairs: list[str]) -> dict:
        values = {}
        for pair in pairs:
            name, separator, raw = pair.partition("=")
            if not separator:
                raise CommandError(f"--set {pair!r} is not NAME=VALUE")
            try:
                values[name.strip()] = json.loads(raw)
            except ValueError:
                values[name.strip()] = raw
        return values

    def _draw(self, progress) -> None:
        width = 30
        filled = int(width * progress.step / max(progress.total_steps, 1))
        bar = "#" * filled + "-" * (width - filled)
        rate = progress.tokens_seen / progress.elapsed_seconds if progress.elapsed_seconds else 0.0
        left = progress.elapsed_seconds / progress.step * (progress.total_steps - progress.step) if progress.step else 0.0
        evaluation = f" val {progress.eval_loss:.3f}" if progress.eval_loss is not None else ""
        sys.stdout.write(
            f"\r[{bar}] {progress.step}/{progress.total_steps} loss {progress.loss:.3f}{evaluation}"
            f" {rate:.0f} tok/s ETA {left:.0f}s   "
        )
        sys.stdout.flush()
