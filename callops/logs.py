"""Structured logs: what each line is about, bound once, on every line it concerns.

The project logs through the standard ``logging`` module; structlog's ``ProcessorFormatter``
renders every record, callops' own and the libraries' alike, as one JSON object a line in
production (``LOG_FORMAT=json``) or as readable text in development. Fields bound with
``bound`` (structlog's context variables) are added to every line logged inside the block:

- ``correlation_id``: one chain of work. A webhook's chain is its Telnyx event id, which is
  stored with the event, so the drain that applies it, the commands that applying it creates,
  their sends to Telnyx and the partner deliveries they cause all log the same id. An API
  request's chain is its request id (``X-Request-ID``, answered in the response); a periodic
  task's, its Celery task id. It crosses the broker in a task header (``callops.queue``).
- ``call_control_id``, ``event_id``, ``command_id``, ``delivery_id``, ``partner``: the records.

Secrets are masked in every line (``mask_secrets``): configured tokens and keys wherever they
appear, ``Bearer`` credentials, passwords in URLs, and any field named like a secret.
"""

from __future__ import annotations

import contextvars
import logging
import logging.config
import re
from collections.abc import Callable
from typing import Any

import structlog
from structlog.contextvars import (
    bind_contextvars,
    clear_contextvars,
    get_contextvars,
    reset_contextvars,
)

# What crosses the broker with a task (the rest is bound again from the records).
CARRIED = ("correlation_id", "call_control_id")
HEADER = "callops_log_context"
MASK = "[masked]"

_SECRET_FIELD = re.compile(r"token|secret|passw|api_?key|authorization|signature|cookie", re.I)
_SECRET_TEXT = (
    # Authorization header values, whatever their scheme's case.
    (re.compile(r"(?i)\b(bearer|basic|token)(\s+)[^\s'\",;]+"), rf"\1\2{MASK}"),
    # user:password@ in a URL (a database or Redis URL in a connection error).
    (re.compile(r"(://[^:/@\s]*:)[^@\s/]+@"), rf"\1{MASK}@"),
    # callops' own secret shapes: partner API keys and Standard Webhooks secrets.
    (re.compile(r"\bcok_[A-Za-z0-9]+_[A-Za-z0-9_-]+"), MASK),
    (re.compile(r"\bwhsec_[A-Za-z0-9+/=]+"), MASK),
)
# What any of _SECRET_TEXT's patterns needs in a text to match: one scan rules most values out
# (ids, numbers, most messages) before the four substitutions run.
_MAYBE_SECRET_TEXT = re.compile(r"(?i:bearer|basic|token)\s|://\S*@|cok_|whsec_")
# The settings whose values never appear in a log line.
SECRET_SETTINGS = (
    "SECRET_KEY",
    "TELNYX_API_KEY",
    "CALLOPS_METRICS_TOKEN",
    "CALLOPS_READYZ_TOKEN",
)


class bound:  # noqa: N801 - used as a function: ``with logs.bound(call_control_id=...)``
    """A block whose log lines carry ``fields`` (empty values are left out); on leaving, each is
    what it was before. Tokens, not structlog's ``bound_contextvars``: that one copies the
    whole context to restore it, which the drain would pay once per event."""

    __slots__ = ("fields", "tokens")

    def __init__(self, **fields: Any) -> None:
        self.fields = {k: v for k, v in fields.items() if v not in (None, "")}

    def __enter__(self) -> None:
        self.tokens = bind_contextvars(**self.fields)

    def __exit__(self, *exc_info: object) -> None:
        reset_contextvars(**self.tokens)


def bind(**fields: Any) -> None:
    bind_contextvars(**{k: v for k, v in fields.items() if v not in (None, "")})


def clear() -> None:
    clear_contextvars()


def carried() -> dict[str, Any]:
    """What a task published now carries to its worker."""
    context = get_contextvars()
    carried = {key: context[key] for key in CARRIED if key in context}
    if "correlation_id" not in carried and "request_id" in context:
        carried["correlation_id"] = context["request_id"]  # see default_correlation
    return carried


def on_commit(func: Callable[[], Any]) -> None:
    """``transaction.on_commit`` that runs ``func`` with the log context of now, not of the
    commit: a drain commits a batch of many events' commands at once, and each command's
    message must carry its own event's correlation id."""
    from django.db import transaction  # not at the top: the settings import this module

    context = contextvars.copy_context()
    transaction.on_commit(lambda: context.run(func))


def _secret_values() -> list[str]:
    from django.conf import settings

    found = [getattr(settings, name, "") for name in SECRET_SETTINGS]
    # Short values would mask common words; every real secret here is long.
    return [value for value in found if isinstance(value, str) and len(value) >= 8]


def _mask_text(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if _MAYBE_SECRET_TEXT.search(text) is None:
        return text
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def default_correlation(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: a request's correlation id is its request id unless one was bound
    (binding one variable, not two, on every request)."""
    if "correlation_id" not in event_dict and "request_id" in event_dict:
        event_dict["correlation_id"] = event_dict["request_id"]
    return event_dict


def mask_secrets(_logger: Any, _method: str, event_dict: dict) -> dict:
    """structlog processor: no secret leaves in a log line."""
    secrets = _secret_values()
    for key, value in event_dict.items():
        if key != "event" and _SECRET_FIELD.search(key) and value not in (None, ""):
            event_dict[key] = MASK
        elif isinstance(value, str):
            event_dict[key] = _mask_text(value, secrets)
    return event_dict


def _pre_chain() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
        default_correlation,
    ]


class Formatter(structlog.stdlib.ProcessorFormatter):
    """The ``logging`` formatter of every handler: ``json`` or ``text``."""

    def __init__(self, *args: Any, format: str = "text", **kwargs: Any) -> None:
        if format == "json":
            renderer: Any = structlog.processors.JSONRenderer()
            last = [structlog.processors.EventRenamer("message"), renderer]
        else:
            last = [structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)]
        processors = [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            mask_secrets,
            *last,
        ]
        super().__init__(*args, processors=processors, foreign_pre_chain=_pre_chain(), **kwargs)


def logging_config(*, level: str, format: str, task_level: str = "WARNING") -> dict:
    """``LOGGING`` for Django settings (and Celery, which is given the same). ``task_level``:
    Celery's line per task received and per task succeeded (two a message, most of a worker's
    logging CPU); callops logs what matters of each command and delivery itself, and a task
    that fails is logged at ERROR whatever this says."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"callops": {"()": Formatter, "format": format}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "callops"}},
        "root": {"handlers": ["console"], "level": level},
        # httpx logs every request at INFO; callops logs what matters about each command itself.
        "loggers": {
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
            "celery.worker.strategy": {"level": task_level},
            "celery.app.trace": {"level": task_level},
        },
    }


def configure(config: dict) -> None:
    logging.config.dictConfig(config)
