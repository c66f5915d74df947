"""An independent single-process reference for every method: plain PyTorch, torch.optim.AdamW,
torch.func for the FunctionalSAM vector-Jacobian product. It shares no code with fsam_ds.

The global batch of a step is the list of all micro-batches of all data-parallel ranks; its
gradient is the average over micro-batches of each micro-batch's mean token loss, which is what
DeepSpeed computes (loss / gradient_accumulation_steps, then the average over ranks).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.func import functional_call, vjp


@functools.lru_cache(maxsize=1)
def text_bytes() -> torch.Tensor:
    """Real text as byte tokens (vocab 256): the first 200 kB of the tiny-Shakespeare corpus the
    package embeds (byte for byte karpathy/char-rnn's input.txt: tests/data/tinyshakespeare.sha256)."""
    import gzip

    import fsam_ds

    raw = gzip.open(Path(fsam_ds.__file__).parent / "corpus" / "tinyshakespeare.txt.gz").read()[:200_000]
    return torch.tensor(list(raw), dtype=torch.long)


def micro_batch(step: int, rank: int, i: int, world: int, gas: int, mbs: int = 2, seq: int = 16) -> Dict:
    """The deterministic micro-batch ``i`` of data-parallel rank ``rank`` at optimizer step ``step``."""
    data = text_bytes()
    k = (step * world + rank) * gas + i
    rows = [data[(k * mbs + j) * 97 % (len(data) - seq - 1) :][:seq] for j in range(mbs)]
    return {"input_ids": torch.stack(rows)}


def global_batch(step: int, world: int, gas: int, **kw) -> List[Dict]:
    return [micro_batch(step, r, i, world, gas, **kw) for r in range(world) for i in range(gas)]


def tiny_llama(
    seed: int = 0,
    dtype=torch.float32,
    vocab: int = 256,
    attn: str = "sdpa",
    layers: int = 2,
    tied: bool = False,
    attention_dropout: float = 0.0,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_dropout=attention_dropout,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
    tgt = ids[:, 1:]
    return -(logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)).mean()


def reference_train(
    model,
    steps: int,
    world: int,
    gas: int,
    method: str,
    rho: float,
    lr: float = 1e-2,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    precondition_norm: str = "perturbation",
    rho_warmup_steps: int = 0,
    lr_at: Optional[Callable[[int], float]] = None,
    batch_kw: Optional[dict] = None,
    ascent_every: int = 1,
    loss: Optional[Callable] = None,
    hidden_adam_step: bool = False,
    dropout_seed: Optional[int] = None,
    ascent_direction: str = "gradient",
    trace: Optional[list] = None,
):
    """Train ``model`` in place; returns the per-step mean pass-1 losses.

    ``ascent_every = k > 1``: the ascent direction (at rho = 1) is computed at steps 0, k, 2k, ...
    and reused, times the step's rho, in between; at the reusing steps SAM has no pass 1 (its
    recorded loss is the pass-2 loss at theta + eps) and FunctionalSAM's pass 1 is a forward at
    theta for g_F only. ``loss(logits, input_ids)`` replaces the mean next-token cross-entropy.

    ``ascent_direction="momentum"``: from the second step on (once AdamW holds a first moment) the
    ascent is built from AdamW's ``exp_avg`` (read from torch.optim.AdamW's state) in place of the
    gradient, with the same preconditioner and normalisation; there is no pass-1 backward (SAM:
    no pass 1, the recorded loss is pass 2's; FunctionalSAM: a forward at theta for g_F).

    ``trace`` (a list) gets per step the share of ``||eps||^2`` on the input embedding and on the
    output layer (``eps_share_embed``, ``eps_share_output``; None without a perturbation).
    ``hidden_adam_step``: follow DeepSpeed's ZeRO-0 bf16/fp16 ``FP16_Optimizer``, which runs one
    AdamW step with zero gradients when it is built: the weights are decayed once by
    ``1 - lr * weight_decay`` before step 0 and Adam's step count starts at 1 (the first real
    update uses bias correction t = 2, and the preconditioner of step k reads t = k + 1).

    ``dropout_seed``: the random state is ``torch.manual_seed(dropout_seed + step)`` at the start
    of each step (before pass 1's first forward; the caller seeds the engine the same way), and
    pass 2 replays the state each pass-1 forward started from, so both passes draw the same
    dropout masks; the model must be in train mode.
    """
    ce = loss or _ce
    batch_kw = batch_kw or {}
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}  # frozen weights (LoRA) stay
    names = list(params)
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if hidden_adam_step:
        for p in params.values():
            p.grad = torch.zeros_like(p)
        opt.step()
    functional = method.endswith("FunctionalSAM")
    precond = method.startswith("Preconditioned")
    losses = []
    unit = None  # ascent_every > 1: the stored direction at rho = 1
    embed_w, out_w = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embed_names = [k for k in names if params[k] is embed_w]
    out_names = [k for k in names if params[k] is out_w or k.startswith("lm_head.")]
    for step in range(steps):
        mbs = global_batch(step, world, gas, **batch_kw)
        n = len(mbs)
        reuse = method != "AdamW" and ascent_every > 1 and unit is not None and step % ascent_every != 0
        from_m = method != "AdamW" and ascent_direction == "momentum" and step > 0
        reuse = reuse or from_m
        opt.zero_grad(set_to_none=False)
        for p in params.values():
            p.grad = torch.zeros_like(p)
        gfs, step_losses, rng = [], [], []
        if dropout_seed is not None:
            torch.manual_seed(dropout_seed + step)
        for mb in mbs:
            if reuse and not functional:
                break  # SAM reusing eps: no pass 1
            rng.append(torch.random.get_rng_state())
            if reuse:
                with torch.no_grad():
                    logits = model(input_ids=mb["input_ids"]).logits
            else:
                logits = model(input_ids=mb["input_ids"]).logits
            leaf = logits.detach().requires_grad_(True)
            value = ce(leaf, mb["input_ids"])
            (g_f,) = torch.autograd.grad(value, leaf)
            gfs.append(g_f)
            step_losses.append(value.item())
            if not reuse:
                logits.backward(g_f / n)
        if step_losses:
            losses.append(sum(step_losses) / n)
        if reuse and not from_m:
            r = rho * min(1.0, step / rho_warmup_steps) if rho_warmup_steps > 0 else rho
            pert = [r * u for u in unit]
        elif method != "AdamW":
            r = rho * min(1.0, step / rho_warmup_steps) if rho_warmup_steps > 0 else rho
            if from_m:
                g = [opt.state[params[k]]["exp_avg"].detach().clone() for k in names]
            else:
                g = [params[k].grad.detach().clone() for k in names]
            gnorm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
            if precond and step > 0:
                d = []
                for k, x in zip(names, g):
                    st = opt.state[params[k]]
                    t = int(st["step"])
                    m = torch.sqrt(st["exp_avg_sq"] / (1 - betas[1] ** t)) + eps
                    d.append(x / m)
                dnorm = torch.sqrt(sum((x.double() ** 2).sum() for x in d))
                scale = r / (dnorm if precondition_norm == "perturbation" else gnorm)
            else:
                d, scale = g, r / gnorm
            ok = math.isfinite(float(gnorm)) and float(gnorm) > 0
            if ascent_every > 1:
                base = dnorm if precond and step > 0 and precondition_norm == "perturbation" else gnorm
                unit = [((1.0 / base) * x).to(x.dtype) if ok else torch.zeros_like(x) for x in d]
                pert = [r * u for u in unit]
            else:
                pert = [(scale * x).to(x.dtype) if ok else torch.zeros_like(x) for x in d]
        if method != "AdamW" and trace is not None:
            total = sum(float((e.double() ** 2).sum()) for e in pert)
            part = {k: float((e.double() ** 2).sum()) for k, e in zip(names, pert)}
            trace.append(
                {
                    "eps_share_embed": sum(part[k] for k in embed_names) / total if total > 0 else None,
                    "eps_share_output": sum(part[k] for k in out_names) / total if total > 0 else None,
                }
            )
        if method != "AdamW":
            theta = {k: params[k].detach().clone() for k in names}
            perturbed = {k: theta[k] + e for k, e in zip(names, pert)}
            new_grads = [torch.zeros_like(theta[k]) for k in names]
            for j, mb in enumerate(mbs):
                if dropout_seed is not None and j < len(rng):
                    torch.random.set_rng_state(rng[j])
                if functional:
                    g_f = gfs[j]

                    # J(theta+eps)^T g_F(theta) with torch.func
                    def f(p):
                        return functional_call(model, p, (), {"input_ids": mb["input_ids"]}).logits

                    _, pullback = vjp(f, perturbed)
                    (ct,) = pullback(g_f / n)
                    gs = [ct[k] for k in names]
                else:

                    def lf(p):
                        return ce(functional_call(model, p, (), {"input_ids": mb["input_ids"]}).logits, mb["input_ids"])

                    pp = {k: v.detach().requires_grad_(True) for k, v in perturbed.items()}
                    value = lf(pp)
                    step_losses.append(value.item())
                    gs = torch.autograd.grad(value / n, [pp[k] for k in names])
                for acc, x in zip(new_grads, gs):
                    acc.add_(x)
            if reuse and not functional:
                losses.append(sum(step_losses) / n)
            for k, x in zip(names, new_grads):
                params[k].grad = x
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params.values(), clip)
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        opt.step()
    return losses


def weight_distance(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over all weights."""
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def weighted_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A token-weighted next-token cross-entropy (weight 1, 2, 3, 1, 2, 3, ... along the
    sequence): a loss of the logits that is not the model's own."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    w = (torch.arange(nll.shape[1], device=nll.device) % 3 + 1).to(nll.dtype).expand_as(nll)
    return (w * nll).sum() / w.sum()
