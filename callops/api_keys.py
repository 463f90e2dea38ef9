"""Partner API keys: made once, shown once, stored only as a SHA-256, revocable.

Keys are 256 random bits, so a fast hash is enough (no password stretching); the prefix finds
the row without a scan. ``callops.api.authentication`` checks them on each request.
"""

from __future__ import annotations

import hashlib
import secrets

from django.utils import timezone

from callops.models import ApiKey, Partner

KEY_PREFIX = "cok_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_key_create(*, partner: Partner, name: str = "") -> tuple[ApiKey, str]:
    """Create a key and return it with its plain text, which is never stored or shown again."""
    prefix = secrets.token_hex(6)
    plain = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        partner=partner, name=name, prefix=prefix, hashed_key=hash_key(plain)
    )
    return key, plain


def api_key_revoke(*, key: ApiKey) -> None:
    ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
