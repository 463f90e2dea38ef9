"""Settings shared by every environment.

Every knob an operator may turn is read here from the environment (or a ``.env`` file) through one
``environ.Env``; ``.env.example`` and the README list them. Environment-specific modules (dev, test,
production) only change defaults and security settings.
"""

import os
from pathlib import Path

from kombu import Queue

from callops import logs, telnyx_spec

from .environment import (
    BROKER_SCHEMES,
    REDIS_SCHEMES,
    ConfigurationError,
    Env,
    check_networks,
    check_public_keys,
    check_url,
)

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = Env()
# The test settings never read .env: a developer's file (a dev database, a real key, another
# Redis db) must not change what the suite checks; tests are configured by the environment only.
# CALLOPS_ENV_FILE names another file, or none when empty. The file never chooses the settings
# module: DJANGO_SETTINGS_MODULE is read before it is.
ENV_FILE = os.environ.get("CALLOPS_ENV_FILE", str(BASE_DIR / ".env"))
if (
    ENV_FILE
    and os.environ.get("DJANGO_SETTINGS_MODULE") != "config.settings.test"
    and Path(ENV_FILE).is_file()
):
    env.read_env(ENV_FILE)

# The embedded default's files (SQLite, the file broker, the cache, the simulator's key).
VAR_DIR = Path(env.str("CALLOPS_VAR_DIR", default=str(BASE_DIR / "var")))

DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "callops",
]

MIDDLEWARE = [
    # First: every line logged while answering carries this request's id.
    "config.middleware.LogContextMiddleware",
    # Then, before host validation: probes and Prometheus address the process by IP.
    "config.middleware.HealthzMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Django's, with each request's storage made on first use (the webhook never uses it).
    "config.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
# Without DATABASE_URL the service runs on an embedded SQLite file, so a fresh machine needs
# nothing but Python. Production sets DATABASE_URL to PostgreSQL.


def database(db: dict) -> dict:
    """Connection options for the ``DATABASES`` entry ``db``; production reuses this."""
    db.setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    # Off by default: a health check is one more round trip on every request (measured: it costs
    # the webhook a fifth of its throughput). A connection broken by a database restart fails one
    # request per process instead: the webhook and the API answer it with 503, and Django drops
    # the connection at the end of that request.
    db["CONN_HEALTH_CHECKS"] = env.bool("DATABASE_CONN_HEALTH_CHECKS", default=False)
    if db["ENGINE"].endswith("postgresql"):
        # The webhook's INSERT, and a command's claim and outcome, run as prepared statements
        # (callops.prepared): it saves PostgreSQL parsing and planning them on every run, about
        # half of the webhook statement's server CPU. The ORM's own queries are never prepared
        # (Django binds their parameters on the client). Behind a PgBouncer older than 1.21 in
        # transaction mode, set DATABASE_PREPARED_STATEMENTS=false.
        prepared = env.bool("DATABASE_PREPARED_STATEMENTS", default=True)
        db.setdefault("OPTIONS", {}).setdefault("prepare_threshold", 5 if prepared else None)
    if db["ENGINE"].endswith("sqlite3"):
        # WAL lets the web process read while a worker writes; the busy timeout makes concurrent
        # writers wait for each other instead of failing with "database is locked".
        db["OPTIONS"] = {
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
        }
        db["CONN_MAX_AGE"] = 0
    return db


DATABASES = {
    "default": database(
        env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'callops.sqlite3'}")
    ),
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, broker and cache ----------------------------------------------------------------
# REDIS_URL is a shorthand: it fills in the broker and the cache unless they are set on their own.
REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    check_url("REDIS_URL", REDIS_URL, ("redis", "rediss"), "redis://host:6379/0")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "filesystem://")
if CELERY_BROKER_URL != "filesystem://":
    check_url("CELERY_BROKER_URL", CELERY_BROKER_URL, BROKER_SCHEMES, "redis://host:6379/0")
CACHE_URL = env.str("CACHE_URL", default=REDIS_URL or "")
if CACHE_URL:
    check_url("CACHE_URL", CACHE_URL, REDIS_SCHEMES, "redis://host:6379/1")

# A publisher (the webhook's doorbell) gives up on an unreachable broker within ~1 s instead of
# kombu's default 4 s connect timeout times several retries: Telnyx's budget is 2 s, and the
# event is already stored. Workers reconnect with their own, patient, retry policy.
BROKER_FAIL_FAST = {"socket_connect_timeout": 0.5, "max_retries": 0}

if CELERY_BROKER_URL == "filesystem://":
    # Embedded default: kombu's filesystem transport, a directory shared by web and worker.
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
        # Consumers look for new messages this often (kombu's default is 1 s): a partner's
        # events go out one after the other, so each one would wait up to a second.
        "polling_interval": 0.1,
    }
    # The stock transport can hand a worker a message half written (config/embedded_broker.py).
    CELERY_BROKER_TRANSPORT = "config.embedded_broker:Transport"
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        **BROKER_FAIL_FAST,
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    }

if CACHE_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            "KEY_PREFIX": "callops",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
    }
else:
    # Shared by the web, worker and beat processes of an embedded run (locmem would not be).
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Celery would close the database connection around every task; callops.tasks closes it the
# way Django does after a request instead (CONN_MAX_AGE, and whenever it broke).
CELERY_DB_REUSE_MAX = 10**9
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = "callops"
# Commands, the drains of events a caller waits on, and short maintenance on "callops"; other
# event drains on "events". Production runs a worker per queue (docker-compose: worker -Q
# callops, worker-events -Q events), so an answer or a start is never queued behind a backlog
# of transcript drains. Both are declared: a worker started
# without -Q (the embedded ./bin/run) takes both.
# Webhooks to partners on "partners" (worker-partners): their endpoints are third-party servers
# that may be slow or down, and an attempt may wait CALLOPS_WEBHOOK_TIMEOUT; on either other
# queue they would hold up commands or drains.
CELERY_TASK_QUEUES = (Queue("callops"), Queue("events"), Queue("partners"))
CELERY_TASK_ROUTES = {
    "callops.tasks.drain_webhook_events": {"queue": "events"},
    "callops.tasks.deliver_partner_event": {"queue": "partners"},
    "callops.tasks.sweep_partner_deliveries": {"queue": "partners"},
    # Long-running maintenance is never on the commands' worker: the pending-event sweeper
    # drains every shard for as long as a backlog takes, the purge deletes in batches.
    "callops.tasks.sweep_pending_webhook_events": {"queue": "events"},
    "callops.tasks.purge_old_records": {"queue": "events"},
    "callops.tasks.purge_partner_records": {"queue": "events"},
    # drain_urgent_events stays on "callops": the events a caller waits on (callops.drain).
}
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# The default schedules are created by a migration (callops 0005) so operators can change them
# in the admin without a deploy overwriting their change.

# --- Telnyx ---------------------------------------------------------------------------------
TELNYX_API_KEY = env.str("TELNYX_API_KEY", default="")
# One base64 Ed25519 key, or several separated by commas while Telnyx rotates the account key.
TELNYX_PUBLIC_KEYS = check_public_keys(
    "TELNYX_PUBLIC_KEY", env.list("TELNYX_PUBLIC_KEY", default=[])
)
TELNYX_BASE_URL = check_url(
    "TELNYX_BASE_URL",
    env.str("TELNYX_BASE_URL", default="https://api.telnyx.com/v2"),
    ("https", "http"),
    "https://api.telnyx.com/v2",
)
TELNYX_WEBHOOK_TOLERANCE = env.int("TELNYX_WEBHOOK_TOLERANCE", default=300)
TELNYX_WEBHOOK_MAX_BYTES = env.int("TELNYX_WEBHOOK_MAX_BYTES", default=1024 * 1024)

# Seconds before an HTTP call to Telnyx gives up (connect and read); the SDK's own 60 s is too long.
TELNYX_TIMEOUT = env.float("TELNYX_TIMEOUT", default=5.0)
# Commands per second all workers together may send (Telnyx publishes no number for Call Control).
TELNYX_RATE_LIMIT = env.float("TELNYX_RATE_LIMIT", default=10.0)
# Extra seconds added to the one-second rate window. 0 by default: a send counts until its
# answer is back (callops.ratelimit), so two sends a window apart in the log are already at least
# a window (plus a round trip) apart at Telnyx. Raise it if Telnyx's clock is distrusted.
TELNYX_RATE_LIMIT_GUARD = env.float("TELNYX_RATE_LIMIT_GUARD", default=0.0)
# A worker whose rate-limit turn comes within this many seconds waits for it instead of
# rescheduling the command (a task message and a database write); longer waits are rescheduled.
CALLOPS_RATE_LIMIT_INLINE_WAIT = env.float("CALLOPS_RATE_LIMIT_INLINE_WAIT", default=0.05)
# Exponential backoff with full jitter for retryable failures: base * 2**attempt, capped.
TELNYX_BACKOFF_BASE = env.float("TELNYX_BACKOFF_BASE", default=0.5)
TELNYX_BACKOFF_CAP = env.float("TELNYX_BACKOFF_CAP", default=60.0)
# A command is given up ("gave up") after this many attempts or this many seconds.
TELNYX_COMMAND_MAX_ATTEMPTS = env.int("TELNYX_COMMAND_MAX_ATTEMPTS", default=10)
TELNYX_COMMAND_MAX_AGE = env.int("TELNYX_COMMAND_MAX_AGE", default=600)
# Telnyx ignores a repeated command_id for this long (60 s). A command whose outcome is unknown
# is re-sent with its command_id only inside it; after it, its webhooks settle it.
TELNYX_COMMAND_ID_WINDOW = env.float("TELNYX_COMMAND_ID_WINDOW", default=60.0)
# The engines transcription_start accepts: by default every one the installed SDK lists (the
# generated callops/telnyx_spec.py). Narrow it here; a name the SDK does not list is refused
# and callops.checks warns of it.
TELNYX_TRANSCRIPTION_ENGINES = env.list(
    "TELNYX_TRANSCRIPTION_ENGINES", default=list(telnyx_spec.TRANSCRIPTION_ENGINES)
)
# Where workers share the rate limit: Redis if there is one (the cache's), else a locked file in
# var/, which only the processes of one machine share (production refuses it).
CALLOPS_RATE_LIMIT_URL = env.str("CALLOPS_RATE_LIMIT_URL", default=CACHE_URL)
if CALLOPS_RATE_LIMIT_URL:
    check_url(
        "CALLOPS_RATE_LIMIT_URL", CALLOPS_RATE_LIMIT_URL, REDIS_SCHEMES, "redis://host:6379/1"
    )
# Stream URLs and fork targets may point at loopback or private addresses (development only).
CALLOPS_ALLOW_PRIVATE_TARGETS = env.bool("CALLOPS_ALLOW_PRIVATE_TARGETS", default=False)
# Plain ws:// stream URLs are refused unless this is on (development only).
CALLOPS_ALLOW_INSECURE_WS = env.bool("CALLOPS_ALLOW_INSECURE_WS", default=False)
# Commands still queued this long past their next attempt time are re-enqueued (lost message).
CALLOPS_STUCK_COMMAND_GRACE = env.int("CALLOPS_STUCK_COMMAND_GRACE", default=30)

# --- Scheduled maintenance (django-celery-beat: schedules live in the database, see admin) ---
# Streams, forks and transcriptions running longer than this are stopped (a profile may differ).
CALLOPS_MAX_STREAM_DURATION = env.int("CALLOPS_MAX_STREAM_DURATION", default=4 * 3600)
# A start still without its started webhook after this many seconds is failed and stopped.
CALLOPS_START_GRACE = env.int("CALLOPS_START_GRACE", default=120)
# Retention: processed webhook events and transcript segments older than this are deleted,
# failed events (kept longer, for a replay) and Idempotency-Key answers (not below the 24 h
# the partner API replays them) too; CALLOPS_PURGE_BATCH rows per DELETE.
CALLOPS_EVENT_RETENTION_DAYS = env.int("CALLOPS_EVENT_RETENTION_DAYS", default=30)
CALLOPS_FAILED_EVENT_RETENTION_DAYS = env.int("CALLOPS_FAILED_EVENT_RETENTION_DAYS", default=90)
CALLOPS_SEGMENT_RETENTION_DAYS = env.int("CALLOPS_SEGMENT_RETENTION_DAYS", default=90)
CALLOPS_IDEMPOTENCY_RETENTION_HOURS = env.int("CALLOPS_IDEMPOTENCY_RETENTION_HOURS", default=24)
CALLOPS_PURGE_BATCH = env.int("CALLOPS_PURGE_BATCH", default=5000)
# Admin lists count at most this many rows (then say "more than N"); an unfiltered list of a
# bigger table shows the planner's estimate (callops/admin_paging.py).
CALLOPS_ADMIN_COUNT_LIMIT = env.int("CALLOPS_ADMIN_COUNT_LIMIT", default=10_000)
# /readyz fails when the beat heartbeat task has not run for this long.
CALLOPS_HEARTBEAT_MAX_AGE = env.int("CALLOPS_HEARTBEAT_MAX_AGE", default=180)
# A bearer token that lets a caller (a monitor) read /readyz's checks and the tasks' last
# runs; without it, or a staff session, /readyz says only ready or not. Empty: no token works.
CALLOPS_READYZ_TOKEN = env.str("CALLOPS_READYZ_TOKEN", default="")

# --- Event processing -----------------------------------------------------------------------
# Events still pending this long after arrival are re-enqueued by the sweeper (broker outage).
CALLOPS_PENDING_EVENT_GRACE = env.int("CALLOPS_PENDING_EVENT_GRACE", default=60)
# How many events one drain task applies before handing the rest to a fresh task (so commands,
# which share the workers, wait behind one short drain at most).
CALLOPS_DRAIN_BATCH = env.int("CALLOPS_DRAIN_BATCH", default=100)
# How many events a drain claims and applies in one transaction.
CALLOPS_DRAIN_CLAIM = env.int("CALLOPS_DRAIN_CLAIM", default=50)
# Events are spread over this many drain shards by call: one drain per shard at a time, shards
# in parallel on any number of workers. Changing it is safe: pending events keep their shard.
CALLOPS_DRAIN_SHARDS = env.int("CALLOPS_DRAIN_SHARDS", default=8)
# Seconds a drain for transcript segments and other events no caller waits on is published
# after the first of them arrives, so what follows joins its batch (the call's answer, media
# start and machine-detection results are drained at once).
CALLOPS_DRAIN_DELAY = env.float("CALLOPS_DRAIN_DELAY", default=0.25)
# Seconds a worker remembers a connection's streaming profile and webhook endpoints across
# drain batches (callops.lookups); a change made on another host is seen within this. 0: each
# batch reads them again.
CALLOPS_LOOKUP_TTL = env.float("CALLOPS_LOOKUP_TTL", default=2.0)

# --- Webhooks to partners (callops.partner_delivery) -----------------------------------------
# Seconds one POST to a partner's endpoint may take (connect, send, answer) before it counts as
# a failed attempt.
CALLOPS_WEBHOOK_TIMEOUT = env.float("CALLOPS_WEBHOOK_TIMEOUT", default=5.0)
# A delivery is given up ("dead") after this many attempts, or this many seconds after it was
# created (or redelivered), whichever comes first.
CALLOPS_WEBHOOK_MAX_ATTEMPTS = env.int("CALLOPS_WEBHOOK_MAX_ATTEMPTS", default=15)
CALLOPS_WEBHOOK_MAX_AGE = env.int("CALLOPS_WEBHOOK_MAX_AGE", default=24 * 3600)
# Exponential backoff with full jitter between attempts, in seconds; a 429 or 503 with
# Retry-After waits what it says, up to the cap (below the broker's visibility timeout).
CALLOPS_WEBHOOK_BACKOFF_BASE = env.float("CALLOPS_WEBHOOK_BACKOFF_BASE", default=2.0)
CALLOPS_WEBHOOK_BACKOFF_CAP = env.float("CALLOPS_WEBHOOK_BACKOFF_CAP", default=600.0)
# The circuit breaker: after this many failed attempts in a row an endpoint is parked for the
# cooldown (seconds); then one probe goes out, and its success lets the rest through.
CALLOPS_WEBHOOK_BREAKER_THRESHOLD = env.int("CALLOPS_WEBHOOK_BREAKER_THRESHOLD", default=5)
CALLOPS_WEBHOOK_BREAKER_COOLDOWN = env.int("CALLOPS_WEBHOOK_BREAKER_COOLDOWN", default=60)
# Requests in flight at once to one endpoint, across every worker process and host; what
# finds its endpoint full waits its turn (it holds no worker meanwhile). Half the
# partners worker's 16 threads, so a slow endpoint leaves the other half to the others.
CALLOPS_WEBHOOK_CONCURRENCY = env.int("CALLOPS_WEBHOOK_CONCURRENCY", default=8)
# Seconds the previous signing secret still signs after a rotation (the API may choose).
CALLOPS_WEBHOOK_SECRET_OVERLAP = env.int("CALLOPS_WEBHOOK_SECRET_OVERLAP", default=24 * 3600)
# Retention: finished (succeeded or dead) deliveries, and partner events with no delivery left.
CALLOPS_DELIVERY_RETENTION_DAYS = env.int("CALLOPS_DELIVERY_RETENTION_DAYS", default=7)
CALLOPS_PARTNER_EVENT_RETENTION_DAYS = env.int("CALLOPS_PARTNER_EVENT_RETENTION_DAYS", default=30)

# --- Internationalisation and static files --------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
# Timestamps to the second in the admin (config/formats/en/formats.py).
FORMAT_MODULE_PATH = ["config.formats"]
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.str("DJANGO_STATIC_ROOT", default=str(VAR_DIR / "static"))

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": ["callops.api.authentication.PartnerKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["callops.api.schema.PartnerRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        "partner": env.str("CALLOPS_PARTNER_THROTTLE", default="1200/minute"),
    },
    "EXCEPTION_HANDLER": "callops.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "callops partner API",
    "DESCRIPTION": "Answer, reject, hang up and dial your Telnyx calls, and drive their"
    " streaming, forking and transcription.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "CallStatusEnum": "callops.models.Call.Status",
        "SessionStatusEnum": "callops.models.CallSession.Status",
        "CommandStatusEnum": "callops.models.Command.Status",
        "RejectCauseEnum": "callops.telnyx_params.REJECT_CAUSES",
    },
}

# --- Logs and metrics (callops.logs, callops.metrics) -----------------------------------------
# One JSON object a line (production's default) or readable text (development's); every line
# carries the call, event, command and correlation ids it concerns. LOG_LEVEL: the root level.


def log_settings(default_format: str) -> tuple[str, dict]:
    """``(LOG_FORMAT, LOGGING)``, the format ``default_format`` unless set; production reuses it."""
    log_format = env.str("LOG_FORMAT", default=default_format)
    if log_format not in ("json", "text"):
        raise ConfigurationError("LOG_FORMAT is not json or text")
    level = env.str("LOG_LEVEL", default="INFO")
    # Celery's "Task ... received" / "succeeded" lines: INFO shows them.
    task_level = env.str("LOG_LEVEL_CELERY_TASKS", default="WARNING")
    return log_format, logs.logging_config(level=level, format=log_format, task_level=task_level)


LOG_FORMAT, LOGGING = log_settings("text")

# Where every process of a host (gunicorn's workers, Celery's pool) writes its counters for
# /metrics to add up (prometheus-client's multi-process mode). Empty: each process counts for
# itself, and /metrics shows the web process's own. Set before any process starts; empty it
# when the host's processes restart.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default="")
if PROMETHEUS_MULTIPROC_DIR:
    Path(PROMETHEUS_MULTIPROC_DIR).mkdir(parents=True, exist_ok=True)
    # prometheus-client reads the environment, in this process and in those it forks.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = PROMETHEUS_MULTIPROC_DIR
# Who may read /metrics: the holder of this bearer token, or a client whose address is in one
# of these networks (CIDR, comma-separated). With neither, /metrics answers 404.
CALLOPS_METRICS_TOKEN = env.str("CALLOPS_METRICS_TOKEN", default="")
CALLOPS_METRICS_ALLOWED_NETWORKS = check_networks(
    "CALLOPS_METRICS_ALLOWED_NETWORKS", env.list("CALLOPS_METRICS_ALLOWED_NETWORKS", default=[])
)
# Seconds each database query of a scrape may take before it is cancelled (its gauges are then
# left out and callops_metrics_scrape_errors_total counts it).
CALLOPS_METRICS_QUERY_TIMEOUT = env.float("CALLOPS_METRICS_QUERY_TIMEOUT", default=2.0)
