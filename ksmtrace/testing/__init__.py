"""Public helpers for tests and for authors of third-party policies."""
from ksmtrace.testing.builders import content_hash, make_trace

__all__ = ["make_trace", "content_hash"]
