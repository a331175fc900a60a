"""Settings for the test suite: everything under var/test, a Redis database and queue of its own.

The Celery worker that integration tests start gets the same values through environment
variables (see tests/integration/conftest.py).
"""

import os

from .settings import *  # noqa: F403
from .settings import BASE_DIR, env_path, env_str

TEST_DIR = env_path("LORAWEB_TEST_DIR", BASE_DIR / "var" / "test")
VAR_DIR = TEST_DIR
MEDIA_ROOT = env_path("LORAWEB_MEDIA_ROOT", TEST_DIR / "media")
LORAWEB_ADAPTER_ROOT = env_path("LORAWEB_ADAPTER_ROOT", TEST_DIR / "adapters")
LORAWEB_TINY_MODEL_DIR = TEST_DIR / "tiny-gpt2"
LORAWEB_BASE_MODEL = env_str("LORAWEB_BASE_MODEL", str(LORAWEB_TINY_MODEL_DIR))

# Database 15 and a separate queue keep tests away from a `make run` worker on the same Redis.
LORAWEB_REDIS_URL = env_str("LORAWEB_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CELERY_BROKER_URL = LORAWEB_REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = env_str("LORAWEB_CELERY_QUEUE", f"loraweb-test-{os.getpid()}")

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# Tests send many requests as one user; the rate limit tests turn the limits on for themselves.
LORAWEB_RATE_LIMIT_COMPLETIONS = "off"
LORAWEB_RATE_LIMIT_PLAYGROUND = "off"
LORAWEB_RATE_LIMIT_LOGIN = "off"
LORAWEB_TORCH_THREADS = 2

# One test database per pytest process, so two suites run at once on one checkout do not
# drop each other's tables. The worker a suite starts is given the same path.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"]["TEST"]["NAME"] = env_path(  # noqa: F405
        "LORAWEB_SQLITE_TEST_PATH", TEST_DIR / f"loraweb-test-{os.getpid()}.sqlite3"
    )
