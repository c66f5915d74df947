"""The method under the Hugging Face Trainer (and trainers built on it, such as TRL's) and in
Accelerate loops, through the engine's loop mode (:mod:`fsam_ds.loop`).

Trainer: one change to the script, ``FSAMTrainer`` in place of ``Trainer`` (or
``class MySFTTrainer(FSAMTrainerMixin, SFTTrainer)`` for another trainer class); the DeepSpeed JSON
given to ``TrainingArguments(deepspeed=...)`` selects the method as in every other door::

    from fsam_ds.hf import FSAMTrainer
    trainer = FSAMTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)
    trainer.train()

Accelerate: ``FSAMAccelerator`` in place of ``Accelerator``; the loop stays as it is
(``accelerator.prepare``, ``accelerator.backward(loss)``, ``optimizer.step()``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from .config import FSAMConfigError, SAMConfig, take_sam_section

_SAM_OF_CONFIG = "_fsam_sam_config"


def sam_config_of(hf_ds_config) -> Optional[SAMConfig]:
    """The method of a Hugging Face DeepSpeed config object (``TrainingArguments.hf_deepspeed_config``
    or an Accelerate plugin's ``hf_ds_config``), taken out of its ``optimizer`` section in place
    the first time (DeepSpeed is then given its AdamW). None when the config has no optimizer
    section (the Trainer's own optimizer: plain training)."""
    if hf_ds_config is None:
        return None
    known = getattr(hf_ds_config, _SAM_OF_CONFIG, None)
    if known is not None:
        return known
    config = hf_ds_config.config
    if "optimizer" not in config:
        return None
    sam = take_sam_section(config)
    setattr(hf_ds_config, _SAM_OF_CONFIG, sam)
    return sam


def attach_engine(ds_engine, sam: SAMConfig, loss_fn=None):
    """The :class:`~fsam_ds.engine.FSAMEngine` of a DeepSpeedEngine built by someone else
    (Accelerate, the Trainer), created once: loop mode is then installed on that engine."""
    from deepspeed import DeepSpeedEngine

    from .engine import FSAMEngine

    if not isinstance(ds_engine, DeepSpeedEngine):
        raise FSAMConfigError(
            f"optimizer.type {sam.method} runs on a DeepSpeed engine; got {type(ds_engine).__name__}. "
            "Give the Trainer / Accelerate the DeepSpeed config (TrainingArguments(deepspeed=...) "
            "or a DeepSpeedPlugin)"
        )
    if sam.is_sam and sam.ascent_direction != "gradient":
        from .loop import momentum_refusal

        raise FSAMConfigError(momentum_refusal(sam))
    fsam = getattr(ds_engine, "_fsam_engine", None)
    if fsam is None:
        fsam = FSAMEngine(ds_engine, sam, loss_fn)
    return fsam


def causal_lm_loss_func(outputs, labels, num_items_in_batch=None):
    """A Trainer ``compute_loss_func``: the next-token cross-entropy of ``outputs.logits``, summed
    over the labelled tokens and divided by ``num_items_in_batch`` (the tokens of the whole
    accumulated batch) when the Trainer gives it, else their mean. With TRL's ``SFTTrainer``, whose
    own loss comes from a fused LM head that never materialises the logits, it gives the functional
    types the logits they need: ``SFTTrainer(..., compute_loss_func=causal_lm_loss_func)``."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    shift = logits[..., :-1, :].float()
    target = labels[..., 1:].to(shift.device)
    total = torch.nn.functional.cross_entropy(
        shift.reshape(-1, shift.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
    return total / count


class FSAMTrainerMixin:
    """Runs the DeepSpeed config's SAM type inside a Hugging Face ``Trainer`` subclass: put it
    first in the bases (``class T(FSAMTrainerMixin, SFTTrainer)``). With ``optimizer.type``
    ``AdamW`` (or no optimizer section) the trainer is unchanged.

    What it changes: the DeepSpeed engine Accelerate builds runs in loop mode; SAM's pass 2
    recomputes the trainer's own ``compute_loss`` (label smoothing, ``compute_loss_func``,
    ``num_items_in_batch`` normalisation included) at ``theta + eps``; the logs gain ``eps_norm``,
    ``rho`` and ``ascent_grad_norm`` (the pass-1 ``||g||``; ``grad_norm`` stays DeepSpeed's norm of the
    gradient the optimizer steps on); checkpoints carry the stored ascent of ``ascent_every``.
    """

    def __init__(self, *args, **kwargs):
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        self.fsam_sam: Optional[SAMConfig] = sam_config_of(getattr(targs, "hf_deepspeed_config", None))
        self.fsam_engine = None
        super().__init__(*args, **kwargs)

    @property
    def _fsam_active(self) -> bool:
        return self.fsam_sam is not None and self.fsam_sam.is_sam

    def _fsam_attach(self, model):
        if self.fsam_engine is None or self.fsam_engine.engine is not model:
            self.fsam_engine = attach_engine(model, self.fsam_sam)
        return self.fsam_engine

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._fsam_active:
            self._fsam_attach(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loop = self.fsam_engine._loop if self._fsam_active and self.fsam_engine is not None else None
        saved = dict(inputs) if loop is not None and loop.mode == "record" and model.training else None
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if saved is not None and torch.is_grad_enabled():
            loss = result[0] if return_outputs else result
            parent = super()

            def again():
                return parent.compute_loss(model, dict(saved), num_items_in_batch=num_items_in_batch)

            loop.set_loss_source(loss, again)
        return result

    def log(self, logs, *args, **kwargs):
        if self._fsam_active and self.fsam_engine is not None and "loss" in logs:
            m = self.fsam_engine.last_metrics
            for key, name in (("eps_norm", "eps_norm"), ("rho", "rho"), ("grad_norm", "ascent_grad_norm")):
                if m.get(key) is not None:
                    logs[name] = m[key]
        return super().log(logs, *args, **kwargs)

    # ascent_every > 1: the stored direction goes with the Trainer's checkpoints, one file per rank
    def _fsam_state_file(self, folder: str) -> str:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        return os.path.join(folder, f"fsam_state_rank{rank}.pt")

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._fsam_active and self.fsam_engine is not None and self.fsam_sam.ascent_every > 1:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(self.fsam_engine.state_dict(), self._fsam_state_file(folder))

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self._fsam_active and self.fsam_sam.ascent_every > 1:
            path = self._fsam_state_file(checkpoint)
            if os.path.isfile(path):
                self._fsam_attach(self.model_wrapped).load_state_dict(torch.load(path, weights_only=False))


def _trainer_class():
    from transformers import Trainer

    return Trainer


def __getattr__(name: str):
    # FSAMTrainer is built on first use, so importing fsam_ds.hf does not import transformers' Trainer
    if name == "FSAMTrainer":
        cls = type(
            "FSAMTrainer",
            (FSAMTrainerMixin, _trainer_class()),
            {
                "__doc__": "The Hugging Face ``Trainer`` running the DeepSpeed config's SAM type "
                "(see FSAMTrainerMixin).",
                "__module__": __name__,
            },
        )
        globals()["FSAMTrainer"] = cls
        return cls
    if name == "FSAMAccelerator":
        cls = _accelerator_class()
        globals()["FSAMAccelerator"] = cls
        return cls
    raise AttributeError(name)


def _accelerator_class():
    from accelerate import Accelerator

    class FSAMAccelerator(Accelerator):
        """``accelerate.Accelerator`` whose DeepSpeed engine runs the SAM type of its DeepSpeed
        config (``DeepSpeedPlugin(hf_ds_config=...)``, or the ``accelerate launch`` config): the
        user's loop is unchanged. ``loss_fn`` is as for :func:`fsam_ds.initialize` (SAM only, when the
        loop's loss is not the model's own output loss)."""

        def __init__(self, *args, loss_fn: Optional[Callable] = None, **kwargs):
            super().__init__(*args, **kwargs)
            plugin = self.state.deepspeed_plugin
            self.fsam_sam = sam_config_of(getattr(plugin, "hf_ds_config", None)) if plugin is not None else None
            self.fsam_loss_fn = loss_fn
            self.fsam_engine = None

        def prepare(self, *args: Any, **kwargs: Any):
            result = super().prepare(*args, **kwargs)
            sam = self.fsam_sam
            if sam is not None and sam.is_sam:
                wrapped = getattr(self, "deepspeed_engine_wrapped", None)
                if wrapped is None:
                    raise FSAMConfigError(
                        f"optimizer.type {sam.method}: accelerator.prepare built no DeepSpeed engine; "
                        "prepare the model together with its optimizer (DummyOptim)"
                    )
                self.fsam_engine = attach_engine(wrapped.engine, sam, self.fsam_loss_fn)
            return result

    return FSAMAccelerator
