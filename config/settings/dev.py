"""Local development: DEBUG on, a fixed insecure secret, the local host names allowed.

A ``.env`` filled in for the compose stack (a production host name, an empty or real secret)
must not break ``./bin/run``: an empty ``DJANGO_SECRET_KEY`` falls back to the dev one, and the
local names stay allowed next to whatever ``DJANGO_ALLOWED_HOSTS`` adds.
"""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="") or "django-insecure-callops-dev-only"
ALLOWED_HOSTS = [
    "localhost",
    "127.0.0.1",
    "[::1]",
    *env.list("DJANGO_ALLOWED_HOSTS", default=[]),
]
CALLOPS_ALLOW_INSECURE_WS = env.bool("CALLOPS_ALLOW_INSECURE_WS", default=True)
CALLOPS_ALLOW_PRIVATE_TARGETS = env.bool("CALLOPS_ALLOW_PRIVATE_TARGETS", default=True)
# /metrics answers this machine's own scrapes without a token.
CALLOPS_METRICS_ALLOWED_NETWORKS = env.list(
    "CALLOPS_METRICS_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1/128"]
)
