"""Middleware of the deployment, not of the product."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from django.contrib.messages import middleware as messages_middleware
from django.contrib.messages.storage import default_storage
from django.http import HttpRequest, HttpResponse
from django.utils.functional import SimpleLazyObject, empty

from callops import logs, views


class HealthzMiddleware:
    """Answers ``/healthz`` before anything looks at the Host header.

    Liveness probes (the compose healthcheck, a load balancer, Kubernetes) address the process by
    its IP, which ``ALLOWED_HOSTS`` rightly refuses in production: validating the Host there would
    fail every probe with 400. Sending the right Host from each probe would tie every probe's
    definition to ``DJANGO_ALLOWED_HOSTS``. ``/healthz`` reads nothing and reveals nothing, so
    it is answered here, first; so is ``/metrics``, which Prometheus scrapes by address and which
    guards itself (``callops.views.prometheus_metrics``). Every other path, ``/readyz``
    included, still goes through host validation.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info == "/healthz":
            return views.healthz(request)
        if request.path_info == "/metrics":
            # Prometheus scrapes each process by its address too; the view has its own guard
            # (a token or the allowed networks).
            return views.prometheus_metrics(request)
        return self.get_response(request)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class LogContextMiddleware:
    """Every log line of a request carries its request id: the proxy's ``X-Request-ID`` when it
    sent a plain one, else a new one, answered in the response's ``X-Request-ID``. It is the
    correlation id of what the request starts, unless the view binds another (a webhook: its
    Telnyx event id; ``callops.logs``)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        # META, not request.headers: that builds a dict of every header, on every request.
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = given if given and _REQUEST_ID.fullmatch(given) else os.urandom(16).hex()
        # Cleared here, not after: Django logs a 4xx or 5xx once the middleware has returned,
        # and that line belongs to this request too.
        logs.clear()
        logs.bind(request_id=request_id)
        response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response


class MessageMiddleware(messages_middleware.MessageMiddleware):
    """Django's messages middleware, with each request's message storage made when it is first
    used instead of for every request.

    The stock middleware makes it up front: a cookie storage with its signer and a session
    storage, for every webhook too, which never shows a message (measured: ~7 us in a hot loop,
    about a twentieth of a webhook's CPU in a busy gunicorn worker). The admin's pages see no
    difference: adding a message, or a template reading them, makes the storage then, and the
    response stores what is left, as before.
    """

    def process_request(self, request: HttpRequest) -> None:
        request._messages = SimpleLazyObject(lambda: default_storage(request))

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        messages = getattr(request, "_messages", None)
        if isinstance(messages, SimpleLazyObject) and messages._wrapped is empty:
            return response  # never looked at: nothing to store
        return super().process_response(request, response)
