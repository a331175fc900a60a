"""The promotion policy, one case per branch."""

from __future__ import annotations

import pytest

from training_app.promotion import decide_promotion

NAMES = {"dataset-1": "A1.jsonl", "dataset-2": "A2.jsonl"}


def decide(**overrides):
    arguments = {
        "has_active": True,
        "auto_activate": True,
        "new_scores": {"dataset-1": 2.0, "dataset-2": 1.0},
        "active_scores": {"dataset-1": 2.0, "dataset-2": 3.0},
        "new_keys": ["dataset-2"],
        "names": NAMES,
        "active_label": "v1",
        "min_improvement": 0.0,
        "forgetting_tolerance": 0.1,
    }
    arguments.update(overrides)
    return decide_promotion(**arguments)


def test_first_version_activates():
    decision = decide(has_active=False, active_scores={})
    assert decision.activate is True
    assert decision.code == "first_version"


def test_better_without_forgetting_activates():
    decision = decide()
    assert decision.activate is True
    assert decision.code == "beats_active"
    assert decision.params == {"new": "1.0000", "active": "3.0000", "label": "v1"}


def test_not_better_stays_candidate():
    decision = decide(new_scores={"dataset-1": 2.0, "dataset-2": 3.5})
    assert decision.activate is False
    assert decision.code == "not_better"


def test_improvement_below_minimum_stays_candidate():
    decision = decide(min_improvement=2.5)
    assert decision.activate is False
    assert decision.code == "not_better"


def test_forgetting_beyond_tolerance_stays_candidate():
    decision = decide(new_scores={"dataset-1": 2.5, "dataset-2": 1.0})
    assert decision.activate is False
    assert decision.code == "forgets"
    assert decision.params["dataset"] == "A1.jsonl"
    assert decision.params["new"] == "2.5000"


def test_forgetting_within_tolerance_activates():
    decision = decide(new_scores={"dataset-1": 2.05, "dataset-2": 1.0})
    assert decision.activate is True


def test_auto_activation_off_stays_candidate():
    decision = decide(auto_activate=False)
    assert decision.activate is False
    assert decision.code == "auto_activation_off"


@pytest.mark.parametrize("new_scores", [{}, {"dataset-1": 1.0}])
def test_no_score_on_new_data_stays_candidate(new_scores):
    assert decide(new_scores=new_scores).activate is False
