"""Runs tests/postgres in a child pytest against the PostgreSQL server on 127.0.0.1:5432.

The suite's own database is SQLite, which serializes writes, so the row-lock races those
tests provoke need PostgreSQL. They skip only when no server accepts a connection there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
POSTGRES_URLS = [
    # The first role that may create databases wins: the child makes its own test database.
    "postgres://postgres@127.0.0.1:5432/test",
    "postgres://root@127.0.0.1:5432/test",
]


def _usable_url() -> str | None:
    import psycopg

    for url in POSTGRES_URLS:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                row = conn.execute("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        except psycopg.Error:
            continue
        if row and row[0]:
            return url
    return None


def test_concurrent_requests_on_postgres(tmp_path):
    url = _usable_url()
    if url is None:
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432 as a role that may create databases (postgres or root)")

    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "loraweb.test_settings"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/postgres", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in summary, summary
    assert "skipped" not in summary, summary
    assert "failed" not in summary, summary
