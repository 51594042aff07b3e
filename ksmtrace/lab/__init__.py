"""The live-host wing: code that starts processes, drives the real KSM or boots guests.

* :mod:`.kernelksm` — the KSM sysfs knobs (read, write, restore on every path, a host-wide lock);
* :mod:`.workloads` — synthetic workloads with known sharing, for live tests and ``validate``;
* :mod:`.programs` — real programs as workloads (QEMU guests, a pre-fork server, any command);
* :mod:`.validate` — ground-truth runs: a workload under real KSM, captured, then compared;
* :mod:`.microbench` — the cost model's per-unit microbenchmarks and ksmd's real wake-up cycle.

The offline library (trace, replay, policies, analysis, plots) never imports this package; the
CLI and the live tests do.
"""
