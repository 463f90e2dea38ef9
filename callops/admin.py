"""The operators' console: inspect calls and events, and act on them."""

from __future__ import annotations

import json
import re

from django import forms
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.formats import localize
from django.utils.html import format_html
from django.utils.text import Truncator

from callops import commands, drain, events, partner_delivery
from callops.actions import ACTIONS, STOPS, TelnyxAction
from callops.admin_paging import LargeList
from callops.api_keys import api_key_create, api_key_revoke
from callops.commands import CallEnded, CommandConflict
from callops.models import (
    ApiKey,
    Call,
    Command,
    CommandAttempt,
    Delivery,
    DtmfDigit,
    Fork,
    MediaStream,
    Partner,
    PartnerConnection,
    PartnerEvent,
    StreamingProfile,
    TaskRun,
    Transcription,
    TranscriptSegment,
    WebhookEndpoint,
    WebhookEvent,
)
from callops.targets import UnsafeTarget, check_stream_url
from callops.telnyx_params import ParamsInvalid


def custom_permission(codename: str):
    """``has_<name>_permission`` for ``@admin.action(permissions=[name])``: Django hides an
    action, and refuses it when posted anyway, unless this says yes. The custom permissions
    are declared in the models' Meta (act_on_call, act_on_command, replay_webhookevent,
    create_api_key): Django's view/add/change/delete do not say what these actions do."""

    def has_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{codename}")

    return has_permission


# Parameter names whose values are credentials (stream_auth_token, sip_auth_password): never
# shown in the admin, whoever looks.
SECRET_NAME = re.compile(r"token|password|secret", re.IGNORECASE)
MASK = "********"


def masked(value):
    """``value`` with the value of every secret-named key replaced, at any depth."""
    if isinstance(value, dict):
        return {
            k: MASK if SECRET_NAME.search(str(k)) and v not in ("", None) else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def masked_json(field: str):
    """A read-only display of the JSON ``field`` with its secrets masked."""

    @admin.display(description=field)
    def show(self, obj) -> str:
        return json.dumps(masked(getattr(obj, field)), ensure_ascii=False)

    return show


# Links and durations the list pages share (the console's block at the end uses them too).


def record_link(obj, model: str, label: str = "", width: int = 24):
    """``obj`` as a link to its admin page (or "-"), its label cut to ``width`` characters
    (the whole label in the link's title): Telnyx's call ids run to 70 characters."""
    if obj is None:
        return "-"
    url = reverse(f"admin:callops_{model}_change", args=[obj.pk])
    label = label or str(obj)
    return format_html('<a href="{}" title="{}">{}</a>', url, label, Truncator(label).chars(width))


def cut(value: str, width: int):
    """A long id cut to ``width`` characters, the whole of it in the title."""
    return format_html('<span title="{}">{}</span>', value, Truncator(value).chars(width))


def duration(start, end) -> str:
    """``end - start`` as ``1:02:03.4``; "-" before the start. Running ones count to now."""
    if start is None:
        return "-"
    seconds = ((end or timezone.now()) - start).total_seconds()
    minutes, rest = divmod(max(0.0, seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{rest:04.1f}" + ("" if end else " (running)")


@admin.display(description="call", ordering="call__call_control_id")
def call_link(obj):
    """A list column: the record's call, as a link to the call's page."""
    return record_link(obj.call, "call", obj.call.call_control_id)


@admin.display(description="last error")
def short_last_error(obj) -> str:
    return Truncator(obj.last_error).chars(40)


@admin.display(description="took")
def took(command) -> str:
    """Created to finished; a command still queued says when it is due instead."""
    if command.finished_at is None and command.next_attempt_at:
        return f"due {localize(timezone.localtime(command.next_attempt_at))}"
    return duration(command.created_at, command.finished_at)


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


class DtmfDigitInline(ReadOnlyInline):
    model = DtmfDigit
    fields = ("occurred_at", "digit")


class CommandInline(ReadOnlyInline):
    model = Command
    fields = (
        "action",
        "status",
        "requested_by",
        "attempts",
        "last_error",
        "created_at",
        "finished_at",
    )
    readonly_fields = ("last_error",)
    ordering = ("-created_at",)


def call_action(spec: TelnyxAction):
    """The admin action sending ``spec`` for each selected call ("Stop streaming")."""

    def act(modeladmin: CallAdmin, request: HttpRequest, queryset: QuerySet[Call]) -> None:
        modeladmin.command_each(request, queryset, spec.name)

    act.__name__ = spec.summary.lower().replace(" ", "_")
    return admin.action(description=spec.summary, permissions=["act_on_call"])(act)


def operator_params(action: str, call: Call) -> dict:
    """What an operator's command carries: an answer takes the partner's profile media inline
    (as the answer policy would), a reject the profile's cause; the rest nothing."""
    profile = StreamingProfile.for_call(call)
    if action == "answer":
        return profile.inline_media_params() if profile and profile.auto_start else {}
    if action == "reject":
        return {"cause": profile.reject_cause if profile else "CALL_REJECTED"}
    return {}


class PartnerFilter(admin.SimpleListFilter):
    title = "partner"
    parameter_name = "partner"

    def lookups(self, request, model_admin):
        return [(p.pk, p.name) for p in Partner.objects.all()]

    def queryset(self, request, queryset):
        if self.value():
            owned = PartnerConnection.objects.filter(partner_id=self.value())
            return queryset.filter(connection_id__in=owned.values("connection_id"))
        return queryset


@admin.register(Call)
class CallAdmin(LargeList, admin.ModelAdmin):
    list_display = (
        "short_id",
        "partner",
        "status",
        "direction",
        "from_number",
        "to_number",
        "started_at",
        "lasted",
        "hangup_cause",
    )
    list_filter = ("status", PartnerFilter, "direction", "started_at", "ended_at")
    search_fields = (
        "call_control_id",
        "call_session_id",
        "call_leg_id",
        "from_number",
        "to_number",
    )
    date_hierarchy = "created_at"
    inlines = [
        MediaStreamInline,
        ForkInline,
        TranscriptionInline,
        TranscriptSegmentInline,
        DtmfDigitInline,
        CommandInline,
    ]
    readonly_fields = [f.name for f in Call._meta.fields]
    actions = [
        *(call_action(ACTIONS[name]) for name in ("answer", "reject", "hangup")),
        *(call_action(stop) for stop in STOPS.values()),
    ]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # calls are what Telnyx told us; operators act through commands

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    has_act_on_call_permission = custom_permission("act_on_call")

    def get_queryset(self, request):
        owners = PartnerConnection.objects.filter(connection_id=OuterRef("connection_id"))
        return (
            super()
            .get_queryset(request)
            .annotate(partner_name=Subquery(owners.values("partner__name")[:1]))
        )

    @admin.display(description="partner", ordering="partner_name")
    def partner(self, call) -> str:
        return call.partner_name or "-"

    @admin.display(description="call control id", ordering="call_control_id")
    def short_id(self, call) -> str:
        return cut(call.call_control_id, 28)

    @admin.display(description="duration")
    def lasted(self, call) -> str:
        return duration(call.started_at, call.ended_at)

    def command_each(self, request, queryset, action: str) -> None:
        sent, refused = 0, []
        for call in queryset:
            try:
                command = commands.command_create(
                    call=call,
                    action=action,
                    params=operator_params(action, call),
                    requested_by="operator",
                )
                sent += 1
                if action == "streaming_stop" and not command.params.get("stream_id"):
                    note = "no stream_id is known, so it stops every stream of the call"
                    self.message_user(request, f"{call.call_control_id}: {note}.", messages.INFO)
            except (CallEnded, CommandConflict, ParamsInvalid) as exc:
                refused.append(f"{call.call_control_id}: {exc}")
        if sent:
            self.message_user(request, f"Queued {action} for {sent} call(s).", messages.SUCCESS)
        for reason in refused:
            self.message_user(request, f"Did not send {action}: {reason}", messages.WARNING)


@admin.register(WebhookEvent)
class WebhookEventAdmin(LargeList, admin.ModelAdmin):
    list_display = (
        "event_type",
        "short_event_id",
        "short_call_id",
        "status",
        "occurred_at",
        "received_at",
        "delivery_count",
        "last_attempt",
    )
    list_filter = ("status", "event_type", "received_at")
    # Exact ids: answered from the indexes; a substring search would read the whole table.
    search_fields = ("=event_id", "=call_control_id")
    date_hierarchy = "received_at"
    actions = ["replay"]
    readonly_fields = [
        "payload_shown" if f.name == "payload" else f.name for f in WebhookEvent._meta.fields
    ]
    payload_shown = masked_json("payload")
    exclude = ["payload"]  # else the form would bring it back, unmasked
    has_replay_permission = custom_permission("replay_webhookevent")

    # Cut to fit a 1400-px screen; the whole id in the title (and on the event's page).
    @admin.display(description="event id", ordering="event_id")
    def short_event_id(self, event) -> str:
        return cut(event.event_id, 13)

    @admin.display(description="call control id", ordering="call_control_id")
    def short_call_id(self, event) -> str:
        return cut(event.call_control_id, 28)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # the raw record of what Telnyx said: view it, replay it, never edit it

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Replay selected events", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet[WebhookEvent]) -> None:
        with transaction.atomic():
            count = events.events_replay(event_ids=queryset.values_list("pk", flat=True))
            transaction.on_commit(drain.request)
        self.message_user(request, f"{count} event(s) queued for replay.", messages.SUCCESS)


class CommandAttemptInline(ReadOnlyInline):
    model = CommandAttempt
    fields = ("number", "sent_at", "answered_at", "http_status", "outcome", "error")
    ordering = ("number",)


@admin.register(Command)
class CommandAdmin(LargeList, admin.ModelAdmin):
    list_display = (
        "action",
        call_link,
        "status",
        "requested_by",
        "attempts",
        short_last_error,
        "created_at",
        took,
    )
    list_filter = ("status", "action", "requested_by", "created_at")
    search_fields = ("call__call_control_id", "command_id")
    date_hierarchy = "created_at"
    list_select_related = ("call",)
    inlines = [CommandAttemptInline]
    actions = ["retry_now", "cancel"]
    readonly_fields = [
        "params_shown" if f.name == "params" else f.name for f in Command._meta.fields
    ] + ["last_error"]
    params_shown = masked_json("params")  # streaming_start, answer and dial carry tokens
    exclude = ["params"]  # else the form would bring it back, unmasked
    # A permission of its own, not change_command: the admin never edits a command's fields
    # (has_change_permission is always False), it only asks for it to be sent again or not.
    has_act_on_command_permission = custom_permission("act_on_command")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def _each(self, request, queryset, service, done: str, skipped: str) -> None:
        count = sum(service(command=command) for command in queryset)
        self.message_user(request, f"{count} command(s) {done}.", messages.SUCCESS)
        if left := queryset.count() - count:
            self.message_user(request, f"{left} command(s) skipped: {skipped}.", messages.WARNING)

    @admin.action(description="Retry now (failed commands)", permissions=["act_on_command"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Command]) -> None:
        self._each(
            request,
            queryset,
            commands.command_retry,
            "queued again",
            "only failed ones are retried",
        )

    @admin.action(description="Cancel (queued commands)", permissions=["act_on_command"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Command]) -> None:
        self._each(
            request,
            queryset,
            commands.command_cancel,
            "cancelled",
            "only queued ones can be cancelled",
        )


class PartnerConnectionInline(admin.TabularInline):
    model = PartnerConnection
    extra = 1


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ("name", "prefix", "created_at", "last_used_at", "revoked_at")
    readonly_fields = ("prefix", "created_at", "last_used_at", "revoked_at")

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # keys are made by the "Create an API key" action, which shows it once


class StreamingProfileForm(forms.ModelForm):
    """The stream auth token is write-only: the stored token is never sent back to a browser,
    and an empty field keeps it, so saving a profile does not wipe the token."""

    class Meta:
        model = StreamingProfile
        fields = "__all__"  # noqa: DJ007 - the admin that uses the form picks its fields
        widgets = {"stream_auth_token": forms.PasswordInput(render_value=False)}
        help_texts = {"stream_auth_token": "Leave empty to keep the current token."}

    def clean_stream_auth_token(self) -> str:
        return self.cleaned_data["stream_auth_token"] or self.instance.stream_auth_token

    def clean_stream_url(self) -> str:
        """The partner API's check: an operator cannot aim a profile's streams inside either."""
        url = self.cleaned_data["stream_url"]
        if url:
            try:
                check_stream_url(url)
            except UnsafeTarget as exc:
                raise forms.ValidationError(str(exc)) from None
        return url


class StreamingProfileSecrets:
    """What the profile admin and its inline share: whether a token is set, never the token.

    Who may not change a profile would see every field read-only, and Django shows a read-only
    field's raw value; so for them the token field is left out altogether."""

    form = StreamingProfileForm
    readonly_fields = ("auth_token",)

    def get_exclude(self, request, obj=None):
        excluded = list(super().get_exclude(request, obj) or ())
        if not self.has_change_permission(request, obj):
            excluded.append("stream_auth_token")
        return excluded

    @admin.display(description="stream auth token")
    def auth_token(self, profile: StreamingProfile) -> str:
        return "set" if profile.stream_auth_token else "not set"


class StreamingProfileInline(StreamingProfileSecrets, admin.StackedInline):
    model = StreamingProfile
    extra = 0


@admin.register(Partner)
class PartnerAdmin(admin.ModelAdmin):
    list_display = ("name", "active", "created_at")
    list_filter = ("active",)
    search_fields = ("name", "connections__connection_id")
    inlines = [PartnerConnectionInline, ApiKeyInline, StreamingProfileInline]
    actions = ["create_api_key"]
    # A key reads every call of its partner: its own permission, not "add API key".
    has_create_api_key_permission = custom_permission("create_api_key")

    @admin.action(description="Create an API key (shown once)", permissions=["create_api_key"])
    def create_api_key(self, request: HttpRequest, queryset: QuerySet[Partner]) -> TemplateResponse:
        # The new keys are shown in this response and nowhere else. Not as a message: the
        # default message storage puts messages in a cookie (signed, not encrypted: anyone
        # who sees the cookie reads the key), and the session storage would keep it in the
        # database, where only the key's hash may be.
        created = [
            (partner, api_key_create(partner=partner, name=f"admin: {request.user}")[1])
            for partner in queryset
        ]
        response = TemplateResponse(
            request,
            "admin/callops/partner/api_keys_created.html",
            {
                **self.admin_site.each_context(request),
                "title": "New API keys",
                "opts": self.opts,
                "created": created,
            },
        )
        add_never_cache_headers(response)  # no-store: no cache keeps a copy of the page
        return response


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "partner", "name", "created_at", "last_used_at", "revoked_at")
    list_filter = ("partner", "revoked_at")
    search_fields = ("prefix", "partner__name", "name")
    readonly_fields = ("partner", "prefix", "created_at", "last_used_at", "revoked_at")
    fields = ("partner", "name", "prefix", "created_at", "last_used_at", "revoked_at")
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    # Revoking changes the key (its revoked_at): Django's change_apikey says who may.
    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            api_key_revoke(key=key)
        self.message_user(request, f"{queryset.count()} key(s) revoked.", messages.SUCCESS)


@admin.register(StreamingProfile)
class StreamingProfileAdmin(StreamingProfileSecrets, admin.ModelAdmin):
    list_display = ("__str__", "partner", "connection_id", "stream_url", "auto_start", "transcribe")
    list_filter = ("partner", "auto_start", "transcribe")


@admin.register(TaskRun)
class TaskRunAdmin(LargeList, admin.ModelAdmin):
    list_display = (
        "name",
        "last_started_at",
        "last_finished_at",
        "runs",
        "last_result",
        "last_error",
    )
    readonly_fields = [f.name for f in TaskRun._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


# --- Webhooks to partners -------------------------------------------------------------------


class WebhookEndpointForm(forms.ModelForm):
    class Meta:
        model = WebhookEndpoint
        fields = ("partner", "url", "description", "event_types", "include_interim", "active")

    def clean_url(self) -> str:
        """The partner API's check: an operator cannot aim deliveries inside either."""
        url = self.cleaned_data["url"]
        try:
            partner_delivery.check_webhook_url(url)
        except UnsafeTarget as exc:
            raise forms.ValidationError(str(exc)) from None
        return url

    def clean_event_types(self) -> list:
        event_types = self.cleaned_data["event_types"] or []
        if not isinstance(event_types, list):
            raise forms.ValidationError("must be a list of event types")
        try:
            partner_delivery.check_event_types(event_types)
        except partner_delivery.EndpointInvalid as exc:
            raise forms.ValidationError(str(exc)) from None
        return event_types


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    """Secrets are never shown here: the partner sees one on create and on rotation only."""

    form = WebhookEndpointForm
    list_display = (
        "url",
        "partner",
        "active",
        "include_interim",
        "consecutive_failures",
        "parked_until",
        "created_at",
    )
    list_filter = ("active", "partner")
    search_fields = ("url", "partner__name")
    readonly_fields = ("consecutive_failures", "parked_until", "previous_expires_at", "created_at")

    def save_model(self, request, obj: WebhookEndpoint, form, change: bool) -> None:
        if not obj.secret:
            obj.secret = partner_delivery.new_secret()
        super().save_model(request, obj, form, change)


@admin.register(Delivery)
class DeliveryAdmin(LargeList, admin.ModelAdmin):
    list_display = (
        "event_type",
        "endpoint",
        "status",
        "attempts",
        "last_status_code",
        "last_attempt_at",
        "next_attempt_at",
        "delivered_at",
        "last_error",
    )
    list_filter = ("status", "created_at")
    search_fields = ("=event__event_id", "=call__call_control_id")
    date_hierarchy = "created_at"
    list_select_related = ("event", "endpoint")
    actions = ["retry_now"]
    readonly_fields = [f.name for f in Delivery._meta.fields]
    has_retry_delivery_permission = custom_permission("retry_delivery")

    @admin.display(description="event", ordering="event__type")
    def event_type(self, delivery: Delivery) -> str:
        return (
            f"{delivery.event.type} #{delivery.sequence}"
            if delivery.sequence
            else delivery.event.type
        )

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # what was sent and answered: view it, send it again, never edit it

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Retry now (send again)", permissions=["retry_delivery"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Delivery]) -> None:
        count = sum(partner_delivery.delivery_redeliver(delivery=d) for d in queryset)
        self.message_user(request, f"{count} delivery(ies) queued again.", messages.SUCCESS)
        if left := queryset.count() - count:
            self.message_user(request, f"{left} skipped: being sent right now.", messages.WARNING)


@admin.register(PartnerEvent)
class PartnerEventAdmin(LargeList, admin.ModelAdmin):
    """What each partner was told; replaying sends an event again to the endpoints that
    subscribe to it now (the same id: partners dedupe by it)."""

    list_display = ("type", "sequence", "partner", "call", "occurred_at", "created_at")
    list_filter = ("type", "created_at")
    search_fields = ("=event_id", "=call__call_control_id")
    list_select_related = ("partner", "call")
    actions = ["replay"]
    readonly_fields = [f.name for f in PartnerEvent._meta.fields]
    # Replaying is sending again, as "Retry now" on a delivery is: the same permission.
    has_retry_delivery_permission = custom_permission("retry_delivery")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.action(description="Replay to subscribed endpoints", permissions=["retry_delivery"])
    def replay(self, request: HttpRequest, queryset: QuerySet[PartnerEvent]) -> None:
        sent = sum(
            len(
                partner_delivery.partner_event_replay(
                    event=event, endpoints=partner_delivery.endpoints_subscribed(event=event)
                )
            )
            for event in queryset
        )
        self.message_user(request, f"{sent} delivery(ies) queued.", messages.SUCCESS)


# --- The console: lists of a call's records, the dashboard's and the timeline's links -------
#
# The dashboard and the timeline are pages of their own (callops.console); the index leads to
# the dashboard, each call's page to its timeline (templates/admin/callops/).

admin.site.index_template = "admin/callops/index.html"
# The lists are wide (ids, times, durations, links): on a 1400-px screen the menu beside them
# would leave them too little room. The breadcrumbs and the index lead everywhere it did.
admin.site.enable_nav_sidebar = False


class CallLinked(LargeList):
    """What the console's lists share: the call as a link to its page, a time filter, and a
    search by exact call id (answered from the call's unique index)."""

    search_fields = ("=call__call_control_id",)
    list_select_related = ("call",)
    list_per_page = 100

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # derived from Telnyx's events: view them, never edit them

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class SessionAdmin(CallLinked, admin.ModelAdmin):
    """Streams, forks and transcriptions: status, when, how long, and the command that began it."""

    list_filter = ("status", "requested_at", "started_at", "stopped_at")
    date_hierarchy = "requested_at"
    record: str  # the Command field that points at this model
    session_columns: tuple[str, ...] = ()

    def get_list_display(self, request):
        # Fits a 1400-px screen beside the admin's menu and the filters: the stream URL, the
        # request time and the stop time (start + duration) are on each record's page.
        return (
            "id",
            call_link,
            "status",
            *self.session_columns,
            "started_at",
            "lasted",
            "start_command",
            "short_failure",
        )

    def get_queryset(self, request):
        first = Command.objects.filter(**{self.record: OuterRef("pk")}).order_by("created_at")
        return (
            super()
            .get_queryset(request)
            .annotate(start_command_pk=Subquery(first.values("pk")[:1]))
        )

    @admin.display(description="duration")
    def lasted(self, session) -> str:
        return duration(session.started_at, session.stopped_at) if session.started_at else "-"

    @admin.display(description="command")
    def start_command(self, session):
        if session.start_command_pk is None:
            return "-"
        url = reverse("admin:callops_command_change", args=[session.start_command_pk])
        return format_html('<a href="{}">#{}</a>', url, session.start_command_pk)

    @admin.display(description="failure")
    def short_failure(self, session) -> str:
        return Truncator(session.failure_reason).chars(32)


@admin.register(MediaStream)
class MediaStreamAdmin(SessionAdmin):
    record = "stream"
    session_columns = ("stream_id",)
    search_fields = ("=call__call_control_id", "=stream_id")


@admin.register(Fork)
class ForkAdmin(SessionAdmin):
    record = "fork"
    session_columns = ("stream_type", "target")


@admin.register(Transcription)
class TranscriptionAdmin(SessionAdmin):
    record = "transcription"
    session_columns = ("engine", "tracks")


@admin.register(TranscriptSegment)
class TranscriptSegmentAdmin(CallLinked, admin.ModelAdmin):
    list_display = (
        "occurred_at",
        call_link,
        "track",
        "is_final",
        "confidence",
        "words",
        "event_link",
    )
    list_filter = ("is_final", "track", "occurred_at")
    list_select_related = ("call", "event")
    # No date drill-down: its date list would read every segment; the date filter is a range.
    ordering = ("-occurred_at", "-id")

    @admin.display(description="transcript")
    def words(self, segment) -> str:
        return Truncator(segment.transcript).chars(60)

    @admin.display(description="event")
    def event_link(self, segment):
        return record_link(segment.event, "webhookevent", f"event {segment.event_id}")


@admin.register(DtmfDigit)
class DtmfDigitAdmin(CallLinked, admin.ModelAdmin):
    list_display = ("occurred_at", call_link, "digit", "event_link")
    list_filter = ("occurred_at",)
    list_select_related = ("call", "event")
    ordering = ("-occurred_at", "-id")
    event_link = TranscriptSegmentAdmin.event_link
