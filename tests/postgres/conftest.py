"""Tests of concurrent requests that need PostgreSQL's row locks.

SQLite serializes every write transaction, so these races cannot happen on it. The default
suite runs on SQLite and collects nothing here. tests/app/test_postgres.py runs this folder in a
child pytest with DATABASE_URL pointing at a real PostgreSQL server.
"""

from __future__ import annotations

import os

import pytest

ON_POSTGRES = os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))

if not ON_POSTGRES:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def django_db_modify_db_settings():
    """Give this run a test database of its own, so two suites on one server do not collide."""
    from django.conf import settings

    settings.DATABASES["default"].setdefault("TEST", {})["NAME"] = f"test_loraweb_{os.getpid()}"
