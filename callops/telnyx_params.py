"""The vocabulary of Telnyx's parameter rules: what a value of each kind must look like.

``callops.actions`` says which rule applies to which parameter of which action, and a few
rules span several parameters (fork targets, bidirectional codecs, Azure's region). A violation
raises ``ParamsInvalid`` with the field and a message, which the admin, the API and the policy
code all surface as they are. Rules carry what the API needs to describe them (``choices``,
``max_length``), so its serializers are built from the same rules.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from django.conf import settings

from callops.exceptions import CallopsError
from callops.telnyx_spec import PARAMETERS as SDK


class ParamsInvalid(CallopsError):
    """A parameter breaks Telnyx's rules. ``errors`` maps each field to its messages."""

    def __init__(self, errors: Mapping[str, str | list[str]]):
        self.errors = {k: [v] if isinstance(v, str) else list(v) for k, v in errors.items()}
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in self.errors.items()))


Rule = Callable[[Any], str | None]  # returns an error message, or None when the value is fine

# Enums as the SDK declares them (callops/telnyx_spec.py, generated from Telnyx's OpenAPI).
_STREAMING = SDK["streaming_start"]
STREAM_TRACKS = _STREAMING["stream_track"]
STREAM_CODECS = _STREAMING["stream_codec"]
BIDIRECTIONAL_CODECS = _STREAMING["stream_bidirectional_codec"]
BIDIRECTIONAL_MODES = _STREAMING["stream_bidirectional_mode"]
SAMPLING_RATES = _STREAMING["stream_bidirectional_sampling_rate"]
TARGET_LEGS = _STREAMING["stream_bidirectional_target_legs"]
FORK_STREAM_TYPES = SDK["fork_stop"]["stream_type"]  # what a fork may be
FORK_START_STREAM_TYPES = SDK["fork_start"]["stream_type"]  # what fork_start may ask for
# The SDK types this one as a plain string; Telnyx documents these three values.
TRANSCRIPTION_TRACKS = ("inbound", "outbound", "both")
MAX_CLIENT_STATE = 4096
MAX_AUTH_TOKEN = 4000


def one_of(*choices: object) -> Rule:
    def rule(value: Any) -> str | None:
        if value not in choices:
            return f"must be one of {', '.join(map(str, choices))}"
        return None

    rule.choices = choices
    return rule


def text(max_length: int) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, str) or not value:
            return "must be a non-empty string"
        if len(value) > max_length:
            return f"must be at most {max_length} characters"
        return None

    rule.max_length = max_length
    return rule


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def mapping(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be an object"


def websocket_url(value: Any) -> str | None:
    if error := text(2048)(value):
        return error
    schemes = ("wss://", "ws://") if settings.CALLOPS_ALLOW_INSECURE_WS else ("wss://",)
    if not value.lower().startswith(schemes):
        return f"must start with {' or '.join(schemes)}"
    if not re.match(r"^wss?://[^/\s?#]+", value, re.IGNORECASE):
        return "must name a host"
    return None


def custom_parameters(value: Any) -> str | None:
    if not isinstance(value, list) or len(value) > 20:
        return "must be a list of at most 20 {name, value} objects"
    for item in value:
        if (
            not isinstance(item, dict)
            or set(item) != {"name", "value"}
            or not all(isinstance(v, str) and 0 < len(v) <= 256 for v in item.values())
        ):
            return "each item must be {name, value} with non-empty strings of at most 256"
    return None


def udp_target(value: Any) -> str | None:
    """``udp:<ip>:<port>``; IPv6 addresses in brackets (``udp:[2001:db8::1]:5000``)."""
    match = re.fullmatch(r"udp:(\[[0-9A-Fa-f:.]+\]|[0-9.]+):(\d{1,5})", value or "")
    if not isinstance(value, str) or not match:
        return "must be udp:<ip>:<port>"
    try:
        ipaddress.ip_address(match.group(1).strip("[]"))
    except ValueError:
        return "must be udp:<ip>:<port> with an IP address"
    if not 0 < int(match.group(2)) < 65536:
        return "port must be between 1 and 65535"
    return None


def transcription_engine(value: Any) -> str | None:
    return one_of(*settings.TELNYX_TRANSCRIPTION_ENGINES)(value)


def client_state(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be a non-empty base64 string"
    if len(value) > MAX_CLIENT_STATE:
        return f"must be at most {MAX_CLIENT_STATE} characters"
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return "must be valid base64"
    return None


def fork_targets(params: dict) -> dict[str, str]:
    has_target = "target" in params
    has_rx, has_tx = "rx" in params, "tx" in params
    if has_target and (has_rx or has_tx):
        return {"target": "give either target, or rx and tx, not both"}
    if not has_target and not (has_rx and has_tx):
        return {"target": "give target, or both rx and tx"}
    if params.get("stream_type") == "decrypted" and has_target:
        return {"stream_type": "decrypted needs rx and tx, not target"}
    return {}


def bidirectional(params: dict) -> dict[str, str]:
    if "stream_bidirectional_codec" in params and params.get("stream_bidirectional_mode") != "rtp":
        return {"stream_bidirectional_codec": "is used only with stream_bidirectional_mode rtp"}
    return {}


def azure_region(params: dict) -> dict[str, str]:
    config = params.get("transcription_engine_config") or {}
    if params.get("transcription_engine") == "Azure" and not config.get("region"):
        return {"transcription_engine_config": "Azure needs a region"}
    return {}
