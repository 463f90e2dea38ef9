"""OpenAPI pieces drf-spectacular cannot infer, and the per-partner throttle."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.throttling import SimpleRateThrottle


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
