"""Megatron-LM integration: a ``train_step`` with Megatron-LM's signature, its arguments, and
:func:`install`, which swaps it into ``megatron.training.training`` when the configured method is
a SAM type.

Recipe for a Megatron-LM user (``pretrain_gpt.py`` or a script like it)::

    from megatron_patches import add_sam_args, install
    install()                                   # before pretrain(); a no-op without Megatron-LM
    pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder,
             forward_step, extra_args_provider=add_sam_args)

and on the command line ``--sam-type PreconditionedFunctionalSAM --sam-rho 0.1``. With
``--sam-type AdamW`` (the default) Megatron-LM's own ``train_step`` runs unchanged.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
import torch.distributed as dist

from fsam_ds.config import SAM_DEFAULTS, FSAMConfigError, SAMConfig, canonical_method, sam_config
from fsam_ds.names import METHODS, PRECONDITION_NORMS

from .sam import MegatronSAM, check_sam_config

#: Megatron-style flags and the optimizer.params keys of the DeepSpeed JSON they correspond to.
SAM_FLAGS = {
    "sam_rho": "rho",
    "sam_precondition_norm": "precondition_norm",
    "sam_rho_warmup_steps": "rho_warmup_steps",
    "sam_logit_grad_cache": "logit_grad_cache",
    "sam_ascent_every": "ascent_every",
    "sam_ascent_direction": "ascent_direction",
}
#: How errors call the method's settings here: by their flags.
SAM_TYPE_FLAG = "--sam-type"
FLAG_OF_KEY = {key: "--" + dest.replace("_", "-") for dest, key in SAM_FLAGS.items()}


def add_sam_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--sam-type``, ``--sam-rho``, ``--sam-precondition-norm``, ``--sam-rho-warmup-steps``,
    ``--sam-logit-grad-cache``, ``--sam-ascent-every``, ``--sam-ascent-direction`` (usable as
    Megatron-LM's ``extra_args_provider``)."""
    group = parser.add_argument_group("fsam-ds (SAM / Functional-SAM)")
    group.add_argument(
        "--sam-type", default="AdamW", help=f"one of {', '.join(METHODS)} (any case); AdamW runs the plain step"
    )
    group.add_argument("--sam-rho", type=float, default=SAM_DEFAULTS["rho"], help="perturbation radius (>= 0)")
    group.add_argument(
        "--sam-precondition-norm",
        default=SAM_DEFAULTS["precondition_norm"],
        help=f"preconditioned types: {' or '.join(PRECONDITION_NORMS)}",
    )
    group.add_argument(
        "--sam-rho-warmup-steps",
        type=int,
        default=SAM_DEFAULTS["rho_warmup_steps"],
        help="rho ramps linearly from 0 over this many applied AdamW updates (a skipped step does not count)",
    )
    group.add_argument(
        "--sam-logit-grad-cache",
        default=SAM_DEFAULTS["logit_grad_cache"],
        help="functional types: where g_F waits for pass 2, device or host",
    )
    group.add_argument(
        "--sam-ascent-every",
        type=int,
        default=SAM_DEFAULTS["ascent_every"],
        help="compute the ascent direction every k optimizer steps and reuse it in between (1: exact)",
    )
    group.add_argument(
        "--sam-ascent-direction",
        default=SAM_DEFAULTS["ascent_direction"],
        help="gradient, or momentum (from AdamW's first moment after its first update)",
    )
    return parser


def sam_config_from_args(args) -> SAMConfig:
    """The method's settings from Megatron-style arguments; errors name the flag and the accepted values."""
    method = canonical_method(getattr(args, "sam_type", "AdamW"), key_name=SAM_TYPE_FLAG)
    if method == "AdamW":
        return SAMConfig(method="AdamW")
    params = {key: getattr(args, flag) for flag, key in SAM_FLAGS.items() if getattr(args, flag, None) is not None}
    sam = sam_config(method, params, key_names=FLAG_OF_KEY)
    check_sam_config(sam, FLAG_OF_KEY)  # what megatron-core does not run: refused here, before any work
    return sam


def _megatron_lm_args():
    try:
        from megatron.training import get_args

        return get_args()
    except (ImportError, AssertionError, AttributeError):
        return None


def reduce_losses(losses_reduced, dp_group=None) -> dict:
    """Average the per-micro-batch loss dicts the way Megatron-LM's train step does: ``[sum, tokens]``
    pairs are summed over micro-batches and data-parallel ranks, then divided; single values are
    averaged over micro-batches."""
    out: dict = {}
    if not losses_reduced:
        return out
    for key in losses_reduced[0]:
        vals = [x[key].view(-1) for x in losses_reduced]
        if vals[0].numel() == 2:
            total = torch.vstack(vals).sum(0).float()
            if dp_group is not None and dist.get_world_size(dp_group) > 1:
                dist.all_reduce(total, group=dp_group)
            out[key] = total[0] / total[1]
        else:
            out[key] = torch.cat(vals).mean()
    return out


def _runner(model, optimizer, sam: SAMConfig) -> MegatronSAM:
    runner = getattr(optimizer, "_fsam_runner", None)
    if runner is None or runner.sam != sam or runner.model != list(model):
        runner = MegatronSAM(model, optimizer, sam)
        optimizer._fsam_runner = runner
    return runner


def rerun_state_machine():
    """megatron-core's rerun state machine when one has been initialized (Megatron-LM's
    ``pretrain`` does it from ``--rerun-mode``), else None (a megatron-core loop without one)."""
    try:
        from megatron.core import rerun_state_machine as rsm
    except ImportError:
        return None
    return getattr(rsm, "_GLOBAL_RERUN_STATE_MACHINE", None)


def check_rerun_mode(machine=None) -> None:
    """Refuse a rerun mode other than ``disabled``, in one line, before any work of the step.

    Megatron-LM's rerun modes (``validate_results``, ``report_determinism_stats``) re-execute a
    step's forward-backward from a saved state and compare the losses of the runs; the SAM step
    runs two forward-backward passes at two different weights (theta and theta + eps) with its
    own replay of the micro-batches, so the machine would compare pass-2 losses against a
    different point and hold or rewind the wrong micro-batches. Only ``disabled`` is supported."""
    machine = rerun_state_machine() if machine is None else machine
    if machine is None:
        return
    from megatron.core.rerun_state_machine import RerunMode

    mode = machine.get_mode()
    if mode != RerunMode.DISABLED:
        value = getattr(mode, "value", mode)
        raise FSAMConfigError(
            f"--rerun-mode {value} is not supported by the SAM types (the step replays its "
            "micro-batches itself for pass 2); accepted: --rerun-mode disabled"
        )


def fsam_train_step(
    forward_step_func,
    data_iterator,
    model,
    optimizer,
    opt_param_scheduler,
    config,
    forward_backward_func=None,
    iteration=None,
    *,
    sam: Optional[SAMConfig] = None,
    num_microbatches: Optional[int] = None,
    seq_length: Optional[int] = None,
    micro_batch_size: Optional[int] = None,
    decoder_seq_length: Optional[int] = None,
):
    """Megatron-LM's ``train_step`` (megatron/training/training.py, core 0.16) running the method.

    Returns what Megatron-LM's returns: ``(loss_reduced, skipped_iter, should_checkpoint,
    should_exit, exit_code, grad_norm, num_zeros_in_grad, max_attention_logit)``. Inside Megatron-LM
    everything comes from its global arguments; elsewhere (a megatron-core loop) pass ``sam``,
    ``num_microbatches``, ``seq_length`` and ``micro_batch_size``. Megatron-LM's rerun state
    machine is driven as Megatron-LM's own step drives it (``should_run_forward_backward`` around
    the step's passes, ``should_checkpoint_and_exit`` after them) in its ``disabled`` mode; any
    other mode is refused with one line (:func:`check_rerun_mode`) before the step does anything.
    Gradient dumps and QK-clip are not part of this step.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    args = _megatron_lm_args()
    if sam is None:
        if args is None:
            raise ValueError("fsam_train_step outside Megatron-LM needs sam=SAMConfig(...)")
        sam = sam_config_from_args(args)
    if num_microbatches is None:
        try:
            from megatron.core.num_microbatches_calculator import get_num_microbatches

            num_microbatches = get_num_microbatches()
        except (ImportError, AssertionError, AttributeError):
            raise ValueError("fsam_train_step outside Megatron-LM needs num_microbatches") from None
    if args is not None:
        seq_length = seq_length or args.seq_length
        micro_batch_size = micro_batch_size or args.micro_batch_size
        decoder_seq_length = decoder_seq_length or getattr(args, "decoder_seq_length", None)
    if seq_length is None or micro_batch_size is None:
        raise ValueError("fsam_train_step outside Megatron-LM needs seq_length and micro_batch_size")
    machine = rerun_state_machine()
    check_rerun_mode(machine)
    forward_backward_func = forward_backward_func or get_forward_backward_func()
    runner = _runner(model, optimizer, sam)
    kw = dict(
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=decoder_seq_length,
        iteration=iteration,
    )
    if machine is None:
        losses, update_successful, grad_norm, num_zeros = runner.step(
            forward_backward_func, forward_step_func, data_iterator, **kw
        )
    else:  # as Megatron-LM's train_step (the disabled mode runs the loop body exactly once)
        runs = 0
        while machine.should_run_forward_backward(data_iterator):
            runs += 1
            if runs > 1:
                raise RuntimeError(
                    "the rerun state machine asked to run the step again; the SAM types "
                    "support --rerun-mode disabled only"
                )
            losses = runner.forward_backward(forward_backward_func, forward_step_func, data_iterator, **kw)
        should_checkpoint, should_exit, exit_code = machine.should_checkpoint_and_exit()
        if should_exit:
            return {}, True, should_checkpoint, should_exit, exit_code, None, None, 0
        losses, (update_successful, grad_norm, num_zeros) = losses, runner.optimizer_step()

    # as Megatron-LM: success and the norm agreed over the model-parallel group
    mp_group = ps.get_model_parallel_group()
    flags = torch.tensor([0.0 if update_successful else 1.0, -1.0 if grad_norm is None else float(grad_norm)])
    if dist.get_world_size(mp_group) > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=mp_group)
    update_successful = bool(flags[0] == 0)
    grad_norm = None if flags[1] < 0 else float(flags[1])
    if update_successful:
        if opt_param_scheduler is not None:
            dp = ps.get_data_parallel_world_size()
            opt_param_scheduler.step(increment=num_microbatches * micro_batch_size * dp)
        skipped_iter = 0
    else:
        skipped_iter = 1
    loss_reduced = {}
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss_reduced = reduce_losses(losses, ps.get_data_parallel_group(with_context_parallel=True))
    return loss_reduced, skipped_iter, False, False, 0, grad_norm, num_zeros, 0


def install() -> bool:
    """Swap :func:`fsam_train_step` into Megatron-LM (``megatron.training.training.train_step``).

    The swapped-in step reads ``--sam-type`` at every call: a SAM type runs the method, ``AdamW``
    (the default) Megatron-LM's own step. Returns False (and changes nothing) when Megatron-LM is
    not importable. Call it before ``pretrain()``; pass :func:`add_sam_args` as
    ``extra_args_provider``.
    """
    try:
        from megatron.training import training as T
    except ImportError:
        return False
    if getattr(T.train_step, "_fsam_installed", False):
        return True
    original = T.train_step

    def train_step(*a, **k):
        args = _megatron_lm_args()
        if args is not None and sam_config_from_args(args).is_sam:
            check_rerun_mode()
            return fsam_train_step(*a, **k)
        return original(*a, **k)

    train_step._fsam_installed = True  # type: ignore[attr-defined]
    train_step.__wrapped__ = original  # type: ignore[attr-defined]
    T.train_step = train_step
    return True
