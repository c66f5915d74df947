"""megatron-core layouts (TP x PP x DP) training every requested method from the same weights.

    torchrun --nproc_per_node N tests/megatron_worker.py --tp T --pp P [--distopt] --out FILE \
        [--also NAME:ARGS ...]

Weights start from ``reference.tiny_llama`` (a Hugging Face Llama) mapped onto megatron-core's
GPTModel; micro-batches are ``reference.micro_batch`` of this rank's data-parallel index. Rank 0
writes ``{run: {method: ...}}``: per method, the trained weights in Hugging Face naming (TP
shards and pipeline stages gathered), the pass-1 losses, and the kept logit gradients of step 0
(this rank's vocabulary shard of every TP rank, gathered) in ``FILE.<run>.logit_grads``.

The first run ("main") is the command line; every ``--also NAME:ARGS`` is one more layout in the
same launch (its own TP x PP x DP over the same ranks, ARGS parsed like the command line, with
``--steps``, ``--rho`` and ``--lr`` inherited), so that a layout costs no torchrun start of its own.

A method may carry a variant after ``@`` (a deliberately wrong step, to show that the checks
can fail): ``@noreplay`` pass 2 draws fresh random numbers (no random state replayed),
``@notracker`` the CPU generator is replayed but megatron's RNG tracker states are not,
``@twice`` the norm counts every main gradient (tied copies twice); ``@host`` runs the method with
``logit_grad_cache: "host"``. ``--faults`` injects infinities (see its help) and records per step
whether the step was skipped, rho, the learning rate, the loss and whether the weights stayed
unchanged on every rank (``metrics``). ``--probe`` records, at every
step, the perturbation applied to the main parameters against the fp32 formula computed here
from the same main gradients and the optimizer's own ``exp_avg_sq`` and step (TP = PP = 1), and,
without the distributed optimizer, the DP-reduced pass-2 gradients of step 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference  # noqa: E402

BETA2, ADAM_EPS = 0.999, 1e-8


def parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--distopt", action="store_true")
    ap.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank (interleaved 1F1B)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tied", action="store_true", help="tied input and output embeddings")
    ap.add_argument("--methods", default="SAM,PreconditionedSAM,FunctionalSAM,PreconditionedFunctionalSAM")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--microbatches", type=int, default=2, help="per data-parallel rank")
    ap.add_argument(
        "--dp-equivalent",
        type=int,
        default=0,
        help="feed the micro-batches of this many data-parallel ranks to each rank in turn "
        "(a 1-rank run reproducing the global batch of a DP run)",
    )
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    ap.add_argument("--probe", action="store_true", help="record the applied perturbation (see the docstring)")
    ap.add_argument(
        "--via-train-step",
        action="store_true",
        help="drive the steps with fsam_train_step and a pretrain_gpt.py-style forward step",
    )
    ap.add_argument("--ascent-every", type=int, default=1)
    ap.add_argument("--ascent-direction", default="gradient")
    ap.add_argument("--rho-warmup", type=int, default=0, help="rho_warmup_steps")
    ap.add_argument(
        "--lr-warmup",
        type=int,
        default=0,
        help="with --via-train-step: megatron-core's LR scheduler warming up over this many steps",
    )
    ap.add_argument(
        "--faults",
        default="",
        help="STEP:KIND:PASS:RANK,...: an infinity injected at step STEP in pass PASS (1 or 2) on the "
        "global rank RANK; KIND loss: loss + inf (finite gradients), grad: an infinite gradient "
        "at the output layer's input (the whole model below it non-finite)",
    )
    ap.add_argument(
        "--data-steps",
        default="",
        help="comma-separated: step i trains on the micro-batches of step DATA_STEPS[i] (the run "
        "that never saw the skipped steps' data)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--also", action="append", default=[], metavar="NAME:ARGS")
    return ap


def main():
    ap = parser()
    base = ap.parse_args()
    if not base.out:
        ap.error("--out is required")
    runs = [("main", base)]
    for spec in base.also:
        name, _, rest = spec.partition(":")
        common = ["--steps", str(base.steps), "--rho", str(base.rho), "--lr", str(base.lr), "--out", base.out]
        runs.append((name, ap.parse_args(common + shlex.split(rest))))

    dist.init_process_group("gloo")
    import megatron.core  # noqa: F401

    from megatron_patches import cpu

    cpu.apply()
    from megatron.core import parallel_state as ps

    results = {}
    for i, (name, args) in enumerate(runs):
        if i:
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            virtual_pipeline_model_parallel_size=args.vpp,
        )
        results[name] = run_layout(args, args.out + f".{name}.logit_grads")
    if dist.get_rank() == 0:
        torch.save(results, base.out)
    dist.barrier()
    dist.destroy_process_group()


def _probe_perturb(main, record):
    """Wrap ``main.perturb``: record this rank's sums for the perturbation it applies to the main
    parameters (``a``, after minus before) against the directions of the fp32 formula computed here
    from the same main gradients ``g`` and the optimizer's own ``exp_avg_sq`` and step ``t``:
    ``g / (sqrt(v / (1 - beta2^s)) + eps)`` at ``s = t`` (the method's own) and ``t -+ 1``, and ``g``
    itself (SAM's). Sums of squares and dot products only (combined over ranks after training, no
    collective inside the step): ``||a - c x||`` follows from them for any scale ``c``."""
    orig = main.perturb

    def perturb(ascent):
        params = main.params
        before = [p.detach().clone() for p in params]
        grads = [p.grad.detach().double().clone() for p in params]
        orig(ascent)
        applied = [p.detach().double() - b.double() for p, b in zip(params, before)]
        state = {}
        for o in main.inner:
            state.update(o.optimizer.state)
        steps = {int(state[p]["step"]) for p in params if p in state and "step" in state[p]}
        assert len(steps) <= 1, steps
        t = steps.pop() if steps else 0

        def direction(s):
            if s == 0:
                return grads
            return [
                g / ((state[p]["exp_avg_sq"].double() / (1 - BETA2**s)).sqrt() + ADAM_EPS)
                for g, p in zip(grads, params)
            ]

        row = {"adam_updates": t, "aa": sum(float((a * a).sum()) for a in applied)}
        for name, s in (("g", 0), ("d", t), ("d_minus_1", max(t - 1, 0)), ("d_plus_1", t + 1 if t else 0)):
            x = direction(s)
            row[name] = {
                "ax": sum(float((a * y).sum()) for a, y in zip(applied, x)),
                "xx": sum(float((y * y).sum()) for y in x),
            }
        record.append(row)

    main.perturb = perturb


def _probe_summary(rows_per_rank, rho):
    """Per step: the applied perturbation's norm, and cos / norm-relative distance to each
    candidate ``rho x / ||x||`` (``formula``: the method's; ``unpreconditioned``: SAM's;
    ``step_minus_1``/``step_plus_1``: a wrong bias-correction step) and to ``rho d / ||g||`` (the
    "gradient" normalisation)."""
    import math

    out = []
    for rows in zip(*rows_per_rank):
        assert len({r["adam_updates"] for r in rows}) == 1
        tot = lambda f: sum(f(r) for r in rows)  # noqa: E731
        aa = tot(lambda r: r["aa"])
        row = {"adam_updates": rows[0]["adam_updates"], "applied_norm": math.sqrt(aa)}
        gg = tot(lambda r: r["g"]["xx"])
        for name, key, norm in (
            ("formula", "d", None),
            ("unpreconditioned", "g", None),
            ("step_minus_1", "d_minus_1", None),
            ("step_plus_1", "d_plus_1", None),
            ("gradient_norm", "d", gg),
        ):
            ax, xx = tot(lambda r: r[key]["ax"]), tot(lambda r: r[key]["xx"])
            c = rho / math.sqrt(norm if norm is not None else xx)
            diff2 = max(aa - 2 * c * ax + c * c * xx, 0.0)
            row[name] = {"cos": ax / math.sqrt(aa * xx), "rel": math.sqrt(diff2) / (c * math.sqrt(xx))}
        out.append(row)
    return out


class _InfGrad(torch.autograd.Function):
    """The identity, whose backward turns one element of the incoming gradient into +inf."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad


def _fault_now(faults, state, kind):
    """Whether a ``--faults`` entry of ``kind`` is due now: this step, this pass (the pass is told
    by the output-layer forwards counted so far in the step), this rank."""
    if not faults:
        return False
    which = 1 if state["forwards"] <= state["n"] else 2
    return any(f == (state["step"], kind, which, dist.get_rank()) for f in faults)


def _fault_hook(faults, state, args, module, inputs):
    """Output-layer forward pre-hook: counts the step's forwards; a due ``grad`` fault wraps the
    output layer's input so that its gradient (and everything below it) becomes non-finite."""
    state["forwards"] += 1
    if _fault_now(faults, state, "grad") and inputs[0].requires_grad:
        return (_InfGrad.apply(inputs[0]), *inputs[1:])
    return None


def _main_grads_hf(chunks, hf_config):
    """The DP-reduced main gradients (the DDP buffer) in Hugging Face naming (TP = PP = 1)."""
    from megatron_patches import layout

    meg = {full: p.main_grad.detach().float().clone() for _, _, full, p in layout._stage_params(chunks)}
    return layout.megatron_to_hf(meg, hf_config)


def run_layout(args, gf_path):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import megatron_patches.sam as msam
    from fsam_ds.config import SAMConfig
    from megatron_patches import layout
    from megatron_patches.sam import MegatronSAM

    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = reference.tiny_llama(seed=0, layers=args.layers, tied=args.tied)
    full = layout.hf_to_megatron(hf.state_dict(), hf.config)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    results, kept_gf, restore_ok = {}, {}, []
    faults = [tuple(int(x) if x.isdigit() else x for x in f.split(":")) for f in args.faults.split(",") if f]
    fault_state_of = [{"step": -1, "forwards": 0, "n": 0}]

    def _gather_vocab(grads):
        """This TP rank's vocabulary shards of g_F, concatenated over the TP group ([s, b, V])."""
        tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
        out = []
        for g in grads:
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            out.append(torch.cat(parts, -1))
        return out

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        if _fault_now(faults, fault_state_of[0], "loss"):
            loss = loss + float("inf")  # finite gradients: only a check of the loss sees it
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        ids = next(data_iterator)["input_ids"]
        tokens, labels = ids[:, :-1], ids[:, 1:]
        b, s = tokens.shape
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).logical_not().view(1, 1, s, s)
        return model(tokens, pos, mask, labels=labels), loss_func

    # -- written the way Megatron-LM's pretrain_gpt.py writes it (core 0.16) --
    def get_batch(data_iterator):
        if not (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()):
            return None, None, None, None, None
        ids = next(data_iterator)["input_ids"]
        tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        b, s = tokens.shape
        loss_mask = torch.ones(b, s, dtype=torch.float)
        attention_mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).logical_not().view(1, 1, s, s)
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        return tokens, labels, loss_mask, attention_mask, position_ids

    def pretrain_loss_func(loss_mask, output_tensor, model=None):
        losses = output_tensor.view(-1).float()
        loss_mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * loss_mask)
        if _fault_now(faults, fault_state_of[0], "loss"):
            loss = loss + float("inf")  # finite gradients: only a check of the loss sees it
        num_tokens = loss_mask.sum().clone().detach().to(torch.int)
        report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
        return loss, num_tokens, report

    def pretrain_forward_step(data_iterator, model):
        tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
        output_tensor = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
        return output_tensor, partial(pretrain_loss_func, loss_mask, model=model)

    for spec in args.methods.split(","):
        method, _, variant = spec.partition("@")
        extra = {"virtual_pipeline_model_parallel_size": args.vpp} if args.vpp else {}
        if args.dropout:
            extra.update(hidden_dropout=args.dropout, attention_dropout=args.dropout)
        cfg = layout.transformer_config(hf.config, args.tp, args.pp, dtype, **extra)
        chunks = []
        for vp in range(args.vpp) if args.vpp else [None]:
            gpt = layout.build_gpt(hf.config, cfg, vp_stage=vp)
            layout.load_full_state_dict([gpt], full)
            module = gpt
            if args.bf16:
                from megatron.core.transformer.module import Float16Module

                module = Float16Module(cfg, gpt)
            chunks.append(
                DistributedDataParallel(
                    config=cfg,
                    module=module,
                    disable_bucketing=bool(vp),
                    ddp_config=DistributedDataParallelConfig(
                        grad_reduce_in_fp32=True, use_distributed_optimizer=args.distopt
                    ),
                )
            )
        model = chunks[0]
        cfg.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=args.lr,
                weight_decay=0.0,
                adam_beta1=0.9,
                adam_beta2=BETA2,
                adam_eps=ADAM_EPS,
                clip_grad=1.0,
                bf16=args.bf16,
                params_dtype=dtype,
                use_distributed_optimizer=args.distopt,
            ),
            chunks,
        )
        if method == "AdamW":
            sam = SAMConfig(method=method)
        else:
            sam = SAMConfig(
                method=method,
                rho=args.rho,
                rho_warmup_steps=args.rho_warmup,
                ascent_every=args.ascent_every,
                ascent_direction=args.ascent_direction,
                logit_grad_cache="host" if variant == "host" else "device",
            )
        runner = MegatronSAM(chunks, opt, sam)
        runner.skip_unperturbed_pass2 = False
        opt._fsam_runner = runner  # the runner fsam_train_step reuses for this model and optimizer
        sched = None
        if args.lr_warmup:
            from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

            per_step = args.microbatches * 2 * dp  # sequences per step (micro-batches of 2)
            sched = OptimizerParamScheduler(
                opt,
                init_lr=0.0,
                max_lr=args.lr,
                min_lr=0.0,
                lr_warmup_steps=args.lr_warmup * per_step,
                lr_decay_steps=100 * per_step,
                lr_decay_style="constant",
                start_wd=0.0,
                end_wd=0.0,
                wd_incr_steps=100 * per_step,
                wd_incr_style="constant",
            )
        fault_state = {"step": -1, "forwards": 0, "n": 0}
        fault_state_of[0] = fault_state
        if faults:
            for c in chunks:
                inner = layout.unwrap(c)
                if getattr(inner, "post_process", False):
                    inner.output_layer.register_forward_pre_hook(partial(_fault_hook, faults, fault_state, args))
        probe, pass2 = [], None
        if args.probe and sam.is_sam:
            _probe_perturb(runner.main, probe)
        if variant == "twice":  # a wrong norm: every main gradient counted, tied copies twice
            runner.main.weights = lambda n=len(runner.main.params): [1.0] * n
        saved_set_rng = msam._set_rng_state
        if variant == "noreplay":
            msam._set_rng_state = lambda state: None
        elif variant == "notracker":
            msam._set_rng_state = lambda state: torch.set_rng_state(state["cpu"])
        elif variant not in ("", "twice", "host"):
            raise ValueError(f"unknown variant {variant!r}")
        # every method draws the same random numbers from here (dropout masks)
        torch.manual_seed(4321)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        losses, metrics = [], []
        ranks = range(args.dp_equivalent) if args.dp_equivalent else [dp_rank]
        world = args.dp_equivalent or dp
        data_steps = [int(x) for x in args.data_steps.split(",")] if args.data_steps else list(range(args.steps))
        for step in range(args.steps):
            fault_state.update(step=step, forwards=0)
            mbs = [
                reference.micro_batch(data_steps[step], r, i, world, args.microbatches)
                for r in ranks
                for i in range(args.microbatches)
            ]
            b, seq = mbs[0]["input_ids"].shape[0], mbs[0]["input_ids"].shape[1] - 1
            kw = dict(num_microbatches=len(mbs), seq_length=seq, micro_batch_size=b)
            fault_state["n"] = len(mbs)
            kept = [] if step == 0 and runner.hooks is not None else None
            if kept is not None:  # keep pass 1's logit gradients of this step for the comparison
                put = runner.hooks.cache.put

                def put_and_keep(k, g, put=put, kept=kept):
                    kept.append((k, g.clone()))
                    put(k, g)

                runner.hooks.cache.put = put_and_keep
            params = [p for c in chunks for p in c.parameters()]
            before = [p.detach().clone() for p in params] if step == 0 or faults else None
            lr = opt.param_groups[0]["lr"]
            data = [iter(mbs) for _ in chunks] if args.vpp else iter(mbs)
            if args.via_train_step:
                from megatron_patches.megatron_lm import fsam_train_step

                if step == 0:  # check restore inside the step: compare after pass 2, before AdamW
                    restore_ok.clear()
                    orig_step = opt.step

                    def checked_step(orig_step=orig_step, before=before, opt=opt):
                        restore_ok.append(all(torch.equal(a, p) for a, p in zip(before, params)))
                        opt.step = orig_step
                        return orig_step()

                    opt.step = checked_step
                out = fsam_train_step(
                    pretrain_forward_step,
                    data,
                    chunks,
                    opt,
                    sched,
                    cfg,
                    get_forward_backward_func(),
                    iteration=step,
                    sam=sam,
                    **kw,
                )
                losses.append(float(out[0]["lm loss"]) if out[0] else None)
                skipped = bool(out[1])
            else:
                runner.forward_backward(get_forward_backward_func(), forward_step, data, **kw)
                if step == 0:
                    restore_ok[:] = [all(torch.equal(a, p) for a, p in zip(before, params))]
                if step == 0 and args.probe and not args.distopt and args.tp == args.pp == 1:
                    pass2 = _main_grads_hf(chunks, hf.config)
                if faults:
                    skipped = not runner.optimizer_step()[0]
                else:
                    opt.step()
                    runner.steps += 1
                    skipped = False
                losses.append(runner.last_metrics.get("loss"))
            if faults or args.rho_warmup:
                metrics.append(
                    {
                        "skipped": skipped,
                        "rho": runner.last_metrics["rho"],
                        "lr": lr,
                        "loss": losses[-1],
                        "unchanged": None if before is None else all(torch.equal(a, p) for a, p in zip(before, params)),
                    }
                )
            if kept is not None:
                del runner.hooks.cache.put
                kept_gf[method] = _gather_vocab([g for _, g in sorted(kept, key=lambda kg: kg[0])])
        msam._set_rng_state = saved_set_rng
        if args.probe:  # distributed optimizer: each rank holds its shard (TP = PP = 1: the world is DP)
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, probe)
            probe = _probe_summary(rows if args.distopt else rows[:1], args.rho) if probe else []
        meg = layout.gather_full_state_dict(chunks)
        flag = torch.tensor([1.0 if all(restore_ok) and restore_ok else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if metrics:  # unchanged on every rank
            same = torch.tensor([0.0 if m["unchanged"] is None else float(m["unchanged"]) for m in metrics])
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, [m["skipped"] for m in metrics])
            for m, u in zip(metrics, same.tolist()):
                m["unchanged"] = u == 1.0
            metrics = {"steps": metrics, "skipped_per_rank": every}
        results[spec] = {
            "weights": layout.megatron_to_hf(meg, hf.config),
            "losses": losses,
            "restore_exact": bool(flag.item() == 1.0),
            "probe": probe,
            "pass2_grads": pass2,
            "metrics": metrics,
        }
        del model, chunks, opt, runner
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0 and kept_gf:
        torch.save(kept_gf, gf_path)
    return results


if __name__ == "__main__":
    main()
