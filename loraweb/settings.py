"""Settings for loraweb, read from environment variables (see docs/operations.md).

With no variable set the project runs on SQLite and keeps every file under `var/`.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.utils.translation import gettext_lazy as _

from .env import ImproperSetting, env_bool, env_float, env_int, env_list, env_path, env_rate, env_str
from .logs import LOG_FORMATS, logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

# Progress bars of model loading would flood the web and worker logs with carriage returns.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
VAR_DIR = env_path("LORAWEB_VAR_DIR", BASE_DIR / "var")

# Production turns on the HTTPS and cookie protections below and refuses to start with debug
# mode, without a secret key or without the server's host names.
LORAWEB_PRODUCTION = env_bool("LORAWEB_PRODUCTION", False)
DEBUG = env_bool("LORAWEB_DEBUG", False)
if LORAWEB_PRODUCTION and DEBUG:
    raise ImproperSetting("LORAWEB_DEBUG is on but LORAWEB_PRODUCTION is on too; unset LORAWEB_DEBUG in production")
SECRET_KEY = env_str("LORAWEB_SECRET_KEY", "")
if not SECRET_KEY:
    if LORAWEB_PRODUCTION:
        raise ImproperSetting(
            "LORAWEB_SECRET_KEY must be set when LORAWEB_PRODUCTION is on; generate one with "
            "python -c 'from django.core.management.utils import get_random_secret_key as k; print(k())'"
        )
    # A local-only key so `make run` works with no configuration; production sets its own.
    SECRET_KEY = "loraweb-local-development-key-not-for-production"

if LORAWEB_PRODUCTION and not env_list("LORAWEB_ALLOWED_HOSTS", []):
    raise ImproperSetting(
        "LORAWEB_ALLOWED_HOSTS must be set when LORAWEB_PRODUCTION is on; list the server's host names, "
        "separated by commas"
    )
ALLOWED_HOSTS = env_list("LORAWEB_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
# Origins (scheme and host) allowed to send forms, needed when a proxy changes the Host header.
CSRF_TRUSTED_ORIGINS = env_list("LORAWEB_CSRF_TRUSTED_ORIGINS", [])

# Headers every response carries. These are Django's defaults, set here so readers see them.
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# HTTPS protections apply in production only, so `make run` keeps working over plain http.
SESSION_COOKIE_SECURE = LORAWEB_PRODUCTION
CSRF_COOKIE_SECURE = LORAWEB_PRODUCTION
SECURE_SSL_REDIRECT = LORAWEB_PRODUCTION and env_bool("LORAWEB_SSL_REDIRECT", True)
# Load balancers and Prometheus reach the process itself over plain http, so a redirect would
# fail their probes and scrapes.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("LORAWEB_HSTS_SECONDS", 365 * 86400, minimum=0) if LORAWEB_PRODUCTION else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = LORAWEB_PRODUCTION and env_bool("LORAWEB_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = LORAWEB_PRODUCTION and env_bool("LORAWEB_HSTS_PRELOAD", True)
# Behind a proxy that terminates TLS, its X-Forwarded-Proto header shows Django that the request
# came over https. Turn this on only when the proxy sets that header on every request and drops
# the one a client sends, or a client could make a plain http request look secure.
if env_bool("LORAWEB_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SILENCED_SYSTEM_CHECKS: list[str] = []
if LORAWEB_PRODUCTION and not SECURE_SSL_REDIRECT:
    # The operator turned the redirect off because the proxy in front redirects http to https.
    SILENCED_SYSTEM_CHECKS.append("security.W008")

INSTALLED_APPS = [
    # Django's admin with a site that also lets trainers and maintainers in (see admin_site.py).
    "adapters_app.admin_site.LorawebAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "adapters_app",
    "training_app",
]

MIDDLEWARE = [
    # First, so that every log line of a request carries its id and every response is counted.
    "loraweb.observability.RequestIdMiddleware",
    "loraweb.observability.HttpMetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # WhiteNoise's own middleware is sync-only, which under ASGI would run every view behind
    # it in Django's single sync thread; this subclass also runs async.
    "loraweb.middleware.AsyncWhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "loraweb.urls"
WSGI_APPLICATION = "loraweb.wsgi.application"
ASGI_APPLICATION = "loraweb.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "adapters_app.context_processors.base_model",
                "adapters_app.context_processors.roles",
            ],
        },
    },
]

# Database: SQLite under var/ unless DATABASE_URL names another one (Postgres in production).
DATABASE_URL = env_str("DATABASE_URL", "")
if DATABASE_URL:
    # Under ASGI every request runs its queries in a thread of its own, with a connection of its
    # own, so 200 requests arriving together opened 200 connections, over PostgreSQL's default
    # limit of 100 (bench/load.py). A pool bounds the connections of each process, and a request
    # waits up to 30 s for a free one. Pools require conn_max_age=0.
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": 1,
            "max_size": env_int("LORAWEB_DB_POOL_SIZE", 10, minimum=1),
            "timeout": 30,
        }
else:
    SQLITE_PATH = env_path("LORAWEB_SQLITE_PATH", VAR_DIR / "loraweb.sqlite3")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": SQLITE_PATH,
            "OPTIONS": {
                # The web server and the worker write at the same time: WAL lets readers
                # continue during a write, and the timeout makes writers wait, not fail.
                "timeout": 20,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            # A file, not memory, so the Celery worker started by the tests reads the same data.
            "TEST": {"NAME": env_path("LORAWEB_SQLITE_TEST_PATH", VAR_DIR / "test" / "loraweb-test.sqlite3")},
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "adapters_app:dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("zh-hans", _("Simplified Chinese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_I18N = True
TIME_ZONE = env_str("LORAWEB_TIME_ZONE", "UTC")
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Static files are served straight from the source folders, so running the product needs
# no collectstatic step. Production sets LORAWEB_STATIC_ROOT and runs collectstatic.
STATIC_ROOT = env_path("LORAWEB_STATIC_ROOT", Path()) if env_str("LORAWEB_STATIC_ROOT", "") else None
WHITENOISE_USE_FINDERS = STATIC_ROOT is None
MEDIA_ROOT = env_path("LORAWEB_MEDIA_ROOT", VAR_DIR / "media")
MEDIA_URL = "media/"

# Uploads above this size are streamed to a temporary file instead of held in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
LORAWEB_MAX_UPLOAD_BYTES = env_int("LORAWEB_MAX_UPLOAD_BYTES", 200 * 1024 * 1024, minimum=1)
# A gzip-compressed dataset may expand to at most this many bytes.
LORAWEB_MAX_DECOMPRESSED_BYTES = env_int("LORAWEB_MAX_DECOMPRESSED_BYTES", 2 * 1024 * 1024 * 1024, minimum=1)
# The first handler stops a file part over LORAWEB_MAX_UPLOAD_BYTES before it is stored.
FILE_UPLOAD_HANDLERS = [
    "training_app.uploads.UploadSizeLimitHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
LORAWEB_MAX_ADAPTER_UPLOAD_BYTES = env_int("LORAWEB_MAX_ADAPTER_UPLOAD_BYTES", 512 * 1024 * 1024, minimum=1)

# Base model: a Hugging Face id (local cache, else the hub) or a local directory.
LORAWEB_BASE_MODEL = env_str("LORAWEB_BASE_MODEL", "gpt2")
# Folder in which `prepare_base_model` builds the tiny offline GPT-2 when the configured base is missing.
LORAWEB_TINY_MODEL_DIR = env_path("LORAWEB_TINY_MODEL_DIR", VAR_DIR / "models" / "tiny-gpt2")
LORAWEB_DEVICE = env_str("LORAWEB_DEVICE", "cpu")

# Adapter cache of each serving process.
LORAWEB_ADAPTER_CACHE_MAX_ADAPTERS = env_int("LORAWEB_ADAPTER_CACHE_MAX_ADAPTERS", 32, minimum=1)
LORAWEB_ADAPTER_CACHE_MAX_BYTES = env_int(
    "LORAWEB_ADAPTER_CACHE_MAX_BYTES", 512 * 1024 * 1024, minimum=1
)

LORAWEB_MAX_NEW_TOKENS = env_int("LORAWEB_MAX_NEW_TOKENS", 256, minimum=1)

# Serving: the base's dtype ("auto" is float32 on CPU and float16 on CUDA), and the tasks whose
# active version stays loaded. When the engine starts, it loads the active versions of all
# tasks, up to the cache limits.
LORAWEB_DTYPE = env_str("LORAWEB_DTYPE", "auto")
LORAWEB_PINNED_TASKS = env_list("LORAWEB_PINNED_TASKS", [])
LORAWEB_PRELOAD_ADAPTERS = env_bool("LORAWEB_PRELOAD_ADAPTERS", True)
# The scheduler waits this long after a request reaches an idle engine, so that requests
# arriving together share one batch.
LORAWEB_BATCH_WINDOW_MS = env_float("LORAWEB_BATCH_WINDOW_MS", 5.0)
LORAWEB_MAX_BATCH_SIZE = env_int("LORAWEB_MAX_BATCH_SIZE", 16, minimum=1)
# Requests waiting for a batch slot; one more gets HTTP 429 with Retry-After.
LORAWEB_MAX_QUEUE = env_int("LORAWEB_MAX_QUEUE", 64, minimum=0)
LORAWEB_REQUEST_TIMEOUT_S = env_float("LORAWEB_REQUEST_TIMEOUT_S", 120.0)
if LORAWEB_REQUEST_TIMEOUT_S <= 0:
    raise ImproperSetting(f"LORAWEB_REQUEST_TIMEOUT_S={LORAWEB_REQUEST_TIMEOUT_S} must be positive")
if LORAWEB_BATCH_WINDOW_MS < 0:
    raise ImproperSetting(f"LORAWEB_BATCH_WINDOW_MS={LORAWEB_BATCH_WINDOW_MS} must be 0 or more")
# URL groups this process serves: "dashboard" (pages and /api/v1/, never loads the model),
# "inference" (/v1/ and the playground stream) or "all".
LORAWEB_ROLE = env_str("LORAWEB_ROLE", "all")
if LORAWEB_ROLE not in {"all", "dashboard", "inference"}:
    raise ImproperSetting(f"LORAWEB_ROLE={LORAWEB_ROLE!r} is invalid; use all, dashboard or inference")

# With the role "all", the web server and a training worker usually share one machine. When
# both used torch's default of one thread per core, completions became more than ten times
# slower while a job trained, so each process takes half the cores unless
# LORAWEB_TORCH_THREADS is set.
# 0 leaves torch's default, which suits a machine that runs one role alone.
LORAWEB_TORCH_THREADS = env_int(
    "LORAWEB_TORCH_THREADS", max(1, (os.cpu_count() or 2) // 2) if LORAWEB_ROLE == "all" else 0, minimum=0
)
LORAWEB_ADAPTER_ROOT = env_path("LORAWEB_ADAPTER_ROOT", VAR_DIR / "adapters")

# Training jobs: a job whose heartbeat is older than this is marked failed by the sweeper.
# A running job's worker writes its heartbeat every fifth of this time, at most every 30 s.
LORAWEB_JOB_HEARTBEAT_TIMEOUT = env_int("LORAWEB_JOB_HEARTBEAT_TIMEOUT", 300, minimum=2)
# Seconds between two sweeps (stale running jobs, queued jobs whose message the broker lost).
LORAWEB_JOB_SWEEP_INTERVAL = env_int("LORAWEB_JOB_SWEEP_INTERVAL", 60, minimum=1)
# A job queued this long whose message is no longer in the broker is sent again by the sweeper.
LORAWEB_JOB_REQUEUE_AFTER = env_int("LORAWEB_JOB_REQUEUE_AFTER", 120, minimum=1)
LORAWEB_JOB_TIME_LIMIT = env_int("LORAWEB_JOB_TIME_LIMIT", 6 * 3600, minimum=60)

# Celery with Redis as broker and result store.
LORAWEB_REDIS_URL = env_str("LORAWEB_REDIS_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = LORAWEB_REDIS_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
# A worker child that dies puts its message back; the claim makes that delivery a no-op once
# the job has started (see "Training workers under faults" in docs/operations.md).
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A training job keeps running when the broker connection drops; it is safe to deliver twice.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Each worker child runs this many jobs and is then replaced, so memory one job leaves behind
# (allocator caches, a CUDA context) never adds up across jobs; 0 keeps children forever.
CELERY_WORKER_MAX_TASKS_PER_CHILD = env_int("LORAWEB_WORKER_MAX_TASKS_PER_CHILD", 1, minimum=0) or None
CELERY_TASK_TIME_LIMIT = LORAWEB_JOB_TIME_LIMIT
# Redis redelivers an unacknowledged message after this timeout; it must exceed the
# longest job or a running job would be delivered to a second worker.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": LORAWEB_JOB_TIME_LIMIT + 3600}
CELERY_TASK_DEFAULT_QUEUE = env_str("LORAWEB_CELERY_QUEUE", "loraweb")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = env_bool("LORAWEB_CELERY_EAGER", False)
CELERY_BEAT_SCHEDULE = {
    # A sweep that waits behind a long job is dropped; the next one does the same work.
    "sweep-stale-jobs": {
        "task": "training_app.tasks.sweep_stale_jobs",
        "schedule": float(LORAWEB_JOB_SWEEP_INTERVAL),
        "options": {"expires": float(LORAWEB_JOB_SWEEP_INTERVAL)},
    },
}

# Rate limits, counted in Redis (LORAWEB_REDIS_URL) so they hold across processes: requests per
# window for each user (playground, /v1/completions) and login attempts per client address and
# per user name. "off" turns one off. When Redis fails or times out, requests are let through.
LORAWEB_RATE_LIMIT_COMPLETIONS = env_rate("LORAWEB_RATE_LIMIT_COMPLETIONS", "60/minute")
LORAWEB_RATE_LIMIT_PLAYGROUND = env_rate("LORAWEB_RATE_LIMIT_PLAYGROUND", "30/minute")
LORAWEB_RATE_LIMIT_LOGIN = env_rate("LORAWEB_RATE_LIMIT_LOGIN", "10/minute")
LORAWEB_RATE_LIMIT_PREFIX = env_str("LORAWEB_RATE_LIMIT_PREFIX", "loraweb:ratelimit:")
# Reverse proxies in front of the server that append the client address to X-Forwarded-For.
# With 0 the client address is the connection's, which behind a proxy is the proxy's address.
LORAWEB_TRUSTED_PROXIES = env_int("LORAWEB_TRUSTED_PROXIES", 0, minimum=0)

# Promotion policy given to new tasks; each task can change its own in admin.
LORAWEB_DEFAULT_MIN_IMPROVEMENT = env_float("LORAWEB_DEFAULT_MIN_IMPROVEMENT", 0.0)
LORAWEB_DEFAULT_FORGETTING_TOLERANCE = env_float("LORAWEB_DEFAULT_FORGETTING_TOLERANCE", 0.1)

# "text" for people, "json" (one object per line) for log collectors; the Celery worker uses the
# same configuration (loraweb/celery.py).
LORAWEB_LOG_FORMAT = env_str("LORAWEB_LOG_FORMAT", "text")
if LORAWEB_LOG_FORMAT not in LOG_FORMATS:
    raise ImproperSetting(f"LORAWEB_LOG_FORMAT={LORAWEB_LOG_FORMAT!r} is invalid; use text or json")
LOGGING = logging_config(LORAWEB_LOG_FORMAT, env_str("LORAWEB_LOG_LEVEL", "INFO"))
