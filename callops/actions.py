"""The Telnyx call-control actions callops sends: one declarative entry each.

Everything that differs between actions is said here and nowhere else: the Telnyx URL name (also
``Command.action``), the SDK method, the parameter rules, the record a start creates or a stop
targets, the stop that ends what a start began, the webhooks that confirm it, and how the partner
API and the admin name it. The outbox (``callops.commands``), validation, the sweeper
(``callops.maintenance``), the serializers, the API's URLs and the admin's actions all read this
table. Adding an action is one entry here plus its tests.

This module knows no models: the record is named by the ``Command`` field that points at it
(``stream``, ``fork``, ``transcription``), so ``models.py`` can build its choices and constraints
from the table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from callops import telnyx_params as p

Check = Callable[[dict], dict[str, str]]


@dataclass(frozen=True)
class TelnyxAction:
    name: str  # Telnyx's URL name: POST /calls/{id}/actions/{name}
    sdk_method: str  # on ``client.calls.actions``
    rules: Mapping[str, p.Rule]
    required: tuple[str, ...] = ()
    checks: tuple[Check, ...] = ()  # rules that span several parameters
    # The Command field of the record this action creates (a start) or targets (a stop).
    record: str | None = None
    starts: bool = False
    stop: str | None = None  # the action that ends what this one started
    # Webhooks whose arrival proves Telnyx applied it (TELNYX.md section 6).
    confirmed_by: tuple[str, ...] = ()
    # A start's record: record field -> parameter it is copied from (and its empty value).
    intent: Mapping[str, tuple[str, Any]] = field(default_factory=dict)
    # A stop sent for a known record: stop parameter -> record field that supplies it.
    stop_params: Mapping[str, str] = field(default_factory=dict)
    # A stop sent without a record (a partner's, an operator's) finds it by these parameters.
    target_by: Mapping[str, str] = field(default_factory=dict)
    # Partner defaults taken from the streaming profile for what the partner left out.
    profile_defaults: str | None = None  # "streaming" | "transcription"
    api_path: str = ""  # under /api/v1/calls/{id}/
    summary: str = ""  # the partner API's and the admin's name for it
    # False: not an action on a call (dial is ``client.calls.dial``, POST /calls).
    on_call: bool = True
    # Media started by this command itself (answer and dial): start action -> (the parameter
    # that switches it on, the parameter holding that start's own body, or None: this body).
    inline: Mapping[str, tuple[str, str | None]] = field(default_factory=dict)
    # How the records show Telnyx applied it, when its answer never came (TELNYX.md section 6):
    # "record_started", "record_stopped", "call_answered", "call_ended", or None (no evidence).
    confirms: str | None = None
    # An outcome still unknown once Telnyx's command_id window has passed: "resend" where a
    # second copy is harmless (stops, answer, reject, hang-up), "fail" where it would start a
    # second stream or place a second call.
    after_window: str = "resend"
    # Command fields of records that must have none open on the call before this starts.
    one_open: tuple[str, ...] = ()

    @property
    def is_stop(self) -> bool:
        return self.record is not None and not self.starts

    @property
    def records(self) -> tuple[str, ...]:
        """The Command fields of the records this command creates (a start's, or inline)."""
        if self.starts:
            return (self.record,)
        return tuple(ACTIONS[start].record for start in self.inline)

    def params_for_stop_of(self, record: object) -> dict[str, Any]:
        """The parameters of this stop aimed at ``record``: only what the record knows."""
        values = {param: getattr(record, attr, "") for param, attr in self.stop_params.items()}
        return {k: v for k, v in values.items() if v}


def _inline_media(params: dict) -> dict[str, str]:
    """Answer and dial: stream options need a stream_url, a transcription_config needs
    transcription on, and that config is a transcription_start body (checked as one)."""
    errors: dict[str, str] = {}
    if "stream_url" not in params:
        for name in params.keys() & STREAM_RULES.keys():
            errors[name] = "is used only with stream_url"
    config = params.get("transcription_config")
    if config is not None and params.get("transcription") is not True:
        errors["transcription_config"] = "is used only with transcription true"
    elif isinstance(config, dict):
        try:
            validate("transcription_start", config)
        except p.ParamsInvalid as exc:
            for name, messages in exc.errors.items():
                errors[f"transcription_config.{name}"] = " ".join(messages)
    if "stream_url" in params:
        errors.update(p.bidirectional(params))
    return errors


# What streaming_start takes and answer and dial take inline (TELNYX.md section 5).
STREAM_RULES: dict[str, p.Rule] = {
    "stream_url": p.websocket_url,
    "stream_track": p.one_of(*p.STREAM_TRACKS),
    "stream_codec": p.one_of(*p.STREAM_CODECS),
    "stream_auth_token": p.text(p.MAX_AUTH_TOKEN),
    "stream_bidirectional_mode": p.one_of(*p.BIDIRECTIONAL_MODES),
    "stream_bidirectional_codec": p.one_of(*p.BIDIRECTIONAL_CODECS),
    "stream_bidirectional_sampling_rate": p.one_of(*p.SAMPLING_RATES),
    "stream_bidirectional_target_legs": p.one_of(*p.TARGET_LEGS),
}
INLINE_MEDIA_RULES: dict[str, p.Rule] = {
    **STREAM_RULES,
    "transcription": p.boolean,
    "transcription_config": p.mapping,
    "send_silence_when_idle": p.boolean,
}
INLINE = {
    "streaming_start": ("stream_url", None),
    "transcription_start": ("transcription", "transcription_config"),
}

ACTIONS: dict[str, TelnyxAction] = {
    a.name: a
    for a in (
        TelnyxAction(
            name="answer",
            sdk_method="answer",
            rules=INLINE_MEDIA_RULES,
            checks=(_inline_media,),
            inline=INLINE,
            confirmed_by=("call.answered",),
            confirms="call_answered",
            api_path="answer/",
            summary="Answer",
        ),
        TelnyxAction(
            name="reject",
            sdk_method="reject",
            required=("cause",),
            rules={"cause": p.one_of(*p.REJECT_CAUSES)},
            confirmed_by=("call.hangup",),
            confirms="call_ended",
            api_path="reject/",
            summary="Reject",
        ),
        TelnyxAction(
            name="hangup",
            sdk_method="hangup",
            rules={"reason": p.text(255)},
            confirmed_by=("call.hangup",),
            confirms="call_ended",
            api_path="hangup/",
            summary="Hang up",
        ),
        TelnyxAction(
            name="dial",
            sdk_method="dial",
            on_call=False,
            required=("connection_id", "to", "from"),
            rules={
                "connection_id": p.text(255),
                "to": p.text(255),
                "from": p.text(255),
                "from_display_name": p.text(128),
                "timeout_secs": p.integer(5, 600),
                "time_limit_secs": p.integer(1, 14400),
                "answering_machine_detection": p.one_of(*p.MACHINE_DETECTION),
                "stream_establish_before_call_originate": p.boolean,
                **INLINE_MEDIA_RULES,
            },
            checks=(_inline_media,),
            inline=INLINE,
            confirmed_by=("call.initiated",),
            # Telnyx's answer is the only way to learn the new call's id: without it callops
            # cannot tell its call from any other, and a second dial would place a second call.
            after_window="fail",
            summary="Dial",
        ),
        TelnyxAction(
            name="streaming_start",
            sdk_method="start_streaming",
            required=("stream_url",),
            rules={
                **STREAM_RULES,
                "custom_parameters": p.custom_parameters,
                "enable_dialogflow": p.boolean,
                "dialogflow_config": p.mapping,
            },
            checks=(p.bidirectional,),
            record="stream",
            starts=True,
            stop="streaming_stop",
            confirmed_by=("streaming.started",),
            confirms="record_started",
            after_window="fail",
            one_open=("stream", "fork"),
            intent={
                "stream_url": ("stream_url", ""),
                "track": ("stream_track", ""),
                "codec": ("stream_codec", ""),
            },
            profile_defaults="streaming",
            api_path="streaming/",
            summary="Start streaming",
        ),
        TelnyxAction(
            name="streaming_stop",
            sdk_method="stop_streaming",
            rules={"stream_id": p.text(255)},
            record="stream",
            confirmed_by=("streaming.stopped",),
            confirms="record_stopped",
            stop_params={"stream_id": "stream_id"},
            target_by={"stream_id": "stream_id"},
            api_path="streaming/stop/",
            summary="Stop streaming",
        ),
        TelnyxAction(
            name="fork_start",
            sdk_method="start_forking",
            rules={
                "target": p.udp_target,
                "rx": p.udp_target,
                "tx": p.udp_target,
                "stream_type": p.one_of(*p.FORK_START_STREAM_TYPES),
            },
            checks=(p.fork_targets,),
            record="fork",
            starts=True,
            stop="fork_stop",
            confirmed_by=("call.fork.started",),
            confirms="record_started",
            after_window="fail",
            one_open=("stream", "fork"),
            intent={
                "rx": ("rx", ""),
                "tx": ("tx", ""),
                "target": ("target", ""),
                "stream_type": ("stream_type", ""),
            },
            api_path="forking/",
            summary="Start forking",
        ),
        TelnyxAction(
            name="fork_stop",
            sdk_method="stop_forking",
            rules={"stream_type": p.one_of(*p.FORK_STREAM_TYPES)},
            record="fork",
            confirmed_by=("call.fork.stopped",),
            confirms="record_stopped",
            stop_params={"stream_type": "stream_type"},
            api_path="forking/stop/",
            summary="Stop forking",
        ),
        TelnyxAction(
            name="transcription_start",
            sdk_method="start_transcription",
            rules={
                "transcription_engine": p.transcription_engine,
                "transcription_engine_config": p.mapping,
                "transcription_tracks": p.one_of(*p.TRANSCRIPTION_TRACKS),
            },
            checks=(p.transcription_config,),
            record="transcription",
            starts=True,
            stop="transcription_stop",
            # Telnyx sends no "transcription started": the first segment is the evidence.
            confirmed_by=("call.transcription",),
            confirms="record_started",
            after_window="fail",
            intent={
                "engine": ("transcription_engine", ""),
                "tracks": ("transcription_tracks", ""),
                "engine_config": ("transcription_engine_config", {}),
            },
            profile_defaults="transcription",
            api_path="transcription/",
            summary="Start transcription",
        ),
        TelnyxAction(
            name="transcription_stop",
            sdk_method="stop_transcription",
            rules={},
            record="transcription",
            # Telnyx sends no webhook when transcription stops: its 200 is the evidence.
            api_path="transcription/stop/",
            summary="Stop transcription",
        ),
    )
}

# Parameters Telnyx documents (TELNYX.md) that this SDK version does not name: sent as extra body.
NOT_IN_SDK = {
    "fork_start": {"target"},
    "answer": {"stream_auth_token", "stream_bidirectional_sampling_rate"},
}

# The stop for each kind of record, in the table's order: what the sweeper and the admin send.
STOPS: dict[str, TelnyxAction] = {a.record: a for a in ACTIONS.values() if a.is_stop}


def get(name: str) -> TelnyxAction:
    return ACTIONS[name]


def validate(action: str, params: Mapping[str, Any], state: str | None = None) -> dict[str, Any]:
    """Return the parameters to send, or raise ``ParamsInvalid`` naming every bad field.

    ``None`` values count as absent. ``client_state`` and ``command_id`` are not parameters:
    callops sets the command_id, and client_state is validated here but stored on the command.
    """
    spec = ACTIONS.get(action)
    if spec is None:
        raise p.ParamsInvalid({"action": f"must be one of {', '.join(ACTIONS)}"})
    if not isinstance(params, Mapping):
        raise p.ParamsInvalid({"params": "must be an object"})
    cleaned = {k: v for k, v in params.items() if v is not None}
    errors: dict[str, str] = {}
    for name in cleaned.keys() - spec.rules.keys():
        errors[name] = f"is not a parameter of {action}"
    for name in spec.required:
        if name not in cleaned:
            errors[name] = "is required"
    for name, value in cleaned.items():
        rule = spec.rules.get(name)
        if rule and (message := rule(value)):
            errors[name] = message
    if state is not None and (message := p.client_state(state)):
        errors["client_state"] = message
    if not errors:
        for check in spec.checks:
            errors.update(check(cleaned))
    if errors:
        raise p.ParamsInvalid(errors)
    return cleaned
