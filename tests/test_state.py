"""The one rule for a session's status, in Python and in SQL, gives the same answer."""

from __future__ import annotations

import itertools

import pytest

from callops import state
from callops.models import Call, MediaStream
from tests.telnyx_events import T0

FACTS = list(itertools.product(["", "refused"], [None, T0], [None, T0]))


@pytest.mark.django_db
def test_the_sql_status_rule_is_the_python_one_for_every_combination_of_facts():
    call = Call.objects.create(call_control_id="v3:state")
    streams = [
        MediaStream.objects.create(
            call=call,
            failure_reason=failure,
            stopped_at=stopped,
            started_at=started,
            status="bogus",  # whatever was there, the rule overwrites it
        )
        for failure, stopped, started in FACTS
    ]
    MediaStream.objects.update(status=state.session_status_sql())
    for stream in streams:
        stream.refresh_from_db()
        expected = state.session_status(
            failure_reason=stream.failure_reason,
            stopped_at=stream.stopped_at,
            started_at=stream.started_at,
        )
        assert stream.status == expected
    assert {s.status for s in streams} == {"requested", "active", "stopped", "failed"}


@pytest.mark.django_db
def test_the_sql_rule_judges_the_facts_an_update_writes_not_the_old_ones():
    call = Call.objects.create(call_control_id="v3:state-new")
    stream = MediaStream.objects.create(call=call, started_at=T0, status="active")
    state.sessions_fail_unstarted(MediaStream.objects.all(), reason="never started", at=T0)
    stream.refresh_from_db()
    assert stream.status == "active"  # started: not "unstarted", untouched
    MediaStream.objects.update(started_at=None, status="requested")
    state.sessions_fail_unstarted(MediaStream.objects.all(), reason="never started", at=T0)
    stream.refresh_from_db()
    assert (stream.status, stream.failure_reason, stream.stopped_at) == (
        "failed",
        "never started",
        T0,
    )
