"""What drains look up for a connection (its partner's streaming profile, its partner's
webhook endpoints), remembered in this process across batches for ``CALLOPS_LOOKUP_TTL``
seconds.

Under load a drain batch holds a few events of a few calls, and every batch asked the
database again for the same profile and endpoints: three queries a batch, more CPU than the
batch's own writes. A save or delete of a profile, a partner, a connection or an endpoint in
this process forgets everything at once (``forget_all``); a change made in another process
(the API on a web host, or a bulk ``update()``) is seen by this one within the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from django.conf import settings
from django.db.models.signals import post_delete, post_save

T = TypeVar("T")

MAX_KEYS = 10_000  # connection ids remembered at most; then everything is forgotten at once


class Remembered(Generic[T]):
    """key -> (expiry on this process's monotonic clock, value)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[float, T]] = {}

    def get(self, key: str, load: Callable[[], T]) -> T:
        ttl = settings.CALLOPS_LOOKUP_TTL
        if not ttl > 0:  # 0 (or a NaN setting): every batch reads the database
            return load()
        now = time.monotonic()
        hit = self._values.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = load()
        if len(self._values) >= MAX_KEYS:
            self._values.clear()
        self._values[key] = (now + ttl, value)
        return value

    def in_batch(self, memo: dict[str, T] | None, key: str, load: Callable[[], T]) -> T:
        """What a lookup answers: ``load()`` outside a drain (no batch ``memo``); inside one,
        read once per batch, from what this process remembers across batches."""
        if memo is None:
            return load()
        if key not in memo:
            memo[key] = self.get(key, load)
        return memo[key]

    def forget(self) -> None:
        self._values.clear()


PROFILES: Remembered = Remembered()
ENDPOINTS: Remembered = Remembered()

# What a profile or endpoint lookup reads: a change to any of them may change the answer.
_WATCHED = (
    "callops.Partner",
    "callops.PartnerConnection",
    "callops.StreamingProfile",
    "callops.WebhookEndpoint",
)


def forget_all(**_) -> None:
    PROFILES.forget()
    ENDPOINTS.forget()


for _model in _WATCHED:
    post_save.connect(forget_all, sender=_model, dispatch_uid=f"callops.lookups.save.{_model}")
    post_delete.connect(forget_all, sender=_model, dispatch_uid=f"callops.lookups.del.{_model}")
