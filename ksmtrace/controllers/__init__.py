"""Controllers: the programs that retune a dedup daemon while it runs, replayed in virtual time.

A controller is a small object the replay driver calls at its own period of virtual time with the
run's state (:class:`ControlState`: memory in use and free on a host of the stated size, the
policy's parameters and counters) and that returns parameter changes — what the real one writes
to ``/sys/kernel/mm/ksm``.  The driver applies them between daemon batches through the runtime's
``set_params`` (:mod:`ksmtrace.engine.daemon`), on the readable runtime and on the numba kernel
alike; ``run`` (0/1) is the daemon's run switch.

>>> from ksmtrace.replay import replay
>>> res = replay("vms.trace", "ksm", controller="ksmtuned:monitor_interval=5", host_memory="2G")
>>> res.table.select("t_s", "run", "pages_to_scan", "sleep_millisecs", "mem_free_kib")

The built-in controllers, each read from its source (``docs/controllers.md``):

* ``ksmtuned`` (:mod:`ksmtrace.controllers.ksmtuned`) — Red Hat's ksmtuned script (Fedora, RHEL);
* ``kubevirt`` (:mod:`ksmtrace.controllers.kubevirt`) — KubeVirt's node KSM handler (virt-handler);
* ``scan-time`` (:mod:`ksmtrace.controllers.advisor`) — the kernel's own scan-time advisor (6.8+),
  which runs inside ksmd at the end of every full scan: the ``ksm`` policy's ``advisor_mode``.

**Memory, as the replay sees it.**  The trace records the traced processes' resident set size
(the processes table's ``rss_pages``; without one, the candidate pages).  A KSM-merged page still
counts in the RSS of every process mapping it, so ``rss_kib`` is what ``ps -o rsz`` shows and
does not fall as dedup saves; the physical memory the processes use, ``used_kib``, is the RSS less
the candidate pages that share a frame through fork (counted once) less the frames the replay's
dedup has saved so far.  The stated host (``host_memory``: MemTotal) holds nothing else, so
``free_kib = host - used`` stands for MemFree+Buffers+Cached (ksmtuned) and MemAvailable
(KubeVirt): an otherwise idle host.  Shared libraries and other file pages the processes map are
in their RSS once per process.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

from ksmtrace.errors import KsmtraceError
from ksmtrace.policies.base import Params, params_table, parse_params

__all__ = ["ControlState", "Controller", "controller_names", "get_controller", "make_controller",
           "parse_controller", "parse_memory_size"]

KIB_PER_PAGE = 4


@dataclass(frozen=True)
class ControlState:
    """What a controller reads at a tick (sizes in KiB, as /proc/meminfo and ps report them)."""

    t_s: float  # virtual time, seconds after the first snapshot
    snap: int  # the snapshot whose content holds now
    host_kib: int  # the stated host memory (MemTotal); 0 when none was stated
    rss_kib: int  # the traced processes' resident set size (ps -o rsz: KSM does not lower it)
    used_kib: int  # the physical memory they use now: RSS - fork-shared - saved so far
    free_kib: int  # host - used, at least 0
    saved_kib: int  # what the replay's dedup has saved so far
    running: bool  # the daemon's run switch
    params: Mapping[str, Any]  # the policy's parameters now
    counters: Mapping[str, Any]  # the policy's kernel counters now (ksm: pages_to_scan is ksmd's own value)


class Controller:
    """Base of every controller.  A subclass sets the class attributes and implements
    :meth:`step` (and :meth:`ticks`, :meth:`initial_params`, :meth:`initial_run` where the default
    does not fit)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: where its rules come from (repository, path; the functions read)
    source: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    #: the policies whose parameters it writes (None: any)
    policies: ClassVar[tuple[str, ...] | None] = ("ksm",)
    #: its rules compare memory with the host's size: a run needs ``host_memory``
    needs_host_memory: ClassVar[bool] = True
    #: the parameters it writes, recorded per snapshot in the result table
    controls: ClassVar[tuple[str, ...]] = ("run", "pages_to_scan", "sleep_millisecs")

    def __init__(self, params: Params | Mapping[str, Any] | None = None) -> None:
        self.params = params if isinstance(params, Params) else parse_params(self.Params, params)
        self.p = self.params

    def describe(self) -> dict[str, Any]:
        return self.params.as_dict()

    def ticks(self, duration_s: float) -> list[float]:
        """When it acts: seconds after the daemon's start, up to ``duration_s`` (default: none)."""
        return []

    def initial_params(self) -> dict[str, Any]:
        """Policy parameters it sets before the run starts (default: none)."""
        return {}

    def initial_run(self) -> bool:
        """Whether the daemon runs when the trace starts (default: yes)."""
        return True

    def step(self, state: ControlState) -> dict[str, Any]:
        """The writes at one tick: parameter name -> value, and ``run`` (0/1)."""
        return {}

    @classmethod
    def parameter_table(cls) -> list[dict[str, Any]]:
        return params_table(cls.Params)


def periodic(first_s: float, period_s: float, duration_s: float) -> list[float]:
    """``first_s, first_s + period_s, ...`` up to ``duration_s``."""
    out = []
    t = float(first_s)
    while t <= duration_s + 1e-9:
        out.append(t)
        t += float(period_s)
    return out


# --- registry -----------------------------------------------------------------------------------
def _builtins() -> dict[str, type[Controller]]:
    from ksmtrace.controllers.advisor import ScanTimeAdvisor
    from ksmtrace.controllers.kubevirt import KubeVirt
    from ksmtrace.controllers.ksmtuned import Ksmtuned

    return {c.name: c for c in (Ksmtuned, KubeVirt, ScanTimeAdvisor)}


def controller_names() -> list[str]:
    return list(_builtins())


def get_controller(name: str) -> type[Controller]:
    reg = _builtins()
    if name not in reg:
        raise KsmtraceError(f"unknown controller {name!r} (controllers: {', '.join(reg)})")
    return reg[name]


def parse_controller(text: str) -> Controller:
    """``NAME`` or ``NAME:key=value,key=value`` (the CLI's ``--controller``)."""
    name, _, rest = str(text).strip().partition(":")
    values: dict[str, str] = {}
    for item in [x for x in rest.split(",") if x.strip()]:
        if "=" not in item:
            raise KsmtraceError(f"controller {text!r}: expected NAME:key=value,key=value")
        k, v = item.split("=", 1)
        values[k.strip().replace("-", "_")] = v.strip()
    cls = get_controller(name.strip())
    try:
        return cls(values)
    except KsmtraceError as exc:
        raise type(exc)(f"controller {cls.name}: {exc}") from None


def make_controller(spec: "str | Controller | Mapping[str, Any] | None") -> Controller | None:
    """A controller from a spec string, an instance, or ``{"name": ..., "params": {...}}`` (a run spec's)."""
    if spec is None or isinstance(spec, Controller):
        return spec
    if isinstance(spec, Mapping):
        return get_controller(str(spec["name"]))(dict(spec.get("params") or {}))
    return parse_controller(spec)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_memory_size(text: "str | int | float | None") -> int | None:
    """A memory size in KiB: ``16G``, ``16GiB``, ``512M``, ``2048K`` (binary units), or a number of
    bytes.  None stays None."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        kib = int(text) // 1024
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise KsmtraceError(f"memory size {text!r}: give a number with a unit, e.g. 16G, 512M (binary units)")
        num, unit = float(m.group(1)), m.group(2).lower()
        kib = int(num * {"": 1 / 1024, "k": 1, "m": 1024, "g": 1024 ** 2, "t": 1024 ** 3}[unit])
    if kib <= 0:
        raise KsmtraceError(f"memory size {text!r}: must be more than 0")
    return kib


def format_kib(kib: int) -> str:
    """``16 GiB``, ``512 MiB`` or ``300 KiB``."""
    for unit, f in (("GiB", 1024 ** 2), ("MiB", 1024)):
        if kib >= f:
            v = kib / f
            return f"{v:g} {unit}" if v == int(v) else f"{v:,.1f} {unit}"
    return f"{kib} KiB"


def describe_controller(ctl: Controller) -> dict[str, Any]:
    """What a run spec records of a controller."""
    return {"name": ctl.name, "params": ctl.describe()}


def controls_for(ctl: Controller, existing: Sequence[str]) -> list[str]:
    """The trajectory columns a run with ``ctl`` adds to the result table (those not already there)."""
    return [c for c in ctl.controls if c not in existing]
