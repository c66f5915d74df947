"""fsam-plan: per-rank memory and per-step communication of AdamW and each method, before a job runs.

    fsam-plan --model 7b --gpus 64 --zero-stage 3 --micro-batch 1 --seq-len 4096
    fsam-plan --model 70b --tp 8 --pp 4 --dp 8 --distributed-optimizer --micro-batch 1 --seq-len 4096 --gas 8
    fsam-plan --model path/to/hf_folder_or_config.json --gpus 8 --zero-stage 2
    fsam-plan --publish            # the 1.2B / 7B / 70B x 8-1024 GPU table of docs/performance.md

The model (a preset of ``fsam_ds.models``, ``7b`` / ``70b`` Llama-2-style shapes, or a Hugging
Face Llama config) gives the parameter count and the activation shapes. The estimate, per rank:

* weights, gradients, optimizer state (fp32 master where the weights are 16-bit, AdamW's m and
  v), partitioned as the ZeRO stage (DeepSpeed) or the distributed optimizer (Megatron) does;
* activations of the micro-batches in flight: per layer and token ``7h + 2 h_kv + 4 ffn`` values
  (SDPA/flash attention: no seq^2 term) in the activation dtype, divided by TP; the logits with
  the loss's fp32 copy and saved log-softmax (``tokens x vocab/TP x (a + 4 + 4)`` bytes, ``a`` the
  activation dtype's size; in fp32 the copy is the logits themselves);
* the method's extras: the saved copy of theta at ZeRO 0 in fp32 (there is no fp32 master), the
  ``g_F`` cache of every micro-batch of the step in each ``logit_grad_cache`` mode (device:
  tokens x vocab/TP in the logits' dtype; host: nothing on the device; recompute: tokens x hidden
  plus one copy of the output layer this rank reads: the gathered one under ZeRO-3), the transient
  fp32 buffers of the ascent (direction, AdamW denominator, perturbed master: live only between
  the passes, when the activations are freed), and the stored direction of ``ascent_every``.

Peak = static + max(pass: activations + logits + persistent extras, between the passes: g_F cache
+ ascent buffers). Communication per optimizer step and rank (ring algorithms: an all-reduce moves
``2 (n-1)/n`` times the buffer, an all-gather or reduce-scatter ``(n-1)/n``): data-parallel
gradient reduction and ZeRO gathers, tensor-parallel all-reduces of the activations, pipeline
point-to-point; the SAM types do pass 1 and pass 2 through the engine (the gradient reduction and
the ZeRO-3 gathers twice), plus at ZeRO 1/2 one all-gather of the perturbed and one of the
restored weights. ``ascent_every: k`` averages one exact step and ``k - 1`` reusing steps
(FunctionalSAM: a forward at theta plus pass 2; SAM: pass 2 only). Compute is given in units of
one forward (a backward = 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .names import METHODS

PROG = "fsam-plan"
GiB = 2**30
# Llama-2-style shapes for the published table (hidden, layers, heads, kv heads, ffn, vocab)
EXTRA_SHAPES = {"7b": (4096, 32, 32, 32, 11008, 32000), "70b": (8192, 80, 64, 8, 28672, 32000)}
METHOD_ROWS = METHODS


@dataclass
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tied: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_params(self) -> int:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.ffn + 2 * h

    def params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


def load_shape(spec: str) -> Shape:
    if spec in EXTRA_SHAPES:
        return Shape(spec, *EXTRA_SHAPES[spec])
    from fsam_ds import models

    if spec in models.PRESETS:
        c = models.llama_config(spec)
        return Shape(
            spec,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads or c.num_attention_heads,
            c.intermediate_size,
            c.vocab_size,
            bool(getattr(c, "tie_word_embeddings", False)),
        )
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        presets = ", ".join(list(models.PRESETS) + list(EXTRA_SHAPES))
        raise ValueError(
            f"--model {spec!r}: accepted: a preset ({presets}), a Hugging Face model folder or its config.json"
        )
    c = json.loads(path.read_text())
    try:
        return Shape(
            path.parent.name,
            c["hidden_size"],
            c["num_hidden_layers"],
            c["num_attention_heads"],
            c.get("num_key_value_heads", c["num_attention_heads"]),
            c["intermediate_size"],
            c["vocab_size"],
            bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as err:
        raise ValueError(
            f"--model {spec!r}: config.json lacks {err.args[0]!r} (a Llama-style config is needed)"
        ) from None


@dataclass
class Layout:
    zero: int = 0  # DeepSpeed ZeRO stage (Megatron: 1 with the distributed optimizer, else 0)
    dp: int = 1
    tp: int = 1
    pp: int = 1
    megatron: bool = False
    bf16: bool = True

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    def describe(self) -> str:
        if self.megatron:
            return f"Megatron TP{self.tp} x PP{self.pp} x DP{self.dp}" + (
                " (distributed optimizer)" if self.zero else ""
            )
        return f"DeepSpeed ZeRO-{self.zero} x {self.dp} rank(s)"


def plan(
    shape: Shape,
    lay: Layout,
    micro: int,
    seq: int,
    gas: int,
    method: str,
    cache: str = "device",
    every: int = 1,
    checkpointing: bool = False,
) -> Dict[str, float]:
    """Bytes per rank (the busiest rank) and communication bytes per optimizer step and rank."""
    h, V = shape.hidden, shape.vocab
    wb = 2 if lay.bf16 else 4  # weights the forward reads
    ab = wb  # activations
    tokens = micro * seq
    # parameters this rank's forward reads (the first pipeline stage also holds the embedding, the
    # last the output layer; the larger of the two is taken)
    layers_here = -(-shape.layers // lay.pp)
    emb = V * h
    if lay.pp == 1:
        p_rank = shape.params() / lay.tp
    else:
        p_rank = (layers_here * shape.layer_params() + emb) / lay.tp
    out_layer = emb / lay.tp  # the output layer's slice
    if lay.megatron:
        grads_b = 4  # fp32 main gradients (Megatron's bf16 default)
        opt_b = 12 if lay.bf16 else 8
        opt_shard = lay.dp if lay.zero else 1
        weights = p_rank * wb
        grads = p_rank * grads_b
        opt = p_rank * opt_b / opt_shard
        local = p_rank / opt_shard  # elements of the fp32 state this rank owns
    else:
        grads_b = wb
        opt_b = 12 if lay.bf16 else 8
        weights = p_rank * wb / (lay.dp if lay.zero >= 3 else 1)
        grads = p_rank * grads_b / (lay.dp if lay.zero >= 2 else 1)
        opt = p_rank * opt_b / (lay.dp if lay.zero >= 1 else 1)
        local = p_rank / (lay.dp if lay.zero >= 1 else 1)
    static = weights + grads + opt
    # activations of the micro-batches in flight (1F1B: the first stage holds pp of them)
    in_flight = min(lay.pp, gas) if lay.pp > 1 else 1
    per_layer = tokens * (7 * h + 2 * shape.kv_dim + 4 * shape.ffn) * ab / lay.tp
    if checkpointing:  # each layer's input kept, one layer's activations live during its recompute
        acts = tokens * h * ab / lay.tp * layers_here * in_flight + per_layer
    else:
        acts = per_layer * layers_here * in_flight
    logits = tokens * V / lay.tp * ((ab + 4 + 4) if ab != 4 else 8)
    sam = method != "AdamW"
    functional = method.endswith("FunctionalSAM")
    precond = method.startswith("Preconditioned")
    fp32_plain = not lay.bf16 and not lay.megatron and lay.zero == 0
    saved = p_rank * 4 if (sam and fp32_plain) else 0.0  # ZeRO-0 fp32 keeps a copy of theta
    cache_b = 0.0
    if functional:
        if cache == "device":
            cache_b = gas * tokens * V / lay.tp * ab
        elif cache == "recompute":
            w_copy = 0.0 if fp32_plain else out_layer * wb  # ZeRO-0 fp32 reuses the saved copy
            cache_b = gas * tokens * h * ab + w_copy
    # between the passes: direction (a copy unless plain fp32 SAM), AdamW denominator, perturbed master
    ascent = 0.0
    if sam:
        ascent = local * 4 * ((1 if (precond or lay.bf16) else 0) + (1 if precond else 0) + (0 if fp32_plain else 1))
    stored = local * 4 if (sam and every > 1) else 0.0
    pass_peak = acts + logits + saved + stored + (cache_b if functional else 0.0)
    between = (cache_b if functional else 0.0) + ascent + saved + stored
    peak = static + max(pass_peak, between) if sam else static + acts + logits

    # communication per optimizer step
    def ring(n, nbytes, kind):  # noqa: E306
        if n <= 1:
            return 0.0
        return nbytes * (2 if kind == "allreduce" else 1) * (n - 1) / n

    dp_grad = (
        ring(lay.dp, p_rank * grads_b, "reducescatter") + ring(lay.dp, p_rank * wb, "allgather")
        if (lay.zero or lay.megatron and lay.zero)
        else ring(lay.dp, p_rank * grads_b, "allreduce")
    )
    zero3_gather = 2 * ring(lay.dp, p_rank * wb, "allgather") if (lay.zero >= 3 and not lay.megatron) else 0.0
    if lay.zero >= 3 and not lay.megatron:
        dp_grad = ring(lay.dp, p_rank * grads_b, "reducescatter")
    tp_pass = gas * layers_here * 4 * ring(lay.tp, tokens * h * ab, "allreduce")
    pp_pass = gas * 2 * tokens * h * ab if lay.pp > 1 else 0.0
    per_pass = zero3_gather + tp_pass + pp_pass  # forward + backward of every micro-batch
    fwd_only = zero3_gather / 2 + tp_pass / 2 + pp_pass / 2
    if not sam:
        comm = per_pass + dp_grad
        compute = 3.0
    else:
        spread = (
            2 * ring(lay.dp, p_rank * wb, "allgather") if (lay.zero in (1, 2) or lay.megatron and lay.zero) else 0.0
        )
        exact = 2 * per_pass + 2 * dp_grad + spread
        if every > 1:
            reuse = (fwd_only if functional else 0.0) + per_pass + dp_grad + spread
            comm = (exact + (every - 1) * reuse) / every
            compute = (6.0 + (every - 1) * (4.0 if functional else 3.0)) / every
        else:
            comm, compute = exact, 6.0
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": opt,
        "activations": acts,
        "logits": logits,
        "saved_theta": saved,
        "logit_grad_cache": cache_b,
        "host_cache": gas * tokens * V / lay.tp * ab if (functional and cache == "host") else 0.0,
        "ascent_buffers": ascent,
        "stored_direction": stored,
        "peak": peak,
        "comm": comm,
        "compute_units": compute * gas,
        "params": shape.params(),
        "params_rank": p_rank,
    }


VARIANTS = (
    ("AdamW", "device", 1),
    ("SAM", "device", 1),
    ("PreconditionedSAM", "device", 1),
    ("FunctionalSAM", "device", 1),
    ("PreconditionedFunctionalSAM", "device", 1),
    ("PreconditionedFunctionalSAM", "host", 1),
    ("PreconditionedFunctionalSAM", "recompute", 1),
    ("PreconditionedFunctionalSAM", "device", 4),
    ("PreconditionedFunctionalSAM", "recompute", 4),
)


def vname(m, c, k):
    return m + ("" if c == "device" else f"+{c}") + ("" if k == 1 else f"+every{k}")


def report(shape: Shape, lay: Layout, micro: int, seq: int, gas: int, ckpt: bool = False) -> str:
    base = plan(shape, lay, micro, seq, gas, "AdamW", checkpointing=ckpt)
    lines = [
        f"{shape.name}: {shape.params():,} parameters ({base['params_rank']:,.0f} read by the busiest rank) | "
        f"{lay.describe()} = {lay.gpus} GPU(s) | {'bf16' if lay.bf16 else 'fp32'} | micro {micro} x seq {seq} "
        f"x gas {gas}" + (" | activation checkpointing" if ckpt else ""),
        f"{'variant':<44}{'peak GiB':>9}{'x AdamW':>8}{'weights':>8}{'grads':>7}{'optim':>7}{'acts':>7}"
        f"{'logits':>7}{'g_F':>7}{'ascent':>7}{'comm GiB':>9}{'x AdamW':>8}{'compute':>8}",
    ]
    for m, c, k in VARIANTS:
        r = plan(shape, lay, micro, seq, gas, m, c, k, ckpt)
        lines.append(
            f"{vname(m, c, k):<44}{r['peak'] / GiB:>9.2f}{r['peak'] / base['peak']:>8.2f}"
            f"{r['weights'] / GiB:>8.2f}{r['grads'] / GiB:>7.2f}{r['optimizer'] / GiB:>7.2f}"
            f"{r['activations'] / GiB:>7.2f}{r['logits'] / GiB:>7.2f}{r['logit_grad_cache'] / GiB:>7.2f}"
            f"{r['ascent_buffers'] / GiB:>7.2f}{r['comm'] / GiB:>9.2f}"
            f"{(r['comm'] / base['comm'] if base['comm'] else float('nan')):>8.2f}"
            f"{r['compute_units'] / base['compute_units']:>8.2f}"
        )
    return "\n".join(lines)


def publish() -> str:
    """The markdown table of docs/performance.md (7B and 70B with activation checkpointing)."""
    rows = [
        "| model | layout | GPUs | micro x seq x gas | AdamW peak GiB | SAM | PFSAM device | PFSAM host "
        "| PFSAM recompute | PFSAM every4 | comm/step AdamW GiB | SAM types comm x AdamW |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    grid = [
        (
            "1.2b",
            [(8, Layout(zero=3, dp=8)), (64, Layout(zero=3, dp=64)), (1024, Layout(zero=3, dp=1024))],
            (4, 2048, 1),
        ),
        (
            "7b",
            [
                (8, Layout(zero=3, dp=8)),
                (64, Layout(zero=3, dp=64)),
                (1024, Layout(zero=3, dp=1024)),
                (64, Layout(megatron=True, zero=1, tp=8, pp=1, dp=8)),
            ],
            (1, 4096, 8),
        ),
        (
            "70b",
            [
                (8, Layout(zero=3, dp=8)),
                (64, Layout(zero=3, dp=64)),
                (1024, Layout(zero=3, dp=1024)),
                (64, Layout(megatron=True, zero=1, tp=8, pp=4, dp=2)),
                (1024, Layout(megatron=True, zero=1, tp=8, pp=8, dp=16)),
            ],
            (1, 4096, 16),
        ),
    ]
    for name, layouts, (micro, seq, gas) in grid:
        shape = load_shape(name)
        for gpus, lay in layouts:
            r = {vname(m, c, k): plan(shape, lay, micro, seq, gas, m, c, k, name != "1.2b") for m, c, k in VARIANTS}
            a = r["AdamW"]

            def cell(key):  # noqa: E306
                fits = "" if r[key]["peak"] <= 78 * GiB else " over 80 GB"
                return f"{r[key]['peak'] / GiB:.1f} ({r[key]['peak'] / a['peak']:.2f}x){fits}"

            rows.append(
                f"| {name} | {lay.describe()} | {gpus} | {micro} x {seq} x {gas} | {a['peak'] / GiB:.1f} | "
                f"{cell('SAM')} | {cell('PreconditionedFunctionalSAM')} | "
                f"{cell('PreconditionedFunctionalSAM+host')} | "
                f"{cell('PreconditionedFunctionalSAM+recompute')} | "
                f"{cell('PreconditionedFunctionalSAM+every4')} | {a['comm'] / GiB:.2f} | "
                f"{r['SAM']['comm'] / a['comm']:.2f} |"
            )
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Per-rank memory and per-step communication of AdamW and "
        "each method, for a model, a layout, micro-batch and sequence length",
    )
    p.add_argument("--model", default="2m", help="preset (tiny, 2m, 24m, 42m, 118m, 1.2b, 7b, 70b) or HF folder/config")
    p.add_argument("--gpus", type=int, default=None, help="DeepSpeed: data-parallel ranks (default 1)")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=None, help="Megatron data-parallel size (with --tp/--pp)")
    p.add_argument("--distributed-optimizer", action="store_true", help="Megatron's distributed optimizer")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gas", type=int, default=1, help="micro-batches per step and rank")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--activation-checkpointing", action="store_true", help="keep only each layer's input")
    p.add_argument("--json", action="store_true", help="print every variant's numbers as JSON")
    p.add_argument("--publish", action="store_true", help="print the 1.2B / 7B / 70B table (markdown)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    if a.publish:
        print(publish())
        return 0
    for key in ("tp", "pp", "micro_batch", "seq_len", "gas"):
        if getattr(a, key) < 1:
            print(
                f"{PROG}: error: --{key.replace('_', '-')} must be an integer >= 1, got {getattr(a, key)}",
                file=sys.stderr,
            )
            return 2
    megatron = a.tp > 1 or a.pp > 1 or a.dp is not None or a.distributed_optimizer
    if megatron and (a.gpus is not None or a.zero_stage):
        print(
            f"{PROG}: error: --tp/--pp/--dp/--distributed-optimizer (Megatron) and --gpus/--zero-stage (DeepSpeed) "
            "do not combine; accepted: one layout",
            file=sys.stderr,
        )
        return 2
    try:
        shape = load_shape(a.model)
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    lay = (
        Layout(
            zero=1 if a.distributed_optimizer else 0,
            dp=a.dp or 1,
            tp=a.tp,
            pp=a.pp,
            megatron=True,
            bf16=a.dtype == "bf16",
        )
        if megatron
        else Layout(zero=a.zero_stage, dp=a.gpus or 1, bf16=a.dtype == "bf16")
    )
    if a.json:
        print(
            json.dumps(
                {
                    vname(m, c, k): plan(
                        shape, lay, a.micro_batch, a.seq_len, a.gas, m, c, k, a.activation_checkpointing
                    )
                    for m, c, k in VARIANTS
                },
                indent=1,
            )
        )
    else:
        print(report(shape, lay, a.micro_batch, a.seq_len, a.gas, a.activation_checkpointing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
