"""fsam-ds: Functional-SAM and preconditioned SAM for DeepSpeed and Megatron-core.

Usage mirrors ``deepspeed.initialize``::

    engine, optimizer, dataloader, lr_scheduler = fsam_ds.initialize(model=model, config="ds_config.json")
    for step in range(steps):
        loss = engine.train_batch(data_iter)   # gradient_accumulation_steps micro-batches
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

from .config import METHODS, SAM_METHODS, FSAMConfigError, SAMConfig, parse_config  # torch-free

# the method's functions load torch: imported on first use, so that ``import fsam_ds.names`` or
# ``fsam_ds.config`` (the reports and the config checks) does not
_LAZY = {
    "causal_lm_loss": "lm",
    "adam_denominator": "method",
    "ascent_direction": "method",
    "functional_surrogate": "method",
    "global_norm": "method",
    "rho_at": "method",
}


if TYPE_CHECKING:  # the same names, typed, for mypy and editors
    from .lm import causal_lm_loss
    from .method import adam_denominator, ascent_direction, functional_surrogate, global_norm, rho_at


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "initialize",
    "attach",
    "parse_config",
    "FSAMConfigError",
    "SAMConfig",
    "METHODS",
    "SAM_METHODS",
    "ascent_direction",
    "adam_denominator",
    "functional_surrogate",
    "global_norm",
    "causal_lm_loss",
    "rho_at",
    "init_distributed",
    "__version__",
]


_ONE_RANK_ENV = False


def init_distributed(dist_backend: Optional[str] = None) -> None:
    """Initialise torch.distributed through DeepSpeed; a plain ``python`` start (no launcher)
    becomes a one-rank job on 127.0.0.1."""
    import deepspeed
    import torch.distributed as dist

    from .distributed import free_port

    if dist.is_initialized():
        return
    global _ONE_RANK_ENV
    # the one-rank environment is ours when this process set it earlier (children do not inherit that)
    if _ONE_RANK_ENV or ("RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ):
        _ONE_RANK_ENV = True
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # a fresh port each time: an earlier group's store may still hold the previous one
        os.environ["MASTER_PORT"] = str(free_port())
    deepspeed.init_distributed(dist_backend=dist_backend)


def initialize(
    model,
    config: Union[str, os.PathLike, Mapping[str, Any]],
    model_parameters=None,
    loss_fn: Optional[Callable] = None,
    training_data=None,
    lr_scheduler=None,
    mpu=None,
    collate_fn=None,
    dist_init_required: Optional[bool] = None,
    **kwargs,
):
    """Build a DeepSpeed engine whose ``train_batch`` runs the method named in ``config``.

    Args:
        model: a ``torch.nn.Module`` whose forward returns logits (a tensor or an object with
            ``.logits``, as Hugging Face causal LMs do).
        config: a DeepSpeed config (dict or JSON path) whose ``optimizer.type`` is one of
            ``AdamW``, ``SAM``, ``PreconditionedSAM``, ``FunctionalSAM``,
            ``PreconditionedFunctionalSAM``.
        model_parameters: as in ``deepspeed.initialize`` (default: ``model.parameters()``).
        loss_fn: ``loss_fn(logits, batch) -> scalar``; default: mean next-token cross-entropy with
            the Hugging Face shift, labels from ``batch["labels"]`` or ``batch["input_ids"]``.
        training_data, lr_scheduler, mpu, collate_fn, dist_init_required: as in
            ``deepspeed.initialize``.

    Returns:
        ``(engine, optimizer, training_dataloader, lr_scheduler)`` like ``deepspeed.initialize``;
        ``engine`` is an :class:`fsam_ds.engine.FSAMEngine`.
    """
    ds_config, sam = parse_config(config)
    import deepspeed

    from .engine import FSAMEngine

    if sam.is_sam and mpu is not None:
        raise FSAMConfigError(
            f"optimizer.type {sam.method} with an mpu (model parallelism) is not supported: its norms "
            "would count model-parallel shards per rank; accepted: mpu=None, or Megatron-core "
            "(megatron_patches) for tensor and pipeline parallelism"
        )
    if dist_init_required is not False:
        init_distributed(ds_config.get("communication_backend"))
    if model_parameters is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, dataloader, scheduler = deepspeed.initialize(
        model=model,
        config=ds_config,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        mpu=mpu,
        collate_fn=collate_fn,
        dist_init_required=dist_init_required,
        **kwargs,
    )
    return FSAMEngine(engine, sam, loss_fn), optimizer, dataloader, scheduler


def attach(engine, config_or_sam, loss_fn: Optional[Callable] = None):
    """Run the configured method on a ``DeepSpeedEngine`` that was built elsewhere (e.g. by
    ``deepspeed.initialize`` with the config :func:`parse_config` returned): loop mode is installed
    on that engine and the :class:`~fsam_ds.engine.FSAMEngine` returned. ``config_or_sam`` is a
    :class:`SAMConfig`, or the fsam config (dict or path) whose method to run."""
    from .hf import attach_engine

    sam = config_or_sam if isinstance(config_or_sam, SAMConfig) else parse_config(config_or_sam)[1]
    return attach_engine(engine, sam, loss_fn)
