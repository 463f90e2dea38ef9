"""What partners send and get back. Thin: rules live in callops.telnyx_params and validators."""

from __future__ import annotations

from django.conf import settings
from rest_framework import serializers

from callops import telnyx_params
from callops.api.validators import UnsafeTarget, check_stream_url, check_udp_target
from callops.models import (
    Call,
    Command,
    Fork,
    MediaStream,
    PartnerConnection,
    StreamingProfile,
    Transcription,
    TranscriptSegment,
)

SECRET_PARAMS = {"stream_auth_token"}


def choice(values, **kwargs) -> serializers.ChoiceField:
    return serializers.ChoiceField(choices=list(values), required=False, **kwargs)


def raise_params_invalid(exc: telnyx_params.ParamsInvalid) -> None:
    raise serializers.ValidationError(exc.errors) from None


def public_stream_url(url: str) -> None:
    try:
        check_stream_url(url)
    except UnsafeTarget as exc:
        raise serializers.ValidationError({"stream_url": [str(exc)]}) from None


# --- Reading ----------------------------------------------------------------------------------


class MediaStreamSerializer(serializers.ModelSerializer):
    class Meta:
        model = MediaStream
        fields = [
            "id",
            "status",
            "stream_id",
            "stream_url",
            "track",
            "codec",
            "failure_reason",
            "requested_at",
            "started_at",
            "stopped_at",
        ]


class ForkSerializer(serializers.ModelSerializer):
    class Meta:
        model = Fork
        fields = [
            "id",
            "status",
            "rx",
            "tx",
            "target",
            "stream_type",
            "failure_reason",
            "requested_at",
            "started_at",
            "stopped_at",
        ]


class TranscriptionSerializer(serializers.ModelSerializer):
    class Meta:
        model = Transcription
        fields = [
            "id",
            "status",
            "engine",
            "tracks",
            "failure_reason",
            "requested_at",
            "started_at",
            "stopped_at",
        ]


class CommandSerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="command_id", read_only=True)
    call_control_id = serializers.CharField(source="call.call_control_id", read_only=True)
    params = serializers.SerializerMethodField()

    class Meta:
        model = Command
        fields = [
            "id",
            "call_control_id",
            "action",
            "status",
            "requested_by",
            "params",
            "attempts",
            "last_http_status",
            "error_code",
            "error_title",
            "error_detail",
            "failure_reason",
            "created_at",
            "next_attempt_at",
            "sent_at",
            "finished_at",
        ]

    def get_params(self, command: Command) -> dict:
        return {k: v for k, v in command.params.items() if k not in SECRET_PARAMS}


class CommandSummarySerializer(serializers.ModelSerializer):
    id = serializers.UUIDField(source="command_id", read_only=True)

    class Meta:
        model = Command
        fields = ["id", "action", "status", "created_at", "finished_at"]


CALL_FIELDS = [
    "call_control_id",
    "call_leg_id",
    "call_session_id",
    "connection_id",
    "direction",
    "from_number",
    "to_number",
    "status",
    "started_at",
    "answered_at",
    "ended_at",
    "hangup_cause",
    "hangup_source",
    "created_at",
]


class CallSerializer(serializers.ModelSerializer):
    class Meta:
        model = Call
        fields = CALL_FIELDS


class CallDetailSerializer(serializers.ModelSerializer):
    streams = MediaStreamSerializer(many=True, read_only=True)
    forks = ForkSerializer(many=True, read_only=True)
    transcriptions = TranscriptionSerializer(many=True, read_only=True)
    commands = CommandSummarySerializer(many=True, read_only=True)

    class Meta:
        model = Call
        fields = [*CALL_FIELDS, "client_state", "streams", "forks", "transcriptions", "commands"]


class TranscriptSegmentSerializer(serializers.ModelSerializer):
    class Meta:
        model = TranscriptSegment
        fields = ["occurred_at", "track", "is_final", "confidence", "transcript"]


class ErrorItemSerializer(serializers.Serializer):
    field = serializers.CharField(allow_null=True)
    message = serializers.CharField()


class ErrorSerializer(serializers.Serializer):
    errors = ErrorItemSerializer(many=True)


# --- Commands ---------------------------------------------------------------------------------


class CommandInput(serializers.Serializer):
    """Base of every command body: its Telnyx parameters, and an optional ``client_state``."""

    action: str = ""
    client_state = serializers.CharField(
        required=False,
        max_length=telnyx_params.MAX_CLIENT_STATE,
        help_text="Base64; echoed by Telnyx in the webhooks this command causes.",
    )

    def profile_defaults(self) -> dict:
        return {}

    def validate(self, attrs: dict) -> dict:
        client_state = attrs.pop("client_state", None)
        params = {**self.profile_defaults(), **attrs}
        try:
            params = telnyx_params.validate(self.action, params, client_state)
        except telnyx_params.ParamsInvalid as exc:
            raise_params_invalid(exc)
        self.check_targets(params)
        return {"params": params, "client_state": client_state}

    def check_targets(self, params: dict) -> None:
        """Partner input goes through the public-address guard."""


class StreamingStartInput(CommandInput):
    action = Command.Action.STREAMING_START
    stream_url = serializers.CharField(
        required=False, max_length=2048, help_text="wss:// URL; the profile's when omitted."
    )
    stream_track = choice(telnyx_params.STREAM_TRACKS)
    stream_codec = choice(telnyx_params.STREAM_CODECS)
    stream_auth_token = serializers.CharField(
        required=False, max_length=telnyx_params.MAX_AUTH_TOKEN, write_only=True
    )
    custom_parameters = serializers.ListField(
        child=serializers.DictField(child=serializers.CharField(max_length=256)),
        required=False,
        max_length=20,
    )
    stream_bidirectional_mode = choice(telnyx_params.BIDIRECTIONAL_MODES)
    stream_bidirectional_codec = choice(telnyx_params.BIDIRECTIONAL_CODECS)
    stream_bidirectional_sampling_rate = choice(telnyx_params.SAMPLING_RATES)
    stream_bidirectional_target_legs = choice(telnyx_params.TARGET_LEGS)

    def profile_defaults(self) -> dict:
        profile = self.context.get("profile")
        return profile.streaming_params() if profile else {}

    def check_targets(self, params: dict) -> None:
        public_stream_url(params["stream_url"])


class StreamingStopInput(CommandInput):
    action = Command.Action.STREAMING_STOP
    stream_id = serializers.CharField(required=False, max_length=255)


class ForkStartInput(CommandInput):
    action = Command.Action.FORK_START
    target = serializers.CharField(required=False, max_length=64, help_text="udp:<ip>:<port>")
    rx = serializers.CharField(required=False, max_length=64, help_text="udp:<ip>:<port>")
    tx = serializers.CharField(required=False, max_length=64, help_text="udp:<ip>:<port>")
    stream_type = choice(telnyx_params.FORK_STREAM_TYPES)

    def check_targets(self, params: dict) -> None:
        for name in ("target", "rx", "tx"):
            if name in params:
                try:
                    check_udp_target(params[name])
                except UnsafeTarget as exc:
                    raise serializers.ValidationError({name: [str(exc)]}) from None


class ForkStopInput(CommandInput):
    action = Command.Action.FORK_STOP
    stream_type = choice(telnyx_params.FORK_STREAM_TYPES)


class TranscriptionStartInput(CommandInput):
    action = Command.Action.TRANSCRIPTION_START
    transcription_engine = choice(settings.TELNYX_TRANSCRIPTION_ENGINES)
    transcription_engine_config = serializers.DictField(required=False)
    transcription_tracks = choice(telnyx_params.TRANSCRIPTION_TRACKS)

    def profile_defaults(self) -> dict:
        profile = self.context.get("profile")
        return profile.transcription_params() if profile else {}


class TranscriptionStopInput(CommandInput):
    action = Command.Action.TRANSCRIPTION_STOP


# --- Streaming profiles -----------------------------------------------------------------------


class StreamingProfileSerializer(serializers.ModelSerializer):
    stream_track = serializers.ChoiceField(
        choices=list(telnyx_params.STREAM_TRACKS), default="inbound_track"
    )
    # Optional settings: an empty string (or null) clears them.
    stream_codec = choice(telnyx_params.STREAM_CODECS, allow_blank=True)
    stream_bidirectional_mode = choice(telnyx_params.BIDIRECTIONAL_MODES, allow_blank=True)
    stream_bidirectional_codec = choice(telnyx_params.BIDIRECTIONAL_CODECS, allow_blank=True)
    stream_bidirectional_sampling_rate = choice(telnyx_params.SAMPLING_RATES, allow_null=True)
    stream_bidirectional_target_legs = choice(telnyx_params.TARGET_LEGS, allow_blank=True)
    transcription_engine = choice(settings.TELNYX_TRANSCRIPTION_ENGINES, allow_blank=True)
    transcription_tracks = choice(telnyx_params.TRANSCRIPTION_TRACKS, allow_blank=True)
    stream_auth_token = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=telnyx_params.MAX_AUTH_TOKEN,
        write_only=True,
    )
    connection_id = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=255,
        help_text="One of your connection ids; empty for your default profile.",
    )

    class Meta:
        model = StreamingProfile
        fields = [
            "id",
            "name",
            "connection_id",
            *StreamingProfile.STREAMING_FIELDS,
            "transcribe",
            "transcription_engine",
            "transcription_engine_config",
            "transcription_tracks",
            "max_stream_duration",
            "auto_start",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {"max_stream_duration": {"min_value": 1, "max_value": 7 * 24 * 3600}}

    def validate(self, attrs: dict) -> dict:
        partner = self.context["partner"]
        merged = {
            f: attrs.get(f, getattr(self.instance, f, None))
            for f in self.Meta.fields
            if f not in self.Meta.read_only_fields
        }
        connection_id = merged.get("connection_id") or ""
        if (
            connection_id
            and not PartnerConnection.objects.filter(
                partner=partner, connection_id=connection_id
            ).exists()
        ):
            raise serializers.ValidationError({"connection_id": ["is not one of yours"]})
        clash = StreamingProfile.objects.filter(partner=partner, connection_id=connection_id)
        if self.instance is not None:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise serializers.ValidationError(
                {"connection_id": ["already has a profile; change that one instead"]}
            )
        candidate = StreamingProfile(partner=partner, **merged)
        try:
            telnyx_params.validate("streaming_start", candidate.streaming_params())
            if candidate.transcribe:
                telnyx_params.validate("transcription_start", candidate.transcription_params())
        except telnyx_params.ParamsInvalid as exc:
            raise_params_invalid(exc)
        public_stream_url(candidate.stream_url)
        attrs["connection_id"] = connection_id
        return attrs
