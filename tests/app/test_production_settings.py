"""Production settings: Django's deployment checks pass, and unsafe configurations refuse to start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.core.management.utils import get_random_secret_key

from loraweb.env import ImproperSetting, parse_rate
from tests.conftest import REPO_ROOT

PRINT_SETTINGS = (
    "import json; from django.conf import settings as s; print(json.dumps({"
    "'debug': s.DEBUG, 'session_secure': s.SESSION_COOKIE_SECURE, 'csrf_secure': s.CSRF_COOKIE_SECURE, "
    "'ssl_redirect': s.SECURE_SSL_REDIRECT, 'hsts': s.SECURE_HSTS_SECONDS, 'frame': s.X_FRAME_OPTIONS, "
    "'referrer': s.SECURE_REFERRER_POLICY, 'nosniff': s.SECURE_CONTENT_TYPE_NOSNIFF, "
    "'proxy_header': s.SECURE_PROXY_SSL_HEADER, 'hosts': s.ALLOWED_HOSTS}))"
)


def production_env(tmp_path, **overrides: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("LORAWEB_", "DJANGO_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="loraweb.settings",
        LORAWEB_PRODUCTION="on",
        LORAWEB_SECRET_KEY=get_random_secret_key(),
        LORAWEB_ALLOWED_HOSTS="loraweb.example.org",
        LORAWEB_VAR_DIR=str(tmp_path),
    )
    env.update(overrides)
    return env


def run_manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_deploy_check_reports_nothing(tmp_path):
    result = run_manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout
    assert "WARNING" not in result.stdout + result.stderr


def test_production_turns_protections_on(tmp_path):
    result = run_manage(production_env(tmp_path), "shell", "-c", PRINT_SETTINGS)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])

    assert values["debug"] is False
    assert values["session_secure"] is True
    assert values["csrf_secure"] is True
    assert values["ssl_redirect"] is True
    assert values["hsts"] == 365 * 86400
    assert values["frame"] == "DENY"
    assert values["referrer"] == "same-origin"
    assert values["nosniff"] is True
    assert values["proxy_header"] is None
    assert values["hosts"] == ["loraweb.example.org"]


def test_behind_tls_proxy_passes_check(tmp_path):
    env = production_env(
        tmp_path, LORAWEB_SSL_REDIRECT="off", LORAWEB_SECURE_PROXY_SSL_HEADER="on", LORAWEB_HSTS_SECONDS="300"
    )
    check = run_manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "WARNING" not in check.stdout + check.stderr

    values = json.loads(run_manage(env, "shell", "-c", PRINT_SETTINGS).stdout.strip().splitlines()[-1])
    assert values["ssl_redirect"] is False
    assert values["proxy_header"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["hsts"] == 300


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"LORAWEB_SECRET_KEY": ""}, "LORAWEB_SECRET_KEY must be set"),
        ({"LORAWEB_DEBUG": "on"}, "unset LORAWEB_DEBUG"),
        ({"LORAWEB_ALLOWED_HOSTS": ""}, "LORAWEB_ALLOWED_HOSTS must be set"),
        ({"LORAWEB_RATE_LIMIT_LOGIN": "ten per minute"}, "LORAWEB_RATE_LIMIT_LOGIN: rate 'ten per minute' is invalid"),
    ],
)
def test_unsafe_production_refuses_start(tmp_path, overrides, message):
    env = production_env(tmp_path, **overrides)
    result = subprocess.run(
        [sys.executable, "-c", "import loraweb.settings"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode != 0
    assert "ImproperSetting" in result.stderr
    assert message in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60/minute", (60, 60)),
        ("10/second", (10, 1)),
        ("5/10s", (5, 10)),
        ("100 / 2 hours", (100, 7200)),
        ("1000/day", (1000, 86400)),
        ("off", None),
        ("OFF", None),
    ],
)
def test_parse_rate_accepts(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "60", "60/fortnight", "0/minute", "5/0s", "-1/minute", "on"])
def test_parse_rate_rejects(text):
    with pytest.raises(ImproperSetting, match="is invalid"):
        parse_rate(text)
