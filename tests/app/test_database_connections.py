"""Async completions release their database connection while they wait for tokens."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fresh_engine():
    from adapters_app.inference import reset_engine

    reset_engine()
    yield
    reset_engine()


def test_submit_closes_request_connection(task, fresh_engine):
    # Under ASGI every waiting request kept its own connection open, and 200 of them
    # exhausted PostgreSQL's connections, so later requests failed with 500.
    from adapters_app.inference import SamplingParams, admit, asubmit, await_completion

    admission = admit("poetry", SamplingParams(max_tokens=2))
    assert connection.connection is not None, "admission did not query the database"

    async def submit() -> list:
        return await asubmit([admission], "Roses are red")

    # The view's database work runs in this thread, as Django's thread-sensitive code does.
    handles = async_to_sync(submit)()
    released = connection.connection is None
    completion = async_to_sync(await_completion)(admission, handles[0])

    assert released, "the connection stayed open while the request waited for tokens"
    assert completion.result.completion_tokens <= 2
    assert task.__class__.objects.filter(slug="poetry").exists()  # a later query reconnects
