"""Tests run on the real services: PostgreSQL and Redis on this machine unless told otherwise.

There is no silent fallback to SQLite or an in-memory broker: if PostgreSQL or Redis is not
there, the suite fails at start (see tests/conftest.py).
"""

from .base import *  # noqa: F403
from .base import BROKER_FAIL_FAST, database, env

SECRET_KEY = "django-insecure-callops-test-only"  # noqa: S105
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
DEBUG = False

DATABASES = {
    "default": database(
        {
            **env.db_url("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/callops"),
            # Tests close connections (0); a benchmark's workers reuse them as production does.
            "CONN_MAX_AGE": env.int("DATABASE_CONN_MAX_AGE", default=0),
        }
    ),
}
DATABASES["default"]["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME", default="test_callops")}

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/14")
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = dict(BROKER_FAIL_FAST)
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env.str("CACHE_URL", default=REDIS_URL),
        "KEY_PREFIX": "callops-test",
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
    }
}
CALLOPS_RATE_LIMIT_URL = env.str("CALLOPS_RATE_LIMIT_URL", default=REDIS_URL)
# Off: tests reuse connection ids over rolled-back rows, which a worker's memory would outlive
# (tests/test_lookups.py turns it on).
CALLOPS_LOOKUP_TTL = env.float("CALLOPS_LOOKUP_TTL", default=0)
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
