"""Who may open what: every page and API endpoint, for its role, the role below it and an anonymous client.

A page sends anonymous visitors to the login page and answers 403 to users below its role; the
JSON APIs answer 401 and 403 in their own error shapes. `test_every_url_is_in_the_table` fails
when a URL is added without a row here.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import URLResolver, get_resolver

from adapters_app.models import ActivationEvent, ApiToken, Task
from adapters_app.roles import SYSTEM, Role
from adapters_app.services import api_token_create, task_create
from tests.app.test_serving_app import read_stream
from tests.app.test_transfer import ready_version_from
from tests.unit.test_serving_adapters import save_lora_adapter
from training_app import services
from training_app.models import Dataset, TrainingJob

pytestmark = pytest.mark.django_db

PAGE, API, OPENAI, STREAM = "page", "api", "openai", "stream"

# The persona one role below each role; it must be refused.
ROLE_BELOW = {Role.VIEWER: "roleless_user", Role.TRAINER: "viewer_user", Role.MAINTAINER: "trainer_user"}
ROLE_USER = {Role.VIEWER: "viewer_user", Role.TRAINER: "trainer_user", Role.MAINTAINER: "maintainer_user"}

# Routes that anyone may open, and routes that the table covers elsewhere.
PUBLIC_ROUTES = {
    "accounts/login/",
    "accounts/logout/",
    "i18n/setlang/",
    "healthz",
    # Health checks and metrics belong to operations and have their own tests.
    "readyz",
    "metrics",
    # Ninja's API roots only raise 404; they exist so ninja can build its URLs.
    "api/v1/",
    "v1/",
}


def jsonl_bytes(count: int, prefix: str) -> bytes:
    rows = [json.dumps({"prompt": f"{prefix} {index}", "completion": f"answer {index}"}) for index in range(count)]
    return ("\n".join(rows) + "\n").encode()


def adapter_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in folder.iterdir():
            archive.write(path, path.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def adapter_folder(tiny_base_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("access") / "adapter"
    return save_lora_adapter(tiny_base_dir, folder, rank=4, target_modules=["c_attn"], seed=5)


@pytest.fixture
def world(tiny_base_dir, adapter_folder, settings) -> SimpleNamespace:
    """A task with a used and a spare dataset, a ready version v1 and a queued job for v2, and an idle task."""
    task = task_create(slug="poetry", name="Poetry", user=SYSTEM)
    task_create(slug="retired", name="Retired", user=SYSTEM)
    used = services.dataset_upload(task, io.BytesIO(jsonl_bytes(20, "used")), original_name="used.jsonl", user=SYSTEM).dataset
    spare = services.dataset_upload(task, io.BytesIO(jsonl_bytes(20, "spare")), original_name="spare.jsonl", user=SYSTEM).dataset
    version = ready_version_from(task, adapter_folder, settings)
    job = services.training_start(task, dataset_ids=[used.pk], user=SYSTEM, enqueue=False)
    return SimpleNamespace(task=task, used=used, spare=spare, version=version, job=job, adapter_folder=adapter_folder)


@dataclass(frozen=True)
class Case:
    """One request: the route it exercises, the role it needs and the status that means success."""

    route: str
    method: str
    kind: str
    role: Role
    ok: int
    # Returns the URL and the keyword arguments of the test client call.
    build: Callable[[SimpleNamespace, object], tuple[str, dict]]
    id: str = field(default="")

    def __str__(self) -> str:
        return self.id or f"{self.method} {self.route}"


def get(url: str) -> Callable:
    return lambda world, user: (url.format(w=world), {})


def post_form(url: str, data: Callable[[SimpleNamespace], dict] | None = None) -> Callable:
    return lambda world, user: (url.format(w=world), {"data": data(world) if data else {}})


def post_json(url: str, body: Callable[[SimpleNamespace], dict]) -> Callable:
    return lambda world, user: (url.format(w=world), {"data": body(world), "content_type": "application/json"})


def post_file(url: str, field_name: str, name: str, content: Callable[[SimpleNamespace], bytes], extra: dict | None = None) -> Callable:
    def build(world, user):
        return url.format(w=world), {"data": {field_name: SimpleUploadedFile(name, content(world)), **(extra or {})}}

    return build


def own_token(path: str) -> Callable:
    """Build a URL for a token of the requesting user (anonymous requests get someone's token)."""

    def build(world, user):
        from django.contrib.auth import get_user_model

        owner = user or get_user_model().objects.create_user("someone")
        token, _secret = api_token_create(owner, name="mine", user=SYSTEM)
        return path.format(pk=token.pk), {}

    return build


def playground_body(world) -> dict:
    return {"task": "poetry", "prompt": "Roses", "max_tokens": 2, "temperature": 0, "top_p": 1}


CASES = [
    # Pages of adapters_app.
    Case("", "get", PAGE, Role.VIEWER, 200, get("/")),
    Case("", "post", PAGE, Role.TRAINER, 302, post_form("/", lambda w: {"slug": "prose", "name": "Prose"}), "create task"),
    Case("demo/load", "post", PAGE, Role.TRAINER, 302, post_form("/demo/load")),
    Case("playground/", "get", PAGE, Role.VIEWER, 200, get("/playground/")),
    Case("playground/stream", "post", STREAM, Role.VIEWER, 200, post_form("/playground/stream", playground_body)),
    Case("tasks/<slug:slug>/", "get", PAGE, Role.VIEWER, 200, get("/tasks/poetry/")),
    Case("tasks/<slug:slug>/compare", "get", PAGE, Role.VIEWER, 200, get("/tasks/poetry/compare")),
    Case("tasks/<slug:slug>/delete", "get", PAGE, Role.MAINTAINER, 200, get("/tasks/retired/delete")),
    Case(
        "tasks/<slug:slug>/delete", "post", PAGE, Role.MAINTAINER, 302,
        post_form("/tasks/retired/delete", lambda w: {"confirm_slug": "retired", "reason": "access test"}),
    ),
    Case(
        "tasks/<slug:slug>/versions/<int:number>/activate", "post", PAGE, Role.MAINTAINER, 302,
        post_form("/tasks/poetry/versions/1/activate", lambda w: {"reason": "access test"}),
    ),
    Case("tasks/<slug:slug>/versions/<int:number>/export", "get", PAGE, Role.VIEWER, 200, get("/tasks/poetry/versions/1/export")),
    Case(
        "tasks/<slug:slug>/versions/import", "post", PAGE, Role.TRAINER, 302,
        post_file("/tasks/poetry/versions/import", "files", "adapter.zip", lambda w: adapter_zip(w.adapter_folder)),
    ),
    Case("accounts/", "get", PAGE, Role.VIEWER, 200, get("/accounts/")),
    Case("accounts/", "post", PAGE, Role.VIEWER, 200, post_form("/accounts/", lambda w: {"name": "ci", "lifetime": "30"}), "create token"),
    Case("accounts/tokens/<int:pk>/revoke", "get", PAGE, Role.VIEWER, 200, own_token("/accounts/tokens/{pk}/revoke")),
    Case("accounts/tokens/<int:pk>/revoke", "post", PAGE, Role.VIEWER, 302, own_token("/accounts/tokens/{pk}/revoke")),
    # Pages of training_app.
    Case(
        "training/tasks/<slug:slug>/datasets/upload", "post", PAGE, Role.TRAINER, 302,
        post_file("/training/tasks/poetry/datasets/upload", "file", "new.jsonl", lambda w: jsonl_bytes(20, "new")),
    ),
    Case("training/tasks/<slug:slug>/train", "get", PAGE, Role.TRAINER, 200, get("/training/tasks/poetry/train")),
    Case(
        "training/tasks/<slug:slug>/train", "post", PAGE, Role.TRAINER, 302,
        post_form("/training/tasks/poetry/train", lambda w: {"datasets": [w.used.pk], "start": "fresh", "preset": "quick", "target_modules": ["c_attn"]}),
    ),
    Case("training/datasets/<int:pk>/", "get", PAGE, Role.VIEWER, 200, get("/training/datasets/{w.used.pk}/")),
    Case("training/datasets/<int:pk>/delete", "get", PAGE, Role.MAINTAINER, 200, get("/training/datasets/{w.spare.pk}/delete")),
    Case("training/datasets/<int:pk>/delete", "post", PAGE, Role.MAINTAINER, 302, post_form("/training/datasets/{w.spare.pk}/delete")),
    Case("training/jobs/<int:pk>/", "get", PAGE, Role.VIEWER, 200, get("/training/jobs/{w.job.pk}/")),
    Case("training/jobs/<int:pk>/status", "get", PAGE, Role.VIEWER, 200, get("/training/jobs/{w.job.pk}/status")),
    Case("training/jobs/<int:pk>/cancel", "post", PAGE, Role.TRAINER, 302, post_form("/training/jobs/{w.job.pk}/cancel")),
    # loraweb's JSON API.
    Case("api/v1/openapi.json", "get", API, Role.VIEWER, 200, get("/api/v1/openapi.json")),
    Case("api/v1/tasks", "get", API, Role.VIEWER, 200, get("/api/v1/tasks")),
    Case("api/v1/tasks", "post", API, Role.TRAINER, 201, post_json("/api/v1/tasks", lambda w: {"slug": "prose", "name": "Prose"})),
    Case("api/v1/tasks/<slug>", "get", API, Role.VIEWER, 200, get("/api/v1/tasks/poetry")),
    Case("api/v1/tasks/<slug>", "delete", API, Role.MAINTAINER, 204, get("/api/v1/tasks/retired?reason=access+test")),
    Case(
        "api/v1/tasks/<slug>/versions/import", "post", API, Role.TRAINER, 201,
        post_file("/api/v1/tasks/poetry/versions/import", "file", "adapter.zip", lambda w: adapter_zip(w.adapter_folder)),
    ),
    Case("api/v1/tasks/<slug>/versions/<number>", "get", API, Role.VIEWER, 200, get("/api/v1/tasks/poetry/versions/1")),
    Case("api/v1/tasks/<slug>/versions/<number>/export", "get", API, Role.VIEWER, 200, get("/api/v1/tasks/poetry/versions/1/export")),
    Case(
        "api/v1/tasks/<slug>/activate", "post", API, Role.MAINTAINER, 200,
        post_json("/api/v1/tasks/poetry/activate", lambda w: {"version": 1, "reason": "access test"}),
    ),
    Case(
        "api/v1/tasks/<slug>/datasets", "post", API, Role.TRAINER, 201,
        post_file("/api/v1/tasks/poetry/datasets", "file", "new.jsonl", lambda w: jsonl_bytes(20, "new")),
    ),
    Case("api/v1/tasks/<slug>/datasets", "get", API, Role.VIEWER, 200, get("/api/v1/tasks/poetry/datasets")),
    Case("api/v1/datasets/<dataset_id>", "get", API, Role.VIEWER, 200, get("/api/v1/datasets/{w.used.pk}")),
    Case("api/v1/datasets/<dataset_id>", "delete", API, Role.MAINTAINER, 204, get("/api/v1/datasets/{w.spare.pk}")),
    Case(
        "api/v1/tasks/<slug>/versions", "post", API, Role.TRAINER, 202,
        post_json("/api/v1/tasks/poetry/versions", lambda w: {"dataset_ids": [w.used.pk], "hyperparameters": {"preset": "quick"}}),
    ),
    Case("api/v1/tasks/<slug>/versions", "get", API, Role.VIEWER, 200, get("/api/v1/tasks/poetry/versions")),
    Case("api/v1/jobs/<job_id>", "get", API, Role.VIEWER, 200, get("/api/v1/jobs/{w.job.pk}")),
    Case("api/v1/jobs/<job_id>/cancel", "post", API, Role.TRAINER, 200, post_json("/api/v1/jobs/{w.job.pk}/cancel", lambda w: {})),
    # The OpenAI-compatible API.
    Case("v1/openapi.json", "get", OPENAI, Role.VIEWER, 200, get("/v1/openapi.json")),
    Case("v1/models", "get", OPENAI, Role.VIEWER, 200, get("/v1/models")),
    Case(
        "v1/completions", "post", OPENAI, Role.VIEWER, 200,
        post_json("/v1/completions", lambda w: {"model": "poetry", "prompt": "Roses", "max_tokens": 2, "temperature": 0}),
    ),
]


def client_for(kind: str, user) -> Client:
    """A logged-in browser for pages, a bearer-token script for the APIs, or an anonymous client."""
    if user is None:
        return Client()
    if kind in (API, OPENAI):
        _token, secret = api_token_create(user, name="access", user=SYSTEM)
        return Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    client = Client()
    client.force_login(user)
    return client


def send(case: Case, world, user):
    url, kwargs = case.build(world, user)
    response = getattr(client_for(case.kind, user), case.method)(url, **kwargs)
    if case.kind == STREAM and response.status_code == 200:
        read_stream(response)
    return response


def error_code(case: Case, response) -> str:
    body = response.json()
    if case.kind == API:
        return body["errors"][0]["code"]
    return body["error"]["code"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_allowed_role_succeeds(case, world, request):
    user = request.getfixturevalue(ROLE_USER[case.role])
    response = send(case, world, user)
    assert response.status_code == case.ok, response.content[:500]
    if case.ok == 302:
        assert "/accounts/login/" not in response["Location"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_role_below_is_forbidden(case, world, request):
    user = request.getfixturevalue(ROLE_BELOW[case.role])
    response = send(case, world, user)
    assert response.status_code == 403, response.content[:500]
    if case.kind == PAGE:
        assert b'id="access-denied"' in response.content
    else:
        assert error_code(case, response) == "forbidden"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_anonymous_is_refused(case, world):
    response = send(case, world, None)
    if case.kind == PAGE:
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")
    else:
        assert response.status_code == 401, response.content[:500]


def test_refusals_change_nothing(world, viewer_user, trainer_user):
    """A refused write leaves the database as it was."""
    viewer = client_for(PAGE, viewer_user)
    viewer.post("/", {"slug": "prose", "name": "Prose"})
    viewer.post(f"/training/jobs/{world.job.pk}/cancel")
    trainer = client_for(API, trainer_user)
    trainer.post("/api/v1/tasks/poetry/activate", {"version": 1, "reason": "x"}, content_type="application/json")
    trainer.delete(f"/api/v1/datasets/{world.spare.pk}")

    assert not Task.objects.filter(slug="prose").exists()
    assert TrainingJob.objects.get(pk=world.job.pk).state == TrainingJob.State.QUEUED
    assert Task.objects.get(slug="poetry").active_version_id is None
    assert ActivationEvent.objects.count() == 0
    assert Dataset.objects.filter(pk=world.spare.pk).exists()


def _routes(patterns, prefix: str = ""):
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        else:
            yield prefix + str(pattern.pattern)


def test_every_url_is_in_the_table():
    covered = {case.route for case in CASES} | PUBLIC_ROUTES
    routes = {route for route in _routes(get_resolver().url_patterns) if not route.startswith("admin/")}
    missing = sorted(routes - covered)
    assert missing == [], f"add these URLs to CASES in {__name__} (or to PUBLIC_ROUTES if anyone may open them)"


def test_api_error_shapes_for_a_user_without_role(roleless_user):
    """A token of a user in no role group is refused with 403 on both APIs, not 401."""
    _token, secret = api_token_create(roleless_user, name="none", user=SYSTEM)
    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")

    native = client.get("/api/v1/tasks")
    assert native.status_code == 403
    assert "viewer" in native.json()["errors"][0]["message"]

    openai = client.get("/v1/models")
    assert openai.status_code == 403
    assert openai.json()["error"]["type"] == "permission_error"


# --- the Django admin ------------------------------------------------------------


def test_admin_needs_trainer_role(viewer_user, trainer_user):
    anonymous = Client().get("/admin/")
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith("/admin/login/")

    viewer = client_for(PAGE, viewer_user).get("/admin/")
    assert viewer.status_code == 302
    assert viewer["Location"].startswith("/admin/login/")

    assert client_for(PAGE, trainer_user).get("/admin/").status_code == 200


def test_admin_models_follow_roles(world, trainer_user, maintainer_user):
    trainer = client_for(PAGE, trainer_user)
    assert trainer.get("/admin/adapters_app/task/").status_code == 200
    assert trainer.get("/admin/adapters_app/adapterversion/").status_code == 200
    assert trainer.get("/admin/adapters_app/apitoken/").status_code == 403

    maintainer = client_for(PAGE, maintainer_user)
    assert maintainer.get("/admin/adapters_app/apitoken/").status_code == 200


def test_admin_golden_prompts_editable_by_trainer(world, trainer_user):
    trainer = client_for(PAGE, trainer_user)
    data = {
        "slug": "poetry",
        "name": "Poetry",
        "description": "",
        "golden_prompts-TOTAL_FORMS": "1",
        "golden_prompts-INITIAL_FORMS": "0",
        "golden_prompts-0-prompt": "Roses are",
        "golden_prompts-0-expected": "red",
        "_save": "Save",
    }
    response = trainer.post(f"/admin/adapters_app/task/{world.task.pk}/change/", data)
    assert response.status_code == 302, response.content[:2000]
    assert list(world.task.golden_prompts.values_list("expected", flat=True)) == ["red"]


def test_admin_rollback_action_needs_maintainer(world, trainer_user, maintainer_user):
    data = {"action": "rollback_to_version", "_selected_action": [world.version.pk], "apply": "1", "reason": "admin test"}
    url = "/admin/adapters_app/adapterversion/"

    client_for(PAGE, trainer_user).post(url, data)
    assert Task.objects.get(pk=world.task.pk).active_version_id is None

    client_for(PAGE, maintainer_user).post(url, data)
    event = ActivationEvent.objects.get()
    assert event.kind == ActivationEvent.Kind.ROLLBACK
    assert event.actor == maintainer_user
    assert Task.objects.get(pk=world.task.pk).active_version_id == world.version.pk


# --- templates hide what a role cannot use -----------------------------------------


def test_task_page_hides_buttons_by_role(world, viewer_user, trainer_user, maintainer_user):
    pages = {
        name: client_for(PAGE, user).get("/tasks/poetry/").content.decode()
        for name, user in (("viewer", viewer_user), ("trainer", trainer_user), ("maintainer", maintainer_user))
    }
    for marker in ('id="train-button"', 'id="upload-form"', 'id="import-form"'):
        assert marker not in pages["viewer"]
        assert marker in pages["trainer"]
    activate = "/tasks/poetry/versions/1/activate"
    assert activate not in pages["trainer"]
    assert activate in pages["maintainer"]
    delete = f"/training/datasets/{world.spare.pk}/delete"
    assert delete not in pages["trainer"]
    assert delete in pages["maintainer"]


def test_dashboard_hides_create_form_from_viewer(viewer_user, trainer_user, tiny_base_dir):
    assert b'id="task-form"' not in client_for(PAGE, viewer_user).get("/").content
    assert b'id="task-form"' in client_for(PAGE, trainer_user).get("/").content


def test_system_actor_records_no_user(tiny_base_dir):
    task = task_create(slug="system", name="System", user=SYSTEM)
    assert task.created_by is None


def test_missing_user_is_rejected(tiny_base_dir):
    from adapters_app.services import ServiceError

    with pytest.raises(ServiceError) as raised:
        task_create(slug="nobody", name="Nobody", user=None)
    assert raised.value.status_code == 401
    assert not Task.objects.filter(slug="nobody").exists()
    assert not ApiToken.objects.exists()


def test_set_role_command_moves_user_between_groups(viewer_user):
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from adapters_app.roles import user_role

    call_command("set_role", "viewer", "maintainer", stdout=io.StringIO())
    user = get_user_model().objects.get(pk=viewer_user.pk)
    assert user_role(user) == Role.MAINTAINER
    assert list(user.groups.values_list("name", flat=True)) == ["maintainer"]

    call_command("set_role", "viewer", "none", stdout=io.StringIO())
    user = get_user_model().objects.get(pk=viewer_user.pk)
    assert user_role(user) is None
