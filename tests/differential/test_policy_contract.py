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
@pytest.mark.parametrize("scen", ["mixed", "random-1", "random-2", "mixed-faults"])
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
        sensitivity = {**Oracle.sensitivity, "knob": (2, "mixed", {})}

    with pytest.raises(contract.ContractFailure, match="knob"):
        contract.check_sensitivity(Dead, scenarios)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_contract_catches_an_unequal_merge(scenarios, engine):
    """A policy that merges pages of different content fails the run (engine contract), on either
    engine, through the same primitive surface."""
    from ksmtrace.engine.daemon import NoDaemon
    from ksmtrace.errors import PolicyContractError
    from ksmtrace.policies.oracle import Oracle
    from ksmtrace.replay import replay

    class Liar(NoDaemon):
        def __init__(self, params, ctx):
            self.eng = ctx.engine
            self.prep = ctx.prep

        def on_snapshot(self, s, now):
            eng = self.eng
            cands = [pg for pg in range(self.prep.n_pages) if eng.cid(pg) >= 1]
            if len(cands) >= 2 and eng.cid(cands[0]) != eng.cid(cands[-1]):
                eng.stabilize(cands[0])
                eng.merge(cands[-1], eng.frame(cands[0]), now)

    class LiarPolicy(Oracle):
        name = "liar"
        Runtime = Liar
        kernel = None

    with pytest.raises(PolicyContractError):
        replay(scenarios("mixed"), LiarPolicy, engine=engine)
