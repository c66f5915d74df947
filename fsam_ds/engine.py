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

A non-finite loss or gradient in either pass skips the step through DeepSpeed's own overflow path
(no update, gradients cleared, ``skipped_steps`` counted, the LR schedule held, the fp16 loss scale
lowered): a non-finite pass-1 gradient gives no perturbation, so pass 2 is not run and pass 1's
gradients reach the step; a non-finite pass-2 gradient reaches it after the exact restore.
DeepSpeed checks ZeRO 1-3 and mixed precision at ZeRO 0 itself (bf16 at ZeRO 1/2 only with
``bf16.check_grad_overflow``, which the engine switches on); at ZeRO 0 in fp32 DeepSpeed has no
check, so the engine tests the gradients and takes the same path (:meth:`FSAMEngine._skip_step`).
The rho warm-up counts applied updates, as DeepSpeed's LR scheduler does.

Where FunctionalSAM keeps ``g_F`` between the passes is ``optimizer.params.logit_grad_cache``:
``"device"`` (tokens x vocab per micro-batch in the logits' dtype, on the accelerator), ``"host"``
(the same tensors in pinned host memory, copied out and back on a side stream) or ``"recompute"``
(the output layer's input, tokens x hidden, plus the unperturbed output-layer weight; pass 2
recomputes ``g_F`` with the same operations in the same dtype, so all three give identical
weights).

``optimizer.params.ascent_every: k > 1`` recomputes ``eps`` only every k-th optimizer step and
reuses the last direction (rescaled to the current rho) in between: SAM then skips pass 1
entirely and FunctionalSAM runs pass 1 as a forward at theta (no backward), taking ``g_F`` by
autograd on the detached logits. The reused direction is held per rank in the layout the rank
holds and is part of :meth:`FSAMEngine.state_dict`.

``optimizer.params.ascent_direction: "momentum"`` takes ``eps`` from AdamW's first moment ``m``
instead of this step's gradient (``rho M^-1 m / ||M^-1 m||`` for the preconditioned types,
``rho m / ||m||`` for the others), so no pass-1 backward is needed: SAM skips pass 1 and
FunctionalSAM's pass 1 is a forward at theta for g_F, as on ``ascent_every``'s reusing steps. Until
AdamW's first update (no ``m`` yet) the step is exact. ``m`` is DeepSpeed's optimizer state, so its
checkpoints carry it. ``train_batch`` only: loop mode refuses it (a loop's own backward is pass 1).

``last_metrics`` of the SAM types has ``eps_share_embed`` and ``eps_share_output``: the share of
``||eps||^2`` on the input-embedding matrix and on the output layer (``get_input_embeddings()``,
``get_output_embeddings()``; the same for tied weights; None without a perturbation or such a
module), summed in the norms' own all-reduce.

Everything else (``module``, ``save_checkpoint``, ``load_checkpoint``, ``get_lr``, ...) is the
wrapped DeepSpeedEngine's own.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
import torch.distributed as dist

from .caches import CudaCopyOps, HostLogitGradCache, LogitGradCache, RecomputeLogitGradCache, make_logit_grad_cache  # noqa: F401 (public here too)
from .config import FSAMConfigError, SAMConfig
from .distributed import mean_over
from .lm import LossFn, default_loss, finite_or_nan, labels_of, logit_grad, logits_of, model_inputs  # noqa: F401
from .method import functional_surrogate, global_norm
from .shards import PlainView, make_view
from .step import SAMStep, StepOutcome, step_metrics


def _no_update(*args, **kwargs):
    return None


def share_params(module: torch.nn.Module) -> Dict[str, list]:
    """The trainable parameters of the input embedding (``get_input_embeddings()``, its weight)
    and of the output layer (:func:`fsam_ds.loop.output_layer`) by :data:`fsam_ds.names.SHARE_KEYS`; empty when
    the model names neither."""
    from .loop import model_layer, output_layer

    embed = model_layer(module, "get_input_embeddings")
    out = output_layer(module)
    w = getattr(embed, "weight", None)
    parts = {
        "eps_share_embed": [w] if isinstance(w, torch.nn.Parameter) and w.requires_grad else [],
        "eps_share_output": [p for p in out.parameters() if p.requires_grad] if out is not None else [],
    }
    return parts if any(parts.values()) else {}


class FSAMEngine:
    """A DeepSpeedEngine whose ``train_batch`` runs the configured method.

    Attributes not defined here are the wrapped engine's (``engine.module``,
    ``engine.save_checkpoint``, ...). ``last_metrics`` holds the metrics of the latest step:
    ``loss`` (mean pass-1 loss over micro-batches and data-parallel ranks), ``grad_norm`` (global
    ``||g||`` of the pass-1 gradient), ``eps_norm``, ``rho``, ``lr``, ``method``, ``skipped``
    (whether DeepSpeed skipped the update, e.g. on fp16 overflow) and ``step_time``; for the SAM
    types also ``eps_share_embed`` and ``eps_share_output`` (share of ``||eps||^2`` on the input
    embedding and on the output layer; None without a perturbation), ``ascent_reused`` with
    ``ascent_every > 1`` and ``ascent_momentum`` with ``ascent_direction: "momentum"``.
    """

    def __init__(self, engine, sam: SAMConfig, loss_fn: Optional[LossFn] = None):
        object.__setattr__(self, "_engine", engine)
        self.sam = sam
        self.loss_fn: LossFn = loss_fn or default_loss
        self.user_loss_fn: Optional[LossFn] = loss_fn
        cls = type(engine)
        # DeepSpeed's own backward and step (loop mode replaces them on the engine instance)
        self._ds_backward = cls.backward.__get__(engine)
        self._ds_step = cls.step.__get__(engine)
        if sam.is_sam and getattr(engine, "has_moe_layers", False):
            raise FSAMConfigError(
                f"optimizer.type {sam.method} with DeepSpeed MoE layers is not supported: expert "
                "parameters would be normed over the wrong group; accepted for MoE models: AdamW"
            )
        self.view = make_view(engine)
        self.last_metrics: Dict[str, Any] = {}
        # DeepSpeed's overflow check at every layout: ZeRO 1/2 in bf16 checks only when asked
        # (bf16.check_grad_overflow); ZeRO 0 in fp32 has no check at all, the engine does it
        opt = engine.optimizer
        if getattr(opt, "check_grad_overflow", None) is False:
            opt.check_grad_overflow = True
        self._own_overflow_check = isinstance(self.view, PlainView)
        self._data_iter: Optional[Iterator] = None
        self._sharpness_vector = None  # warm start of the in-training lambda_max
        self.logit_grads: Optional[LogitGradCache] = None
        if sam.functional:
            self.logit_grads = make_logit_grad_cache(
                sam.logit_grad_cache, engine.module, getattr(self.view, "saved_copy", None), self.loss_fn
            )
        self._share_params = share_params(engine.module) if sam.is_sam else {}
        # the step skeleton: passes 1-5, the rho warm-up and what ascent_every keeps between steps
        self.sam_step = SAMStep(sam, self.view, self.adam_updates, lambda: int(engine.global_steps), self._share_params)
        self._loop = None
        if sam.is_sam:
            from .loop import LoopMode

            self._loop = LoopMode(self)
        engine._fsam_engine = self

    # ---- delegation -------------------------------------------------------------------------
    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_engine"), name)

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The engine's forward (recorded for the step in loop mode, as ``engine(...)`` is)."""
        return self._engine(*args, **kwargs)

    def backward(self, loss, retain_graph: bool = False, scale_wrt_gas: bool = True):
        """DeepSpeed's ``backward``; in loop mode with a SAM type, pass 1 of the step (see
        :mod:`fsam_ds.loop`)."""
        return self._engine.backward(loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)

    def step(self, lr_kwargs=None):
        """DeepSpeed's ``step``; in loop mode with a SAM type, at the accumulation boundary the
        method's pass 2, exact restore and update (see :mod:`fsam_ds.loop`)."""
        return self._engine.step(lr_kwargs)

    @property
    def engine(self):
        """The wrapped DeepSpeedEngine."""
        return self._engine

    @property
    def skip_unperturbed_pass2(self) -> bool:
        """Whether pass 2 is left out when the perturbation is zero (rho = 0, ``||g|| = 0``): its
        gradients would be pass 1's. Tests switch it off to run both passes."""
        return self.sam_step.skip_unperturbed_pass2

    @skip_unperturbed_pass2.setter
    def skip_unperturbed_pass2(self, value: bool) -> None:
        self.sam_step.skip_unperturbed_pass2 = bool(value)

    @property
    def module(self):
        return self._engine.module

    # ---- helpers -----------------------------------------------------------------------------
    def _to_device(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                "each micro-batch must be a dict with 'input_ids' (and optionally 'labels', "
                f"'attention_mask'); got {type(batch).__name__}"
            )
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
        outputs = self._engine(**model_inputs(batch))
        if getattr(outputs, "aux_loss", None) is not None:
            raise FSAMConfigError(
                f"optimizer.type {self.sam.method}: the model's output carries an aux_loss (a MoE router loss) that "
                "train_batch, which builds the loss from the logits, would drop; run the model without it "
                "(output_router_logits=False), or train in loop mode and backward outputs.loss (AdamW, SAM, "
                "PreconditionedSAM)"
            )
        logits = logits_of(outputs)
        if logits is None and self.sam.functional:
            raise FSAMConfigError(
                f"optimizer.type {self.sam.method} needs a model whose forward returns logits "
                f"(a tensor or an object with .logits); got {type(outputs).__name__}. "
                "Accepted for such models: AdamW, SAM, PreconditionedSAM"
            )
        return outputs, logits

    def _loss(self, outputs, logits, batch):
        if logits is not None:
            return self.loss_fn(logits, batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, torch.Tensor) and outputs.dim() == 0:
            loss = outputs
        if loss is None:
            raise TypeError(
                "the model returned neither logits nor a loss; give fsam_ds.initialize a loss_fn "
                "or return logits from forward"
            )
        return loss

    def _backward_pass(self, batches, logit_grads=None, rng_states=None, keep_logit_grads=False):
        """Forward and backward over the micro-batches with the accumulation boundary on the last.

        Returns (losses, rng state before each micro-batch). With ``keep_logit_grads`` (FunctionalSAM
        pass 1) ``g_F`` of each micro-batch goes into ``logit_grads`` (a :class:`LogitGradCache`);
        with ``logit_grads`` and not ``keep_logit_grads`` (FunctionalSAM pass 2) the surrogate
        ``sum F * stopgrad(g_F)`` is backpropagated instead of the loss.
        """
        eng = self._engine
        losses, states = [], []
        n = len(batches)
        recompute = isinstance(logit_grads, RecomputeLogitGradCache)
        if recompute and keep_logit_grads:
            logit_grads.capturing = True
        for i, batch in enumerate(batches):
            eng.set_gradient_accumulation_boundary(i == n - 1)
            if rng_states is not None:
                self._set_rng_state(rng_states[i])
            elif self.sam.is_sam:
                states.append(self._rng_state())
            if logit_grads is not None and not keep_logit_grads:
                # g_F first: a recomputed one then lives before this micro-batch's activations
                g_f = logit_grads.get(i, batch)
                _, logits = self._forward_logits(batch)
                self._ds_backward(functional_surrogate(logits, g_f))
                continue
            outputs, logits = self._forward_logits(batch)
            if keep_logit_grads:
                if recompute:
                    logit_grads.put_hidden(i, logits)
                loss, g_f = logit_grad(self.loss_fn, logits, batch)
                logit_grads.put(i, g_f)
                self._ds_backward(functional_surrogate(logits, g_f))
            else:
                loss = self._loss(outputs, logits, batch)
                self._ds_backward(loss * finite_or_nan(loss) if self.sam.is_sam else loss)
            losses.append(loss.detach().float())
        if recompute:
            logit_grads.capturing = False
        return losses, states

    @torch.no_grad()
    def _forward_pass(self, batches, logit_grads: LogitGradCache):
        """FunctionalSAM pass 1 of a step that reuses the ascent direction: a forward at theta
        per micro-batch (no graph kept), ``g_F`` by autograd on the detached logits only.
        Returns (losses, rng state before each micro-batch)."""
        losses, states = [], []
        hidden = logit_grads if isinstance(logit_grads, RecomputeLogitGradCache) else None
        if hidden is not None:
            hidden.capturing = True
        for i, batch in enumerate(batches):
            states.append(self._rng_state())
            _, logits = self._forward_logits(batch)
            if hidden is not None:
                hidden.put_hidden(i, logits)
            loss, g_f = logit_grad(self.loss_fn, logits, batch)
            del logits
            logit_grads.put(i, g_f)
            losses.append(loss.detach().float())
        if hidden is not None:
            hidden.capturing = False
        return losses, states

    def _mean_loss(self, losses) -> torch.Tensor:
        loss = torch.stack(losses).mean()
        if dist.is_initialized() and self._engine.dp_world_size > 1:
            loss = mean_over(loss.clone(), self._engine.data_parallel_group)
        return loss

    def adam_updates(self) -> int:
        """AdamW updates applied so far (DeepSpeed's step count less its skipped steps)."""
        return int(self._engine.global_steps) - int(getattr(self._engine, "skipped_steps", 0))

    def current_rho(self) -> float:
        """rho of the coming step: the warm-up counts applied updates (a skipped step does not
        advance it, as it does not advance DeepSpeed's LR scheduler)."""
        return self.sam_step.current_rho()

    def compute_ascent(self, rho: float, momentum: bool = False):
        """The ascent from the current (pass-1) gradients of this rank, or with ``momentum`` from
        AdamW's first moment (:meth:`fsam_ds.step.SAMStep.compute_ascent`)."""
        return self.sam_step.compute_ascent(rho, momentum)

    def reuses_ascent(self) -> bool:
        """``ascent_every: k > 1``: whether the coming step reuses the stored direction."""
        return self.sam_step.reuses_ascent()

    def _final_grads_finite(self, grad_norm, sam_passes: bool) -> bool:
        """Whether the gradients about to reach the step are finite (ZeRO 0 fp32 only: elsewhere
        DeepSpeed's step checks). After the boundary backward every rank holds the same averaged
        gradients, so the verdict needs no communication."""
        norm = global_norm(self.view.grads()) if sam_passes or grad_norm is None else grad_norm
        return bool(torch.isfinite(norm))

    def _skip_step(self, lr_kwargs=None) -> None:
        """DeepSpeed's overflow path for an optimizer without one (ZeRO 0, fp32): ``engine.step()``
        with the update itself left out and ``optimizer.overflow`` set, so DeepSpeed clears the
        gradients, counts ``skipped_steps``, holds the LR scheduler and advances ``global_steps``
        exactly as it does on an fp16 overflow."""
        opt = self._engine.optimizer
        opt.overflow = True
        opt.step = _no_update
        try:
            self._ds_step(lr_kwargs)
        finally:
            del opt.step
            del opt.overflow

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What this rank needs, beyond DeepSpeed's own checkpoint, to continue exactly: with
        ``ascent_every > 1`` the stored ascent direction (this rank's tensors, in the layout the
        rank holds: whole parameters at ZeRO 0, flat partitions at ZeRO 1/2, ``ds_tensor``
        partitions at ZeRO 3), its norm and the step it was computed at. Under ZeRO each rank's
        differs: save one per rank (``fsam-train`` does)."""
        return self.sam_step.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on the same rank and layout; ValueError
        for a direction of another layout)."""
        self.sam_step.load_state_dict(dict(state), self._engine.device)

    # ---- the step ----------------------------------------------------------------------------
    def train_batch(self, data_iter: Optional[Iterator] = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``data_iter``
        (or the engine's own training dataloader). Returns the mean pass-1 loss."""
        loop = self._loop
        if loop is None:
            return self._train_batch(data_iter)
        if loop.records:
            from .loop import LoopModeError

            raise LoopModeError(
                "train_batch() in the middle of a step of your own loop (forwards recorded since the "
                "last step()); finish that step with engine.step() first"
            )
        loop.mode = "off"
        try:
            return self._train_batch(data_iter)
        finally:
            loop.mode = "record"

    def _train_batch(self, data_iter: Optional[Iterator]) -> torch.Tensor:
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
        skipped_before = int(getattr(eng, "skipped_steps", 0))
        try:
            out = self.sam_step.run(BatchPasses(self, batches))
        finally:
            if self.logit_grads is not None:
                self.logit_grads.clear()
        if not self.sam.is_sam and self.view.norm_group is None:
            # AdamW on unsharded gradients: a local norm, no communication
            out.grad_norm = global_norm(self.view.grads()) / self.view.grad_scale
        eng.micro_steps += gas - 1  # DeepSpeed counts micro-batches; step() adds the last one
        self._finish_step(t0, out, skipped_before, batches[0])
        return self.last_metrics_loss

    def _loop_update(self, loop, lr_kwargs=None) -> None:
        """Loop mode at the accumulation boundary (:meth:`fsam_ds.loop.LoopMode.step`): pass 1
        was the loop's own; the ascent, pass 2 over the recorded micro-batches, the restore and
        DeepSpeed's step, as in :meth:`train_batch`."""
        eng = self._engine
        skipped_before = int(getattr(eng, "skipped_steps", 0))
        boundary = eng._is_gradient_accumulation_boundary
        losses = [r.value for r in loop.records]
        try:
            out = self.sam_step.run(LoopPasses(self, loop), pass1=(losses, loop.records))
        finally:
            if self.logit_grads is not None:
                self.logit_grads.clear()
        out.losses = losses
        self._finish_step(
            loop.step_start_time(), out, skipped_before, loop.records[0].batch(), lr_kwargs=lr_kwargs, boundary=boundary
        )

    def _finish_step(
        self, t0, out: StepOutcome, skipped_before: int, first_batch, lr_kwargs=None, boundary=None
    ) -> None:
        """DeepSpeed's step (or its overflow path) after the restore, then the step's metrics."""
        eng, sam = self._engine, self.sam
        lr = float(eng.get_lr()[0])  # the learning rate this step uses
        if self._own_overflow_check and not self._final_grads_finite(out.grad_norm, sam.is_sam):
            self._skip_step(lr_kwargs)
        else:
            self._ds_step(lr_kwargs)
        # hand the accumulation boundary back to whoever set it (DeepSpeed's own micro-step counting)
        eng._is_gradient_accumulation_boundary = boundary
        if out.grad_norm is None and not (out.reused or out.momentum):
            out.grad_norm = eng.get_global_grad_norm()  # AdamW under ZeRO: the norm DeepSpeed's step computed
        loss = self._mean_loss(out.losses)
        self.last_metrics_loss = loss
        skipped = int(getattr(eng, "skipped_steps", 0)) > skipped_before
        self.last_metrics = step_metrics(
            sam, out, float(loss), lr, skipped, time.perf_counter() - t0, bool(self._share_params)
        )
        self._write_monitor({k: self.last_metrics[k] for k in ("grad_norm", "eps_norm", "rho")})
        if sam.sharpness_every and int(eng.global_steps) % sam.sharpness_every == 0:
            self._record_sharpness(first_batch)

    def _write_monitor(self, values: Mapping[str, Any], prefix: str = "Train/FSAM") -> None:
        """Per-step values into DeepSpeed's monitors (TensorBoard, CSV, W&B when configured)."""
        monitor = getattr(self._engine, "monitor", None)
        if monitor is None or not getattr(monitor, "enabled", False):
            return
        samples = int(getattr(self._engine, "global_samples", self._engine.global_steps))
        monitor.write_events([(f"{prefix}/{k}", float(v), samples) for k, v in values.items() if v is not None])

    def _record_sharpness(self, batch) -> None:
        """``optimizer.params.sharpness_every``: :func:`fsam_ds.sharpness.training_diagnostics` on
        the step's first micro-batch, after the step (not counted in ``step_time``), into
        ``last_metrics`` and DeepSpeed's monitors (TensorBoard, CSV, ... when configured)."""
        from .sharpness import training_diagnostics

        rng = self._rng_state()
        values, self._sharpness_vector = training_diagnostics(self, batch, init=self._sharpness_vector)
        self._set_rng_state(rng)
        self.last_metrics.update(values)
        self._write_monitor(values, "Train/Sharpness")

    @torch.no_grad()
    def eval_batch(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Loss of one micro-batch in eval mode (no gradients, weights untouched)."""
        was_training = self._engine.module.training
        self._engine.module.eval()
        try:
            batch = self._to_device(batch)
            outputs = self._engine(**model_inputs(batch))
            logits = logits_of(outputs)
            return self._loss(outputs, logits, batch).detach().float()
        finally:
            self._engine.module.train(was_training)


class BatchPasses:
    """``train_batch``'s passes over its micro-batches (a :class:`fsam_ds.step.Passes`)."""

    def __init__(self, fsam: FSAMEngine, batches: list):
        self.fsam, self.batches = fsam, batches
        self.rng_state, self.set_rng_state = fsam._rng_state, fsam._set_rng_state

    def pass1(self) -> Tuple[list, Any]:
        fsam = self.fsam
        return fsam._backward_pass(self.batches, logit_grads=fsam.logit_grads, keep_logit_grads=fsam.sam.functional)

    def forward_pass(self) -> Tuple[list, Any]:
        cache = self.fsam.logit_grads
        assert cache is not None  # forward_pass is FunctionalSAM's, which has a cache
        return self.fsam._forward_pass(self.batches, cache)

    def pass2(self, replay) -> list:
        fsam = self.fsam
        return fsam._backward_pass(
            self.batches, logit_grads=fsam.logit_grads if fsam.sam.functional else None, rng_states=replay
        )[0]


class LoopPasses:
    """Loop mode's passes: pass 1 was the loop's own; pass 2 replays the recorded micro-batches
    (:meth:`fsam_ds.loop.LoopMode.replay`)."""

    def __init__(self, fsam: FSAMEngine, loop):
        self.loop = loop
        self.rng_state, self.set_rng_state = fsam._rng_state, fsam._set_rng_state

    def pass1(self):  # never called: SAMStep.run is given the loop's pass 1
        raise RuntimeError("loop mode: pass 1 is the loop's own")

    forward_pass = pass1

    def pass2(self, replay) -> list:
        self.loop.replay()
        return []
