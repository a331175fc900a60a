"""The account page and API tokens: create, list, revoke, expire, and the API responses to each."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from adapters_app.models import ApiToken
from adapters_app.roles import SYSTEM
from adapters_app.services import api_token_create

pytestmark = pytest.mark.django_db

SECRET_PATTERN = re.compile(r'id="new-token-secret" value="(lw_[^"]+)"')


def browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def bearer(secret: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")


def test_account_page_shows_user_and_role(viewer_user):
    page = browser(viewer_user).get("/accounts/").content.decode()
    assert "<strong>viewer</strong>" in page
    assert 'id="token-form"' in page
    assert 'id="all-token-table"' not in page


def test_header_links_to_account(viewer_user):
    page = browser(viewer_user).get("/accounts/").content.decode()
    assert 'href="/accounts/" id="account-link"' in page


def test_create_token_shows_secret_once(viewer_user):
    client = browser(viewer_user)
    response = client.post("/accounts/", {"name": "nightly eval", "lifetime": "30"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    secret = SECRET_PATTERN.search(response.content.decode()).group(1)

    token = ApiToken.objects.get(user=viewer_user)
    assert token.name == "nightly eval"
    assert secret.startswith(token.prefix)
    assert secret not in (token.key_hash, token.prefix)
    days = (token.expires_at - timezone.now()).total_seconds() / 86400
    assert 29.9 < days <= 30

    # The header hint names a placeholder that survives HTML rendering.
    assert "Authorization: Bearer TOKEN" in response.content.decode()

    listing = client.get("/accounts/").content.decode()
    assert secret not in listing
    assert "nightly eval" in listing
    assert f"{token.prefix}…" in listing


def test_token_states_in_chinese(viewer_user):
    from adapters_app.services import api_token_revoke

    client = browser(viewer_user)
    client.post("/accounts/", {"name": "old", "lifetime": "never"})
    api_token_revoke(ApiToken.objects.get(user=viewer_user), user=viewer_user)

    page = client.get("/accounts/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()

    assert "已吊销" in page
    assert "从未使用" in page
    assert "永不过期" in page


def test_created_token_acts_with_user_role(viewer_user):
    response = browser(viewer_user).post("/accounts/", {"name": "script", "lifetime": "never"})
    secret = SECRET_PATTERN.search(response.content.decode()).group(1)
    assert ApiToken.objects.get(user=viewer_user).expires_at is None

    client = bearer(secret)
    assert client.get("/api/v1/tasks").status_code == 200
    refused = client.post("/api/v1/tasks", {"slug": "x", "name": "x"}, content_type="application/json")
    assert refused.status_code == 403
    assert refused.json()["errors"][0]["code"] == "forbidden"


@pytest.mark.parametrize("data", [{"name": "", "lifetime": "30"}, {"name": "ok", "lifetime": "7"}])
def test_invalid_token_form_creates_nothing(viewer_user, data):
    response = browser(viewer_user).post("/accounts/", data)
    assert response.status_code == 200
    assert 'id="new-token"' not in response.content.decode()
    assert not ApiToken.objects.exists()


def test_revoke_own_token_through_page(viewer_user):
    token, secret = api_token_create(viewer_user, name="laptop", user=viewer_user)
    client = browser(viewer_user)
    url = f"/accounts/tokens/{token.pk}/revoke"

    confirm = client.get(url).content.decode()
    assert 'id="confirm-revoke"' in confirm
    token.refresh_from_db()
    assert token.revoked_at is None

    assert client.post(url).status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert token.state == "revoked"

    listing = client.get("/accounts/").content.decode()
    assert url not in listing

    response = bearer(secret).get("/api/v1/tasks")
    assert response.status_code == 401
    error = response.json()["errors"][0]
    assert error["code"] == "token_revoked"
    assert "revoked" in error["message"]


def test_revoke_needs_csrf_token(viewer_user):
    token, _secret = api_token_create(viewer_user, name="laptop", user=viewer_user)
    client = Client(enforce_csrf_checks=True)
    client.force_login(viewer_user)
    assert client.post(f"/accounts/tokens/{token.pk}/revoke").status_code == 403
    token.refresh_from_db()
    assert token.revoked_at is None


def test_expired_token_says_so_on_both_apis(viewer_user):
    token, secret = api_token_create(viewer_user, name="old", user=viewer_user)
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timezone.timedelta(minutes=1))

    native = bearer(secret).get("/api/v1/tasks")
    assert native.status_code == 401
    assert native.json()["errors"][0]["code"] == "token_expired"
    assert "expired" in native.json()["errors"][0]["message"]

    openai = bearer(secret).get("/v1/models")
    assert openai.status_code == 401
    assert openai.json()["error"]["code"] == "token_expired"
    assert openai.json()["error"]["type"] == "authentication_error"

    listing = browser(viewer_user).get("/accounts/").content.decode()
    assert "token-expired" in listing


def test_unknown_token_is_generic_401():
    response = bearer("lw_not-a-token").get("/api/v1/tasks")
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "unauthorized"


def test_users_cannot_see_or_revoke_others_tokens(viewer_user, trainer_user):
    token, _secret = api_token_create(trainer_user, name="theirs", user=trainer_user)
    client = browser(viewer_user)

    assert "theirs" not in client.get("/accounts/").content.decode()
    assert client.get(f"/accounts/tokens/{token.pk}/revoke").status_code == 404
    assert client.post(f"/accounts/tokens/{token.pk}/revoke").status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


def test_maintainer_sees_and_revokes_every_token(maintainer_user, viewer_user):
    token, _secret = api_token_create(viewer_user, name="viewer laptop", user=viewer_user)
    client = browser(maintainer_user)

    page = client.get("/accounts/").content.decode()
    table = page[page.index('id="all-token-table"'):]
    assert "viewer laptop" in table
    assert f"/accounts/tokens/{token.pk}/revoke" in table

    assert client.post(f"/accounts/tokens/{token.pk}/revoke").status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_revoking_twice_changes_nothing(viewer_user):
    token, _secret = api_token_create(viewer_user, name="laptop", user=viewer_user)
    client = browser(viewer_user)
    client.post(f"/accounts/tokens/{token.pk}/revoke")
    token.refresh_from_db()
    first = token.revoked_at

    client.post(f"/accounts/tokens/{token.pk}/revoke")
    token.refresh_from_db()
    assert token.revoked_at == first


def test_create_api_token_command_sets_expiry(viewer_user):
    out = io.StringIO()
    call_command("create_api_token", "viewer", "--name", "cron", "--expires-days", "90", stdout=out)
    secret = out.getvalue().strip()
    token = ApiToken.objects.get(user=viewer_user, name="cron")
    assert secret.startswith(token.prefix)
    days = (token.expires_at - timezone.now()).total_seconds() / 86400
    assert 89.9 < days <= 90
    assert bearer(secret).get("/api/v1/tasks").status_code == 200


def test_token_for_another_user_needs_maintainer(viewer_user, trainer_user, maintainer_user):
    from adapters_app.services import ServiceError

    with pytest.raises(ServiceError) as raised:
        api_token_create(trainer_user, name="not mine", user=viewer_user)
    assert raised.value.status_code == 403

    token, _secret = api_token_create(trainer_user, name="granted", user=maintainer_user)
    assert token.user == trainer_user
    api_token_create(trainer_user, name="from the command", user=SYSTEM)
    assert ApiToken.objects.filter(user=trainer_user).count() == 2
