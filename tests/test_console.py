"""The operators' console (dashboard, timeline, list pages) and the partner API's timeline and
transcript, through the real admin and the real API on real PostgreSQL and Redis."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from callops import commands, events, partner_delivery
from callops.models import (
    Call,
    Command,
    CommandAttempt,
    Delivery,
    MediaStream,
    TaskRun,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)
from tests.helpers import make_call, partner_with_key
from tests.telnyx_events import envelope

pytestmark = pytest.mark.usefixtures("fake_dns")
MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def staff(client, *codenames: str, superuser: bool = False):
    user_model = get_user_model()
    if superuser:
        user = user_model.objects.create_superuser("root", "root@example.com", "pw")
    else:
        user = user_model.objects.create_user("staff", password="pw", is_staff=True)
        perms = [c.split(".") for c in codenames]
        user.user_permissions.set(
            Permission.objects.filter(
                content_type__app_label__in=[a for a, _ in perms],
                codename__in=[c for _, c in perms],
            )
        )
    client.force_login(user)
    return client


# --- The timeline: a real call through signed webhooks, the API and the simulator -----------


@pytest.fixture
def acme(db):
    return partner_with_key("acme", "conn-1")


def test_it_merges_a_real_call_in_order_to_the_millisecond(acme, post_event, telnyx, client):
    partner, api = acme
    partner_delivery.webhook_endpoint_create(partner=partner, url="https://media.example.com/h")
    start = (timezone.now() - timedelta(seconds=60)).replace(microsecond=0)
    ccid = "v3:timeline"
    telnyx.add_call(ccid)

    def at(ms: int):
        return start + timedelta(milliseconds=ms)

    sent = [
        envelope("call.initiated", ccid, occurred_at=at(1), direction="incoming"),
        envelope("call.answered", ccid, occurred_at=at(1250)),
        envelope("call.dtmf.received", ccid, occurred_at=at(2345), digit="7"),
        envelope(
            "call.transcription",
            ccid,
            occurred_at=at(3456),
            transcription_data={"transcript": "hi", "is_final": True, "confidence": 0.9},
        ),
        envelope(
            "call.transcription",
            ccid,
            occurred_at=at(3400),
            transcription_data={"transcript": "h", "is_final": False},
        ),
    ]
    for body in reversed(sent):  # Telnyx's order is not ours to rely on
        assert post_event(body).status_code == 200
    events.events_drain()

    # A command through the partner API, sent to the simulator: a 500, then a success.
    telnyx.inject(status=500)
    answer = api.post(
        f"/api/v1/calls/{ccid}/streaming/",
        {"stream_url": "wss://media.example.com/s"},
        format="json",
    )
    assert answer.status_code == 202, answer.content
    command = Command.objects.get()
    assert commands.command_process(command_pk=command.pk).outcome.kind == "retry"
    Command.objects.filter(pk=command.pk).update(next_attempt_at=timezone.now())
    assert commands.command_process(command_pk=command.pk).outcome.kind == "succeeded"
    post_event(envelope("streaming.started", ccid, stream_url="wss://media.example.com/s"))
    events.events_drain()

    page = api.get(f"/api/v1/calls/{ccid}/timeline/").json()
    entries = page["results"]
    assert page["next"] is None
    assert all(MS.match(e["at"]) for e in entries)
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    kinds = [e["kind"] for e in entries]
    # Telnyx's events at their own times, the digit and the final segment (not the interim).
    stamp = {k: e["at"] for e, k in zip(entries, kinds, strict=True)}
    assert stamp["call.initiated"].endswith(f"{at(1).isoformat(timespec='milliseconds')[11:23]}Z")
    assert stamp["call.answered"][11:23] == at(1250).isoformat(timespec="milliseconds")[11:23]
    assert stamp["dtmf"][11:23] == at(2345).isoformat(timespec="milliseconds")[11:23]
    assert stamp["transcript.segment"][11:23] == at(3456).isoformat(timespec="milliseconds")[11:23]
    assert kinds[:6] == [
        "call.initiated",
        "call.answered",
        "dtmf",
        "transcription.requested",  # by the first (interim) segment, at its time
        "transcription.started",
        "transcript.segment",
    ]
    assert stamp["transcription.started"][11:23] == at(3400).isoformat()[11:23]
    # What callops did next, in the order it did it: the partner's events queued for its
    # endpoint, the stream asked for, the command's two attempts, Telnyx's confirmation.
    assert kinds[6:] == [
        *["delivery.pending"] * 4,
        "stream.requested",
        "command.created",
        "command.sent",
        "command.sent",
        "command.succeeded",
        "delivery.pending",  # command.succeeded, for the partner
        "streaming.started",
        "stream.started",
        "delivery.pending",  # stream.started, for the partner
    ]
    assert not {"call.transcription", "call.dtmf.received"} & set(kinds)  # shown as records
    assert kinds.count("transcript.segment") == 1  # the interim one is left out
    # The command: created, its two attempts, its success, each with the command's API URL.
    steps = [e for e in entries if e["source"] == "command"]
    assert [e["kind"] for e in steps] == [
        "command.created",
        "command.sent",
        "command.sent",
        "command.succeeded",
    ]
    assert re.search(r"attempt 1, HTTP 500 in \d+ ms \(retry\)", steps[1]["summary"])
    assert re.search(r"attempt 2, HTTP 200 in \d+ ms \(succeeded\)$", steps[2]["summary"])
    attempts = list(command.attempt_log.values_list("number", "http_status", "outcome"))
    assert attempts == [(1, 500, "retry"), (2, 200, "succeeded")]
    assert {e["url"] for e in steps} == {f"http://testserver/api/v1/commands/{command.command_id}/"}
    assert {e["id"] for e in steps} == {str(command.command_id)}
    assert "stream.requested" in kinds and "stream.started" in kinds
    # Deliveries to the partner's endpoint, one per partner event, each with its API URL.
    deliveries = [e for e in entries if e["source"] == "delivery"]
    assert len(deliveries) == Delivery.objects.count() >= 4
    assert all(e["url"].startswith("http://testserver/api/v1/deliveries/") for e in deliveries)
    answered = WebhookEvent.objects.get(event_type="call.answered")
    assert {"id": answered.event_id, "url": None}.items() <= entries[1].items()


def test_it_shows_another_partners_call_as_missing(acme, db):
    _, api = acme
    partner_with_key("other", "conn-other")
    make_call("v3:theirs", "conn-other")
    theirs = api.get("/api/v1/calls/v3:theirs/timeline/")
    missing = api.get("/api/v1/calls/v3:nobody/timeline/")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json() == missing.json()


def _segments(call: Call, count: int, *, final: bool = True) -> None:
    transcription = Transcription.objects.create(call=call, status="active")
    base = timezone.now() - timedelta(hours=1)
    TranscriptSegment.objects.bulk_create(
        TranscriptSegment(
            call=call,
            transcription=transcription,
            transcript=f"word {n}",
            is_final=final or n % 2 == 0,
            track="inbound",
            # Pairs share a millisecond: the cursor must tell them apart.
            occurred_at=base + timedelta(milliseconds=n // 2),
        )
        for n in range(count)
    )


def test_it_pages_through_every_entry_once(acme):
    _, api = acme
    call = make_call("v3:paged", "conn-1")
    _segments(call, 25)
    url = "/api/v1/calls/v3:paged/timeline/"
    seen, next_url = [], f"{url}?page_size=4"
    while next_url:
        page = api.get(next_url).json()
        assert len(page["results"]) <= 4
        seen += [(e["kind"], e["summary"], e["at"]) for e in page["results"]]
        next_url = page["next"]
    whole = api.get(url, {"page_size": 500}).json()["results"]
    assert seen == [(e["kind"], e["summary"], e["at"]) for e in whole]
    assert len(seen) == 25 + 1  # the segments, and the transcription's request


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"cursor": "bm9wZQ"}, "cursor"),
        ({"cursor": "\u00e9"}, "cursor"),
        ({"cursor": "MjAyNi0xMS0yNVQxODowMDowMHwwfDk5OTk5OTk5OTk5OTk5OTk5OTk5fDA"}, "cursor"),
        ({"page_size": "0"}, "page_size"),
        ({"page_size": "501"}, "page_size"),
        ({"page_size": "ten"}, "page_size"),
    ],
)
def test_it_refuses_a_bad_cursor_or_page_size_naming_it(acme, query, field):
    _, api = acme
    make_call("v3:bad", "conn-1")
    answer = api.get("/api/v1/calls/v3:bad/timeline/", query)
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["field"] == field


def test_it_costs_a_page_however_many_segments_the_call_has(acme, django_assert_max_num_queries):
    _, api = acme
    call = make_call("v3:long", "conn-1")
    _segments(call, 10_000)
    with django_assert_max_num_queries(12):  # auth, the call, one query per source
        page = api.get("/api/v1/calls/v3:long/timeline/").json()
    assert len(page["results"]) == 100 and page["next"]
    assert len(api.get(page["next"], {"page_size": 500}).json()["results"]) == 500


# --- The timeline in the admin ------------------------------------------------------------


def test_it_shows_the_timeline_in_the_admin_with_links(client, acme, post_event):
    for body in (envelope("call.initiated", "v3:adm"), envelope("call.answered", "v3:adm")):
        post_event(body)
    events.events_drain()
    call = Call.objects.get(call_control_id="v3:adm")
    operator = staff(client, "callops.view_call", "callops.view_webhookevent")
    change = operator.get(f"/admin/callops/call/{call.pk}/change/").content.decode()
    assert f'href="/admin/console/calls/{call.pk}/timeline/"' in change
    page = operator.get(f"/admin/console/calls/{call.pk}/timeline/")
    assert page.status_code == 200
    html = page.content.decode()
    answered = WebhookEvent.objects.get(event_type="call.answered")
    assert f'href="/admin/callops/webhookevent/{answered.pk}/change/"' in html
    assert re.search(r"<code>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}</code>", html)
    assert html.index("call.initiated") < html.index("call.answered")
    assert operator.get(f"/admin/console/calls/{call.pk}/timeline/?cursor=x").status_code == 400


def test_it_leaves_out_of_the_admin_timeline_what_the_user_may_not_view(db, client, post_event):
    post_event(envelope("call.initiated", "v3:partial"))
    events.events_drain()
    call = Call.objects.get()
    call.dtmf.create(digit="9", occurred_at=timezone.now())
    page = staff(client, "callops.view_call").get(f"/admin/console/calls/{call.pk}/timeline/")
    sources = {entry.source for _, entry, _ in page.context["rows"]}
    assert sources == {"dtmf"}  # the event needs view_webhookevent


def test_it_keeps_the_timeline_from_staff_who_may_not_view_calls(client, live_call):
    page = staff(client, "callops.view_command").get(
        f"/admin/console/calls/{live_call.pk}/timeline/"
    )
    assert page.status_code == 403


def test_it_sends_anonymous_visitors_to_the_login_page(client, live_call):
    for url in ("/admin/console/dashboard/", f"/admin/console/calls/{live_call.pk}/timeline/"):
        answer = client.get(url)
        assert answer.status_code == 302 and "/admin/login/" in answer["Location"]


# --- The dashboard ----------------------------------------------------------------------------


@pytest.fixture
def busy(db, live_call):
    """Something in every section of the dashboard."""
    now = timezone.now()
    Call.objects.create(call_control_id="v3:ringing", connection_id="conn-1")
    Call.objects.create(call_control_id="v3:over", status="ended")
    MediaStream.objects.create(call=live_call, status="active", started_at=now)
    MediaStream.objects.create(call=live_call, status="stopped", started_at=now, stopped_at=now)
    Command.objects.create(
        call=live_call,
        action="hangup",
        requested_by="operator",
        attempts=1,
        last_http_status=429,
        expires_at=now + timedelta(minutes=5),
    )
    Command.objects.create(
        call=live_call,
        action="streaming_start",
        requested_by="partner",
        status="failed",
        failure_reason="gave up after HTTP 503",
        expires_at=now,
    )
    hung_up = Command.objects.get(action="hangup")
    for minutes in (5, 90):  # a 429 of the last hour, and an older one
        CommandAttempt.objects.create(
            command=hung_up,
            number=1,
            sent_at=now - timedelta(minutes=minutes),
            answered_at=now - timedelta(minutes=minutes),
            http_status=429,
            outcome="retry",
        )
    for n, status in enumerate(("pending", "processed", "failed")):
        WebhookEvent.objects.create(
            event_id=f"evt-{n}",
            event_type="call.answered",
            occurred_at=now,
            payload={},
            status=status,
            received_at=now - timedelta(seconds=2),
            processed_at=now if status != "pending" else None,
        )
    interval = IntervalSchedule.objects.get_or_create(every=30, period="seconds")[0]
    PeriodicTask.objects.filter(name="callops: beat heartbeat").update(
        interval=interval, last_run_at=now
    )
    TaskRun.objects.create(name="beat_heartbeat", last_finished_at=now, runs=3)
    TaskRun.objects.create(name="purge_old_records", last_error="OperationalError: boom")
    return now


def test_it_shows_every_figure_to_a_superuser(client, busy, post_event):
    post_event(envelope("call.answered"), HTTP_TELNYX_SIGNATURE_ED25519="AAAA")
    operator = staff(client, superuser=True)
    index = operator.get("/admin/").content.decode()
    assert 'href="/admin/console/dashboard/"' in index
    page = operator.get("/admin/console/dashboard/")
    assert page.status_code == 200
    figures = page.context["figures"]
    assert figures["calls"]["in_progress"] == {"answered": 1, "initiated": 1}
    assert figures["calls"]["sessions"]["streams"] == {"active": 1}
    backlog = figures["commands"]["backlog"]
    assert (backlog["total"], backlog["retrying"], backlog["after_429"]) == (1, 1, 1)
    assert figures["commands"]["failed"] == [
        {"action": "streaming_start", "failure_reason": "gave up after HTTP 503", "n": 1}
    ]
    assert figures["commands"]["rate_limit_paused_for"] == 0
    assert figures["commands"]["answered_429"] == 1
    assert figures["events"]["pending"] == 1
    assert figures["events"]["failed"] == [{"event_type": "call.answered", "n": 1}]
    assert figures["events"]["lag"].p50 == pytest.approx(2, abs=0.01)
    ((kind, count, latest),) = figures["events"]["rejections"]
    assert (kind, count) == ("signature", 1) and "signature" in latest
    tasks = dict(figures["tasks"]["periodic"])
    heartbeat = next(t for t in tasks if t.name == "callops: beat heartbeat")
    assert tasks[heartbeat].runs == 3 and heartbeat.last_run_at == busy
    html = page.content.decode()
    assert "OperationalError: boom" in html and "gave up after HTTP 503" in html
    hung_up = Command.objects.get(action="hangup")
    attempts = operator.get(f"/admin/callops/command/{hung_up.pk}/change/").content.decode()
    shown = re.findall(r'field-http_status">\s*<p>(\d+)</p>', attempts)
    assert shown == ["429", "429"]  # each attempt on the command's page


def test_it_counts_partner_delivery_backlog(client, acme, live_call):
    partner, _ = acme
    endpoint = partner_delivery.webhook_endpoint_create(
        partner=partner, url="https://media.example.com/h"
    )
    from callops.models import PartnerEvent

    now = timezone.now()
    for n, status in enumerate(("pending", "failed", "dead", "succeeded")):
        event = PartnerEvent.objects.create(
            partner=partner,
            call=live_call,
            type="call.answered",
            source_key=f"k{n}",
            occurred_at=now,
        )
        Delivery.objects.create(
            event=event,
            endpoint=endpoint,
            call=live_call,
            status=status,
            expires_at=now,
            next_attempt_at=now - timedelta(minutes=5),
        )
    figures = staff(client, "callops.view_delivery").get("/admin/console/dashboard/")
    deliveries = figures.context["figures"]["deliveries"]
    assert (deliveries["backlog"]["total"], deliveries["backlog"]["retrying"]) == (2, 1)
    assert deliveries["backlog"]["overdue"] == 2 and deliveries["dead_last_hour"] == 1


def test_it_shows_only_the_sections_a_user_may_view(client, busy):
    page = staff(client, "callops.view_command").get("/admin/console/dashboard/")
    assert page.status_code == 200
    assert set(page.context["figures"]) == {"commands", "now"}
    html = page.content.decode()
    assert 'id="commands"' in html and 'id="events"' not in html and 'id="calls"' not in html


def test_it_tells_a_user_without_any_view_permission_so(client, busy):
    page = staff(client).get("/admin/console/dashboard/")
    assert page.status_code == 200
    assert "You may not view any of the records" in page.content.decode()


def test_it_keeps_the_dashboard_from_non_staff(client, db):
    user = get_user_model().objects.create_user("someone", password="pw")
    client.force_login(user)
    answer = client.get("/admin/console/dashboard/")
    assert answer.status_code == 302 and "/admin/login/" in answer["Location"]


# --- List pages -------------------------------------------------------------------------------


def test_it_lists_streams_with_filters_durations_and_links(client, live_call):
    started = timezone.now() - timedelta(seconds=75)
    stream = MediaStream.objects.create(
        call=live_call,
        status="stopped",
        stream_id="st-1",
        started_at=started,
        stopped_at=started + timedelta(seconds=62.5),
    )
    command = Command.objects.create(
        call=live_call,
        action="streaming_start",
        requested_by="partner",
        stream=stream,
        expires_at=started,
    )
    other = Call.objects.create(call_control_id="v3:elsewhere", status="answered")
    MediaStream.objects.create(call=other, status="active", started_at=started)
    operator = staff(client, superuser=True)
    page = operator.get(
        "/admin/callops/mediastream/",
        {"status__exact": "stopped", "call__id__exact": live_call.pk},
    )
    assert page.status_code == 200
    assert [s.pk for s in page.context["cl"].result_list] == [stream.pk]
    html = page.content.decode()
    assert "0:01:02.5" in html  # the duration
    assert f'href="/admin/callops/call/{live_call.pk}/change/"' in html
    assert f'href="/admin/callops/command/{command.pk}/change/"' in html
    assert started.strftime("%Y-%m-%d %H:%M:%S") in html  # to the second
    found = operator.get("/admin/callops/mediastream/", {"q": "v3:elsewhere"})
    assert [s.call_id for s in found.context["cl"].result_list] == [other.pk]
    assert "(running)" in found.content.decode()


@pytest.mark.parametrize("model", ["fork", "transcription", "transcriptsegment", "dtmfdigit"])
def test_it_lists_forks_transcriptions_segments_and_digits(client, live_call, model):
    transcription = Transcription.objects.create(call=live_call, status="active")
    event = WebhookEvent.objects.create(
        event_id="evt-seg", event_type="call.transcription", occurred_at=timezone.now(), payload={}
    )
    TranscriptSegment.objects.create(
        call=live_call,
        transcription=transcription,
        transcript="hello",
        is_final=True,
        occurred_at=timezone.now(),
        event=event,
    )
    live_call.forks.create(status="active", started_at=timezone.now())
    live_call.dtmf.create(digit="4", occurred_at=timezone.now())
    operator = staff(client, superuser=True)
    listing = operator.get(f"/admin/callops/{model}/")
    assert listing.status_code == 200
    assert len(listing.context["cl"].result_list) == 1
    assert f'href="/admin/callops/call/{live_call.pk}/change/"' in listing.content.decode()
    for query in ({"q": "v3:live-call"}, {"call__id__exact": live_call.pk}):
        assert len(operator.get(f"/admin/callops/{model}/", query).context["cl"].result_list) == 1
    if model == "transcriptsegment":
        assert f'href="/admin/callops/webhookevent/{event.pk}/change/"' in listing.content.decode()
        finals = operator.get(f"/admin/callops/{model}/", {"is_final__exact": "0"})
        assert len(finals.context["cl"].result_list) == 0
    else:
        assert operator.get(f"/admin/callops/{model}/", {"occurred_at__gte": "2000-01-01"})


# --- The transcript API -----------------------------------------------------------------------


def test_it_pages_the_transcript_and_gives_text_the_finals(acme):
    _, api = acme
    call = make_call("v3:words", "conn-1")
    _segments(call, 6, final=False)  # 0, 2 and 4 are final
    url = "/api/v1/calls/v3:words/transcript/"
    first = api.get(url, {"page_size": 4}).json()
    assert [s["transcript"] for s in first["results"]] == [f"word {n}" for n in range(4)]
    rest = api.get(first["next"]).json()
    assert [s["transcript"] for s in rest["results"]] == ["word 4", "word 5"]
    text = api.get(url, {"format": "txt", "page_size": 2})
    assert [line.rsplit(": ", 1)[1] for line in text.content.decode().splitlines()] == [
        "word 0",
        "word 2",
    ]
    next_text = re.fullmatch(r'<(.+)>; rel="next"', text["Link"]).group(1)
    assert api.get(next_text).content.decode().endswith("inbound: word 4\n")
    every = api.get(url, {"format": "txt", "final_only": "false"}).content.decode()
    assert every.count("\n") == 6
    refused = api.get(url, {"format": "txt", "final_only": "yes please"})
    assert refused.status_code == 400 and "final_only" in refused.content.decode()
    assert api.get(url, {"final_only": "nope"}).json()["errors"][0]["field"] == "final_only"


@pytest.mark.django_db
def test_it_bounds_an_admin_lists_count_and_says_so(client, settings):
    from django.db import connection

    settings.CALLOPS_ADMIN_COUNT_LIMIT = 5
    staff(client, superuser=True)
    for i in range(8):
        make_call(f"v3:count-{i}", "conn-count")
    # No statistics yet (autovacuum may not have run): the count stops at the limit.
    with connection.cursor() as cursor:
        cursor.execute("UPDATE pg_class SET reltuples = -1 WHERE relname = 'callops_call'")
    page = client.get("/admin/callops/call/").content.decode()
    assert "more than 5 calls" in page
    # With the planner's estimate the unfiltered list says "about N", without counting.
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE callops_call")
    page = client.get("/admin/callops/call/").content.decode()
    assert "about 8 calls" in page
    # Few enough to count: the exact number, as the admin always said.
    settings.CALLOPS_ADMIN_COUNT_LIMIT = 100
    page = client.get("/admin/callops/call/").content.decode()
    assert re.search(r"\b8 calls\b", page) and "about" not in page.split("paginator")[-1][:200]
