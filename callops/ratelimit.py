"""The fleet-wide limit on commands sent to Telnyx, shared by every worker process.

A send is allowed when fewer than ``limit`` sends are in flight or finished within the last
window (``1 s + TELNYX_RATE_LIMIT_GUARD``). The log holds when each send *finished*
(``complete``), not when it was allowed, and a send in flight counts until then: a request
reaches Telnyx before its answer comes back, so two sends ``limit`` apart in the log are at least
a window apart at Telnyx too, however long a worker was descheduled between taking its turn and
sending.

A worker that finds no room does not poll: it gets a *ticket*, a time to come back, and the
command is published once to arrive then. Tickets form an orderly queue, newcomers behind it.
Because the log counts from each answer, a turn comes free a send's duration after the turn
``limit`` before it was due, so the queue moves at ``limit / (window + duration)``, not
``limit / window``: tickets are spaced by that, with the duration learnt from the sends
themselves (a moving average, from each turn's due time to its answer, kept in Redis beside
the log). A ticket holder that comes back a little before its turn is free waits for it in the
worker (``CALLOPS_RATE_LIMIT_INLINE_WAIT``, see ``callops.commands``) instead of being sent
away with a new ticket, which would cost a task message and a database write each time.
A 429 from Telnyx pauses every worker: no send is allowed, and no ticket falls, before it ends.

Decisions are atomic: a Lua script in Redis (production), or a file lock on one machine for the
embedded default. Both use one clock (Redis' own ``TIME``, or the machine's), so workers on
different hosts cannot disagree about "now".
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import redis
from django.conf import settings

# KEYS: sends (zset: member "<due ms>:<id>", score = when it finished, or the in-flight horizon),
#       paused-until, queue tail (next ticket to hand out), send duration (moving average, ms)
# ARGV: window ms, limit, ticket ms or '', unique id, in-flight horizon ms
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local duration = math.min(window, tonumber(redis.call('GET', KEYS[4]) or '0'))
local spacing = (window + duration) / limit
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
local tail = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[3] ~= '' and tonumber(ARGV[3]) > now + 1 then
  return {ARGV[3], tostring(tonumber(ARGV[3]) - now)}
end
local holder = ARGV[3] ~= ''
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if pause <= now and n < limit and (holder or tail <= now) then
  -- In flight until ``complete``: it counts against the window however long it takes. The
  -- member carries when the turn was due (its ticket, else now) for the duration's average.
  local due = now
  if holder then due = math.min(now, tonumber(ARGV[3])) end
  local member = string.format('%.3f', due) .. ':' .. ARGV[4]
  local horizon = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[1], now + horizon, member)
  redis.call('PEXPIRE', KEYS[1], math.ceil(window + horizon) + 1000)
  return {tostring(now), '0', member}
end
local free_at = now
if n >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  local done = tonumber(oldest[2])
  if done > now then
    -- Still in flight: expect its answer after the usual duration, not at the horizon.
    local due = tonumber(string.match(oldest[1], '^([^:]+):') or '')
    if due then done = math.min(done, math.max(now, due + duration)) end
  end
  free_at = done + window
end
free_at = math.max(free_at, pause)
local ticket
if holder then
  ticket = free_at
else
  ticket = math.max(free_at, tail)
  redis.call('SET', KEYS[3], tostring(ticket + spacing), 'PX',
             math.ceil(ticket + spacing - now + window) + 1000)
end
return {tostring(ticket), tostring(ticket - now)}
"""

# How much each send moves the average duration: about the last ten sends count.
AVERAGE_WEIGHT = 0.2

# KEYS: sends, send duration. ARGV: the send, ms since its answer came back, window ms
COMPLETE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 - tonumber(ARGV[2] or '0')
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now, ARGV[1]) == 1 then
  local due = tonumber(string.match(ARGV[1], '^([^:]+):') or '')
  if due then
    local took = math.max(0, math.min(tonumber(ARGV[3]), now - due))
    local average = tonumber(redis.call('GET', KEYS[2]) or tostring(took))
    redis.call('SET', KEYS[2], tostring(average + (took - average) * AVERAGE_WEIGHT), 'PX', 600000)
  end
end
return tostring(now)
""".replace("AVERAGE_WEIGHT", repr(AVERAGE_WEIGHT))

PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local until_ = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_ > current then
  redis.call('SET', KEYS[1], tostring(until_), 'PX', math.ceil(tonumber(ARGV[1])) + 1000)
  return tostring(until_)
end
return tostring(current)
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    at: float  # the ticket, in ms on the limiter's clock; hand it back when the command wakes
    delay: float  # seconds from now; 0 means send now
    send: str = ""  # when ready: the send's id in the log, for ``complete``

    @property
    def ready(self) -> bool:
        return self.delay <= 0


def _shape(rate: float, guard: float) -> tuple[int, float]:
    """(slots, window in ms) for ``rate`` commands per second."""
    if rate >= 1:
        return int(rate), (1.0 + guard) * 1000
    return 1, (1.0 / rate + guard) * 1000


class RedisRateLimiter:
    def __init__(
        self, url: str, rate: float, guard: float, horizon: float, prefix: str = "callops:telnyx"
    ) -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        self.limit, self.window = _shape(rate, guard)
        self.horizon = horizon * 1000
        self.keys = [
            f"{prefix}:sends",
            f"{prefix}:paused-until",
            f"{prefix}:tail",
            f"{prefix}:duration",
        ]
        self._reserve = self.client.register_script(RESERVE)
        self._pause = self.client.register_script(PAUSE)
        self._complete = self.client.register_script(COMPLETE)

    def reserve(self, reserved_at: float | None = None) -> Reservation:
        at, delay, *send = self._reserve(
            keys=self.keys,
            args=[
                self.window,
                self.limit,
                "" if reserved_at is None else repr(reserved_at),
                uuid.uuid4().hex,
                self.horizon,
            ],
        )
        return Reservation(float(at), float(delay) / 1000, send[0].decode() if send else "")

    def complete(self, send: str, ago: float = 0.0) -> None:
        """The send's answer came back ``ago`` seconds ago (or it failed): it counts from then."""
        self._complete(
            keys=[self.keys[0], self.keys[3]], args=[send, max(0.0, ago) * 1000, self.window]
        )

    def release(self, send: str) -> None:
        """A turn taken but not used (the command was done or held elsewhere)."""
        self.client.zrem(self.keys[0], send)

    def pause(self, seconds: float) -> None:
        self._pause(keys=self.keys[1:2], args=[max(0.0, seconds) * 1000])

    def paused_for(self) -> float:
        """Seconds left of the pause a 429 imposed (0: none), on the limiter's clock."""
        with self.client.pipeline(transaction=False) as pipe:
            until, (seconds, micros) = pipe.get(self.keys[1]).time().execute()
        return max(0.0, (float(until or 0) - (seconds * 1000 + micros / 1000)) / 1000)


class FileRateLimiter:
    """The same algorithm under an exclusive file lock: for the embedded default on one machine."""

    def __init__(self, path: Path, rate: float, guard: float, horizon: float) -> None:
        self.path = path
        self.limit, self.window = _shape(rate, guard)
        self.horizon = horizon * 1000
        path.parent.mkdir(parents=True, exist_ok=True)

    def _locked(self, change):
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            try:
                state = json.loads(handle.read() or "{}")
            except ValueError:
                state = {}
            result = change(state, time.time() * 1000)
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(state))
            handle.flush()
            os.fsync(handle.fileno())
            return result

    def reserve(self, reserved_at: float | None = None) -> Reservation:
        def change(state: dict, now: float) -> Reservation:
            if reserved_at is not None and reserved_at > now + 1:
                return Reservation(reserved_at, (reserved_at - now) / 1000)
            pause, tail = state.get("pause", 0.0), state.get("tail", 0.0)
            duration = min(self.window, state.get("duration", 0.0))
            sends = {k: v for k, v in state.get("sends", {}).items() if v > now - self.window}
            state["sends"] = sends
            if pause <= now and len(sends) < self.limit and (reserved_at or tail <= now):
                due = now if reserved_at is None else min(now, reserved_at)
                send = f"{due:.3f}:{uuid.uuid4().hex}"
                sends[send] = now + self.horizon  # in flight until complete()
                return Reservation(now, 0.0, send)
            free_at = now
            if len(sends) >= self.limit:
                send, done = sorted(sends.items(), key=lambda item: item[1])[
                    len(sends) - self.limit
                ]
                due = _due(send)
                if done > now and due is not None:  # in flight: back after the usual duration
                    done = min(done, max(now, due + duration))
                free_at = done + self.window
            free_at = max(free_at, pause)
            if reserved_at is not None:
                ticket = free_at
            else:
                ticket = max(free_at, tail)
                state["tail"] = ticket + (self.window + duration) / self.limit
            return Reservation(ticket, (ticket - now) / 1000)

        return self._locked(change)

    def complete(self, send: str, ago: float = 0.0) -> None:
        def change(state: dict, now: float) -> None:
            if send in state.get("sends", {}):
                done = now - max(0.0, ago) * 1000
                state["sends"][send] = done
                due = _due(send)
                if due is not None:
                    took = max(0.0, min(self.window, done - due))
                    average = state.get("duration", took)
                    state["duration"] = average + (took - average) * AVERAGE_WEIGHT

        self._locked(change)

    def release(self, send: str) -> None:
        def change(state: dict, now: float) -> None:
            state.get("sends", {}).pop(send, None)

        self._locked(change)

    def pause(self, seconds: float) -> None:
        def change(state: dict, now: float) -> None:
            state["pause"] = max(state.get("pause", 0.0), now + max(0.0, seconds) * 1000)

        self._locked(change)

    def paused_for(self) -> float:
        try:
            state = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return 0.0
        return max(0.0, (state.get("pause", 0.0) - time.time() * 1000) / 1000)


def _due(send: str) -> float | None:
    """When the send's turn was due, in ms: the first part of its id (None for an id from
    before ids carried it)."""
    due, colon, _ = send.partition(":")
    try:
        return float(due) if colon else None
    except ValueError:
        return None


RateLimiter = RedisRateLimiter | FileRateLimiter


@lru_cache(maxsize=1)
def _limiter(url: str, rate: float, guard: float, horizon: float) -> RateLimiter:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimiter(url, rate, guard, horizon)
    return FileRateLimiter(settings.VAR_DIR / "ratelimit.json", rate, guard, horizon)


def get_limiter() -> RateLimiter:
    """The process's limiter, built from settings (rebuilt if a test changes them)."""
    if not math.isfinite(settings.TELNYX_RATE_LIMIT) or settings.TELNYX_RATE_LIMIT <= 0:
        raise ValueError("TELNYX_RATE_LIMIT must be a positive number")
    return _limiter(
        settings.CALLOPS_RATE_LIMIT_URL,
        float(settings.TELNYX_RATE_LIMIT),
        float(settings.TELNYX_RATE_LIMIT_GUARD),
        # A send that never completes (its worker died) stops counting after the longest an
        # attempt can take.
        float(settings.TELNYX_TIMEOUT * 2 + 2),
    )
