"""Reading the environment so that a configuration mistake is one sentence, not a traceback.

Settings are imported by ``manage.py``, gunicorn (its master imports them through
``config/gunicorn.py``) and Celery alike. A missing secret, a number that is not one, a URL that
is not one or a public key that is not an Ed25519 key raises ``ConfigurationError``: a
``SystemExit`` whose message, printed by Python on its way out, names the variable and what is
wrong with it. The process stops with status 1 before it can serve or consume anything.
Messages never repeat a value: a URL or a key may carry a secret.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from urllib.parse import urlsplit

import environ
from django.core.exceptions import ImproperlyConfigured

REDIS_SCHEMES = ("redis", "rediss", "unix")
BROKER_SCHEMES = ("redis", "rediss", "sentinel")


class ConfigurationError(SystemExit):
    """The process cannot start as configured; the message says which variable and why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"callops: {message}")


class Env(environ.Env):
    """``environ.Env`` whose lookups name the variable when it is missing or not of its type."""

    def get_value(self, var, cast=None, default=environ.Env.NOTSET, parse_default=False):
        try:
            return super().get_value(var, cast=cast, default=default, parse_default=parse_default)
        except ImproperlyConfigured:
            raise ConfigurationError(f"{var} must be set") from None
        except (ValueError, TypeError):
            kinds = {int: "a whole number", float: "a number", bool: "true or false"}
            kind = kinds.get(cast, "valid") if isinstance(cast, type) else "valid"
            raise ConfigurationError(f"{var} is not {kind}") from None

    def db_url(self, var, default=environ.Env.NOTSET, engine=None):
        value = check_database_url(var, self.str(var, default=default))
        return self.db_url_config(value, engine=engine)


def _parts(name: str, value: str, expected: str):
    """The URL split, or a sentence naming ``name`` if it is not one (a port that is no number)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        raise ConfigurationError(f"{name} is not a valid URL (expected {expected})") from None
    return parts


def check_url(name: str, value: str, schemes: tuple[str, ...], expected: str) -> str:
    """``value`` if it is a URL with one of ``schemes`` and a host (a path for ``unix://``).

    Several URLs separated by ``;`` (kombu's failover list, Redis Sentinels) are each checked.
    """
    for url in value.split(";"):
        parts = _parts(name, url, expected)
        if parts.scheme not in schemes:
            raise ConfigurationError(f"{name} is not a valid URL (expected {expected})")
        if not (parts.path if parts.scheme == "unix" else parts.hostname):
            raise ConfigurationError(f"{name} has no host (expected {expected})")
    return value


def check_database_url(name: str, value: str) -> str:
    expected = "postgres://user:password@host:5432/name"
    if not value:
        raise ConfigurationError(f"{name} must be set (expected {expected})")
    scheme = value.partition("://")[0]
    if scheme not in environ.Env.DB_SCHEMES:
        raise ConfigurationError(f"{name} is not a database URL (expected {expected})")
    if scheme.startswith("sqlite"):
        return value  # a path, or django-environ's own sqlite://:memory:
    # No host is libpq's local socket (or ?host=/path): only the database name is required.
    if not _parts(name, value, expected).path.strip("/"):
        raise ConfigurationError(f"{name} must name a database (expected {expected})")
    return value


def check_public_keys(name: str, keys: list[str]) -> list[str]:
    """Each key must be base64 of 32 bytes: an Ed25519 public key, as the Telnyx portal shows."""
    hint = "set it to the public key from the Telnyx portal"
    for key in keys:
        try:
            raw = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{name} is not valid base64 ({hint})") from None
        if len(raw) != 32:
            raise ConfigurationError(
                f"{name} decodes to {len(raw)} bytes, not the 32 of an Ed25519 public key ({hint})"
            )
    return keys


def check_networks(name: str, networks: list[str]) -> list[str]:
    """Each entry must be a network in CIDR notation (or one address)."""
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigurationError(
                f"{name} has an entry that is not a network (expected 10.0.0.0/8, ::1/128)"
            ) from None
    return networks
