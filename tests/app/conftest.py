from __future__ import annotations

import pytest
from django.test import Client


@pytest.fixture
def user(maintainer_user):
    """The user of tests that exercise a feature rather than access: a maintainer may do everything."""
    return maintainer_user


@pytest.fixture
def token(user) -> str:
    from adapters_app.services import api_token_create

    return api_token_create(user, name="tests", user=user)[1]


@pytest.fixture
def api_client(token) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Bearer {token}")


@pytest.fixture
def task(tiny_base_dir):
    from adapters_app.roles import SYSTEM
    from adapters_app.services import task_create

    return task_create(slug="poetry", name="Poetry", user=SYSTEM)


@pytest.fixture
def jsonl_file(tmp_path):
    def write(lines: list[str], name: str = "data.jsonl"):
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture
def good_rows() -> list[str]:
    import json

    return [json.dumps({"prompt": f"Say {index}", "completion": f"number {index}"}) for index in range(20)]


@pytest.fixture(autouse=True)
def isolated_files(settings, tmp_path):
    """Give every test its own media and adapter folders, so file assertions see only its files."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.LORAWEB_ADAPTER_ROOT = tmp_path / "adapters"
