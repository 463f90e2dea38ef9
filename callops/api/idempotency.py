"""``Idempotency-Key``: the same key from the same partner replays the first answer for
``CALLOPS_IDEMPOTENCY_RETENTION_HOURS`` (24 h by default).

The record is inserted at the start of the request's transaction and holds the unique
(partner, key) slot: a concurrent request with the same key waits for the first to commit, then
replays its answer. A 5xx rolls the transaction back, record included, so it can be retried.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from callops.models import IdempotencyRecord

HEADER = "Idempotency-Key"


def _ttl() -> timedelta:
    """How long a key replays its first answer: as long as the purge keeps the record."""
    return timedelta(hours=settings.CALLOPS_IDEMPOTENCY_RETENTION_HOURS)


def _fingerprint(request) -> str:
    body = json.dumps(request.data, sort_keys=True, default=str)
    return hashlib.sha256(f"{request.method} {request.path}\n{body}".encode()).hexdigest()


def _error(status: int, message: str) -> Response:
    return Response({"errors": [{"field": HEADER, "message": message}]}, status=status)


def idempotent(handler):
    """Wrap a view method (``self, request, *args, **kwargs``) that answers a POST."""

    def wrapper(view, request, *args, **kwargs):
        key = request.headers.get(HEADER)
        if key is None:
            with transaction.atomic():
                return handler(view, request, *args, **kwargs)
        if not 0 < len(key) <= 255:
            return _error(400, "must be 1 to 255 characters")
        if "\x00" in key:  # PostgreSQL cannot store it: a 500 at the record's INSERT
            return _error(400, "must not contain a NUL character")
        fingerprint = _fingerprint(request)
        with transaction.atomic():
            IdempotencyRecord.objects.filter(
                partner=request.user, key=key, created_at__lt=timezone.now() - _ttl()
            ).delete()
            try:
                with transaction.atomic():
                    record = IdempotencyRecord.objects.create(
                        partner=request.user, key=key, request_fingerprint=fingerprint
                    )
            except IntegrityError:
                record = IdempotencyRecord.objects.get(partner=request.user, key=key)
                if record.request_fingerprint != fingerprint:
                    return _error(422, "was already used with a different request")
                response = Response(record.response_body, status=record.response_status)
                response["Idempotent-Replayed"] = "true"
                return response
            response = handler(view, request, *args, **kwargs)
            if response.status_code >= 500:
                transaction.set_rollback(True)
                return response
            record.response_status = response.status_code
            record.response_body = json.loads(JSONRenderer().render(response.data) or b"null")
            record.save(update_fields=["response_status", "response_body"])
            return response

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper
