"""The outbox under real worker processes: a fleet-wide rate limit, and a worker killed mid-send."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from callops.commands import command_create
from callops.models import Call, Command
from tests.helpers import wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def call(transactional_db):
    return Call.objects.create(call_control_id="v3:workers", status="answered")


def test_two_workers_together_keep_the_rate_limit(telnyx, call, settings, worker_processes):
    settings.TELNYX_RATE_LIMIT = 20
    telnyx.rate_limit = 20  # the simulator answers 429 to anything above 20 in a second
    worker_processes(count=2, concurrency=2)
    for _ in range(200):
        command_create(call=call, action="fork_stop", params={}, requested_by="operator")

    wait_for(lambda: Command.objects.filter(status="succeeded").count() == 200, timeout=30)
    sent = telnyx.requests
    span = sent[-1].monotonic - sent[0].monotonic
    assert 8.5 <= span <= 12.5, span  # 180 commands past the first second's 20, at 20/s
    assert telnyx.max_in_any_window(1.0) <= 20
    assert [r.status for r in sent].count(429) == 0
    assert len(sent) == 200


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_worker_killed_mid_send_loses_nothing_and_sends_once(
    telnyx, call, settings, worker_processes
):
    settings.TELNYX_TIMEOUT = 2.0  # the lease a dead sender holds: 2 * timeout + 2 s
    (worker,) = worker_processes(count=1, concurrency=1)
    # Telnyx receives and applies the command, but the answer takes 1.5 s to come back...
    telnyx.inject(status=200, body={"data": {"result": "ok"}}, delay=1.5, apply=True)
    command = command_create(
        call=call,
        action="streaming_start",
        params={"stream_url": "wss://a.example.com/s"},
        requested_by="operator",
    )
    wait_for(lambda: telnyx.call("v3:workers") and telnyx.call("v3:workers").streaming)
    # ...and the process waiting for it is killed before it arrives.
    (child,) = _children(worker.pid)
    os.kill(child, signal.SIGKILL)

    wait_for(lambda: Command.objects.get(pk=command.pk).status == "succeeded", timeout=20)
    command.refresh_from_db()
    assert command.attempts == 2
    attempts = [r for r in telnyx.requests if r.command_id == str(command.command_id)]
    assert len(attempts) == 2
    assert [r.duplicate for r in attempts] == [False, True]  # Telnyx applied it once
    time.sleep(1)
    assert len(telnyx.requests) == 2  # and it is never sent again
