"""What both trainers (``fsam-train`` on DeepSpeed, ``fsam-megatron-train`` on megatron-core) use
around their loops:

* the command line: :class:`UsageError`, the one-line error (:func:`one_line`, :func:`fail`),
  :class:`Parser` and :class:`Formatter` (argparse, one line per error, defaults in ``--help``),
  :func:`int_at_least`, :func:`preset_names`;
* the data: :func:`prepare_data` and :func:`prepare_data_in_turn` (rank 0 fills the caches
  first), :class:`DataError`, :func:`resume_micro_step`;
* the run's files: :class:`MetricsLog` (``metrics.jsonl``), the random states of a rank
  (:func:`rng_state`, :func:`set_rng_state`, :func:`save_rng_state`, :func:`load_rng_state`),
  :func:`publish_latest` (the atomic ``latest`` file), :func:`write_hf_meta`;
* the phases: :class:`RunBase` (what they hand each other) and :func:`run_phases` (``main()``);
* :func:`seed_everything`, :func:`cpu_threads_per_rank`, :func:`all_ranks_ok`.

Nothing heavy is imported at module level: a bad argument is reported before torch or
transformers load.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, TypeVar

from .names import LATEST, TMP_SUFFIX

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad input, reported as one line ``<prog>: error: ...`` and exit status 2."""


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def fail(prog: str, message: str) -> int:
    """Print ``<prog>: error: <message>`` to stderr; returns the exit status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one :class:`UsageError` line instead of the usage and an exit."""

    def error(self, message):  # argparse would print the usage too; one line is enough
        raise UsageError(f"{message} (see {self.prog} --help)")


class Formatter(argparse.HelpFormatter):
    """Shows each option's default in ``--help``, but not the empty ones."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

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


def preset_names() -> List[str]:
    """The preset names of :data:`fsam_ds.models.PRESETS`, read from the module's source so that a
    misspelt name is reported without first importing transformers (about ten seconds)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("fsam_ds.models")
        if spec is not None and spec.origin is not None:
            tree = ast.parse(Path(spec.origin).read_text())
            for node in tree.body:
                if (
                    isinstance(node, ast.AnnAssign)
                    and getattr(node.target, "id", None) == "PRESETS"
                    and isinstance(node.value, ast.Dict)
                ):
                    return [ast.literal_eval(k) for k in node.value.keys if k is not None]
    except Exception:  # unusual installs: fall back to the real thing
        pass
    from fsam_ds.models import PRESETS

    return list(PRESETS)


def fmt(x: Optional[float], spec: str) -> str:
    """``format(x, spec)``, or ``n/a`` for None."""
    return "n/a" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------
# The phases
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunBase:
    """What both trainers' phases hand each other: the checked inputs first, then what each phase
    adds (each trainer's ``Run`` adds its own fields)."""

    args: argparse.Namespace
    sam: Any  # fsam_ds.config.SAMConfig
    save_dir: Path
    is_preset: bool
    # set_up
    rank: int = 0
    dp_rank: int = 0
    device: Any = None
    # load_data
    tokenizer: Any = None
    train_set: Any = None
    eval_set: Any = None
    # build
    model: Any = None
    n_params: int = 0
    # resume (the data position advances with the loop)
    micro_step: int = 0
    data_seed: int = 0
    # open_data (Any: set before the loop reads them)
    train_iter: Any = None  # Iterator of micro-batches
    eval_list: Any = None  # List of evaluation micro-batches
    metrics: Any = None  # MetricsLog


R = TypeVar("R", bound=RunBase)


def run_phases(
    prog: str,
    argv: Optional[List[str]],
    parse: Callable[[Optional[List[str]]], R],
    before_loop: Sequence[Callable[[R], None]],
    loop: Callable[[R], None],
    refused: Tuple[Type[BaseException], ...],
) -> int:
    """A trainer's phases in order: ``parse(argv)``, each of ``before_loop``, then ``loop``; returns
    the exit status. ``--help`` exits 0; a ``refused`` error of parse, or a :class:`UsageError` or
    :class:`DataError` of a phase before the loop, is one line ``<prog>: error: ...`` and exit
    status 2 (a :class:`DataError` without a message: the failing rank has said it, the others exit
    quietly)."""
    try:
        run = parse(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except refused as err:
        return fail(prog, one_line(err))
    try:
        for phase in before_loop:
            phase(run)
    except DataError as err:  # the failing rank has the message; the others exit quietly
        return fail(prog, str(err)) if str(err) else 2
    except UsageError as err:  # already one line
        return fail(prog, str(err))
    loop(run)
    return 0


# ---------------------------------------------------------------------------------------------
# Process and ranks
# ---------------------------------------------------------------------------------------------


def exit_process(rc: int) -> None:
    """End a finished trainer process with exit status ``rc``: Python's exit handlers run (logging,
    monitors), the standard streams are flushed, then the process ends without the interpreter's
    teardown of the frameworks' native threads. With that teardown, 2 in 25 finished 2-rank CPU
    launches (``tools/exit_soak.py``) lost a rank at exit to "terminate called without an active
    exception" (SIGABRT) after the run had saved, and the launcher exited non-zero."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(rc))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_threads_per_rank(local_world_size: int) -> Optional[int]:
    """Several ranks on one CPU each default to a thread per core; oversubscribed OpenMP threads
    make every step tens of times slower. Without OMP_NUM_THREADS, share the cores instead."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


def all_ranks_ok(ok: bool, device) -> bool:
    """True on every rank when ``ok`` is true on every rank (a barrier that also carries failure,
    so that one rank's bad input never leaves the others waiting)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag)
    return flag.item() == 0.0


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


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
        raise ValueError(f"--dataset {dataset!r}: {one_line(err)}") from None
    if not train_texts:
        raise ValueError(f"--dataset {dataset!r}: no text to train on (the training split is empty or blank)")
    tok_spec: Any
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
            raise DataError(one_line(error) if error is not None else "")
    return prepared


def open_batches(run: RunBase, micro: int, dp_world: int, eval_batches: int) -> None:
    """This data-parallel rank's training micro-batches from the run's data position
    (``run.train_iter``) and its evaluation batches (``run.eval_list``); a data set too small for
    the setting is one :class:`UsageError` line."""
    from fsam_ds import data as fdata

    a = run.args
    try:
        run.train_iter = fdata.micro_batches(
            run.train_set, micro, run.dp_rank, dp_world, seed=run.data_seed, start_micro_step=run.micro_step
        )
        run.eval_list = fdata.eval_batches(run.eval_set, micro, run.dp_rank, dp_world, max_batches=eval_batches)
    except ValueError as err:
        raise UsageError(f"--dataset {a.dataset!r} with --seq-len {a.seq_len}: {one_line(err)}") from None


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


# ---------------------------------------------------------------------------------------------
# The run's files
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """``<save-dir>/metrics.jsonl``, written by one rank only. A fresh run starts the file anew; a
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
    """Restore what :func:`rng_state` returned."""
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng_state(path: Path, state: Optional[Dict[str, Any]] = None) -> None:
    """Write ``state`` (default: this process's :func:`rng_state`) to ``path``."""
    import torch

    torch.save(rng_state() if state is None else state, path)


def load_rng_state(path: Path) -> bool:
    """Restore the random states saved in ``path``; False (nothing changed) when there is no such file."""
    import torch

    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True


def publish_latest(save_dir: Path, text: str, name: str = LATEST) -> None:
    """Write ``text`` to ``save_dir/name`` atomically (a reader sees the old or the new content,
    never half): written to ``name.tmp``, then renamed over it."""
    tmp = save_dir / (name + TMP_SUFFIX)
    tmp.write_text(text)
    os.replace(tmp, save_dir / name)


def write_hf_meta(folder: Path, config, tokenizer, generation_config=None) -> None:
    """The model's ``config.json``, ``generation_config.json`` and tokenizer files (no weights):
    with the checkpoint next to them, ``fsam-convert`` rebuilds a Hugging Face folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
