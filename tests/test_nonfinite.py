"""A non-finite loss or gradient skips the step through DeepSpeed's overflow path, at every layout.

Two ranks, one launch: preconditioned FunctionalSAM with a warm-up of both the learning rate and
rho, an infinite logit injected on one rank in pass 1 of step 1 and on the other rank in pass 2 of
step 3. Each injected step must be skipped on both ranks (weights bit-identical before and after,
the restore after pass 2 exact), and the whole run must equal, bit for bit, the run that never saw
those two steps' data (so AdamW's state, its step count, the LR schedule and the rho warm-up were
all held). A rho of 1e30 blows up every pass 2: every step is skipped and the weights stay at their
initial values. ZeRO 0 in fp32, where DeepSpeed has no overflow check, is the engine's own skip.
"""

from __future__ import annotations

import pytest
import torch
from common import load_case
from dist_worker import CASES, FAULTS
from launch import launch_suite
from reference import tiny_llama

LAYOUTS = [c for c in CASES["nonfinite"] if c.run == "faults"]
SKIPPED = sorted({s for s, _, _ in FAULTS})


@pytest.fixture(scope="module")
def nonfinite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite")
    launch_suite("nonfinite", out)
    return out


def _ids(cases):
    return [f"{c.method}-{c.layout}" for c in cases]


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=[c.layout for c in LAYOUTS])
def test_injected_inf_skips_the_step_exactly(nonfinite_run, layout):
    assert layout.method == "PreconditionedFunctionalSAM"
    state, ranks = load_case(nonfinite_run, layout)
    ref_state, ref_ranks = load_case(nonfinite_run, layout.but(run="ref"))
    for r in ranks:
        ms = r["metrics"]
        assert [i for i, m in enumerate(ms) if m["skipped"]] == SKIPPED
        assert all(ms[i]["unchanged"] is True for i in SKIPPED)  # weights untouched by a skipped step
        assert all(m["restored"] is True for m in ms)  # theta exact before every step, pass-2 fault too
        # pass-1 fault: no perturbation and no pass 2; the learning rate and rho are held
        assert ms[1]["eps_norm"] == 0.0 and not torch.isfinite(torch.tensor(ms[1]["grad_norm"]))
        kept = [m for i, m in enumerate(ms) if i not in SKIPPED]
        ref = ref_ranks[ranks.index(r)]["metrics"]
        assert [m["lr"] for m in kept] == [m["lr"] for m in ref]
        assert [m["rho"] for m in kept] == [m["rho"] for m in ref]
        assert [m["loss"] for m in kept] == [m["loss"] for m in ref]
        assert len({m["lr"] for m in kept}) > 1 and len({m["rho"] for m in kept}) == len(kept)  # both move
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k


BLOWUP = [c for c in CASES["nonfinite"] if c.run == "blowup"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BLOWUP, ids=_ids(BLOWUP))
def test_a_rho_that_blows_up_pass_2_is_skipped(nonfinite_run, case):
    state, ranks = load_case(nonfinite_run, case)
    for r in ranks:
        assert all(m["skipped"] and m["eps_norm"] > 1e29 and m["restored"] for m in r["metrics"])
    init = tiny_llama(0).state_dict()
    for k, v in state.items():
        assert torch.equal(v, init[k].float()), k


LOSS_CASES = [c for c in CASES["nonfinite"] if c.run in ("lossinf", "lossinf2")]


@pytest.mark.slow
@pytest.mark.parametrize("case", LOSS_CASES, ids=_ids(LOSS_CASES))
def test_an_infinite_loss_with_finite_gradients_skips_the_step(nonfinite_run, case):
    """loss_fn's loss + inf has finite gradients, so DeepSpeed's own check would let the update
    through; the engine turns it into non-finite gradients (on every rank alike, at every layout)
    and the step is skipped exactly as for a non-finite gradient."""
    state, ranks = load_case(nonfinite_run, case)
    ref = "ref1" if case.run == "lossinf" else "ref"
    ref_state, ref_ranks = load_case(nonfinite_run, case.but(run=ref))
    skipped = [1] if case.run == "lossinf" else SKIPPED
    for r, rr in zip(ranks, ref_ranks):
        ms = r["metrics"]
        assert [i for i, m in enumerate(ms) if m["skipped"]] == skipped
        assert all(ms[i]["unchanged"] is True for i in skipped)
        kept = [m for i, m in enumerate(ms) if i not in skipped]
        assert [m["lr"] for m in kept] == [m["lr"] for m in rr["metrics"]]
        assert [m["rho"] for m in kept] == [m["rho"] for m in rr["metrics"]]
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k
