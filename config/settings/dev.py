"""Local development: DEBUG on, a fixed insecure secret, every host allowed."""

from .base import *  # noqa: F403
from .base import env

DEBUG = env.bool("DJANGO_DEBUG", default=True)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="django-insecure-callops-dev-only")
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CALLOPS_ALLOW_INSECURE_WS = env.bool("CALLOPS_ALLOW_INSECURE_WS", default=True)
CALLOPS_ALLOW_PRIVATE_TARGETS = env.bool("CALLOPS_ALLOW_PRIVATE_TARGETS", default=True)
