"""CSRF protection: every POST form carries the token, and a POST without it is rejected."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from adapters_app.models import Task
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.django_db

FORM_TAG = re.compile(r"<form\b[^>]*>", re.IGNORECASE)
POST_METHOD = re.compile(r"""\bmethod\s*=\s*["']?post\b""", re.IGNORECASE)
CSRF_TAG = re.compile(r"{%\s*csrf_token\s*%}")


def template_files() -> list:
    folders = [REPO_ROOT / "templates", *REPO_ROOT.glob("*/templates")]
    return sorted(path for folder in folders for path in folder.rglob("*.html"))


def post_forms(text: str) -> list[tuple[int, str]]:
    """Return (line, body) of each <form method="post"> in a template, body up to its </form>."""
    forms = []
    for match in FORM_TAG.finditer(text):
        if not POST_METHOD.search(match.group(0)):
            continue
        end = text.find("</form>", match.end())
        body = text[match.end():] if end == -1 else text[match.end():end]
        forms.append((text.count("\n", 0, match.start()) + 1, body))
    return forms


def test_every_post_form_has_csrf_token():
    files = template_files()
    assert files, "no templates found"
    checked = 0
    missing = []
    for path in files:
        for line, body in post_forms(path.read_text(encoding="utf-8")):
            checked += 1
            if not CSRF_TAG.search(body):
                missing.append(f"{path.relative_to(REPO_ROOT)}:{line}")

    assert checked >= 10, f"found only {checked} POST forms; did the template scan break?"
    assert missing == [], f"POST forms without {{% csrf_token %}}: {missing}"


@pytest.fixture
def admin_user(django_user_model):
    return django_user_model.objects.create_superuser("csrf-admin", password="pw-for-tests-only")


@pytest.fixture
def csrf_client(admin_user) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    return client


def csrf_token_of(client: Client, path: str) -> str:
    """GET `path` so Django sets the CSRF cookie, and return the token its form would send."""
    response = client.get(path)
    assert response.status_code == 200
    return str(response.context["csrf_token"])


def test_page_post_without_token_rejected(csrf_client, tiny_base_dir):
    refused = csrf_client.post("/", {"slug": "poetry", "name": "Poetry"})
    assert refused.status_code == 403
    assert not Task.objects.filter(slug="poetry").exists()

    token = csrf_token_of(csrf_client, "/")
    accepted = csrf_client.post("/", {"slug": "poetry", "name": "Poetry", "csrfmiddlewaretoken": token})
    assert accepted.status_code == 302
    assert Task.objects.filter(slug="poetry").exists()


def test_login_post_without_token_rejected(admin_user):
    client = Client(enforce_csrf_checks=True)
    credentials = {"username": "csrf-admin", "password": "pw-for-tests-only"}

    refused = client.post("/accounts/login/", credentials)
    assert refused.status_code == 403
    assert "_auth_user_id" not in client.session

    token = csrf_token_of(client, "/accounts/login/")
    accepted = client.post("/accounts/login/", {**credentials, "csrfmiddlewaretoken": token})
    assert accepted.status_code == 302
    assert client.session["_auth_user_id"] == str(admin_user.pk)


def test_playground_stream_without_token_rejected(csrf_client):
    response = csrf_client.post("/playground/stream", {"prompt": "x"})
    assert response.status_code == 403


def test_session_api_post_needs_token(csrf_client, tiny_base_dir):
    body = {"slug": "poetry", "name": "Poetry"}
    refused = csrf_client.post("/api/v1/tasks", body, content_type="application/json")
    assert refused.status_code == 403
    assert not Task.objects.filter(slug="poetry").exists()

    token = csrf_token_of(csrf_client, "/")
    accepted = csrf_client.post("/api/v1/tasks", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 201
    assert Task.objects.filter(slug="poetry").exists()


def test_session_completions_needs_token(csrf_client):
    body = {"model": "no-such-task", "prompt": ["a", "b"]}
    refused = csrf_client.post("/v1/completions", body, content_type="application/json")
    assert refused.status_code == 403

    token = csrf_token_of(csrf_client, "/")
    # Past the CSRF check, the view rejects the two prompts (before it would load the model).
    passed = csrf_client.post("/v1/completions", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert passed.status_code == 400
    assert passed.json()["error"]["code"] == "multiple_prompts"


def test_bearer_token_post_needs_no_csrf(admin_user, tiny_base_dir):
    from adapters_app.services import api_token_create

    token = api_token_create(admin_user, name="csrf", user=admin_user)[1]
    client = Client(enforce_csrf_checks=True, HTTP_AUTHORIZATION=f"Bearer {token}")
    response = client.post("/api/v1/tasks", {"slug": "poetry", "name": "Poetry"}, content_type="application/json")

    assert response.status_code == 201
    assert Task.objects.filter(slug="poetry").exists()
