"""ksmtrace_tracers: capture backends that write ksmtrace traces.

This package depends only on :mod:`ksmtrace.trace` (schema, writer, delta), :mod:`ksmtrace.errors`,
:mod:`ksmtrace.progress` and :mod:`ksmtrace.tracer` (the :class:`~ksmtrace.tracer.Tracer` surface).  The ksmtrace library never imports it: the CLI finds a tracer through
the ``ksmtrace.tracers`` entry-point group (``procfs = ksmtrace_tracers.procfs:ProcfsTracer``), so
analysis code never loads capture code (see ``docs/packaging.md``).

Modules, one responsibility each (the pipeline: targets -> session -> recorders -> trace):

* :mod:`.options`    — :class:`CaptureOptions`, everything a capture can be told
* :mod:`.session`    — the backend-neutral session: trace directory, targets, --freeze, the
  snapshot cycle and its atomic commit, signals, a full disk; the :class:`Recorder` protocol
* :mod:`.procfs_reader` — the recorder that reads pages through /proc (pages, processes, vmas, ksm_stat)
* :mod:`.groundtruth`— the recorder of the host's real KSM counters (the ksm table)
* :mod:`.capture`    — :class:`Capture` (the session with the standard recorders), :func:`run_capture`
* :mod:`.procfs`     — :class:`ProcfsTracer`, the facade the CLI loads through the entry point
* :mod:`.targets`    — target selection (--pid, --name, --tree, --cgroup, --all)
* :mod:`.freeze`     — --freeze: SIGSTOP / cgroup.freeze while a snapshot is read
* :mod:`.watchdog`   — the child process that resumes frozen targets if ksmtrace dies
* :mod:`.procinfo`   — the one /proc parser (stat, status, cmdline, cgroup, ksm_stat, sched)
* :mod:`.ksmsysfs`   — the one reader of /sys/kernel/mm/ksm, /proc/vmstat and ksmd's schedstat
* :mod:`.procmaps`   — /proc/PID/smaps parsing, VmFlags, VMA classification by scope
* :mod:`.pagemap`    — /proc/PID/pagemap and /proc/kpageflags decoding, host probes
* :mod:`.procmem`    — reading page contents through /proc/PID/mem, never pinning them
* :mod:`.hashing`    — keyed page hashes, zero detection, key files, PKSM/prefix fingerprints
* :mod:`.reading`    — read + hash the present pages of one process in batches
* :mod:`.workers`    — the optional fork-based worker pool for read + hash
"""
from ksmtrace._version import __version__

TRACER_NAME = "procfs"
TRACER_VERSION = __version__

__all__ = ["TRACER_NAME", "TRACER_VERSION"]
