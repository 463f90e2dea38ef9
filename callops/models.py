"""What callops knows about Telnyx calls, and every authentic webhook it was told.

The records are derived from events that may arrive late, twice or out of order, so every field
that events set is written as a join in a small lattice (see ``callops.state``): times are
``min``/``max`` of what was reported, statuses only move up their rank, and last-writer-wins
fields carry the ``occurred_at`` that set them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from django.db import models
from django.db.models.functions import Now
from django.utils import timezone

from callops import lookups
from callops.actions import ACTIONS, STOPS
from callops.telnyx_params import REJECT_CAUSES


class WebhookEvent(models.Model):
    """One authentic Telnyx event, stored once however often it was delivered."""

    class Status(models.TextChoices):
        PENDING = "pending"
        PROCESSED = "processed"
        IGNORED = "ignored"
        FAILED = "failed"

    # db_default lets the webhook view insert with one raw statement (see callops.webhooks).
    # Unique and indexed through Meta, not unique=True / db_index=True: on PostgreSQL those also
    # build a varchar_pattern_ops copy of each index for LIKE queries, which nothing here runs,
    # and every webhook INSERT would pay for both (random keys: a page written per insert).
    event_id = models.CharField("Telnyx event id", max_length=100)
    event_type = models.CharField(max_length=100)
    occurred_at = models.DateTimeField()
    call_control_id = models.CharField(max_length=255, blank=True)
    payload = models.JSONField(help_text="The whole delivered envelope: data and meta.")
    received_at = models.DateTimeField(default=timezone.now, db_default=Now())
    delivery_count = models.PositiveIntegerField(default=1, db_default=1)
    last_attempt = models.PositiveIntegerField(null=True, blank=True, help_text="meta.attempt")
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_default=Status.PENDING
    )
    error = models.TextField(blank=True, default="", db_default="")
    processed_at = models.DateTimeField(null=True, blank=True)
    # Which drain applies it (callops.drain): every event of a call has the same shard, so
    # events of one call are applied by one drain at a time while shards run in parallel.
    shard = models.PositiveSmallIntegerField(default=0, db_default=0)
    # 0: the call's lifecycle (applied first under a backlog), 1: transcript segments.
    priority = models.PositiveSmallIntegerField(default=0, db_default=0)

    class Meta:
        indexes = [
            # The drains and the sweeper look only at pending events: a partial index keeps
            # their cost proportional to the backlog, not to the table. In claim order.
            models.Index(
                fields=["shard", "priority", "received_at"],
                condition=models.Q(status="pending"),
                name="webhookevent_claim_idx",
            ),
            # The admin's list: newest first, its date filter and date drill-down.
            models.Index(fields=["received_at"], name="webhookevent_received_idx"),
            models.Index(fields=["status", "received_at"], name="webhookevent_status_idx"),
            models.Index(fields=["event_type", "received_at"], name="webhookevent_type_idx"),
            # A call's events of some types (a stream's starts and stops): one index answers
            # both conditions, so no plan intersects it with a whole-table type index.
            models.Index(
                fields=["call_control_id", "event_type"], name="webhookevent_call_type_idx"
            ),
        ]
        constraints = [
            # The webhook's INSERT ... ON CONFLICT (event_id) relies on it.
            models.UniqueConstraint(fields=["event_id"], name="webhookevent_event_id_uniq"),
        ]
        ordering = ["-received_at"]
        # Replaying applies an event again: it changes calls, so it is not part of "view".
        permissions = [("replay_webhookevent", "Can replay webhook events")]

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id}"

    @property
    def data(self) -> dict:
        data = self.payload.get("data") if isinstance(self.payload, dict) else None
        return data if isinstance(data, dict) else {}

    @property
    def body(self) -> dict:
        """``data.payload``: the event-specific part of the envelope."""
        body = self.data.get("payload")
        return body if isinstance(body, dict) else {}


class Call(models.Model):
    class Status(models.TextChoices):
        INITIATED = "initiated"
        ANSWERED = "answered"
        ENDED = "ended"

    STATUS_RANK = {Status.INITIATED: 0, Status.ANSWERED: 1, Status.ENDED: 2}

    call_control_id = models.CharField(max_length=255, unique=True)
    call_leg_id = models.CharField(max_length=255, blank=True, default="")
    call_session_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    connection_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    direction = models.CharField(max_length=32, blank=True, default="")
    from_number = models.CharField("from", max_length=255, blank=True, default="", db_index=True)
    to_number = models.CharField("to", max_length=255, blank=True, default="", db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.INITIATED)
    started_at = models.DateTimeField(null=True, blank=True, db_index=True)
    answered_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    # When the (earliest) call.hangup says it ended: its time and cause win over what a command
    # learned from "call has already ended", whichever arrives first.
    hangup_at = models.DateTimeField(null=True, blank=True, editable=False)
    hangup_cause = models.CharField(max_length=64, blank=True, default="")
    hangup_source = models.CharField(max_length=32, blank=True, default="")
    sip_hangup_cause = models.CharField(max_length=16, blank=True, default="")
    call_quality_stats = models.JSONField(null=True, blank=True, help_text="From call.hangup.")
    # call.machine.detection.ended: human, machine or not_sure (dialed calls that asked for it).
    machine_detection = models.CharField(max_length=32, blank=True, default="")
    machine_detection_at = models.DateTimeField(null=True, blank=True, editable=False)
    client_state = models.TextField(blank=True, default="")
    client_state_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_event_at = models.DateTimeField(null=True, blank=True)
    # Set when the answered-call policy issued its commands: once per call, however often
    # call.answered is delivered or replayed.
    autostarted_at = models.DateTimeField(null=True, blank=True, editable=False)
    # Set when the incoming-call policy answered or rejected it: once per call, likewise.
    answer_decided_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The last ``PartnerEvent.sequence`` given out for this call (callops.partner_events):
    # incremented with the call's row lock held, in the transaction that records the fact.
    partner_event_seq = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"], name="call_status_idx")]
        # Calls are never edited (they are what Telnyx said), so "change" does not fit sending
        # them commands: answer, reject, hang up, stop streaming / forking / transcription.
        permissions = [("act_on_call", "Can send commands to calls")]

    def __str__(self) -> str:
        return self.call_control_id

    @property
    def is_ended(self) -> bool:
        return self.status == self.Status.ENDED

    @property
    def awaits_machine_detection(self) -> bool:
        """Dialed with machine detection, and its result has not arrived yet."""
        if self.machine_detection:
            return False
        return any(
            c.action == "dial"
            and c.params.get("answering_machine_detection", "disabled") not in ("", "disabled")
            for c in self.commands.all()
        )

    @property
    def is_awaiting_dial(self) -> bool:
        """Dialed by callops, and Telnyx has not yet said which call it placed."""
        return self.call_control_id.startswith(DIAL_PLACEHOLDER)


# A dialed call's id until Telnyx's answer names it: "dialing:<command_id>".
DIAL_PLACEHOLDER = "dialing:"


class CallSession(models.Model):
    """What a media stream, a fork and a transcription share: a lifecycle on one call.

    ``status`` is never set by hand: ``callops.state`` derives it from the facts (started,
    stopped, failed), so applying the same facts in any order gives the same status, and a
    terminal status cannot go back because facts are only ever added.
    """

    class Status(models.TextChoices):
        REQUESTED = "requested"
        ACTIVE = "active"
        STOPPED = "stopped"
        FAILED = "failed"

    status = models.CharField(max_length=16, default=Status.REQUESTED)
    failure_reason = models.TextField(blank=True, default="")
    requested_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    # started_at + the maximum duration (the partner's profile, else the global setting): the
    # stale-session sweeper finds what to stop with an index range scan on this.
    stop_after = models.DateTimeField(null=True, blank=True, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True

    @classmethod
    def sweep_indexes(cls, prefix: str) -> list[models.Index]:
        """Partial indexes for the sweeper: cost grows with the stale rows, not the table."""
        return [
            models.Index(
                fields=["stop_after"],
                condition=models.Q(status="active"),
                name=f"{prefix}_overdue_idx",
            ),
            models.Index(
                fields=["requested_at"],
                condition=models.Q(status="requested"),
                name=f"{prefix}_unstarted_idx",
            ),
        ]


class MediaStream(CallSession):
    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="streams")
    stream_id = models.CharField(max_length=255, blank=True, default="", db_index=True)
    stream_url = models.CharField(max_length=2048, blank=True, default="")
    track = models.CharField(max_length=32, blank=True, default="")
    codec = models.CharField(max_length=16, blank=True, default="")
    status = models.CharField(
        max_length=16, choices=CallSession.Status.choices, default=CallSession.Status.REQUESTED
    )

    class Meta:
        ordering = ["requested_at", "id"]
        indexes = [
            models.Index(fields=["status", "started_at"], name="mediastream_status_idx"),
            *CallSession.sweep_indexes("mediastream"),
        ]

    def __str__(self) -> str:
        return f"stream {self.stream_id or self.pk} ({self.status})"


class Fork(CallSession):
    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="forks")
    rx = models.CharField(max_length=255, blank=True, default="")
    tx = models.CharField(max_length=255, blank=True, default="")
    target = models.CharField(max_length=255, blank=True, default="")
    stream_type = models.CharField(max_length=16, blank=True, default="")
    status = models.CharField(
        max_length=16, choices=CallSession.Status.choices, default=CallSession.Status.REQUESTED
    )

    class Meta:
        ordering = ["requested_at", "id"]
        indexes = [
            models.Index(fields=["status", "started_at"], name="fork_status_idx"),
            *CallSession.sweep_indexes("fork"),
        ]

    def __str__(self) -> str:
        return f"fork {self.pk} ({self.status})"


class Transcription(CallSession):
    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="transcriptions")
    engine = models.CharField(max_length=32, blank=True, default="")
    tracks = models.CharField(max_length=16, blank=True, default="")
    engine_config = models.JSONField(default=dict, blank=True)
    # "failed" only when Telnyx refused transcription_start: Telnyx sends no transcription
    # failure event.
    status = models.CharField(
        max_length=16, choices=CallSession.Status.choices, default=CallSession.Status.REQUESTED
    )

    class Meta:
        ordering = ["requested_at", "id"]
        indexes = [
            models.Index(fields=["status", "started_at"], name="transcription_status_idx"),
            *CallSession.sweep_indexes("transcription"),
        ]

    def __str__(self) -> str:
        return f"transcription {self.pk} ({self.status})"


class TranscriptSegment(models.Model):
    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="segments")
    transcription = models.ForeignKey(
        Transcription, on_delete=models.CASCADE, related_name="segments"
    )
    transcript = models.TextField(blank=True, default="")
    confidence = models.FloatField(null=True, blank=True)
    is_final = models.BooleanField(default=False)
    track = models.CharField(max_length=16, blank=True, default="")
    occurred_at = models.DateTimeField(db_index=True)
    # One segment per source event: a duplicate delivery can never add a second one. The event
    # may be purged before the segment (different retention), hence SET_NULL.
    event = models.OneToOneField(
        WebhookEvent, null=True, blank=True, on_delete=models.SET_NULL, related_name="segment"
    )

    class Meta:
        ordering = ["occurred_at", "id"]

    def __str__(self) -> str:
        return self.transcript[:60]


class DtmfDigit(models.Model):
    """A digit the caller pressed (``call.dtmf.received``), on the call's timeline."""

    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="dtmf")
    digit = models.CharField(max_length=8)
    occurred_at = models.DateTimeField()
    # One digit per source event, however often it was delivered (as for transcript segments).
    event = models.OneToOneField(
        WebhookEvent, null=True, blank=True, on_delete=models.SET_NULL, related_name="dtmf"
    )

    class Meta:
        ordering = ["occurred_at", "id"]
        verbose_name = "DTMF digit"

    def __str__(self) -> str:
        return self.digit


class Command(models.Model):
    """One call-control command to Telnyx: the outbox row a Celery task sends, retries or drops.

    ``command_id`` is fixed at creation and sent on every attempt, so Telnyx ignores a repeat
    within its 60 s window; beyond it, ``status`` is our guard: a succeeded command is never
    claimed again.
    """

    # Declared in callops.actions: one entry per Telnyx action.
    Action = models.TextChoices("Action", [(name.upper(), name) for name in ACTIONS])

    class Status(models.TextChoices):
        QUEUED = "queued"
        SENDING = "sending"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class RequestedBy(models.TextChoices):
        PARTNER = "partner"
        OPERATOR = "operator"
        POLICY = "policy"
        SCHEDULE = "schedule"

    call = models.ForeignKey(Call, on_delete=models.CASCADE, related_name="commands")
    action = models.CharField(max_length=32, choices=Action.choices)
    params = models.JSONField(default=dict, blank=True)
    command_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    client_state = models.TextField(blank=True, default="")
    requested_by = models.CharField(max_length=16, choices=RequestedBy.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    # While ``sending``, the claim is held until this time; a worker that died mid-send leaves
    # it to expire and the command is claimed again (with the same command_id).
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Retrying stops once this passes ("gave up"); an operator's retry starts a new window.
    expires_at = models.DateTimeField()
    last_http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=16, blank=True, default="")
    error_title = models.CharField(max_length=255, blank=True, default="")
    error_detail = models.TextField(blank=True, default="")
    failure_reason = models.CharField(max_length=255, blank=True, default="")
    stream = models.ForeignKey(
        MediaStream, null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    fork = models.ForeignKey(
        Fork, null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    transcription = models.ForeignKey(
        Transcription, null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)
    # The first attempt: Telnyx ignores a repeat of its command_id only within 60 s of it.
    first_sent_at = models.DateTimeField(null=True, blank=True)
    # An attempt may have reached Telnyx without its answer reaching us (a timeout, a reset, a
    # 5xx, a worker lost mid-send): what Telnyx did is unknown until its webhooks say.
    outcome_unknown = models.BooleanField(default=False)
    # How an unknown outcome was settled, and why (see callops.commands.command_settle).
    settlement = models.CharField(max_length=255, blank=True, default="")
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The repair task looks only at unfinished commands.
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status__in=["queued", "sending"]),
                name="command_unfinished_idx",
            ),
            models.Index(fields=["status", "created_at"], name="command_status_idx"),
        ]
        # Retry and cancel, not "change": the admin never edits a command's fields.
        permissions = [("act_on_command", "Can retry and cancel commands")]
        # At most one stop in flight per stream, fork or transcription, however many sweepers,
        # operators and partners ask at once: the database refuses the second.
        constraints = [
            models.UniqueConstraint(
                fields=[record],
                condition=models.Q(action=stop.name, status__in=["queued", "sending"]),
                name=f"one_open_{stop.name}",
            )
            for record, stop in STOPS.items()
        ]

    def __str__(self) -> str:
        return f"{self.action} on {self.call_id} ({self.status})"

    @property
    def last_error(self) -> str:
        parts = [self.failure_reason, self.error_code, self.error_title]
        return " ".join(p for p in parts if p)


class Partner(models.Model):
    """A system that drives its own calls over the REST API: it owns Telnyx connection ids."""

    name = models.CharField(max_length=100, unique=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    # DRF's IsAuthenticated asks the authenticated principal this.
    is_authenticated = True

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def calls(self) -> models.QuerySet[Call]:
        """The calls this partner owns: those on its connection ids, and no other."""
        return Call.objects.filter(
            connection_id__in=PartnerConnection.objects.filter(partner=self).values("connection_id")
        )


class PartnerConnection(models.Model):
    """A Telnyx Call Control App id; its calls belong to the partner."""

    partner = models.ForeignKey(Partner, on_delete=models.CASCADE, related_name="connections")
    connection_id = models.CharField(max_length=255, unique=True)

    def __str__(self) -> str:
        return self.connection_id


class ApiKey(models.Model):
    """A partner's API key. Only a SHA-256 of the key is stored; the key is shown once.

    Keys are 256 random bits, so a fast hash is enough (no password stretching needed); the
    prefix finds the row without scanning, and the hash is compared in constant time.
    """

    partner = models.ForeignKey(Partner, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True, default="")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    hashed_key = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]
        # Not "add": a new key reads every call of its partner, so it is granted on its own.
        permissions = [("create_api_key", "Can create API keys (and so read a partner's calls)")]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.partner})"


# Set by StreamingProfile.looked_up_once: connection id -> its profile (or None).
_PROFILES: ContextVar[dict[str, StreamingProfile | None] | None] = ContextVar(
    "callops_profiles", default=None
)


class StreamingProfile(models.Model):
    """How a partner wants its calls streamed (and transcribed), and whether to start on answer.

    ``connection_id`` empty: the partner's default; otherwise it applies to that connection only.
    """

    partner = models.ForeignKey(Partner, on_delete=models.CASCADE, related_name="profiles")
    connection_id = models.CharField(max_length=255, blank=True, default="")
    name = models.CharField(max_length=100, blank=True, default="")
    stream_url = models.CharField(max_length=2048)
    stream_track = models.CharField(max_length=16, default="inbound_track")
    stream_codec = models.CharField(max_length=16, blank=True, default="")
    stream_bidirectional_mode = models.CharField(max_length=8, blank=True, default="")
    stream_bidirectional_codec = models.CharField(max_length=16, blank=True, default="")
    stream_bidirectional_sampling_rate = models.PositiveIntegerField(null=True, blank=True)
    stream_bidirectional_target_legs = models.CharField(max_length=16, blank=True, default="")
    stream_auth_token = models.CharField(max_length=4000, blank=True, default="")
    transcribe = models.BooleanField(default=False)
    transcription_engine = models.CharField(max_length=32, blank=True, default="")
    transcription_engine_config = models.JSONField(default=dict, blank=True)
    transcription_tracks = models.CharField(max_length=16, blank=True, default="")
    max_stream_duration = models.PositiveIntegerField(
        null=True, blank=True, help_text="Seconds; the stale-stream sweeper stops it after this."
    )
    auto_start = models.BooleanField(
        default=False, help_text="Start streaming on call.answered (calls answered elsewhere)."
    )

    class AnswerPolicy(models.TextChoices):
        ANSWER = "answer", "answer incoming calls (with the profile's media inline)"
        REJECT = "reject", "reject incoming calls"
        NONE = "none", "leave incoming calls to another application"

    class MachinePolicy(models.TextChoices):
        IGNORE = "ignore", "stream whoever answers"
        HANGUP = "hangup", "hang up on answering machines"
        HUMANS_ONLY = "humans_only", "stream only once a human is detected"

    answer_policy = models.CharField(
        max_length=8, choices=AnswerPolicy.choices, default=AnswerPolicy.NONE
    )
    reject_cause = models.CharField(
        max_length=32,
        choices=[(c, c) for c in REJECT_CAUSES],
        default="CALL_REJECTED",
        help_text="Sent with reject when the answer policy rejects.",
    )
    machine_policy = models.CharField(
        max_length=16,
        choices=MachinePolicy.choices,
        default=MachinePolicy.IGNORE,
        help_text="Dialed calls with machine detection.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["partner", "connection_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["partner", "connection_id"], name="one_profile_per_connection"
            )
        ]

    def __str__(self) -> str:
        return self.name or f"{self.partner} {self.connection_id or 'default'}"

    STREAMING_FIELDS = (
        "stream_url",
        "stream_track",
        "stream_codec",
        "stream_bidirectional_mode",
        "stream_bidirectional_codec",
        "stream_bidirectional_sampling_rate",
        "stream_bidirectional_target_legs",
        "stream_auth_token",
    )

    def streaming_params(self) -> dict:
        """``streaming_start`` parameters, leaving out what the profile does not set."""
        values = {name: getattr(self, name) for name in self.STREAMING_FIELDS}
        return {k: v for k, v in values.items() if v not in ("", None)}

    def inline_media_params(self) -> dict:
        """The same streaming and transcription as ``answer`` / ``dial`` options, inline."""
        params = self.streaming_params()
        if self.transcribe:
            params.update(transcription=True, transcription_config=self.transcription_params())
        return params

    def transcription_params(self) -> dict:
        values = {
            "transcription_engine": self.transcription_engine,
            "transcription_engine_config": self.transcription_engine_config,
            "transcription_tracks": self.transcription_tracks,
        }
        return {k: v for k, v in values.items() if v not in ("", None, {})}

    @classmethod
    def for_call(cls, call: Call) -> StreamingProfile | None:
        """The profile for the call's connection, else its partner's default."""
        return cls.for_connection(call.connection_id)

    @classmethod
    def for_connection(cls, connection_id: str) -> StreamingProfile | None:
        if not connection_id:
            return None
        return lookups.PROFILES.in_batch(
            _PROFILES.get(), connection_id, lambda: cls._look_up(connection_id)
        )

    @classmethod
    def _look_up(cls, connection_id: str) -> StreamingProfile | None:
        owner = PartnerConnection.objects.filter(connection_id=connection_id).first()
        if owner is None:
            return None
        profiles = {
            p.connection_id: p
            for p in cls.objects.filter(
                partner_id=owner.partner_id, connection_id__in=[connection_id, ""]
            )
        }
        return profiles.get(connection_id) or profiles.get("")

    @staticmethod
    @contextmanager
    def looked_up_once() -> Iterator[None]:
        """Within the block, each connection's profile is read once. A drain wraps a batch in
        it: a call's policies and duration limit ask for the profile on every lifecycle event
        (two queries each). Drains also remember it across batches (``callops.lookups``): a
        profile changed meanwhile is seen within ``CALLOPS_LOOKUP_TTL`` seconds."""
        token = _PROFILES.set({})
        try:
            yield
        finally:
            _PROFILES.reset(token)


class IdempotencyRecord(models.Model):
    """The first response to a partner's POST with an ``Idempotency-Key``, kept for 24 h."""

    partner = models.ForeignKey(Partner, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    request_fingerprint = models.CharField(max_length=64)
    response_status = models.PositiveSmallIntegerField(null=True)
    response_body = models.JSONField(null=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["partner", "key"], name="one_response_per_key")
        ]

    def __str__(self) -> str:
        return f"{self.partner_id}:{self.key}"


class TaskRun(models.Model):
    """When a periodic task last ran and what it did: the health checks and operators read it."""

    name = models.CharField(max_length=100, unique=True)
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)
    last_result = models.JSONField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    runs = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class DrainFlag(models.Model):
    """One row per shard (id = shard + 1): when a drain of that shard's pending webhook events
    was last asked for, if one is still due.

    The webhook's doorbell. Raising it is folded into the webhook's INSERT on PostgreSQL (see
    callops.drain), so storing an event and deciding whether to enqueue a drain cost one round
    trip; the drain task lowers it before its last look for pending events.
    """

    requested_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"drain requested at {self.requested_at}" if self.requested_at else "no drain due"


# --- Webhooks to partners (callops.partner_events, callops.partner_delivery) -----------------


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


class WebhookEndpoint(models.Model):
    """A partner's URL that receives its calls' events, signed the Standard Webhooks way.

    Secrets are stored in their ``whsec_<base64>`` form, as partners pass them to
    ``standardwebhooks.Webhook``. HMAC needs the secret itself, so it cannot be hashed as API
    keys are. After a rotation the previous secret signs too until ``previous_expires_at``.
    """

    partner = models.ForeignKey(Partner, on_delete=models.CASCADE, related_name="webhook_endpoints")
    url = models.CharField(max_length=2048)
    description = models.CharField(max_length=255, blank=True, default="")
    event_types = models.JSONField(
        default=list, blank=True, help_text="Event types to send; empty: every type."
    )
    include_interim = models.BooleanField(
        default=False, help_text="Also send interim (not final) transcript segments."
    )
    active = models.BooleanField(default=True)
    secret = models.CharField(max_length=100, editable=False)
    previous_secret = models.CharField(max_length=100, blank=True, default="", editable=False)
    previous_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The circuit breaker (callops.partner_delivery): failed attempts in a row, and while
    # parked, when the next probe may go out.
    consecutive_failures = models.PositiveIntegerField(default=0, editable=False)
    parked_until = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["partner", "pk"]

    def __str__(self) -> str:
        return self.url

    def signing_secrets(self, now) -> list[str]:
        """The secrets that sign a delivery now: the current one, and the previous one during
        a rotation's overlap."""
        secrets = [self.secret]
        if self.previous_secret and self.previous_expires_at and now < self.previous_expires_at:
            secrets.append(self.previous_secret)
        return secrets

    def wants(self, event_type: str, *, interim: bool = False) -> bool:
        if interim and not self.include_interim:
            return False
        return not self.event_types or event_type in self.event_types


class PartnerEvent(models.Model):
    """One fact about a partner's call, created once, in the transaction that recorded it.

    ``sequence`` orders a call's events (1, 2, ...; gaps are events no endpoint wanted);
    ``source_key`` is the fact's identity, so a redelivered or replayed Telnyx webhook finds
    its event already there."""

    event_id = models.CharField(max_length=40, default=new_event_id, editable=False)
    partner = models.ForeignKey(Partner, on_delete=models.CASCADE, related_name="events")
    call = models.ForeignKey(
        Call, null=True, blank=True, on_delete=models.CASCADE, related_name="partner_events"
    )
    type = models.CharField(max_length=64)
    sequence = models.PositiveIntegerField(null=True, blank=True)
    payload = models.JSONField(default=dict)
    source_key = models.CharField(max_length=255, editable=False)
    occurred_at = models.DateTimeField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["event_id"], name="partnerevent_event_id_uniq"),
            models.UniqueConstraint(fields=["source_key"], name="partnerevent_source_key_uniq"),
            models.UniqueConstraint(fields=["call", "sequence"], name="partnerevent_call_seq_uniq"),
        ]
        indexes = [models.Index(fields=["created_at"], name="partnerevent_created_idx")]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"


class Delivery(models.Model):
    """One event to one endpoint: the outbox row a Celery task sends, retries or gives up.

    ``call`` and ``sequence`` are the event's, copied so the order check (no earlier event of
    the call still on its way to this endpoint) is one index probe."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERING = "delivering"
        SUCCEEDED = "succeeded"
        FAILED = "failed"  # the last attempt failed; another is due at next_attempt_at
        DEAD = "dead"  # given up: too many attempts, too old, or the endpoint is gone

    UNFINISHED = (Status.PENDING, Status.DELIVERING, Status.FAILED)

    event = models.ForeignKey(PartnerEvent, on_delete=models.CASCADE, related_name="deliveries")
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    call = models.ForeignKey(
        Call, null=True, blank=True, on_delete=models.CASCADE, related_name="+", editable=False
    )
    sequence = models.PositiveIntegerField(null=True, blank=True, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When due; while delivering, when the claim lapses (a worker died mid-send).
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    # Retrying stops once this passes (CALLOPS_WEBHOOK_MAX_AGE); a redelivery starts a new window.
    expires_at = models.DateTimeField()
    # Since when it waits for one of its endpoint's CALLOPS_WEBHOOK_CONCURRENCY slots: its
    # place in the endpoint's queue (callops.partner_delivery); null when not waiting.
    waiting_since = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "deliveries"
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["event", "endpoint"], name="one_delivery_per_endpoint")
        ]
        indexes = [
            # The order check and the sweeper look only at unfinished deliveries.
            models.Index(
                fields=["endpoint", "call", "sequence"],
                condition=models.Q(status__in=["pending", "delivering", "failed"]),
                name="delivery_unfinished_idx",
            ),
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(status__in=["pending", "delivering", "failed"]),
                name="delivery_due_idx",
            ),
            models.Index(fields=["status", "created_at"], name="delivery_status_idx"),
            # An endpoint's slots: what is in flight, and who waits for a slot, in order.
            models.Index(
                fields=["endpoint", "next_attempt_at"],
                condition=models.Q(status="delivering"),
                name="delivery_in_flight_idx",
            ),
            models.Index(
                fields=["endpoint", "waiting_since"],
                condition=models.Q(waiting_since__isnull=False),
                name="delivery_waiting_idx",
            ),
        ]
        permissions = [("retry_delivery", "Can retry partner webhook deliveries")]

    def __str__(self) -> str:
        return f"{self.event_id} -> {self.endpoint_id} ({self.status})"


# --- A command's attempts (callops.commands), for the call's timeline and the dashboard -----


class CommandAttempt(models.Model):
    """One send of a command to Telnyx and the answer it got (or why none came).

    ``Command`` keeps the count and the last answer; this keeps each of them, so a 429 or a
    503 that a later attempt overcame stays visible. A send whose worker died leaves no row:
    its number is missing from the command's attempts."""

    command = models.ForeignKey(Command, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    sent_at = models.DateTimeField()
    answered_at = models.DateTimeField()
    http_status = models.PositiveSmallIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=16)  # commands.Outcome.kind
    error = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        ordering = ["command", "number"]
        indexes = [
            # The dashboard's 429s of the last hour: a range over the 429s alone.
            models.Index(
                fields=["answered_at"],
                condition=models.Q(http_status=429),
                name="commandattempt_429_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.command_id}"
