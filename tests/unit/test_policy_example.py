"""docs/policies.md's one-file policy: plain Python, no numba, runs on the default engine and honours
the contract (the code block is executed from the document, so the documentation cannot rot)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ksmtrace.replay import replay
from ksmtrace.testing import contract

DOC = Path(__file__).resolve().parents[2] / "docs" / "policies.md"


@pytest.fixture(scope="module")
def example():
    text = DOC.read_text()
    block = text[text.index("## Writing a policy"):]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)
    return ns["FirstMatch"]


def test_the_example_runs_on_the_default_engine(example, scenarios):
    tr = scenarios("mixed")
    res = replay(tr, example, {"pages_per_wakeup": 50})
    assert res.spec["engine"] == "fast"
    t = res.table
    assert t["frames_saved"].max() > 0
    assert (t["frames_saved"] <= t["oracle_saved"]).all()
    assert t["policy_merges"][-1] == res.summary["merges"] > 0
    assert t["u_pages_visited"].sum() > 0 and res.cpu_seconds() > 0


def test_the_example_honours_the_contract(example, scenarios):
    contract.check_construct(example)
    contract.check_trace(scenarios("mixed"), example)
    contract.check_sensitivity(example, scenarios)
