"""``fsam-convert``: a training checkpoint to a Hugging Face model folder.

::

    fsam-convert runs/preconditioned_functional_sam-2m hf/my-model               # tag from 'latest'
    fsam-convert runs/x hf/x --tag step100 --dtype bf16 --max-shard-size 2GB
    fsam-convert runs/mcore-preconditionedfunctionalsam-2m hf/my-model            # megatron-core, any TP x PP

The output folder holds what ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read: ``config.json``, ``generation_config.json``, safetensors
weights (``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json`` above ``--max-shard-size``) and the tokenizer files.

How it works: a *source reader* turns a checkpoint into one full state dict in Hugging Face
naming plus the model's Hugging Face config (and, where known, its tokenizer and generation
config); :func:`export_hf` then checks the weights against the config and the tokenizer, casts
them to ``--dtype``, and writes the folder with ``save_pretrained`` (which shards the weights and
stores tied embeddings once).

Sources
-------
``deepspeed`` (:class:`DeepSpeedSource`): a folder written by ``engine.save_checkpoint`` (for
example by ``fsam-train``) at any data-parallel world size and ZeRO stage 0-3: the save folder
(with DeepSpeed's ``latest`` file and tag folders such as ``step200``; ``--tag`` picks another
tag) or one tag folder. ZeRO 1-3 weights are the fp32 master weights consolidated by DeepSpeed's
own ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``; ZeRO stage 0
checkpoints hold the whole model in ``mp_rank_00_model_states.pt`` (``module``), in the
training dtype (with bf16/fp16 at stage 0 these are the low-precision weights the model ran
with). ``fsam-train`` writes the model's config, generation config and tokenizer into
``<tag>/hf/`` of every checkpoint; for checkpoints written by other scripts pass ``--config``
(and ``--tokenizer``).

``megatron`` (:class:`MegatronSource`): a folder written by ``fsam-megatron-train`` (megatron-core
``dist_checkpointing``, ``torch_dist`` format) at any TP x PP x DP: the save folder (with
``latest_checkpointed_iteration.txt`` and ``iter_NNNNNNN`` folders; ``--tag iter_0000100`` or
``--tag 100`` picks another) or one ``iter_NNNNNNN`` folder. It is read in this one process:
megatron-core reshards on load, so the reader builds the TP=1 x PP=1 ``GPTModel`` of the saved
Hugging Face config (``iter_NNNNNNN/hf/``, or ``--config``; a 1-rank gloo group and megatron's
model-parallel state are set up for the read where none exist, and taken down after), loads only
the model's part of the checkpoint into it (optimizer state is left on disk), and maps its
weights with :func:`megatron_patches.layout.megatron_to_hf` (fused QKV per query group, ``[gate;
up]`` SwiGLU). bf16 checkpoints are read in bf16 and exported in ``--dtype``. Before anything is
loaded, the checkpoint's index (``.metadata``) names the ``.distcp`` files holding model weights
(every one must exist) and the stored shapes, checked against the config.

Adding a source
---------------
Write a class with

``name: str``
    the value of ``--source`` that selects it;
``accepts: str``
    a short description of the folders it reads (used in error messages);
``detect(path: Path) -> bool``
    cheap (file names only, no tensor loads): whether ``path`` looks like its checkpoint;
``read(path: Path, tag: Optional[str]) -> SourceCheckpoint``
    the full, unsharded weights of the checkpoint at ``tag`` (``None``: the latest one). A
    reader that needs the architecture to read the weights (as the Megatron one does) also takes
    ``config=``: the ``--config`` the user passed, already loaded, or ``None``.

and append an instance to :data:`SOURCES`. ``read`` returns a :class:`SourceCheckpoint` whose
``state_dict`` maps Hugging Face parameter names of the architecture in ``config`` (for Llama:
``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.{input,post_attention}_layernorm.weight``,
``model.norm.weight``, ``lm_head.weight``) to full tensors of any floating dtype (the
exporter casts); with tied embeddings ``lm_head.weight`` may be left out. Every problem it finds
(wrong folder, missing shard files, a layout it cannot read) is raised as
:class:`ConvertError` with a one-line message naming the problem and what is accepted. Shape,
key, vocabulary and tokenizer checks are done once, by :func:`export_hf`, for every source.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

from . import names
from .runkit import one_line

PROG = "fsam-convert"
DTYPES = ("fp32", "bf16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
HF_META_DIR = names.HF_META_DIR  # config, generation config and tokenizer in every checkpoint folder
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ConvertError(Exception):
    """A bad input, reported as one line ``fsam-convert: error: ...`` and exit status 2."""


@dataclass
class SourceCheckpoint:
    """What a source reader hands to :func:`export_hf`.

    ``state_dict``: full tensors in Hugging Face naming for ``config``'s architecture.
    ``config``: a ``transformers.PretrainedConfig``, or ``None`` if the checkpoint carries none
    (then ``--config`` is required). ``tokenizer_dir`` / ``generation_config_dir``: folders for
    ``AutoTokenizer`` / ``GenerationConfig.from_pretrained``, or ``None``. ``info``: facts about
    the source for the report (format, tag, world size, ...).
    """

    state_dict: Dict[str, Any]
    config: Any = None
    tokenizer_dir: Optional[Path] = None
    generation_config_dir: Optional[Path] = None
    info: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------

_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _has_model_states(folder: Path) -> bool:
    try:
        return any(_MODEL_STATES.match(p.name) for p in folder.iterdir())
    except OSError:
        return False


@dataclass
class DeepSpeedTag:
    """The files of a DeepSpeed tag folder, as :func:`check_deepspeed_tag` found them complete."""

    header: Path  # rank 0's model-states file
    head: Dict[str, Any]  # its contents (memory-mapped tensors)
    world_size: int  # the data-parallel ranks that wrote the checkpoint
    zero: bool  # a ZeRO optimizer wrote partitioned fp32 masters (one optimizer-states file per rank)
    partitioned: bool  # ZeRO-3: one model-states file per rank
    model_files: List[Tuple[str, "re.Match[str]"]] = field(default_factory=list)
    optim_files: List[Tuple[str, "re.Match[str]"]] = field(default_factory=list)


def check_deepspeed_tag(tag_dir: Path, error: Type[Exception] = ValueError) -> DeepSpeedTag:
    """Raise ``error`` (one line) unless ``tag_dir`` holds every file DeepSpeed's ``load_checkpoint``
    reads, each complete: the model-states file(s) (one, or one per rank at ZeRO-3) and, for a ZeRO
    checkpoint, every data-parallel rank's optimizer-states file, for the world size the checkpoint
    records. A truncated file is one whose zip directory (written last) is missing. The one rule of
    ``fsam-train --resume`` and ``fsam-convert``."""
    import zipfile

    import torch

    files = sorted(p.name for p in tag_dir.iterdir())
    model_files = [(n, m) for n in files if (m := _MODEL_STATES.match(n))]
    optim_files = [(n, m) for n in files if (m := _OPTIM_STATES.match(n))]
    if not model_files:
        raise error(f"{tag_dir}: no *_model_states.pt, not a DeepSpeed checkpoint folder")
    partitioned = any(m.group(1) is not None for _, m in model_files)  # ZeRO-3: one model file per rank
    header = tag_dir / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if partitioned else "mp_rank_00_model_states.pt")
    if not header.is_file():
        raise error(f"{tag_dir}: missing shard file {header.name} (every rank's files are needed)")

    def readable(path: Path) -> None:
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise error(f"{path}: truncated or unreadable checkpoint file ({one_line(err)})") from None

    readable(header)
    try:
        head = torch.load(header, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated or foreign file
        raise error(f"{header}: cannot read it as a DeepSpeed model-states file ({one_line(err)})") from None
    if not isinstance(head, dict) or "module" not in head:
        raise error(f"{header} is not a DeepSpeed model-states file (no 'module' entry)")
    world = int(head.get("dp_world_size") or 1)
    zero = head.get("param_shapes") is not None  # a ZeRO optimizer wrote partitioned fp32 masters
    needed = [header.name]
    if zero:
        prefix = "bf16_" if any(n.startswith("bf16_") for n, _ in optim_files) else ""
        needed += [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    if partitioned:
        needed += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(1, world)]
    missing = sorted((n for n in needed if not (tag_dir / n).is_file()), key=_natural)
    if missing:
        raise error(
            f"{tag_dir}: missing shard file(s) {', '.join(missing)}; the checkpoint was written by "
            f"{world} data-parallel rank(s) and needs every rank's files"
        )
    for name in needed[1:]:
        readable(tag_dir / name)
    return DeepSpeedTag(header, head, world, zero, partitioned, model_files, optim_files)


class DeepSpeedSource:
    name = "deepspeed"
    accepts = (
        "a DeepSpeed checkpoint folder written by engine.save_checkpoint / fsam-train (the save folder with "
        "its 'latest' file and tag folders, or one tag folder holding *_model_states.pt)"
    )

    def detect(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        if (path / names.LATEST).is_file() or _has_model_states(path):
            return True
        return any(d.is_dir() and _has_model_states(d) for d in path.iterdir())

    # -- where ---------------------------------------------------------------------------------
    def locate(self, path: Path, tag: Optional[str]):
        """(save folder, tag) of the checkpoint to read."""
        if _has_model_states(path):  # a tag folder itself
            if tag is not None and tag != path.name:
                raise ConvertError(
                    f"{path} is already the tag folder {path.name!r}; --tag {tag!r} does not apply "
                    "(pass the save folder above it to choose a tag)"
                )
            return path.parent, path.name
        tags = sorted((d.name for d in path.iterdir() if d.is_dir() and _has_model_states(d)), key=_natural)
        available = f"available tags: {', '.join(tags)}" if tags else "the folder holds no tag folders"
        if tag is None:
            latest = path / names.LATEST
            if latest.is_file():
                tag = latest.read_text().strip()
                if not (path / tag).is_dir():
                    raise ConvertError(
                        f"{path}: 'latest' names tag {tag!r}, which is missing ({available}); choose one with --tag"
                    )
            elif len(tags) == 1:
                tag = tags[0]
            elif tags:
                raise ConvertError(f"{path}: no 'latest' file and several tags; choose one with --tag ({available})")
            else:
                raise ConvertError(
                    f"{path} is not a checkpoint folder: no 'latest' file and no tag folder with "
                    f"*_model_states.pt; accepted: {self.accepts}"
                )
        if not (path / tag).is_dir():
            raise ConvertError(f"{path}: tag {tag!r} not found ({available})")
        if not _has_model_states(path / tag):
            raise ConvertError(
                f"{path / tag}: no *_model_states.pt in tag {tag!r}, not a DeepSpeed checkpoint ({available})"
            )
        return path, tag

    # -- what ----------------------------------------------------------------------------------
    def read(self, path: Path, tag: Optional[str] = None) -> SourceCheckpoint:
        save_dir, tag = self.locate(path, tag)
        tag_dir = save_dir / tag
        found = check_deepspeed_tag(tag_dir, ConvertError)
        model_files, optim_files = found.model_files, found.optim_files
        mp_ranks = {int(m.group(2)) for _, m in model_files + optim_files}
        if mp_ranks != {0}:
            raise ConvertError(
                f"{tag_dir}: model-parallel DeepSpeed checkpoint (mp_rank_{max(mp_ranks):02d} files); "
                "accepted: data-parallel checkpoints (mp_rank_00 only, any ZeRO stage)"
            )
        header, head, world, zero, partitioned = (
            found.header,
            found.head,
            found.world_size,
            found.zero,
            found.partitioned,
        )
        ds_config = _dict_at(head, "ds_config")
        stage = int((ds_config.get("zero_optimization") or {}).get("stage", 3 if partitioned else (1 if zero else 0)))
        info = {
            "format": "deepspeed",
            "checkpoint": str(save_dir),
            "tag": tag,
            "zero_stage": stage,
            "world_size": world,
            "global_steps": head.get("global_steps"),
        }

        if zero:
            extra = sorted({int(m.group(1)) for _, m in optim_files if int(m.group(1)) >= world})
            if extra:
                raise ConvertError(
                    f"{tag_dir}: shard files of rank(s) {extra} beyond the checkpoint's {world} rank(s) "
                    "(files of an older checkpoint in the same tag?)"
                )
            del head, found  # zero_to_fp32 reads the files itself
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            quiet = io.StringIO()  # zero_to_fp32 prints progress; the report says what happened
            try:
                with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    state = get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag)
            except (ValueError, FileNotFoundError, KeyError, RuntimeError, NotImplementedError) as err:
                raise ConvertError(
                    f"{tag_dir}: DeepSpeed's zero_to_fp32 could not consolidate the checkpoint ({one_line(err)})"
                ) from None
            info["weights_from"] = "fp32 master weights (deepspeed.utils.zero_to_fp32)"
        else:
            module = head["module"]
            if not isinstance(module, dict) or not module:
                raise ConvertError(f"{header}: its 'module' holds no weights")
            state = dict(module)
            dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values() if hasattr(v, "dtype")})
            info["weights_from"] = f"module weights of mp_rank_00_model_states.pt ({', '.join(dtypes)})"

        meta = tag_dir / HF_META_DIR
        config = tok_dir = gen_dir = None
        if (meta / "config.json").is_file():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(meta), local_files_only=True)
        if any((meta / f).is_file() for f in _TOKENIZER_FILES):
            tok_dir = meta
        if (meta / "generation_config.json").is_file():
            gen_dir = meta
        return SourceCheckpoint(
            state_dict=state, config=config, tokenizer_dir=tok_dir, generation_config_dir=gen_dir, info=info
        )


# ---------------------------------------------------------------------------------------------
# Megatron-core
# ---------------------------------------------------------------------------------------------

MEGATRON_LATEST = names.MEGATRON_LATEST
_ITER_DIR = re.compile(r"^iter_(\d+)$")
_LEGACY_RANK_DIR = re.compile(r"^mp_rank_\d+(?:_\d+)?$")


def _dict_at(obj: Any, key: str) -> Dict[str, Any]:
    """``obj[key]`` where ``obj`` is a dict and that entry one too, else an empty dict."""
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, dict) else {}


def _key_mismatch(parts: Sequence[tuple], counts: bool = False) -> str:
    """``"missing a, b, c ...; unexpected d"``: each non-empty key list of ``parts`` (label, sorted
    keys) by its first three keys, with its length in parentheses when ``counts``."""
    what = []
    for label, keys in parts:
        if keys:
            n = f" ({len(keys)})" if counts else ""
            what.append(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}{n}")
    return "; ".join(what)


def _is_megatron_iter(folder: Path) -> bool:
    """An ``iter_*`` folder written by megatron-core (dist_checkpointing or the legacy per-rank format)."""
    if not _ITER_DIR.match(folder.name) or not folder.is_dir():
        return False
    if (folder / "metadata.json").is_file() or (folder / "common.pt").is_file():
        return True
    try:
        return any(_LEGACY_RANK_DIR.match(p.name) for p in folder.iterdir())
    except OSError:
        return False


@contextlib.contextmanager
def _single_process_megatron():
    """A 1-rank gloo process group and TP=1 x PP=1 model-parallel state for megatron-core, set up
    only where none exists and taken down afterwards (the caller's own state is left alone)."""
    import torch
    import torch.distributed as dist

    from .distributed import one_rank_group

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != 1:
        raise ConvertError(
            f"this process is one of {dist.get_world_size()} ranks; convert Megatron checkpoints in "
            "a single process (fsam-convert reads any TP x PP layout on its own)"
        )
    with one_rank_group("gloo"):
        created_mp = False
        try:
            try:
                import megatron.core  # noqa: F401
            except ImportError as err:
                raise ConvertError("--source megatron needs megatron-core: pip install 'fsam-ds[megatron]'") from err
            from megatron.core import parallel_state as ps

            if not torch.cuda.is_available():
                from megatron_patches import cpu

                cpu.apply()
            if ps.model_parallel_is_initialized():
                if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
                    raise ConvertError(
                        "megatron-core's model parallelism is already initialised at another layout "
                        "in this process; convert Megatron checkpoints in a process of their own"
                    )
            else:
                ps.initialize_model_parallel(1, 1)
                created_mp = True
            yield
        finally:
            if created_mp:
                from megatron.core import parallel_state as ps

                ps.destroy_model_parallel()


class MegatronSource:
    name = "megatron"
    accepts = (
        "a megatron-core checkpoint folder written by fsam-megatron-train (the save folder with "
        f"{MEGATRON_LATEST} and iter_NNNNNNN folders, or one iter_NNNNNNN folder; dist_checkpointing "
        "torch_dist format, any TP x PP x DP)"
    )

    def detect(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        if (path / MEGATRON_LATEST).is_file() or _is_megatron_iter(path):
            return True
        try:
            return any(_is_megatron_iter(d) for d in path.iterdir())
        except OSError:
            return False

    # -- where ---------------------------------------------------------------------------------
    def locate(self, path: Path, tag: Optional[str]) -> Path:
        """The ``iter_NNNNNNN`` folder to read; ``tag``: ``iter_0000004``, ``4`` or None (the latest)."""

        def normal(t: str) -> str:
            t = str(t).strip()
            if t.isdigit():
                return names.megatron_iteration_dir(int(t))
            m = _ITER_DIR.match(t)
            return names.megatron_iteration_dir(int(m.group(1))) if m else t

        if _ITER_DIR.match(path.name) and _is_megatron_iter(path):  # an iteration folder itself
            if tag is not None and normal(tag) != path.name:
                raise ConvertError(
                    f"{path} is already the iteration folder {path.name!r}; --tag {tag!r} does not "
                    "apply (pass the save folder above it to choose an iteration)"
                )
            return path
        iters = sorted((d.name for d in path.iterdir() if _is_megatron_iter(d)), key=_natural)
        available = f"available iterations: {', '.join(iters)}" if iters else "the folder holds no iter_NNNNNNN folders"
        if tag is None:
            latest = path / MEGATRON_LATEST
            if latest.is_file():
                text = latest.read_text().strip()
                if not text.isdigit():
                    raise ConvertError(
                        f"{latest}: expected an iteration number, found {text[:40]!r}; choose an "
                        f"iteration with --tag ({available})"
                    )
                tag = normal(text)
                if not (path / tag).is_dir():
                    raise ConvertError(
                        f"{path}: {MEGATRON_LATEST} names iteration {int(text)} ({tag}), which is "
                        f"missing ({available}); choose one with --tag"
                    )
            elif len(iters) == 1:
                tag = iters[0]
            elif iters:
                raise ConvertError(
                    f"{path}: no {MEGATRON_LATEST} and several iterations; choose one with --tag ({available})"
                )
            else:
                raise ConvertError(
                    f"{path} is not a checkpoint folder: no {MEGATRON_LATEST} and no iter_NNNNNNN "
                    f"folder; accepted: {self.accepts}"
                )
        else:
            tag = normal(tag)
        if not (path / tag).is_dir():
            raise ConvertError(f"{path}: iteration {tag!r} not found ({available})")
        if not _is_megatron_iter(path / tag):
            raise ConvertError(
                f"{path / tag}: no metadata.json or common.pt, not a megatron-core checkpoint ({available})"
            )
        return path / tag

    # -- what ----------------------------------------------------------------------------------
    def read(self, path: Path, tag: Optional[str] = None, config=None) -> SourceCheckpoint:
        import warnings

        import torch

        ckpt = self.locate(path, tag)
        if not (ckpt / "metadata.json").is_file():
            if any(_LEGACY_RANK_DIR.match(p.name) for p in ckpt.iterdir()):
                raise ConvertError(
                    f"{ckpt}: a per-rank torch-format checkpoint (mp_rank_* folders); accepted: "
                    "dist_checkpointing checkpoints (metadata.json, *.distcp), as fsam-megatron-train "
                    "writes them"
                )
            raise ConvertError(
                f"{ckpt}: no metadata.json, not a dist_checkpointing checkpoint (an interrupted "
                "save?); accepted: " + self.accepts
            )
        try:
            meta = json.loads((ckpt / "metadata.json").read_text())
        except (OSError, ValueError) as err:
            raise ConvertError(f"{ckpt / 'metadata.json'}: cannot read it ({one_line(err)})") from None
        backend = meta.get("sharded_backend")
        if backend != "torch_dist" or meta.get("common_backend", "torch") != "torch":
            raise ConvertError(
                f"{ckpt}: sharded backend {backend!r} / common backend "
                f"{meta.get('common_backend')!r}; accepted: 'torch_dist' / 'torch' (megatron-core's "
                "default, as fsam-megatron-train writes them)"
            )
        common_file = ckpt / "common.pt"
        if not common_file.is_file():
            raise ConvertError(f"{ckpt}: missing common.pt (written by the first rank with every checkpoint)")
        try:
            common = torch.load(common_file, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConvertError(f"{common_file}: cannot read it ({one_line(err)})") from None
        saved = _dict_at(common, "layout")
        tp, pp, dp = (int(saved[k]) if saved.get(k) else None for k in ("tp", "pp", "dp"))
        world = tp * pp * dp if tp is not None and pp is not None and dp is not None else None
        written_by = f"{world} rank(s) (TP {tp} x PP {pp} x DP {dp})" if world else "its ranks"

        # which tensors the checkpoint holds and which files hold them (torch.distributed.checkpoint)
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        try:
            dcp = FileSystemReader(str(ckpt)).read_metadata()
        except Exception as err:
            raise ConvertError(
                f"{ckpt}: cannot read the dist_checkpointing index .metadata ({one_line(err)})"
            ) from None

        def is_model(key: str) -> bool:
            return not key.startswith("optimizer.") and "_extra_state" not in key

        stored = {
            k: tuple(v.size)
            for k, v in dcp.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and is_model(k)
        }
        if not stored:
            raise ConvertError(f"{ckpt}: the checkpoint holds no model weights")
        files = sorted({s.relative_path for i, s in dcp.storage_data.items() if is_model(i.fqn)}, key=_natural)
        missing = [f for f in files if not (ckpt / f).is_file()]
        if missing:
            raise ConvertError(
                f"{ckpt}: missing shard file(s) {', '.join(missing)}; the checkpoint was written by "
                f"{written_by} and needs every rank's files"
            )

        # the architecture
        hf_dir = ckpt / HF_META_DIR
        if config is None:
            if not (hf_dir / "config.json").is_file():
                raise ConvertError(
                    f"{ckpt}: no {HF_META_DIR}/config.json (fsam-megatron-train writes the model's "
                    "Hugging Face config there); pass --config with a model folder or config.json of "
                    "the trained architecture"
                )
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
            except Exception as err:
                raise ConvertError(f"{hf_dir / 'config.json'}: cannot read it ({one_line(err)})") from None
        emb = stored.get("embedding.word_embeddings.weight")
        if emb is not None and getattr(config, "vocab_size", None) is not None and emb[0] != config.vocab_size:
            raise ConvertError(
                f"vocabulary mismatch: the weights have {emb[0]} token embeddings but the config's "
                f"vocab_size is {config.vocab_size}; accepted: the config the model was trained with"
            )
        bf16 = bool(saved.get("bf16"))
        dtype = torch.bfloat16 if bf16 else torch.float32

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # megatron-core's "Apex / Transformer Engine not installed" notes
            from megatron_patches import layout

            try:
                layout.check_llama(config)
            except layout.LayoutError as err:
                raise ConvertError(f"{ckpt}: {one_line(err)}") from None
            with _single_process_megatron():
                from megatron.core import dist_checkpointing
                from megatron.core.dist_checkpointing.dict_utils import nested_values
                from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

                try:
                    tcfg = layout.transformer_config(config, 1, 1, dtype, perform_initialization=False)
                    gpt = layout.build_gpt(config, tcfg)
                except (layout.LayoutError, ValueError, AssertionError) as err:
                    raise ConvertError(f"config: megatron-core cannot build it ({one_line(err)})") from None
                probe = gpt.sharded_state_dict()
                apply_factories(probe)
                wanted: Dict[str, tuple] = {}
                for sh in nested_values(probe):
                    if isinstance(sh, ShardedTensor) and is_model(sh.key):
                        wanted.setdefault(sh.key, tuple(sh.global_shape))
                absent = sorted(k for k in wanted if k not in stored)
                extra = sorted(k for k in stored if k not in wanted)
                if absent or extra:
                    what = _key_mismatch([("missing", absent), ("weights the Llama mapping does not cover:", extra)])
                    raise ConvertError(
                        f"{ckpt}: the checkpoint does not match the GPTModel of the config "
                        f"({what}); accepted: Llama-style GPTModel checkpoints (RMSNorm, "
                        "RoPE, SwiGLU, no biases) with the config they were trained with"
                    )
                for k, shape in wanted.items():
                    if stored[k] != shape:
                        raise ConvertError(
                            f"the weights do not match the config: {k} has shape {stored[k]} in the "
                            f"checkpoint, the config expects {shape}"
                        )
                del probe
                try:
                    quiet = io.StringIO()
                    with contextlib.redirect_stdout(quiet):
                        state = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(ckpt))
                    gpt.load_state_dict(state["model"], strict=True)
                except Exception as err:
                    raise ConvertError(
                        f"{ckpt}: dist_checkpointing could not read the model weights ({one_line(err)})"
                    ) from None
                meg = {k: v.detach() for k, v in gpt.state_dict().items() if "_extra_state" not in k}
                del state, gpt
        try:
            hf_state = layout.megatron_to_hf(meg, config)
        except layout.LayoutError as err:
            raise ConvertError(f"{ckpt}: {one_line(err)}") from None

        info = {
            "format": "megatron",
            "checkpoint": str(ckpt.parent),
            "tag": ckpt.name,
            "iteration": common.get("iteration") if isinstance(common, dict) else None,
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "world_size": world,
            "distributed_optimizer": saved.get("distributed_optimizer"),
            "checkpoint_files": len(files),
            "weights_from": f"model weights ({str(dtype).replace('torch.', '')}) read by dist_checkpointing "
            "at TP 1 x PP 1",
        }
        tok_dir = hf_dir if any((hf_dir / f).is_file() for f in _TOKENIZER_FILES) else None
        gen_dir = hf_dir if (hf_dir / "generation_config.json").is_file() else None
        return SourceCheckpoint(
            state_dict=hf_state, config=config, tokenizer_dir=tok_dir, generation_config_dir=gen_dir, info=info
        )


#: The readers ``--source auto`` tries, in order (see the module docstring to add one).
SOURCES: List[Any] = [DeepSpeedSource(), MegatronSource()]


def find_source(path: Path, name: str = "auto"):
    if name != "auto":
        for src in SOURCES:
            if src.name == name:
                return src
        raise ConvertError(f"unknown --source {name!r}; accepted: auto, {', '.join(s.name for s in SOURCES)}")
    for src in SOURCES:
        if src.detect(path):
            return src
    accepted = "; or ".join(s.accepts for s in SOURCES)
    raise ConvertError(f"{path} is not a checkpoint folder; accepted: {accepted}")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def parse_size(text) -> int:
    """``5GB``, ``500MB``, ``100KiB``, ``1e9`` or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
        if not m:
            raise ConvertError(
                f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 100KB or a number of bytes"
            )
        unit = m.group(2) or "B"
        base = 1024 if "I" in unit else 1000
        value = int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))
    if value <= 0:
        raise ConvertError(f"--max-shard-size {text!r}: must be positive")
    return value


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _check_output(output: Path, overwrite: bool, sources: Sequence[Path]) -> None:
    if output.exists() and not output.is_dir():
        raise ConvertError(
            f"output {output} exists and is not a folder; accepted: a new or empty folder "
            "(or an existing one with --overwrite)"
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConvertError(
            f"output folder {output} exists and is not empty; pass --overwrite to replace it, or choose a new folder"
        )
    out = output.resolve()
    for src in sources:
        src = Path(src).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ConvertError(f"output {output} overlaps the input {src}; choose a folder outside it")


def _load_config(spec: Path):
    from transformers import AutoConfig

    spec = Path(spec)
    if spec.is_file():
        return AutoConfig.from_pretrained(str(spec.parent) if spec.name == "config.json" else str(spec))
    if (spec / "config.json").is_file():
        return AutoConfig.from_pretrained(str(spec), local_files_only=True)
    raise ConvertError(
        f"--config {spec}: no config.json there; accepted: a Hugging Face model folder or a config.json file"
    )


def _load_tokenizer(spec: Path):
    from transformers import AutoTokenizer

    spec = Path(spec)
    if not (spec.is_dir() and any((spec / f).is_file() for f in _TOKENIZER_FILES)):
        raise ConvertError(
            f"tokenizer {spec}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); accepted: a local tokenizer folder"
        )
    try:
        return AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
    except Exception as err:
        raise ConvertError(f"tokenizer {spec}: AutoTokenizer cannot load it ({one_line(err)})") from None


def _embedding_key(model) -> Optional[str]:
    emb = model.get_input_embeddings()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is emb.weight:
            return name
    return None


def export_hf(
    ckpt: SourceCheckpoint,
    output: Path,
    *,
    dtype: str = "fp32",
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    tokenizer=None,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Write ``ckpt`` as a Hugging Face folder at ``output``; returns the report (see :func:`convert`).

    ``tokenizer``: a loaded tokenizer (or ``None``: none is written). The state dict is consumed
    (its tensors are cast and moved into the model without copies where possible)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    shard_bytes = parse_size(max_shard_size)
    config = ckpt.config
    if config is None:
        raise ConvertError(
            "the checkpoint carries no Hugging Face config (fsam-train writes <tag>/hf/config.json); "
            "pass --config with a model folder or config.json of the trained architecture"
        )
    state = ckpt.state_dict
    config.use_cache = True  # trained without the KV cache; generation wants it

    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        except Exception as err:
            raise ConvertError(
                f"config {getattr(config, 'model_type', '?')!r}: AutoModelForCausalLM cannot build it ({one_line(err)})"
            ) from None
    expected = dict(model.state_dict())  # persistent entries, tied names included
    emb_key = _embedding_key(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    # keys and shapes, with the vocabulary named when that is what differs
    if emb_key in state and emb_key in expected:
        rows, cfg_rows = int(state[emb_key].shape[0]), int(expected[emb_key].shape[0])
        if rows != cfg_rows:
            raise ConvertError(
                f"vocabulary mismatch: the weights have {rows} token embeddings but the config's "
                f"vocab_size is {cfg_rows}; accepted: the config the model was trained with"
            )
    unexpected = sorted(k for k in state if k not in expected)
    out_key = "lm_head.weight"
    missing = sorted(k for k in expected if k not in state and not (tied and k == out_key and emb_key in state))
    if missing or unexpected:
        what = _key_mismatch([("missing", missing), ("unexpected", unexpected)], counts=True)
        raise ConvertError(f"the weights do not match the {type(model).__name__} of the config: {what}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConvertError(
                f"the weights do not match the config: {k} has shape {tuple(v.shape)}, the config "
                f"expects {tuple(expected[k].shape)}"
            )
    if (
        tied
        and out_key in state
        and emb_key in state
        and state[out_key] is not state[emb_key]
        and not torch.equal(state[out_key], state[emb_key])
    ):
        raise ConvertError(
            "the config ties the input and output embeddings but the weights hold a different "
            "lm_head.weight; accepted: the config the model was trained with"
        )
    vocab_rows = int(state[emb_key].shape[0]) if emb_key in state else None

    # the tokenizer must only produce ids the embeddings have
    tok_info: Optional[Dict[str, Any]] = None
    if tokenizer is not None:
        n_tok = len(tokenizer)
        if vocab_rows is not None and n_tok > vocab_rows:
            raise ConvertError(
                f"vocabulary mismatch: the tokenizer has {n_tok} tokens but the weights embed only "
                f"{vocab_rows}; accepted: the tokenizer the model was trained with (--tokenizer)"
            )
        tok_info = {"size": n_tok, "class": type(tokenizer).__name__}
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(config, attr, None) is None and getattr(tokenizer, attr, None) is not None:
                setattr(config, attr, getattr(tokenizer, attr))

    # cast and move into the model (no copy when the dtype already matches)
    cast: Dict[str, Any] = {}
    seen: Dict[int, Any] = {}
    for k in list(state):
        v = state.pop(k)
        if id(v) not in seen:
            seen[id(v)] = v.detach().to(torch_dtype).contiguous() if v.is_floating_point() else v.detach()
        cast[k] = seen[id(v)]
    seen.clear()
    model.load_state_dict(cast, strict=False, assign=True)
    del cast
    if tied:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ConvertError(f"the weights do not fill the model: {', '.join(still_meta[:3])} missing")
    model.eval()

    gen = model.generation_config
    if ckpt.generation_config_dir is not None:
        gen = GenerationConfig.from_pretrained(str(ckpt.generation_config_dir))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, attr, None) is None and getattr(config, attr, None) is not None:
            setattr(gen, attr, getattr(config, attr))
    gen.use_cache = True
    model.generation_config = gen

    # write next to the target, then move into place
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(tmp), max_shard_size=shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if output.exists():
            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink()
        os.rename(tmp, output)
    finally:
        if progress:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

    shards = sorted(p.name for p in output.glob("*.safetensors"))
    n_params = sum(p.numel() for p in model.parameters())  # parameters() counts a tied tensor once
    report = dict(ckpt.info)
    report.update(
        {
            "output": str(output),
            "architecture": type(model).__name__,
            "parameters": int(n_params),
            "dtype": dtype,
            "shards": len(shards),
            "shard_files": shards,
            "size_bytes": int(sum((output / s).stat().st_size for s in shards)),
            "max_shard_size_bytes": shard_bytes,
            "vocab_size": vocab_rows,
            "tied_embeddings": tied,
            "tokenizer": tok_info,
            "files": sorted(p.name for p in output.iterdir()),
        }
    )
    if tok_info is not None and vocab_rows is not None and vocab_rows > tok_info["size"]:
        report["vocab_padding"] = vocab_rows - tok_info["size"]
    return report


def convert(
    source,
    output,
    *,
    tag: Optional[str] = None,
    dtype: str = "fp32",
    max_shard_size=DEFAULT_MAX_SHARD_SIZE,
    config=None,
    tokenizer=None,
    overwrite: bool = False,
    source_format: str = "auto",
) -> Dict[str, Any]:
    """Convert the checkpoint at ``source`` into a Hugging Face folder at ``output``.

    ``config`` / ``tokenizer``: a folder (or config.json) that replaces what the checkpoint
    carries. Returns the report: ``parameters`` (distinct, tied counted once), ``dtype``,
    ``shards`` (number of safetensors files), ``size_bytes`` (their total), ``shard_files``,
    ``vocab_size``, ``tied_embeddings``, ``tokenizer`` (``{"size", "class"}`` or None), and the
    source's facts (``format``, ``tag``, ``zero_stage``, ``world_size``, ``weights_from``, ...).
    Raises :class:`ConvertError` (one line) for every bad input.
    """
    source, output = Path(source).expanduser(), Path(output).expanduser()
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    parse_size(max_shard_size)
    if not source.exists():
        raise ConvertError(f"{source}: no such folder; expected a checkpoint folder")
    if not source.is_dir():
        raise ConvertError(f"{source} is a file, not a checkpoint folder")
    _check_output(output, overwrite, [source])
    for name, spec in (("--config", config), ("--tokenizer", tokenizer)):
        if spec is not None and not Path(spec).expanduser().exists():
            raise ConvertError(f"{name} {spec}: no such file or folder")
    reader = find_source(source, source_format)
    override = _load_config(Path(config).expanduser()) if config is not None else None
    if override is not None and "config" in inspect.signature(reader.read).parameters:
        ckpt = reader.read(source, tag, config=override)  # a reader that needs the architecture to read
    else:
        ckpt = reader.read(source, tag)
    if override is not None:
        ckpt.config = override
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else ckpt.tokenizer_dir
    tok = _load_tokenizer(tok_dir) if tok_dir is not None else None
    report = export_hf(ckpt, output, dtype=dtype, max_shard_size=max_shard_size, tokenizer=tok, overwrite=overwrite)
    report["source"] = str(source)
    return report


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConvertError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Convert a training checkpoint (DeepSpeed at any ZeRO stage and world size, or "
        "megatron-core at any TP x PP x DP) into a Hugging Face model folder (config, safetensors weights, "
        "tokenizer, generation config).",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint folder (DeepSpeed: the save folder with 'latest', or a tag folder; "
        f"megatron-core: the save folder with {MEGATRON_LATEST}, or an iter_NNNNNNN folder)",
    )
    p.add_argument("output", help="new Hugging Face model folder")
    p.add_argument(
        "--tag",
        default=None,
        help="checkpoint tag, e.g. step200 (DeepSpeed) or iter_0000100 / 100 (megatron-core) (default: the latest)",
    )
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype of the saved weights (default: fp32)")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"split the safetensors weights into files of at most this size (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    p.add_argument(
        "--config",
        default=None,
        help="Hugging Face model folder or config.json of the architecture "
        "(default: the one saved with the checkpoint)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one saved with the checkpoint)")
    p.add_argument(
        "--source",
        default="auto",
        help="checkpoint format: auto, " + ", ".join(s.name for s in SOURCES) + " (default: auto)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def summary(report: Dict[str, Any]) -> str:
    src = f"{report.get('format', '?')}"
    if report.get("format") == "deepspeed":
        src += f", ZeRO stage {report['zero_stage']}, {report['world_size']} rank(s), tag {report['tag']}"
    elif report.get("format") == "megatron":
        src += (
            f", TP {report.get('tp', '?')} x PP {report.get('pp', '?')} x DP {report.get('dp', '?')}, "
            f"{report['tag']}, {report.get('checkpoint_files', '?')} .distcp file(s)"
        )
    tok = report["tokenizer"]
    lines = [
        f"{report.get('source', '?')} ({src}) -> {report['output']}",
        f"  {report['architecture']}: {report['parameters']:,} parameters, {report['dtype']}, "
        f"vocab {report['vocab_size']}{', tied embeddings' if report['tied_embeddings'] else ''}",
        f"  weights: {report['shards']} safetensors shard(s), {_human(report['size_bytes'])} "
        f"(from {report.get('weights_from', '?')})",
        "  tokenizer: " + (f"{tok['size']} tokens" if tok else "none (pass --tokenizer to include one)"),
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    # the converter works on the CPU; pinning DeepSpeed's accelerator also keeps its
    # "Setting accelerator to CPU" warning out of the output
    if "deepspeed" not in sys.modules:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        args = build_parser().parse_args(argv)
        report = convert(
            args.checkpoint,
            args.output,
            tag=args.tag,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            config=args.config,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
            source_format=args.source,
        )
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except ConvertError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(report) if args.json else summary(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
