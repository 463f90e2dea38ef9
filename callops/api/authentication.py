"""Partner API keys: ``Authorization: Bearer <key>``."""

from __future__ import annotations

import hmac
from datetime import timedelta

from django.utils import timezone
from rest_framework import authentication, exceptions

from callops import logs
from callops.api_keys import KEY_PREFIX, hash_key
from callops.models import ApiKey

LAST_USED_RESOLUTION = timedelta(minutes=1)


class PartnerKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1").split()
        if not header or header[0] != self.keyword:
            return None  # DRF answers 401 "Authentication credentials were not provided."
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization must be 'Bearer <key>'.")
        plain = header[1]
        prefix = plain.removeprefix(KEY_PREFIX).split("_", 1)[0]
        key = (
            ApiKey.objects.select_related("partner")
            .filter(prefix=prefix, revoked_at__isnull=True)
            .first()
            if plain.startswith(KEY_PREFIX)
            else None
        )
        # Compare even when no row matched, so timing does not tell a known prefix apart.
        expected = key.hashed_key if key else hash_key("")
        if not hmac.compare_digest(expected, hash_key(plain)) or key is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked API key.")
        if not key.partner.active:
            raise exceptions.PermissionDenied("This partner is inactive.")
        logs.bind(partner=key.partner_id)  # on the request's lines (callops.logs)
        now = timezone.now()
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return key.partner, key

    def authenticate_header(self, request) -> str:
        return self.keyword
