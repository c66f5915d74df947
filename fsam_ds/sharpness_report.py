"""Sharpness and calibration of a saved model: ``fsam-sharpness PATH`` (or
``python -m fsam_ds.sharpness_report PATH``).

``PATH`` is one of

* an ``fsam-train`` save folder (holds DeepSpeed's ``latest`` file; ``--tag`` picks another tag),
* one checkpoint tag folder (``<save-dir>/step200``),
* a Hugging Face model folder (``config.json`` and weights).

For a DeepSpeed checkpoint the weights come from ``mp_rank_00_model_states.pt`` (ZeRO 0-2) or
are consolidated from the ZeRO-3 partitions; the model preset, sequence length and dataset from
the checkpoint's ``client_state`` (written by ``fsam-train``); the tokenizer from the tag's ``hf/``
folder when present, else the same cached BPE ``fsam-train`` trained.

It prints (and with ``--json FILE`` writes) one JSON object::

    {"path", "tag", "model", "dataset", "batch": {"rows", "seq_len", "source"},
     "terms": {tau_logit, tau_func, tau_cross, hvp_sq_norm, logit_fraction, ...},
     "lambda_max_hessian": {value, iterations, residual, converged, ...},
     "lambda_max_gauss_newton": {...},
     "calibration": {ece, mean_max_prob, mean_entropy, accuracy, nll, n_tokens}}

The sharpness terms and eigenvalues use one fixed batch (``--batch-rows`` blocks, the first of the
training split in dataset order, or of the held-out split with ``--batch-split eval``); the
calibration uses ``--eval-batches`` held-out batches of ``--micro-batch`` blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .names import HF_META_DIR, LATEST
from .runkit import fail

PROG = "fsam-sharpness"


def _fail(message: object) -> int:
    return fail(PROG, " ".join(str(message).split()))


def _resolve(path: Path, tag: Optional[str]) -> tuple:
    """(kind, folder): kind 'hf' (a model folder) or 'ds' (a checkpoint tag folder)."""
    if (path / "config.json").is_file() and not (path / LATEST).is_file():
        return "hf", path
    if (path / LATEST).is_file() or tag:
        tag = tag or (path / LATEST).read_text().strip()
        folder = path / tag
        if not folder.is_dir():
            raise FileNotFoundError(f"--tag {tag!r}: no folder {str(folder)!r}")
        return "ds", folder
    if any(path.glob("*model_states.pt")):
        return "ds", path
    raise FileNotFoundError(
        f"{str(path)!r} is neither an fsam-train save folder (with 'latest'), a checkpoint tag "
        "folder (with *model_states.pt) nor a Hugging Face model folder (with config.json)"
    )


def _ds_state(folder: Path) -> tuple:
    """(state dict of full fp32 weights, client state) of a DeepSpeed checkpoint tag folder."""
    import torch

    files = sorted(folder.glob("mp_rank_*_model_states.pt")) or sorted(folder.glob("zero_pp_rank_0_*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{str(folder)!r} has no DeepSpeed model states file")
    ck = torch.load(files[0], map_location="cpu", weights_only=False)
    module = ck.get("module") or {}
    shapes = {}
    for group in ck.get("param_shapes") or []:
        shapes.update(group)
    full = bool(module) and all(k in module and tuple(module[k].shape) == tuple(s) for k, s in shapes.items())
    if not full:  # ZeRO-3: the module states hold placeholders; consolidate the partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    client = {k: v for k, v in ck.items() if k in ("args", "seed", "micro_step", "micro_batch_size", "world_size")}
    return {k: v.float() for k, v in module.items()}, client


def load_model(path, tag: Optional[str] = None) -> Dict[str, Any]:
    """``{"model", "args", "tag", "folder", "kind"}``: the model (float32, eval mode, CPU) of a
    save folder, checkpoint tag folder or Hugging Face folder, and the ``fsam-train`` arguments
    stored with a checkpoint (empty for a Hugging Face folder)."""
    from fsam_ds import models as fmodels

    path = Path(path).expanduser()
    kind, folder = _resolve(path, tag)
    if kind == "hf":
        model = fmodels.build_model(str(folder))
        model.eval()
        return {"model": model, "args": {}, "tag": None, "folder": folder, "kind": kind}
    state, client = _ds_state(folder)
    args = dict(client.get("args") or {})
    hf = folder / HF_META_DIR
    vocab = next(v.shape[0] for k, v in state.items() if k.endswith("embed_tokens.weight"))
    if (hf / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(hf), local_files_only=True)
        config._attn_implementation = fmodels.DEFAULT_ATTN_IMPLEMENTATION
        model = AutoModelForCausalLM.from_config(config)
    else:
        preset = args.get("model")
        if preset not in fmodels.PRESETS:
            raise ValueError(
                f"checkpoint {str(folder)!r}: its model {preset!r} is not a preset and the tag has no "
                "hf/config.json; accepted: checkpoints written by fsam-train"
            )
        seq = int(args.get("seq_len", 128))
        model = fmodels.build_model(
            preset, vocab_size=vocab, max_seq_len=max(seq, fmodels.PRESETS[preset].max_position_embeddings)
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(folder)!r} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.float().eval()
    return {"model": model, "args": args, "tag": folder.name, "folder": folder, "kind": kind}


def load_data(loaded: Dict[str, Any], dataset: Optional[str] = None, seq_len: Optional[int] = None):
    """(train blocks, eval blocks) of the run's dataset (or ``dataset``) with its tokenizer."""
    from fsam_ds import data as fdata

    args = loaded["args"]
    spec = dataset or args.get("dataset") or "default"
    seq = int(seq_len or args.get("seq_len") or 128)
    train_texts, eval_texts = fdata.load_texts(spec)
    folder = loaded["folder"]
    if (folder / HF_META_DIR / "tokenizer.json").is_file():
        tok = fdata.get_tokenizer(str(folder / HF_META_DIR), vocab_size=0)
    elif loaded["kind"] == "hf" and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tok = fdata.get_tokenizer(str(folder), vocab_size=0)
    elif args.get("tokenizer"):
        tok = fdata.get_tokenizer(args["tokenizer"], vocab_size=0)
    else:
        vocab = loaded["model"].get_input_embeddings().weight.shape[0]
        tok = fdata.get_tokenizer(train_texts, vocab_size=vocab)
    cache = fdata.cache_root() / "tokens"
    return (
        fdata.TokenBlocks(train_texts, tok, seq, cache_dir=cache),
        fdata.TokenBlocks(eval_texts, tok, seq, cache_dir=cache),
    )


def report(model, sharp_batch, eval_list: List[dict], iters: int = 20, tol: float = 1e-3) -> Dict[str, Any]:
    """The diagnostics of ``model``: terms and both lambda_max on ``sharp_batch``, calibration
    over ``eval_list``."""
    from fsam_ds.sharpness import Problem, lambda_max, model_calibration, sharpness_terms

    pb = Problem(model, sharp_batch)
    out: Dict[str, Any] = {"terms": sharpness_terms(model, sharp_batch, problem=pb)}
    for matrix in ("hessian", "gauss_newton"):
        out[f"lambda_max_{matrix}"] = lambda_max(
            model, sharp_batch, matrix=matrix, iters=iters, tol=tol, problem=pb
        ).as_dict()
    out["calibration"] = model_calibration(model, eval_list)
    return out


def analyse(
    path,
    tag: Optional[str] = None,
    dataset: Optional[str] = None,
    batch_rows: int = 8,
    batch_split: str = "train",
    micro_batch: int = 8,
    eval_batches: int = 20,
    iters: int = 20,
    tol: float = 1e-3,
) -> Dict[str, Any]:
    """Everything ``fsam-sharpness`` prints, as a dict."""
    import torch

    from fsam_ds import data as fdata

    loaded = load_model(path, tag)
    train, evals = load_data(loaded, dataset)
    blocks = train if batch_split == "train" else evals
    rows = min(batch_rows, len(blocks))
    batch = {"input_ids": torch.stack([blocks[i]["input_ids"] for i in range(rows)])}
    eval_list = fdata.eval_batches(evals, micro_batch, max_batches=eval_batches)
    out = {
        "path": str(path),
        "tag": loaded["tag"],
        "model": loaded["args"].get("model", str(loaded["folder"])),
        "dataset": dataset or loaded["args"].get("dataset"),
        "batch": {"rows": rows, "seq_len": blocks.seq_len, "source": f"first {rows} {batch_split} blocks"},
    }
    out.update(report(loaded["model"], batch, eval_list, iters=iters, tol=tol))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Sharpness (tau terms, lambda_max of the Hessian and of the "
        "Gauss-Newton matrix) and calibration of a saved model",
    )
    p.add_argument("path", help="fsam-train save folder, checkpoint tag folder, or Hugging Face model folder")
    p.add_argument("--tag", default=None, help="checkpoint tag inside a save folder (default: 'latest')")
    p.add_argument("--dataset", default=None, help="texts (default: the run's --dataset)")
    p.add_argument("--batch-rows", type=int, default=8, help="blocks in the sharpness batch (default 8)")
    p.add_argument("--batch-split", choices=("train", "eval"), default="train")
    p.add_argument("--micro-batch", type=int, default=8, help="blocks per calibration batch (default 8)")
    p.add_argument("--eval-batches", type=int, default=20, help="calibration batches (default 20)")
    p.add_argument("--iters", type=int, default=20, help="Lanczos products per lambda_max (default 20)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative residual to stop at (default 1e-3)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for key in ("batch_rows", "micro_batch", "eval_batches", "iters"):
        if getattr(args, key) < 1:
            return _fail(f"--{key.replace('_', '-')} must be an integer >= 1, got {getattr(args, key)}")
    try:
        out = analyse(
            args.path,
            args.tag,
            args.dataset,
            args.batch_rows,
            args.batch_split,
            args.micro_batch,
            args.eval_batches,
            args.iters,
            args.tol,
        )
    except (FileNotFoundError, ValueError) as err:
        return _fail(err)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
