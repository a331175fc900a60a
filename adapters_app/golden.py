"""Score a version on its task's golden prompts: greedy answers against the expected ones."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from django.conf import settings

from .models import AdapterVersion

logger = logging.getLogger(__name__)

GOLDEN_MAX_TOKENS = 64


def similarity(answer: str, expected: str) -> float:
    """Share of matching characters between two texts (difflib's ratio, 0 to 1)."""
    return difflib.SequenceMatcher(None, answer.strip(), expected.strip()).ratio()


def score_golden_prompts(version: AdapterVersion, base_path: str) -> dict | None:
    """Answer each golden prompt with the version and with the bare base, and score both.

    Runs in the training worker with an engine of its own, which is dropped afterwards so the
    worker does not keep a second copy of the base between jobs. Returns None when the task
    has no golden prompts.
    """
    golden = list(version.task.golden_prompts.all())
    if not golden:
        return None

    from .serving.base import load_base_model
    from .serving.engine import Engine, GenerationRequest

    engine = Engine(load_base_model(base_path, device=settings.LORAWEB_DEVICE))
    try:
        requests = []
        for item in golden:
            for adapter in (version, None):
                requests.append(
                    GenerationRequest(
                        prompt=item.prompt,
                        adapter_key=f"version-{adapter.pk}" if adapter else None,
                        adapter_path=Path(adapter.adapter_dir()) if adapter else None,
                        adapter_sha256=adapter.sha256 if adapter else None,
                        max_new_tokens=GOLDEN_MAX_TOKENS,
                        temperature=0.0,
                    )
                )
        results = engine.generate(requests)
    finally:
        engine.close()

    rows = []
    for index, item in enumerate(golden):
        answer = results[2 * index].text.strip()
        base_answer = results[2 * index + 1].text.strip()
        rows.append(
            {
                "prompt": item.prompt,
                "expected": item.expected,
                "answer": answer,
                "exact": answer == item.expected.strip(),
                "similarity": round(similarity(answer, item.expected), 4),
                "base_answer": base_answer,
                "base_exact": base_answer == item.expected.strip(),
                "base_similarity": round(similarity(base_answer, item.expected), 4),
            }
        )
    count = len(rows)
    summary = {
        "count": count,
        "exact_match": sum(row["exact"] for row in rows) / count,
        "similarity": sum(row["similarity"] for row in rows) / count,
        "base_exact_match": sum(row["base_exact"] for row in rows) / count,
        "base_similarity": sum(row["base_similarity"] for row in rows) / count,
        "results": rows,
    }
    logger.info(
        "Golden prompts of %s: exact match %.2f, similarity %.2f (base %.2f, %.2f)",
        version, summary["exact_match"], summary["similarity"], summary["base_exact_match"], summary["base_similarity"],
    )
    return summary
