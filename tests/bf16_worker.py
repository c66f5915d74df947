"""bf16 checks of the ascent: what the engine perturbs by, against the fp32 formula computed here
from DeepSpeed's own objects (the bf16 gradients, AdamW's ``exp_avg_sq`` and its step count, read
from DeepSpeed's optimizer state, never through ``fsam_ds.shards``).

Used in-process by ``test_bf16_checks.py`` (one rank, ZeRO 0-3) and by ``zero_extras_worker.py``
(two ranks, ZeRO 3). Everything is put in one *canonical* layout: this rank's elements of each
parameter in ``module.parameters()`` order (the whole parameter at ZeRO 0-2 on one rank, the
``ds_tensor`` partition at ZeRO 3), flattened and concatenated.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors


def _params(engine) -> List[torch.nn.Parameter]:
    return [p for p in engine.module.parameters() if p.requires_grad]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _stage(engine) -> int:
    return engine.zero_optimization_stage()


def _world(engine) -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def engine_layout_to_canonical(engine, tensors: List[torch.Tensor]) -> torch.Tensor:
    """The engine's per-rank perturbation (``Ascent.perturbations()``, in the tensors the rank
    view holds) mapped onto the canonical layout, from DeepSpeed's own grouping of parameters."""
    opt = engine.optimizer
    stage = _stage(engine)
    params = _params(engine)
    by_param: Dict[int, torch.Tensor] = {}
    if stage == 0:  # FP16_Optimizer: one tensor per parameter, in fp16_groups order
        order = [p for group in opt.fp16_groups for p in group]
        assert len(order) == len(tensors)
        for p, t in zip(order, tensors):
            by_param[id(p)] = t.reshape(-1)
    elif stage in (1, 2):  # one flat partition per group: the group's parameters back to back
        assert _world(engine) == 1, "the flat partition is the whole group only on one rank"
        assert len(tensors) == len(opt.bit16_groups)
        for flat, group in zip(tensors, opt.bit16_groups):
            off = 0
            for p in group:
                by_param[id(p)] = flat[off : off + p.numel()]
                off += p.numel()
            assert flat[off:].abs().max().item() == 0 if off < flat.numel() else True  # padding
    else:  # one ds_tensor partition per parameter
        assert len(tensors) == len(params)
        for p, t in zip(params, tensors):
            by_param[id(p)] = t.reshape(-1)
    return _flat([by_param[id(p)] for p in params])


def inputs(engine, moments: bool = True) -> dict:
    """What the formula needs, from DeepSpeed's objects: the gradient the engine reads (bf16 at
    ZeRO 0, DeepSpeed's accumulation dtype at 1-3), ``exp_avg_sq`` and the inner optimizer's step
    count (``moments``; before the first update ZeRO 1-3 hold none), the fp32 master and the
    low-precision weights the forward reads."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_grad,
        safe_get_full_optimizer_state,
        safe_get_local_fp32_param,
        safe_get_local_grad,
        safe_get_local_optimizer_state,
    )

    opt = engine.optimizer
    stage = _stage(engine)
    params = _params(engine)
    inner = opt.optimizer
    if stage == 0:
        flats = opt.fp32_groups_flat
        masters, vs = {}, {}
        for flat, group in zip(flats, opt.fp16_groups):
            for p, m, v in zip(
                group,
                _unflatten_dense_tensors(flat, group),
                _unflatten_dense_tensors(inner.state[flat]["exp_avg_sq"], group),
            ):
                masters[id(p)], vs[id(p)] = m, v
        g = [p.grad for p in params]
        v = [vs[id(p)] for p in params] if moments else None
        master = [masters[id(p)] for p in params]
        low = [p.data for p in params]
        steps = [inner.state[f]["step"] for f in flats]
    elif stage in (1, 2):
        g = [safe_get_full_grad(p) for p in params]
        v = [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params] if moments else None
        master = [safe_get_full_fp32_param(p) for p in params]
        low = [p.data for p in params]
        steps = [inner.state[f]["step"] for f in opt.single_partition_of_fp32_groups if "step" in inner.state[f]]
    else:
        g = [safe_get_local_grad(p) for p in params]
        v = [safe_get_local_optimizer_state(p, "exp_avg_sq") for p in params] if moments else None
        master = [safe_get_local_fp32_param(p) for p in params]
        low = [p.ds_tensor for p in params]
        steps = [inner.state[f]["step"] for f in opt.fp32_partitioned_groups_flat if "step" in inner.state[f]]
    steps = {int(s) for s in steps}
    assert len(steps) <= 1, steps
    group = inner.param_groups[0]
    return {
        "g": _flat(g),
        "v": _flat(v) if v is not None else None,
        "master": [m.detach().float().clone() for m in master],
        "low": low,
        "t": steps.pop() if steps else 0,
        "beta2": group["betas"][1],
        "adam_eps": group["eps"],
        "g_dtype": g[0].dtype,
    }


def _allsum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def formula(
    g: torch.Tensor,
    v: Optional[torch.Tensor],
    t: int,
    rho: float,
    beta2: float,
    adam_eps: float,
    norm: str = "perturbation",
) -> torch.Tensor:
    """The method's perturbation in float64 (v None: unpreconditioned, ``rho g / ||g||``); the
    norms are summed over the ranks (each holds distinct elements)."""
    g = g.double()
    g_norm = _allsum((g * g).sum()).sqrt()
    if v is None:
        return rho * g / g_norm
    d = g / ((v.double() / (1 - beta2**t)).sqrt() + adam_eps)
    d_norm = _allsum((d * d).sum()).sqrt()
    return rho * d / (d_norm if norm == "perturbation" else g_norm)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all ranks."""
    return float(_allsum(((a - b) ** 2).sum()).sqrt() / _allsum((b * b).sum()).sqrt())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(_allsum((a * b).sum()) / (_allsum((a * a).sum()).sqrt() * _allsum((b * b).sum()).sqrt()))


def capture_ascent(engine, rho: float, norm: str, hidden_step: bool) -> List[dict]:
    """Wrap the engine's perturb: at every perturbation record the engine's fp32 ``eps`` and the
    formula's, with the nearest wrong methods (unpreconditioned; bias correction at t - 1 and
    t + 1), and whether the weights the forward then reads are ``(master + eps)`` rounded to the
    low-precision dtype bit for bit. ``hidden_step``: DeepSpeed's ZeRO-0 FP16_Optimizer took one
    AdamW step at construction, so its inner count is the applied updates plus one."""
    view = engine.view
    real = view.perturb
    records: List[dict] = []

    def perturb(ascent):
        updates = len(records)  # one perturbation per step here; no step is skipped
        eps = [e.detach().clone() for e in ascent.perturbations()]
        got = engine_layout_to_canonical(engine, eps)
        x = inputs(engine, moments=updates > 0)
        assert x["t"] == updates + (1 if hidden_step else 0), (x["t"], updates)
        pre = updates > 0
        v = x["v"] if pre else None
        want = formula(x["g"], v, x["t"], rho, x["beta2"], x["adam_eps"], norm)
        wrong = {"unpreconditioned": formula(x["g"], None, x["t"], rho, x["beta2"], x["adam_eps"], norm)}
        if pre:
            for name, t in (("t-1", x["t"] - 1), ("t+1", x["t"] + 1)):
                if t >= 1:
                    wrong[name] = formula(x["g"], v, t, rho, x["beta2"], x["adam_eps"], norm)
        master = x["master"]
        real(ascent)
        # the weights the forward reads now: (master + eps) in their dtype, bit for bit
        eps_c = torch.split(got, [m.numel() for m in master])
        applied = all(
            torch.equal(lo.reshape(-1)[: m.numel()], (m.reshape(-1) + e.float()).to(lo.dtype))
            for lo, m, e in zip(x["low"], master, eps_c)
        )
        records.append(
            {
                "step": updates,
                "t": x["t"],
                "preconditioned": pre,
                "g_dtype": str(x["g_dtype"]),
                "rel": rel(got, want),
                "cos": cosine(got, want),
                "wrong_rel": {k: rel(w, want) for k, w in wrong.items()},
                "wrong_cos": {k: cosine(w, want) for k, w in wrong.items()},
                "applied": applied,
            }
        )

    view.perturb = perturb
    return records


def _ce_grad(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The independent g_F: autograd of the mean next-token cross-entropy (log-softmax in fp32)
    of the logits as given (bf16 in, bf16 out)."""
    leaf = logits.detach().requires_grad_(True)
    logp = torch.log_softmax(leaf[:, :-1].float(), -1)
    value = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).mean()
    (g,) = torch.autograd.grad(value, leaf)
    return g


def capture_logit_grads(engine, gas: int) -> List[dict]:
    """Record every g_F the engine keeps (``logit_grads.put`` in pass 1) with the logits of the
    same forward, and the pass-2 logits of the same micro-batch; per kept g_F: its distance to
    the independent g_F of the pass-1 logits and, as the nearest wrong method, to the g_F of
    the perturbed (pass-2) logits. Call :func:`finish_logit_grads` after the run."""
    forwards: List[tuple] = []
    kept: List[dict] = []

    def hook(module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = out.logits if hasattr(out, "logits") else out
        forwards.append((logits.detach().clone(), ids.detach().clone()))

    engine.module.register_forward_hook(hook, with_kwargs=True)
    cache = engine.logit_grads
    real = cache.put

    def put(i, g_f):
        kept.append({"i": i, "g_f": g_f.detach().clone(), "forward": len(forwards) - 1})
        return real(i, g_f)

    cache.put = put
    kept_meta = {"forwards": forwards, "kept": kept, "gas": gas}
    return kept_meta


def finish_logit_grads(meta: dict) -> List[dict]:
    forwards, gas = meta["forwards"], meta["gas"]
    out = []
    for k in meta["kept"]:
        j = k["forward"]
        logits, ids = forwards[j]
        step_start = j - k["i"]  # pass 1 of this step: gas forwards, then pass 2: gas forwards
        logits2, ids2 = forwards[step_start + gas + k["i"]]
        assert torch.equal(ids, ids2)
        want = _ce_grad(logits, ids).double()
        got = k["g_f"].double()
        out.append(
            {
                "dtype": str(k["g_f"].dtype),
                "logits_dtype": str(logits.dtype),
                "rel": rel(got, want),
                "wrong_rel": {
                    "perturbed_logits": rel(_ce_grad(logits2, ids).double(), want),
                    "times_1/gas": rel(got / gas, want),
                },
            }
        )
    return out
