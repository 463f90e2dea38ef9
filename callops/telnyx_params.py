"""The vocabulary of Telnyx's parameter rules: what a value of each kind must look like.

``callops.actions`` says which rule applies to which parameter of which action, and a few
rules span several parameters (fork targets, bidirectional codecs, an engine's config). A violation
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
from callops.telnyx_spec import (
    TRANSCRIPTION_CONFIG_REQUIRED,
    TRANSCRIPTION_CONFIG_SELECTOR,
    TRANSCRIPTION_CONFIGS,
    TRANSCRIPTION_ENGINES,
)


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
REJECT_CAUSES = SDK["reject"]["cause"]
MACHINE_DETECTION = SDK["dial"]["answering_machine_detection"]
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


def integer(minimum: int, maximum: int) -> Rule:
    def rule(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be a whole number"
        if not minimum <= value <= maximum:
            return f"must be between {minimum} and {maximum}"
        return None

    rule.min_value, rule.max_value = minimum, maximum
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


# Telnyx's speech-to-text guide names Google the default engine (the SDK's docstrings do not
# say): a config sent without a transcription_engine is checked as Google's.
DEFAULT_TRANSCRIPTION_ENGINE = "Google"
CONFIG = "transcription_engine_config"
# Inside a config, the key that restates which engine (or Deepgram model) it is for.
CONFIG_ENGINE = "transcription_engine"
SCALARS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "bool": (lambda v: isinstance(v, bool), "must be true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be a whole number"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "must be a number"),
    "str": (lambda v: isinstance(v, str), "must be a string"),
}


def transcription_config(params: dict) -> dict[str, str]:
    """``transcription_engine_config`` against the config type of the chosen engine, as the
    SDK declares it (``TRANSCRIPTION_CONFIGS``): every key known, of its type or enum, and
    present where the SDK requires it. Errors name the key: ``transcription_engine_config.foo``;
    a missing key is reported on ``transcription_engine_config`` itself.

    Two of the SDK's required keys are not required here. ``transcription_engine`` inside the
    config only restates the call's own transcription_engine, so it may be left out but must
    agree. The key that picks one of an engine's several config types (Deepgram's
    ``transcription_model``) is needed once there is a config to check, not before: without a
    config (or with an empty one) Telnyx uses the engine's defaults, unless the engine cannot
    work without a setting, as Azure cannot without its region.
    """
    named = "transcription_engine" in params
    engine = params.get("transcription_engine", DEFAULT_TRANSCRIPTION_ENGINE)
    owner = engine if named else f"{engine} (Telnyx's default engine)"
    types = TRANSCRIPTION_ENGINES.get(engine)
    if types is None:  # TELNYX_TRANSCRIPTION_ENGINES may name one; callops.checks warns of it
        return {"transcription_engine": "is not an engine the telnyx SDK lists"}
    config = params.get(CONFIG) or {}
    if not isinstance(config, dict):
        return {CONFIG: "must be an object"}
    selector = TRANSCRIPTION_CONFIG_SELECTOR.get(engine)
    if not config:
        needed = set.intersection(*(set(TRANSCRIPTION_CONFIG_REQUIRED[t]) for t in types))
        return _missing(types[0], config, needed - {CONFIG_ENGINE, selector}, CONFIG, owner)
    shape = types[0]
    if selector is not None:
        by_value = {value: t for t in types for value in TRANSCRIPTION_CONFIGS[t][selector]}
        chosen = config.get(selector)
        if chosen is None:
            return {CONFIG: f"{owner} needs a {selector} (one of {', '.join(by_value)})"}
        if not isinstance(chosen, str) or chosen not in by_value:
            return {f"{CONFIG}.{selector}": f"must be one of {', '.join(by_value)}"}
        shape, owner = by_value[chosen], f"{owner} {chosen}"
    errors = _config_errors(shape, config, CONFIG, owner, implied={CONFIG_ENGINE})
    agree = TRANSCRIPTION_CONFIGS[shape][CONFIG_ENGINE]
    if CONFIG_ENGINE in config and config[CONFIG_ENGINE] not in agree:
        errors[f"{CONFIG}.{CONFIG_ENGINE}"] = (
            f"must be {' or '.join(agree)} to agree with transcription_engine {owner}"
            + ("" if named else "; give transcription_engine to choose another")
        )
    return errors


def _config_errors(
    kind: object, value: Any, path: str, owner: str, implied: frozenset | set = frozenset()
) -> dict[str, str]:
    """What is wrong with ``value`` for its description in ``TRANSCRIPTION_CONFIGS`` (an enum,
    a scalar's name, ``list[X]``, ``dict[str, X]`` or an object's name), by the path of each
    bad part: ``transcription_engine_config.speech_context[0].boost``. ``implied``: required
    keys of the object that may be left out."""
    if isinstance(kind, tuple):
        if any(type(value) is type(choice) and value == choice for choice in kind):
            return {}
        return {path: f"must be one of {', '.join(map(str, kind))}"}
    if kind in SCALARS:
        fits, message = SCALARS[kind]
        return {} if fits(value) else {path: message}
    errors: dict[str, str] = {}
    if kind.startswith("list["):
        if not isinstance(value, list):
            return {path: "must be a list"}
        for i, item in enumerate(value):
            errors.update(_config_errors(kind[5:-1], item, f"{path}[{i}]", owner))
        return errors
    if kind.startswith("dict[str, "):
        if not isinstance(value, dict):
            return {path: "must be an object"}
        for key, item in value.items():
            errors.update(_config_errors(kind[10:-1], item, f"{path}.{key}", owner))
        return errors
    if not isinstance(value, dict):  # an object of a known shape
        return {path: "must be an object"}
    required = set(TRANSCRIPTION_CONFIG_REQUIRED[kind]) - set(implied)
    errors.update(_missing(kind, value, required, path, owner))
    fields = TRANSCRIPTION_CONFIGS[kind]
    for key, item in value.items():
        if key not in fields:
            errors[f"{path}.{key}"] = f"is not a setting of {owner}"
        else:
            errors.update(_config_errors(fields[key], item, f"{path}.{key}", owner))
    return errors


def _missing(kind: str, value: dict, keys: set, path: str, owner: str) -> dict[str, str]:
    """The ``keys`` of object ``kind`` that ``value`` lacks, in one message on the object."""
    fields = TRANSCRIPTION_CONFIGS[kind]
    needs = [
        f"a {key}"
        + (f" (one of {', '.join(fields[key])})" if isinstance(fields[key], tuple) else "")
        for key in sorted(keys - value.keys())
    ]
    return {path: f"{owner} needs {' and '.join(needs)}"} if needs else {}
