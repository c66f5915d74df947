"""Two ranks, launched once per suite with the real deepspeed launcher: every method at ZeRO
stages 0-3 against the independent single-process reference with the same global batch."""

from __future__ import annotations

import pytest
import torch
from common import LR, STEPS, assert_shares, load_case, reference_state, reference_trace
from dist_worker import CASES, Case
from launch import launch_suite
from reference import weight_distance

TOL = 2e-3
UNIT = LR * STEPS


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero0")
    launch_suite("zero0", out)
    return out


ZERO0 = [c for c in CASES["zero0"] if c.loop is None]
LOOP = [c for s in ("zero0", "zero") for c in CASES[s] if c.loop is not None]


@pytest.mark.slow
@pytest.mark.parametrize("case", ZERO0, ids=[c.name for c in ZERO0])
def test_two_ranks_match_reference(zero0_run, case):
    method, opts = case.method, case.reference_options()
    state, (r0, r1) = load_case(zero0_run, case)
    ref_state, ref_losses = reference_state(method, world=2, **opts)
    assert weight_distance(state, ref_state) / UNIT < TOL
    # a wrong method or a one-rank gradient would be far away
    other = "AdamW" if method != "AdamW" else "SAM"
    assert weight_distance(state, reference_state(other, world=2)[0]) / UNIT > 50 * TOL
    assert weight_distance(state, reference_state(method, world=1, **opts)[0]) / UNIT > 50 * TOL
    # the returned loss is averaged over ranks: identical on both, equal to the reference's
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(ref_losses, rel=1e-5)
    if method != "AdamW":
        assert [m["grad_norm"] for m in r0["metrics"]] == [m["grad_norm"] for m in r1["metrics"]]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    launch_suite("zero", out)
    return out


FP32_ZERO = [c for c in CASES["zero"] if not c.bf16 and c.loop is None]


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32_ZERO, ids=[c.name for c in FP32_ZERO])
def test_zero_stages_match_reference(zero_run, case):
    method = case.method
    state, ranks = load_case(zero_run, case)
    ref_state, ref_losses = reference_state(method, world=2)
    assert weight_distance(state, ref_state) / UNIT < TOL
    other = "AdamW" if method != "AdamW" else "SAM"
    assert weight_distance(state, reference_state(other, world=2)[0]) / UNIT > 50 * TOL
    assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-5)
    if method != "AdamW":
        # weights right before each optimizer step are bit-identical to theta, on both ranks
        assert all(m["restored"] is True for r in ranks for m in r["metrics"])
        assert all(m["eps_norm"] == pytest.approx(0.05, rel=1e-5) for m in ranks[0]["metrics"])
        # the shares of ||eps||^2 (each rank's partitions, one all-reduce) against the reference
        assert_shares(ranks[0]["metrics"], reference_trace(method, world=2))
        assert [m["eps_share_embed"] for m in ranks[0]["metrics"]] == [
            m["eps_share_embed"] for m in ranks[1]["metrics"]
        ]


@pytest.mark.slow
def test_zero3_bf16_matches_zero0_bf16(zero_run):
    """Two ranks, PFSAM in bf16 at ZeRO 0 and 3: restored bit-exactly, ||eps|| = rho, and each
    trajectory nearer to its own fp32 reference than to a wrong method's by a factor of 2 or more.

    The distance is ||w - w_ref|| / ||w_ref - w0|| (relative to the reference's update). Measured
    (these two ranks, 4 steps): bf16 round-off puts ZeRO 3 at 0.066 from PFSAM's reference,
    against 0.30 from the one with DeepSpeed's hidden FP16_Optimizer step, 0.35 from FSAM's and
    0.60 from AdamW's; ZeRO 0 at 0.061 from the reference with the hidden step
    (``hidden_adam_step``), against 0.27 from the one without it, 0.33 from FSAM's and 0.57 from
    AdamW's (tolerance 0.15, wrong ones > 2x the distance found: 4.4x measured). PSAM's reference
    (0.071-0.084) is inside bf16's resolution of a trajectory: the preconditioned ascent itself is compared with its
    formula at every step in test_bf16_checks.py (one rank, ZeRO 0-3) and test_zero_extras.py
    (two ranks, ZeRO 3). The former check (losses to rel 3e-2) passed for AdamW's trajectory."""
    method = "PreconditionedFunctionalSAM"
    z3, r3 = load_case(zero_run, Case(method, stage=3, bf16=True))
    z0, r0 = load_case(zero_run, Case(method, stage=0, bf16=True))
    assert all(m["restored"] is True for r in r3 + r0 for m in r["metrics"])
    assert all(m["eps_norm"] == pytest.approx(0.05, rel=1e-3) for r in r3 + r0 for m in r["metrics"])
    from reference import tiny_llama

    w0 = {k: v.detach().float() for k, v in tiny_llama(0).state_dict().items()}

    def dist(state, ref):
        num = sum(((state[k].double() - ref[k].double()) ** 2).sum() for k in ref).sqrt()
        return float(num / sum(((ref[k].double() - w0[k].double()) ** 2).sum() for k in ref).sqrt())

    for state, hidden in ((z3, False), (z0, True)):
        right = dist(state, reference_state(method, world=2, hidden_adam_step=hidden)[0])
        wrong = {
            other: dist(state, reference_state(other, world=2, hidden_adam_step=hidden)[0])
            for other in ("AdamW", "FunctionalSAM")
        }
        wrong["hidden step" if not hidden else "no hidden step"] = dist(
            state, reference_state(method, world=2, hidden_adam_step=not hidden)[0]
        )
        assert right < 0.15, right
        assert all(w > 2 * right for w in wrong.values()), (right, wrong)


def _lr_at(step):
    # DeepSpeed's WarmupLR over 4 steps: the rates used are 0, 0, lr/4, lr/2 (see test_engine)
    return LR * max(step - 1, 0) / 4


@pytest.mark.slow
@pytest.mark.parametrize("case", LOOP, ids=[c.name for c in LOOP])
def test_loop_mode_two_ranks(zero0_run, zero_run, case):
    """A plain DeepSpeed loop (engine(...), engine.backward(loss), engine.step() per micro-batch,
    gas 2, clipping) runs the method: with the model's own loss, an LR and a rho warm-up against
    the reference; with the default loss bit-identical to train_batch on the same data."""
    method = case.method
    run = zero_run if case in CASES["zero"] else zero0_run
    state, ranks = load_case(run, case)
    assert all(m["restored"] is True for r in ranks for m in r["metrics"])
    assert [m["method"] for m in ranks[0]["metrics"]] == [method] * STEPS
    assert ranks[0]["losses"] == ranks[1]["losses"]
    if case.loop == "hf":
        ref_state, ref_losses = reference_state(method, world=2, rho_warmup_steps=3, lr_at=_lr_at)
        assert weight_distance(state, ref_state) / UNIT < TOL
        # without the warm-ups, or as plain AdamW, the weights land far away
        assert weight_distance(state, reference_state(method, world=2, lr_at=_lr_at)[0]) / UNIT > 10 * TOL
        assert weight_distance(state, reference_state("AdamW", world=2, lr_at=_lr_at)[0]) / UNIT > 10 * TOL
        assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert [m["rho"] for m in ranks[0]["metrics"]] == pytest.approx([0.0, 0.05 / 3, 0.1 / 3, 0.05])
        assert_shares(ranks[0]["metrics"], reference_trace(method, world=2, rho_warmup_steps=3, lr_at=_lr_at))
    else:  # fp32 and bf16, ZeRO 0-3: the same bits as train_batch
        batch_state, batch_ranks = load_case(run, case.but(loop=None))
        assert all(torch.equal(state[k], batch_state[k]) for k in state)
        assert ranks[0]["losses"] == batch_ranks[0]["losses"]
        for a, b in zip(ranks[0]["metrics"], batch_ranks[0]["metrics"]):
            assert (a["grad_norm"], a["eps_norm"]) == (b["grad_norm"], b["eps_norm"])
