"""ksmtrace: capture -> trace -> replay -> report for page deduplication (KSM and friends)."""
from ksmtrace._version import __version__

__all__ = ["__version__"]
