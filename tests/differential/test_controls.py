"""Run options every engine and runtime must honour alike: a controller changing the ``ksm``
policy's parameters mid-run (through ``set_params`` and the run switch), and the safe presets for
every registered policy.  Reference engine vs fast engine (readable runtime), and readable runtime vs
numba kernel: identical tables, per-process tables and latency histograms."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksmtrace.controllers import Controller
from ksmtrace.policies.base import Params, param
from ksmtrace.policies.registry import list_policies
from ksmtrace.replay import replay
from ksmtrace.testing import make_trace
from tests.differential.test_runtimes import _same, traces


@dataclass(frozen=True)
class ScriptParams(Params):
    script: str = param("", "tick_s:key=value/key=value;... (values are integers)")


class Scripted(Controller):
    """Writes a fixed script of parameter changes at fixed times (a test controller)."""

    name = "scripted"
    Params = ScriptParams
    needs_host_memory = False
    controls = ("run", "pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages")

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.plan = []
        for part in [x for x in self.p.script.split(";") if x]:
            t, _, rest = part.partition(":")
            self.plan.append((float(t), {k: int(v) for k, v in (kv.split("=") for kv in rest.split("/") if kv)}))
        self.k = 0

    def ticks(self, duration_s):
        return [t for t, _ in self.plan]

    def step(self, state):
        out = self.plan[self.k][1]
        self.k += 1
        return out


WRITES = st.one_of(
    st.fixed_dictionaries({"pages_to_scan": st.sampled_from([1, 2, 7, 40])}),
    st.fixed_dictionaries({"sleep_millisecs": st.sampled_from([0, 1, 3, 15])}),
    st.fixed_dictionaries({"run": st.sampled_from([0, 1])}),
    st.fixed_dictionaries({"smart_scan": st.sampled_from([0, 1]), "use_zero_pages": st.sampled_from([0, 1])}),
    st.fixed_dictionaries({"pages_to_scan": st.sampled_from([3, 90]), "sleep_millisecs": st.sampled_from([2, 9]),
                           "run": st.sampled_from([0, 1])}),
)


@st.composite
def scripts(draw):
    n = draw(st.integers(1, 6))
    times = sorted(draw(st.lists(st.integers(0, 150), min_size=n, max_size=n)))
    parts = []
    for t in times:
        w = draw(WRITES)
        parts.append(f"{t / 1000:g}:" + "/".join(f"{k}={v}" for k, v in w.items()))
    return ";".join(parts)


def test_a_controller_driven_run_is_the_same_on_every_engine_and_runtime(tmp_path_factory):
    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(trace=traces(), script=scripts(), advisor=st.booleans(), profile=st.sampled_from(["6.11", "6.10", "6.12"]))
    def check(trace, script, advisor, profile):
        snaps, kw = trace
        tr = make_trace(tmp_path_factory.mktemp("gen") / "t", snaps, interval=0.02, **kw)
        params = {"pages_to_scan": 5, "sleep_millisecs": 2, "profile": profile,
                  **({"advisor_mode": "scan-time", "advisor_min_pages_to_scan": 4} if advisor else {})}
        ctl = Scripted({"script": script})
        ref = replay(tr, "ksm", params, engine="reference", controller=ctl)
        readable = replay(tr, "ksm", params, engine="fast", runtime="readable", controller=ctl)
        kern = replay(tr, "ksm", params, engine="fast", runtime="kernel", controller=ctl)
        _same(ref, readable, f"{script}: reference vs fast engine")
        _same(readable, kern, f"{script}: readable runtime vs numba kernel")
        assert ref.extras["controller"]["log"] == kern.extras["controller"]["log"]
        assert "run" in ref.table.columns and "sleep_millisecs" in ref.table.columns

    check()


@pytest.mark.parametrize("ctl", ["ksmtuned:monitor_interval=0.01,npages_boost=7,npages_min=1,npages_max=30,sleep_msec=1",
                                 "kubevirt:interval=0.02,pages_boost=5,npages_min=2,npages_init=3,npages_max=40,"
                                 "sleep_ms_baseline=1,free_percent=0.9",
                                 "scan-time:min_pages_to_scan=3,target_scan_time=1"])
def test_the_shipped_controllers_are_the_same_on_every_runtime(ctl, tmp_path_factory):
    @settings(max_examples=8, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(trace=traces(), host=st.sampled_from(["64K", "200K", "1G"]))
    def check(trace, host):
        snaps, kw = trace
        tr = make_trace(tmp_path_factory.mktemp("gen") / "t", snaps, interval=0.02, **kw)
        runs = [replay(tr, "ksm", {"sleep_millisecs": 2}, engine=e, runtime=r, controller=ctl, host_memory=host)
                for e, r in (("reference", "auto"), ("fast", "readable"), ("fast", "kernel"))]
        _same(runs[0], runs[1], f"{ctl} on {host}: reference vs fast engine")
        _same(runs[1], runs[2], f"{ctl} on {host}: readable runtime vs numba kernel")

    check()


POLICIES = list_policies()


@pytest.mark.parametrize("cls", POLICIES, ids=[p.name for p in POLICIES])
def test_every_policy_obeys_a_preset_alike_on_every_runtime(cls, tmp_path_factory):
    procs = {0: {"uid": 1, "cgroup": "/a"}, 1: {"uid": 2, "cgroup": "/b"}, 2: {"uid": 1, "cgroup": "/b"},
             9: {"uid": 1, "cgroup": "/a", "ppid": 1000}}

    @settings(max_examples=10, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(trace=traces(), preset=st.sampled_from(["zero-pages", "same-domain", "windows:process", "same-domain:user",
                                                   "zero-pages+same-domain:cgroup"]))
    def check(trace, preset):
        snaps, kw = trace
        kw = {**kw, "procs": {p: {**procs.get(p, {}), **(kw.get("procs") or {}).get(p, {})} for p in set(procs) | set(kw.get("procs") or {})}}
        tr = make_trace(tmp_path_factory.mktemp("gen") / "t", snaps, interval=0.02, **kw)
        params = {k: v for k, v in {"pages_to_scan": 7, "sleep_millisecs": 2}.items()
                  if k in {p["name"] for p in cls.parameter_table()}}
        ref = replay(tr, cls, params, engine="reference", restrict=preset)
        readable = replay(tr, cls, params, engine="fast", runtime="readable", restrict=preset)
        _same(ref, readable, f"{cls.name} {preset}: reference vs fast engine")
        if cls.has_kernel():
            _same(readable, replay(tr, cls, params, engine="fast", runtime="kernel", restrict=preset),
                  f"{cls.name} {preset}: readable runtime vs numba kernel")
        t = ref.table
        assert (t["frames_saved"] <= t["oracle_saved"]).all()
        assert (t["oracle_saved"] <= t["unrestricted_oracle_saved"]).all()
        if preset == "same-domain":
            assert t["exposed_merges"].sum() == 0

    check()
