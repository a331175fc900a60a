"""Rate limits on the playground, /v1/completions and login, counted in the test Redis database."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
import redis
from django.test import Client

from loraweb.ratelimit import rate_limit_hit, user_identity

pytestmark = pytest.mark.django_db


# Retry-After of a 2 s window: 2 s, or 1 s when over a second passed since the counted request
# (the first request of a test process imports the URL configuration, which can take that long).
WINDOW_SECONDS = {"1", "2"}


@pytest.fixture
def limits(settings):
    """Give each test keys of its own in the test Redis database, and delete them afterwards."""
    prefix = f"loraweb-test:{uuid.uuid4().hex}:ratelimit:"
    settings.LORAWEB_RATE_LIMIT_PREFIX = prefix
    redis_url = settings.LORAWEB_REDIS_URL
    yield settings

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("limits-admin", password="pw-for-tests-only")


@pytest.fixture
def admin_client(admin_user) -> Client:
    client = Client()
    client.force_login(admin_user)
    return client


def test_limit_rejects_then_resets(limits):
    limits.LORAWEB_RATE_LIMIT_COMPLETIONS = "2/1s"

    assert rate_limit_hit("completions", "user:1") is None
    assert rate_limit_hit("completions", "user:1") is None
    retry_after = rate_limit_hit("completions", "user:1")
    assert retry_after == 1
    assert rate_limit_hit("completions", "user:2") is None, "each identity has its own window"

    time.sleep(retry_after + 0.05)
    assert rate_limit_hit("completions", "user:1") is None


def test_rejected_requests_are_not_counted(limits):
    limits.LORAWEB_RATE_LIMIT_PLAYGROUND = "1/2s"

    assert rate_limit_hit("playground", "user:1") is None
    for _ in range(5):
        assert rate_limit_hit("playground", "user:1") == 2

    time.sleep(2.05)
    assert rate_limit_hit("playground", "user:1") is None
    assert rate_limit_hit("playground", "user:1") == 2


def test_limit_off_never_rejects(limits):
    limits.LORAWEB_RATE_LIMIT_COMPLETIONS = "off"
    assert all(rate_limit_hit("completions", "user:1") is None for _ in range(50))


def test_redis_down_lets_requests_through(limits, caplog, monkeypatch):
    from loraweb import ratelimit

    limits.LORAWEB_RATE_LIMIT_COMPLETIONS = "1/minute"
    # Nothing listens on port 1 of this machine, so every connection is refused.
    limits.LORAWEB_REDIS_URL = "redis://127.0.0.1:1/15"
    monkeypatch.setitem(ratelimit._warning_state, "last_logged", 0.0)

    with caplog.at_level(logging.WARNING, logger="loraweb.ratelimit"):
        assert rate_limit_hit("completions", "user:1") is None
        assert rate_limit_hit("completions", "user:1") is None

    warnings = [record for record in caplog.records if record.name == "loraweb.ratelimit"]
    assert len(warnings) == 1, "the warning is logged once, not once per request"
    assert "127.0.0.1:1/15" in warnings[0].getMessage()


def test_completions_answer_429_in_openai_shape(limits, admin_user):
    from adapters_app.services import api_token_create

    limits.LORAWEB_RATE_LIMIT_COMPLETIONS = "1/2s"
    token = api_token_create(admin_user, name="limits", user=admin_user)[1]
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    body = {"model": "no-such-task", "prompt": "x", "max_tokens": 1}
    # Counted here rather than by a first request, which may take longer than the window
    # while the process loads the model.
    rate_limit_hit("completions", user_identity(admin_user))

    second = client.post("/v1/completions", body, content_type="application/json")
    assert second.status_code == 429
    assert second["Retry-After"] in WINDOW_SECONDS
    error = second.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    assert "1 request per 2 s" in error["message"]
    assert f"Retry in {second['Retry-After']} s" in error["message"]


def test_completions_limit_is_per_user(limits, admin_user, django_user_model):
    from adapters_app.services import api_token_create

    limits.LORAWEB_RATE_LIMIT_COMPLETIONS = "1/2s"
    rate_limit_hit("completions", user_identity(admin_user))
    other = django_user_model.objects.create_superuser("limits-other", password="pw-for-tests-only")
    # Two prompts fail right after the rate limit check, before the model is loaded.
    body = {"model": "no-such-task", "prompt": ["a", "b"]}

    for user, expected in ((admin_user, 429), (other, 400)):
        token = api_token_create(user, name="limits", user=user)[1]
        response = Client(HTTP_AUTHORIZATION=f"Bearer {token}").post("/v1/completions", body, content_type="application/json")
        assert response.status_code == expected, user.username


def test_playground_stream_answers_429_json(limits, admin_client):
    limits.LORAWEB_RATE_LIMIT_PLAYGROUND = "1/2s"

    first = admin_client.post("/playground/stream", {"prompt": "x"})
    assert first.status_code == 400
    assert first.json()["error"]["code"] == "invalid_form"

    second = admin_client.post("/playground/stream", {"prompt": "x"})
    assert second.status_code == 429
    assert second["Retry-After"] in WINDOW_SECONDS
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert "the playground" in second.json()["error"]["message"]


def test_playground_page_answers_429_with_form(limits, admin_client, admin_user, task):
    limits.LORAWEB_RATE_LIMIT_PLAYGROUND = "1/2s"
    rate_limit_hit("playground", user_identity(admin_user))

    response = admin_client.post(
        "/playground/", {"task": task.slug, "prompt": "Roses", "max_tokens": 2, "temperature": 0, "top_p": 1}
    )

    assert response.status_code == 429
    assert response["Retry-After"] in WINDOW_SECONDS
    assert response.context["answers"] == []
    assert [error.code for error in response.context["form"].non_field_errors().as_data()] == ["rate_limited"]
    assert "Rate limit exceeded: the playground" in response.content.decode()


def test_compare_counts_against_playground_limit(limits, admin_client, admin_user, task):
    from adapters_app.models import AdapterVersion
    from adapters_app.services import version_allocate

    # A rejected comparison never reads the adapter, so a ready row without files is enough.
    version = version_allocate(task, parent=None, hyperparameters={})
    version.status = AdapterVersion.Status.READY
    version.save()
    limits.LORAWEB_RATE_LIMIT_PLAYGROUND = "1/2s"
    rate_limit_hit("playground", user_identity(admin_user))

    response = admin_client.get(f"/tasks/{task.slug}/compare", {"versions": ["1"], "prompts": "Hello"})

    assert response.status_code == 429
    assert response["Retry-After"] in WINDOW_SECONDS
    assert response.context["comparison"] is None
    assert "Rate limit exceeded: the playground" in response.content.decode()


def login(client: Client, username: str, password: str = "wrong-password", **extra):
    return client.post("/accounts/login/", {"username": username, "password": password}, **extra)


def test_login_limited_per_address(limits, admin_user):
    limits.LORAWEB_RATE_LIMIT_LOGIN = "2/2s"
    client = Client()

    assert login(client, "someone").status_code == 200
    assert login(client, "someone-else").status_code == 200
    blocked = login(client, "limits-admin", "pw-for-tests-only")

    assert blocked.status_code == 429
    assert blocked["Retry-After"] in WINDOW_SECONDS
    assert "Too many login attempts" in blocked.content.decode()
    assert "_auth_user_id" not in client.session, "a blocked attempt never checks the password"

    other_address = login(Client(REMOTE_ADDR="127.0.0.2"), "another-name")
    assert other_address.status_code == 200


def test_login_limited_per_username(limits, admin_user):
    limits.LORAWEB_RATE_LIMIT_LOGIN = "2/1s"

    assert login(Client(REMOTE_ADDR="127.0.0.2"), "limits-admin").status_code == 200
    assert login(Client(REMOTE_ADDR="127.0.0.3"), "Limits-Admin").status_code == 200
    blocked = login(Client(REMOTE_ADDR="127.0.0.4"), "limits-admin", "pw-for-tests-only")
    assert blocked.status_code == 429

    time.sleep(int(blocked["Retry-After"]) + 0.05)
    client = Client(REMOTE_ADDR="127.0.0.5")
    assert login(client, "limits-admin", "pw-for-tests-only").status_code == 302
    assert client.session["_auth_user_id"] == str(admin_user.pk)


def test_login_address_from_trusted_proxy(limits, admin_user):
    limits.LORAWEB_RATE_LIMIT_LOGIN = "1/2s"
    limits.LORAWEB_TRUSTED_PROXIES = 1
    proxy = Client(REMOTE_ADDR="10.0.0.1")

    assert login(proxy, "a", HTTP_X_FORWARDED_FOR="192.0.2.1").status_code == 200
    assert login(proxy, "b", HTTP_X_FORWARDED_FOR="192.0.2.2").status_code == 200, "another client behind the proxy"
    # The client may send a forged X-Forwarded-For; the proxy appends the real address last.
    assert login(proxy, "c", HTTP_X_FORWARDED_FOR="192.0.2.9, 192.0.2.1").status_code == 429


def test_admin_login_limited(limits, admin_user):
    limits.LORAWEB_RATE_LIMIT_LOGIN = "1/2s"
    client = Client()
    client.post("/admin/login/", {"username": "x", "password": "y"})

    blocked = client.post("/admin/login/", {"username": "limits-admin", "password": "pw-for-tests-only"})

    assert "Too many login attempts" in blocked.content.decode()
    assert "_auth_user_id" not in client.session
