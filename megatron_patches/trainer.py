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

The run reads top to bottom; :func:`main` calls one function per phase: :func:`parse` (arguments
and cheap checks, one line and exit status 2 on a bad input), :func:`set_up` (process groups),
:func:`load_data`, :func:`build` (model, optimizer, scheduler), :func:`resume` (``--load``),
:func:`open_data` (batches, ``metrics.jsonl``), :func:`train_loop` and :func:`finish`.

Checkpoints: ``<save>/iter_NNNNNNN/`` (megatron-core ``dist_checkpointing``, loadable at any
other TP/PP/DP layout) with ``hf/`` inside (config and tokenizer, for ``fsam-convert``), and
``<save>/latest_checkpointed_iteration.txt``, written only after every rank finished writing.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, List, Optional

from fsam_ds.names import EVAL_LOSS, HF_META_DIR, METRICS_FILE, megatron_iteration_dir
from fsam_ds.names import MEGATRON_LATEST as LATEST
from fsam_ds.runkit import (
    Formatter,
    MetricsLog,
    Parser,
    RunBase,
    UsageError,
    cpu_threads_per_rank,
    fmt,
    int_at_least,
    one_line,
    open_batches,
    prepare_data_in_turn,
    preset_names,
    publish_latest,
    resume_micro_step,
    run_phases,
    seed_everything,
    write_hf_meta,
)

PROG = "fsam-megatron-train"
LR_DECAY_STYLES = ("constant", "linear", "cosine")


def build_parser() -> argparse.ArgumentParser:
    from .megatron_lm import add_sam_args

    p = Parser(
        prog=PROG,
        formatter_class=Formatter,
        description="Train a Llama-style causal LM with megatron-core (TP x PP x DP, distributed "
        "optimizer) and AdamW / SAM / Functional-SAM, preconditioned or not.",
    )
    p.add_argument(
        "--model", default="2m", help="preset (tiny, 2m, 24m, 42m, 118m, 1.2b) or a local Hugging Face Llama folder"
    )
    p.add_argument(
        "--dataset",
        default="default",
        help="as fsam-train: 'default', a .txt file or folder, or a Hugging Face dataset name",
    )
    p.add_argument("--tokenizer", default=None, help="as fsam-train (default: a BPE trained on the training texts)")
    p.add_argument(
        "--seq-len",
        "--seq-length",
        dest="seq_len",
        type=int_at_least(2),
        default=128,
        help="tokens per sequence the model sees",
    )
    p.add_argument("--micro-batch-size", type=int_at_least(1), default=4)
    p.add_argument(
        "--global-batch-size",
        type=int_at_least(1),
        default=None,
        help="sequences per iteration (default: micro batch x data-parallel size)",
    )
    p.add_argument("--train-iters", type=int_at_least(0), default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--lr-warmup-iters", type=int_at_least(0), default=0)
    p.add_argument("--lr-decay-style", default="constant", help=f"one of {', '.join(LR_DECAY_STYLES)}")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--adam-beta1", type=float, default=0.9)
    p.add_argument("--adam-beta2", type=float, default=0.95)
    p.add_argument("--adam-eps", type=float, default=1e-8)
    p.add_argument("--clip-grad", type=float, default=1.0, help="0: no clipping")
    p.add_argument("--tensor-model-parallel-size", type=int_at_least(1), default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int_at_least(1), default=1)
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 weights (fp32 main params in the optimizer)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", default=None, help="checkpoint folder (default: runs/mcore-<method>-<model>)")
    p.add_argument("--save-interval", type=int_at_least(0), default=0, help="0: only at the end")
    p.add_argument("--load", default=None, help="resume from the latest checkpoint in this folder")
    p.add_argument(
        "--ckpt-step",
        type=int_at_least(0),
        default=None,
        help="with --load: resume from this iteration's checkpoint instead of the latest",
    )
    p.add_argument("--eval-interval", type=int_at_least(0), default=50, help="0: only at the end")
    p.add_argument("--eval-iters", type=int_at_least(1), default=20, help="evaluation micro-batches per DP rank")
    p.add_argument("--log-interval", type=int_at_least(1), default=1)
    add_sam_args(p)
    return p


def validate(args, world: int):
    """Every check that needs no model, data or process group; one-line errors."""
    from .megatron_lm import sam_config_from_args

    sam = sam_config_from_args(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * pp):
        raise UsageError(
            f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} does not divide "
            f"the world size {world}"
        )
    dp = world // (tp * pp)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise UsageError(
            f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp}"
        )
    if args.lr_decay_style not in LR_DECAY_STYLES:
        raise UsageError(
            f"--lr-decay-style {args.lr_decay_style!r} is not supported; accepted: {', '.join(LR_DECAY_STYLES)}"
        )
    for name in ("lr", "min_lr", "weight_decay", "clip_grad"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1) or args.adam_eps <= 0:
        raise UsageError("--adam-beta1/--adam-beta2 must be in [0, 1) and --adam-eps > 0")
    presets = preset_names()
    if args.model not in presets:
        folder = Path(args.model).expanduser()
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"--model {args.model!r} is neither a preset (accepted: {', '.join(presets)}) nor a "
                "local Hugging Face model folder with config.json"
            )
    if args.load is not None:
        latest = Path(args.load) / LATEST
        if not latest.is_file():
            raise UsageError(f"--load {args.load!r}: no {LATEST} there (accepted: a --save folder of an earlier run)")
        text = latest.read_text().strip()
        if not text.isdigit() or not (Path(args.load) / megatron_iteration_dir(int(text))).is_dir():
            raise UsageError(f"--load {args.load!r}: {LATEST} names {text!r}, which is not a checkpoint folder there")
    if args.ckpt_step is not None:
        if args.load is None:
            raise UsageError("--ckpt-step needs --load")
        if not (Path(args.load) / megatron_iteration_dir(args.ckpt_step)).is_dir():
            have = sorted(int(d.name[5:]) for d in Path(args.load).glob("iter_*") if d.name[5:].isdigit())
            raise UsageError(
                f"--ckpt-step {args.ckpt_step}: no such checkpoint in {args.load!r}; accepted: "
                f"{', '.join(map(str, have)) or 'none'}"
            )
    model_name = args.model if args.model in presets else Path(args.model).resolve().name
    save = Path(args.save) if args.save else Path("runs") / f"mcore-{sam.method.lower()}-{model_name}"
    return sam, dp, gbs // (args.micro_batch_size * dp), save, args.model in presets


def _hf_config(args, vocab: Optional[int], is_preset: bool):
    from transformers import AutoConfig

    from fsam_ds.models import PRESETS, llama_config

    if is_preset:
        return llama_config(
            args.model, vocab_size=vocab, max_seq_len=max(args.seq_len + 1, PRESETS[args.model].max_position_embeddings)
        )
    return AutoConfig.from_pretrained(args.model, local_files_only=True)


def _initial_weights(args, hf_config):
    """The Hugging Face model's weights (a preset initialised with --seed as fsam-train does)."""
    import torch

    from fsam_ds.models import build_model

    seed_everything(args.seed)
    model = build_model(args.model, vocab_size=hf_config.vocab_size, max_seq_len=hf_config.max_position_embeddings)
    return {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The phases of a run, in order
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Run(RunBase):
    """What the phases hand each other (:class:`~fsam_ds.runkit.RunBase`, and megatron-core's part)."""

    dp: int
    num_micro: int
    world: int
    # set_up
    tp: int = 1
    pp: int = 1
    reporter: bool = False  # the last pipeline stage's first TP rank of DP rank 0 logs and writes metrics
    # build
    hf_config: Any = None
    cfg: Any = None
    opt: Any = None
    sched: Any = None
    gbs: int = 0
    forward_step: Any = None  # megatron-core's forward_step_func
    fwd_bwd: Any = None  # megatron-core's pipeline schedule
    # resume
    start_iter: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def say(self, *parts) -> None:
        if self.reporter:
            print(*parts, flush=True)


def parse(argv: Optional[List[str]]) -> Run:
    """1. The arguments and every check that costs no model, data or process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = build_parser().parse_args(argv)
    _require_megatron_core()
    sam, dp, num_micro, save_dir, is_preset = validate(args, world)
    return Run(
        args=args,
        sam=sam,
        dp=dp,
        num_micro=num_micro,
        save_dir=save_dir,
        is_preset=is_preset,
        world=world,
        data_seed=args.seed,
    )


def _require_megatron_core() -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec("megatron.core") is not None
    except ImportError:  # no megatron package at all
        found = False
    if not found:
        raise UsageError("megatron-core is not installed: pip install 'fsam-ds[megatron]'")


def set_up(run: Run) -> None:
    """2. The process group (NCCL on GPUs, gloo on CPUs, with :mod:`megatron_patches.cpu`),
    megatron-core's TP x PP x DP groups and its model-parallel random seeds."""
    import torch
    import torch.distributed as dist

    from fsam_ds.distributed import default_backend, init_from_env

    backend = default_backend()
    if backend == "gloo":
        threads = cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", run.world)))
        if threads:
            torch.set_num_threads(threads)
    init_from_env(backend)
    import megatron.core  # noqa: F401  (megatron-core first, then its patches)

    from . import cpu

    cpu.apply()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    a = run.args
    run.tp, run.pp = a.tensor_model_parallel_size, a.pipeline_model_parallel_size
    ps.initialize_model_parallel(tensor_model_parallel_size=run.tp, pipeline_model_parallel_size=run.pp)
    tensor_parallel.model_parallel_cuda_manual_seed(a.seed)
    run.rank, run.dp_rank = dist.get_rank(), ps.get_data_parallel_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    run.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    run.reporter = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and run.dp_rank == 0


def load_data(run: Run) -> None:
    """3. The same texts, tokenizer and blocks as fsam-train, blocks one token longer (the model
    sees seq_len inputs, labels are shifted by one)."""
    a = run.args
    run.tokenizer, run.train_set, run.eval_set = prepare_data_in_turn(
        a.dataset, a.tokenizer, a.model, run.is_preset, a.seq_len + 1, run.device
    )


def _make_forward_step(device):
    """megatron-core's ``forward_step_func``: a batch of blocks -> inputs, labels, the loss function."""
    import torch

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

    return forward_step


def build(run: Run) -> None:
    """4. GPTModel from the Hugging Face weights (bf16: Float16Module), DDP, the (distributed)
    optimizer, its LR scheduler, the forward step and the pipeline schedule."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from . import layout

    a, tp, pp = run.args, run.tp, run.pp
    try:
        vocab = len(run.tokenizer)
        vocab = -(-vocab // tp) * tp  # rows a TP layout can split evenly (padding rows are never targets)
        run.hf_config = _hf_config(a, vocab if run.is_preset else None, run.is_preset)
        dtype = torch.bfloat16 if a.bf16 else torch.float32
        run.cfg = cfg = layout.transformer_config(run.hf_config, tp, pp, dtype)
    except (ValueError, OSError) as err:
        raise UsageError(one_line(err)) from None
    gpt = layout.build_gpt(run.hf_config, cfg)
    init = layout.hf_to_megatron(_initial_weights(a, run.hf_config), run.hf_config)
    run.n_params = sum(v.numel() for v in init.values())
    layout.load_full_state_dict([gpt], init)
    del init
    module = gpt
    if a.bf16:
        from megatron.core.transformer.module import Float16Module

        module = Float16Module(cfg, gpt)
    if run.device.type == "cuda":
        module.cuda(run.device)
    run.model = DistributedDataParallel(
        config=cfg,
        module=module,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=a.use_distributed_optimizer
        ),
    )
    cfg.finalize_model_grads_func = finalize_model_grads
    run.opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=a.lr,
            min_lr=a.min_lr,
            weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1,
            adam_beta2=a.adam_beta2,
            adam_eps=a.adam_eps,
            clip_grad=a.clip_grad,
            bf16=a.bf16,
            params_dtype=dtype,
            use_distributed_optimizer=a.use_distributed_optimizer,
        ),
        [run.model],
    )
    run.gbs = gbs = run.num_micro * a.micro_batch_size * run.dp
    run.sched = OptimizerParamScheduler(
        run.opt,
        init_lr=0.0 if a.lr_warmup_iters else a.lr,
        max_lr=a.lr,
        min_lr=a.min_lr,
        lr_warmup_steps=a.lr_warmup_iters * gbs,
        lr_decay_steps=max(1, a.train_iters) * gbs,
        lr_decay_style=a.lr_decay_style,
        start_wd=a.weight_decay,
        end_wd=a.weight_decay,
        wd_incr_steps=max(1, a.train_iters) * gbs,
        wd_incr_style="constant",
    )
    run.forward_step = _make_forward_step(run.device)
    run.fwd_bwd = get_forward_backward_func()


def _rng_object(run: Run, same_layout: bool):
    """This rank's random states (torch, accelerator, megatron's tracker), one shard per rank;
    restored only by a run with the same TP x PP x DP layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from .sam import _rng_state

    return ShardedObject(
        "rng_state",
        _rng_state() if same_layout else None,
        (run.pp, run.tp, run.dp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), run.dp_rank),
    )


def _step_object(run: Run, same_layout: bool):
    """This rank's state of the SAM step (the stored direction of ``--sam-ascent-every``, in this
    rank's shard of the main parameters), one shard per rank; restored only by a run with the same
    TP x PP x DP layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from .megatron_lm import _runner

    state = _runner([run.model], run.opt, run.sam).state_dict() if same_layout else None
    return ShardedObject(
        "sam_step",
        state,
        (run.pp, run.tp, run.dp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), run.dp_rank),
    )


def sharded_state_dict(
    run: Run, is_loading: bool, iteration: int, micro_step: int, with_rng: bool = True, with_step: bool = True
):
    """What a checkpoint holds (megatron-core ``dist_checkpointing``): model, optimizer, scheduler,
    iteration, data position, layout, method, this rank's random states and, with
    ``--sam-ascent-every`` > 1, this rank's stored ascent direction."""
    from . import layout

    a = run.args
    model_sd = layout.unwrap(run.model).sharded_state_dict()
    sd = {
        "model": model_sd,
        "optimizer": run.opt.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"}
        ),
        "scheduler": run.sched.state_dict(),
        "iteration": iteration,
        "data": {"micro_step": micro_step, "seed": a.seed, "dp": run.dp, "micro_batch_size": a.micro_batch_size},
        "layout": {
            "tp": run.tp,
            "pp": run.pp,
            "dp": run.dp,
            "distributed_optimizer": bool(a.use_distributed_optimizer),
            "bf16": bool(a.bf16),
        },
        "sam": {
            "method": run.sam.method,
            "rho": run.sam.rho,
            "precondition_norm": run.sam.precondition_norm,
            "rho_warmup_steps": run.sam.rho_warmup_steps,
            "ascent_every": run.sam.ascent_every,
        },
    }
    if with_rng:
        sd["rng_state"] = _rng_object(run, True)
    if with_rng and with_step and run.sam.is_sam and run.sam.ascent_every > 1:
        sd["sam_step"] = _step_object(run, True)
    return sd


def resume(run: Run) -> None:
    """5. With ``--load``: model, optimizer, scheduler, iteration and data position from the
    checkpoint (any TP x PP x DP layout), the random states when the layout is the same."""
    import torch
    from megatron.core import dist_checkpointing

    from . import layout

    a = run.args
    if a.load is None:
        return
    load_iter = a.ckpt_step if a.ckpt_step is not None else int((Path(a.load) / LATEST).read_text().strip())
    ckpt = Path(a.load) / megatron_iteration_dir(load_iter)
    try:
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is one line to the user
        raise UsageError(f"--load {a.load!r}: cannot read {ckpt} ({one_line(err)})") from None
    saved = common.get("layout", {})
    if bool(saved.get("distributed_optimizer")) != bool(a.use_distributed_optimizer):
        raise UsageError(
            f"--load {a.load!r}: the checkpoint was written "
            f"{'with' if saved.get('distributed_optimizer') else 'without'} --use-distributed-optimizer; "
            "resume with the same optimizer (TP, PP and DP may change)"
        )
    for o in getattr(run.opt, "chained_optimizers", [run.opt]):
        if hasattr(o, "_init_optimizer_states_with_dummy_values"):
            o._init_optimizer_states_with_dummy_values()
    same_layout = (saved.get("tp"), saved.get("pp"), saved.get("dp")) == (run.tp, run.pp, run.dp)
    with_step = same_layout and int(common.get("sam", {}).get("ascent_every", 1)) > 1
    state = dist_checkpointing.load(
        sharded_state_dict(run, True, 0, 0, with_rng=same_layout, with_step=with_step), str(ckpt)
    )
    if same_layout:
        from .sam import _set_rng_state

        _set_rng_state(state["rng_state"])
    else:
        run.say(
            f"note: the checkpoint was written at TP {saved.get('tp')} x PP {saved.get('pp')} x DP "
            f"{saved.get('dp')}; random streams restart from --seed"
        )
    if "sam_step" in state:
        from .megatron_lm import _runner

        _runner([run.model], run.opt, run.sam).load_state_dict(state["sam_step"])
    elif run.sam.is_sam and run.sam.ascent_every > 1:
        run.say(
            "note: the checkpoint holds no ascent direction for this layout; it is computed afresh at the next "
            "iteration"
        )
    layout.unwrap(run.model).load_state_dict(state["model"])
    with torch.no_grad():
        run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.start_iter = int(state["iteration"])
    data_state = state["data"]
    run.data_seed = int(data_state["seed"])
    run.micro_step = int(data_state["micro_step"])
    saved_layout = (int(data_state["dp"]), int(data_state["micro_batch_size"]))
    if saved_layout != (run.dp, a.micro_batch_size):
        run.micro_step = resume_micro_step(
            run.micro_step, len(run.train_set), saved_layout, (run.dp, a.micro_batch_size)
        )
    run.say(f"resumed from {ckpt} at iteration {run.start_iter}")


def open_data(run: Run) -> None:
    """6. This DP rank's batches from the data position, the save folder, ``metrics.jsonl`` and
    the opening line."""
    import torch.distributed as dist

    a = run.args
    open_batches(run, a.micro_batch_size, run.dp, a.eval_iters)
    if run.is_main:
        run.save_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the folder exists before the reporting rank (the last pipeline stage) opens its log
    run.metrics = MetricsLog(run.save_dir / METRICS_FILE, run.reporter, run.start_iter if a.load else None)
    tokens_per_iter = run.gbs * a.seq_len
    run.say(
        f"{run.sam.method} | model {a.model}: {run.n_params:,} parameters, vocab {run.hf_config.vocab_size} | "
        f"TP {run.tp} x PP {run.pp} x DP {run.dp}"
        f"{' (distributed optimizer)' if a.use_distributed_optimizer else ''} | {run.num_micro} micro-batches of "
        f"{a.micro_batch_size} x {a.seq_len} per DP rank = {tokens_per_iter:,} tokens/iteration | "
        f"{len(run.train_set):,} train / {len(run.eval_set):,} eval blocks | device {run.device.type} | "
        f"save {run.save_dir}"
    )


def evaluate(run: Run) -> Optional[float]:
    """The token-weighted mean eval loss over every DP rank's evaluation batches."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    a, model = run.args, run.model
    model.eval()
    with torch.no_grad():
        out = run.fwd_bwd(
            forward_step_func=run.forward_step,
            data_iterator=iter(run.eval_list),
            model=[model],
            num_microbatches=len(run.eval_list),
            seq_length=a.seq_len,
            micro_batch_size=a.micro_batch_size,
            forward_only=True,
        )
    model.train()
    total = torch.zeros(2)
    for rep in out or []:
        total += rep["lm loss"].detach().float().cpu()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    return float(total[0] / total[1]) if total[1] > 0 else None


def save(run: Run, iteration: int) -> None:
    """A checkpoint ``<save>/iter_NNNNNNN`` with ``hf/`` inside; ``latest_checkpointed_iteration.txt``
    is published once every rank has written its part."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    ckpt = run.save_dir / megatron_iteration_dir(iteration)
    if run.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded_state_dict(run, False, iteration, run.micro_step), str(ckpt))
    if run.is_main:
        write_hf_meta(ckpt / HF_META_DIR, run.hf_config, run.tokenizer)
    dist.barrier()  # every rank has written its part: only now is it the latest
    if run.is_main:
        publish_latest(run.save_dir, f"{iteration}\n", name=LATEST)
    run.say(f"saved checkpoint {ckpt}")


@dataclass
class LoopEnd:
    """Where :func:`train_loop` stopped, for :func:`finish`."""

    it: int
    last_eval: Optional[float]
    last_eval_it: int
    last_saved: int


def train_loop(run: Run) -> LoopEnd:
    """7. One :func:`~megatron_patches.megatron_lm.fsam_train_step` per iteration up to
    ``--train-iters``, with the log, the evaluations and the checkpoints on their schedules."""
    from .megatron_lm import fsam_train_step

    a, sam, opt = run.args, run.sam, run.opt
    schedule = dict(num_microbatches=run.num_micro, seq_length=a.seq_len, micro_batch_size=a.micro_batch_size)
    tokens_per_iter = run.gbs * a.seq_len
    end = LoopEnd(it=run.start_iter, last_eval=None, last_eval_it=-1, last_saved=-1)
    while end.it < a.train_iters:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        loss_reduced, skipped, _, _, _, grad_norm, _, _ = fsam_train_step(
            run.forward_step,
            run.train_iter,
            [run.model],
            opt,
            run.sched,
            run.cfg,
            run.fwd_bwd,
            iteration=end.it,
            sam=sam,
            **schedule,
        )
        end.it += 1
        run.micro_step += run.num_micro
        m = opt._fsam_runner.last_metrics
        dt = time.perf_counter() - t0
        if run.reporter:
            loss = float(loss_reduced["lm loss"]) if loss_reduced else None
            norm = m.get("grad_norm") if sam.is_sam else grad_norm
            run.metrics.write(
                {
                    "step": end.it,
                    "loss": loss,
                    "grad_norm": norm,
                    "eps_norm": m.get("eps_norm", 0.0),
                    "rho": m.get("rho", 0.0),
                    "lr": lr,
                    "tokens_per_s": tokens_per_iter / dt,
                    "method": sam.method,
                    "skipped": bool(skipped),
                    "step_time": dt,
                }
            )
            if end.it % a.log_interval == 0 or end.it == a.train_iters:
                print(
                    f"iteration {end.it}/{a.train_iters} | {sam.method} | loss {fmt(loss, '.4f')} | "
                    f"||g|| {fmt(norm, '.4f')} | "
                    f"||eps|| {m.get('eps_norm', 0.0):.4f} | lr {lr:.3e} | {tokens_per_iter / dt:,.0f} tok/s"
                    + (" | skipped" if skipped else ""),
                    flush=True,
                )
        if a.eval_interval and end.it % a.eval_interval == 0:
            end.last_eval, end.last_eval_it = evaluate(run), end.it
            run.metrics.write({"step": end.it, EVAL_LOSS: end.last_eval})
            run.say(f"iteration {end.it} | eval_loss {fmt(end.last_eval, '.4f')}")
        if a.save_interval and end.it % a.save_interval == 0:
            save(run, end.it)
            end.last_saved = end.it
    return end


def finish(run: Run, end: LoopEnd) -> None:
    """8. A last evaluation and checkpoint unless the last iteration already has them; the
    process group goes after every rank is done."""
    import torch.distributed as dist

    if end.last_eval_it != end.it:
        end.last_eval = evaluate(run)
        run.metrics.write({"step": end.it, EVAL_LOSS: end.last_eval})
    if end.last_saved != end.it and end.it > run.start_iter:
        save(run, end.it)
    run.say(f"final eval_loss: {fmt(end.last_eval, '.4f')}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> int:
    """``fsam-megatron-train``: the phases in order; returns the exit status (0 done, 2 bad input,
    one line ``fsam-megatron-train: error: ...``)."""
    from fsam_ds.config import FSAMConfigError

    return run_phases(
        PROG,
        argv,
        parse,
        (set_up, load_data, build, resume, open_data),
        lambda run: finish(run, train_loop(run)),
        refused=(UsageError, FSAMConfigError, ValueError),
    )


def cli() -> None:
    """The ``fsam-megatron-train`` command: :func:`main`, then the process ends with its exit status
    (:func:`fsam_ds.runkit.exit_process`: no native teardown that could abort a finished run)."""
    from fsam_ds.runkit import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
