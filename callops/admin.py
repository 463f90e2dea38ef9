"""The operators' console: inspect calls and events, and act on them."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from callops import events
from callops.models import (
    Call,
    Fork,
    MediaStream,
    Transcription,
    TranscriptSegment,
    WebhookEvent,
)
from callops.tasks import request_event_drain


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class MediaStreamInline(ReadOnlyInline):
    model = MediaStream
    fields = (
        "status",
        "stream_id",
        "stream_url",
        "track",
        "codec",
        "started_at",
        "stopped_at",
        "failure_reason",
    )


class ForkInline(ReadOnlyInline):
    model = Fork
    fields = ("status", "stream_type", "rx", "tx", "target", "started_at", "stopped_at")


class TranscriptionInline(ReadOnlyInline):
    model = Transcription
    fields = ("status", "engine", "tracks", "started_at", "stopped_at")


class TranscriptSegmentInline(ReadOnlyInline):
    model = TranscriptSegment
    fields = ("occurred_at", "track", "is_final", "confidence", "transcript")
    ordering = ("occurred_at",)


@admin.register(Call)
class CallAdmin(admin.ModelAdmin):
    list_display = (
        "call_control_id",
        "status",
        "direction",
        "from_number",
        "to_number",
        "started_at",
        "ended_at",
        "hangup_cause",
    )
    list_filter = ("status", "direction", "started_at", "ended_at")
    search_fields = (
        "call_control_id",
        "call_session_id",
        "call_leg_id",
        "from_number",
        "to_number",
    )
    date_hierarchy = "created_at"
    inlines = [MediaStreamInline, ForkInline, TranscriptionInline, TranscriptSegmentInline]
    readonly_fields = [f.name for f in Call._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False


@admin.register(WebhookEvent)
class WebhookEventAdmin(admin.ModelAdmin):
    list_display = (
        "event_type",
        "event_id",
        "call_control_id",
        "status",
        "occurred_at",
        "received_at",
        "delivery_count",
        "last_attempt",
    )
    list_filter = ("status", "event_type", "received_at")
    search_fields = ("event_id", "call_control_id")
    date_hierarchy = "received_at"
    actions = ["replay"]
    readonly_fields = [f.name for f in WebhookEvent._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the raw record of what Telnyx said: view it, replay it, never edit it

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Replay selected events", permissions=["view"])
    def replay(self, request: HttpRequest, queryset: QuerySet[WebhookEvent]) -> None:
        with transaction.atomic():
            count = events.events_replay(event_ids=queryset.values_list("pk", flat=True))
            transaction.on_commit(request_event_drain)
        self.message_user(request, f"{count} event(s) queued for replay.", messages.SUCCESS)
