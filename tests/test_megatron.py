"""megatron-core (GPTModel, its schedules, DDP and the distributed optimizer) on CPU/gloo.

Every layout trains from the same weights (a Hugging Face Llama mapped onto GPTModel) on the same
global batch: TP=PP=DP=1 is compared with the independent single-process reference
(``reference.py``: plain PyTorch, torch.optim.AdamW, torch.func), and TP=2, PP=2 (1F1B, 4
micro-batches), PP=2 interleaved (two virtual stages per rank), DP=2 (distributed optimizer, driven by ``fsam_train_step`` with a forward step
written like Megatron-LM's pretrain_gpt.py) and TP=2 x PP=2 with TP=PP=DP=1. Each layout is one
torchrun launch running every method.
"""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optional import require_module  # noqa: E402

require_module("megatron.core", "megatron-core is an optional extra: pip install -e .[megatron]")

from reference import _ce, micro_batch, reference_train, tiny_llama, weight_distance  # noqa: E402

HERE = Path(__file__).resolve().parent
SAM_TYPES = ["SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM"]
STEPS, MICRO, LR, RHO = 3, 4, 1e-2, 0.05
TOL = 2e-3 * LR * STEPS  # fp32 round-off, in weight units (the DeepSpeed tests use the same)

LAYOUTS = {  # name: (ranks, worker arguments)
    "single": (1, ["--methods", "AdamW," + ",".join(SAM_TYPES), "--microbatches", str(MICRO)]),
    "tp2": (2, ["--tp", "2", "--microbatches", str(MICRO)]),
    "pp2": (2, ["--pp", "2", "--microbatches", str(MICRO)]),
    "dp2": (2, ["--distopt", "--via-train-step", "--microbatches", str(MICRO // 2)]),
    "interleaved": (2, ["--pp", "2", "--vpp", "2", "--layers", "4", "--microbatches", str(MICRO),
                        "--methods", "FunctionalSAM,PreconditionedFunctionalSAM"]),
    "pp2_tied": (2, ["--pp", "2", "--tied", "--microbatches", str(MICRO), "--methods", "SAM,FunctionalSAM"]),
    "dp2_bf16": (2, ["--distopt", "--bf16", "--microbatches", str(MICRO // 2), "--methods", "PreconditionedFunctionalSAM"]),
    "tp2pp2": (4, ["--tp", "2", "--pp", "2", "--microbatches", str(MICRO), "--methods", "PreconditionedFunctionalSAM"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("megatron")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(out), OMP_NUM_THREADS="1")
    results = {}
    for name, (ranks, extra) in LAYOUTS.items():
        path = out / f"{name}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(_free_port()), str(HERE / "megatron_worker.py"),
               "--steps", str(STEPS), "--rho", str(RHO), "--lr", str(LR), "--out", str(path), *extra]
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name}:\n" + proc.stdout[-3000:] + proc.stderr[-5000:]
        results[name] = torch.load(path, weights_only=False)
        gf = Path(str(path) + ".logit_grads")
        if gf.exists():
            results[name + ".logit_grads"] = torch.load(gf)
    return results


@functools.lru_cache(maxsize=None)
def reference(method: str, layers: int = 2, tied: bool = False):
    model = tiny_llama(seed=0, layers=layers, tied=tied)
    losses = reference_train(model, STEPS, 1, MICRO, method, RHO if method != "AdamW" else 0.0, lr=LR)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


@pytest.mark.slow
@pytest.mark.parametrize("method", ["AdamW"] + SAM_TYPES)
def test_single_rank_matches_reference(runs, method):
    got = runs["single"][method]
    ref, ref_losses = reference(method)
    assert weight_distance(got["weights"], ref) < TOL
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert got["restore_exact"]
    if method != "AdamW":  # another method lands far away: the comparison can fail
        assert weight_distance(got["weights"], reference("AdamW")[0]) > 20 * TOL
        other = "FunctionalSAM" if "Functional" not in method else "SAM"
        assert weight_distance(got["weights"], reference(other)[0]) > 5 * TOL


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
@pytest.mark.parametrize("method", SAM_TYPES)
def test_parallel_layout_matches_single_rank(runs, layout, method):
    got, single = runs[layout][method], runs["single"][method]
    assert weight_distance(got["weights"], single["weights"]) < TOL
    assert weight_distance(got["weights"], reference(method)[0]) < TOL
    assert got["restore_exact"], "theta after pass 2 is not bit-identical on every rank"
    if layout == "dp2":  # fsam_train_step's reduced loss: DP-averaged over the global batch
        assert got["losses"] == pytest.approx(reference(method)[1], rel=1e-5)
    elif layout != "pp2":
        assert got["losses"] == pytest.approx(single["losses"], rel=1e-5)


@pytest.mark.slow
def test_tp2_pp2_preconditioned_fsam(runs):
    got = runs["tp2pp2"]["PreconditionedFunctionalSAM"]
    assert weight_distance(got["weights"], runs["single"]["PreconditionedFunctionalSAM"]["weights"]) < TOL
    assert weight_distance(got["weights"], reference("PreconditionedFunctionalSAM")[0]) < TOL
    assert got["restore_exact"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["SAM", "FunctionalSAM"])
def test_tied_embeddings_across_pipeline_stages(runs, method):
    """Tied input/output embeddings at PP=2: the first and the last stage each hold a copy; the
    norm counts it once (counting it twice lands 0.05 away) and both copies move together."""
    got = runs["pp2_tied"][method]
    assert weight_distance(got["weights"], reference(method, tied=True)[0]) < TOL
    assert got["restore_exact"]


@pytest.mark.slow
def test_bf16_distributed_optimizer(runs):
    """bf16 weights with fp32 main params: theta restored bit-exactly on every rank, and the losses
    follow the fp32 reference to bf16 round-off (weights themselves drift apart elementwise: Adam
    turns round-off on tiny entries into lr-sized steps)."""
    got = runs["dp2_bf16"]["PreconditionedFunctionalSAM"]
    assert got["restore_exact"]
    assert got["losses"] == pytest.approx(reference("PreconditionedFunctionalSAM")[1], rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["FunctionalSAM", "PreconditionedFunctionalSAM"])
def test_interleaved_pipeline_matches_reference(runs, method):
    """PP=2 with two virtual stages per rank (interleaved 1F1B, 4 layers) against the reference."""
    got = runs["interleaved"][method]
    assert weight_distance(got["weights"], reference(method, layers=4)[0]) < TOL
    assert weight_distance(got["weights"], reference("AdamW", layers=4)[0]) > 20 * TOL
    assert got["restore_exact"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["FunctionalSAM", "PreconditionedFunctionalSAM"])
def test_tp2_logit_grads_concatenate_to_tp1(runs, method):
    tp2, tp1 = runs["tp2.logit_grads"][method], runs["single.logit_grads"][method]
    assert len(tp2) == len(tp1) == MICRO
    model = tiny_llama(seed=0)
    for i, (a, b) in enumerate(zip(tp2, tp1)):
        assert a.shape == b.shape == (15, 2, 256)  # [sequence, micro-batch, vocabulary]
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)
        # and both equal the independent g_F = d(mean CE / micro-batches)/d logits of the HF model
        ids = micro_batch(0, 0, i, 1, MICRO)["input_ids"]
        leaf = model(input_ids=ids).logits.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_ce(leaf, ids) / MICRO, leaf)
        assert torch.allclose(a, g[:, :-1].transpose(0, 1), rtol=1e-4, atol=1e-8)
