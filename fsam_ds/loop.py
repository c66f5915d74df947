"""Loop mode: the configured method inside a training loop that is not ours.

A DeepSpeed user's loop (and the Hugging Face Trainer, Accelerate, ...) calls, per micro-batch,
``engine(inputs)``, ``engine.backward(loss)`` and ``engine.step()``. :class:`LoopMode` is installed
on the :class:`deepspeed.DeepSpeedEngine` instance itself (forward hooks, and its ``backward`` and
``step`` replaced on that one object), so every front end that holds the engine runs the method:

* each forward in train mode with gradients enabled is *recorded*: its inputs (by reference) and
  the random state before it;
* ``backward(loss)`` checks where the loss comes from and runs DeepSpeed's own backward: that is
  pass 1, with DeepSpeed's accumulation, loss scaling and data-parallel reduction. FunctionalSAM
  keeps ``g_F``, the gradient that reached the logits in that backward (already carrying every
  factor the loop and DeepSpeed put on the loss), in the ``logit_grad_cache``; SAM keeps the
  gradient that reached the loss it will recompute at ``theta + eps`` (the model's own output
  loss, or ``loss_fn``);
* ``step()`` at the accumulation boundary computes the ascent from the accumulated, rank-averaged
  gradient, replays every recorded micro-batch of the step at ``theta + eps`` with its random
  state (pass 2), restores ``theta`` exactly and takes DeepSpeed's step; between boundaries it is
  DeepSpeed's ``step()``.

Everything the method cannot follow is refused with one error before it changes anything: a
``step()`` at the boundary with no recorded forward, a backward of a loss that did not come from
this step's forwards, a forward left without its backward, a SAM loss the engine cannot recompute,
a FunctionalSAM loss that reaches the weights other than through the logits,
``ascent_direction: "momentum"`` (whose only point, no pass-1 backward, a loop cannot give).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from .config import FSAMConfigError
from .lm import finite_or_nan, logit_grad, logits_of
from .method import functional_surrogate

RECORD, OFF, REPLAY = "record", "off", "replay"

# one-input autograd nodes that multiply a scalar loss by a constant (and casts/copies of it)
_SCALING_NODES = {
    "MulBackward0",
    "MulBackward1",
    "DivBackward0",
    "DivBackward1",
    "NegBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "MeanBackward0",
    "SumBackward0",
    "ViewBackward0",
    "AliasBackward0",
}


class LoopModeError(RuntimeError):
    """A training loop did something the configured method cannot follow exactly."""


class MicroBatch:
    """What loop mode keeps of one recorded forward until the end of its step."""

    __slots__ = (
        "index",
        "args",
        "kwargs",
        "rng",
        "logits",
        "logits_node",
        "source",
        "source_node",
        "recompute",
        "loss_grad",
        "has_backward",
        "scale_wrt_gas",
        "value",
        "pass2",
        "handles",
        "outputs_logits",
    )

    def __init__(self, index: int, args: tuple, kwargs: dict, rng: list):
        self.index, self.args, self.kwargs, self.rng = index, args, kwargs, rng
        self.logits: Optional[torch.Tensor] = None  # F (FunctionalSAM) until its backward
        self.logits_node: Any = None  # its autograd node
        self.source: Optional[torch.Tensor] = None  # the model's own output loss until its backward
        self.source_node: Any = None  # its autograd node
        self.recompute: Optional[Callable[[], torch.Tensor]] = None
        self.loss_grad: Optional[torch.Tensor] = None  # d(loop's loss)/d(source), SAM
        self.has_backward = False
        self.scale_wrt_gas = True
        self.value: Optional[torch.Tensor] = None  # the loss for the metrics
        self.pass2 = ""  # "surrogate", "source" or "loss_fn"
        self.handles: list = []
        self.outputs_logits = None  # SAM with loss_fn: the returned logits

    def batch(self) -> Dict[str, Any]:
        """The micro-batch as ``loss_fn(logits, batch)`` sees it: the keyword inputs of the
        forward, and its first positional input as ``input_ids``."""
        batch = dict(self.kwargs)
        if self.args and isinstance(self.args[0], torch.Tensor):
            batch.setdefault("input_ids", self.args[0])
        return batch

    def drop_graph(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.logits = self.logits_node = self.source = self.source_node = self.outputs_logits = None


def output_loss(outputs: Any) -> Optional[torch.Tensor]:
    """The loss a model returned: ``outputs.loss`` / ``outputs["loss"]`` (Hugging Face), or the
    output itself when it is a scalar tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dim() == 0 else None
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


def model_layer(module: torch.nn.Module, getter: str) -> Optional[torch.nn.Module]:
    """``getattr(model, getter)()`` (Hugging Face's ``get_input_embeddings`` /
    ``get_output_embeddings``) of the model, or of the first submodule that has one (a model
    inside a wrapper); None when none names a module."""
    for m in module.modules():
        get = getattr(m, getter, None)
        if callable(get):
            try:
                layer = get()
            except (NotImplementedError, AttributeError):
                continue
            if isinstance(layer, torch.nn.Module):
                return layer
    return None


def output_layer(module: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The module that produces the logits (``get_output_embeddings()``)."""
    return model_layer(module, "get_output_embeddings")


def scaled_from(root, target) -> bool:
    """Whether the scalar at autograd node ``root`` is the one at ``target`` times constants."""
    node = root
    while node is not None:
        if node is target:
            return True
        if type(node).__name__ not in _SCALING_NODES:
            return False
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        node = nxt[0]
    return False


def reached_nodes(root, stops: Mapping[Any, Any]):
    """Walk the autograd graph from ``root`` down to the nodes in ``stops``. Returns (the values
    of ``stops`` reached, whether a trainable leaf is reached other than through them)."""
    seen, stack, reached, leak = set(), [root], [], False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in stops:
            reached.append(stops[node])
            continue
        if type(node).__name__ == "AccumulateGrad":
            leak = True
            continue
        stack.extend(f for f, _ in node.next_functions)
    return reached, leak


def momentum_refusal(sam) -> str:
    """The one-line refusal of ``ascent_direction: "momentum"`` outside ``train_batch``."""
    return (
        f'optimizer.params.ascent_direction "{sam.ascent_direction}" runs only in engine.train_batch: it saves '
        "the pass-1 backward, and in your own loop (engine.backward / engine.step, the Hugging Face Trainer, "
        'Accelerate, Lightning) that backward is the loop\'s own and always runs; accepted there: "gradient"'
    )


class LoopMode:
    """Loop mode of one :class:`~fsam_ds.engine.FSAMEngine` (see the module docstring)."""

    def __init__(self, fsam):
        self.fsam = fsam
        ds = fsam.engine
        self.ds = ds
        self.sam = fsam.sam
        self.mode = RECORD
        self.records: List[MicroBatch] = []
        self._open: Optional[MicroBatch] = None
        self._layer_out = None
        self._first_forward_time: Optional[float] = None
        self._scale_wrt_gas = True
        self._recompute_checked = False
        self._loss_fn_checked = False
        cls = type(ds)
        self.ds_backward = cls.backward.__get__(ds)
        self.ds_step = cls.step.__get__(ds)
        self.layer = output_layer(ds.module) if self.sam.functional else None
        self._hooks = [
            ds.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            ds.register_forward_hook(self._post_forward, with_kwargs=True),
        ]
        if self.layer is not None:
            self._hooks.append(self.layer.register_forward_hook(self._layer_hook))
        ds.backward = self.backward
        ds.step = self.step

    # ---- recording ----------------------------------------------------------------------------
    def _layer_hook(self, module, args, output):
        if self.mode == REPLAY or self._open is not None:
            self._layer_out = output if isinstance(output, torch.Tensor) else None

    def _pre_forward(self, module, args, kwargs):
        if self.mode == REPLAY:
            self._layer_out = None
            return None
        if self.mode != RECORD or not torch.is_grad_enabled() or not self.ds.module.training:
            return None
        if self.sam.ascent_direction != "gradient":
            raise FSAMConfigError(momentum_refusal(self.sam))
        if self._open is not None:
            raise LoopModeError("engine forward called inside another recorded forward")
        if not self.records:
            self._first_forward_time = time.perf_counter()
        rec = MicroBatch(len(self.records), tuple(args), dict(kwargs), self.fsam._rng_state())
        self._open = rec
        self._layer_out = None
        cache = self.fsam.logit_grads
        if self._recompute():
            cache.capturing = True
        return None

    def _recompute(self) -> bool:
        cache = self.fsam.logit_grads
        return cache is not None and cache.mode == "recompute"

    def logits(self, outputs, layer_out) -> Optional[torch.Tensor]:
        """F: the output layer's output when it is the logits the model returned (the tensor the
        model's own loss is computed from), else the returned logits."""

        logits = logits_of(outputs)
        if isinstance(layer_out, torch.Tensor) and (
            logits is None
            or (
                layer_out.data_ptr() == logits.data_ptr()
                and layer_out.shape == logits.shape
                and layer_out.dtype == logits.dtype
            )
        ):
            return layer_out
        return logits

    def _post_forward(self, module, args, kwargs, outputs):
        rec, self._open = self._open, None
        layer_out, self._layer_out = self._layer_out, None
        if self.mode == REPLAY:
            self._layer_out = layer_out
            return None
        if rec is None:
            return None

        sam = self.sam
        self.records.append(rec)
        if sam.functional:
            F = self.logits(outputs, layer_out)
            if F is None or F.grad_fn is None:
                hint = (
                    "; TRL's SFTTrainer computes its loss with a fused LM head that never materialises the "
                    "logits: give it compute_loss_func=fsam_ds.hf.causal_lm_loss_func"
                    if getattr(outputs, "log_probs", None) is not None
                    else ""
                )
                raise FSAMConfigError(
                    f"optimizer.type {sam.method} needs a model whose forward returns logits (a "
                    "tensor or an object with .logits) that depend on the weights; got "
                    f"{type(outputs).__name__}{hint}. Accepted for such models: AdamW, SAM, "
                    "PreconditionedSAM"
                )
            if self._recompute():
                cache = self.fsam.logit_grads
                cache.capturing = False
                cache.put_hidden(rec.index, logits_of(outputs) if logits_of(outputs) is not None else F)
            rec.logits, rec.logits_node = F, F.grad_fn
            rec.handles.append(F.grad_fn.register_prehook(functools.partial(self._take_logit_grad, rec, F.output_nr)))
        else:
            S = output_loss(outputs)
            if S is not None and S.grad_fn is not None:
                rec.source, rec.source_node = S, S.grad_fn
                ds, r = self.ds, rec
                rec.recompute = lambda: output_loss(ds(*r.args, **r.kwargs))
            if self.fsam.user_loss_fn is not None:
                rec.outputs_logits = logits_of(outputs)
        return None

    def set_loss_source(self, loss: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> None:
        """Name the loss of the micro-batch just recorded and how to compute it again at the
        perturbed weights (a trainer's ``compute_loss``): SAM then recomputes exactly that loss
        in pass 2. Ignored outside a recorded step and for FunctionalSAM."""
        if self.sam.functional or not self.records or self.mode != RECORD:
            return
        rec = self.records[-1]
        if rec.has_backward or loss.grad_fn is None:
            return
        rec.source, rec.source_node, rec.recompute = loss, loss.grad_fn, recompute

    def _take_logit_grad(self, rec: MicroBatch, index: int, grad_outputs):
        g = grad_outputs[index]
        if g is None:
            return None
        for h in rec.handles:
            h.remove()
        rec.handles.clear()
        cache = self.fsam.logit_grads
        if cache.mode == "recompute":
            if not self._recompute_checked:
                self._check_recompute(rec, g)
        else:
            cache.put(rec.index, g.detach())
        return None

    def _check_recompute(self, rec: MicroBatch, g: torch.Tensor) -> None:
        """``logit_grad_cache: recompute`` recomputes ``g_F`` from ``loss_fn``: once, check that
        the loop's own loss sends that gradient to the logits."""
        from .shards import loss_scale_of

        assert rec.logits is not None  # FunctionalSAM records F before its backward
        _, ref = logit_grad(self.fsam.loss_fn, rec.logits.detach(), rec.batch())
        if self._scale_wrt_gas:
            ref = ref / self.ds.gradient_accumulation_steps()
        ref = ref * loss_scale_of(self.ds)
        diff = float((g.float() - ref.float()).norm() / g.float().norm().clamp_min(1e-30))
        tol = 1e-4 if g.dtype == torch.float32 else 2e-2
        if not diff <= tol:
            raise FSAMConfigError(
                'optimizer.params.logit_grad_cache "recompute" recomputes g_F as the gradient of loss_fn (the mean '
                "next-token cross-entropy unless fsam_ds.initialize was given one), but the loss given to backward "
                f"sends another gradient to the logits (relative difference {diff:.2e}); accepted: device, host "
                "(they keep the gradient the loop's own loss gives), or pass loss_fn to fsam_ds.initialize"
            )
        self._recompute_checked = True

    def _take_loss_grad(self, rec: MicroBatch, index: int, grad_outputs):
        g = grad_outputs[index]
        if g is not None:
            rec.loss_grad = g.detach().clone()
            for h in rec.handles:
                h.remove()
            rec.handles.clear()
        return None

    # ---- backward -----------------------------------------------------------------------------
    def backward(self, loss, retain_graph: bool = False, scale_wrt_gas: bool = True):
        """DeepSpeed's ``backward`` with the source of the loss checked first (see the module
        docstring): the loss must come from this step's recorded forwards."""
        if self.mode != RECORD:
            return self.ds_backward(loss, retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)
        sam = self.sam
        pending = [r for r in self.records if not r.has_backward]
        if not pending:
            raise LoopModeError(
                f"engine.backward(loss) with {sam.method}: no training forward of this step is waiting for its "
                "backward. Run each micro-batch's forward through the engine (engine(...), or the model as "
                "deepspeed/accelerate prepared it) in train mode with gradients enabled, then backward its loss"
            )
        root = getattr(loss, "grad_fn", None)
        if root is None:
            raise LoopModeError("engine.backward(loss): the loss does not depend on the weights (no autograd graph)")
        if sam.functional:
            reached, leak = reached_nodes(root, {r.logits_node: r for r in pending})
            if not reached:
                raise LoopModeError(
                    f"engine.backward(loss) with {sam.method}: the loss does not come from the logits of this step's "
                    "recorded forwards (compute it from the outputs of engine(...) of this step)"
                )
            if leak:
                raise FSAMConfigError(
                    f"optimizer.type {sam.method}: the loss reaches the weights other than through the model's logits "
                    "(an auxiliary loss such as a MoE router loss, or a penalty on the weights); FunctionalSAM's "
                    "pass 2 follows only the logits, so that part would be dropped. Accepted for such a loss: SAM, "
                    "PreconditionedSAM, AdamW"
                )
            for r in reached:
                r.pass2 = "surrogate"
        else:
            reached = [r for r in pending if r.source_node is not None and scaled_from(root, r.source_node)]
            if reached:
                r = reached[0]
                r.pass2 = "source"
                r.handles.append(
                    r.source_node.register_prehook(functools.partial(self._take_loss_grad, r, r.source.output_nr))
                )
            elif self.fsam.user_loss_fn is not None:
                r = pending[-1]
                self._check_loss_fn(r, loss)
                r.pass2 = "loss_fn"
                reached = [r]
            else:
                raise FSAMConfigError(
                    f"optimizer.type {sam.method} needs the loss at theta + eps, and the loss given to backward is "
                    "neither the model's own output loss (outputs.loss of a Hugging Face model given labels, times "
                    "constants) nor known to the engine: backward outputs.loss, or give fsam_ds.initialize "
                    "loss_fn=(logits, batch) -> loss and backward its value"
                )
        gas = self.ds.gradient_accumulation_steps()
        for r in reached:
            r.has_backward = True
            r.scale_wrt_gas = scale_wrt_gas
            value = loss.detach().float()
            r.value = value if scale_wrt_gas else value * gas
        self._scale_wrt_gas = scale_wrt_gas

        # a non-finite loss with finite gradients (loss + inf) skips the step like a non-finite gradient
        out = self.ds_backward(loss * finite_or_nan(loss), retain_graph=retain_graph, scale_wrt_gas=scale_wrt_gas)
        for r in reached:
            if (r.pass2 == "source" and r.loss_grad is None) or (sam.functional and r.handles):
                raise LoopModeError(
                    "engine.backward(loss): no gradient reached the "
                    + ("model's logits" if sam.functional else "model's output loss")
                )
            r.drop_graph()
        return out

    def _check_loss_fn(self, rec: MicroBatch, loss: torch.Tensor) -> None:
        logits = rec.outputs_logits
        if logits is None:
            raise FSAMConfigError(
                f"optimizer.type {self.sam.method} with loss_fn needs a model whose forward returns "
                "logits (a tensor or an object with .logits)"
            )
        if self._loss_fn_checked:
            return
        with torch.no_grad():
            expected = self.fsam.loss_fn(logits.detach(), rec.batch())
        if not torch.allclose(loss.detach().float(), expected.detach().float(), rtol=1e-5, atol=0.0):
            raise FSAMConfigError(
                f"optimizer.type {self.sam.method}: the loss given to backward ({float(loss.detach()):.6g}) is not "
                f"loss_fn(logits, batch) ({float(expected):.6g}); SAM recomputes loss_fn at theta + eps, so "
                "backward exactly loss_fn's value (DeepSpeed divides it by gradient_accumulation_steps)"
            )
        self._loss_fn_checked = True  # once, as the recompute check: no extra loss per micro-batch after it

    # ---- the step -----------------------------------------------------------------------------
    def step(self, lr_kwargs=None):
        """DeepSpeed's ``step``; at the accumulation boundary, the method's pass 2 and update."""
        if self.mode != RECORD:
            return self.ds_step(lr_kwargs)
        method = self.sam.method
        if self._open is not None:
            self._open = None
        missing = [r for r in self.records if not r.has_backward]
        if missing:
            self.release()
            raise LoopModeError(
                f"engine.step() with {method}: {len(missing)} training forward(s) of this step had no backward. "
                "A forward in train mode with gradients enabled is part of the step; run other forwards under "
                "torch.no_grad() or in eval mode"
            )
        if not self.ds.is_gradient_accumulation_boundary():
            return self.ds_step(lr_kwargs)
        if not self.records:
            raise LoopModeError(
                f"engine.step() at the gradient accumulation boundary with {method} and no recorded forward: run "
                "each micro-batch's forward through the engine in train mode with gradients enabled, and "
                "engine.backward(loss), before step(); the method never falls back to a plain AdamW step"
            )
        try:
            self.fsam._loop_update(self, lr_kwargs)
        finally:
            self.release()
        return None

    def step_start_time(self) -> float:
        return self._first_forward_time if self._first_forward_time is not None else time.perf_counter()

    def replay(self) -> None:
        """Pass 2 (run by :class:`fsam_ds.step.SAMStep` at theta + eps, which also restores theta
        and the random state): every recorded micro-batch again with its random state."""
        fsam, ds, sam = self.fsam, self.ds, self.sam
        from .shards import loss_scale_of

        scale = loss_scale_of(ds)
        cache = fsam.logit_grads
        n = len(self.records)
        self.mode = REPLAY
        try:
            for i, rec in enumerate(self.records):
                ds.set_gradient_accumulation_boundary(i == n - 1)
                fsam._set_rng_state(rec.rng)
                if sam.functional:
                    g = cache.get(i, rec.batch())
                    outputs = ds(*rec.args, **rec.kwargs)
                    logits, self._layer_out = self.logits(outputs, self._layer_out), None
                    assert logits is not None  # pass 1 found them in the same forward
                    if cache.mode == "recompute":  # g_F of loss_fn: DeepSpeed scales it as it scaled the loop's loss
                        self.ds_backward(functional_surrogate(logits, g), scale_wrt_gas=rec.scale_wrt_gas)
                    else:  # g_F already carries every factor of pass 1
                        self.ds_backward(
                            functional_surrogate(logits, g if scale == 1 else g / scale), scale_wrt_gas=False
                        )
                    del outputs, logits, g
                elif rec.pass2 == "source":
                    assert rec.loss_grad is not None and rec.recompute is not None  # set with pass2 "source"
                    grad = rec.loss_grad if scale == 1 else rec.loss_grad / scale
                    self.ds_backward(rec.recompute() * grad, scale_wrt_gas=False)
                else:
                    outputs = ds(*rec.args, **rec.kwargs)
                    self.ds_backward(fsam.loss_fn(logits_of(outputs), rec.batch()), scale_wrt_gas=rec.scale_wrt_gas)
                    del outputs
        finally:
            self.mode = RECORD
            self._layer_out = None

    def release(self) -> None:
        """Forget the step: inputs, ``g_F`` and graphs kept for pass 2."""
        for rec in self.records:
            rec.drop_graph()
        self.records = []
        self._open = None
        self._layer_out = None
        self._first_forward_time = None
        if self.fsam.logit_grads is not None:
            self.fsam.logit_grads.clear()

    def kept_bytes(self) -> int:
        """Bytes of tensors loop mode holds for the current step (inputs are the loop's own)."""
        cache = self.fsam.logit_grads
        return cache.nbytes() if cache is not None else 0
