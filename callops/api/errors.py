"""Every API error has one shape: ``{"errors": [{"field": ..., "message": ...}]}``."""

from __future__ import annotations

from django.db import InterfaceError, OperationalError
from rest_framework import exceptions
from rest_framework.response import Response
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


def exception_handler(exc, context):
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is unreachable: a retryable 503, not a 500.
        return Response(
            {"errors": [{"field": None, "message": "database unavailable, retry later"}]},
            status=503,
            headers={"Retry-After": "5"},
        )
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    detail = exc.detail if isinstance(exc, exceptions.APIException) else response.data
    response.data = {"errors": list(_flatten(detail))}
    return response
