"""gunicorn settings for the web process: ``gunicorn -c config/gunicorn.py config.wsgi``.

Sync workers: each request holds its worker until PostgreSQL has committed the webhook, so
keep a buffering proxy (or the load balancer) in front for slow clients. Command-line flags
override anything here.
"""

import contextlib
import ctypes
import gc
import importlib
import os
import sys

# Packages that some libraries import whenever they find them installed, for features the web
# process never uses: rich (structlog's pretty tracebacks; callops' formatter renders
# tracebacks itself, with format_exc_info), requests (DRF's RequestsClient, a test tool) and
# pygments (the highlighting of DRF's browsable API, which callops does not serve).
# Only the dev extras install them, so a production image never has them; marked absent here,
# before anything is imported, a worker of a development checkout holds what a production
# worker holds (~8 MiB of RSS less each, benchmarks/web_worker.py).
for _absent in ("rich", "requests", "pygments"):
    sys.modules.setdefault(_absent, None)

# Read the Django settings in the master, before any worker forks: a configuration mistake then
# stops gunicorn with its one sentence (config.settings.environment). Read only in the workers,
# it would kill each one as it boots and the master would start them again, forever.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.dev")
importlib.import_module(os.environ["DJANGO_SETTINGS_MODULE"])
# After the settings: they point prometheus-client at PROMETHEUS_MULTIPROC_DIR before it loads.
from callops import metrics  # noqa: E402

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
# Two per core. A webhook request waits for PostgreSQL's commit for about a quarter of its
# time with the database on the same host, longer across a network, so one worker per core
# leaves cores idle. On 2 cores shared with PostgreSQL (benchmarks/webhook_throughput.py),
# 4 workers stored ~5 % more webhooks per second than 2 on average (1,930 against 1,820/s),
# with a wider spread from run to run, and 5 (gunicorn's 2n+1) fewer than 2.
workers = int(os.environ.get("WEB_CONCURRENCY") or 2 * (os.cpu_count() or 1))
worker_class = "sync"
timeout = 30  # Telnyx gives up on a webhook after 2 s; a worker stuck 30 s is restarted
graceful_timeout = 20
# The app is imported once, in the master, and the workers fork with it: they share its pages
# (what each worker holds on its own, its USS, falls by about a third; benchmarks/web_worker.py
# prints RSS, PSS and USS), a worker restarted after a timeout serves at once instead of
# importing everything again, and an import error stops gunicorn with its traceback instead of
# failing every worker's boot. Nothing opens a connection at import (Django, Celery and Redis
# connect on first use, in the worker). The price: SIGHUP re-reads this file but not the code, so
# a deployment restarts the process, as a container does; GUNICORN_PRELOAD=false for HUP reloads.
preload_app = os.environ.get("GUNICORN_PRELOAD", "true").strip().lower() not in ("0", "false", "no")
# Behind a proxy, trust its X-Forwarded-* headers (set to the proxy's address, or "*" in a
# private network where only the proxy can reach the web process).
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def when_ready(server) -> None:
    """With ``preload_app`` (the app imported once, in the master), the objects it made are
    moved out of the garbage collector's sight before the workers fork: a collection in a worker
    would otherwise write to every one of them and copy each page it shares with the master."""
    if server.cfg.preload_app:
        gc.collect()
        gc.freeze()
        # What the imports freed is still resident in the C heap, and every worker would map
        # it from the fork on: handed back to the system first (glibc; elsewhere nothing).
        with contextlib.suppress(AttributeError, OSError):
            ctypes.CDLL(None).malloc_trim(0)


def post_worker_init(worker) -> None:
    metrics.process_started("web")


def child_exit(server, worker) -> None:
    """A worker's live gauges go with it (prometheus-client's multi-process mode); what it
    counted stays in its files and in /metrics' totals."""
    metrics.process_dead(worker.pid)
