"""OpenAPI pieces drf-spectacular cannot infer, and the per-partner throttle."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from redis.exceptions import RedisError
from rest_framework.throttling import SimpleRateThrottle

from callops.api.errors import Unavailable


class PartnerKeyScheme(OpenApiAuthenticationExtension):
    target_class = "callops.api.authentication.PartnerKeyAuthentication"
    name = "PartnerKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "A partner API key."}


class PartnerRateThrottle(SimpleRateThrottle):
    """``CALLOPS_PARTNER_THROTTLE`` requests per partner, across every web process (the cache)."""

    scope = "partner"

    def get_cache_key(self, request, view):
        if not getattr(request.user, "is_authenticated", False):
            return None
        return self.cache_format % {"scope": self.scope, "ident": request.user.pk}

    def allow_request(self, request, view) -> bool:
        # The cache is down: without it no process knows the partner's count. Letting every
        # request through would lift the limit for all partners at once, so the API answers a
        # retryable 503 instead. A Redis cache raises RedisError, the file cache OSError.
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError) as exc:
            raise Unavailable("rate limit unavailable, retry later") from exc
