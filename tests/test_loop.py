"""Loop mode on one rank, in this process: a plain DeepSpeed loop (engine(...), engine.backward(loss),
engine.step() per micro-batch) runs the configured method exactly, refuses what it cannot follow,
and keeps nothing past the step. Two ranks at ZeRO 0, 2 and 3: tests/test_multirank.py."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from common import GAS, LR, STEPS, assert_shares, ds_config, engine_run, full_state, reference_state, reference_trace
from reference import micro_batch, tiny_llama, weight_distance, weighted_ce

import fsam_ds
from fsam_ds.config import FSAMConfigError
from fsam_ds.loop import LoopModeError

SAM_TYPES = ["SAM", "PreconditionedSAM", "FunctionalSAM", "PreconditionedFunctionalSAM"]
TOL = 2e-3  # as in test_engine: fp32 round-off in units of lr * steps; other methods are >= 0.2 away
UNIT = LR * STEPS


def data(steps=STEPS, gas=GAS):
    return iter([micro_batch(s, 0, i, 1, gas) for s in range(steps) for i in range(gas)])


def build(method, config=None, **kw):
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=config or ds_config(method), **kw)
    return engine


@pytest.mark.parametrize("method", SAM_TYPES)
def test_plain_loop_matches_reference_and_train_batch(method):
    # the model's own outputs.loss (labels given): against the independent reference
    state, losses, metrics = engine_run(method, loop="hf")
    ref_state, ref_losses = reference_state(method)
    assert weight_distance(state, ref_state) / UNIT < TOL
    assert weight_distance(state, reference_state("AdamW")[0]) / UNIT > 50 * TOL
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert all(m["eps_norm"] == pytest.approx(0.05, rel=1e-6) and m["method"] == method for m in metrics)
    assert_shares(metrics, reference_trace(method))
    # the loss of the logits through loop mode is train_batch, bit for bit (weights and metrics)
    loop_state, loop_losses, loop_metrics = engine_run(method, loop="logits")
    batch_state, batch_losses, batch_metrics = engine_run(method)
    assert all(torch.equal(loop_state[k], batch_state[k]) for k in batch_state)
    assert loop_losses == batch_losses
    keys = ("method", "loss", "grad_norm", "eps_norm", "rho", "lr", "skipped", "eps_share_embed", "eps_share_output")
    assert [[m[k] for k in keys] for m in loop_metrics] == [[m[k] for k in keys] for m in batch_metrics]
    assert set(loop_metrics[0]) == set(batch_metrics[0])


def _weighted_loop(method, **kw):
    engine = build(method, **kw)
    it = data()
    for _ in range(STEPS * GAS):
        ids = next(it)["input_ids"]
        out = engine(input_ids=ids)
        engine.backward(weighted_ce(out.logits, ids))
        engine.step()
    return full_state(engine)


def _weighted_loss_fn(logits, batch):
    return weighted_ce(logits, batch["input_ids"])


@pytest.mark.parametrize("method", ["FunctionalSAM", "SAM"])
def test_a_loss_of_the_loops_own(method):
    ref_state, _ = reference_state(method, loss=weighted_ce)
    # the distance to the method with the ordinary loss: what a loop mode that ignored the loss would give
    assert weight_distance(ref_state, reference_state(method)[0]) / UNIT > 10 * TOL
    if method == "FunctionalSAM":  # g_F comes from the loop's own backward: any loss of the logits
        state = _weighted_loop(method)
    else:
        with pytest.raises(FSAMConfigError, match="loss_fn"):
            _weighted_loop(method)
        state = _weighted_loop(method, loss_fn=_weighted_loss_fn)
    assert weight_distance(state, ref_state) / UNIT < TOL


def test_sam_refuses_a_loss_that_is_not_loss_fn():
    engine = build("SAM", loss_fn=_weighted_loss_fn)
    ids = micro_batch(0, 0, 0, 1, GAS)["input_ids"]
    out = engine(input_ids=ids)
    with pytest.raises(FSAMConfigError, match="not loss_fn"):
        engine.backward(weighted_ce(out.logits, ids) * 2)


def test_misuse_is_refused():
    method = "PreconditionedFunctionalSAM"
    ids = micro_batch(0, 0, 0, 1, GAS)["input_ids"]
    one = ds_config(method, gas=1)
    # step() at the boundary with no recorded forward: never a plain AdamW step
    engine = build(method, one)
    before = full_state(engine)
    with pytest.raises(LoopModeError, match="no recorded forward"):
        engine.step()
    assert all(torch.equal(before[k], v) for k, v in full_state(engine).items())
    # a backward of a loss that did not come from this step's forwards
    with pytest.raises(LoopModeError, match="no training forward"):
        engine.backward(engine.module(input_ids=ids).logits.sum())
    out = engine(input_ids=ids)
    with pytest.raises(LoopModeError, match="does not come from the logits"):
        engine.backward(engine.module(input_ids=ids).logits.float().pow(2).mean())
    engine.backward(out.logits.float().logsumexp(-1).mean())
    # a forward left without its backward
    engine(input_ids=ids)
    with pytest.raises(LoopModeError, match="had no backward"):
        engine.step()
    # FunctionalSAM with a loss that reaches the weights other than through the logits
    engine = build(method, one)
    out = engine(input_ids=ids)
    penalty = sum(p.square().sum() for p in engine.module.parameters())
    with pytest.raises(FSAMConfigError, match="other than through the model's logits"):
        engine.backward(fsam_ds.causal_lm_loss(out.logits, ids) + 1e-4 * penalty)
    # train_batch in the middle of a loop-mode step
    with pytest.raises(LoopModeError, match="in the middle"):
        engine.train_batch(data())


def test_eval_and_no_grad_forwards_change_nothing():
    method = "PreconditionedFunctionalSAM"

    def run(extra):
        engine = build(method)
        it = data()
        for _ in range(STEPS * GAS):
            ids = next(it)["input_ids"]
            if extra:
                with torch.no_grad():
                    engine(input_ids=ids[:, :8])
                engine.eval()
                engine(input_ids=ids)
                engine.train()
                engine.eval_batch({"input_ids": ids})
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
            engine.step()
        return full_state(engine), engine

    plain, _ = run(False)
    mixed, engine = run(True)
    assert all(torch.equal(plain[k], mixed[k]) for k in plain)
    assert engine._loop.records == []


@pytest.mark.parametrize("method", ["SAM", "PreconditionedFunctionalSAM"])
def test_step_keeps_nothing(method):
    """Between the passes loop mode keeps each micro-batch's inputs by reference and g_F in its
    cache; after the step nothing is held (the loop's own tensors are freed with the loop's
    references)."""
    engine = build(method)
    refs, kept = [], []
    it = data(steps=2)
    for s in range(2 * GAS):
        ids = next(it)["input_ids"].clone()
        refs.append(weakref.ref(ids))
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out.loss)
        kept.append(engine._loop.kept_bytes())
        engine.step()
        del out, ids
        if s % GAS == GAS - 1:
            gc.collect()
            assert engine._loop.records == [] and engine._loop.kept_bytes() == 0
            assert all(r() is None for r in refs)
    logits_bytes = 2 * 16 * 256 * 4  # batch x seq x vocab, fp32
    if method == "PreconditionedFunctionalSAM":
        assert kept[:GAS] == [logits_bytes * (i + 1) for i in range(GAS)]
    else:
        assert kept == [0] * len(kept)


@pytest.mark.parametrize("cache", ["host", "recompute"])
def test_cache_modes_in_loop_mode(cache):
    method = "PreconditionedFunctionalSAM"
    base, _, _ = engine_run(method, loop="logits")
    cfg = ds_config(method)
    cfg["optimizer"]["params"]["logit_grad_cache"] = cache
    state, _, _ = engine_run(method, config=cfg, loop="logits")
    assert all(torch.equal(state[k], base[k]) for k in base)
    if cache == "recompute":  # g_F is recomputed from loss_fn: a loop's other loss is refused
        with pytest.raises(FSAMConfigError, match="recompute"):
            _weighted_loop(method, config=cfg)


@pytest.mark.parametrize("method", ["SAM", "PreconditionedFunctionalSAM"])
def test_ascent_every_in_loop_mode(method):
    cfg = ds_config(method)
    cfg["optimizer"]["params"]["ascent_every"] = 2
    state, _, metrics = engine_run(method, config=cfg, loop="hf")
    ref_state, _ = reference_state(method, ascent_every=2)
    assert weight_distance(state, ref_state) / UNIT < TOL
    assert weight_distance(state, reference_state(method)[0]) / UNIT > 10 * TOL
    assert [m["ascent_reused"] for m in metrics] == [False, True, False, True]


def test_positional_inputs_sharpness_every_and_monitors(tmp_path):
    method = "FunctionalSAM"
    cfg = ds_config(method)
    cfg["optimizer"]["params"]["sharpness_every"] = 2
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path), "job_name": "job"}
    engine = build(method, cfg)
    it = data()
    for _ in range(STEPS * GAS):
        ids = next(it)["input_ids"]
        out = engine(ids)
        engine.backward(fsam_ds.causal_lm_loss(out.logits, ids))
        engine.step()
    assert "tau_logit" in engine.last_metrics and "lambda_max" in engine.last_metrics
    assert weight_distance(full_state(engine), reference_state(method)[0]) / UNIT < TOL
    # DeepSpeed's monitors get the step's metrics, as from train_batch
    files = {p.name for p in tmp_path.rglob("*.csv")}
    assert all(any(k in f for f in files) for k in ("eps_norm", "grad_norm", "rho", "tau_logit")), files


def test_adamw_type_is_plain_deepspeed():
    engine = build("AdamW")
    assert engine._loop is None and "backward" not in vars(engine.engine)


def test_an_infinite_loss_of_the_loops_own_skips_the_step():
    """A loss that is infinite while its gradients are finite (``loss + inf``) is skipped in loop
    mode too (two ranks and every layout: tests/test_nonfinite.py, through train_batch)."""
    method = "PreconditionedFunctionalSAM"
    engine = build(method)
    before = full_state(engine)
    it = data(steps=1)
    for _ in range(GAS):
        ids = next(it)["input_ids"]
        out = engine(input_ids=ids)
        engine.backward(fsam_ds.causal_lm_loss(out.logits, ids) + float("inf"))
        engine.step()
    assert engine.last_metrics["skipped"] and engine.last_metrics["eps_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in full_state(engine).items())


def test_an_aux_loss_train_batch_would_drop_is_refused():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
        output_router_logits=True,
    )
    torch.manual_seed(0)
    engine, *_ = fsam_ds.initialize(model=MixtralForCausalLM(cfg), config=ds_config("SAM"))
    with pytest.raises(FSAMConfigError, match="aux_loss"):
        engine.train_batch(data())
