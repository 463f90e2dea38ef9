"""The project's routes plus two benchmark-only views (see benchmarks/webhook_throughput.py)."""

import os

from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from callops import drain
from config.urls import urlpatterns as project_urlpatterns


# csrf_exempt like the webhook view, so both see the same middleware work for a POST.
@csrf_exempt
def bare(request: HttpRequest) -> HttpResponse:
    """The cheapest response Django can give: the baseline of the ratio."""
    return HttpResponse(b"ok")


def warm(request: HttpRequest) -> HttpResponse:
    """Ring the doorbell in this worker and answer its pid.

    A worker's first broker publish opens its broker connection and costs ~100 ms; the
    benchmark calls this until every worker has answered, so the phases measure steady state.
    """
    connection.ensure_connection()
    drain.flag_lower()
    drain.request()
    return HttpResponse(str(os.getpid()).encode())


urlpatterns = [
    path("bench/bare/", bare, name="bench-bare"),
    path("bench/warm/", warm, name="bench-warm"),
    *project_urlpatterns,
]
