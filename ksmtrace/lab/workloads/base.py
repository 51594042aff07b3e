"""The workload base class and the registry."""
from __future__ import annotations

from typing import ClassVar, Iterator

from ksmtrace.errors import WorkloadError
from ksmtrace.lab.workloads.model import Event, Memory, State, Step
from ksmtrace.lab.workloads.params import CommonParams, build_params, describe

#: name -> workload class; filled by :func:`register`.
WORKLOADS: dict[str, type["Workload"]] = {}

#: Horizon of ``events()`` when neither ``until`` nor the ``duration`` parameter bounds it.
DEFAULT_HORIZON = 60.0


def register(cls):
    """Class decorator: add a Workload subclass to :data:`WORKLOADS` under ``cls.name``."""
    WORKLOADS[cls.name] = cls
    return cls


def get_workload(name: str, **params) -> "Workload":
    """A configured workload: ``get_workload("rewrite", period=1.0)``.

    Raises WorkloadError for an unknown workload, an unknown parameter or a bad value."""
    try:
        cls = WORKLOADS[name]
    except KeyError:
        raise WorkloadError(f"unknown workload {name!r}; known: "
                            f"{', '.join(sorted(WORKLOADS))}") from None
    return cls(**params)


class Workload:
    """A deterministic, seeded set of processes with mergeable memory.

    Subclasses set ``name`` and ``Params`` (a frozen dataclass) and implement
    :meth:`build_initial` (memory of the processes started at READY) and :meth:`schedule`
    (time-ordered steps, possibly infinite).  Everything else derives from these two."""

    name: ClassVar[str] = ""
    Params: ClassVar[type] = CommonParams

    def __init__(self, **params):
        self.params = build_params(self.Params, self.name, params)
        self._initial: Memory | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    # --- to implement -------------------------------------------------------------------------

    def build_initial(self) -> Memory:
        """``{proc: {region: cells}}`` of the processes started by :meth:`start`, at READY."""
        raise NotImplementedError

    def schedule(self) -> Iterator[Step]:
        """All steps in time order, ignoring ``duration`` (may be infinite)."""
        return iter(())

    # --- derived ------------------------------------------------------------------------------

    def initial(self) -> Memory:
        """:meth:`build_initial`, computed once (treat the arrays as read-only)."""
        if self._initial is None:
            self._initial = self.build_initial()
        return self._initial

    @classmethod
    def describe_params(cls) -> list[dict]:
        """``[{"name", "type", "default", "help"}]`` of the parameters."""
        return describe(cls.Params)

    def processes(self) -> list[int]:
        """Logical numbers of the processes started at READY (forked ones come later)."""
        return sorted(self.initial())

    def steps(self, until: float | None = None) -> Iterator[Step]:
        """Steps with ``t <= until`` and ``t < duration`` (each bound only if set)."""
        duration = self.params.duration
        for step in self.schedule():
            if (until is not None and step.t > until) or (
                    duration is not None and step.t >= duration):
                return
            yield step

    def events(self, until: float | None = None) -> list[Event]:
        """The schedule as ``(t_offset_seconds, description, pages_affected)`` up to ``until``
        (default: ``duration``, else 60 s).  Offsets are from each process's READY."""
        if until is None:
            until = self.params.duration if self.params.duration is not None \
                else DEFAULT_HORIZON
        return [Event(step.t, f"proc {step.proc}: {step.description}", step.pages)
                for step in self.steps(until)]

    def state(self, t: float | None = None) -> State:
        """The model at READY (``t`` None) or after every step with offset ``<= t``."""
        state = State(self.initial())
        if t is not None:
            for step in self.steps(t):
                state.apply(step)
        return state

    def memory(self, t: float | None = None) -> Memory:
        """Expected cells ``{proc: {region: (pages, 4) int64}}`` at ``t`` (see
        :meth:`state`); :func:`ksmtrace.lab.workloads.content.render` gives their bytes."""
        return self.state(t).memory

    def layout(self, t: float | None = None) -> dict:
        """Expected memory at READY (``t`` None) or after every step with offset ``<= t``.

        Keys: ``pages_total``, ``contents`` [(key, count)], ``distinct``, ``duplicate_pages``,
        ``zero_pages``, ``processes`` (per logical process: ``proc``, the same summary keys and
        ``regions`` [{region, pages}])."""
        return self.state(t).layout()

    def max_pages(self) -> int:
        """Upper bound of resident workload pages (for the memory check in start)."""
        return self.layout()["pages_total"]

    def spec(self, proc: int, *, parent: int | None = None, log: bool = False, barrier: bool = False) -> dict:
        """The JSON spec of ``python -m ksmtrace.lab.workloads.worker`` for logical process
        ``proc``."""
        import dataclasses
        return {"workload": self.name, "params": dataclasses.asdict(self.params),
                "proc": proc, "parent": parent, "log": log, "barrier": barrier}

    def start(self, timeout: float = 30.0):
        """Start the processes, wait until all printed READY, return a
        :class:`~ksmtrace.lab.workloads.run.WorkloadRun` (a context manager that stops them)."""
        from ksmtrace.lab.workloads.run import WorkloadRun
        return WorkloadRun.launch(self, timeout=timeout)

