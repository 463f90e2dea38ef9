"""The fleet-wide limit on commands sent to Telnyx, shared by every worker process.

A send is allowed when fewer than ``limit`` sends are in flight or finished within the last
window (``1 s + TELNYX_RATE_LIMIT_GUARD``). The log holds when each send *finished*
(``complete``), not when it was allowed, and a send in flight counts until then: a request
reaches Telnyx before its answer comes back, so two sends ``limit`` apart in the log are at least
a window apart at Telnyx too, however long a worker was descheduled between taking its turn and
sending. A worker that finds no room does not sleep: it gets a *ticket*, a time to come
back, and reschedules the command to it. Tickets are handed out ``window / limit`` apart, so
waiting commands form an orderly queue instead of polling, and newcomers queue behind them. A
ticket holder that comes back and still finds no room gets the next free time again, at the front.
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

# KEYS: sends (zset of actual send times), paused-until, queue tail (next ticket to hand out)
# ARGV: window ms, limit, ticket ms or '', unique member, in-flight horizon ms
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local spacing = window / limit
local pause = tonumber(redis.call('GET', KEYS[2]) or '0')
local tail = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[3] ~= '' and tonumber(ARGV[3]) > now + 1 then
  return {ARGV[3], tostring(tonumber(ARGV[3]) - now)}
end
local holder = ARGV[3] ~= ''
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if pause <= now and n < limit and (holder or tail <= now) then
  -- In flight until ``complete``: it counts against the window however long it takes.
  local horizon = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[1], now + horizon, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window + horizon) + 1000)
  return {tostring(now), '0', ARGV[4]}
end
local free_at = now
if n >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
  free_at = tonumber(oldest[2]) + window
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

# ARGV: the send, ms since its answer came back (the caller may record the outcome first)
COMPLETE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 - tonumber(ARGV[2] or '0')
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
return tostring(now)
"""

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
        self.keys = [f"{prefix}:sends", f"{prefix}:paused-until", f"{prefix}:tail"]
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
        self._complete(keys=self.keys[:1], args=[send, max(0.0, ago) * 1000])

    def release(self, send: str) -> None:
        """A turn taken but not used (the command was done or held elsewhere)."""
        self.client.zrem(self.keys[0], send)

    def pause(self, seconds: float) -> None:
        self._pause(keys=self.keys[1:2], args=[max(0.0, seconds) * 1000])


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
            sends = {k: v for k, v in state.get("sends", {}).items() if v > now - self.window}
            state["sends"] = sends
            if pause <= now and len(sends) < self.limit and (reserved_at or tail <= now):
                send = uuid.uuid4().hex
                sends[send] = now + self.horizon  # in flight until complete()
                return Reservation(now, 0.0, send)
            free_at = now
            if len(sends) >= self.limit:
                free_at = sorted(sends.values())[len(sends) - self.limit] + self.window
            free_at = max(free_at, pause)
            if reserved_at is not None:
                ticket = free_at
            else:
                ticket = max(free_at, tail)
                state["tail"] = ticket + self.window / self.limit
            return Reservation(ticket, (ticket - now) / 1000)

        return self._locked(change)

    def complete(self, send: str, ago: float = 0.0) -> None:
        def change(state: dict, now: float) -> None:
            if send in state.get("sends", {}):
                state["sends"][send] = now - max(0.0, ago) * 1000

        self._locked(change)

    def release(self, send: str) -> None:
        def change(state: dict, now: float) -> None:
            state.get("sends", {}).pop(send, None)

        self._locked(change)

    def pause(self, seconds: float) -> None:
        def change(state: dict, now: float) -> None:
            state["pause"] = max(state.get("pause", 0.0), now + max(0.0, seconds) * 1000)

        self._locked(change)


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
