"""ksmtrace_tracers: capture backends that write ksmtrace traces.

This package depends only on :mod:`ksmtrace.trace` (schema, writer, delta), :mod:`ksmtrace.errors`
and :mod:`ksmtrace.progress`.  The ksmtrace library never imports it: the CLI finds a tracer through
the ``ksmtrace.tracers`` entry-point group (``procfs = ksmtrace_tracers.procfs:ProcfsTracer``), so
analysis code never loads capture code (see ``docs/packaging.md``).

Modules, one responsibility each:

* :mod:`.procinfo`   — per-process metadata from /proc (stat, status, cmdline, cgroup, ksm_stat)
* :mod:`.targets`    — target selection (--pid, --name, --tree, --cgroup, --all)
* :mod:`.procmaps`   — /proc/PID/smaps parsing, VmFlags, VMA classification by scope
* :mod:`.pagemap`    — /proc/PID/pagemap and /proc/kpageflags decoding, host probes
* :mod:`.pvr`        — reading page contents: process_vm_readv (ctypes) and /proc/PID/mem
* :mod:`.hashing`    — keyed page hashes, zero detection, key files, PKSM/prefix fingerprints
* :mod:`.reading`    — read + hash the present pages of one process in batches
* :mod:`.workers`    — the optional fork-based worker pool for read + hash
* :mod:`.freeze`     — --freeze: SIGSTOP / cgroup.freeze while a snapshot is read
* :mod:`.watchdog`   — the child process that resumes frozen targets if ksmtrace dies
* :mod:`.groundtruth`— the host's real KSM counters (sysfs, vmstat, ksmd CPU)
* :mod:`.capture`    — :class:`Capture` (one snapshot on demand) and :func:`run_capture` (the loop)
* :mod:`.procfs`     — :class:`ProcfsTracer`, the facade the CLI loads through the entry point
"""
from ksmtrace._version import __version__

TRACER_NAME = "procfs"
TRACER_VERSION = __version__

__all__ = ["TRACER_NAME", "TRACER_VERSION"]
