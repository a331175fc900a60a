"""Decide which base model this installation uses, without importing torch.

`LORAWEB_BASE_MODEL` names a local folder or a Hugging Face id. When the id is neither in
the local cache nor downloadable, `manage.py prepare_base_model` builds the tiny offline
GPT-2 and records that choice in `var/base_model.json`, so the web server and the worker
agree on the same base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)

TINY_MARKER = "loraweb_tiny.json"
TINY_MODEL_ID = "loraweb/tiny-gpt2-offline"


class BaseModelUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class BaseChoice:
    """The base model a process loads: what was configured and what is actually used."""

    requested: str
    path: str
    is_tiny: bool
    note: str = ""

    @property
    def model_id(self) -> str:
        """Name recorded on tasks and versions: the configured id, or the tiny fallback's own."""
        return TINY_MODEL_ID if self.is_tiny else self.requested


def choice_file() -> Path:
    return Path(settings.VAR_DIR) / "base_model.json"


def is_hub_cached(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json")
    return isinstance(found, str)


def _choice_for_folder(requested: str, folder: Path) -> BaseChoice:
    return BaseChoice(requested=requested, path=str(folder), is_tiny=(folder / TINY_MARKER).is_file())


def resolve_base_choice() -> BaseChoice:
    """Return the base this installation uses; raise BaseModelUnavailable if none is ready."""
    requested = settings.LORAWEB_BASE_MODEL
    folder = Path(requested).expanduser()
    if folder.is_dir():
        return _choice_for_folder(requested, folder.resolve())

    if is_hub_cached(requested):
        return BaseChoice(requested=requested, path=requested, is_tiny=False)

    recorded = read_recorded_choice()
    if recorded is not None and recorded.requested == requested and Path(recorded.path).is_dir():
        return recorded

    raise BaseModelUnavailable(
        f"The base model {requested!r} is not a folder and not in the local Hugging Face cache. "
        "Run `python manage.py prepare_base_model` to download it or build the tiny offline GPT-2."
    )


@lru_cache(maxsize=1)
def current_base_choice() -> BaseChoice:
    """Return the resolved base, cached for the life of the process because the base never changes."""
    return resolve_base_choice()


def read_recorded_choice() -> BaseChoice | None:
    path = choice_file()
    if not path.is_file():
        return None
    try:
        return BaseChoice(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        logger.warning("Ignoring unreadable %s: %s", path, error)
        return None


def record_choice(choice: BaseChoice) -> None:
    path = choice_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(asdict(choice), indent=2), encoding="utf-8")
    temporary.replace(path)
