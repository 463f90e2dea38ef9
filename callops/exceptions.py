"""The project's own errors: one small hierarchy, so callers can catch what they mean."""


class CallopsError(Exception):
    """Base class of every error callops raises on purpose."""


class EventError(CallopsError):
    """A stored event cannot be applied as it is (malformed for its type)."""
