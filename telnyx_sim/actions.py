"""What each of the six media actions accepts and does to a call: the command API's table.

One entry per action (TELNYX.md section 2): the validators its body must pass, and the
`CallState` feature it turns on or off. Telnyx reports every invalid parameter at once, so
`problems` runs every validator and returns all it found.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ACTIONS", "ActionSpec", "Problem", "problems"]

Problem = tuple[str, str]
Validator = Callable[[dict[str, Any]], Problem | None]


def _one_of(name: str, choices: Iterable[Any]) -> Validator:
    allowed = tuple(choices)

    def check(body: dict[str, Any]) -> Problem | None:
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


def _websocket_url(name: str) -> Validator:
    def check(body: dict[str, Any]) -> Problem | None:
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


@dataclass(frozen=True)
class ActionSpec:
    """How the simulator checks and applies one action."""

    validators: tuple[Validator, ...]
    # The CallState flag the action turns on or off.
    feature: str
    on: bool


ACTIONS: dict[str, ActionSpec] = {
    "streaming_start": ActionSpec(
        validators=(
            _websocket_url("stream_url"),
            _one_of("stream_track", ("inbound_track", "outbound_track", "both_tracks")),
            _one_of("stream_codec", (*_CODECS, "default")),
            _string("stream_auth_token", max_length=4000),
            _one_of("stream_bidirectional_mode", ("mp3", "rtp")),
            _one_of("stream_bidirectional_codec", _CODECS),
            _one_of("stream_bidirectional_sampling_rate", (8000, 16000, 22050, 24000, 48000)),
            _one_of("stream_bidirectional_target_legs", ("both", "self", "opposite")),
            _custom_parameters,
        ),
        feature="streaming",
        on=True,
    ),
    "streaming_stop": ActionSpec(validators=(_string("stream_id"),), feature="streaming", on=False),
    "fork_start": ActionSpec(
        validators=(_one_of("stream_type", ("raw", "decrypted")), _fork_targets),
        feature="forking",
        on=True,
    ),
    "fork_stop": ActionSpec(
        validators=(_one_of("stream_type", ("raw", "decrypted")),), feature="forking", on=False
    ),
    "transcription_start": ActionSpec(
        # Engines are not checked: Telnyx keeps adding names.
        validators=(
            _one_of("transcription_tracks", ("inbound", "outbound", "both")),
            _azure_region,
        ),
        feature="transcribing",
        on=True,
    ),
    "transcription_stop": ActionSpec(validators=(), feature="transcribing", on=False),
}


def problems(action: str, body: dict[str, Any]) -> list[Problem]:
    checks = (*_COMMON, *ACTIONS[action].validators)
    return [problem for check in checks if (problem := check(body)) is not None]
