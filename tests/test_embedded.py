"""The embedded default that ``./bin/run`` uses: SQLite and kombu's file broker, no services;
and ``manage.py runstack`` (what ``./bin/run`` runs) on ports of its own, from start to Ctrl-C.

The rest of the suite runs on PostgreSQL, where the webhook raises the drain flag inside its
INSERT. On SQLite the flag is raised by a second statement (``drain.after_store``); this runs
that path in a process of its own with the development settings and a scratch ``var/``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kombu import Connection

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os
import django
django.setup()
from django.test.utils import setup_test_environment
setup_test_environment()
from django.conf import settings
from django.core.management import call_command
from django.test import Client
from callops import drain, events
from callops.models import Call, DrainFlag, WebhookEvent
from telnyx_sim import Signer, dumps, envelope

call_command("migrate", verbosity=0)
signer = Signer()
settings.TELNYX_PUBLIC_KEYS = [signer.public_key]
client = Client()
queue = settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]

def post(kind):
    body = dumps(envelope(kind, "v3:embedded"))
    return client.post(
        "/webhooks/telnyx/", data=body, content_type="application/json",
        **signer.wsgi_headers(body),
    ).status_code

from config.celery_app import app
seen = {"vendor": django.db.connection.vendor}
with app.connection_for_write() as conn:
    seen["transport"] = type(conn.transport).__module__
seen["statuses"] = [post("call.initiated"), post("call.answered")]
seen["flag_up"] = DrainFlag.objects.get().requested_at is not None
seen["messages_after_burst"] = len(os.listdir(queue))
shard = drain.shard_of("v3:embedded")
applied = events.events_drain(shard=shard)
drain.after_batch(shard=shard, applied=applied)
seen["applied"] = applied
seen["flag_up_after_drain"] = DrainFlag.objects.get().requested_at is not None
seen["pending"] = WebhookEvent.objects.filter(status="pending").count()
seen["call"] = Call.objects.get().status
seen["statuses"].append(post("call.hangup"))
seen["messages_after_next"] = len(os.listdir(queue))
print(json.dumps(seen))
"""


def test_the_embedded_default_stores_rings_once_and_drains(tmp_path):
    ours = ("DJANGO_", "TELNYX_", "CALLOPS_", "DATABASE_URL", "REDIS_URL", "CELERY_", "CACHE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(DJANGO_SETTINGS_MODULE="config.settings.dev", CALLOPS_VAR_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["vendor"] == "sqlite"
    assert seen["transport"] == "config.embedded_broker"
    assert seen["statuses"] == [200, 200, 200]
    # Two events, one flag raised, one drain published for the burst.
    assert seen["flag_up"] is True
    assert seen["messages_after_burst"] == 1
    assert seen["applied"] == 2
    assert seen["flag_up_after_drain"] is False
    assert seen["pending"] == 0
    assert seen["call"] == "answered"
    # The flag is down again, so the next event publishes the next drain.
    assert seen["messages_after_next"] == 2
    assert (tmp_path / "callops.sqlite3").is_file()


def test_a_worker_never_reads_a_message_the_broker_is_still_writing(tmp_path):
    """kombu's own filesystem transport fails this within a few dozen messages."""
    folders = {name: tmp_path / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir()
    options = {
        "data_folder_in": str(folders["queue"]),
        "data_folder_out": str(folders["queue"]),
        "processed_folder": str(folders["processed"]),
        "control_folder": str(folders["control"]),
        "store_processed": False,
        "polling_interval": 0.0,
    }
    transport = "config.embedded_broker:Transport"
    count, received, errors = 500, [], []

    def consume() -> None:
        with Connection("filesystem://", transport=transport, transport_options=options) as conn:
            queue = conn.SimpleQueue("q")
            while len(received) < count:
                try:
                    message = queue.get(timeout=10)
                except queue.Empty:
                    return
                except Exception as exc:  # noqa: BLE001 - what the worker would die of
                    errors.append(repr(exc))
                    return
                received.append(message.payload["n"])
                message.ack()

    consumer = threading.Thread(target=consume)
    consumer.start()
    with Connection("filesystem://", transport=transport, transport_options=options) as conn:
        queue = conn.SimpleQueue("q")
        for n in range(count):
            queue.put({"n": n, "padding": "x" * 2000})
    consumer.join(timeout=60)
    assert errors == []
    assert sorted(received) == list(range(count))  # kombu orders by the millisecond only


# --- ./bin/run's stack, as a new user runs it -------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def processes_of(var_dir: Path) -> list[int]:
    """Processes whose environment points at this var/: the stack's, whatever their name."""
    mark = f"CALLOPS_VAR_DIR={var_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_the_stack_on_other_ports_streams_delivers_and_stops_cleanly(tmp_path):
    web, simulator, media, receiver = free_ports(4)
    ours = ("DJANGO_", "TELNYX_", "CALLOPS_", "DATABASE_URL", "REDIS_URL", "CELERY_", "CACHE_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(DJANGO_SETTINGS_MODULE="config.settings.dev", CALLOPS_VAR_DIR=str(tmp_path))
    argv = [
        sys.executable, "manage.py", "runstack", "--addr", f"127.0.0.1:{web}",
        "--simulator-port", str(simulator), "--media-port", str(media),
        "--receiver-port", str(receiver), "--calls-per-minute", "30", "--call-duration", "4",
        "--dials-per-minute", "0",
    ]  # fmt: skip
    stack = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stack.stdout), daemon=True)
    reader.start()

    def count(*words: str) -> int:
        return sum(all(word in line for word in words) for line in list(lines))

    def seen(*words: str) -> bool:
        return count(*words) > 0

    try:
        deadline = time.monotonic() + 90
        # A call streamed to the media sink on --media-port and ended, and the receiver on
        # --receiver-port got its end; then Ctrl-C while the next calls are live.
        while not (seen("partner", "media frames") and seen("webhooks", "call.ended", "verified")):
            assert stack.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.5)
        while count("partner", "started for") <= count("partner", "media frames"):
            assert stack.poll() is None and time.monotonic() < deadline, "\n".join(lines)
            time.sleep(0.2)  # until a stream is open: a call is live at Ctrl-C
    finally:
        stack.send_signal(signal.SIGINT)
        try:
            stack.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stack.kill()
        reader.join(timeout=10)
    output = "\n".join(lines)
    assert stack.returncode == 0, output

    # Nothing contradicts what the stack does, and nothing failed to reach anything.
    assert "callops.W00" not in output
    assert "Traceback" not in output
    assert "Connection refused" not in output and "ConnectionRefusedError" not in output
    assert "REJECTED" not in output
    assert f"ws://127.0.0.1:{media}/media" in output and "stream" in output
    assert not seen("media stream", "failed")
    assert seen("webhooks", f"http://127.0.0.1:{receiver}/", "endpoint")
    assert seen("export KEY=$(cat", str(tmp_path / "demo_partner_key"))
    # Stopped in order: the calls live at Ctrl-C were hung up and applied before callops went.
    assert seen("stopping: hanging up live calls")
    assert seen("calls of this run ended, every webhook applied")
    for name in ("web", "worker", "beat", "telnyx", "partner", "webhooks"):
        assert f"{name} stopped (exit 0)" in output, output
    assert processes_of(tmp_path) == []

    with sqlite3.connect(tmp_path / "callops.sqlite3") as db:
        calls = dict(db.execute("SELECT status, count(*) FROM callops_call GROUP BY status"))
        open_sessions = sum(
            db.execute(
                f"SELECT count(*) FROM callops_{table} WHERE status IN ('requested', 'active')"
            ).fetchone()[0]
            for table in ("mediastream", "transcription")
        )
        delivered = db.execute(
            "SELECT count(*) FROM callops_delivery WHERE status = 'succeeded'"
        ).fetchone()[0]
        undelivered = db.execute(
            "SELECT count(*) FROM callops_delivery WHERE status != 'succeeded'"
        ).fetchone()[0]
    assert set(calls) == {"ended"}, calls
    assert open_sessions == 0
    assert delivered > 0 and undelivered == 0
