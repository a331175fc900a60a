"""Make sure a base model is ready before the web server and worker start."""

import logging
import os
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

from adapters_app.base_model import BaseChoice, BaseModelUnavailable, is_hub_cached, record_choice, resolve_base_choice


class Command(BaseCommand):
    help = (
        "Resolve LORAWEB_BASE_MODEL: use a local folder or the Hugging Face cache, else try to "
        "download it, else build the tiny offline GPT-2. Prints one line saying which base is used."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--no-download", action="store_true", help="Do not contact the Hugging Face hub."
        )

    def handle(self, *args, no_download: bool, **options):
        # One line of output is the contract with `make run`; library INFO logs would bury it.
        logging.getLogger("adapters_app").setLevel(logging.WARNING)
        requested = settings.LORAWEB_BASE_MODEL
        choice = self._existing(requested)
        failure = "download disabled"
        if choice is None and not no_download:
            choice, failure = self._download(requested)
        if choice is None:
            choice = self._tiny(requested, failure)
        record_choice(choice)
        self.stdout.write(choice.note or f"Base model: {choice.path}")

    def _existing(self, requested: str) -> BaseChoice | None:
        if Path(requested).expanduser().is_dir() or is_hub_cached(requested):
            try:
                choice = resolve_base_choice()
            except BaseModelUnavailable:
                return None
            return BaseChoice(choice.requested, choice.path, choice.is_tiny, f"Base model: {choice.path}")
        return None

    def _download(self, requested: str) -> tuple[BaseChoice | None, str]:
        # Short timeouts: on a machine without network the fallback should come in seconds.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "20")
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(
                requested,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "vocab.bpe"],
            )
        except Exception as error:  # noqa: BLE001 - any hub failure means: fall back to the tiny base
            return None, f"download failed: {type(error).__name__}"
        note = f"Base model: {requested} (downloaded to the Hugging Face cache)"
        return BaseChoice(requested, requested, False, note), ""

    def _tiny(self, requested: str, failure: str) -> BaseChoice:
        from adapters_app.serving.base import build_tiny_gpt2, is_current_tiny_model_dir

        folder = Path(settings.LORAWEB_TINY_MODEL_DIR)
        if not is_current_tiny_model_dir(folder):
            build_tiny_gpt2(folder)
        note = (
            f"Base model {requested!r} could not be loaded (not in the local cache, {failure}); using the tiny "
            f"offline GPT-2 in {folder}, which is for trying the product, not for quality."
        )
        return BaseChoice(requested, str(folder), True, note)
