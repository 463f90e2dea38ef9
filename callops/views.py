"""HTTP entry points. The webhook view verifies, records, rings and answers; nothing else."""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import logging
import time

from django.conf import settings
from django.db import (
    DatabaseError,
    DataError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from prometheus_client import CONTENT_TYPE_LATEST

from callops import dashboard, drain, events, gauges, logs, metrics, webhooks
from callops.models import TaskRun
from config.celery_app import app

logger = logging.getLogger("callops.webhooks")


def _reject(
    request: HttpRequest, status: int, reason: str, kind: str, started: float
) -> JsonResponse:
    # One line per rejection, prefixed so an operator can count and alert on it.
    logger.warning(
        "webhook rejected status=%s reason=%r remote=%s",
        status,
        reason,
        request.META.get("REMOTE_ADDR", "-"),
        extra={"reason": kind},
    )
    dashboard.webhook_rejection_count(status=status, reason=reason)
    response = JsonResponse({"error": reason}, status=status)
    metrics.webhook_rejected(reason=kind, seconds=time.perf_counter() - started)
    return response


@functools.lru_cache(maxsize=32)
def _answer(status: str, duplicate: bool) -> bytes:
    """The webhook's answer, what JsonResponse would write: a handful of different bodies, each
    serialised once per process instead of once per delivery."""
    return json.dumps({"status": status, "duplicate": duplicate}).encode()


@csrf_exempt
@require_POST
def telnyx_webhook(request: HttpRequest) -> HttpResponse:
    started = time.perf_counter()
    limit = settings.TELNYX_WEBHOOK_MAX_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _reject(request, 400, "Content-Length is not a number", "bad_length", started)
    if declared > limit:
        return _reject(request, 413, f"body is larger than {limit} bytes", "too_large", started)
    body = request.body
    try:
        webhooks.verify_signature(
            body,
            request.META.get(webhooks.SIGNATURE_HEADER),
            request.META.get(webhooks.TIMESTAMP_HEADER),
        )
        event = webhooks.parse_event(body)
    except webhooks.WebhookRejected as exc:
        return _reject(request, exc.status_code, str(exc), exc.reason, started)
    # The chain this event starts is known by its Telnyx id (callops.logs).
    logs.bind(
        correlation_id=event.event_id,
        event_id=event.event_id,
        call_control_id=event.call_control_id,
    )

    handled = events.has_handler(event.event_type)
    try:
        status, created, raised = webhooks.store_event(event, handled=handled)
    except (OperationalError, InterfaceError) as exc:
        # Telnyx retries a non-2xx delivery: nothing is lost while the database is down.
        logger.error("webhook not stored, database unavailable: %s", exc)
        metrics.webhook_rejected(
            reason="database_unavailable", seconds=time.perf_counter() - started
        )
        return JsonResponse({"error": "database unavailable"}, status=503)
    except DataError as exc:
        # PostgreSQL refuses the value itself (a number beyond its numeric type): every retry
        # would get the same answer, so the delivery is refused, not deferred with a 503.
        reason = str(exc).partition("\n")[0]
        return _reject(request, 400, f"body cannot be stored: {reason}", "unstorable", started)
    except DatabaseError as exc:
        logger.error("webhook %s not stored: %s", event.event_id, exc)
        metrics.webhook_rejected(reason="database_error", seconds=time.perf_counter() - started)
        return JsonResponse({"error": "event could not be stored"}, status=503)

    drain.after_store(status=status, raised=raised, shard=event.shard, lane=event.lane)
    response = HttpResponse(_answer(status, not created), content_type="application/json")
    metrics.webhook_answered(
        seconds=time.perf_counter() - started, event_type=event.event_type, duplicate=not created
    )
    return response


def not_found(request: HttpRequest, exception: Exception) -> JsonResponse:
    """API clients get the API's JSON error shape for unknown URLs too; people get the page."""
    if request.path.startswith("/api/"):
        return JsonResponse({"errors": [{"field": None, "message": "Not found."}]}, status=404)
    return defaults.page_not_found(request, exception)


def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. Nothing else is checked, so a database outage does not
    get healthy web processes restarted."""
    return JsonResponse({"status": "ok"})


def _holds_token(request: HttpRequest, expected: str) -> bool:
    """``Authorization: Bearer <expected>``. Constant time, so the token cannot be guessed a
    character at a time; an empty setting means no token at all (compare_digest would say an
    empty one matches)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given_ok = hmac.compare_digest(given.strip().encode(), expected.encode())
    return bool(expected) and scheme.lower() == "bearer" and given_ok


def may_see_readiness_details(request: HttpRequest) -> bool:
    """The checks' texts and the tasks' results and errors describe the inside (exception
    types, what failed and why): only a staff session or the holder of CALLOPS_READYZ_TOKEN
    reads them. Everyone else, a load balancer too, needs only ready or not."""
    if _holds_token(request, settings.CALLOPS_READYZ_TOKEN):
        return True
    try:
        return bool(request.user.is_staff)
    except DatabaseError:
        return False  # the session is in the database, which is down: no details, no 500


def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: the database, the broker, and a beat heartbeat younger than the limit."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=0, timeout=1)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    heartbeat = None
    if checks["database"] == "ok":
        try:
            with transaction.atomic():  # a savepoint: a failed query must not poison the rest
                heartbeat = (
                    TaskRun.objects.filter(name="beat_heartbeat")
                    .values_list("last_finished_at", flat=True)
                    .first()
                )
        except DatabaseError as exc:  # reachable, but not migrated (or not readable)
            checks["database"] = f"schema not ready: {type(exc).__name__}"
    limit = settings.CALLOPS_HEARTBEAT_MAX_AGE
    if heartbeat is None:
        checks["beat"] = "no heartbeat yet"
    else:
        age = (timezone.now() - heartbeat).total_seconds()
        checks["beat"] = "ok" if age <= limit else f"last heartbeat {int(age)} s ago"
    ready = all(value == "ok" for value in checks.values())
    status = 200 if ready else 503
    answer = {"status": "ok" if ready else "unavailable"}
    if not may_see_readiness_details(request):
        return JsonResponse(answer, status=status)
    runs = (
        {
            run.name: {
                "last_finished_at": run.last_finished_at,
                "last_result": run.last_result,
                "last_error": run.last_error,
            }
            for run in TaskRun.objects.all()
        }
        if checks["database"] == "ok"
        else {}
    )
    return JsonResponse({**answer, "checks": checks, "tasks": runs}, status=status)


@functools.lru_cache(maxsize=4)
def _networks(entries: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def may_scrape(request: HttpRequest) -> bool:
    """The holder of CALLOPS_METRICS_TOKEN, or a client in CALLOPS_METRICS_ALLOWED_NETWORKS
    (matched against the connection's own address, not a forwarded one)."""
    if _holds_token(request, settings.CALLOPS_METRICS_TOKEN):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(
        address in net for net in _networks(tuple(settings.CALLOPS_METRICS_ALLOWED_NETWORKS))
    )


def prometheus_metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus' scrape. Not configured (no token, no networks): 404, as if absent, so a
    deployment that forgot to choose does not publish its traffic. Configured: 403 to others."""
    if not settings.CALLOPS_METRICS_TOKEN and not settings.CALLOPS_METRICS_ALLOWED_NETWORKS:
        return HttpResponse(status=404)
    if not may_scrape(request):
        return HttpResponse(status=403)
    return HttpResponse(gauges.metrics_render(), content_type=CONTENT_TYPE_LATEST)
