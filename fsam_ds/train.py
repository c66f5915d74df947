"""Train a small causal language model with AdamW, SAM, Functional-SAM or their preconditioned
forms on DeepSpeed: ``python -m fsam_ds.train`` (or ``fsam-train``).

The method is chosen by the DeepSpeed config alone (``optimizer.type``; ready ones are in
``ds_configs/``)::

    # one process
    fsam-train --deepspeed_config ds_configs/functional_sam.json --model 2m --steps 200
    # data parallel on 2 GPUs (or 2 CPU processes with gloo)
    deepspeed --num_gpus 2 --module fsam_ds.train --deepspeed_config ds_configs/sam.json

The script reads top to bottom:

1. parse the arguments and check everything that is cheap to check (config, model name, data
   path, resume folder); a bad input ends with one line ``fsam-train: error: ...`` and exit
   status 2, before any process group, model or data exists;
2. seed, start the process group, read the texts, get the tokenizer, cut the texts into blocks
   of ``--seq-len`` tokens (rank 0 first, so that it alone fills the caches);
3. build the model for the tokenizer's vocabulary and hand it to :func:`fsam_ds.initialize`;
4. optionally resume: weights, optimizer, LR scheduler and step from DeepSpeed's checkpoint, the
   position in the data from the checkpoint's ``client_state``;
5. the loop: one ``engine.train_batch`` per optimizer step; rank 0 logs and appends to
   ``<save-dir>/metrics.jsonl``; evaluation every ``--eval-every`` steps; a checkpoint every
   ``--save-every`` steps; a last evaluation and checkpoint at the end.

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
import ast
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

PROG = "fsam-train"
METRICS_FILE = "metrics.jsonl"
# written to metrics.jsonl on the steps with sharpness diagnostics (optimizer.params.sharpness_every);
# fsam_ds.sharpness.TRAINING_KEYS
# written to metrics.jsonl when the step has them (the SAM types; ascent_every > 1; ascent_direction
# "momentum"): fsam_ds.engine.SHARE_KEYS and the sub-2x modes' flags
STEP_KEYS = ("eps_share_embed", "eps_share_output", "ascent_reused", "ascent_momentum")
SHARPNESS_KEYS = ("tau_logit", "tau_func", "tau_cross", "hvp_sq_norm", "logit_fraction", "curv_hessian",
                  "curv_gn", "lambda_max", "lambda_max_iters", "lambda_max_residual", "sharpness_time")
# inside every checkpoint tag folder: the model's Hugging Face config, generation config and
# tokenizer (no weights), so that fsam-convert can rebuild a Hugging Face folder from the tag alone
HF_META_DIR = "hf"
# default --save-dir is runs/<short name>-<model>; the short names match ds_configs/*.json
SHORT_NAMES = {"AdamW": "adamw", "SAM": "sam", "PreconditionedSAM": "preconditioned_sam",
               "FunctionalSAM": "functional_sam", "PreconditionedFunctionalSAM": "preconditioned_functional_sam"}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad input, reported as one line ``fsam-train: error: ...`` and exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage too; one line is enough
        raise UsageError(f"{message} (see {PROG} --help)")


class _Formatter(argparse.HelpFormatter):
    def _get_help_string(self, action):  # show defaults, but not the empty ones
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train a causal LM with AdamW / SAM / Functional-SAM "
                "(preconditioned or not) on DeepSpeed. The method is optimizer.type in the config.",
                formatter_class=_Formatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", required=True,
                   metavar="PATH", help="DeepSpeed JSON config (see ds_configs/)")
    p.add_argument("--model", default="2m", help="preset name (tiny, 2m, 24m, 42m, 118m, 1.2b) or a local "
                   "Hugging Face model folder")
    p.add_argument("--dataset", default="default", help="'default' (embedded corpus), a local .txt file or "
                   "folder, or a Hugging Face dataset name ('owner/name:config')")
    p.add_argument("--tokenizer", default=None, help="local tokenizer folder or Hugging Face name; default: "
                   "a byte-level BPE trained on the dataset's training texts with the preset's vocabulary size")
    p.add_argument("--seq-len", type=_int_at_least(2), default=128, help="tokens per sequence")
    p.add_argument("--steps", type=_int_at_least(0), default=200, help="optimizer steps in total (a resumed "
                   "run continues up to this step)")
    p.add_argument("--eval-every", type=_int_at_least(0), default=50, help="evaluate every N steps (0: only "
                   "at the end)")
    p.add_argument("--eval-batches", type=_int_at_least(1), default=20, help="evaluation micro-batches per rank")
    p.add_argument("--save-dir", default=None, help="checkpoints and metrics.jsonl (default: runs/<method>-<model>, "
                   "e.g. runs/functional_sam-2m)")
    p.add_argument("--save-every", type=_int_at_least(0), default=0, help="checkpoint every N steps (0: only "
                   "at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    p.add_argument("--seed", type=int, default=1234, help="model initialisation and data order")
    p.add_argument("--log-every", type=_int_at_least(1), default=1, help="print a log line every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # set by the deepspeed launcher; the rank is read from the environment instead
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    return p


def _preset_names() -> List[str]:
    """The preset names of :data:`fsam_ds.models.PRESETS`, read from the module's source so that a
    misspelt name is reported without first importing transformers (about ten seconds)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("fsam_ds.models")
        tree = ast.parse(Path(spec.origin).read_text())
        for node in tree.body:
            if (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "PRESETS"
                    and isinstance(node.value, ast.Dict)):
                return [ast.literal_eval(k) for k in node.value.keys]
    except Exception:  # unusual installs: fall back to the real thing
        pass
    from fsam_ds.models import PRESETS
    return list(PRESETS)


def _looks_like_path(spec: str) -> bool:
    """A dataset/tokenizer argument meant as a local path rather than a Hugging Face name."""
    from fsam_ds.data import _looks_like_path as rule  # the rule fsam_ds.data.load_texts applies
    return rule(spec)


def validate(args: argparse.Namespace) -> Dict[str, Any]:
    """Every check that costs no model, data or process group. Returns the parsed config pieces;
    raises UsageError/FSAMConfigError/ValueError/FileNotFoundError with a one-line message."""
    from fsam_ds.config import parse_config

    ds_config, sam = parse_config(args.deepspeed_config)  # FSAMConfigError naming key and accepted values

    model = args.model
    presets = _preset_names()
    model_path = Path(model).expanduser()
    if model not in presets:
        if not model_path.is_dir():
            raise UsageError(f"--model {model!r} is neither a preset (accepted: {', '.join(presets)}) "
                             "nor a local model folder")
        if not (model_path / "config.json").is_file():
            raise UsageError(f"--model {model!r}: the folder has no config.json (a Hugging Face model folder "
                             f"is expected, or a preset: {', '.join(presets)})")

    model_name = model if model in presets else model_path.resolve().name
    short = SHORT_NAMES.get(sam.method, sam.method.lower())
    save_dir = Path(args.save_dir) if args.save_dir else Path("runs") / f"{short}-{model_name}"
    if args.resume and not (save_dir / "latest").is_file():
        raise UsageError(f"--resume: no checkpoint in {str(save_dir)!r} (DeepSpeed's 'latest' file is "
                         "missing); accepted: a --save-dir written by an earlier run")
    if args.resume:
        tag = (save_dir / "latest").read_text().strip()
        if not tag or not (save_dir / tag).is_dir():
            raise UsageError(f"--resume: {str(save_dir / 'latest')!r} names {tag!r}, which is not a checkpoint "
                             f"folder in {str(save_dir)!r}")
        try:
            check_checkpoint_files(save_dir / tag)
        except ValueError as err:
            raise UsageError(f"--resume: {_one_line(err)}") from None
    if save_dir.exists() and not save_dir.is_dir():
        raise UsageError(f"--save-dir {str(save_dir)!r} exists and is not a folder")

    from fsam_ds.data import EMBEDDED_CORPORA  # the first import of transformers (lazily)
    if (args.dataset not in EMBEDDED_CORPORA and not Path(args.dataset).expanduser().exists()
            and _looks_like_path(args.dataset)):
        raise UsageError(f"--dataset {args.dataset!r}: no such file or folder (accepted: "
                         f"{', '.join(EMBEDDED_CORPORA)}, a local .txt file or folder, or a Hugging Face "
                         "dataset name)")
    dataset_path = Path(args.dataset).expanduser()
    if args.dataset not in EMBEDDED_CORPORA and dataset_path.is_file() and dataset_path.stat().st_size == 0:
        raise UsageError(f"--dataset {args.dataset!r}: the file is empty (accepted: a text file with at least "
                         "one non-blank line)")
    if (args.tokenizer is not None and not Path(args.tokenizer).expanduser().exists()
            and _looks_like_path(args.tokenizer)):
        raise UsageError(f"--tokenizer {args.tokenizer!r}: no such folder (accepted: a local tokenizer "
                         "folder, a Hugging Face tokenizer name, or leave it out to train one)")

    return {"ds_config": ds_config, "sam": sam, "save_dir": save_dir, "is_preset": model in presets,
            "model_name": model_name}


_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def check_checkpoint_files(tag_dir: Path) -> Dict[str, Any]:
    """Raise ValueError (one line) unless ``tag_dir`` holds every file DeepSpeed's
    ``load_checkpoint`` will read, each complete: the model-states file(s) (one, or one per rank at
    ZeRO-3) and, for a ZeRO checkpoint, every data-parallel rank's optimizer-states file, for the
    world size the checkpoint records. The rule tools/convert.py (``fsam-convert``) applies to the
    same folder; a truncated file is one whose zip directory (written last) is missing. Returns
    ``{"world_size", "zero", "partitioned"}``."""
    import zipfile

    import torch

    names = sorted(p.name for p in tag_dir.iterdir())
    model_files = [(n, _MODEL_STATES.match(n)) for n in names if _MODEL_STATES.match(n)]
    optim_files = [(n, _OPTIM_STATES.match(n)) for n in names if _OPTIM_STATES.match(n)]
    if not model_files:
        raise ValueError(f"{tag_dir}: no *_model_states.pt, not a DeepSpeed checkpoint folder")
    partitioned = any(m.group(1) is not None for _, m in model_files)  # ZeRO-3: one model file per rank
    header = tag_dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if partitioned else "mp_rank_00_model_states.pt")
    if not header.is_file():
        raise ValueError(f"{tag_dir}: missing shard file {header.name} (every rank's files are needed)")

    def readable(path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"{path}: truncated or unreadable checkpoint file ({_one_line(err)})") from None

    readable(header)
    try:
        head = torch.load(header, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated or foreign file
        raise ValueError(f"{header}: cannot read it as a DeepSpeed model-states file ({_one_line(err)})") from None
    if not isinstance(head, dict) or "module" not in head:
        raise ValueError(f"{header} is not a DeepSpeed model-states file (no 'module' entry)")
    world = int(head.get("dp_world_size") or 1)
    zero = head.get("param_shapes") is not None  # a ZeRO optimizer wrote partitioned fp32 masters
    del head
    needed = [header.name]
    if zero:
        prefix = "bf16_" if any(n.startswith("bf16_") for n, _ in optim_files) else ""
        needed += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if partitioned:
        needed += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(1, world)]
    missing = sorted((n for n in needed if not (tag_dir / n).is_file()), key=_natural)
    if missing:
        raise ValueError(f"{tag_dir}: missing shard file(s) {', '.join(missing)}; the checkpoint was written by "
                         f"{world} data-parallel rank(s) and needs every rank's files")
    for name in needed[1:]:
        readable(tag_dir / name)
    return {"world_size": world, "zero": zero, "partitioned": partitioned}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


# ---------------------------------------------------------------------------------------------
# Small helpers for the loop
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def cpu_threads_per_rank(local_world_size: int) -> Optional[int]:
    """Several ranks on one CPU each default to a thread per core; oversubscribed OpenMP threads
    make every step tens of times slower. Without OMP_NUM_THREADS, share the cores instead."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def resume_micro_step(micro_step: int, num_items: int, old_layout, new_layout) -> int:
    """The data position of a checkpoint written with ``old_layout = (ranks, micro batch)`` in a
    run with ``new_layout``: the first micro-step of the new layout that reads no block the old
    run already read in its current epoch (epochs shuffle the same way in both layouts)."""
    if tuple(old_layout) == tuple(new_layout):
        return micro_step
    old_steps = max(1, num_items // (old_layout[0] * old_layout[1]))
    new_steps = max(1, num_items // (new_layout[0] * new_layout[1]))
    epoch, k = divmod(micro_step, old_steps)
    per_step = new_layout[0] * new_layout[1]
    k_new = -(-k * old_layout[0] * old_layout[1] // per_step)  # ceil
    if k_new >= new_steps:
        epoch, k_new = epoch + 1, 0
    return epoch * new_steps + k_new


def all_ranks_ok(ok: bool, device) -> bool:
    """True on every rank when ``ok`` is true on every rank (a barrier that also carries failure,
    so that one rank's bad input never leaves the others waiting)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() == 0.0


def evaluate(engine, batches, group, world: int) -> float:
    """Mean eval loss over this rank's batches, then over the data-parallel ranks."""
    import torch
    import torch.distributed as dist

    total = torch.stack([engine.eval_batch(b) for b in batches]).mean().reshape(1).float()
    if world > 1:
        dist.all_reduce(total, group=group)
        total /= world
    return float(total)


class DataError(Exception):
    """Data preparation failed on some rank (the message is set on the rank that failed)."""


def prepare_data(dataset: str, tokenizer_spec: Optional[str], model: str, is_preset: bool, block_len: int):
    """Texts -> tokenizer -> token blocks of ``block_len`` tokens (tokenizer and token ids are
    cached on disk). The tokenizer: ``tokenizer_spec``, else the one a model folder ships, else a
    BPE trained on the training texts with the model's vocabulary size."""
    from fsam_ds import data as fdata
    from fsam_ds import models as fmodels

    try:
        train_texts, eval_texts = fdata.load_texts(dataset)
    except ValueError as err:
        raise ValueError(f"--dataset {dataset!r}: {_one_line(err)}") from None
    if not train_texts:
        raise ValueError(f"--dataset {dataset!r}: no text to train on (the training split is empty or blank)")
    if tokenizer_spec is not None:
        tok_spec = tokenizer_spec
    elif not is_preset and any((Path(model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok_spec = model  # a model folder that ships its tokenizer
    else:
        tok_spec = train_texts
    if is_preset:
        vocab = fmodels.PRESETS[model].vocab_size
    else:
        vocab = json.loads((Path(model) / "config.json").read_text()).get("vocab_size", 32000)
    tokenizer = fdata.get_tokenizer(tok_spec, vocab_size=vocab)
    cache = fdata.cache_root() / "tokens"
    train = fdata.TokenBlocks(train_texts, tokenizer, block_len, cache_dir=cache)
    evals = fdata.TokenBlocks(eval_texts, tokenizer, block_len, cache_dir=cache)
    return tokenizer, train, evals


def prepare_data_in_turn(dataset, tokenizer_spec, model, is_preset, block_len, device):
    """:func:`prepare_data` on every rank: rank 0 fills the caches first, then the first rank of
    every other node (for caches that are not shared), then the rest, who only read them. A
    failure anywhere stops every rank (:class:`DataError`, with the one-line message on the rank
    that failed)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    prepared, error = None, None
    for my_turn in (rank == 0, local_rank == 0, True):
        if my_turn and prepared is None and error is None:
            try:
                prepared = prepare_data(dataset, tokenizer_spec, model, is_preset, block_len)
            except (ValueError, FileNotFoundError) as err:
                error = err
        if not all_ranks_ok(error is None, device):
            raise DataError(_one_line(error) if error is not None else "")
    return prepared


class MetricsLog:
    """``<save-dir>/metrics.jsonl``, written by rank 0 only. A fresh run starts the file anew; a
    resumed run drops the records after the checkpoint's step (they belong to the lost tail of the
    earlier run) and appends."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: Optional[int]):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", math.inf) <= keep_until_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def write_hf_meta(folder: Path, model, tokenizer) -> None:
    """The model's ``config.json``, ``generation_config.json`` and tokenizer files (no weights):
    with the DeepSpeed checkpoint next to them, ``fsam-convert`` rebuilds a Hugging Face folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


RNG_FILE = "rng_state_rank{rank}.pt"
# FSAMEngine.state_dict() of each rank (ascent_every > 1: the reused ascent direction, which under
# ZeRO is this rank's partition); rank 0's is also in DeepSpeed's client_state
ENGINE_FILE = "fsam_engine_rank{rank}.pt"


def rng_state() -> Dict[str, Any]:
    """This process's random states (Python, NumPy, torch CPU and accelerator)."""
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def publish_latest(save_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` atomically (a reader sees the old or the new name, never half)."""
    tmp = save_dir / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, save_dir / "latest")


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


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
    # 1. arguments and cheap checks ------------------------------------------------------------
    from fsam_ds.config import FSAMConfigError

    try:
        args = build_parser().parse_args(argv)
        checked = validate(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, FSAMConfigError, ValueError, FileNotFoundError) as err:
        return _fail(_one_line(err))
    ds_config, sam, save_dir = checked["ds_config"], checked["sam"], checked["save_dir"]

    # 2. process group, seed, data -------------------------------------------------------------
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import fsam_ds
    from fsam_ds import data as fdata
    from fsam_ds import models as fmodels

    fsam_ds.init_distributed(ds_config.get("communication_backend"))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    accel.set_device(local_rank)
    device = accel.device_name(local_rank)
    if device == "cpu":
        threads = cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if threads is not None:
            torch.set_num_threads(threads)
    is_main = rank == 0

    def say(*parts):
        if is_main:
            print(*parts, flush=True)

    seed_everything(args.seed)
    if is_main:
        save_dir.mkdir(parents=True, exist_ok=True)

    try:
        tokenizer, train_set, eval_set = prepare_data_in_turn(
            args.dataset, args.tokenizer, args.model, checked["is_preset"], args.seq_len, device)
    except DataError as err:
        return _fail(str(err)) if str(err) else 2

    # 3. model and engine ----------------------------------------------------------------------
    try:
        if checked["is_preset"]:
            max_pos = max(args.seq_len, fmodels.PRESETS[args.model].max_position_embeddings)
        else:
            max_pos = args.seq_len
        from fsam_ds.config import parse_config, zero_stage

        ds_cfg, _ = parse_config(args.deepspeed_config)
        zero3 = ds_cfg if zero_stage(ds_cfg) == 3 else None  # built partitioned (deepspeed.zero.Init)
        model = fmodels.build_model(args.model, vocab_size=len(tokenizer), max_seq_len=max_pos,
                                    zero3_config=zero3)
    except ValueError as err:
        return _fail(_one_line(err))
    n_params = fmodels.count_parameters(model)

    # the config as written (parse_config's ds_config has the SAM keys taken out for DeepSpeed)
    engine, _, _, _ = fsam_ds.initialize(model=model, config=args.deepspeed_config)
    micro = engine.train_micro_batch_size_per_gpu()
    gas = engine.gradient_accumulation_steps()
    dp_world = engine.dp_world_size
    dp_group = engine.data_parallel_group
    dp_rank = dist.get_rank(group=dp_group) if dp_world > 1 else 0
    tokens_per_step = dp_world * micro * gas * args.seq_len

    # 4. resume --------------------------------------------------------------------------------
    start_step, micro_step, data_seed = 0, 0, args.seed
    if args.resume:
        load_path, client_state = engine.load_checkpoint(str(save_dir))
        if load_path is None:
            return _fail(f"--resume: could not load a checkpoint from {str(save_dir)!r}")
        client_state = client_state or {}
        start_step = int(engine.global_steps)
        micro_step = int(client_state.get("micro_step", start_step * gas))
        data_seed = int(client_state.get("seed", args.seed))
        old_layout = (int(client_state.get("world_size", dp_world)), int(client_state.get("micro_batch_size", micro)))
        if old_layout != (dp_world, micro):
            micro_step = resume_micro_step(micro_step, len(train_set), old_layout, (dp_world, micro))
            say(f"note: the checkpoint was written by {old_layout[0]} rank(s) x micro {old_layout[1]}; "
                f"the data continues at micro-step {micro_step} of this layout")
        if data_seed != args.seed:
            say(f"note: keeping the checkpoint's data order (seed {data_seed}); --seed {args.seed} is ignored")
        rng_file = save_dir / (save_dir / "latest").read_text().strip() / RNG_FILE.format(rank=rank)
        if rng_file.is_file():  # the random state this rank had when it saved (dropout masks continue)
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            say(f"note: no saved random state for rank {rank}; random streams restart from --seed")
        if sam.ascent_every > 1:
            engine_file = rng_file.parent / ENGINE_FILE.format(rank=rank)
            state = (torch.load(engine_file, weights_only=False) if engine_file.is_file()
                     else client_state.get("fsam_engine"))
            try:
                engine.load_state_dict(state or {})
            except ValueError as err:
                say(f"note: {err}")

    try:
        train_iter = fdata.micro_batches(train_set, micro, dp_rank, dp_world, seed=data_seed,
                                         start_micro_step=micro_step)
        eval_list = fdata.eval_batches(eval_set, micro, dp_rank, dp_world, max_batches=args.eval_batches)
    except ValueError as err:
        return _fail(f"--dataset {args.dataset!r} with --seq-len {args.seq_len}: {_one_line(err)}")

    say(f"{sam.method} | model {args.model}: {n_params:,} parameters, vocab {len(tokenizer)} | "
        f"data {args.dataset}: {len(train_set):,} train / {len(eval_set):,} eval blocks of {args.seq_len} | "
        f"{dp_world} rank(s) x micro {micro} x accumulation {gas} = {tokens_per_step:,} tokens/step | "
        f"device {device} | save-dir {save_dir}")
    if args.resume:
        say(f"resumed from {load_path} at step {start_step} (micro-step {micro_step})")
    sched = ds_config.get("scheduler") or {}
    total = (sched.get("params") or {}).get("total_num_steps")
    if isinstance(total, int) and total < args.steps:
        say(f"warning: scheduler.params.total_num_steps is {total} but --steps is {args.steps}; "
            f"{sched.get('type')} keeps its final learning rate after step {total}")

    metrics = MetricsLog(save_dir / METRICS_FILE, is_main, start_step if args.resume else None)

    def save(step: int) -> None:
        client_state = {"micro_step": micro_step, "seed": data_seed, "world_size": dp_world,
                        "micro_batch_size": micro, "args": {k: v for k, v in vars(args).items()
                                                             if k != "local_rank"}}
        tag = f"step{step}"
        if sam.ascent_every > 1:
            client_state["fsam_engine"] = engine.state_dict()
        # DeepSpeed's own 'latest' is written by rank 0 before the other ranks are known to have
        # finished; here it is published only once every rank's files (and the RNG states and
        # Hugging Face metadata) are complete, so a crash mid-save never leaves it half-written.
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), save_dir / tag / RNG_FILE.format(rank=rank))
        if sam.ascent_every > 1:
            torch.save(client_state["fsam_engine"], save_dir / tag / ENGINE_FILE.format(rank=rank))
        if is_main:
            write_hf_meta(save_dir / tag / HF_META_DIR, model, tokenizer)
        if not all_ranks_ok(True, device):
            raise RuntimeError("a rank failed while saving")
        if is_main:
            publish_latest(save_dir, tag)
        say(f"saved checkpoint {save_dir / tag}")

    # 5. the loop ------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    show_bar = is_main and not args.no_progress and sys.stderr.isatty()
    bar = tqdm(total=args.steps, initial=min(start_step, args.steps), disable=not show_bar, unit="step",
               dynamic_ncols=True)
    log = bar.write if show_bar else (lambda s: print(s, flush=True))
    last_eval: Optional[float] = None
    last_eval_step = last_saved_step = -1
    step = start_step
    while step < args.steps:
        engine.train_batch(train_iter)
        step += 1
        micro_step += gas
        m = engine.last_metrics
        tokens_per_s = tokens_per_step / m["step_time"] if m["step_time"] > 0 else None
        if is_main:
            metrics.write({"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "eps_norm": m["eps_norm"],
                           "rho": m["rho"], "lr": m["lr"], "tokens_per_s": tokens_per_s, "method": m["method"],
                           "skipped": m["skipped"], "step_time": m["step_time"],
                           **{k: m[k] for k in STEP_KEYS + SHARPNESS_KEYS if k in m}})
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
            if step % args.log_every == 0 or step == args.steps:
                log(f"step {step}/{args.steps} | {m['method']} | loss {m['loss']:.4f} | "
                    f"||g|| {_fmt(m['grad_norm'], '.4f')} | ||eps|| {m['eps_norm']:.4f} | lr {m['lr']:.3e} | "
                    f"{_fmt(tokens_per_s, ',.0f')} tok/s" + (" | skipped (overflow)" if m["skipped"] else ""))
        if args.eval_every and step % args.eval_every == 0:
            last_eval, last_eval_step = evaluate(engine, eval_list, dp_group, dp_world), step
            metrics.write({"step": step, "eval_loss": last_eval})
            if is_main:
                log(f"step {step}/{args.steps} | eval_loss {last_eval:.4f}")
        if args.save_every and step % args.save_every == 0:
            save(step)
            last_saved_step = step
    bar.close()

    # the end: a last evaluation and checkpoint unless this step already has them
    if last_eval_step != step:
        last_eval = evaluate(engine, eval_list, dp_group, dp_world)
        metrics.write({"step": step, "eval_loss": last_eval})
    if last_saved_step != step and step > start_step:
        save(step)
    say(f"final eval_loss: {last_eval:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
