"""The contract suite, run over every registered policy (later policies get it for free)."""
import pytest

from ksmtrace.policies.registry import list_policies
from ksmtrace.testing import contract

POLICIES = list_policies()
IDS = [p.name for p in POLICIES]


def test_builtin_policies_registered():
    names = set(IDS)
    assert {"oracle", "ksm"} <= names


@pytest.mark.parametrize("cls", POLICIES, ids=IDS)
def test_construct_and_reject_unknown(cls):
    contract.check_construct(cls)


@pytest.mark.parametrize("cls", POLICIES, ids=IDS)
@pytest.mark.parametrize("scen", ["mixed", "random-1", "random-2"])
def test_contract_on_trace(cls, scen, scenarios):
    contract.check_trace(scenarios(scen), cls)


@pytest.mark.parametrize("cls", POLICIES, ids=IDS)
def test_every_parameter_changes_something(cls, scenarios):
    contract.check_sensitivity(cls, scenarios)


def test_contract_catches_a_dead_parameter(scenarios):
    """The sensitivity check fails for a parameter that is not wired up."""
    from dataclasses import dataclass

    from ksmtrace.policies.base import param
    from ksmtrace.policies.oracle import Oracle, OracleParams

    @dataclass(frozen=True)
    class P(OracleParams):
        knob: int = param(1, "does nothing")

    class Dead(Oracle):
        name = "dead"
        Params = P
        sensitivity = {"knob": (2, "mixed", {})}

    with pytest.raises(contract.ContractFailure, match="knob"):
        contract.check_sensitivity(Dead, scenarios)


def test_contract_catches_an_unequal_merge(scenarios):
    """A policy that merges pages of different content fails the run (engine contract)."""
    from ksmtrace.engine import state as st
    from ksmtrace.errors import PolicyContractError
    from ksmtrace.policies.oracle import Oracle, OracleFast
    from ksmtrace.replay import replay

    class Liar(OracleFast):
        def on_snapshot(self, s, now):
            E = self.E
            cid = E.pg[:, st.P_CID]
            cands = (cid >= 1).nonzero()[0]
            if len(cands) >= 2:
                a, b = cands[0], cands[-1]
                if cid[a] != cid[b]:
                    st.stabilize(E, a)
                    st.merge(E, b, E.pg[a, st.P_FRAME], now)

    class LiarPolicy(Oracle):
        name = "liar"

        def runtime(self, ctx):
            return Liar(ctx)

    with pytest.raises(PolicyContractError):
        replay(scenarios("mixed"), LiarPolicy)
