"""What each command accepts and does to a call: the command API's table.

One entry per action on a call (TELNYX.md sections 2 and 5): the validators its body must pass,
which calls accept it (`ActionSpec.accepts`), and what applying it changes in the call's
`CallState` (`ActionSpec.effects`). `DIAL` is the same for ``POST /v2/calls``, which places a
call instead of acting on one. Telnyx reports every invalid parameter at once, so `problems`
runs every validator and returns all it found.

These rules are the simulator's own reading of Telnyx's reference, written apart from callops'
on purpose: a test against the simulator then checks callops against a second opinion.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ACTIONS", "DIAL", "ActionSpec", "Problem", "inline_effects", "problems"]

Problem = tuple[str, str]
Validator = Callable[[dict[str, Any]], Problem | None]


def _one_of(name: str, choices: Iterable[Any], *, required: bool = False) -> Validator:
    allowed = tuple(choices)

    def check(body: dict[str, Any]) -> Problem | None:
        if required and name not in body:
            return f"/{name}", f"{name} is required."
        if name in body and body[name] not in allowed:
            return f"/{name}", f"{name} must be one of {', '.join(map(str, allowed))}."
        return None

    return check


def _string(name: str, *, required: bool = False, max_length: int | None = None) -> Validator:
    def check(body: dict[str, Any]) -> Problem | None:
        if name not in body:
            return (f"/{name}", f"{name} is required.") if required else None
        value = body[name]
        if not isinstance(value, str) or not value:
            return f"/{name}", f"{name} must be a non-empty string."
        if max_length is not None and len(value) > max_length:
            return f"/{name}", f"{name} must be at most {max_length} characters."
        return None

    return check


def _websocket_url(name: str, *, required: bool = True) -> Validator:
    def check(body: dict[str, Any]) -> Problem | None:
        if not required and name not in body:
            return None
        value = body.get(name)
        if not isinstance(value, str) or not value:
            return f"/{name}", f"{name} is required."
        parts = urlsplit(value)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            return f"/{name}", f"{name} must be a ws:// or wss:// URL."
        return None

    return check


def _base64(name: str) -> Validator:
    def check(body: dict[str, Any]) -> Problem | None:
        if name not in body:
            return None
        value = body[name]
        try:
            if not isinstance(value, str):
                raise ValueError
            base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            return f"/{name}", f"{name} must be a valid Base64 string."
        return None

    return check


def _integer(name: str, low: int, high: int) -> Validator:
    def check(body: dict[str, Any]) -> Problem | None:
        value = body.get(name)
        if name in body and (
            not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
        ):
            return f"/{name}", f"{name} must be an integer from {low} to {high}."
        return None

    return check


def _boolean(name: str) -> Validator:
    def check(body: dict[str, Any]) -> Problem | None:
        if name in body and not isinstance(body[name], bool):
            return f"/{name}", f"{name} must be true or false."
        return None

    return check


def _destination(body: dict[str, Any]) -> Problem | None:
    """``to``: one number or SIP URI, or a non-empty list of them (Telnyx dials them all)."""
    value = body.get("to")
    if value is None:
        return "/to", "to is required."
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        return "/to", "to must be a non-empty string or a list of them."
    return None


# Telnyx documents fork targets as "udp:<ip>:<port>".
_UDP_TARGET = re.compile(r"^udp:[^:\s]+:\d{1,5}$")


def _fork_targets(body: dict[str, Any]) -> Problem | None:
    for name in ("target", "rx", "tx"):
        value = body.get(name)
        if value is not None and not (isinstance(value, str) and _UDP_TARGET.match(value)):
            return f"/{name}", f"{name} must look like udp:<ip>:<port>."
    has_pair = bool(body.get("rx")) and bool(body.get("tx"))
    if body.get("stream_type") == "decrypted" and not has_pair:
        return "/rx", "stream_type decrypted requires both rx and tx."
    if not body.get("target") and not has_pair:
        return "/target", "Either target or both rx and tx are required."
    return None


def _custom_parameters(body: dict[str, Any]) -> Problem | None:
    value = body.get("custom_parameters")
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) for item in value
    ):
        return "/custom_parameters", "custom_parameters must be a list of {name, value} objects."
    return None


def _azure_region(body: dict[str, Any]) -> Problem | None:
    if body.get("transcription_engine") != "Azure":
        return None
    config = body.get("transcription_engine_config")
    if not isinstance(config, dict) or not config.get("region"):
        return "/transcription_engine_config/region", "The Azure engine requires a region."
    return None


# Every action takes these two.
_COMMON: tuple[Validator, ...] = (_base64("client_state"), _string("command_id"))

_CODECS = ("PCMU", "PCMA", "G722", "OPUS", "AMR-WB", "L16")
REJECT_CAUSES = ("CALL_REJECTED", "NOT_FOUND", "TEMPORARILY_UNAVAILABLE", "USER_BUSY")
MACHINE_DETECTION = (
    "premium",
    "premium_ios_call_screening_detection",
    "detect",
    "detect_beep",
    "detect_words",
    "greeting_end",
    "disabled",
)


def _stream_options(*, url_required: bool) -> tuple[Validator, ...]:
    """streaming_start's body; answer and dial take the same options inline."""
    return (
        _websocket_url("stream_url", required=url_required),
        _one_of("stream_track", ("inbound_track", "outbound_track", "both_tracks")),
        _one_of("stream_codec", (*_CODECS, "default")),
        _string("stream_auth_token", max_length=4000),
        _one_of("stream_bidirectional_mode", ("mp3", "rtp")),
        _one_of("stream_bidirectional_codec", _CODECS),
        _one_of("stream_bidirectional_sampling_rate", (8000, 16000, 22050, 24000, 48000)),
        _one_of("stream_bidirectional_target_legs", ("both", "self", "opposite")),
    )


_TRANSCRIPTION_START: tuple[Validator, ...] = (
    # Engines are not checked: Telnyx keeps adding names.
    _one_of("transcription_tracks", ("inbound", "outbound", "both")),
    _azure_region,
)


def _transcription_config(body: dict[str, Any]) -> Problem | None:
    """Inline ``transcription_config`` is a transcription_start body, checked as one."""
    config = body.get("transcription_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        return "/transcription_config", "transcription_config must be an object."
    for check in _TRANSCRIPTION_START:
        problem = check(config)
        if problem is not None:
            return f"/transcription_config{problem[0]}", problem[1]
    return None


# What answer and dial start by themselves (TELNYX.md section 5).
_INLINE_MEDIA: tuple[Validator, ...] = (
    *_stream_options(url_required=False),
    _boolean("transcription"),
    _transcription_config,
    _boolean("send_silence_when_idle"),
)

_ENDED = {"ended": True, "streaming": False, "forking": False, "transcribing": False}


def inline_effects(body: dict[str, Any]) -> dict[str, bool]:
    """The media an answer or a dial starts by itself: a stream, a transcription."""
    effects = {}
    if body.get("stream_url"):
        effects["streaming"] = True
    if body.get("transcription") is True:
        effects["transcribing"] = True
    return effects


def _constant(**effects: bool) -> Callable[[dict[str, Any]], dict[str, bool]]:
    return lambda body: effects


@dataclass(frozen=True)
class ActionSpec:
    """How the simulator checks and applies one command.

    ``accepts`` names the calls it is valid on: ``"parked"``, an incoming call not answered
    yet (answer, reject); ``"answered"`` (the media actions: Telnyx's reference says answer
    must come first); ``"live"``, any call not ended (hangup). ``effects(body)`` gives the
    `CallState` fields applying it sets.
    """

    validators: tuple[Validator, ...]
    accepts: str
    effects: Callable[[dict[str, Any]], dict[str, bool]]


ACTIONS: dict[str, ActionSpec] = {
    "answer": ActionSpec(
        validators=_INLINE_MEDIA,
        accepts="parked",
        effects=lambda body: {"answered": True, **inline_effects(body)},
    ),
    "reject": ActionSpec(
        validators=(_one_of("cause", REJECT_CAUSES, required=True),),
        accepts="parked",
        effects=_constant(**_ENDED),
    ),
    "hangup": ActionSpec(
        validators=(_string("reason", max_length=255),),
        accepts="live",
        effects=_constant(**_ENDED),
    ),
    "streaming_start": ActionSpec(
        validators=(*_stream_options(url_required=True), _custom_parameters),
        accepts="answered",
        # One stream or fork per call: starting one replaces the other.
        effects=_constant(streaming=True, forking=False),
    ),
    "streaming_stop": ActionSpec(
        validators=(_string("stream_id"),), accepts="answered", effects=_constant(streaming=False)
    ),
    "fork_start": ActionSpec(
        validators=(_one_of("stream_type", ("raw", "decrypted")), _fork_targets),
        accepts="answered",
        effects=_constant(forking=True, streaming=False),
    ),
    "fork_stop": ActionSpec(
        validators=(_one_of("stream_type", ("raw", "decrypted")),),
        accepts="answered",
        effects=_constant(forking=False),
    ),
    "transcription_start": ActionSpec(
        validators=_TRANSCRIPTION_START, accepts="answered", effects=_constant(transcribing=True)
    ),
    "transcription_stop": ActionSpec(
        validators=(), accepts="answered", effects=_constant(transcribing=False)
    ),
}

# POST /v2/calls. Its effects are those of the far end answering, applied only then.
DIAL = ActionSpec(
    validators=(
        _string("connection_id", required=True),
        _destination,
        _string("from", required=True),
        _integer("timeout_secs", 5, 600),
        _integer("time_limit_secs", 1, 14400),
        _one_of("answering_machine_detection", MACHINE_DETECTION),
        _boolean("stream_establish_before_call_originate"),
        *_INLINE_MEDIA,
    ),
    accepts="live",
    effects=lambda body: {"answered": True, **inline_effects(body)},
)


def problems(action: str, body: dict[str, Any]) -> list[Problem]:
    spec = DIAL if action == "dial" else ACTIONS[action]
    checks = (*_COMMON, *spec.validators)
    return [problem for check in checks if (problem := check(body)) is not None]
