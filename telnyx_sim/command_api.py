"""A local stand-in for the Telnyx Call Control command API.

`TelnyxAPISimulator` serves ``POST /v2/calls/{call_control_id}/actions/{action}`` for the
actions callops sends (answer, reject, hangup and the six media actions) and ``POST /v2/calls``
(dial), answering with Telnyx's success and error shapes (TELNYX.md sections 2 and 5). Point
the real SDK at it::

    with TelnyxAPISimulator() as sim:
        client = telnyx.Telnyx(api_key=sim.api_key, base_url=sim.base_url, max_retries=0, timeout=5)
        client.calls.actions.start_streaming("v3:abc", stream_url="wss://media.example/ws")
        assert sim.commands(action="streaming_start")

It is stdlib-only and imports nothing from Django or callops, so any process (a test, a Celery
worker, a benchmark) can run one. What each action accepts is the table in `telnyx_sim.actions`.

Request pipeline, first match answers:

1. an injected fault (`inject`) matching the action / call;
2. 401 without the right ``Authorization: Bearer <api_key>``;
3. 404 for any other method or path, or an action the table does not have;
4. 429 above `rate_limit` requests per `rate_window` seconds (all calls together);
5. 400 for a body that is not a JSON object;
6. 422 ``90015`` for an unknown call (unless `accept_unknown_calls`), ``90018`` for an ended one;
7. 200 without applying it again for a `command_id` already applied to the same call within
   `command_id_ttl` seconds, whatever the call's state now (the retry of an answer whose
   answer was lost must not be told the call is answered);
8. 422 ``90019`` / ``90020`` for a command the call is not in a state to take (below);
9. 422 ``10015`` for invalid parameters (every problem found, one error each);
10. 200, applied.

An incoming call is parked until ``answer`` (TELNYX.md section 5); an outgoing one rings until
the far end answers. Until then only answer, reject and hangup are accepted (hangup alone on
an outgoing call), and anything else is refused. Telnyx documents the rule but not its error,
so the simulator's choice is::

    422 {"errors": [{"code": "90019", "title": "Call not answered",
                     "detail": "streaming_start needs an answered call: until the call is
                                answered only answer, reject and hangup are accepted."}]}

and answer or reject on a call that is not a parked incoming one (already answered, or
outgoing) gets 422 ``{"code": "90020", "title": "Call cannot be answered", "detail": ...}``.

``POST /v2/calls`` answers ``{"data": {"call_control_id", "call_leg_id", "call_session_id",
"is_alive": false, "record_type": "call"}}`` and registers the new outgoing call. A dial that
repeats a ``command_id`` of the same ``connection_id`` within `command_id_ttl` places nothing
and answers the first dial's call again (Telnyx does not say what it answers; this is the
kinder reading, which lets a retry after a lost answer learn its call).

Telnyx does not publish the order of its own checks; this one is chosen so a test can aim at
exactly one failure. Every request, whatever its outcome, lands in the log (`requests`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from telnyx_sim.actions import ACTIONS, DIAL, problems

__all__ = ["CallState", "CommandRecord", "Fault", "TelnyxAPISimulator"]

logger = logging.getLogger(__name__)

JSON = "application/json"


# --- Records and state ------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandRecord:
    """One HTTP request the simulator received, with the answer it gave.

    ``status`` is 0 when the connection was dropped without an answer. ``applied`` is true only
    when the command changed the call's state (so not for errors or duplicates); with
    ``inject(apply=True)`` a command can be applied although the client saw a fault.
    ``result`` is the ``data`` of the success answer, whether or not the client got it: for
    a dial, the new call's ids (``call_control_id`` names the call for every command).
    """

    monotonic: float
    wall_time: float
    method: str
    path: str
    action: str | None
    call_control_id: str | None
    body: Any
    command_id: str | None
    status: int
    authorized: bool
    duplicate: bool = False
    applied: bool = False
    fault: bool = False
    result: dict[str, Any] | None = None


@dataclass
class CallState:
    """What Telnyx would know about one call: its direction, whether it has been answered or
    has ended, and the media features on.

    A call added with `TelnyxAPISimulator.add_call` is answered unless told otherwise, as is
    an unknown call accepted with ``accept_unknown_calls`` (unless its first command is answer
    or reject, which finds it parked): tests of one media command need no ceremony.
    """

    call_control_id: str
    direction: str = "incoming"
    answered: bool = True
    ended: bool = False
    streaming: bool = False
    forking: bool = False
    transcribing: bool = False
    # (action, body) for every applied command, in order.
    actions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Fault:
    """An injected response, returned by `TelnyxAPISimulator.inject`.

    ``remaining`` counts down as requests consume it (None: never runs out). With ``every``
    n, only every n-th matching request gets it; ``seen`` counts the matching ones.
    """

    status: int = 500
    body: Any = None
    headers: Mapping[str, str] | None = None
    remaining: int | None = 1
    delay: float = 0.0
    drop: bool = False
    apply: bool = False
    action: str | None = None
    call_control_id: str | None = None
    every: int = 1
    seen: int = 0

    def matches(self, action: str | None, call_control_id: str | None) -> bool:
        return (
            (self.remaining is None or self.remaining > 0)
            and (self.action is None or self.action == action)
            and (self.call_control_id is None or self.call_control_id == call_control_id)
        )

    def strikes(self) -> bool:
        """Count one matching request; True if it is the one in ``every`` that gets the fault."""
        self.seen += 1
        return self.seen % self.every == 0


# --- Responses --------------------------------------------------------------------------------


class _Reply(NamedTuple):
    status: int
    payload: bytes
    headers: dict[str, str]


def _json_reply(status: int, data: Any, headers: Mapping[str, str] | None = None) -> _Reply:
    payload = json.dumps(data, separators=(",", ":")).encode()
    return _Reply(status, payload, {"Content-Type": JSON, **(headers or {})})


def _error(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    pointer: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> _Reply:
    return _errors(status, [(code, title, detail, pointer)], headers)


def _errors(
    status: int,
    errors: Iterable[tuple[str, str, str, str | None]],
    headers: Mapping[str, str] | None = None,
) -> _Reply:
    items = []
    for code, title, detail, pointer in errors:
        item: dict[str, Any] = {"code": code, "title": title, "detail": detail}
        if pointer is not None:
            item["source"] = {"pointer": pointer}
        items.append(item)
    return _json_reply(status, {"errors": items}, headers)


# Error bodies for injected faults that bring none. Telnyx's codes where we know them.
_FAULT_ERRORS = {
    401: ("10009", "Authentication failed"),
    404: ("10005", "Resource not found"),
    422: ("10015", "Invalid parameter"),
    429: ("10011", "Too many requests"),
    500: ("10007", "Unexpected error"),
}


def _fault_reply(fault: Fault) -> _Reply:
    headers = dict(fault.headers or {})
    if fault.body is None:
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "Error"
        code, title = _FAULT_ERRORS.get(fault.status, (str(fault.status), phrase))
        return _error(fault.status, code, title, "Injected by the simulator.", headers=headers)
    if isinstance(fault.body, bytes | str):
        # Raw bodies stand for what a proxy or load balancer says (HTML, plain text).
        payload = fault.body.encode() if isinstance(fault.body, str) else fault.body
        return _Reply(fault.status, payload, {"Content-Type": "text/plain", **headers})
    return _json_reply(fault.status, fault.body, headers)


_OK = {"data": {"result": "ok"}}


def _parse_path(method: str, raw_path: str) -> tuple[str | None, str | None]:
    """Return (action, call_control_id) for a command URL, else (None, None).

    ``POST /v2/calls`` is ``("dial", None)``. The action is returned even when it is not one of
    ours, so faults and the log can name it. The SDK percent-encodes the call control id
    (``v3:...`` keeps its colon, a ``/`` would not).
    """
    parts = urlsplit(raw_path).path.rstrip("/").split("/")
    if method == "POST" and parts == ["", "v2", "calls"]:
        return "dial", None
    if method != "POST" or len(parts) != 6 or parts[:3] != ["", "v2", "calls"]:
        return None, None
    if parts[4] != "actions" or not parts[3] or not parts[5]:
        return None, None
    return unquote(parts[5]), unquote(parts[3])


# --- The simulator ----------------------------------------------------------------------------


class _Verdict(NamedTuple):
    reply: _Reply
    duplicate: bool = False
    applied: bool = False
    result: dict[str, Any] | None = None


class _Outcome(NamedTuple):
    reply: _Reply
    record: CommandRecord
    delay: float
    drop: bool
    # The hook set when the request arrived: one changed later (say, by the next test)
    # must not receive this record.
    hook: Callable[[CommandRecord], None] | None


class TelnyxAPISimulator:
    """Telnyx's command API on 127.0.0.1, with call state, rate limit, dedupe and faults.

    Thread-safe: the HTTP server answers on its own threads while a test reads the log or
    changes settings. Start it with `start()` / `stop()` or as a context manager.

    Args:
        api_key: the key clients must send as ``Authorization: Bearer <api_key>``.
        host, port: where to listen; port 0 picks a free one.
        accept_unknown_calls: when true, an unknown call control id is registered as a live
            call; when false it gets 422 ``90015``.
        rate_limit: requests allowed per `rate_window` seconds across all calls (None: off).
        rate_window: length of the sliding rate-limit window, in seconds.
        command_id_ttl: how long a repeated ``command_id`` is ignored for the same call.
        on_command: called with each `CommandRecord` after its response has been sent, on
            the server thread; the hook in place when the request arrived is the one called.
            Exceptions are logged and swallowed. Also settable later as ``sim.on_command``.
        clock: monotonic clock used for the rate limit, dedupe and record times; tests can
            pass a fake one to step time instead of sleeping.
    """

    def __init__(
        self,
        *,
        api_key: str = "KEY_SIMULATOR",
        host: str = "127.0.0.1",
        port: int = 0,
        accept_unknown_calls: bool = True,
        rate_limit: int | None = None,
        rate_window: float = 1.0,
        command_id_ttl: float = 60.0,
        on_command: Callable[[CommandRecord], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_key = api_key
        self.host = host
        self.accept_unknown_calls = accept_unknown_calls
        self.rate_window = rate_window
        self.command_id_ttl = command_id_ttl
        self.on_command = on_command
        # What reset() goes back to, so one running simulator can serve many tests.
        self._settings = {
            "accept_unknown_calls": accept_unknown_calls,
            "rate_window": rate_window,
            "command_id_ttl": command_id_ttl,
            "on_command": on_command,
        }
        self._initial_rate_limit = rate_limit
        self._requested_port = port
        self._clock = clock
        # One lock for all mutable state: every request's decision (rate slot, call state,
        # dedupe, log) is taken atomically, so two concurrent retries cannot both apply.
        self._lock = threading.Lock()
        self._rate_limit = rate_limit
        self._admitted: deque[float] = deque()
        self._records: list[CommandRecord] = []
        self._calls: dict[str, CallState] = {}
        self._seen_command_ids: dict[tuple[str, str], float] = {}
        # What each dial answered, by the key its command_id is deduped on.
        self._dialled: dict[tuple[str, str], dict[str, Any]] = {}
        self._faults: list[Fault] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Wakes handlers sleeping on an injected delay, so stop() does not wait for them.
        self._stopping = threading.Event()

    # -- lifecycle --

    def start(self) -> TelnyxAPISimulator:
        if self._server is not None:
            raise RuntimeError("The simulator is already running.")
        self._stopping.clear()
        self._server = _Server((self.host, self._requested_port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # A short poll keeps stop() fast; the idle cost is negligible.
            kwargs={"poll_interval": 0.02},
            name=f"telnyx-sim:{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection, idle keep-alive ones included."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> TelnyxAPISimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("The simulator is not running.")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        """The SDK's ``base_url``: ``http://127.0.0.1:PORT/v2``."""
        return f"http://{self.host}:{self.port}/v2"

    # -- configuration and state --

    @property
    def rate_limit(self) -> int | None:
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: int | None) -> None:
        with self._lock:
            self._rate_limit = value
            # A new limit starts from an empty window, as if the limit had just been set.
            self._admitted.clear()

    def add_call(
        self, call_control_id: str, *, direction: str = "incoming", answered: bool = True
    ) -> None:
        """Register a live call (replacing any earlier state for that id).

        The call simulator registers its incoming calls with ``answered=False``: parked.
        """
        with self._lock:
            self._calls[call_control_id] = CallState(
                call_control_id, direction=direction, answered=answered
            )

    def mark_answered(self, call_control_id: str) -> bool:
        """Answered without a command: the far end of a dial, or another application.

        A dialled call's inline stream and transcription count as started from now. False
        if the call is unknown, ended or already answered.
        """
        with self._lock:
            state = self._calls.get(call_control_id)
            if state is None or state.ended or state.answered:
                return False
            dial = next((body for action, body in state.actions if action == "dial"), None)
            for name, value in DIAL.effects(dial or {}).items():
                setattr(state, name, value)
            return True

    def end_call(self, call_control_id: str, *, if_unanswered: bool = False) -> bool:
        """Mark a call ended: later commands get 422 ``90018``. False if nothing changed.

        ``if_unanswered`` ends it only while it is still unanswered: a caller giving up on a
        ringing call loses the race to an answer already applied.
        """
        with self._lock:
            state = self._calls.get(call_control_id)
            if state is None:
                state = self._calls[call_control_id] = CallState(call_control_id)
            elif state.ended or (if_unanswered and state.answered):
                return False
            state.ended = True
            state.streaming = state.forking = state.transcribing = False
            return True

    def call(self, call_control_id: str) -> CallState | None:
        """A snapshot of the call's state, or None if the simulator does not know the call."""
        with self._lock:
            state = self._calls.get(call_control_id)
            return None if state is None else dataclasses.replace(state, actions=[*state.actions])

    def inject(
        self,
        status: int = 500,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        times: int | None = 1,
        delay: float = 0.0,
        drop: bool = False,
        *,
        action: str | None = None,
        call_control_id: str | None = None,
        apply: bool = False,
        every: int = 1,
    ) -> Fault:
        """Answer the next `times` matching requests with a fault (None: until `clear_faults`).

        ``body``: None gives a Telnyx-shaped error for ``status``; a dict or list is sent as
        JSON; str or bytes are sent raw as text/plain. ``delay`` sleeps before answering (for
        timeout tests). ``drop`` closes the connection without answering. ``action`` and
        ``call_control_id`` restrict which requests match (a dial's action is ``"dial"``; it
        has no call control id). ``apply`` processes the request normally first and only
        replaces its answer: the command takes effect but the client never learns it, which
        is the case ``command_id`` exists for (TELNYX.md section 6).

        ``apply=True, drop=True`` is "applied but the answer was lost": the client sees a
        connection error, and the call goes on as if the command had succeeded, for every
        command alike. An answer answers (``call.answered``, its inline media), a reject or a
        hangup ends the call, and a dial places a call whose ids the client never learnt
        (`CommandRecord.result` has them; its webhooks carry the dial's ``client_state``).
        A retry with the same ``command_id`` is then a duplicate: acknowledged, not applied.

        ``every`` n gives the fault to every n-th matching request only, counting from the
        injection (``every=3, times=None``: a third of them, for good); the others are answered
        as if it were not there. `times` counts the requests that got it.

        Faults are consulted before authentication, in the order they were injected.
        """
        if every < 1:
            raise ValueError("every must be at least 1")
        fault = Fault(
            status=status,
            body=body,
            headers=headers,
            remaining=times,
            delay=delay,
            drop=drop,
            apply=apply,
            action=action,
            call_control_id=call_control_id,
            every=every,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- the log --

    @property
    def requests(self) -> list[CommandRecord]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._records)

    def commands(
        self,
        action: str | None = None,
        call_control_id: str | None = None,
        status: int | None = 200,
    ) -> list[CommandRecord]:
        """Logged requests filtered by action, call and answered status (None: any)."""
        return [
            record
            for record in self.requests
            if (action is None or record.action == action)
            and (call_control_id is None or record.call_control_id == call_control_id)
            and (status is None or record.status == status)
        ]

    def max_in_any_window(self, seconds: float = 1.0, status: int | None = None) -> int:
        """The most requests (answered with `status`, None: any) in any `seconds`-long window.

        Windows are half-open, like the rate limiter's, so with ``rate_limit=N`` the admitted
        requests never exceed N here.
        """
        times = sorted(
            record.monotonic
            for record in self.requests
            if status is None or record.status == status
        )
        best = start = 0
        for end, t in enumerate(times):
            while times[start] <= t - seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    def clear(self) -> None:
        """Forget the request log (state, faults and dedupe memory stay)."""
        with self._lock:
            self._records.clear()

    def reset(self) -> None:
        """Back to just after construction, without restarting the server.

        Forgets the log, calls, dedupe memory, faults and the rate window, and restores the
        settings given to the constructor (`rate_limit`, `accept_unknown_calls`, ...).
        """
        with self._lock:
            for name, value in self._settings.items():
                setattr(self, name, value)
            self._rate_limit = self._initial_rate_limit
            self._records.clear()
            self._calls.clear()
            self._seen_command_ids.clear()
            self._dialled.clear()
            self._faults.clear()
            self._admitted.clear()

    # -- request handling (server threads) --

    def _dispatch(
        self, method: str, raw_path: str, authorization: str | None, raw_body: bytes
    ) -> _Outcome:
        action, ccid = _parse_path(method, raw_path)
        try:
            body: Any = json.loads(raw_body) if raw_body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            body = None
        command_id = body.get("command_id") if isinstance(body, dict) else None
        authorized = self._authorized(authorization)
        duplicate = applied = False
        result = None
        with self._lock:
            # Read the clock under the lock so the rate window and the log stay in time order.
            now, wall = self._clock(), time.time()
            fault = next((f for f in self._faults if f.matches(action, ccid) and f.strikes()), None)
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
            if fault is None or fault.apply:
                reply, duplicate, applied, result = self._answer(
                    now, action, ccid, body, authorized
                )
            if fault is not None:
                reply = _fault_reply(fault)
            record = CommandRecord(
                monotonic=now,
                wall_time=wall,
                method=method,
                path=raw_path,
                action=action,
                call_control_id=ccid,
                body=body,
                command_id=command_id if isinstance(command_id, str) else None,
                status=0 if fault is not None and fault.drop else reply.status,
                authorized=authorized,
                duplicate=duplicate,
                applied=applied,
                fault=fault is not None,
                result=result,
            )
            # Logged before the answer goes out, so a client that has its response can
            # already find the request in the log.
            self._records.append(record)
            hook = self.on_command
        delay = fault.delay if fault is not None else 0.0
        return _Outcome(reply, record, delay, fault is not None and fault.drop, hook)

    def _authorized(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def _answer(
        self, now: float, action: str | None, ccid: str | None, body: Any, authorized: bool
    ) -> _Verdict:
        """Decide the answer to one request. Called with the lock held."""
        if not authorized:
            return _Verdict(
                _error(401, "10009", "Authentication failed", "The API key is missing or wrong.")
            )
        if not (action == "dial" or (action in ACTIONS and ccid is not None)):
            return _Verdict(_error(404, "10005", "Resource not found", "No such route."))
        limited, headers = self._take_rate_slot(now)
        if limited:
            detail = "Rate limit exceeded."
            return _Verdict(_error(429, "10011", "Too many requests", detail, headers=headers))
        if not isinstance(body, dict):
            detail = "The body must be a JSON object."
            return _Verdict(_error(400, "10015", "Bad Request", detail, headers=headers))
        if action == "dial":
            return self._dial(now, body, headers)

        # Both known here: the route check above let only dial through without them.
        action, ccid = action or "", ccid or ""
        spec = ACTIONS[action]
        state = self._calls.get(ccid)
        if state is None:
            if not self.accept_unknown_calls:
                detail = "The call_control_id is not valid."
                return _Verdict(
                    _error(422, "90015", "Invalid Call Control ID", detail, headers=headers)
                )
            # Found in whatever state its first command needs (see CallState).
            state = self._calls[ccid] = CallState(ccid, answered=spec.accepts != "parked")
        if state.ended:
            detail = "This call is no longer active and can't receive commands."
            return _Verdict(_error(422, "90018", "Call has already ended", detail, headers=headers))
        ok = _json_reply(200, _OK, headers)
        command_id = body.get("command_id")
        if self._repeated(now, ccid, command_id):
            # Telnyx acknowledges a repeat without doing it again, whatever the call's state
            # now: the retry of an answer whose answer was lost must not meet "answered".
            return _Verdict(ok, duplicate=True, result=dict(_OK["data"]))
        refused = _refusal(action, spec.accepts, state)
        if refused is not None:
            return _Verdict(_error(422, *refused, headers=headers))

        found = problems(action, body)
        if found:
            errors = [("10015", "Invalid parameter", detail, ptr) for ptr, detail in found]
            return _Verdict(_errors(422, errors, headers))

        self._remember(now, ccid, command_id)
        for name, value in spec.effects(body).items():
            setattr(state, name, value)
        state.actions.append((action, body))
        return _Verdict(ok, applied=True, result=dict(_OK["data"]))

    def _dial(self, now: float, body: dict[str, Any], headers: dict[str, str]) -> _Verdict:
        """POST /v2/calls: register an outgoing call, ringing until the far end answers."""
        found = problems("dial", body)
        if found:
            errors = [("10015", "Invalid parameter", detail, ptr) for ptr, detail in found]
            return _Verdict(_errors(422, errors, headers))
        # Dials share no call, so their command ids are deduped per connection.
        key = (f"dial:{body['connection_id']}", body.get("command_id"))
        if self._repeated(now, *key):
            data = self._dialled[key]
            return _Verdict(_json_reply(200, {"data": data}, headers), duplicate=True, result=data)
        data = {
            "call_control_id": f"v3:sim-{uuid.uuid4()}",
            "call_leg_id": str(uuid.uuid4()),
            "call_session_id": str(uuid.uuid4()),
            # Dialling is asynchronous: Telnyx always answers false here.
            "is_alive": False,
            "record_type": "call",
        }
        if key[1] is not None:
            self._remember(now, *key)
            self._dialled[key] = data
        ccid = data["call_control_id"]
        state = self._calls[ccid] = CallState(ccid, direction="outgoing", answered=False)
        state.actions.append(("dial", body))
        return _Verdict(_json_reply(200, {"data": data}, headers), applied=True, result=data)

    def _repeated(self, now: float, scope: str, command_id: Any) -> bool:
        """True if ``command_id`` was applied in ``scope`` (a call, a connection's dials)
        within the TTL. Only applied commands count: a refused one may be sent again."""
        if not isinstance(command_id, str):
            return False
        first = self._seen_command_ids.get((scope, command_id))
        return first is not None and now - first < self.command_id_ttl

    def _remember(self, now: float, scope: str, command_id: Any) -> None:
        if isinstance(command_id, str):
            self._seen_command_ids[(scope, command_id)] = now

    def _take_rate_slot(self, now: float) -> tuple[bool, dict[str, str]]:
        """Admit a request into the sliding window; returns (limited, x-ratelimit-* headers)."""
        limit = self._rate_limit
        if limit is None:
            return False, {}
        window = self._admitted
        # Entries at or before now - rate_window have left the (now - window, now] interval.
        while window and window[0] <= now - self.rate_window:
            window.popleft()
        limited = len(window) >= limit
        if not limited:
            window.append(now)
        # Seconds until the oldest admitted request leaves the window, i.e. a slot frees.
        reset = max(1, math.ceil(window[0] + self.rate_window - now)) if window else 1
        headers = {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(max(0, limit - len(window))),
            "x-ratelimit-reset": str(reset),
        }
        return limited, headers

    def _notify(self, outcome: _Outcome) -> None:
        if outcome.hook is None:
            return
        try:
            outcome.hook(outcome.record)
        except Exception:
            # The response is already out; a broken hook must not take the server down.
            logger.exception("on_command hook failed for %s", outcome.record.path)


def _refusal(action: str, accepts: str, state: CallState) -> tuple[str, str, str] | None:
    """(code, title, detail) if the call is not in a state to take ``action``; else None."""
    parked = state.direction == "incoming" and not state.answered
    if accepts == "parked" and not parked:
        why = "already answered" if state.answered else "an outgoing call"
        detail = f"{action} applies only to an incoming call not answered yet; this one is {why}."
        return "90020", "Call cannot be answered", detail
    if accepts == "answered" and not state.answered:
        detail = (
            f"{action} needs an answered call: until the call is answered only answer, "
            "reject and hangup are accepted."
        )
        return "90019", "Call not answered", detail
    return None


# --- HTTP plumbing ----------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], simulator: TelnyxAPISimulator) -> None:
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._closing = False
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            if not self._closing:
                self._connections.add(connection)
                return
        # Accepted just as stop() ran: close it rather than leave a thread serving it.
        _shutdown_socket(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        # Keep-alive handlers block reading the next request; shutting the socket wakes them.
        with self._connections_lock:
            self._closing = True
            connections = list(self._connections)
        for connection in connections:
            _shutdown_socket(connection)


def _shutdown_socket(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so httpx can keep connections alive; every answer carries Content-Length.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's
    # delayed ACK and every request costs ~40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def _handle(self) -> None:
        try:
            raw_body = self._read_body()
        except (ValueError, OSError):
            # Without a trustworthy length the connection cannot be reused.
            self.close_connection = True
            self._send(_error(400, "10015", "Bad Request", "Unreadable request body."))
            return
        simulator = self.server.simulator
        outcome = simulator._dispatch(
            self.command, self.path, self.headers.get("Authorization"), raw_body
        )
        if outcome.delay > 0 and simulator._stopping.wait(outcome.delay):
            self._drop()
            return
        if outcome.drop:
            self._drop()
        else:
            self._send(outcome.reply)
        simulator._notify(outcome)

    do_POST = do_GET = do_PUT = do_PATCH = do_DELETE = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Trailers, if any, end with an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        body = self.rfile.read(length)
        if len(body) != length:
            raise ValueError("short body")
        return body

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.payload)))
            self.end_headers()
            self.wfile.write(reply.payload)
            self.wfile.flush()
        except OSError:
            # The client gave up (timeout tests do this on purpose).
            self.close_connection = True

    def _drop(self) -> None:
        self.close_connection = True
        _shutdown_socket(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s " + format, self.address_string(), *args)
