"""Every API error has one shape: ``{"errors": [{"field": ..., "message": ...}]}``."""

from __future__ import annotations

from django.db import InterfaceError, OperationalError
from rest_framework import exceptions
from rest_framework.views import exception_handler as drf_exception_handler


def _flatten(detail, field: str | None = None):
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = None if key in ("non_field_errors", "detail") else str(key)
            yield from _flatten(value, f"{field}.{name}" if field and name else field or name)
    elif isinstance(detail, list):
        nested = any(isinstance(item, dict | list) for item in detail)
        for index, item in enumerate(detail):
            yield from _flatten(item, f"{field}.{index}" if nested and field else field)
    else:
        yield {"field": field, "message": str(detail)}


# Seconds a client is told to wait when a service behind the API is down.
RETRY_AFTER = 5


class Unavailable(exceptions.APIException):
    """A service the API needs is down: a retryable 503 with ``Retry-After``, not a 500."""

    status_code = 503
    default_detail = "service unavailable, retry later"


def exception_handler(exc, context):
    if isinstance(exc, OperationalError | InterfaceError):
        exc = Unavailable("database unavailable, retry later")
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, Unavailable):
        response["Retry-After"] = str(RETRY_AFTER)
    detail = exc.detail if isinstance(exc, exceptions.APIException) else response.data
    response.data = {"errors": list(_flatten(detail))}
    return response
