"""What partners send and get back. Thin: the command bodies are built from callops.actions,
whose rules (callops.telnyx_params) and the address guard (callops.targets) do the checking."""

from __future__ import annotations

from contextlib import contextmanager

from django.conf import settings
from django.core.validators import ProhibitNullCharactersValidator
from django.db import IntegrityError, transaction
from rest_framework import serializers
from rest_framework.validators import ProhibitSurrogateCharactersValidator

from callops import actions, telnyx_params
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
from callops.targets import UnsafeTarget, check_stream_url, check_udp_target

SECRET_PARAMS = {"stream_auth_token"}


def choice(values, **kwargs) -> serializers.ChoiceField:
    return serializers.ChoiceField(choices=list(values), required=False, **kwargs)


def refuse_unknown(serializer: serializers.Serializer, data: object, message: str) -> None:
    """A key the serializer does not know is refused by name, never silently dropped (its own
    read-only fields are let through: a client may send back what it read)."""
    if isinstance(data, dict) and (unknown := sorted(data.keys() - serializer.fields.keys())):
        raise serializers.ValidationError({name: [message] for name in unknown})


def storable(value: object) -> None:
    """Refuse what PostgreSQL cannot store: NUL, and unpaired surrogates (UTF-8 has no bytes
    for them). DRF's CharField refuses both; a free-form object's keys and values are checked
    here the same way, with the same messages, or they reached the database as a 500."""
    if isinstance(value, dict):
        for key, item in value.items():
            storable(key)
            storable(item)
    elif isinstance(value, list):
        for item in value:
            storable(item)
    elif isinstance(value, str):
        ProhibitNullCharactersValidator()(value)
        ProhibitSurrogateCharactersValidator()(value)


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
    call_control_id = serializers.CharField(
        source="call.call_control_id",
        read_only=True,
        help_text="For a dial, dialing:<id> until Telnyx's answer names the new call.",
    )
    params = serializers.SerializerMethodField()
    applies_to = serializers.SerializerMethodField(
        help_text="What a stop stops: one record, or all of its kind on the call when Telnyx"
        " is given no id (streaming_stop without stream_id stops every stream)."
    )

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
            "settlement",
            "applies_to",
            "created_at",
            "next_attempt_at",
            "sent_at",
            "finished_at",
        ]

    def get_params(self, command: Command) -> dict:
        return {k: v for k, v in command.params.items() if k not in SECRET_PARAMS}

    def get_applies_to(self, command: Command) -> str | None:
        spec = actions.get(command.action)
        if not spec.is_stop:
            return None
        record = getattr(command, f"{spec.record}_id")
        if spec.target_by and not any(command.params.get(p) for p in spec.target_by):
            return f"every {spec.record} of the call"
        return f"{spec.record} {record}" if record else f"every {spec.record} of the call"


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

# How the API describes a parameter whose rule is not a choice or a bounded string.
# Addresses are not trimmed: what the address guard checks is what Telnyx gets, so a stray space
# is refused rather than quietly cut.
RULE_FIELDS = {
    telnyx_params.websocket_url: lambda **kw: serializers.CharField(
        max_length=2048, trim_whitespace=False, **kw
    ),
    telnyx_params.udp_target: lambda **kw: serializers.CharField(
        max_length=64, trim_whitespace=False, **kw
    ),
    telnyx_params.boolean: serializers.BooleanField,
    telnyx_params.mapping: lambda **kw: serializers.DictField(validators=[storable], **kw),
    telnyx_params.custom_parameters: lambda **kw: serializers.ListField(
        child=serializers.DictField(child=serializers.CharField(max_length=256)),
        max_length=20,
        **kw,
    ),
    telnyx_params.transcription_engine: lambda **kw: serializers.ChoiceField(
        choices=list(settings.TELNYX_TRANSCRIPTION_ENGINES), **kw
    ),
}
HELP = {
    "stream_url": "wss:// URL; the profile's when omitted.",
    "target": "udp:<ip>:<port>",
    "rx": "udp:<ip>:<port>",
    "tx": "udp:<ip>:<port>",
}
# Rules whose values name a host Telnyx will connect to: partners may name public hosts only.
TARGET_CHECKS = {
    telnyx_params.websocket_url: check_stream_url,
    telnyx_params.udp_target: check_udp_target,
}


def param_field(name: str, rule: telnyx_params.Rule) -> serializers.Field:
    """The API field of one Telnyx parameter, from its rule. Every one is optional here: the
    profile may fill it in, and ``actions.validate`` says what is still missing."""
    options = {"help_text": HELP[name]} if name in HELP else {}
    if name in SECRET_PARAMS:
        options["write_only"] = True
    if choices := getattr(rule, "choices", None):
        return serializers.ChoiceField(choices=list(choices), required=False, **options)
    if max_length := getattr(rule, "max_length", None):
        return serializers.CharField(required=False, max_length=max_length, **options)
    if hasattr(rule, "min_value"):
        return serializers.IntegerField(
            required=False, min_value=rule.min_value, max_value=rule.max_value, **options
        )
    return RULE_FIELDS[rule](required=False, **options)


class CommandInput(serializers.Serializer):
    """Base of every command body: its Telnyx parameters, and an optional ``client_state``."""

    action: str = ""
    client_state = serializers.CharField(
        required=False,
        max_length=telnyx_params.MAX_CLIENT_STATE,
        help_text="Base64; echoed by Telnyx in the webhooks this command causes.",
    )

    def profile_defaults(self) -> dict:
        profile = self.context.get("profile")
        kind = actions.get(self.action).profile_defaults
        return getattr(profile, f"{kind}_params")() if profile and kind else {}

    def to_internal_value(self, data):
        refuse_unknown(self, data, f"is not a parameter callops sends with {self.action}")
        return super().to_internal_value(data)

    def validate(self, attrs: dict) -> dict:
        client_state = attrs.pop("client_state", None)
        params = {**self.profile_defaults(), **attrs}
        try:
            params = actions.validate(self.action, params, client_state)
        except telnyx_params.ParamsInvalid as exc:
            raise_params_invalid(exc)
        self.check_targets(params)
        return {"params": params, "client_state": client_state}

    def check_targets(self, params: dict) -> None:
        """Partner input goes through the public-address guard."""
        for name, rule in actions.get(self.action).rules.items():
            if name in params and (check := TARGET_CHECKS.get(rule)):
                try:
                    check(params[name])
                except UnsafeTarget as exc:
                    raise serializers.ValidationError({name: [str(exc)]}) from None


def command_input(action: actions.TelnyxAction, base: type = CommandInput) -> type[CommandInput]:
    """The body of one action's endpoint, e.g. ``StreamingStartInput`` for streaming_start."""
    name = "".join(part.title() for part in action.name.split("_")) + "Input"
    # Declared by name, so a parameter may be called what Python cannot spell (dial's "from").
    fields = {param: param_field(param, rule) for param, rule in action.rules.items()}
    return type(name, (base,), {"action": action.name, **fields})


COMMAND_INPUTS = {a.name: command_input(a) for a in actions.ACTIONS.values() if a.api_path}


class DialBase(CommandInput):
    """Dial: the connection must be the partner's; its profile's media go inline unless the
    body gives its own, or the profile streams humans only and machine detection is on (then
    media start once a human is detected)."""

    def profile_defaults(self) -> dict:
        profile = StreamingProfile.for_connection(self.initial_data.get("connection_id") or "")
        if profile is None or not profile.auto_start:
            return {}
        amd = self.initial_data.get("answering_machine_detection", "disabled")
        humans_only = profile.machine_policy == StreamingProfile.MachinePolicy.HUMANS_ONLY
        if humans_only and amd not in ("disabled", "", None):
            return {}
        given = set(self.initial_data) & set(actions.INLINE_MEDIA_RULES)
        return {} if given else profile.inline_media_params()

    def validate(self, attrs: dict) -> dict:
        connection_id = attrs.get("connection_id")
        partner = self.context["partner"]
        if not PartnerConnection.objects.filter(
            partner=partner, connection_id=connection_id
        ).exists():
            raise serializers.ValidationError({"connection_id": ["is not one of yours"]})
        return super().validate(attrs)


DialInput = command_input(actions.get("dial"), base=DialBase)


# --- Streaming profiles -----------------------------------------------------------------------

PROFILE_TAKEN = {"connection_id": ["already has a profile; change that one instead"]}
ONE_PROFILE_PER_CONNECTION = "one_profile_per_connection"  # StreamingProfile's constraint


@contextmanager
def profile_slot_held():
    """``validate`` reads before the save writes: a profile another request commits for the
    same connection in between is caught by the unique constraint, and answered as if
    ``validate`` had seen it."""
    try:
        with transaction.atomic():  # a savepoint: the request's transaction survives the error
            yield
    except IntegrityError as exc:
        constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
        if constraint != ONE_PROFILE_PER_CONNECTION:
            raise
        raise serializers.ValidationError(PROFILE_TAKEN) from None


class StreamingProfileSerializer(serializers.ModelSerializer):
    def to_internal_value(self, data):
        refuse_unknown(self, data, "is not a setting of a streaming profile")
        return super().to_internal_value(data)

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
            "answer_policy",
            "reject_cause",
            "machine_policy",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "max_stream_duration": {"min_value": 1, "max_value": 7 * 24 * 3600},
            "stream_url": {"trim_whitespace": False},  # checked as sent (see RULE_FIELDS)
            "transcription_engine_config": {"validators": [storable]},
        }

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
            raise serializers.ValidationError(PROFILE_TAKEN)
        candidate = StreamingProfile(partner=partner, **merged)
        try:
            actions.validate("streaming_start", candidate.streaming_params())
            if candidate.transcribe:
                actions.validate("transcription_start", candidate.transcription_params())
        except telnyx_params.ParamsInvalid as exc:
            raise_params_invalid(exc)
        public_stream_url(candidate.stream_url)
        attrs["connection_id"] = connection_id
        return attrs

    def create(self, validated_data):
        with profile_slot_held():
            return super().create(validated_data)

    def update(self, instance, validated_data):
        with profile_slot_held():
            return super().update(instance, validated_data)
