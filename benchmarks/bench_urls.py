"""The project's routes plus benchmark-only views (see benchmarks/webhook_throughput.py and
benchmarks/web_worker.py)."""

import ctypes
import gc
import os
import sys
import tracemalloc

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from callops import drain, queue
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


_published = [0]
_publish = queue.publish


def _counted_publish(*args, **kwargs) -> None:
    _published[0] += 1
    _publish(*args, **kwargs)


# Counted from the first request on (this module is loaded with the URLconf): every drain
# publish goes through callops.queue.publish, which callops.drain looks up on each call.
queue.publish = _counted_publish


_snapshots: list = []


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def worker(request: HttpRequest) -> JsonResponse:
    """This worker's pid, the modules it has imported and the publishes it has made.

    ``?trim=1``: first collect garbage and hand the C heap's free memory back to the system
    (glibc's ``malloc_trim``), and say by how much that lowered the RSS: memory the worker
    holds but does not use."""
    trimmed = None
    if request.GET.get("trim"):
        before = _rss_kib()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        trimmed = (before - _rss_kib()) / 1024
    names = sorted(name for name, module in sys.modules.items() if module is not None)
    allocated = []
    if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC set: what the heap holds, by file
        snapshot = tracemalloc.take_snapshot()
        if request.GET.get("since") and _snapshots:  # what it holds more than at ?mark=1
            stats = snapshot.compare_to(_snapshots[-1], "filename")
        else:
            stats = snapshot.statistics("filename")
        if request.GET.get("mark"):
            _snapshots[:] = [snapshot]
        allocated = [
            (stat.traceback[0].filename, getattr(stat, "size_diff", stat.size))
            for stat in stats[:40]
        ]
    return JsonResponse(
        {
            "pid": os.getpid(),
            "modules": len(names),
            "names": names,
            "telnyx": [name for name in names if name.split(".")[0] == "telnyx"],
            "publishes": _published[0],
            "allocated": allocated,
            "trimmed_mib": trimmed,
        }
    )


urlpatterns = [
    path("bench/bare/", bare, name="bench-bare"),
    path("bench/warm/", warm, name="bench-warm"),
    path("bench/worker/", worker, name="bench-worker"),
    *project_urlpatterns,
]
