"""Production: every secret comes from the environment and has no default.

A missing ``DJANGO_SECRET_KEY``, ``DJANGO_ALLOWED_HOSTS``, ``DATABASE_URL``, ``TELNYX_API_KEY`` or
``TELNYX_PUBLIC_KEY`` stops the process at import, before it can serve anything, with one line
naming it (``config.settings.environment``). So does a store that only one host would see: the
broker, the cache (the API throttle, the sweeper's lock) and the rate limiter must be shared by
the fleet, so a per-host file or process memory is refused.
"""

from .base import *  # noqa: F403
from .base import CACHES, CALLOPS_RATE_LIMIT_URL, CELERY_BROKER_URL, database, env, log_settings
from .environment import ConfigurationError

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS")
DATABASES = {"default": database(env.db_url("DATABASE_URL"))}
TELNYX_API_KEY = env.str("TELNYX_API_KEY")

for _name, _value in (
    ("DJANGO_SECRET_KEY", SECRET_KEY),
    ("DJANGO_ALLOWED_HOSTS", ALLOWED_HOSTS),
    ("TELNYX_API_KEY", TELNYX_API_KEY),
    ("TELNYX_PUBLIC_KEY", TELNYX_PUBLIC_KEYS),  # noqa: F405 - read and checked in base
):
    if not _value:
        raise ConfigurationError(f"{_name} must be set in production")
if "*" in ALLOWED_HOSTS:
    raise ConfigurationError("DJANGO_ALLOWED_HOSTS must name the hosts, not '*'")

# Fleet-wide state on a per-host store would split silently: each host its own queue, its own
# throttle counts, its own sweeper lock, its own Telnyx rate limit.
if CELERY_BROKER_URL.startswith(("filesystem:", "memory:")):
    raise ConfigurationError(
        "CELERY_BROKER_URL (or REDIS_URL) must point at Redis in production, not a per-host file"
    )
if not CACHES["default"]["BACKEND"].endswith("RedisCache"):
    raise ConfigurationError(
        "CACHE_URL (or REDIS_URL) must point at Redis in production: the API throttle and the"
        " sweeper's lock must be shared by every host, not kept in a per-host file"
    )
if not CALLOPS_RATE_LIMIT_URL:
    raise ConfigurationError(
        "CALLOPS_RATE_LIMIT_URL (or REDIS_URL) must point at Redis in production: the Telnyx"
        " rate limit must be shared by every worker, not kept in a per-host file"
    )

# One JSON object a line unless LOG_FORMAT says otherwise (callops.logs).
LOG_FORMAT, LOGGING = log_settings("json")

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# Load-balancer probes and Prometheus reach these over plain HTTP from inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=60 * 60 * 24 * 365)
SECURE_HSTS_INCLUDE_SUBDOMAINS = True
SECURE_HSTS_PRELOAD = env.bool("DJANGO_SECURE_HSTS_PRELOAD", default=True)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
