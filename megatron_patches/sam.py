"""The method on megatron-core: one optimizer step across tensor, pipeline and data parallel groups.

:class:`MegatronSAM` runs the step of :class:`fsam_ds.step.SAMStep` (pass 1, the ascent,
theta + eps, pass 2 with pass 1's random state, restore), with megatron-core's own pieces only:

* the passes (:class:`SchedulePasses`) are ``get_forward_backward_func()`` (any schedule: no
  pipelining, 1F1B, interleaved) over the step's micro-batches, recorded in pass 1 and replayed in
  pass 2. For FunctionalSAM, :class:`OutputLayerHooks` keeps ``g_F`` of every micro-batch in a
  :mod:`fsam_ds.caches` cache (``logit_grad_cache`` ``"device"`` or ``"host"``): the gradient
  arriving at the output layer's vocab-parallel logits, i.e. already divided the way the schedule
  and the loss function divide the loss (micro-batch count, token count, fp16 loss scale),
  sharded along the vocabulary across the tensor-parallel group, in the order the last pipeline
  stage runs the micro-batches; pass 2 injects it at the logits, which is the gradient of the
  surrogate ``sum F(theta + eps) * stopgrad(g_F)``;
* what this rank holds (:class:`MainParams`, a :class:`fsam_ds.step.RankView`) is the
  optimizer's main parameters and main gradients (the distributed optimizer: this rank's shard;
  otherwise the data-parallel-reduced gradients), with AdamW's moments of the same elements. The
  norm counts every element once by megatron-core's own rule (``get_main_grads_for_grad_norm``:
  no tensor-parallel duplicates, no shared copies) and is reduced over megatron's grad-stats group
  (TP x PP for the plain optimizer, TP x PP x DP for the distributed one), one all-reduce of a
  2-vector. theta + eps is written into the main parameters and spread to the model parameters
  the way the optimizer's step spreads them (``_copy_main_params_to_model_params`` and the
  distributed optimizer's parameter all-gather); theta comes back bit-exactly from a copy;
* then the optimizer's ordinary ``step()`` (clipping, loss scale, AdamW) on the pass-2 gradients.
  In bf16 and fp32 a non-finite loss (either pass) or gradient on any rank skips the step on
  every rank (one all-reduce of a flag over the world): no update, gradients cleared,
  ``update_successful`` False, so the caller holds its LR schedule; fp16 keeps megatron-core's
  own found-inf check of the gradients (and its loss-scale update).

``ascent_every: k`` reuses the stored direction between the computing steps (the cycle counts
optimizer steps taken, skipped ones included); on a reusing step SAM has no pass 1 and
FunctionalSAM's pass 1 only produces ``g_F`` at theta: without pipelining the output layer hands
the loss detached logits, so only the loss's backward runs; with a pipeline (the stages exchange
gradients) it is a full pass-1 backward whose gradients are discarded. ``ascent_direction:
"momentum"`` takes the ascent from AdamW's ``exp_avg`` the same way. The rho warm-up counts
applied AdamW updates (a skipped step does not advance it).

Refused, with one line before any work: ``logit_grad_cache: "recompute"`` and a nonzero
``sharpness_every`` (:func:`check_sam_config`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from fsam_ds.caches import LogitGradCache, make_logit_grad_cache
from fsam_ds.config import FSAMConfigError, SAMConfig
from fsam_ds.method import Ascent, adam_denominator
from fsam_ds.step import SAMStep, StepOutcome, step_metrics

from .layout import unwrap

#: logit_grad_cache modes megatron-core runs
LOGIT_GRAD_CACHES = ("device", "host")


def check_sam_config(sam: SAMConfig, key_names: Optional[Mapping[str, str]] = None) -> None:
    """Raise one :class:`FSAMConfigError` for a setting megatron-core does not run; errors name
    a setting by its entry in ``key_names`` (a command-line flag), else by its key."""
    names = dict(key_names or {})
    if sam.functional and sam.logit_grad_cache not in LOGIT_GRAD_CACHES:
        key = names.get("logit_grad_cache", "logit_grad_cache")
        raise FSAMConfigError(
            f"{key} {sam.logit_grad_cache!r} is not supported on megatron-core (its output layer "
            "is a vocab-parallel linear inside the schedule); accepted: "
            f"{', '.join(LOGIT_GRAD_CACHES)}"
        )
    if sam.sharpness_every:
        key = names.get("sharpness_every", "sharpness_every")
        raise FSAMConfigError(
            f"{key} {sam.sharpness_every} is not supported on megatron-core (the sharpness "
            "diagnostics run on the DeepSpeed engine); accepted: 0"
        )


# ---- g_F capture and injection ------------------------------------------------------------------


class OutputLayerHooks:
    """``g_F`` of every micro-batch at the output layer of the last pipeline stage, kept in a
    :mod:`fsam_ds.caches` cache (``put(k, g)`` in pass 1, ``get(k)`` in pass 2).

    ``capture()``: a context in which every forward of the output layer registers a gradient hook
    on its logits that puts the incoming gradient into the cache (key ``k`` for the k-th
    micro-batch this stage runs); with ``cut=True`` the forward hook hands the rest of the model
    detached logits that require grad, so a backward stops there (``g_F`` without a backward
    through the model). ``inject()``: a context in which the hook *replaces* the incoming gradient
    by the kept one, so the backward pass is that of ``sum F * stopgrad(g_F)`` whatever loss
    function follows. Only the logits' own shard is kept: ``tokens x vocab / tp`` values per
    micro-batch, in the logits' dtype.
    """

    def __init__(self, model_chunks, cache: LogitGradCache):
        self.layers = [
            unwrap(c).output_layer
            for c in model_chunks
            if getattr(unwrap(c), "post_process", False) and hasattr(unwrap(c), "output_layer")
        ]
        for c in model_chunks:
            if getattr(unwrap(c).config, "mtp_num_layers", None):
                raise ValueError(
                    "multi-token prediction (mtp_num_layers) is not supported by the functional "
                    "SAM types; accepted: mtp_num_layers None"
                )
        self.cache = cache
        self._kept: set = set()
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

    def capture(self, cut: bool = False):
        self._kept = set()

        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            if not logits.requires_grad:
                return None
            k = self._count
            self._count += 1

            def keep(grad, k=k):
                self.cache.put(k, grad.detach())
                self._kept.add(k)
                return None

            if not cut:
                logits.register_hook(keep)
                return None
            leaf = logits.detach().requires_grad_(True)
            leaf.register_hook(keep)
            return (leaf, *output[1:]) if isinstance(output, tuple) else leaf

        return self._hooked(hook)

    def inject(self):
        def hook(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            if not logits.requires_grad:
                return None
            k = self._count
            self._count += 1
            if k not in self._kept:
                raise RuntimeError(f"no logit gradient kept for micro-batch {k} of pass 1")
            self._kept.discard(k)
            g = self.cache.get(k)
            if g.shape != logits.shape:
                raise RuntimeError(f"logit gradient {tuple(g.shape)} does not match the logits {tuple(logits.shape)}")
            logits.register_hook(lambda grad, g=g: g.to(grad.dtype))
            return None

        return self._hooked(hook)

    def clear(self):
        self.cache.clear()
        self._kept = set()

    def check_count(self, expected: Optional[int], which: str) -> None:
        """Raise unless the pass just run made exactly ``expected`` output-layer forwards (one per
        micro-batch): ``g_F`` is kept and injected by forward order, so a stray forward (a rerun,
        an extra evaluation inside the step) would shift every kept gradient onto the wrong
        micro-batch."""
        if not self.layers or expected is None:
            return
        if self._count != int(expected):
            raise RuntimeError(
                f"{which} ran {self._count} output-layer forwards for num_microbatches={expected}; "
                "the functional SAM types need exactly one per micro-batch in each pass "
                "(no extra forward of the model inside the step)"
            )


# ---- what this rank's optimizer holds -----------------------------------------------------------


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
    """What this rank's optimizer(s) hold: main parameters, their gradients, AdamW's state
    (a :class:`fsam_ds.step.RankView`).

    The tensors are the optimizer's main parameters in its own order (``params``, fixed for the
    optimizer's life): ``grads()`` are their gradients as the optimizer's step will see them
    (before unscaling), ``weights()`` megatron-core's norm rule for each (1 counted, 0 a
    tensor-parallel duplicate or a shared copy), ``perturb``/``restore`` write them and spread
    them to the model parameters. ``model_chunks``: the DDP chunks whose gradient buffers
    ``zero_grad()`` clears.
    """

    def __init__(self, optimizer, model_chunks=()):
        from megatron.core import tensor_parallel
        from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer
        from megatron.core.transformer.module import param_is_not_shared

        self.optimizer = optimizer
        self.model_chunks = list(model_chunks)
        self.inner = [o for o in _inner_optimizers(optimizer) if not getattr(o, "is_stub_optimizer", False)]
        for o in self.inner:
            if getattr(o.config, "use_precision_aware_optimizer", False):
                raise ValueError("use_precision_aware_optimizer is not supported by the SAM types; accepted: False")
            if getattr(o, "ddp_config", None) is not None and getattr(o.ddp_config, "use_megatron_fsdp", False):
                raise ValueError(
                    "use_megatron_fsdp is not supported by the SAM types; accepted: False "
                    "(use the distributed optimizer)"
                )
        self.mixed = [isinstance(o, MixedPrecisionOptimizer) for o in self.inner]
        groups = {o.get_grad_stats_parallel_group() for o in self.inner}
        if len(groups) > 1:
            raise ValueError(
                "optimizers with different grad-stats groups (e.g. expert-parallel MoE) are not "
                "supported by the SAM types"
            )
        self.norm_group = groups.pop() if groups else None
        self.params = [p for o in self.inner for g in o.optimizer.param_groups for p in g["params"]]
        self._owner = {id(p): (o, g) for o in self.inner for g in o.optimizer.param_groups for p in g["params"]}
        # megatron-core's rule (get_main_grads_for_grad_norm), per parameter
        self._weights = [
            1.0
            if param_is_not_shared(p)
            and tensor_parallel.param_is_not_tensor_parallel_duplicate(
                p, getattr(self._owner[id(p)][0], "tp_group", None)
            )
            else 0.0
            for p in self.params
        ]
        self._saved: Optional[List[torch.Tensor]] = None

    @property
    def fp16(self) -> bool:
        """Whether a loss scaler checks the gradients (megatron-core's own found-inf path)."""
        return any(getattr(o, "grad_scaler", None) is not None for o in self.inner)

    @property
    def grad_scale(self) -> float:
        return float(self.inner[0].get_loss_scale()) if self.inner else 1.0

    @torch.no_grad()
    def grads(self) -> List[torch.Tensor]:
        """Main gradients as the optimizer's step will see them (the model's gradients copied in
        the way its step copies them; a parameter without one reads as zeros)."""
        for o, mixed in zip(self.inner, self.mixed):
            if mixed:
                o._copy_model_grads_to_main_grads()
            else:  # FP32Optimizer: the DDP buffer is the gradient
                for group in o.optimizer.param_groups:
                    for p in group["params"]:
                        if hasattr(p, "main_grad"):
                            p.grad = p.main_grad
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def weights(self) -> List[float]:
        return self._weights

    def local_shapes(self) -> List[torch.Size]:
        return [p.shape for p in self.params]

    def region(self, params):
        return None  # the shares of ||eps||^2 are not reported on megatron-core (share_params {})

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    @torch.no_grad()
    def adam_updates(self) -> int:
        """AdamW updates applied so far, read the way megatron-core reads it
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
            raise RuntimeError(
                f"the optimizer holds different Adam step counts {sorted(steps)} across its "
                "parameter groups; the preconditioned SAM types need one bias-correction step"
            )
        if steps:
            return steps.pop()
        if moments and self._moments_nonzero():
            raise RuntimeError(
                f"{_optimizer_names(self.inner)} holds Adam moments (exp_avg_sq) but no step count, neither in "
                "the parameters' state (torch Adam/AdamW) nor in param_groups[i]['step'] (TransformerEngine/apex "
                "FusedAdam); the preconditioned SAM types cannot run without it"
            )
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

    def _state(self, p, adam_updates: int, key: str) -> torch.Tensor:
        o, _ = self._owner[id(p)]
        st = o.optimizer.state.get(p)
        if not st or key not in st:
            raise RuntimeError(
                f"{type(o.optimizer).__name__} has taken {adam_updates} Adam step(s) but holds no {key} for a "
                f"parameter of shape {tuple(p.shape)}; the SAM types that read AdamW's moments need them for "
                "every parameter (optimizer 'adam')"
            )
        return st[key]

    def denominators(self, adam_updates: int) -> Optional[List[torch.Tensor]]:
        """AdamW's ``sqrt(v / (1 - beta2^t)) + eps`` for each parameter (its own group's beta2, eps and
        bias_correction), or None before the first update (``adam_updates`` 0). After it, a parameter
        without ``exp_avg_sq`` is an error, not a silent fall-back to the unpreconditioned method."""
        if adam_updates == 0:
            return None
        out = []
        for p in self.params:
            group = self._owner[id(p)][1]
            out.append(
                adam_denominator(
                    self._state(p, adam_updates, "exp_avg_sq"),
                    group["betas"][1],
                    group["eps"],
                    adam_updates,
                    group.get("bias_correction", True),
                )
            )
        return out

    def first_moments(self, adam_updates: int) -> Optional[List[torch.Tensor]]:
        """AdamW's ``exp_avg`` of each parameter; None before the first update."""
        if adam_updates == 0:
            return None
        return [self._state(p, adam_updates, "exp_avg") for p in self.params]

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
    def perturb(self, ascent: Ascent) -> None:
        self._saved = [p.detach().clone() for p in self.params]
        if self.params:
            torch._foreach_add_(self.params, ascent.directions, alpha=float(ascent.coef))
        self.spread()

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is not None and self.params:
            torch._foreach_copy_(self.params, self._saved)
        self._saved = None
        self.spread()


# ---- the passes ----------------------------------------------------------------------------------


class SchedulePasses:
    """The passes of one step through megatron-core's schedule (a :class:`fsam_ds.step.Passes`).

    ``forward_backward_func(data_iterator=..., **schedule_kw)`` runs the step's micro-batches;
    pass 1 records the micro-batches it draws and the random state it starts from (the CPU and
    CUDA generators and megatron's RNG tracker), pass 2 replays both. ``hooks``: FunctionalSAM's
    :class:`OutputLayerHooks` (None for SAM and AdamW); ``cut``: whether a forward for ``g_F``
    only may stop the backward at the logits (no pipeline). ``pass2_losses``: pass 2's
    ``losses_reduced``.
    """

    def __init__(
        self,
        forward_backward_func: Callable,
        schedule_kw: Dict[str, Any],
        data_iterator,
        hooks: Optional[OutputLayerHooks],
        cut: bool = False,
        record: bool = True,
    ):
        self.run = forward_backward_func
        self.kw = schedule_kw
        self.data = data_iterator
        self.hooks = hooks
        self.cut = cut
        self.record = record
        self.expected = schedule_kw.get("num_microbatches")
        self.pass2_losses: Optional[list] = None

    def _pass1(self, cut: bool):
        recorded = _record(self.data) if self.record else self.data
        rng = _rng_state() if self.record else None
        with self.hooks.capture(cut=cut) if self.hooks is not None else contextlib.nullcontext():
            losses = self.run(data_iterator=recorded, **self.kw)
        if self.hooks is not None:
            self.hooks.check_count(self.expected, "pass 1")
        return losses, ((recorded, rng) if self.record else None)

    def pass1(self):
        return self._pass1(cut=False)

    def forward_pass(self):
        return self._pass1(cut=self.cut)

    def pass2(self, replay):
        if replay is None:  # SAM reusing a direction: no pass 1 ran, this is the step's only pass
            self.pass2_losses = self.run(data_iterator=self.data, **self.kw)
            return self.pass2_losses
        recorded, rng = replay
        _set_rng_state(rng)
        with self.hooks.inject() if self.hooks is not None else contextlib.nullcontext():
            self.pass2_losses = self.run(data_iterator=_replay(recorded), **self.kw)
        if self.hooks is not None:
            self.hooks.check_count(self.expected, "pass 2")
        return self.pass2_losses

    def rng_state(self):
        return _rng_state()

    def set_rng_state(self, state):
        _set_rng_state(state)


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
    state = {
        "cpu": torch.get_rng_state(),
        "tracker": {k: (v.clone() if torch.is_tensor(v) else v) for k, v in tracker.get_states().items()},
    }
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
    bf16 or fp16). ``last_metrics`` holds the latest step's :func:`fsam_ds.step.step_metrics`
    (``method``, ``loss`` of pass 1 on the last pipeline stage, ``grad_norm`` the global ``||g||``
    of pass 1, ``eps_norm``, ``rho``, ``lr``, ``skipped``, ``step_time``, ...) and
    ``update_successful``. ``state_dict()``: what this rank needs beyond the model, optimizer and
    scheduler to continue exactly (the stored direction of ``ascent_every``), one per rank.
    """

    def __init__(self, model_chunks, optimizer, sam: SAMConfig):
        check_sam_config(sam)
        self.model = list(model_chunks)
        self.optimizer = optimizer
        self.sam = sam
        self.main = MainParams(optimizer, self.model)
        kinds = {getattr(o.config, "optimizer", "adam") for o in self.main.inner}
        if sam.preconditioned and kinds - {"adam"}:
            raise ValueError(
                f"{sam.method} preconditions with AdamW's second moment; the optimizer is "
                f"{'/'.join(sorted(kinds))}; accepted: optimizer 'adam'"
            )
        if sam.is_sam and kinds - {"adam"} and (sam.rho_warmup_steps or sam.ascent_direction == "momentum"):
            what = (
                "rho_warmup_steps counts AdamW updates"
                if sam.rho_warmup_steps
                else 'ascent_direction "momentum" reads AdamW\'s first moment'
            )
            raise ValueError(f"{what}; the optimizer is {'/'.join(sorted(kinds))}; accepted: optimizer 'adam'")
        self.hooks = (
            OutputLayerHooks(self.model, make_logit_grad_cache(sam.logit_grad_cache)) if sam.functional else None
        )
        self.steps = 0  # optimizer steps taken by this object (skipped ones included)
        self._iteration = 0
        self.core = SAMStep(sam, self.main, adam_updates=self.main.adam_updates, step_index=lambda: self._iteration)
        self._cut = self._can_cut_backward()
        self._t0: Optional[float] = None
        self._step_losses: list = []
        self.outcome: Optional[StepOutcome] = None
        self.last_metrics: Dict[str, Any] = {}

    def _can_cut_backward(self) -> bool:
        """Whether a forward for ``g_F`` only may stop the backward at the logits: one model chunk,
        no pipeline (the stages exchange the gradients of their outputs), and gradient reduction
        not overlapped with the backward (its buckets expect every gradient)."""
        from megatron.core import parallel_state as ps

        if len(self.model) != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            return False
        ddp = getattr(self.model[0], "ddp_config", None)
        return not getattr(ddp, "overlap_grad_reduce", False)

    @property
    def skip_unperturbed_pass2(self) -> bool:
        return self.core.skip_unperturbed_pass2

    @skip_unperturbed_pass2.setter
    def skip_unperturbed_pass2(self, value: bool) -> None:
        self.core.skip_unperturbed_pass2 = bool(value)

    def zero_grad(self):
        self.main.zero_grad()

    def _lr(self) -> Optional[float]:
        groups = getattr(self.optimizer, "param_groups", None)
        return float(groups[0]["lr"]) if groups else None

    def forward_backward(self, forward_backward_func: Callable, forward_step_func, data_iterator, **schedule_kw):
        """Pass 1 and, for the SAM types, the ascent and pass 2; ends with pass-1 (no pass 2) or
        pass-2 gradients in place (the optimizer has not stepped). Returns pass 1's
        losses_reduced (pass 2's for SAM reusing a direction: it has no pass 1). ``iteration``:
        optimizer steps taken so far, skipped ones included (the ``ascent_every`` cycle); default
        the steps this object took."""
        sam, t0 = self.sam, time.perf_counter()
        self._t0 = t0  # step_time runs from here to the end of optimizer_step()
        iteration = schedule_kw.pop("iteration", None)
        self._iteration = self.steps if iteration is None else int(iteration)
        kw = dict(forward_step_func=forward_step_func, model=self.model, forward_only=False, **schedule_kw)
        self.main.zero_grad()
        passes = SchedulePasses(forward_backward_func, kw, data_iterator, self.hooks, cut=self._cut, record=sam.is_sam)
        try:
            out = self.core.run(passes)
        finally:
            if self.hooks is not None:
                self.hooks.clear()
        self.outcome = out
        self._step_losses = [out.losses, passes.pass2_losses]
        loss = _mean_loss(out.losses)  # None off the last pipeline stage
        self.last_metrics = step_metrics(sam, out, loss, self._lr(), False, 0.0, have_shares=False)
        self.last_metrics["pass_time"] = time.perf_counter() - t0
        return out.losses

    def step(
        self,
        forward_backward_func: Callable,
        forward_step_func,
        data_iterator,
        num_microbatches: int,
        seq_length: int,
        micro_batch_size: int,
        decoder_seq_length: Optional[int] = None,
        iteration: Optional[int] = None,
        **schedule_kw,
    ):
        """Zero grads, both passes, optimizer step. Returns ``(losses_reduced, update_successful,
        grad_norm, num_zeros_in_grad)`` like Megatron-LM's train step (grad_norm is the pass-2
        norm the optimizer clipped with)."""
        losses = self.forward_backward(
            forward_backward_func,
            forward_step_func,
            data_iterator,
            num_microbatches=num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            decoder_seq_length=decoder_seq_length,
            iteration=iteration,
            **schedule_kw,
        )
        update_successful, grad_norm, num_zeros = self.optimizer_step()
        return losses, update_successful, grad_norm, num_zeros

    def finite_everywhere(self) -> bool:
        """Whether the step's losses (both passes) and, in bf16/fp32, the gradients the update
        would apply are finite on every rank: one all-reduce of a flag over the world, so that a
        data-parallel rank's infinite loss, or the last pipeline stage's, skips the step on all
        ranks. fp16 leaves the gradients to megatron-core's own found-inf check."""
        import torch.distributed as dist

        from fsam_ds.distributed import comm_device, world_size

        flags = [
            torch.isfinite(v.detach()).all()
            for losses in self._step_losses
            for d in (losses or [])
            if isinstance(d, dict)
            for v in d.values()
            if torch.is_tensor(v)
        ]
        if not self.main.fp16:
            grads = [g for g in self.main.grads() if g.numel()]
            if grads:
                flags.append(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        device = comm_device()
        bad = torch.zeros(1, device=device)
        if flags:
            bad += (~torch.stack([f.to(device) for f in flags]).all()).float()
        if world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def optimizer_step(self):
        """The optimizer's own step on the gradients :meth:`forward_backward` left (the second half
        of :meth:`step`), or the skip of a step with a non-finite loss or gradient
        (:meth:`finite_everywhere`: no update, gradients cleared). Returns ``(update_successful,
        grad_norm, num_zeros_in_grad)``; the caller holds its LR schedule when the update was not
        successful."""
        t0 = self._t0
        if self.finite_everywhere():
            update_successful, grad_norm, num_zeros = self.optimizer.step()
        else:
            self.main.zero_grad()
            update_successful, grad_norm, num_zeros = False, None, None
        self.steps += 1
        self.last_metrics.update(update_successful=bool(update_successful), skipped=not update_successful)
        if t0 is not None:
            self.last_metrics["step_time"] = time.perf_counter() - t0
        self._t0 = None
        self._step_losses = []
        return update_successful, grad_norm, num_zeros

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """This rank's :meth:`fsam_ds.step.SAMStep.state_dict` (save one per rank)."""
        return self.core.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        device = self.main.params[0].device if self.main.params else torch.device("cpu")
        self.core.load_state_dict(state, device)


def _mean_loss(losses_reduced) -> Optional[float]:
    """Mean pass-1 loss over micro-batches of this rank (last pipeline stage; None elsewhere),
    from losses_reduced entries ``{"lm loss": value}`` or ``{"lm loss": [sum, tokens]}``."""
    if not losses_reduced:
        return None
    entries = [x.get("lm loss") for x in losses_reduced if isinstance(x, dict)]
    vals = [v.detach().float().view(-1) for v in entries if isinstance(v, torch.Tensor)]
    if not vals:
        return None
    if vals[0].numel() == 2:
        s = torch.stack(vals).sum(0)
        return float(s[0] / s[1].clamp(min=1))
    return float(torch.cat(vals).mean())
