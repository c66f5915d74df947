"""Helpers shared by the in-process tests and the multi-rank worker."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from reference import micro_batch, tiny_llama

LR = 1e-2
RHO = 0.05
STEPS = 4
GAS = 2

# The bf16 perturbation against its fp32 formula (test_bf16_checks.py on one rank, test_zero_extras.py
# on two). Measured at rho = 0.2 (steps 1-3 preconditioned; step 0 has no AdamW moments yet):
# the engine's eps vs the formula: norm-relative distance <= 3e-7, cosine 1 - 1e-15 (fp32
# round-off of the same arithmetic), at every stage and both normalisations.
BF16_TOL = 1e-5
# The nearest wrong methods, norm-relative distance to the formula (measured, min over steps 1-3
# and stages): unpreconditioned 1.15 ("perturbation", cosine 0.05-0.34) and 0.998 ("gradient",
# cosine 0.63-0.68); bias correction at t - 1 or t + 1 (e.g. ZeRO-0's hidden FP16_Optimizer step
# ignored): 4.6e-2 under "gradient" with eps 1e-3 (4600 x TOL), but only 1e-5..1e-4 under
# "perturbation" (a uniform rescaling of M cancels there except through eps: not a separable
# mistake of that normalisation, so not asserted for it).
BF16_WRONG_T_MIN = 1e-2
BF16_UNPRECONDITIONED_MIN = 0.5


def ds_config(
    method: str,
    rho: float = RHO,
    gas: int = GAS,
    mbs: int = 2,
    clip: float = 1.0,
    precondition_norm: str = "perturbation",
    **extra,
) -> dict:
    params = {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    if method != "AdamW":
        params.update(rho=rho, precondition_norm=precondition_norm)
    cfg = {
        "train_micro_batch_size_per_gpu": mbs,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "optimizer": {"type": method, "params": params},
    }
    cfg.update(extra)
    return cfg


def cfg_with(method: str, rho: float = RHO, **params) -> dict:
    """:func:`ds_config` with ``params`` added to (or replacing) the optimizer's parameters."""
    cfg = ds_config(method, rho=rho)
    cfg["optimizer"]["params"].update(params)
    return cfg


def local_weights(engine):
    """What the forward reads on this rank: the ZeRO-3 partitions, else the full weights."""
    return [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for p in engine.module.parameters()]


def inject_inf(engine, rank: int, faults, gas: int) -> None:
    """Make the output layer's input infinite at one position for the first micro-batch of pass
    ``p`` of step ``s`` on rank ``r``, for each ``(s, p, r)`` in ``faults`` (steps count from 0,
    passes are 1 and 2): the loss and the gradient both become non-finite, as on an overflow."""
    seen = {"step": None, "n": 0}

    def hook(module, args):
        step = int(engine.global_steps)
        if seen["step"] != step:
            seen.update(step=step, n=0)
        n = seen["n"]
        seen["n"] += 1
        if n % gas == 0 and (step, n // gas + 1, rank) in faults:
            bad = torch.zeros_like(args[0])
            bad.view(-1)[0] = float("inf")
            return (args[0] + bad,) + tuple(args[1:])
        return None

    engine.module.lm_head.register_forward_pre_hook(hook)


def inf_loss(holder: list, rank: int, faults, gas: int):
    """The default loss, plus infinity for the first micro-batch of pass ``p`` of step ``s`` on
    rank ``r`` for each ``(s, p, r)`` in ``faults``: a loss that is infinite while its gradient
    with respect to the logits stays finite (``holder[0]`` is the engine)."""
    from fsam_ds.engine import default_loss

    seen = {"step": None, "n": 0}

    def loss_fn(logits, batch):
        step = int(holder[0].global_steps)
        if seen["step"] != step:
            seen.update(step=step, n=0)
        n = seen["n"]
        seen["n"] += 1
        loss = default_loss(logits, batch)
        if n % gas == 0 and (step, n // gas + 1, rank) in faults:
            loss = loss + float("inf")
        return loss

    return loss_fn


def engine_run(
    method: str,
    rho: float = RHO,
    steps: int = STEPS,
    gas: int = GAS,
    world: int = 1,
    rank: int = 0,
    config: Optional[dict] = None,
    dtype=torch.float32,
    before_step=None,
    force_pass2: bool = False,
    check_restore: bool = False,
    data_steps=None,
    faults=(),
    loss_fn=None,
    loop: Optional[str] = None,
    loss_faults=(),
):
    """Train the tiny model with fsam_ds on this rank's share of the reference data.

    Returns (fp32 state dict, per-step losses, per-step metrics). ``before_step(engine)`` is
    called right before DeepSpeed's optimizer step of every step (after the restore). With
    ``check_restore`` each step's metrics get ``restored``: whether this rank's weights right
    before the optimizer step were bit-identical to those at the start of the step, and
    ``unchanged``: whether they still are after it. ``data_steps`` picks which reference steps'
    data to train on (default ``range(steps)``); ``faults`` goes to :func:`inject_inf`,
    ``loss_faults`` to :func:`inf_loss`.

    ``loop`` trains through loop mode instead of ``train_batch``: per micro-batch
    ``engine(...)``, ``engine.backward(loss)``, ``engine.step()``, with the loss
    ``"hf"``: the model's own ``outputs.loss`` (labels given); ``"logits"``: ``causal_lm_loss`` of
    the logits (the default loss, and ``loss_fn`` of the SAM types: the same arithmetic as
    ``train_batch``).
    """
    import fsam_ds

    if check_restore:
        snapshots, verdicts = [], []

        def before_step(engine):  # noqa: F811
            verdicts.append(all(torch.equal(a, b) for a, b in zip(local_weights(engine), snapshots[-1])))

    model = tiny_llama(0)
    cfg = config or ds_config(method, rho, gas)
    if loop == "logits" and loss_fn is None and method in ("SAM", "PreconditionedSAM"):
        from fsam_ds.engine import default_loss as loss_fn
    holder: list = []
    if loss_faults:
        loss_fn = inf_loss(holder, rank, set(loss_faults), gas)
    engine, *_ = fsam_ds.initialize(model=model, config=cfg, loss_fn=loss_fn)
    holder.append(engine)
    if faults:
        inject_inf(engine, rank, set(faults), gas)
    if force_pass2:
        engine.skip_unperturbed_pass2 = False
    if before_step is not None:
        ds = engine.engine
        real = ds._take_model_step

        def wrapped(*a, **k):
            before_step(engine)
            return real(*a, **k)

        ds._take_model_step = wrapped
    data_steps = list(range(steps)) if data_steps is None else list(data_steps)
    data = iter([micro_batch(s, rank, i, world, gas) for s in data_steps for i in range(gas)])
    losses, metrics = [], []
    for _ in range(steps):
        if check_restore:
            snapshots.append(local_weights(engine))
        if loop:
            loop_step(engine, data, gas, loop)
            losses.append(engine.last_metrics["loss"])
        else:
            losses.append(float(engine.train_batch(data)))
        metrics.append(dict(engine.last_metrics))
        if check_restore:
            metrics[-1]["restored"] = verdicts[-1] if len(verdicts) == len(snapshots) else None
            metrics[-1]["unchanged"] = all(torch.equal(a, b) for a, b in zip(local_weights(engine), snapshots[-1]))
    state = full_state(engine)
    return state, losses, metrics


def loop_step(engine, data, gas: int, loss: str = "hf") -> None:
    """One optimizer step of a plain DeepSpeed loop over ``gas`` micro-batches from ``data``."""
    from fsam_ds import causal_lm_loss

    for _ in range(gas):
        ids = next(data)["input_ids"]
        if loss == "hf":
            out = engine(input_ids=ids, labels=ids)
            engine.backward(out.loss)
        else:
            out = engine(input_ids=ids)
            engine.backward(causal_lm_loss(out.logits, ids))
        engine.step()


def full_state(engine) -> Dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (gathered under ZeRO-3)."""
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.named_parameters()}
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def load_case(out, case, world: int = 2):
    """What the multi-rank worker saved for one ``dist_worker.Case``: rank 0's fp32 state and
    each rank's losses and metrics."""
    import launch

    return launch.load_case(out, case.name, world)


_REFERENCES: dict = {}


def reference_state(
    method: str, rho: float = RHO, steps: int = STEPS, gas: int = GAS, world: int = 1, **kw
) -> (Dict[str, torch.Tensor], list):
    """The reference's final weights and losses (memoised: the reference is deterministic)."""
    return _reference(method, rho, steps, gas, world, **kw)[:2]


def reference_trace(method: str, rho: float = RHO, steps: int = STEPS, gas: int = GAS, world: int = 1, **kw) -> list:
    """The reference's per-step shares of ``||eps||^2`` (``eps_share_embed``, ``eps_share_output``)
    of the run :func:`reference_state` returns."""
    return _reference(method, rho, steps, gas, world, **kw)[2]


def _reference(method, rho, steps, gas, world, **kw):
    from reference import reference_train

    key = (method, rho, steps, gas, world, tuple(sorted(kw.items())))
    if key not in _REFERENCES:
        model = tiny_llama(0)
        trace: list = []
        losses = reference_train(model, steps, world, gas, method, rho, lr=LR, trace=trace, **kw)
        _REFERENCES[key] = ({k: v.detach().float().clone() for k, v in model.state_dict().items()}, losses, trace)
    return _REFERENCES[key]


def assert_shares(metrics, trace, rel: float = 1e-3, abs_tol: float = 1e-5) -> None:
    """The engine's ``eps_share_embed`` / ``eps_share_output`` per step equal the reference's (to
    1e-5 of ||eps||^2: the preconditioner amplifies the round-off by which the two trajectories
    differ on entries with tiny v; SAM and its preconditioned twin differ by ~0.4 here)."""
    import pytest

    assert len(metrics) == len(trace)
    for m, t in zip(metrics, trace):
        for key in ("eps_share_embed", "eps_share_output"):
            if t[key] is None:
                assert m[key] is None, (key, m[key])
            else:
                assert m[key] == pytest.approx(t[key], rel=rel, abs=abs_tol), (key, m[key], t[key])


# ---- fsam-train runs (test_train.py, test_reliability.py, test_perf_modes.py) -------------------


def write_config(path, micro: int = 4, **optimizer_changes):
    """The shipped preconditioned FunctionalSAM DeepSpeed config with ``micro`` sequences per
    micro-batch and ``optimizer_changes`` applied to its optimizer section, written to ``path``."""
    import json

    from launch import ROOT

    cfg = json.loads((ROOT / "ds_configs" / "preconditioned_functional_sam.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["optimizer"].update(optimizer_changes)
    path.write_text(json.dumps(cfg))
    return path


def read_metrics(save_dir):
    """fsam-train's metrics.jsonl: (step records, eval records)."""
    import json

    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return steps, evals
