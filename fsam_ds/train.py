"""Train a small causal language model with AdamW, SAM, Functional-SAM or their preconditioned
forms on DeepSpeed: ``python -m fsam_ds.train`` (or ``fsam-train``).

The method is chosen by the DeepSpeed config alone (``optimizer.type``; ready ones are in
``ds_configs/``)::

    # one process
    fsam-train --deepspeed_config ds_configs/functional_sam.json --model 2m --steps 200
    # data parallel on 2 GPUs (or 2 CPU processes with gloo)
    deepspeed --num_gpus 2 --module fsam_ds.train --deepspeed_config ds_configs/sam.json

The script reads top to bottom; :func:`_main` calls one function per phase:

1. :func:`parse`: the arguments and everything that is cheap to check (config, model name, data
   path, resume folder); a bad input ends with one line ``fsam-train: error: ...`` and exit
   status 2, before any process group, model or data exists;
2. :func:`set_up`: start the process group, pick the device, seed;
3. :func:`load_data`: read the texts, get the tokenizer, cut the texts into blocks of
   ``--seq-len`` tokens (rank 0 first, so that it alone fills the caches);
4. :func:`build`: the model for the tokenizer's vocabulary, handed to :func:`fsam_ds.initialize`;
5. :func:`resume`: optionally, weights, optimizer, LR scheduler and step from DeepSpeed's
   checkpoint, the position in the data from the checkpoint's ``client_state``, the random states;
6. :func:`open_data`: this rank's training and evaluation batches from that position;
7. :func:`train_loop`: one ``engine.train_batch`` per optimizer step; rank 0 logs and appends to
   ``<save-dir>/metrics.jsonl``; evaluation every ``--eval-every`` steps; a checkpoint
   (:func:`save`) every ``--save-every`` steps;
8. :func:`finish`: a last evaluation and checkpoint at the end.

``metrics.jsonl`` holds one JSON object per line: per step ``{"step", "loss", "grad_norm",
"eps_norm", "rho", "lr", "tokens_per_s", "method", "skipped", "step_time"}`` plus, for the SAM
types, ``eps_share_embed`` and ``eps_share_output`` (the share of ``||eps||^2`` on the input
embedding and on the output layer), ``ascent_reused`` / ``ascent_momentum`` with the sub-2x
modes, and, every
``optimizer.params.sharpness_every`` steps, the sharpness diagnostics (``tau_logit``, ``tau_func``,
``tau_cross``, ``lambda_max``, ...; see :mod:`fsam_ds.sharpness`) (``loss`` is the
pass-1 loss at the unperturbed weights, averaged over micro-batches and ranks), and per
evaluation ``{"step", "eval_loss"}`` (averaged over ``--eval-batches`` batches on every rank).

Data order: global micro-step ``k`` reads the ``k``-th batch of :func:`fsam_ds.data.micro_batches`
(shuffled per epoch from ``--seed``); a checkpoint stores ``k`` so that ``--resume`` continues with
the next unseen batch instead of starting the epoch again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

# absolute imports: the deepspeed launcher may run this file as a script (deepspeed fsam_ds/train.py)
from fsam_ds.names import (
    ENGINE_FILE,
    EVAL_LOSS,
    HF_META_DIR,
    LATEST,
    METRICS_FILE,
    OPTIONAL_STEP_METRICS,
    RNG_FILE,
    SHARPNESS_METRICS,
    SHORT_NAMES,
    deepspeed_tag,
)
from fsam_ds.runkit import (
    DataError,
    Formatter,
    MetricsLog,
    Parser,
    RunBase,
    UsageError,
    all_ranks_ok,
    cpu_threads_per_rank,
    fmt,
    int_at_least,
    load_rng_state,
    one_line,
    open_batches,
    prepare_data,
    prepare_data_in_turn,
    preset_names,
    publish_latest,
    resume_micro_step,
    rng_state,
    run_phases,
    save_rng_state,
    seed_everything,
    set_rng_state,
    write_hf_meta,
)

# The names above stay importable from here (fsam_ds.train.UsageError, ...); save() calls rng_state
# and publish_latest through this module, where a fault-injection harness may wrap them.
__all__ = [
    "main",
    "train_argv",
    "build_parser",
    "validate",
    "check_checkpoint_files",
    "UsageError",
    "DataError",
    "MetricsLog",
    "prepare_data",
    "prepare_data_in_turn",
    "resume_micro_step",
    "seed_everything",
    "cpu_threads_per_rank",
    "rng_state",
    "set_rng_state",
    "publish_latest",
    "all_ranks_ok",
    "evaluate",
    "ENGINE_FILE",
    "HF_META_DIR",
    "METRICS_FILE",
    "RNG_FILE",
    "SHORT_NAMES",
]

PROG = "fsam-train"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Train a causal LM with AdamW / SAM / Functional-SAM "
        "(preconditioned or not) on DeepSpeed. The method is optimizer.type in the config.",
        formatter_class=Formatter,
    )
    p.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        required=True,
        metavar="PATH",
        help="DeepSpeed JSON config (see ds_configs/)",
    )
    p.add_argument(
        "--model",
        default="2m",
        help="preset name (tiny, 2m, 24m, 42m, 118m, 1.2b) or a local Hugging Face model folder",
    )
    p.add_argument(
        "--dataset",
        default="default",
        help="'default' (embedded corpus), a local .txt file or "
        "folder, or a Hugging Face dataset name ('owner/name:config')",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="local tokenizer folder or Hugging Face name; default: "
        "a byte-level BPE trained on the dataset's training texts with the preset's vocabulary size",
    )
    p.add_argument("--seq-len", type=int_at_least(2), default=128, help="tokens per sequence")
    p.add_argument(
        "--steps",
        type=int_at_least(0),
        default=200,
        help="optimizer steps in total (a resumed run continues up to this step)",
    )
    p.add_argument("--eval-every", type=int_at_least(0), default=50, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int_at_least(1), default=20, help="evaluation micro-batches per rank")
    p.add_argument(
        "--save-dir",
        default=None,
        help="checkpoints and metrics.jsonl (default: runs/<method>-<model>, e.g. runs/functional_sam-2m)",
    )
    p.add_argument(
        "--save-every", type=int_at_least(0), default=0, help="checkpoint every N steps (0: only at the end)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    p.add_argument("--seed", type=int, default=1234, help="model initialisation and data order")
    p.add_argument("--log-every", type=int_at_least(1), default=1, help="print a log line every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # set by the deepspeed launcher; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def train_argv(
    config,
    save_dir,
    steps: int,
    *,
    model="tiny",
    seq_len: int = 32,
    eval_every: int = 0,
    eval_batches: int = 1,
    progress: bool = False,
    **options: Any,
) -> List[str]:
    """The command-line arguments of ``fsam-train`` for a run (the tests', the soaks' and the
    reproduction's): ``options`` by their Python names (``save_every=2``, ``dataset=...``,
    ``resume=True``); None and False leave an option out."""
    values = dict(
        deepspeed_config=config,
        model=model,
        seq_len=seq_len,
        steps=steps,
        eval_every=eval_every,
        eval_batches=eval_batches,
        save_dir=save_dir,
        **options,
    )
    argv: List[str] = []
    for key, value in values.items():
        flag = "--deepspeed_config" if key == "deepspeed_config" else "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv + ([] if progress else ["--no-progress"])


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Every check that costs no model, data or process group. Returns the parsed config pieces;
    raises UsageError/FSAMConfigError/ValueError/FileNotFoundError with a one-line message."""
    from fsam_ds.config import parse_config

    ds_config, sam = parse_config(args.deepspeed_config)  # FSAMConfigError naming key and accepted values

    model = args.model
    presets = preset_names()
    model_path = Path(model).expanduser()
    if model not in presets:
        if not model_path.is_dir():
            raise UsageError(
                f"--model {model!r} is neither a preset (accepted: {', '.join(presets)}) nor a local model folder"
            )
        if not (model_path / "config.json").is_file():
            raise UsageError(
                f"--model {model!r}: the folder has no config.json (a Hugging Face model folder "
                f"is expected, or a preset: {', '.join(presets)})"
            )

    model_name = model if model in presets else model_path.resolve().name
    short = SHORT_NAMES.get(sam.method, sam.method.lower())
    save_dir = Path(args.save_dir) if args.save_dir else Path("runs") / f"{short}-{model_name}"
    if args.resume and not (save_dir / LATEST).is_file():
        raise UsageError(
            f"--resume: no checkpoint in {str(save_dir)!r} (DeepSpeed's 'latest' file is "
            "missing); accepted: a --save-dir written by an earlier run"
        )
    if args.resume:
        tag = (save_dir / LATEST).read_text().strip()
        if not tag or not (save_dir / tag).is_dir():
            raise UsageError(
                f"--resume: {str(save_dir / LATEST)!r} names {tag!r}, which is not a checkpoint "
                f"folder in {str(save_dir)!r}"
            )
        try:
            check_checkpoint_files(save_dir / tag)
        except ValueError as err:
            raise UsageError(f"--resume: {one_line(err)}") from None
    if save_dir.exists() and not save_dir.is_dir():
        raise UsageError(f"--save-dir {str(save_dir)!r} exists and is not a folder")

    from fsam_ds.data import (
        EMBEDDED_CORPORA,  # the first import of transformers (lazily)
        looks_like_path,  # the rule fsam_ds.data.load_texts applies
    )

    if (
        args.dataset not in EMBEDDED_CORPORA
        and not Path(args.dataset).expanduser().exists()
        and looks_like_path(args.dataset)
    ):
        raise UsageError(
            f"--dataset {args.dataset!r}: no such file or folder (accepted: "
            f"{', '.join(EMBEDDED_CORPORA)}, a local .txt file or folder, or a Hugging Face "
            "dataset name)"
        )
    dataset_path = Path(args.dataset).expanduser()
    if args.dataset not in EMBEDDED_CORPORA and dataset_path.is_file() and dataset_path.stat().st_size == 0:
        raise UsageError(
            f"--dataset {args.dataset!r}: the file is empty (accepted: a text file with at least one non-blank line)"
        )
    if (
        args.tokenizer is not None
        and not Path(args.tokenizer).expanduser().exists()
        and looks_like_path(args.tokenizer)
    ):
        raise UsageError(
            f"--tokenizer {args.tokenizer!r}: no such folder (accepted: a local tokenizer "
            "folder, a Hugging Face tokenizer name, or leave it out to train one)"
        )

    return {
        "ds_config": ds_config,
        "sam": sam,
        "save_dir": save_dir,
        "is_preset": model in presets,
        "model_name": model_name,
    }


def check_checkpoint_files(tag_dir: Path) -> Dict[str, Any]:
    """Raise ValueError (one line) unless ``tag_dir`` holds every file DeepSpeed's
    ``load_checkpoint`` will read, each complete (:func:`fsam_ds.convert.check_deepspeed_tag`, the
    rule ``fsam-convert`` applies to the same folder). Returns ``{"world_size", "zero", "partitioned"}``."""
    from fsam_ds.convert import check_deepspeed_tag

    found = check_deepspeed_tag(tag_dir)
    return {"world_size": found.world_size, "zero": found.zero, "partitioned": found.partitioned}


def evaluate(engine, batches, group, world: int) -> float:
    """Mean eval loss over this rank's batches, then over the data-parallel ranks."""
    import torch

    from fsam_ds.distributed import mean_over

    total = torch.stack([engine.eval_batch(b) for b in batches]).mean().reshape(1).float()
    if world > 1:
        mean_over(total, group)
    return float(total)


# ---------------------------------------------------------------------------------------------
# The phases of a run, in order
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Run(RunBase):
    """What the phases hand each other (:class:`~fsam_ds.runkit.RunBase`, and DeepSpeed's part)."""

    ds_config: Dict[str, Any]
    # set_up
    is_main: bool = False
    # build
    engine: Any = None
    micro: int = 0
    gas: int = 0
    dp_world: int = 1
    dp_group: Any = None
    tokens_per_step: int = 0
    # resume
    start_step: int = 0
    load_path: Optional[str] = None

    def say(self, *parts) -> None:
        if self.is_main:
            print(*parts, flush=True)


def parse(argv: Optional[List[str]]) -> Run:
    """1. The arguments and every check that costs no model, data or process group."""
    args = build_parser().parse_args(argv)
    checked = validate(args)
    return Run(
        args=args,
        ds_config=checked["ds_config"],
        sam=checked["sam"],
        save_dir=checked["save_dir"],
        is_preset=checked["is_preset"],
        data_seed=args.seed,
    )


def set_up(run: Run) -> None:
    """2. The process group (through DeepSpeed), this rank's device and CPU threads, the seeds, and
    the save folder (rank 0)."""
    import os

    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import fsam_ds

    fsam_ds.init_distributed(run.ds_config.get("communication_backend"))
    run.rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    accel.set_device(local_rank)
    run.device = accel.device_name(local_rank)
    if run.device == "cpu":
        threads = cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if threads is not None:
            torch.set_num_threads(threads)
    run.is_main = run.rank == 0
    seed_everything(run.args.seed)
    if run.is_main:
        run.save_dir.mkdir(parents=True, exist_ok=True)


def load_data(run: Run) -> None:
    """3. Texts, tokenizer and token blocks of ``--seq-len`` (rank 0 fills the caches first)."""
    a = run.args
    run.tokenizer, run.train_set, run.eval_set = prepare_data_in_turn(
        a.dataset, a.tokenizer, a.model, run.is_preset, a.seq_len, run.device
    )


def build(run: Run) -> None:
    """4. The model for the tokenizer's vocabulary (partitioned at ZeRO-3) and the engine."""
    import torch.distributed as dist

    import fsam_ds
    from fsam_ds import models as fmodels
    from fsam_ds.config import parse_config, zero_stage

    a = run.args
    try:
        max_pos = max(a.seq_len, fmodels.PRESETS[a.model].max_position_embeddings) if run.is_preset else a.seq_len
        ds_cfg, _ = parse_config(a.deepspeed_config)
        zero3 = ds_cfg if zero_stage(ds_cfg) == 3 else None  # built partitioned (deepspeed.zero.Init)
        run.model = fmodels.build_model(a.model, vocab_size=len(run.tokenizer), max_seq_len=max_pos, zero3_config=zero3)
    except ValueError as err:
        raise UsageError(one_line(err)) from None
    run.n_params = fmodels.count_parameters(run.model)
    # the config as written (parse_config's ds_config has the SAM keys taken out for DeepSpeed)
    run.engine, _, _, _ = fsam_ds.initialize(model=run.model, config=a.deepspeed_config)
    run.micro = run.engine.train_micro_batch_size_per_gpu()
    run.gas = run.engine.gradient_accumulation_steps()
    run.dp_world = run.engine.dp_world_size
    run.dp_group = run.engine.data_parallel_group
    run.dp_rank = dist.get_rank(group=run.dp_group) if run.dp_world > 1 else 0
    run.tokens_per_step = run.dp_world * run.micro * run.gas * a.seq_len


def resume(run: Run) -> None:
    """5. With ``--resume``: DeepSpeed's checkpoint (weights, optimizer, scheduler, step), the data
    position and seed of its ``client_state``, this rank's random states and engine state."""
    import torch

    a, engine = run.args, run.engine
    if not a.resume:
        return
    run.load_path, client_state = engine.load_checkpoint(str(run.save_dir))
    if run.load_path is None:
        raise UsageError(f"--resume: could not load a checkpoint from {str(run.save_dir)!r}")
    client_state = client_state or {}
    run.start_step = int(engine.global_steps)
    run.micro_step = int(client_state.get("micro_step", run.start_step * run.gas))
    run.data_seed = int(client_state.get("seed", a.seed))
    old_layout = (
        int(client_state.get("world_size", run.dp_world)),
        int(client_state.get("micro_batch_size", run.micro)),
    )
    if old_layout != (run.dp_world, run.micro):
        run.micro_step = resume_micro_step(run.micro_step, len(run.train_set), old_layout, (run.dp_world, run.micro))
        run.say(
            f"note: the checkpoint was written by {old_layout[0]} rank(s) x micro {old_layout[1]}; "
            f"the data continues at micro-step {run.micro_step} of this layout"
        )
    if run.data_seed != a.seed:
        run.say(f"note: keeping the checkpoint's data order (seed {run.data_seed}); --seed {a.seed} is ignored")
    tag_dir = run.save_dir / (run.save_dir / LATEST).read_text().strip()
    # the random state this rank had when it saved (dropout masks continue)
    if not load_rng_state(tag_dir / RNG_FILE.format(rank=run.rank)):
        run.say(f"note: no saved random state for rank {run.rank}; random streams restart from --seed")
    if run.sam.ascent_every > 1:
        engine_file = tag_dir / ENGINE_FILE.format(rank=run.rank)
        state = (
            torch.load(engine_file, weights_only=False) if engine_file.is_file() else client_state.get("fsam_engine")
        )
        try:
            engine.load_state_dict(state or {})
        except ValueError as err:
            run.say(f"note: {err}")


def open_data(run: Run) -> None:
    """6. This rank's batches from the data position, the opening lines, ``metrics.jsonl``."""
    a = run.args
    open_batches(run, run.micro, run.dp_world, a.eval_batches)
    run.say(
        f"{run.sam.method} | model {a.model}: {run.n_params:,} parameters, vocab {len(run.tokenizer)} | "
        f"data {a.dataset}: {len(run.train_set):,} train / {len(run.eval_set):,} eval blocks of {a.seq_len} | "
        f"{run.dp_world} rank(s) x micro {run.micro} x accumulation {run.gas} = {run.tokens_per_step:,} "
        f"tokens/step | device {run.device} | save-dir {run.save_dir}"
    )
    if a.resume:
        run.say(f"resumed from {run.load_path} at step {run.start_step} (micro-step {run.micro_step})")
    sched = run.ds_config.get("scheduler") or {}
    total = (sched.get("params") or {}).get("total_num_steps")
    if isinstance(total, int) and total < a.steps:
        run.say(
            f"warning: scheduler.params.total_num_steps is {total} but --steps is {a.steps}; "
            f"{sched.get('type')} keeps its final learning rate after step {total}"
        )
    run.metrics = MetricsLog(run.save_dir / METRICS_FILE, run.is_main, run.start_step if a.resume else None)


def save(run: Run, step: int) -> None:
    """A checkpoint ``<save-dir>/step<N>``: DeepSpeed's files, every rank's random states (and
    engine state), the Hugging Face metadata; ``latest`` is published last."""
    import torch

    engine, save_dir = run.engine, run.save_dir
    client_state = {
        "micro_step": run.micro_step,
        "seed": run.data_seed,
        "world_size": run.dp_world,
        "micro_batch_size": run.micro,
        "args": {k: v for k, v in vars(run.args).items() if k != "local_rank"},
    }
    tag = deepspeed_tag(step)
    if run.sam.ascent_every > 1:
        client_state["fsam_engine"] = engine.state_dict()
    # DeepSpeed's own 'latest' is written by rank 0 before the other ranks are known to have
    # finished; here it is published only once every rank's files (and the RNG states and
    # Hugging Face metadata) are complete, so a crash mid-save never leaves it half-written.
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    save_rng_state(save_dir / tag / RNG_FILE.format(rank=run.rank), rng_state())
    if run.sam.ascent_every > 1:
        torch.save(client_state["fsam_engine"], save_dir / tag / ENGINE_FILE.format(rank=run.rank))
    if run.is_main:
        write_hf_meta(
            save_dir / tag / HF_META_DIR, run.model.config, run.tokenizer, getattr(run.model, "generation_config", None)
        )
    if not all_ranks_ok(True, run.device):
        raise RuntimeError("a rank failed while saving")
    if run.is_main:
        publish_latest(save_dir, tag)
    run.say(f"saved checkpoint {save_dir / tag}")


def _log_step(run: Run, step: int, m: Dict[str, Any], log) -> None:
    """Rank 0: the step's record in ``metrics.jsonl`` and, every ``--log-every`` steps, a line."""
    a = run.args
    tokens_per_s = run.tokens_per_step / m["step_time"] if m["step_time"] > 0 else None
    run.metrics.write(
        {
            "step": step,
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "eps_norm": m["eps_norm"],
            "rho": m["rho"],
            "lr": m["lr"],
            "tokens_per_s": tokens_per_s,
            "method": m["method"],
            "skipped": m["skipped"],
            "step_time": m["step_time"],
            **{k: m[k] for k in OPTIONAL_STEP_METRICS + SHARPNESS_METRICS if k in m},
        }
    )
    if step % a.log_every == 0 or step == a.steps:
        log(
            f"step {step}/{a.steps} | {m['method']} | loss {m['loss']:.4f} | "
            f"||g|| {fmt(m['grad_norm'], '.4f')} | ||eps|| {m['eps_norm']:.4f} | lr {m['lr']:.3e} | "
            f"{fmt(tokens_per_s, ',.0f')} tok/s" + (" | skipped (overflow)" if m["skipped"] else "")
        )


@dataclass
class LoopEnd:
    """Where :func:`train_loop` stopped, for :func:`finish`."""

    step: int
    last_eval: Optional[float]
    last_eval_step: int
    last_saved_step: int


def train_loop(run: Run) -> LoopEnd:
    """7. One ``engine.train_batch`` per optimizer step up to ``--steps``, with the log, the
    evaluations and the checkpoints on their schedules."""
    from tqdm.auto import tqdm

    a, engine = run.args, run.engine
    show_bar = run.is_main and not a.no_progress and sys.stderr.isatty()
    bar = tqdm(
        total=a.steps, initial=min(run.start_step, a.steps), disable=not show_bar, unit="step", dynamic_ncols=True
    )
    log = bar.write if show_bar else (lambda s: print(s, flush=True))
    end = LoopEnd(step=run.start_step, last_eval=None, last_eval_step=-1, last_saved_step=-1)
    while end.step < a.steps:
        engine.train_batch(run.train_iter)
        end.step += 1
        run.micro_step += run.gas
        m = engine.last_metrics
        if run.is_main:
            _log_step(run, end.step, m, log)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        if a.eval_every and end.step % a.eval_every == 0:
            end.last_eval, end.last_eval_step = evaluate(engine, run.eval_list, run.dp_group, run.dp_world), end.step
            run.metrics.write({"step": end.step, EVAL_LOSS: end.last_eval})
            if run.is_main:
                log(f"step {end.step}/{a.steps} | eval_loss {end.last_eval:.4f}")
        if a.save_every and end.step % a.save_every == 0:
            save(run, end.step)
            end.last_saved_step = end.step
    bar.close()
    return end


def finish(run: Run, end: LoopEnd) -> None:
    """8. A last evaluation and checkpoint unless the last step already has them."""
    if end.last_eval_step != end.step:
        end.last_eval = evaluate(run.engine, run.eval_list, run.dp_group, run.dp_world)
        run.metrics.write({"step": end.step, EVAL_LOSS: end.last_eval})
    if end.last_saved_step != end.step and end.step > run.start_step:
        save(run, end.step)
    run.say(f"final eval_loss: {end.last_eval:.4f}")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None, *, destroy_process_group: Optional[bool] = None) -> int:
    """``fsam-train``: returns the exit status (0 done, 2 bad input).

    Run as the command (``fsam-train``, ``python -m fsam_ds.train``: ``argv`` None) it destroys
    the process group it started before returning, after a barrier when the run finished (without
    that a rank can die at exit with "terminate called without an active exception" and a
    finished run exit non-zero). An in-process call with an ``argv`` list leaves the group, and
    the engine built on it, to the caller, unless ``destroy_process_group=True``. A group that
    existed before the call is never destroyed."""
    if destroy_process_group is None:
        destroy_process_group = argv is None

    def initialized() -> bool:  # without importing torch where nothing has yet (argument errors stay fast)
        dist = sys.modules.get("torch.distributed")
        return bool(dist is not None and dist.is_available() and dist.is_initialized())

    started_here = not initialized()
    rc = 1
    try:
        rc = _main(argv)
        return rc
    finally:
        if destroy_process_group and started_here and initialized():
            import torch.distributed as dist

            if rc == 0:
                dist.barrier()  # every rank done (rank 0's last save included) before the group goes
            dist.destroy_process_group()


def _main(argv: Optional[List[str]] = None) -> int:
    """The phases in order; a refusal at any of them is one line and exit status 2."""
    from fsam_ds.config import FSAMConfigError

    return run_phases(
        PROG,
        argv,
        parse,
        (set_up, load_data, build, resume, open_data),
        lambda run: finish(run, train_loop(run)),
        refused=(UsageError, FSAMConfigError, ValueError, FileNotFoundError),
    )


def cli() -> None:
    """The ``fsam-train`` command: :func:`main`, then the process ends with its exit status
    (:func:`fsam_ds.runkit.exit_process`: no native teardown that could abort a finished run)."""
    from fsam_ds.runkit import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
