from pathlib import Path

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Build a tiny GPT-2 with random weights and the real GPT-2 tokenizer into DIR (offline)."

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)
        parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")

    def handle(self, *args, directory: Path, seed: int, **options):
        from adapters_app.serving.base import build_tiny_gpt2

        path = build_tiny_gpt2(directory, seed=seed)
        self.stdout.write(f"Tiny GPT-2 written to {path}")
