"""Middleware of the deployment, not of the product."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from callops import views


class HealthzMiddleware:
    """Answers ``/healthz`` before anything looks at the Host header.

    Liveness probes (the compose healthcheck, a load balancer, Kubernetes) address the process by
    its IP, which ``ALLOWED_HOSTS`` rightly refuses in production: validating the Host there would
    fail every probe with 400. Sending the right Host from each probe would tie every probe's
    definition to ``DJANGO_ALLOWED_HOSTS``. ``/healthz`` reads nothing and reveals nothing, so
    it alone is answered here, first; every other path, ``/readyz`` included, still goes through
    host validation.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info == "/healthz":
            return views.healthz(request)
        return self.get_response(request)
