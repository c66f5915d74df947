"""The method on megatron-core: one optimizer step across tensor, pipeline and data parallel groups.

:class:`MegatronSAM` runs, with megatron-core's own pieces only:

1. pass 1 at theta through ``get_forward_backward_func()`` (any schedule: no pipelining, 1F1B,
   interleaved). For FunctionalSAM, :class:`LogitGradCache` keeps ``g_F`` of every micro-batch:
   the gradient arriving at the output layer's vocab-parallel logits, i.e. already divided the
   way the schedule and the loss function divide the loss (micro-batch count, token count, fp16
   loss scale), sharded along the vocabulary across the tensor-parallel group, in the order the
   last pipeline stage runs the micro-batches;
2. the ascent from the optimizer's own main gradients (the distributed optimizer: this rank's
   shard; otherwise the data-parallel-reduced gradients), with AdamW's ``exp_avg_sq`` of the same
   elements when preconditioned. The norm counts every element once by megatron-core's own rule
   (``get_main_grads_for_grad_norm``: no tensor-parallel duplicates, no shared copies) and is
   reduced over megatron's grad-stats group (TP x PP for the plain optimizer, TP x PP x DP for the
   distributed one), one all-reduce of a 2-vector;
3. the optimizer's main parameters moved to theta + eps and spread to the model parameters the
   way the optimizer's step spreads them (``_copy_main_params_to_model_params`` and the
   distributed optimizer's parameter all-gather);
4. pass 2 through the same schedule on the same micro-batches, with the random state of pass 1:
   SAM backpropagates the loss; FunctionalSAM injects ``g_F`` at the logits, which is the gradient
   of the surrogate ``sum F(theta + eps) * stopgrad(g_F)``;
5. theta restored bit-exactly from a copy of the main parameters, spread again, then the
   optimizer's ordinary ``step()`` (clipping, loss scale, AdamW) on the pass-2 gradients.

The algorithm itself is :func:`fsam_ds.method.ascent_direction`, shared with the DeepSpeed engine.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from fsam_ds.config import SAMConfig
from fsam_ds.method import Ascent, ascent_direction, rho_at

from .layout import unwrap


# ---- g_F capture and injection ------------------------------------------------------------------

class LogitGradCache:
    """Per-micro-batch ``g_F`` at the output layer of the last pipeline stage.

    ``capture()``: a context in which every forward of the output layer registers a gradient hook
    on its logits that keeps the incoming gradient (``grads[k]`` for the k-th micro-batch this
    stage runs). ``inject()``: a context in which the hook *replaces* the incoming gradient by the
    kept ``grads[k]``, so the backward pass is that of ``sum F * stopgrad(g_F)`` whatever loss
    function follows. Only the logits' own shard is kept: ``tokens x vocab / tp`` values per
    micro-batch, in the logits' dtype.
    """

    def __init__(self, model_chunks):
        self.layers = [unwrap(c).output_layer for c in model_chunks
                       if getattr(unwrap(c), "post_process", False) and hasattr(unwrap(c), "output_layer")]
        for c in model_chunks:
            if getattr(unwrap(c).config, "mtp_num_layers", None):
                raise ValueError("multi-token prediction (mtp_num_layers) is not supported by the functional "
                                 "SAM types; accepted: mtp_num_layers None")
        self.grads: List[torch.Tensor] = []
        self._count = 0

    @contextlib.contextmanager
    def _hooked(self, hook):
        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        self._count = 0
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def capture(self):
        self.grads = []

        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            if not logits.requires_grad:
                return None
            k = self._count
            self._count += 1
            self.grads.append(None)

            def keep(grad, k=k):
                self.grads[k] = grad.detach()
                return None

            logits.register_hook(keep)
            return None

        return self._hooked(hook)

    def inject(self):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            if not logits.requires_grad:
                return None
            k = self._count
            self._count += 1
            if k >= len(self.grads) or self.grads[k] is None:
                raise RuntimeError(f"no logit gradient kept for micro-batch {k} of pass 1")
            g = self.grads[k]
            if g.shape != logits.shape:
                raise RuntimeError(f"logit gradient {tuple(g.shape)} does not match the logits {tuple(logits.shape)}")
            logits.register_hook(lambda grad, g=g: g.to(grad.dtype))
            return None

        return self._hooked(hook)

    def clear(self):
        self.grads = []

    def check_count(self, expected: Optional[int], which: str) -> None:
        """Raise unless the pass just run made exactly ``expected`` output-layer forwards (one per
        micro-batch): ``g_F`` is kept and injected by forward order, so a stray forward (a rerun,
        an extra evaluation inside the step) would shift every kept gradient onto the wrong
        micro-batch."""
        if not self.layers or expected is None:
            return
        if self._count != int(expected):
            raise RuntimeError(f"{which} ran {self._count} output-layer forwards for num_microbatches={expected}; "
                               "the functional SAM types need exactly one per micro-batch in each pass "
                               "(no extra forward of the model inside the step)")


# ---- the optimizer's shards ----------------------------------------------------------------------

def _step_count(value) -> int:
    """An Adam step count held as an int, a float or a (0-dim) tensor."""
    return int(value.item()) if torch.is_tensor(value) else int(value)


def _optimizer_names(optimizers) -> str:
    return "/".join(sorted({type(o.optimizer).__name__ for o in optimizers})) or "the optimizer"


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(o) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    return isinstance(o, DistributedOptimizer)


class MainParams:
    """What this rank's optimizer(s) hold: main parameters, their gradients, AdamW's state."""

    def __init__(self, optimizer):
        from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer

        self.optimizer = optimizer
        self.inner = [o for o in _inner_optimizers(optimizer) if not getattr(o, "is_stub_optimizer", False)]
        for o in self.inner:
            if getattr(o.config, "use_precision_aware_optimizer", False):
                raise ValueError("use_precision_aware_optimizer is not supported by the SAM types; accepted: False")
            if getattr(o, "ddp_config", None) is not None and getattr(o.ddp_config, "use_megatron_fsdp", False):
                raise ValueError("use_megatron_fsdp is not supported by the SAM types; accepted: False "
                                 "(use the distributed optimizer)")
        self.mixed = [isinstance(o, MixedPrecisionOptimizer) for o in self.inner]
        groups = {o.get_grad_stats_parallel_group() for o in self.inner}
        if len(groups) > 1:
            raise ValueError("optimizers with different grad-stats groups (e.g. expert-parallel MoE) are not "
                             "supported by the SAM types")
        self.group = groups.pop() if groups else None
        self.params = [p for o in self.inner for g in o.optimizer.param_groups for p in g["params"]]
        self._owner = {id(p): (o, g) for o in self.inner for g in o.optimizer.param_groups for p in g["params"]}
        self._saved: Optional[List[torch.Tensor]] = None

    @torch.no_grad()
    def read_grads(self):
        """Main gradients as the optimizer's step will see them (before unscaling), the per-tensor
        weights of megatron's norm rule (1 counted, 0 duplicate/shared) and the loss scale."""
        for o, mixed in zip(self.inner, self.mixed):
            if mixed:
                o._copy_model_grads_to_main_grads()
            else:  # FP32Optimizer: the DDP buffer is the gradient
                for group in o.optimizer.param_groups:
                    for p in group["params"]:
                        if hasattr(p, "main_grad"):
                            p.grad = p.main_grad
        counted = {id(g) for o in self.inner for g in o.get_main_grads_for_grad_norm()}
        grads, weights, params = [], [], []
        for p in self.params:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            weights.append(1.0 if id(p.grad) in counted else 0.0)
        scale = float(self.inner[0].get_loss_scale()) if self.inner else 1.0
        return params, grads, weights, scale

    @torch.no_grad()
    def adam_step(self) -> int:
        """AdamW updates taken so far, read the way megatron-core reads it
        (``DistributedOptimizer.state_dict``): torch's Adam/AdamW keep ``step`` in every
        parameter's state; TransformerEngine's and apex's FusedAdam (which megatron-core picks
        first when installed) keep it in ``param_groups[i]["step"]`` (a group without parameters
        has none). The per-parameter count wins where both exist (megatron-core's loader writes a
        constant ``step`` into torch's groups). 0 before the first update; raises when the
        optimizer holds Adam moments but no step count, or different counts, rather than
        running the preconditioned types without their preconditioner."""
        per_param, per_group, moments = set(), set(), False
        for o in self.inner:
            inner = o.optimizer
            for group in inner.param_groups:
                if not group["params"]:
                    continue
                if group.get("step") is not None:
                    per_group.add(_step_count(group["step"]))
                for p in group["params"]:  # the first parameter with state speaks for its group
                    st = inner.state.get(p)
                    if st:
                        moments = moments or "exp_avg_sq" in st
                        if "step" in st:
                            per_param.add(_step_count(st["step"]))
                        break
        steps = per_param or per_group
        if len(steps) > 1:
            raise RuntimeError(f"the optimizer holds different Adam step counts {sorted(steps)} across its "
                               "parameter groups; the preconditioned SAM types need one bias-correction step")
        if steps:
            return steps.pop()
        if moments and self._moments_nonzero():
            raise RuntimeError(
                f"{_optimizer_names(self.inner)} holds Adam moments (exp_avg_sq) but no step count, neither in "
                "the parameters' state (torch Adam/AdamW) nor in param_groups[i]['step'] (TransformerEngine/apex "
                "FusedAdam); the preconditioned SAM types cannot run without it")
        return 0

    def _moments_nonzero(self) -> bool:
        """Whether any ``exp_avg_sq`` here holds something (megatron's ``init_state_fn`` fills zero
        moments without a step when a checkpoint is loaded before the first update)."""
        for o in self.inner:
            for st in o.optimizer.state.values():
                v = st.get("exp_avg_sq") if isinstance(st, dict) else None
                if torch.is_tensor(v) and bool(v.ne(0).any()):
                    return True
        return False

    def denominators(self, params, step: int):
        """AdamW's ``sqrt(v / (1 - beta2^t)) + eps`` for each parameter (its own group's beta2, eps and
        bias_correction), or None before the first step (``step`` 0). After it, a parameter without
        ``exp_avg_sq`` is an error, not a silent fall-back to the unpreconditioned method."""
        if step == 0:
            return None
        from fsam_ds.method import adam_denominator

        out = []
        for p in params:
            o, group = self._owner[id(p)]
            st = o.optimizer.state.get(p)
            if not st or "exp_avg_sq" not in st:
                raise RuntimeError(
                    f"{type(o.optimizer).__name__} has taken {step} Adam step(s) but holds no exp_avg_sq for a "
                    f"parameter of shape {tuple(p.shape)}; the preconditioned SAM types need AdamW's second "
                    "moment of every parameter (optimizer 'adam')")
            out.append(adam_denominator(st["exp_avg_sq"], group["betas"][1], group["eps"], step,
                                        group.get("bias_correction", True)))
        return out

    @torch.no_grad()
    def spread(self):
        """Model parameters from the main parameters, the way the optimizer's step does it."""
        for o, mixed in zip(self.inner, self.mixed):
            if mixed:
                o._copy_main_params_to_model_params()
            if _is_distributed(o):
                for chunk in o.model_chunks:
                    chunk.start_param_sync(force_sync=True)

    @torch.no_grad()
    def perturb(self, params, ascent: Ascent):
        self._saved = [p.detach().clone() for p in params]
        self._perturbed = params
        if params:
            torch._foreach_add_(params, ascent.directions, alpha=float(ascent.coef))
        self.spread()

    @torch.no_grad()
    def restore(self):
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, self._saved)
        self._saved = self._perturbed = None
        self.spread()


# ---- data and random state replay ----------------------------------------------------------------

class _Recorder:
    def __init__(self, it):
        self.it, self.items = it, []

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.items.append(item)
        return item


def _record(data_iterator):
    if data_iterator is None:
        return None
    if isinstance(data_iterator, list):
        return [_record(d) for d in data_iterator]
    return _Recorder(data_iterator)


def _replay(recorded):
    if recorded is None:
        return None
    if isinstance(recorded, list):
        return [_replay(r) for r in recorded]
    return iter(list(recorded.items))


def _rng_state():
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    state = {"cpu": torch.get_rng_state(), "tracker": {k: (v.clone() if torch.is_tensor(v) else v)
                                                        for k, v in tracker.get_states().items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


# ---- the step ------------------------------------------------------------------------------------

class MegatronSAM:
    """One optimizer step of the configured method for megatron-core model chunks and optimizer.

    ``model_chunks``: the list of (DDP-wrapped) ``GPTModel`` chunks of this rank, as given to the
    schedule; ``optimizer``: what ``get_megatron_optimizer`` returned (distributed or not, fp32,
    bf16 or fp16). ``last_metrics`` holds the latest step's ``method``, ``loss`` (pass 1, on the
    last pipeline stage), ``grad_norm`` (global ``||g||`` of pass 1), ``eps_norm``, ``rho``,
    ``update_successful`` and ``step_time``.
    """

    def __init__(self, model_chunks, optimizer, sam: SAMConfig):
        self.model = list(model_chunks)
        self.optimizer = optimizer
        self.sam = sam
        self.main = MainParams(optimizer)
        if sam.preconditioned:
            kinds = {getattr(o.config, "optimizer", "adam") for o in self.main.inner}
            if kinds - {"adam"}:
                raise ValueError(f"{sam.method} preconditions with AdamW's second moment; the optimizer is "
                                 f"{'/'.join(sorted(kinds))}; accepted: optimizer 'adam'")
        self.cache = LogitGradCache(self.model) if sam.functional else None
        self.skip_unperturbed_pass2 = True
        self.steps = 0
        self._t0: Optional[float] = None
        self.last_metrics: Dict[str, Any] = {}

    def zero_grad(self):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(self, forward_backward_func: Callable, forward_step_func, data_iterator, **schedule_kw):
        """Pass 1 and, for the SAM types, the ascent and pass 2; ends with zero or pass-2
        gradients in place (the optimizer has not stepped). Returns pass 1's losses_reduced."""
        sam, t0 = self.sam, time.perf_counter()
        self._t0 = t0  # step_time runs from here to the end of optimizer_step()
        iteration = schedule_kw.pop("iteration", None)
        step = self.steps if iteration is None else int(iteration)
        rho = rho_at(step, sam.rho, sam.rho_warmup_steps) if sam.is_sam else 0.0
        kw = dict(forward_step_func=forward_step_func, model=self.model, forward_only=False, **schedule_kw)
        self.zero_grad()
        if not sam.is_sam:
            losses = forward_backward_func(data_iterator=data_iterator, **kw)
            self.last_metrics = {"method": sam.method, "rho": 0.0, "eps_norm": 0.0, "grad_norm": None,
                                 "loss": _mean_loss(losses)}
            return losses
        recorded = _record(data_iterator)
        rng_before = _rng_state()
        with (self.cache.capture() if self.cache is not None else contextlib.nullcontext()):
            losses = forward_backward_func(data_iterator=recorded, **kw)
        expected = kw.get("num_microbatches")
        if self.cache is not None:
            self.cache.check_count(expected, "pass 1")
        params, grads, weights, scale = self.main.read_grads()
        denoms = self.main.denominators(params, self.main.adam_step()) if sam.preconditioned else None
        ascent = ascent_direction(grads, rho, denoms, sam.precondition_norm, group=self.main.group,
                                  grad_scale=scale, weights=weights)
        self.last_metrics = {"method": sam.method, "rho": rho, "grad_norm": float(ascent.grad_norm),
                             "eps_norm": float(ascent.eps_norm), "loss": _mean_loss(losses)}
        if not (ascent.is_zero and self.skip_unperturbed_pass2):
            rng_after = _rng_state()
            self.main.perturb(params, ascent)
            del ascent, grads
            self.zero_grad()
            _set_rng_state(rng_before)
            with (self.cache.inject() if self.cache is not None else contextlib.nullcontext()):
                forward_backward_func(data_iterator=_replay(recorded), **kw)
            _set_rng_state(rng_after)
            self.main.restore()
            if self.cache is not None:
                self.cache.check_count(expected, "pass 2")
        if self.cache is not None:
            self.cache.clear()
        self.last_metrics["pass_time"] = time.perf_counter() - t0
        return losses

    def step(self, forward_backward_func: Callable, forward_step_func, data_iterator, num_microbatches: int,
             seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
             iteration: Optional[int] = None, **schedule_kw):
        """Zero grads, both passes, optimizer step. Returns ``(losses_reduced, update_successful,
        grad_norm, num_zeros_in_grad)`` like Megatron-LM's train step (grad_norm is the pass-2
        norm the optimizer clipped with)."""
        losses = self.forward_backward(forward_backward_func, forward_step_func, data_iterator,
                                       num_microbatches=num_microbatches, seq_length=seq_length,
                                       micro_batch_size=micro_batch_size, decoder_seq_length=decoder_seq_length,
                                       iteration=iteration, **schedule_kw)
        update_successful, grad_norm, num_zeros = self.optimizer_step()
        return losses, update_successful, grad_norm, num_zeros

    def optimizer_step(self):
        """The optimizer's own step on the gradients :meth:`forward_backward` left (the second half
        of :meth:`step`). Returns ``(update_successful, grad_norm, num_zeros_in_grad)``."""
        t0 = self._t0
        update_successful, grad_norm, num_zeros = self.optimizer.step()
        self.steps += 1
        self.last_metrics.update(update_successful=bool(update_successful))
        if t0 is not None:
            self.last_metrics["step_time"] = time.perf_counter() - t0
        self._t0 = None
        return update_successful, grad_norm, num_zeros


def _mean_loss(losses_reduced) -> Optional[float]:
    """Mean pass-1 loss over micro-batches of this rank (last pipeline stage; None elsewhere),
    from losses_reduced entries ``{"lm loss": value}`` or ``{"lm loss": [sum, tokens]}``."""
    if not losses_reduced:
        return None
    vals = [x.get("lm loss") for x in losses_reduced if isinstance(x, dict)]
    vals = [v.detach().float().view(-1) for v in vals if torch.is_tensor(v)]
    if not vals:
        return None
    if vals[0].numel() == 2:
        s = torch.stack(vals).sum(0)
        return float(s[0] / s[1].clamp(min=1))
    return float(torch.cat(vals).mean())
