"""The embedded default that ``./bin/run`` uses: SQLite and kombu's file broker, no services.

The rest of the suite runs on PostgreSQL, where the webhook raises the drain flag inside its
INSERT. On SQLite the flag is raised by a second statement (``drain.after_store``); this runs
that path in a process of its own with the development settings and a scratch ``var/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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

seen = {"vendor": django.db.connection.vendor}
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
