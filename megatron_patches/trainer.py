"""``fsam-megatron-train``: train a Llama-style GPTModel with megatron-core at any TP x PP x DP.

    torchrun --nproc_per_node 4 -m megatron_patches.trainer --model 2m \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --sam-type PreconditionedFunctionalSAM --sam-rho 0.1 --train-iters 100 --save runs/mcore

The same data pipeline and presets as ``fsam-train`` (DeepSpeed): the same texts, tokenizer, token
blocks, data order and initial weights (a preset is initialised as the Hugging Face model of that
preset with ``--seed`` and mapped onto megatron-core's layout, so every TP/PP layout starts from
the same weights; ``--model`` may also be a Hugging Face Llama folder). megatron-core's own pieces
do the work: GPTModel with the local layer spec, its pipeline schedules, DDP, the (distributed)
optimizer, its LR scheduler and ``dist_checkpointing``. Runs on GPUs with NCCL, or on CPUs with
gloo (:mod:`megatron_patches.cpu` is then applied).

Checkpoints: ``<save>/iter_NNNNNNN/`` (megatron-core ``dist_checkpointing``, loadable at any
other TP/PP/DP layout) with ``hf/`` inside (config and tokenizer, for ``fsam-convert``), and
``<save>/latest_checkpointed_iteration.txt``, written only after every rank finished writing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import List, Optional

PROG = "fsam-megatron-train"
LATEST = "latest_checkpointed_iteration.txt"
HF_META_DIR = "hf"
LR_DECAY_STYLES = ("constant", "linear", "cosine")


def build_parser() -> argparse.ArgumentParser:
    from fsam_ds.train import _Formatter, _Parser, _int_at_least

    from .megatron_lm import add_sam_args

    p = _Parser(prog=PROG, formatter_class=_Formatter,
                description="Train a Llama-style causal LM with megatron-core (TP x PP x DP, distributed "
                            "optimizer) and AdamW / SAM / Functional-SAM, preconditioned or not.")
    p.add_argument("--model", default="2m", help="preset (tiny, 2m, 24m, 42m, 118m, 1.2b) or a local Hugging Face "
                   "Llama folder")
    p.add_argument("--dataset", default="default", help="as fsam-train: 'default', a .txt file or folder, or a "
                   "Hugging Face dataset name")
    p.add_argument("--tokenizer", default=None, help="as fsam-train (default: a BPE trained on the training texts)")
    p.add_argument("--seq-len", "--seq-length", dest="seq_len", type=_int_at_least(2), default=128,
                   help="tokens per sequence the model sees")
    p.add_argument("--micro-batch-size", type=_int_at_least(1), default=4)
    p.add_argument("--global-batch-size", type=_int_at_least(1), default=None,
                   help="sequences per iteration (default: micro batch x data-parallel size)")
    p.add_argument("--train-iters", type=_int_at_least(0), default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--lr-warmup-iters", type=_int_at_least(0), default=0)
    p.add_argument("--lr-decay-style", default="constant", help=f"one of {', '.join(LR_DECAY_STYLES)}")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--clip-grad", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--tensor-model-parallel-size", type=_int_at_least(1), default=1)
    p.add_argument("--pipeline-model-parallel-size", type=_int_at_least(1), default=1)
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 main params in the optimizer)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", default=None, help="checkpoint folder (default: runs/mcore-<method>-<model>)")
    p.add_argument("--save-interval", type=_int_at_least(0), default=0, help="0: only at the end")
    p.add_argument("--load", default=None, help="resume from the latest checkpoint in this folder")
    p.add_argument("--ckpt-step", type=_int_at_least(0), default=None,
                   help="with --load: resume from this iteration's checkpoint instead of the latest")
    p.add_argument("--eval-interval", type=_int_at_least(0), default=50, help="0: only at the end")
    p.add_argument("--eval-iters", type=_int_at_least(1), default=20, help="evaluation micro-batches per DP rank")
    p.add_argument("--log-interval", type=_int_at_least(1), default=1)
    add_sam_args(p)
    return p


def validate(args, world: int):
    """Every check that needs no model, data or process group; one-line errors."""
    from fsam_ds.train import UsageError, _preset_names

    from .megatron_lm import sam_config_from_args

    sam = sam_config_from_args(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * pp):
        raise UsageError(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not divide "
                         f"the world size {world}")
    dp = world // (tp * pp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise UsageError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {dp}")
    if args.lr_decay_style not in LR_DECAY_STYLES:
        raise UsageError(f"--lr-decay-style {args.lr_decay_style!r} is not supported; accepted: "
                         f"{', '.join(LR_DECAY_STYLES)}")
    for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1) or args.adam_eps <= 0:
        raise UsageError("--adam-beta1/--adam-beta2 must be in [0, 1) and --adam-eps > 0")
    presets = _preset_names()
    if args.model not in presets:
        folder = Path(args.model).expanduser()
        if not (folder / "config.json").is_file():
            raise UsageError(f"--model {args.model!r} is neither a preset (accepted: {', '.join(presets)}) nor a "
                             "local Hugging Face model folder with config.json")
    if args.load is not None:
        latest = Path(args.load) / LATEST
        if not latest.is_file():
            raise UsageError(f"--load {args.load!r}: no {LATEST} there (accepted: a --save folder of an earlier run)")
        text = latest.read_text().strip()
        if not text.isdigit() or not (Path(args.load) / f"iter_{int(text):07d}").is_dir():
            raise UsageError(f"--load {args.load!r}: {LATEST} names {text!r}, which is not a checkpoint folder there")
    if args.ckpt_step is not None:
        if args.load is None:
            raise UsageError("--ckpt-step needs --load")
        if not (Path(args.load) / f"iter_{args.ckpt_step:07d}").is_dir():
            have = sorted(int(d.name[5:]) for d in Path(args.load).glob("iter_*") if d.name[5:].isdigit())
            raise UsageError(f"--ckpt-step {args.ckpt_step}: no such checkpoint in {args.load!r}; accepted: "
                             f"{', '.join(map(str, have)) or 'none'}")
    model_name = args.model if args.model in presets else Path(args.model).resolve().name
    save = Path(args.save) if args.save else Path("runs") / f"mcore-{sam.method.lower()}-{model_name}"
    return sam, dp, gbs // (args.micro_batch_size * dp), save, args.model in presets


def _hf_config(args, vocab: int, is_preset: bool):
    from transformers import AutoConfig

    from fsam_ds.models import PRESETS, llama_config

    if is_preset:
        return llama_config(args.model, vocab_size=vocab, max_seq_len=max(args.seq_len + 1,
                                                                           PRESETS[args.model].max_position_embeddings))
    return AutoConfig.from_pretrained(args.model, local_files_only=True)


def _initial_weights(args, hf_config):
    """The Hugging Face model's weights (a preset initialised with --seed as fsam-train does)."""
    import torch

    from fsam_ds.models import build_model
    from fsam_ds.train import seed_everything

    seed_everything(args.seed)
    model = build_model(args.model, vocab_size=hf_config.vocab_size, max_seq_len=hf_config.max_position_embeddings)
    return {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}


def main(argv: Optional[List[str]] = None) -> int:
    from fsam_ds.config import FSAMConfigError
    from fsam_ds.train import UsageError, _one_line

    def _fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
        return 2

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = build_parser().parse_args(argv)
        sam, dp, num_micro, save_dir, is_preset = validate(args, world)
    except SystemExit as exc:
        return int(exc.code or 0)
    except (UsageError, FSAMConfigError, ValueError) as err:
        return _fail(_one_line(err))

    import torch
    import torch.distributed as dist

    # 1. process groups -----------------------------------------------------------------------
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        from fsam_ds.train import cpu_threads_per_rank
        threads = cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if threads:
            torch.set_num_threads(threads)
        dist.init_process_group("gloo")
    import megatron.core  # noqa: F401  (megatron-core first, then its patches)

    from . import cpu
    cpu.apply()
    from megatron.core import dist_checkpointing, parallel_state as ps, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from fsam_ds import data as fdata
    from fsam_ds.train import MetricsLog, _fmt

    from . import layout
    from .megatron_lm import fsam_train_step

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    rank, dp_rank = dist.get_rank(), ps.get_data_parallel_rank()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0

    def say(*parts):
        if reporter:
            print(*parts, flush=True)

    # 2. data: the same texts, tokenizer and blocks as fsam-train, blocks one token longer (the
    # model sees seq_len inputs, labels are shifted by one)
    from fsam_ds.train import DataError, prepare_data_in_turn
    try:
        tokenizer, train_set, eval_set = prepare_data_in_turn(args.dataset, args.tokenizer, args.model, is_preset,
                                                              args.seq_len + 1, device)
    except DataError as err:
        return _fail(str(err)) if str(err) else 2

    # 3. model, optimizer, scheduler -----------------------------------------------------------
    try:
        vocab = len(tokenizer)
        vocab = -(-vocab // tp) * tp  # rows a TP layout can split evenly (padding rows are never targets)
        hf_config = _hf_config(args, vocab if is_preset else None, is_preset)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        cfg = layout.transformer_config(hf_config, tp, pp, dtype)
    except (ValueError, OSError) as err:
        return _fail(_one_line(err))
    gpt = layout.build_gpt(hf_config, cfg)
    init = layout.hf_to_megatron(_initial_weights(args, hf_config), hf_config)
    n_params = sum(v.numel() for v in init.values())
    layout.load_full_state_dict([gpt], init)
    del init
    module = gpt
    if args.bf16:
        from megatron.core.transformer.module import Float16Module
        module = Float16Module(cfg, gpt)
    if device.type == "cuda":
        module.cuda(device)
    model = DistributedDataParallel(config=cfg, module=module, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer))
    cfg.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, params_dtype=dtype, use_distributed_optimizer=args.use_distributed_optimizer), [model])
    gbs = num_micro * args.micro_batch_size * dp
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=max(1, args.train_iters) * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=max(1, args.train_iters) * gbs, wd_incr_style="constant")

    def rng_object(same_layout: bool):
        """This rank's random states (torch, accelerator, megatron's tracker), one shard per rank;
        restored only by a run with the same TP x PP x DP layout."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        from .sam import _rng_state
        return ShardedObject("rng_state", _rng_state() if same_layout else None, (pp, tp, dp),
                             (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), dp_rank))

    def sharded_state_dict(is_loading: bool, iteration: int, micro_step: int, with_rng: bool = True):
        model_sd = layout.unwrap(model).sharded_state_dict()
        sd = {"model": model_sd,
              "optimizer": opt.sharded_state_dict(model_sd, is_loading=is_loading,
                                                  metadata={"distrib_optim_sharding_type": "fully_reshardable"}),
              "scheduler": sched.state_dict(), "iteration": iteration,
              "data": {"micro_step": micro_step, "seed": args.seed, "dp": dp, "micro_batch_size": args.micro_batch_size},
              "layout": {"tp": tp, "pp": pp, "dp": dp, "distributed_optimizer": bool(args.use_distributed_optimizer),
                         "bf16": bool(args.bf16)},
              "sam": {"method": sam.method, "rho": sam.rho, "precondition_norm": sam.precondition_norm,
                      "rho_warmup_steps": sam.rho_warmup_steps}}
        if with_rng:
            sd["rng_state"] = rng_object(True)
        return sd

    # 4. resume ----------------------------------------------------------------------------------
    start_iter, micro_step, data_seed = 0, 0, args.seed
    if args.load is not None:
        load_iter = (args.ckpt_step if args.ckpt_step is not None
                     else int((Path(args.load) / LATEST).read_text().strip()))
        ckpt = Path(args.load) / f"iter_{load_iter:07d}"
        try:
            common = dist_checkpointing.load_common_state_dict(str(ckpt))
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is one line to the user
            return _fail(f"--load {args.load!r}: cannot read {ckpt} ({_one_line(err)})")
        saved = common.get("layout", {})
        if bool(saved.get("distributed_optimizer")) != bool(args.use_distributed_optimizer):
            return _fail(f"--load {args.load!r}: the checkpoint was written "
                         f"{'with' if saved.get('distributed_optimizer') else 'without'} --use-distributed-optimizer; "
                         "resume with the same optimizer (TP, PP and DP may change)")
        for o in getattr(opt, "chained_optimizers", [opt]):
            if hasattr(o, "_init_optimizer_states_with_dummy_values"):
                o._init_optimizer_states_with_dummy_values()
        same_layout = (saved.get("tp"), saved.get("pp"), saved.get("dp")) == (tp, pp, dp)
        state = dist_checkpointing.load(sharded_state_dict(True, 0, 0, with_rng=same_layout), str(ckpt))
        if same_layout:
            from .sam import _set_rng_state
            _set_rng_state(state["rng_state"])
        else:
            say(f"note: the checkpoint was written at TP {saved.get('tp')} x PP {saved.get('pp')} x DP "
                f"{saved.get('dp')}; random streams restart from --seed")
        layout.unwrap(model).load_state_dict(state["model"])
        with torch.no_grad():
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_iter = int(state["iteration"])
        data_state = state["data"]
        data_seed = int(data_state["seed"])
        micro_step = int(data_state["micro_step"])
        if (int(data_state["dp"]), int(data_state["micro_batch_size"])) != (dp, args.micro_batch_size):
            from fsam_ds.train import resume_micro_step
            micro_step = resume_micro_step(micro_step, len(train_set),
                                           (int(data_state["dp"]), int(data_state["micro_batch_size"])),
                                           (dp, args.micro_batch_size))
        say(f"resumed from {ckpt} at iteration {start_iter}")

    try:
        train_iter = fdata.micro_batches(train_set, args.micro_batch_size, dp_rank, dp, seed=data_seed,
                                         start_micro_step=micro_step)
        eval_list = fdata.eval_batches(eval_set, args.micro_batch_size, dp_rank, dp, max_batches=args.eval_iters)
    except ValueError as err:
        return _fail(f"--dataset {args.dataset!r} with --seq-len {args.seq_len}: {_one_line(err)}")

    def loss_func(loss_mask, output_tensor):
        losses = output_tensor.view(-1).float()
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        tokens = mask.sum().clone().detach().to(torch.int)
        return loss, tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), tokens.view(1).float()])}

    def forward_step(data_iterator, model):
        ids = next(data_iterator)["input_ids"].to(device)
        tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        b, s = tokens.shape
        loss_mask = torch.ones(b, s, dtype=torch.float, device=device)
        position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        attention_mask = torch.tril(torch.ones(s, s, dtype=torch.bool, device=device)).logical_not().view(1, 1, s, s)
        return model(tokens, position_ids, attention_mask, labels=labels), partial(loss_func, loss_mask)

    fwd_bwd = get_forward_backward_func()
    schedule = dict(num_microbatches=num_micro, seq_length=args.seq_len, micro_batch_size=args.micro_batch_size)

    def evaluate() -> Optional[float]:
        model.eval()
        with torch.no_grad():
            out = fwd_bwd(forward_step_func=forward_step, data_iterator=iter(eval_list), model=[model],
                          num_microbatches=len(eval_list), seq_length=args.seq_len,
                          micro_batch_size=args.micro_batch_size, forward_only=True)
        model.train()
        total = torch.zeros(2)
        for rep in out or []:
            total += rep["lm loss"].detach().float().cpu()
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        return float(total[0] / total[1]) if total[1] > 0 else None

    is_main = rank == 0
    if is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the folder exists before the reporting rank (the last pipeline stage) opens its log
    metrics = MetricsLog(save_dir / "metrics.jsonl", reporter, start_iter if args.load else None)

    def save(iteration: int):
        ckpt = save_dir / f"iter_{iteration:07d}"
        if is_main:
            ckpt.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(sharded_state_dict(False, iteration, micro_step), str(ckpt))
        if is_main:
            hf_config.save_pretrained(ckpt / HF_META_DIR)
            tokenizer.save_pretrained(ckpt / HF_META_DIR)
        dist.barrier()  # every rank has written its part: only now is it the latest
        if is_main:
            tmp = save_dir / (LATEST + ".tmp")
            tmp.write_text(f"{iteration}\n")
            os.replace(tmp, save_dir / LATEST)
        say(f"saved checkpoint {ckpt}")

    tokens_per_iter = gbs * args.seq_len
    say(f"{sam.method} | model {args.model}: {n_params:,} parameters, vocab {hf_config.vocab_size} | TP {tp} x PP {pp} x DP {dp}"
        f"{' (distributed optimizer)' if args.use_distributed_optimizer else ''} | {num_micro} micro-batches of "
        f"{args.micro_batch_size} x {args.seq_len} per DP rank = {tokens_per_iter:,} tokens/iteration | "
        f"{len(train_set):,} train / {len(eval_set):,} eval blocks | device {device.type} | save {save_dir}")

    # 5. the loop ------------------------------------------------------------------------------
    it, last_eval, last_eval_it, last_saved = start_iter, None, -1, -1
    while it < args.train_iters:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        loss_reduced, skipped, _, _, _, grad_norm, _, _ = fsam_train_step(
            forward_step, train_iter, [model], opt, sched, cfg, fwd_bwd, iteration=it, sam=sam, **schedule)
        it += 1
        micro_step += num_micro
        m = opt._fsam_runner.last_metrics
        dt = time.perf_counter() - t0
        if reporter:
            loss = float(loss_reduced["lm loss"]) if loss_reduced else None
            metrics.write({"step": it, "loss": loss, "grad_norm": m.get("grad_norm") if sam.is_sam else grad_norm,
                           "eps_norm": m.get("eps_norm", 0.0), "rho": m.get("rho", 0.0), "lr": lr,
                           "tokens_per_s": tokens_per_iter / dt, "method": sam.method, "skipped": bool(skipped),
                           "step_time": dt})
            if it % args.log_interval == 0 or it == args.train_iters:
                print(f"iteration {it}/{args.train_iters} | {sam.method} | loss {_fmt(loss, '.4f')} | "
                      f"||g|| {_fmt(m.get('grad_norm') if sam.is_sam else grad_norm, '.4f')} | "
                      f"||eps|| {m.get('eps_norm', 0.0):.4f} | lr {lr:.3e} | {tokens_per_iter / dt:,.0f} tok/s"
                      + (" | skipped" if skipped else ""), flush=True)
        if args.eval_interval and it % args.eval_interval == 0:
            last_eval, last_eval_it = evaluate(), it
            metrics.write({"step": it, "eval_loss": last_eval})
            say(f"iteration {it} | eval_loss {_fmt(last_eval, '.4f')}")
        if args.save_interval and it % args.save_interval == 0:
            save(it)
            last_saved = it
    if last_eval_it != it:
        last_eval = evaluate()
        metrics.write({"step": it, "eval_loss": last_eval})
    if last_saved != it and it > start_iter:
        save(it)
    say(f"final eval_loss: {_fmt(last_eval, '.4f')}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
