"""AdamW's denominators as each DeepSpeed rank view reads them (the DeepSpeed
half): the step count and each parameter's own group's beta2 / eps, at ZeRO 0, 1, 2 and 3, with
DeepSpeed's FusedAdam and with torch's AdamW (``torch_adam``), and two parameter groups with
different ``eps`` and ``betas``. One rank, in this process.

Before the fix the ZeRO-3 view used ``param_groups[0]``'s beta2 and eps for every parameter (the
two-group case fails there), and every view returned None (no preconditioner, silently) when the
optimizer held no ``exp_avg_sq`` after updates.
"""

from __future__ import annotations

import pytest
import torch
from common import ds_config
from reference import micro_batch, tiny_llama

GROUPS = ({"eps": 1e-8, "betas": (0.9, 0.999)}, {"eps": 1e-3, "betas": (0.8, 0.95)})


def _engine(stage: int, torch_adam: bool, bf16: bool = False):
    import fsam_ds

    model = tiny_llama(0)
    names = [n for n, _ in model.named_parameters()]
    first = [p for n, p in model.named_parameters() if "embed" in n or "lm_head" in n]
    rest = [p for n, p in model.named_parameters() if not ("embed" in n or "lm_head" in n)]
    assert first and rest and len(first) + len(rest) == len(names)
    groups = [dict(GROUPS[0], params=first), dict(GROUPS[1], params=rest)]
    cfg = ds_config("PreconditionedSAM", gas=1)
    cfg["optimizer"]["params"]["torch_adam"] = torch_adam
    if stage:
        cfg["zero_optimization"] = {"stage": stage}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    engine, *_ = fsam_ds.initialize(model=model, config=cfg, model_parameters=groups)
    return engine


def _train(engine, steps: int):
    data = iter([micro_batch(s, 0, 0, 1, 1) for s in range(steps)])
    for _ in range(steps):
        engine.train_batch(data)


def _step_of(state) -> int:
    s = state["step"]
    return int(s.item()) if torch.is_tensor(s) else int(s)


def _expected(engine):
    """The denominators from the optimizer's own state, its own step counts and each group's
    (beta2, eps), computed here (not by fsam_ds), in the layout the view returns."""
    ds = engine.engine
    opt = ds.optimizer
    stage = ds.zero_optimization_stage()
    out, steps = [], set()

    def den(v, group, t):
        beta2 = group["betas"][1]
        return (v.float() / (1 - beta2**t)).sqrt() + group["eps"]

    if stage == 3:
        from deepspeed.utils import safe_get_local_optimizer_state

        sub = {id(p): i for i, ps in enumerate(opt.fp16_groups) for p in ps}
        for p in [p for p in ds.module.parameters() if p.requires_grad]:
            i = sub[id(p)]
            group = opt.optimizer.param_groups[opt.sub_group_to_group_id[i]]
            flat = opt.fp32_partitioned_groups_flat[i]
            t = _step_of(opt.optimizer.state[flat])
            steps.add(t)
            out.append(den(safe_get_local_optimizer_state(p, "exp_avg_sq"), group, t))
    elif stage in (1, 2):
        for master, group in zip(opt.single_partition_of_fp32_groups, opt.optimizer.param_groups):
            t = _step_of(opt.optimizer.state[master])
            steps.add(t)
            out.append(den(opt.optimizer.state[master]["exp_avg_sq"], group, t))
    else:
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if "step" in st:  # DeepSpeed's FusedAdam counts on the group's last parameter only
                    steps.add(_step_of(st))
                out.append((st["exp_avg_sq"], group))
        t = max(steps)  # FusedAdam's other parameters keep step 0
        steps = {t}
        out = [den(v, group, t) for v, group in out]
    return out, steps


@pytest.mark.parametrize("torch_adam", [False, True], ids=["fused_adam", "torch_adam"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_denominators_use_each_groups_hparams_and_the_optimizers_step(stage, torch_adam):
    engine = _engine(stage, torch_adam)
    assert engine.view.denominators(0) is None
    _train(engine, 3)
    updates = engine.adam_updates()
    got = engine.view.denominators(updates)
    want, steps = _expected(engine)
    assert steps == {updates} == {3}  # the view's bias-correction step is the optimizer's own
    assert got is not None and len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=0), float((a - b).abs().max())
    # the two groups' settings matter: with the first group's eps and beta2 everywhere the
    # second group's denominators are off by ~1e-3 (what a ZeRO-3 view reading the first group's constants computes)
    if stage in (0, 3):
        first = GROUPS[0]
        wrong = [
            ((b - GROUPS[1]["eps"]) ** 2 * (1 - 0.95**3) / (1 - first["betas"][1] ** 3)).sqrt() + first["eps"]
            for b in want
        ]
        assert max(float((w - b).abs().max()) for w, b in zip(wrong, want)) > 5e-4


@pytest.mark.parametrize("stage", [0, 1])
def test_missing_moments_after_updates_raise(stage):
    engine = _engine(stage, torch_adam=True)
    _train(engine, 1)
    opt = engine.engine.optimizer
    (opt.optimizer if stage else opt).state.clear()  # an optimizer that keeps no exp_avg_sq
    with pytest.raises(RuntimeError, match="holds no exp_avg_sq"):
        engine.view.denominators(engine.adam_updates())
