"""Settings for the Harmont server: one file, every value from the environment.

Every environment read goes through the helpers below so that a bad value stops
the process at start-up with a message naming the variable, instead of surfacing
later as a confusing runtime error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also refuses nan
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {raw}")
    return value


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_rate(name: str, default: str) -> str:
    """A throttle rate, `<requests>/<period>` with the period in s, min, hour or day (DRF's form)."""
    raw = env_str(name, default).strip()
    count, _, period = raw.partition("/")
    if not (count.isdigit() and int(count) > 0 and period[:1] in ("s", "m", "h", "d")):
        raise ImproperlyConfigured(f"{name} must look like 300/min (requests per s, min, hour or day), got {raw!r}")
    return raw


def env_origin(name: str, default: str = "") -> str:
    """An http(s) origin or base URL without its trailing slash ("" if unset)."""
    raw = env_str(name, default).strip().rstrip("/")
    if raw and not raw.startswith(("http://", "https://")):
        raise ImproperlyConfigured(f"{name} must start with http:// or https://, got {raw!r}")
    return raw


def env_origins(name: str) -> list[str]:
    """A comma list of origins (`scheme://host[:port]`), or `*` for any."""
    origins = env_list(name, "")
    for origin in origins:
        if origin != "*" and (not origin.startswith(("http://", "https://")) or "/" in origin.split("://", 1)[1]):
            raise ImproperlyConfigured(f"{name}: {origin!r} is not an origin such as https://app.example.com")
    return origins


def env_json_object(name: str) -> dict:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ImproperlyConfigured(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def database_from_url(url: str) -> dict:
    """Turn `DATABASE_URL` into a Django DATABASES entry (unset → SQLite file)."""
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": BASE_DIR / "db.sqlite3",
            # SQLite serialises writers; waiting beats failing with "database is locked".
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    parts = urlsplit(url)
    if parts.scheme in ("sqlite", "sqlite3"):
        return {
            "ENGINE": "django.db.backends.sqlite3",
            # sqlite:///relative.db or sqlite:////absolute/path.db, as dj-database-url reads them.
            "NAME": unquote(parts.path[1:]) or BASE_DIR / "db.sqlite3",
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    if parts.scheme not in ("postgres", "postgresql", "pgsql"):
        raise ImproperlyConfigured(
            f"DATABASE_URL must start with postgres:// or sqlite://, got scheme {parts.scheme!r}"
        )
    name = unquote(parts.path.lstrip("/"))
    if not name:
        raise ImproperlyConfigured("DATABASE_URL names no database (postgres://user@host:port/NAME)")
    return {
        # Django's backend, with a health check that costs a round trip only when in doubt.
        "ENGINE": "harmont.postgres",
        "NAME": name,
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        # Persistent connections: a fresh PostgreSQL connection per request costs
        # more than the request itself.
        "CONN_MAX_AGE": env_int("HARMONT_CONN_MAX_AGE", 60),
        "CONN_HEALTH_CHECKS": True,
    }


# The statements every agent request runs are prepared once per PostgreSQL connection
# (harmont.prepared); off for a pooler that can't keep a session's prepared statements.
PREPARED_STATEMENTS = env_bool("HARMONT_PREPARED_STATEMENTS", True)

DEBUG = env_bool("HARMONT_DEBUG", False)

SECRET_KEY = env_str("HARMONT_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("HARMONT_SECRET_KEY is required unless HARMONT_DEBUG=1")
    SECRET_KEY = "insecure-development-key-only-for-HARMONT_DEBUG"

# The log-stream token gets its own secret so that rotating it (or leaking a log
# token) never touches session signing. Derived from the secret key by default.
LOG_TOKEN_SECRET = env_str("HARMONT_LOG_TOKEN_SECRET") or hashlib.sha256(
    b"harmont-log-token:" + SECRET_KEY.encode()
).hexdigest()
LOG_TOKEN_TTL_SECONDS = env_int("HARMONT_LOG_TOKEN_TTL", 3600, minimum=1)

# Keys that encrypt secrets and webhook secrets at rest (Fernet keys, comma-separated:
# the first encrypts, all decrypt, so a key can be rotated in). Derived from the secret
# key by default; set it explicitly in production so rotating the secret key keeps them readable.
SECRETS_KEYS = env_list("HARMONT_SECRETS_KEY", "") or [
    base64.urlsafe_b64encode(hashlib.sha256(b"harmont-secrets:" + SECRET_KEY.encode()).digest()).decode()
]

ALLOWED_HOSTS = env_list("HARMONT_ALLOWED_HOSTS", "localhost,127.0.0.1")
PORT = env_int("PORT", 8000, minimum=1)
PUBLIC_URL = env_origin("HARMONT_PUBLIC_URL", f"http://127.0.0.1:{PORT}")
# Where people reach the pages, when that is another name than PUBLIC_URL: the hm CLI
# talks to api.<domain> and sends people to app.<domain>, both served by this process.
APP_URL = env_origin("HARMONT_APP_URL") or PUBLIC_URL
# A signed-in form posted from the app host must pass Django's CSRF origin check even
# when a TLS-terminating proxy makes the request look like plain http to us.
CSRF_TRUSTED_ORIGINS = list(dict.fromkeys(
    [PUBLIC_URL, APP_URL, *env_origins("HARMONT_CSRF_TRUSTED_ORIGINS")]))
# Behind a proxy that terminates TLS and says so in X-Forwarded-Proto (and strips that
# header from what clients send), trust it: request.is_secure() is then true for https.
if env_bool("HARMONT_SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "axes",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_tasks",
    "django_tasks_db",
    "organizations",
    "pipelines",
    "builds",
]

MIDDLEWARE = [
    "harmont.errors.RequestIdMiddleware",
    "harmont.metrics.RequestMetricsMiddleware",
    "harmont.logs.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and the pages' static files from gunicorn itself.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # Before CommonMiddleware, so that preflights are answered before anything else looks at them.
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "harmont.security.ContentSecurityPolicyMiddleware",
    # Last, as django-axes asks: turns a locked-out sign-in into its 429 page.
    "axes.middleware.AxesMiddleware",
    "harmont.errors.ApiErrorMiddleware",
]

ROOT_URLCONF = "harmont.urls"
WSGI_APPLICATION = "harmont.wsgi.application"
ASGI_APPLICATION = "harmont.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                # The organization switcher on every page, queried only if a page shows it.
                "organizations.views.nav_context",
            ],
        },
    },
]

DATABASES = {"default": database_from_url(env_str("DATABASE_URL"))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "organizations.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Stored files (uploaded sources, workspaces, artifacts) go through Django's default storage:
# files under MEDIA_ROOT, unless HARMONT_STORAGE_BACKEND names another backend (for example
# django-storages' S3 backend), which gets HARMONT_STORAGE_OPTIONS (a JSON object) as its options.
STORAGES = {
    "default": {"BACKEND": env_str("HARMONT_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage"),
                "OPTIONS": env_json_object("HARMONT_STORAGE_OPTIONS")},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
MEDIA_ROOT = Path(env_str("HARMONT_MEDIA_ROOT", str(BASE_DIR / "var" / "media")))

# A render job (the pipeline rendered from the repository on an agent) may take this long.
RENDER_TIMEOUT_SECONDS = env_int("HARMONT_RENDER_TIMEOUT", 600, minimum=10)

# Request bodies: no route takes more than MAX_REQUEST_BYTES (the uploads: artifacts, workspaces,
# and the agents' job output); anything above a route's limit is a 413 in the error envelope,
# refused from Content-Length before it is read (harmont.errors.RequestIdMiddleware).
MAX_REQUEST_BYTES = env_int("HARMONT_MAX_REQUEST_BYTES", 64 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
# Every other JSON body: far more than any organization, pipeline, secret or envelope needs.
MAX_JSON_BYTES = env_int("HARMONT_MAX_JSON_BYTES", 1024 * 1024, minimum=1024)
# A build's uploaded source archive (`source_b64`, decoded). The build creates take its base64
# (4 characters for every 3 bytes) plus a JSON body of the ordinary size for everything else.
SOURCE_MAX_BYTES = env_int("HARMONT_SOURCE_MAX_BYTES", 32 * 1024 * 1024, minimum=1024)
MAX_BUILD_REQUEST_BYTES = 4 * -(-SOURCE_MAX_BYTES // 3) + MAX_JSON_BYTES
if MAX_BUILD_REQUEST_BYTES > MAX_REQUEST_BYTES:
    if env_str("HARMONT_SOURCE_MAX_BYTES"):
        raise ImproperlyConfigured(
            f"HARMONT_SOURCE_MAX_BYTES ({SOURCE_MAX_BYTES}) in base64 with HARMONT_MAX_JSON_BYTES "
            f"({MAX_JSON_BYTES}) makes a build request of {MAX_BUILD_REQUEST_BYTES} bytes, more than "
            f"HARMONT_MAX_REQUEST_BYTES ({MAX_REQUEST_BYTES})"
        )
    # A lowered request limit, with the source limit left at its default, lowers both.
    MAX_BUILD_REQUEST_BYTES = MAX_REQUEST_BYTES

# Artifacts: one file, and all of one build's files together, may not exceed these.
# One file is one request body, so it can't be larger than a request may be: the
# per-file limit follows HARMONT_MAX_REQUEST_BYTES unless set lower.
ARTIFACT_MAX_BYTES = env_int("HARMONT_ARTIFACT_MAX_BYTES", MAX_REQUEST_BYTES, minimum=1)
if ARTIFACT_MAX_BYTES > MAX_REQUEST_BYTES:
    raise ImproperlyConfigured(
        f"HARMONT_ARTIFACT_MAX_BYTES ({ARTIFACT_MAX_BYTES}) may not exceed HARMONT_MAX_REQUEST_BYTES "
        f"({MAX_REQUEST_BYTES}): an artifact is uploaded as one request body"
    )
BUILD_ARTIFACTS_MAX_BYTES = env_int("HARMONT_BUILD_ARTIFACTS_MAX_BYTES", 1024 * 1024 * 1024, minimum=1)

# A job's filesystem snapshot (a container executor's image of a passed parent, for its builds_in
# children on other agents). Streamed to storage as it arrives, never held in memory, so it is not
# bound by HARMONT_MAX_REQUEST_BYTES: agents send it chunked, as `save` makes it. (A body sent with a
# Content-Length is held to both.) An image holds the step's whole base image too.
SNAPSHOT_MAX_BYTES = env_int("HARMONT_SNAPSHOT_MAX_BYTES", 2 * 1024 * 1024 * 1024, minimum=1024)
# Step caches (builds.services.caches): what an organization's cache entries (the reused jobs'
# snapshots and workspaces) may take together; past it, the least recently used entries go.
CACHE_MAX_BYTES = env_int("HARMONT_CACHE_MAX_BYTES", 10 * 1024 * 1024 * 1024, minimum=0)

# GitHub caps webhook payloads at 25 MB; /webhooks/github refuses larger bodies (413) unread.
WEBHOOK_MAX_BYTES = env_int("HARMONT_WEBHOOK_MAX_BYTES", 25 * 1024 * 1024, minimum=1024)

# Background work (webhook processing) runs as tasks on the database backend of django-tasks,
# run by `manage.py db_worker` processes (`make run` starts one).
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}
# A queued delivery whose task has not finished after this long is handed to the queue again
# (its worker died, or the enqueue was lost with its process); the task is safe to run twice.
TASK_LEASE_SECONDS = env_int("HARMONT_TASK_LEASE_SECONDS", 300, minimum=5)
# Attempts at acting on one webhook delivery before it is marked failed; between failed
# attempts 30 s, doubling, at most an hour.
WEBHOOK_MAX_ATTEMPTS = env_int("HARMONT_WEBHOOK_MAX_ATTEMPTS", 10, minimum=1)

# Where commit statuses go: GitHub's API, or a GitHub Enterprise server's (`https://HOST/api/v3`).
GITHUB_API_URL = env_str("HARMONT_GITHUB_API_URL", "https://api.github.com").rstrip("/")
if not GITHUB_API_URL.startswith(("https://", "http://")):
    raise ImproperlyConfigured(f"HARMONT_GITHUB_API_URL must be an http(s) URL, got {GITHUB_API_URL!r}")
# Commit statuses and outbound webhooks (builds.services.notifications): each attempt may take
# this long (seconds); a failed one is tried again after HARMONT_DELIVERY_RETRY_SECONDS, doubling.
DELIVERY_TIMEOUT_SECONDS = env_float("HARMONT_DELIVERY_TIMEOUT", 10.0, minimum=0.1)
DELIVERY_RETRY_SECONDS = env_float("HARMONT_DELIVERY_RETRY_SECONDS", 10.0, minimum=0.01)
# Outbound webhook endpoints are URLs an organization's admins choose: unless this is set, one
# that resolves to a loopback, private or link-local address (this host, the LAN, a cloud's
# metadata service) is refused, so the server can't be used to reach what only it can reach.
WEBHOOK_ALLOW_PRIVATE_ADDRESSES = env_bool("HARMONT_WEBHOOK_ALLOW_PRIVATE_ADDRESSES", False)

# How long the first answer to a create sent with an Idempotency-Key is kept for its retries (seconds).
IDEMPOTENCY_KEY_TTL_SECONDS = env_int("HARMONT_IDEMPOTENCY_KEY_TTL", 24 * 3600, minimum=60)

# Jobs without their own timeout get this one (seconds).
DEFAULT_JOB_TIMEOUT_SECONDS = env_int("HARMONT_DEFAULT_JOB_TIMEOUT", 3600, minimum=1)
# What one build's plan may hold (pipelines.ir.Limits), checked before anything is written:
# a definition past one is a failed build with error_code limit_exceeded.
MAX_BUILD_JOBS = env_int("HARMONT_MAX_BUILD_JOBS", 1000, minimum=1)
MAX_BUILD_EDGES = env_int("HARMONT_MAX_BUILD_EDGES", 10_000, minimum=0)
MAX_COMMAND_BYTES = env_int("HARMONT_MAX_COMMAND_BYTES", 64 * 1024, minimum=1)
MAX_ENV_VALUE_BYTES = env_int("HARMONT_MAX_ENV_VALUE_BYTES", 64 * 1024, minimum=1)
MAX_ENV_BYTES = env_int("HARMONT_MAX_ENV_BYTES", 1024 * 1024, minimum=1)
MAX_BUILD_SPEC_BYTES = env_int("HARMONT_MAX_BUILD_SPEC_BYTES", 64 * 1024 * 1024, minimum=1)
SESSION_TOKEN_TTL_DAYS = 30

# Execution.
# An active job whose agent sent nothing for this long has failed (agent_heartbeat_lost).
# Agents heartbeat every 5 s, so anything near that would reap healthy, quiet jobs.
AGENT_HEARTBEAT_TIMEOUT_SECONDS = env_int("HARMONT_AGENT_HEARTBEAT_TIMEOUT", 30, minimum=15)
# Agents stop their own overdue commands; the server steps in only after this grace.
JOB_TIMEOUT_GRACE_SECONDS = env_int("HARMONT_JOB_TIMEOUT_GRACE", 30, minimum=0)
# How long an agent waits between SIGTERM and SIGKILL when stopping a command.
AGENT_CANCEL_GRACE_SECONDS = env_int("HARMONT_CANCEL_GRACE", 10, minimum=0)
# A job's credential dies this long after the job ended: time enough to retry a finish
# report whose answer was lost, and no more: a credential that outlives its job is one more to leak.
JOB_CREDENTIAL_GRACE_SECONDS = env_int("HARMONT_JOB_CREDENTIAL_GRACE", 60, minimum=0)
# Output past this many bytes per job is dropped (one meta chunk says so).
JOB_LOG_LIMIT_BYTES = env_int("HARMONT_JOB_LOG_LIMIT", 64 * 1024 * 1024, minimum=1024)
# Origins (comma list, or *) whose pages may read the live log stream.
LOG_STREAM_CORS_ORIGINS = env_list("HARMONT_LOG_STREAM_CORS_ORIGINS", "")
# Origins (comma list, or *) whose pages may call the REST API (django-cors-headers, /api/v0
# only). Clients send a bearer token, never cookies, so credentials stay off.
_api_cors_origins = env_origins("HARMONT_CORS_ORIGINS")
CORS_URLS_REGEX = r"^/api/v0/.*$"
CORS_ALLOW_ALL_ORIGINS = "*" in _api_cors_origins
CORS_ALLOWED_ORIGINS = [origin for origin in _api_cors_origins if origin != "*"]
CORS_ALLOW_HEADERS = ("authorization", "content-type", "idempotency-key", "x-request-id")
CORS_EXPOSE_HEADERS = ("x-request-id", "retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
                       "idempotent-replayed")
CORS_PREFLIGHT_MAX_AGE = 3600
# How often the reaper looks for lost agents and overdue jobs and builds.
REAPER_INTERVAL_SECONDS = env_int("HARMONT_REAPER_INTERVAL", 5, minimum=1)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["organizations.authentication.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["harmont.parsers.SafeJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "harmont.errors.api_exception_handler",
    "DEFAULT_THROTTLE_RATES": {
        # The unauthenticated CLI-login routes (claim, redeem): per client address, and per
        # nonce or code. One CLI polls claim about 80 times a minute while it waits.
        "cli_login": env_rate("HARMONT_CLI_LOGIN_RATE", "300/min"),
        "cli_login_credential": env_rate("HARMONT_CLI_LOGIN_CREDENTIAL_RATE", "100/min"),
    },
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DATETIME_FORMAT": "%Y-%m-%dT%H:%M:%S.%fZ",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Harmont API",
    "DESCRIPTION": "The REST API of a self-hosted Harmont CI server (wire format of Harmont API v0).",
    "VERSION": "0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": False,
    "SCHEMA_PATH_PREFIX": r"/api/v0",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The error answers every operation can give (401, 404, 413, ...) are added in one place.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "harmont.openapi.document_error_responses"],
}

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

LOGIN_URL = "/login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login"
# Anyone who reaches the server may create an account at /signup unless this is off;
# then operators create users (admin, `manage.py createtoken`) or invite them.
# Off by default: with it on, anyone could register ops@acme.test before an operator gives that
# address an organization. `make run`'s demo turns it on.
SIGNUP_ENABLED = env_bool("HARMONT_SIGNUP_ENABLED", False)

# Failed sign-ins (/login and /admin/login/) are throttled by django-axes, per account and per
# client address separately: after HARMONT_LOGIN_FAILURE_LIMIT failures, that account (from
# anywhere) and that address (for any account) wait HARMONT_LOGIN_COOLOFF_MINUTES. Accounts that
# don't exist are counted the same way, so the answer never tells whether one does.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = env_int("HARMONT_LOGIN_FAILURE_LIMIT", 10, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("HARMONT_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
AXES_LOCKOUT_PARAMETERS = ["ip_address", "username"]
AXES_RESET_ON_SUCCESS = True
AXES_USERNAME_CALLABLE = "organizations.views.sign_in_username"
AXES_LOCKOUT_CALLABLE = "organizations.views.sign_in_locked_out"
AXES_ALLOWED_CORS_ORIGINS = APP_URL
# The address is what the server in front reported (uvicorn's proxy headers, --forwarded-allow-ips),
# never a header a client could set itself.
AXES_IPWARE_META_PRECEDENCE_ORDER = ["REMOTE_ADDR"]
AXES_ENABLE_ACCESS_FAILURE_LOG = True
AXES_VERBOSE = False

# Logs: `plain` lines for people, or `json`, one object per line for a log pipeline (harmont.log_format),
# with a line per request (harmont.logs: route, status, duration, request id, who, organization).
LOG_FORMAT = env_str("HARMONT_LOG_FORMAT", "plain")
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"HARMONT_LOG_FORMAT must be plain or json, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
                   "json": {"()": "harmont.log_format.JsonFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env_str("HARMONT_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"},
                # The per-request lines (harmont.logs.RequestLogMiddleware): in json only, where a
                # pipeline parses them; plain logs keep to what happened.
                "harmont.requests": {"level": "INFO" if LOG_FORMAT == "json" else "WARNING"}},
}

# Prometheus metrics at /metrics (harmont.metrics): scraped with this bearer token; 404 without it.
METRICS_TOKEN = env_str("HARMONT_METRICS_TOKEN")
# Where the processes of one machine keep their counters and histograms, so that a scrape of any
# worker adds up all of them (prometheus-client's multiprocess mode): an empty directory, cleared
# when the server starts (harmont/gunicorn_conf.py does). Unset: each process reports its own.
METRICS_DIR = env_str("HARMONT_METRICS_DIR")
if METRICS_DIR:
    Path(METRICS_DIR).mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = METRICS_DIR

# Transport. The pages never read cookies from JavaScript (the CSRF token is in each form),
# so both cookies are HttpOnly; served over https, they are Secure and browsers get HSTS
# (sent on https requests only: behind a TLS-terminating proxy that needs
# HARMONT_SECURE_PROXY_SSL_HEADER).
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if APP_URL.startswith("https://"):
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("HARMONT_HSTS_SECONDS", 365 * 24 * 3600)

# The pages load only the server's own scripts, styles and images; the live log stream may be on
# HARMONT_PUBLIC_URL when the pages are on HARMONT_APP_URL.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    f"connect-src 'self' {PUBLIC_URL}" if PUBLIC_URL != APP_URL else "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    # The CLI login's confirmation redirects to the CLI's listener on localhost.
    "form-action 'self' http://localhost:*",
    "frame-ancestors 'none'",
])
