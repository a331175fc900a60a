"""The compare view: losses, greedy answers and per-layer pictures of chosen versions."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.app.test_transfer import ready_version_from
from tests.unit.test_serving_adapters import save_lora_adapter

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_versions(task, tiny_base_dir, tmp_path, settings):
    first = ready_version_from(
        task, save_lora_adapter(tiny_base_dir, tmp_path / "a", rank=4, target_modules=["c_attn"], seed=1), settings
    )
    first.metrics = {"eval_loss": {"dataset-7": 3.5}, "base_eval_loss": {"dataset-7": 9.25}}
    first.save()
    second = ready_version_from(
        task, save_lora_adapter(tiny_base_dir, tmp_path / "b", rank=4, target_modules=["c_attn"], seed=2), settings,
        folder_name="v2-test",
    )
    second.parent = first
    second.metrics = {"eval_loss": {"dataset-7": 2.75}, "base_eval_loss": {"dataset-7": 9.25}}
    second.save()
    return first, second


def test_compare_shows_losses_answers_and_layers(user, task, two_versions):
    client = Client()
    client.force_login(user)
    response = client.get(
        f"/tasks/{task.slug}/compare",
        {"versions": ["1", "2"], "include_base": "on", "prompts": "Hello there\nRoses are red"},
    )

    assert response.status_code == 200
    page = response.content.decode()
    losses = page[page.index('id="compare-losses"'):page.index('id="compare-answers"')]
    for figure in ("9.2500", "3.5000", "2.7500"):
        assert figure in losses
    comparison = response.context["comparison"]
    assert [column.label for column in comparison.columns] == ["base", "v1", "v2"]
    assert all(len(column.answers) == 2 for column in comparison.columns)
    assert comparison.columns[1].answers != comparison.columns[0].answers, "an adapter changes greedy answers"
    v2 = comparison.columns[2]
    assert set(v2.update_norms) == {(layer, "attn.c_attn") for layer in range(comparison.layers)}
    assert v2.parent_shift, "v2 has a parent, so its shift is measured"
    assert not comparison.columns[1].parent_shift
    assert page.count('class="layer-map"') == 3


def test_compare_requires_a_prompt(user, task, two_versions):
    client = Client()
    client.force_login(user)
    response = client.get(f"/tasks/{task.slug}/compare", {"versions": ["1"], "prompts": "  "})
    assert response.status_code == 200
    assert response.context["comparison"] is None
    assert "prompts" in response.context["form"].errors
