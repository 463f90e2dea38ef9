"""HTTP entry points. The webhook view verifies, records, rings and answers; nothing else."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import HttpRequest, JsonResponse
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from callops import events, webhooks
from callops.tasks import request_event_drain

logger = logging.getLogger("callops.webhooks")


def _reject(request: HttpRequest, status: int, reason: str) -> JsonResponse:
    # One line per rejection, prefixed so an operator can count and alert on it.
    logger.warning(
        "webhook rejected status=%s reason=%r remote=%s",
        status,
        reason,
        request.META.get("REMOTE_ADDR", "-"),
    )
    return JsonResponse({"error": reason}, status=status)


@csrf_exempt
@require_POST
def telnyx_webhook(request: HttpRequest) -> JsonResponse:
    limit = settings.TELNYX_WEBHOOK_MAX_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _reject(request, 400, "Content-Length is not a number")
    if declared > limit:
        return _reject(request, 413, f"body is larger than {limit} bytes")
    body = request.body
    try:
        webhooks.verify_signature(
            body,
            request.META.get(webhooks.SIGNATURE_HEADER),
            request.META.get(webhooks.TIMESTAMP_HEADER),
        )
        event = webhooks.parse_event(body)
    except webhooks.WebhookRejected as exc:
        return _reject(request, exc.status_code, str(exc))

    handled = events.has_handler(event.event_type)
    try:
        status, created = webhooks.store_event(event, handled=handled)
    except (OperationalError, InterfaceError) as exc:
        # Telnyx retries a non-2xx delivery: nothing is lost while the database is down.
        logger.error("webhook not stored, database unavailable: %s", exc)
        return JsonResponse({"error": "database unavailable"}, status=503)
    except DatabaseError as exc:
        logger.error("webhook %s not stored: %s", event.event_id, exc)
        return JsonResponse({"error": "event could not be stored"}, status=503)

    if status == "pending":
        request_event_drain()
    return JsonResponse({"status": status, "duplicate": not created})


def not_found(request: HttpRequest, exception: Exception) -> JsonResponse:
    """API clients get the API's JSON error shape for unknown URLs too; people get the page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"errors": [{"field": None, "message": "Not found."}]}, status=404)
    return defaults.page_not_found(request, exception)
