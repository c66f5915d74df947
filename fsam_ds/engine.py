"""FSAMEngine: one optimizer step of SAM / FunctionalSAM (preconditioned or not) on a DeepSpeedEngine.

``train_batch`` consumes ``gradient_accumulation_steps`` micro-batches and runs

1. pass 1 at theta through the engine (so data-parallel reduction, loss scaling and accumulation
   behave exactly as in plain training), keeping ``g_F`` of each micro-batch for FunctionalSAM;
2. the ascent ``eps`` from the reduced gradient (and AdamW's ``exp_avg_sq`` when preconditioned),
   with one small all-reduce for the global norms;
3. theta + eps written into the weights the forward reads, gradients zeroed;
4. pass 2 at theta + eps with the same micro-batches and the same random state (dropout masks):
   the loss for SAM, the surrogate ``sum F * stopgrad(g_F)`` for FunctionalSAM;
5. theta restored bit-exactly, then the ordinary ``engine.step()`` (clipping, loss scale,
   LR schedule, AdamW).

Everything else (``module``, ``save_checkpoint``, ``load_checkpoint``, ``get_lr``, ...) is the
wrapped DeepSpeedEngine's own.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from .config import FSAMConfigError, SAMConfig
from .method import Ascent, ascent_direction, causal_lm_loss, functional_surrogate, global_norm, rho_at
from .shards import make_view

LossFn = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]


def logits_of(outputs: Any) -> Optional[torch.Tensor]:
    """The logits of a model output: a tensor, an object with ``.logits``, a dict with
    ``"logits"``, or a tuple whose first element is the logits."""
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dim() >= 2 else None
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        logits = outputs[0] if outputs[0].dim() >= 2 else None
    return logits


def labels_of(batch: Mapping[str, Any]) -> torch.Tensor:
    """Hugging Face conventions: ``labels`` if given, else ``input_ids`` with padding
    (``attention_mask == 0``) set to -100."""
    labels = batch.get("labels")
    if labels is not None:
        return labels
    labels = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return labels


def default_loss(logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean next-token cross-entropy with the Hugging Face shift; -100 labels ignored."""
    return causal_lm_loss(logits, labels_of(batch))


def _model_inputs(batch: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


class FSAMEngine:
    """A DeepSpeedEngine whose ``train_batch`` runs the configured method.

    Attributes not defined here are the wrapped engine's (``engine.module``,
    ``engine.save_checkpoint``, ...). ``last_metrics`` holds the metrics of the latest step:
    ``loss`` (mean pass-1 loss over micro-batches and data-parallel ranks), ``grad_norm`` (global
    ``||g||`` of the pass-1 gradient), ``eps_norm``, ``rho``, ``lr``, ``method``, ``skipped``
    (whether DeepSpeed skipped the update, e.g. on fp16 overflow) and ``step_time``.
    """

    def __init__(self, engine, sam: SAMConfig, loss_fn: Optional[LossFn] = None):
        object.__setattr__(self, "_engine", engine)
        self.sam = sam
        self.loss_fn: LossFn = loss_fn or default_loss
        self.view = make_view(engine)
        self.last_metrics: Dict[str, Any] = {}
        # An unperturbed step (rho = 0, ||g|| = 0 or a non-finite gradient) has pass-2 gradients
        # identical to pass 1's, so pass 2 is skipped; tests switch this off to run both passes.
        self.skip_unperturbed_pass2 = True
        self._data_iter: Optional[Iterator] = None
        self._sharpness_vector = None  # warm start of the in-training lambda_max

    # ---- delegation -------------------------------------------------------------------------
    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_engine"), name)

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    @property
    def engine(self):
        """The wrapped DeepSpeedEngine."""
        return self._engine

    @property
    def module(self):
        return self._engine.module

    # ---- helpers -----------------------------------------------------------------------------
    def _to_device(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("each micro-batch must be a dict with 'input_ids' (and optionally 'labels', "
                            f"'attention_mask'); got {type(batch).__name__}")
        dev = self._engine.device
        return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    @staticmethod
    def _rng_state():
        state = [torch.random.get_rng_state()]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state.append(torch.cuda.get_rng_state())
        return state

    @staticmethod
    def _set_rng_state(state):
        torch.random.set_rng_state(state[0])
        if len(state) > 1:
            torch.cuda.set_rng_state(state[1])

    def _forward_logits(self, batch):
        outputs = self._engine(**_model_inputs(batch))
        logits = logits_of(outputs)
        if logits is None and self.sam.functional:
            raise FSAMConfigError(f"optimizer.type {self.sam.method} needs a model whose forward returns logits "
                                  f"(a tensor or an object with .logits); got {type(outputs).__name__}. "
                                  "Accepted for such models: AdamW, SAM, PreconditionedSAM")
        return outputs, logits

    def _loss(self, outputs, logits, batch):
        if logits is not None:
            return self.loss_fn(logits, batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
            loss = outputs
        if loss is None:
            raise TypeError("the model returned neither logits nor a loss; give fsam_ds.initialize a loss_fn "
                            "or return logits from forward")
        return loss

    def _backward_pass(self, batches, logit_grads=None, rng_states=None, keep_logit_grads=False):
        """Forward and backward over the micro-batches with the accumulation boundary on the last.

        Returns (losses, logit grads kept for FunctionalSAM, rng state before each micro-batch).
        With ``logit_grads`` given (FunctionalSAM pass 2) the surrogate is backpropagated instead.
        """
        eng = self._engine
        losses, kept, states = [], [], []
        n = len(batches)
        for i, batch in enumerate(batches):
            eng.set_gradient_accumulation_boundary(i == n - 1)
            if rng_states is not None:
                self._set_rng_state(rng_states[i])
            elif self.sam.is_sam:
                states.append(self._rng_state())
            outputs, logits = self._forward_logits(batch)
            if logit_grads is not None:
                eng.backward(functional_surrogate(logits, logit_grads[i]))
                continue
            if keep_logit_grads:
                leaf = logits.detach().requires_grad_(True)
                loss = self.loss_fn(leaf, batch)
                (g_f,) = torch.autograd.grad(loss, leaf)
                kept.append(g_f)
                eng.backward(functional_surrogate(logits, g_f))
            else:
                loss = self._loss(outputs, logits, batch)
                eng.backward(loss)
            losses.append(loss.detach().float())
        return losses, kept, states

    def _mean_loss(self, losses) -> torch.Tensor:
        loss = torch.stack(losses).mean()
        if dist.is_initialized() and self._engine.dp_world_size > 1:
            loss = loss.clone()
            dist.all_reduce(loss, group=self._engine.data_parallel_group)
            loss /= self._engine.dp_world_size
        return loss

    def adam_steps_taken(self) -> int:
        """AdamW updates applied so far (DeepSpeed's step count less its skipped steps)."""
        return int(self._engine.global_steps) - int(getattr(self._engine, "skipped_steps", 0))

    def current_rho(self) -> float:
        return rho_at(int(self._engine.global_steps), self.sam.rho, self.sam.rho_warmup_steps)

    def compute_ascent(self, rho: float) -> Ascent:
        """The ascent from the current (pass-1) gradients of this rank."""
        view = self.view
        denoms = view.denominators(self.adam_steps_taken()) if self.sam.preconditioned else None
        return ascent_direction(view.grads(), rho, denoms, self.sam.precondition_norm,
                                group=view.norm_group, grad_scale=view.grad_scale)

    # ---- the step ----------------------------------------------------------------------------
    def train_batch(self, data_iter: Optional[Iterator] = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``data_iter``
        (or the engine's own training dataloader). Returns the mean pass-1 loss."""
        eng = self._engine
        if data_iter is None:
            if self._data_iter is None:
                if eng.training_dataloader is None:
                    raise ValueError("train_batch needs a data iterator (or training_data given to initialize)")
                self._data_iter = iter(eng.training_dataloader)
            data_iter = self._data_iter
        t0 = time.perf_counter()
        gas = eng.gradient_accumulation_steps()
        batches = [self._to_device(next(data_iter)) for _ in range(gas)]
        eng.module.train()
        sam = self.sam
        skipped_before = int(getattr(eng, "skipped_steps", 0))
        rho = self.current_rho() if sam.is_sam else 0.0

        losses, logit_grads, rng_states = self._backward_pass(batches, keep_logit_grads=sam.functional)
        grad_norm = eps_norm = None
        if sam.is_sam:
            ascent = self.compute_ascent(rho)
            grad_norm, eps_norm = ascent.grad_norm, ascent.eps_norm
            if not (ascent.is_zero and self.skip_unperturbed_pass2):
                rng_after = self._rng_state()
                self.view.perturb(ascent)
                del ascent
                self.view.zero_grad()
                self._backward_pass(batches, logit_grads=logit_grads if sam.functional else None,
                                    rng_states=rng_states)
                self._set_rng_state(rng_after)
                self.view.restore()
            else:
                del ascent
        elif self.view.norm_group is None:
            # AdamW on unsharded gradients: a local norm, no communication
            grad_norm = global_norm(self.view.grads()) / self.view.grad_scale
        del logit_grads
        lr = float(eng.get_lr()[0])  # the learning rate this step uses
        eng.micro_steps += gas - 1  # DeepSpeed counts micro-batches; step() adds the last one
        eng.step()
        # hand the accumulation boundary back to DeepSpeed's own micro-step counting
        eng._is_gradient_accumulation_boundary = None
        if grad_norm is None:  # AdamW under ZeRO: the norm DeepSpeed's step computed anyway
            grad_norm = eng.get_global_grad_norm()
        loss = self._mean_loss(losses)
        self.last_metrics = {
            "method": sam.method,
            "loss": float(loss),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "eps_norm": float(eps_norm) if eps_norm is not None else 0.0,
            "rho": rho,
            "lr": lr,
            "skipped": int(getattr(eng, "skipped_steps", 0)) > skipped_before,
            "step_time": time.perf_counter() - t0,
        }
        if sam.sharpness_every and int(eng.global_steps) % sam.sharpness_every == 0:
            self._record_sharpness(batches[0])
        return loss

    def _record_sharpness(self, batch) -> None:
        """``optimizer.params.sharpness_every``: :func:`fsam_ds.sharpness.training_diagnostics` on
        the step's first micro-batch, after the step (not counted in ``step_time``), into
        ``last_metrics`` and DeepSpeed's monitors (TensorBoard, CSV, ... when configured)."""
        from .sharpness import training_diagnostics

        rng = self._rng_state()
        values, self._sharpness_vector = training_diagnostics(self, batch, init=self._sharpness_vector)
        self._set_rng_state(rng)
        self.last_metrics.update(values)
        monitor = getattr(self._engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            samples = int(getattr(self._engine, "global_samples", self._engine.global_steps))
            monitor.write_events([(f"Train/Sharpness/{k}", float(v), samples) for k, v in values.items()])

    @torch.no_grad()
    def eval_batch(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Loss of one micro-batch in eval mode (no gradients, weights untouched)."""
        was_training = self._engine.module.training
        self._engine.module.eval()
        try:
            batch = self._to_device(batch)
            outputs = self._engine(**_model_inputs(batch))
            logits = logits_of(outputs)
            return self._loss(outputs, logits, batch).detach().float()
        finally:
            self._engine.module.train(was_training)
