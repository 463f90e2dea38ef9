"""Production: every secret comes from the environment and has no default.

A missing ``DJANGO_SECRET_KEY``, ``DJANGO_ALLOWED_HOSTS``, ``DATABASE_URL``, ``TELNYX_API_KEY`` or
``TELNYX_PUBLIC_KEY`` stops the process at import, before it can serve anything.
"""

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import database, env

DEBUG = False
SECRET_KEY = env.str("DJANGO_SECRET_KEY")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS")
DATABASES = {"default": database(env.db_url("DATABASE_URL"))}
TELNYX_API_KEY = env.str("TELNYX_API_KEY")
TELNYX_PUBLIC_KEYS = env.list("TELNYX_PUBLIC_KEY")

for _name, _value in (
    ("DJANGO_SECRET_KEY", SECRET_KEY),
    ("DJANGO_ALLOWED_HOSTS", ALLOWED_HOSTS),
    ("TELNYX_API_KEY", TELNYX_API_KEY),
    ("TELNYX_PUBLIC_KEY", TELNYX_PUBLIC_KEYS),
):
    if not _value:
        raise ImproperlyConfigured(f"{_name} must be set in production")
if CELERY_BROKER_URL.startswith("filesystem://"):  # noqa: F405
    raise ImproperlyConfigured("CELERY_BROKER_URL (or REDIS_URL) must point at Redis in production")
if "*" in ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS must name the hosts, not '*'")

SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
# Load-balancer probes reach the health checks over plain HTTP from inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
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
