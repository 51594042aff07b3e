"""Error types.  Every anticipated failure is a :class:`KsmtraceError`; the CLI turns it into
one line on stderr and a non-zero exit (``--debug`` shows the traceback)."""


class KsmtraceError(Exception):
    """Base class of every anticipated failure.  ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class TraceError(KsmtraceError):
    """A trace cannot be read: missing manifest, unknown version, truncated or foreign file."""


class TraceVersionError(TraceError):
    """The trace was written in a format version this ksmtrace does not read."""


class CaptureError(KsmtraceError):
    """Capture cannot start or continue (no targets, no permission, full disk...)."""


class TargetError(CaptureError):
    """A requested target process does not exist or cannot be read."""


class PolicyNotFoundError(KsmtraceError):
    """No policy with that name is registered."""


class PolicyParamError(KsmtraceError):
    """A policy parameter is unknown or has a bad value."""

    exit_code = 2


class PolicyContractError(KsmtraceError):
    """A policy broke the engine contract (for example it proposed merging unequal pages)."""


class OutputError(KsmtraceError):
    """An output directory or file cannot be used: not the user's own, writable by others, a
    symbolic link another user could change, permission denied, disk full."""


class ResultError(KsmtraceError):
    """A result file or directory cannot be read."""


class KernelError(KsmtraceError):
    """The host kernel lacks a feature or refused a setting (KSM sysfs, /proc files)."""


class WorkloadError(KsmtraceError):
    """A workload generator failed to start or died."""
