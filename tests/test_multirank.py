"""Two ranks, launched once per suite with the real deepspeed launcher: every method at ZeRO
stages 0-3 against the independent single-process reference with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import LR, STEPS, assert_shares, reference_state, reference_trace
from dist_worker import CASES, case_name
from reference import weight_distance

HERE = Path(__file__).resolve().parent
TOL = 2e-3
UNIT = LR * STEPS


def launch(suite: str, out: Path, num_ranks: int = 2, timeout: int = 900):
    cmd = ["deepspeed", "--num_gpus", str(num_ranks), "--master_port", str(_free_port()),
           str(HERE / "dist_worker.py"), "--out", str(out), "--suite", suite]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero0_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero0")
    launch("zero0", out)
    return out


ZERO0 = [c for c in CASES["zero0"] if "loop" not in c[1]]
LOOP = [c for s in ("zero0", "zero") for c in CASES[s] if "loop" in c[1]]


@pytest.mark.slow
@pytest.mark.parametrize("method,opts", ZERO0, ids=[case_name(m, o) for m, o in ZERO0])
def test_two_ranks_match_reference(zero0_run, method, opts):
    name = case_name(method, opts)
    state = torch.load(zero0_run / f"{name}.pt")
    ref_state, ref_losses = reference_state(method, world=2, **opts)
    assert weight_distance(state, ref_state) / UNIT < TOL
    # a wrong method or a one-rank gradient would be far away
    other = "AdamW" if method != "AdamW" else "SAM"
    assert weight_distance(state, reference_state(other, world=2)[0]) / UNIT > 50 * TOL
    assert weight_distance(state, reference_state(method, world=1, **opts)[0]) / UNIT > 50 * TOL
    r0 = json.loads((zero0_run / f"{name}.rank0.json").read_text())
    r1 = json.loads((zero0_run / f"{name}.rank1.json").read_text())
    # the returned loss is averaged over ranks: identical on both, equal to the reference's
    assert r0["losses"] == r1["losses"]
    assert r0["losses"] == pytest.approx(ref_losses, rel=1e-5)
    if method != "AdamW":
        assert [m["grad_norm"] for m in r0["metrics"]] == [m["grad_norm"] for m in r1["metrics"]]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    launch("zero", out)
    return out


def _load(run, name):
    return (torch.load(run / f"{name}.pt"),
            [json.loads((run / f"{name}.rank{r}.json").read_text()) for r in (0, 1)])


FP32_ZERO = [c for c in CASES["zero"] if not c[1].get("bf16") and "loop" not in c[1]]


@pytest.mark.slow
@pytest.mark.parametrize("method,opts", FP32_ZERO, ids=[case_name(m, o) for m, o in FP32_ZERO])
def test_zero_stages_match_reference(zero_run, method, opts):
    state, ranks = _load(zero_run, case_name(method, opts))
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
        assert [m["eps_share_embed"] for m in ranks[0]["metrics"]] == [m["eps_share_embed"] for m in ranks[1]["metrics"]]


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
    z3, r3 = _load(zero_run, case_name(method, {"stage": 3, "bf16": 1}))
    z0, r0 = _load(zero_run, case_name(method, {"stage": 0, "bf16": 1}))
    assert all(m["restored"] is True for r in r3 + r0 for m in r["metrics"])
    assert all(m["eps_norm"] == pytest.approx(0.05, rel=1e-3) for r in r3 + r0 for m in r["metrics"])
    from reference import tiny_llama

    w0 = {k: v.detach().float() for k, v in tiny_llama(0).state_dict().items()}

    def dist(state, ref):
        num = sum(((state[k].double() - ref[k].double()) ** 2).sum() for k in ref).sqrt()
        return float(num / sum(((ref[k].double() - w0[k].double()) ** 2).sum() for k in ref).sqrt())

    for state, hidden in ((z3, False), (z0, True)):
        right = dist(state, reference_state(method, world=2, hidden_adam_step=hidden)[0])
        wrong = {other: dist(state, reference_state(other, world=2, hidden_adam_step=hidden)[0])
                 for other in ("AdamW", "FunctionalSAM")}
        wrong["hidden step" if not hidden else "no hidden step"] = dist(
            state, reference_state(method, world=2, hidden_adam_step=not hidden)[0])
        assert right < 0.15, right
        assert all(w > 2 * right for w in wrong.values()), (right, wrong)


def _lr_at(step):
    # DeepSpeed's WarmupLR over 4 steps: the rates used are 0, 0, lr/4, lr/2 (see test_engine)
    return LR * max(step - 1, 0) / 4


@pytest.mark.slow
@pytest.mark.parametrize("method,opts", LOOP, ids=[case_name(m, o) for m, o in LOOP])
def test_loop_mode_two_ranks(zero0_run, zero_run, method, opts):
    """A plain DeepSpeed loop (engine(...), engine.backward(loss), engine.step() per micro-batch,
    gas 2, clipping) runs the method: with the model's own loss, an LR and a rho warm-up against
    the reference; with the default loss bit-identical to train_batch on the same data."""
    run = zero_run if (method, opts) in CASES["zero"] else zero0_run
    state, ranks = _load(run, case_name(method, opts))
    assert all(m["restored"] is True for r in ranks for m in r["metrics"])
    assert [m["method"] for m in ranks[0]["metrics"]] == [method] * STEPS
    assert ranks[0]["losses"] == ranks[1]["losses"]
    if opts["loop"] == "hf":
        ref_state, ref_losses = reference_state(method, world=2, rho_warmup_steps=3, lr_at=_lr_at)
        assert weight_distance(state, ref_state) / UNIT < TOL
        # without the warm-ups, or as plain AdamW, the weights land far away
        assert weight_distance(state, reference_state(method, world=2, lr_at=_lr_at)[0]) / UNIT > 10 * TOL
        assert weight_distance(state, reference_state("AdamW", world=2, lr_at=_lr_at)[0]) / UNIT > 10 * TOL
        assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-5)
        assert [m["rho"] for m in ranks[0]["metrics"]] == pytest.approx([0.0, 0.05 / 3, 0.1 / 3, 0.05])
        assert_shares(ranks[0]["metrics"], reference_trace(method, world=2, rho_warmup_steps=3, lr_at=_lr_at))
    else:  # fp32 and bf16, ZeRO 0-3: the same bits as train_batch
        same = {k: v for k, v in opts.items() if k != "loop"}
        batch_state, batch_ranks = _load(run, case_name(method, same))
        assert all(torch.equal(state[k], batch_state[k]) for k in state)
        assert ranks[0]["losses"] == batch_ranks[0]["losses"]
        for a, b in zip(ranks[0]["metrics"], batch_ranks[0]["metrics"]):
            assert (a["grad_norm"], a["eps_norm"]) == (b["grad_norm"], b["eps_norm"])
