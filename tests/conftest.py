"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

# The tiny base is deterministic, so one copy per checkout serves every test run.
TINY_BASE_DIR = Path(os.environ.get("LORAWEB_TEST_BASE_DIR", REPO_ROOT / "var" / "test" / "tiny-gpt2"))
(REPO_ROOT / "var" / "test").mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def tiny_base_dir() -> Path:
    """Path of a tiny GPT-2 (random weights, real tokenizer), built on first use."""
    from adapters_app.serving.base import build_tiny_gpt2, is_current_tiny_model_dir

    if not is_current_tiny_model_dir(TINY_BASE_DIR):
        build_tiny_gpt2(TINY_BASE_DIR)
    return TINY_BASE_DIR


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """Folder of real public datasets kept beside the repository; tests skip without it."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 tokenizer that upload validation and training use."""
    from adapters_app.serving.base import build_gpt2_tokenizer

    return build_gpt2_tokenizer()


def _user_with_role(django_user_model, username: str, role: str | None):
    """Create a user with a password, in the role group `role` (viewer, trainer, maintainer) or none."""
    from django.contrib.auth.models import Group

    user = django_user_model.objects.create_user(username, password="pw-for-tests-only")
    if role is not None:
        # Migration 0005 creates the groups, but tests with transaction=True flush them away.
        group, _created = Group.objects.get_or_create(name=role)
        user.groups.add(group)
    return user


@pytest.fixture
def viewer_user(django_user_model):
    return _user_with_role(django_user_model, "viewer", "viewer")


@pytest.fixture
def trainer_user(django_user_model):
    return _user_with_role(django_user_model, "trainer", "trainer")


@pytest.fixture
def maintainer_user(django_user_model):
    return _user_with_role(django_user_model, "maintainer", "maintainer")


@pytest.fixture
def roleless_user(django_user_model):
    """A user who can log in but belongs to no role group."""
    return _user_with_role(django_user_model, "newcomer", None)
