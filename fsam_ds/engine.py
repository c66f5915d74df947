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
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from .config import FSAMConfigError, SAMConfig
from .method import Ascent, ascent_direction, causal_lm_loss, functional_surrogate, global_norm, rho_at
from .shards import PlainView, make_view

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


def finite_or_nan(loss: torch.Tensor) -> torch.Tensor:
    """1 where ``loss`` is finite, NaN where it is not (no host sync). Multiplying what is
    backpropagated by it turns a non-finite loss whose gradients are finite (``loss + inf``) into
    non-finite gradients, so the step is skipped by the same overflow path as a non-finite
    gradient; times 1 it changes nothing, bit for bit."""
    loss = loss.detach()
    return torch.where(torch.isfinite(loss), torch.ones_like(loss), torch.full_like(loss, float("nan")))


def logit_grad(loss_fn: LossFn, logits: torch.Tensor, batch: Mapping[str, Any]):
    """``(loss, g_F)``: the loss and its gradient with respect to ``logits`` by autograd on a
    detached copy (no graph through the model); ``g_F`` is NaN where the loss is not finite."""
    leaf = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(leaf, batch)
        (g_f,) = torch.autograd.grad(loss, leaf)
    return loss, g_f.mul_(finite_or_nan(loss).to(g_f.dtype))  # g_f is autograd's fresh tensor: in place


class LogitGradCache:
    """``g_F`` of each micro-batch of a step, from pass 1 to pass 2 (``logit_grad_cache``).

    ``put(i, g_f)`` after micro-batch ``i`` of pass 1, ``get(i, batch)`` in pass 2 (each entry is
    released once read), ``clear()`` at the end of the step.
    """

    mode = "device"

    def __init__(self):
        self._items: Dict[int, Any] = {}

    def put(self, i: int, g_f: torch.Tensor) -> None:
        self._items[i] = g_f

    def get(self, i: int, batch: Mapping[str, Any]) -> torch.Tensor:
        return self._items.pop(i)

    def clear(self) -> None:
        self._items.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items.values() if isinstance(t, torch.Tensor))


class CudaCopyOps:
    """The CUDA operations :class:`HostLogitGradCache` uses, in one place so that a test can put
    recording fakes in their stead (no GPU needed to check the order of copies, events and waits)."""

    @staticmethod
    def on_device(t: torch.Tensor) -> bool:
        return t.device.type == "cuda"

    @staticmethod
    def new_stream():
        return torch.cuda.Stream()

    @staticmethod
    def new_event():
        return torch.cuda.Event()

    @staticmethod
    def current_stream(device):
        return torch.cuda.current_stream(device)

    @staticmethod
    def use_stream(stream):
        return torch.cuda.stream(stream)

    @staticmethod
    def pinned_empty(like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    @staticmethod
    def record_stream(t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


class HostLogitGradCache(LogitGradCache):
    """``"host"``: each ``g_F`` goes to pinned host memory on a side CUDA stream (overlapping the
    rest of pass 1), and comes back on the same stream one micro-batch ahead of its use in pass 2.
    Each copy back records an event on the side stream right after it; the compute stream waits on
    the event of the copy it needs (not on the whole side stream, which by then also holds the next
    micro-batch's copy). On a CPU device the tensors already live in host memory and are kept as
    they are."""

    mode = "host"

    def __init__(self, ops=CudaCopyOps):
        super().__init__()
        self._ops = ops
        self._stream = None
        self._on_device: Dict[int, Any] = {}  # i -> (device tensor, event recorded after its copy)

    def _copy_stream(self):
        if self._stream is None:
            self._stream = self._ops.new_stream()
        return self._stream

    def put(self, i, g_f):
        ops = self._ops
        if not ops.on_device(g_f):
            self._items[i] = g_f
            return
        stream = self._copy_stream()
        host = ops.pinned_empty(g_f)
        stream.wait_stream(ops.current_stream(g_f.device))
        with ops.use_stream(stream):
            host.copy_(g_f, non_blocking=True)
        ops.record_stream(g_f, stream)  # the caching allocator keeps it until the copy has run
        self._items[i] = (host, g_f.device)

    def _fetch(self, i):
        item = self._items.get(i)
        if not isinstance(item, tuple) or i in self._on_device:
            return
        host, device = item
        ops = self._ops
        stream = self._copy_stream()
        with ops.use_stream(stream):
            t = host.to(device, non_blocking=True)
        done = ops.new_event()
        done.record(stream)  # after this copy only: the next one is queued behind it
        self._on_device[i] = (t, done)

    def get(self, i, batch):
        item = self._items.get(i)
        if not isinstance(item, tuple):
            return self._items.pop(i)
        self._fetch(i)
        self._fetch(i + 1)  # the next micro-batch's copy overlaps this one's pass 2
        g_f, done = self._on_device.pop(i)
        current = self._ops.current_stream(g_f.device)
        current.wait_event(done)
        self._ops.record_stream(g_f, current)
        self._items.pop(i)
        return g_f

    def clear(self):
        super().clear()
        self._on_device.clear()


class RecomputeLogitGradCache(LogitGradCache):
    """``"recompute"``: keep the output layer's input (final hidden states, tokens x hidden) of
    each micro-batch and the unperturbed output-layer weight this rank holds; pass 2 recomputes
    ``logits = hidden @ W^T (+ b)`` with ``torch.nn.functional.linear`` (what ``nn.Linear`` runs)
    in the same dtype and ``g_F`` by autograd, bit-identical to what pass 1 computed.

    The weight is copied in a forward pre-hook during the first micro-batch of pass 1, where it is
    materialised anyway (under ZeRO-3 it is the gathered weight: no extra communication, one
    vocab x hidden copy per rank until the end of the step). At ZeRO stage 0 in fp32 the engine
    already saves theta before perturbing and that saved copy is used instead of a second one.
    """

    mode = "recompute"

    def __init__(self, module: torch.nn.Module, saved_copy: Optional[Callable[[torch.Tensor], Any]] = None):
        super().__init__()
        get = getattr(module, "get_output_embeddings", None)
        out = get() if callable(get) else None
        if type(out) is not torch.nn.Linear:
            raise FSAMConfigError('optimizer.params.logit_grad_cache "recompute" needs a model whose '
                                  "get_output_embeddings() is a torch.nn.Linear producing the logits; got "
                                  f"{type(out).__name__}; accepted for this model: device, host")
        self.layer = out
        self._saved_copy = saved_copy
        self.capturing = False
        self._weights = None  # (weight, bias) at theta, copied in pass 1
        self._last = None
        out.register_forward_pre_hook(self._pre_hook)
        out.register_forward_hook(self._post_hook)

    def _pre_hook(self, module, args):
        if self.capturing and self._weights is None:
            w = None if self._saved_copy is None else self._saved_copy(module.weight)
            if w is None:
                w = module.weight.detach().clone()
            b = module.bias.detach().clone() if module.bias is not None else None
            self._weights = (w, b)

    def _post_hook(self, module, args, output):
        if self.capturing:
            self._last = (args[0].detach(), output)

    def put_hidden(self, i: int, logits: torch.Tensor) -> None:
        """After micro-batch ``i``'s forward in pass 1: keep its hidden states (checks that the
        model's logits are the output layer's output, unmodified)."""
        last, self._last = self._last, None
        # the same storage, not necessarily the same tensor object: ZeRO-3's module hooks hand on
        # detached aliases of the outputs
        out = None if last is None else last[1]
        if (not isinstance(out, torch.Tensor) or out.data_ptr() != logits.data_ptr() or out.shape != logits.shape
                or out.dtype != logits.dtype or out.stride() != logits.stride()):
            raise FSAMConfigError('optimizer.params.logit_grad_cache "recompute" needs the model\'s logits to be '
                                  "the output of get_output_embeddings() unchanged (no scaling or soft-capping "
                                  "after it); accepted for this model: device, host")
        self._items[i] = last[0]

    def put(self, i, g_f):  # the hidden states were kept by put_hidden; g_F itself is dropped
        pass

    def get(self, i, batch, loss_fn: Optional[LossFn] = None):
        hidden = self._items.pop(i)
        w, b = self._weights
        if callable(w):
            w = w()
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden, w, b)
        del hidden
        return logit_grad(loss_fn, logits, batch)[1]

    def clear(self):
        super().clear()
        self._weights = None
        self._last = None
        self.capturing = False

    def nbytes(self):
        n = super().nbytes()
        if self._weights is not None:
            n += sum(t.numel() * t.element_size() for t in self._weights if isinstance(t, torch.Tensor))
        return n


def _no_update(*args, **kwargs):
    return None


# last_metrics keys of the share of ||eps||^2 on the input-embedding matrix and on the output layer
SHARE_KEYS = ("eps_share_embed", "eps_share_output")


def share_params(module: torch.nn.Module) -> Dict[str, list]:
    """The trainable parameters of the input embedding (``get_input_embeddings()``, its weight)
    and of the output layer (:func:`fsam_ds.loop.output_layer`) by :data:`SHARE_KEYS`; empty when
    the model names neither."""
    from .loop import model_layer, output_layer

    embed = model_layer(module, "get_input_embeddings")
    out = output_layer(module)
    w = getattr(embed, "weight", None)
    parts = {"eps_share_embed": [w] if isinstance(w, torch.nn.Parameter) and w.requires_grad else [],
             "eps_share_output": [p for p in out.parameters() if p.requires_grad] if out is not None else []}
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
            raise FSAMConfigError(f"optimizer.type {sam.method} with DeepSpeed MoE layers is not supported: expert "
                                  "parameters would be normed over the wrong group; accepted for MoE models: AdamW")
        self.view = make_view(engine)
        self.last_metrics: Dict[str, Any] = {}
        # DeepSpeed's overflow check at every layout: ZeRO 1/2 in bf16 checks only when asked
        # (bf16.check_grad_overflow); ZeRO 0 in fp32 has no check at all, the engine does it
        opt = engine.optimizer
        if getattr(opt, "check_grad_overflow", None) is False:
            opt.check_grad_overflow = True
        self._own_overflow_check = isinstance(self.view, PlainView)
        # An unperturbed step (rho = 0, ||g|| = 0 or a non-finite gradient) has pass-2 gradients
        # identical to pass 1's, so pass 2 is skipped; tests switch this off to run both passes.
        self.skip_unperturbed_pass2 = True
        self._data_iter: Optional[Iterator] = None
        self._sharpness_vector = None  # warm start of the in-training lambda_max
        self.logit_grads: Optional[LogitGradCache] = None
        if sam.functional:
            if sam.logit_grad_cache == "recompute":
                saved = getattr(self.view, "saved_copy", None)
                self.logit_grads = RecomputeLogitGradCache(engine.module, saved)
            elif sam.logit_grad_cache == "host":
                self.logit_grads = HostLogitGradCache()
            else:
                self.logit_grads = LogitGradCache()
        # ascent_every > 1: the last ascent direction at rho = 1 (this rank's tensors, fp32), its
        # global norm, whether it is a real perturbation, and the step it was computed at
        self._eps_unit: Optional[list] = None
        self._eps_unit_norm: Optional[torch.Tensor] = None
        self._eps_unit_ok = False
        self._eps_step = -1
        self._share_params = share_params(engine.module) if sam.is_sam else {}
        self._step_shares = None  # shares of the step's ascent (see _note_ascent)
        self._eps_unit_shares = None
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
        if getattr(outputs, "aux_loss", None) is not None:
            raise FSAMConfigError(
                f"optimizer.type {self.sam.method}: the model's output carries an aux_loss (a MoE router loss) that "
                "train_batch, which builds the loss from the logits, would drop; run the model without it "
                "(output_router_logits=False), or train in loop mode and backward outputs.loss (AdamW, SAM, "
                "PreconditionedSAM)")
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
                g_f = self._cached_logit_grad(logit_grads, i, batch)
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

    def _cached_logit_grad(self, cache, i, batch):
        if isinstance(cache, RecomputeLogitGradCache):
            return cache.get(i, batch, self.loss_fn)
        return cache.get(i, batch)

    @torch.no_grad()
    def _forward_pass(self, batches, logit_grads: LogitGradCache):
        """FunctionalSAM pass 1 of a step that reuses the ascent direction: a forward at theta
        per micro-batch (no graph kept), ``g_F`` by autograd on the detached logits only.
        Returns (losses, rng state before each micro-batch)."""
        losses, states = [], []
        recompute = isinstance(logit_grads, RecomputeLogitGradCache)
        if recompute:
            logit_grads.capturing = True
        for i, batch in enumerate(batches):
            states.append(self._rng_state())
            _, logits = self._forward_logits(batch)
            if recompute:
                logit_grads.put_hidden(i, logits)
            loss, g_f = logit_grad(self.loss_fn, logits, batch)
            del logits
            logit_grads.put(i, g_f)
            losses.append(loss.detach().float())
        if recompute:
            logit_grads.capturing = False
        return losses, states

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
        """rho of the coming step: the warm-up counts applied updates (a skipped step does not
        advance it, as it does not advance DeepSpeed's LR scheduler)."""
        return rho_at(self.adam_steps_taken(), self.sam.rho, self.sam.rho_warmup_steps)

    def compute_ascent(self, rho: float, momentum: bool = False) -> Ascent:
        """The ascent from the current (pass-1) gradients of this rank, or with ``momentum`` from
        AdamW's first moment (``ascent_direction: "momentum"``; after AdamW's first update)."""
        view = self.view
        updates = self.adam_steps_taken()
        denoms = view.denominators(updates) if self.sam.preconditioned else None
        if momentum:
            tensors, scale = view.first_moments(updates), 1.0
            if tensors is None:
                raise RuntimeError("ascent_direction \"momentum\" before AdamW's first update: there is no first moment")
        else:
            tensors, scale = view.grads(), view.grad_scale
        regions = [view.region(self._share_params[k]) for k in SHARE_KEYS] if self._share_params else None
        return ascent_direction(tensors, rho, denoms, self.sam.precondition_norm,
                                group=view.norm_group, grad_scale=scale, regions=regions)

    def uses_momentum(self) -> bool:
        """``ascent_direction: "momentum"``: whether this step's ascent comes from AdamW's first
        moment (from AdamW's first update on; the steps before it are exact)."""
        return self.sam.ascent_direction == "momentum" and self.adam_steps_taken() >= 1

    def _note_ascent(self, ascent: Ascent) -> None:
        """Keep the shares of the perturbation this step applies, for ``last_metrics``."""
        self._step_shares = None if ascent.shares is None or ascent.is_zero else ascent.shares

    def _perturbed_pass(self, batches, ascent: Ascent, rng_states) -> list:
        """Pass 2 at theta + eps (``ascent``; none when it is zero) on the same micro-batches and
        random state, then theta restored. Returns the pass-2 losses (SAM only)."""
        rng_after = self._rng_state()
        perturbed = not ascent.is_zero
        if perturbed:
            self.view.perturb(ascent)
        self.view.zero_grad()
        losses, _ = self._backward_pass(batches, logit_grads=self.logit_grads if self.sam.functional else None,
                                        rng_states=rng_states)
        if rng_states is not None:
            self._set_rng_state(rng_after)
        if perturbed:
            self.view.restore()
        return losses

    def _inexact_passes(self, batches, rho: float):
        """``ascent_every: k > 1``. Every k-th step (and the first) is exact and stores the ascent
        direction at rho = 1; the steps in between reuse it, scaled to the current rho: SAM has
        no pass 1 (the returned loss is then pass 2's, at theta + eps), FunctionalSAM's pass 1 is
        a forward at theta for g_F. Returns (grad_norm or None, eps_norm, losses, reused)."""
        sam = self.sam
        if not self.reuses_ascent():
            losses, rng_states = self._backward_pass(batches, logit_grads=self.logit_grads,
                                                     keep_logit_grads=sam.functional)
            ascent, grad_norm = self._stored_ascent(rho)
            self._note_ascent(ascent)
            if self._runs_pass2(ascent, grad_norm):
                self._perturbed_pass(batches, ascent, rng_states)
            return grad_norm, ascent.eps_norm, losses, False
        ascent = self._reused_ascent(rho)
        self._note_ascent(ascent)
        if sam.functional:
            losses, rng_states = self._forward_pass(batches, self.logit_grads)
            self._perturbed_pass(batches, ascent, rng_states)
        else:
            losses = self._perturbed_pass(batches, ascent, None)
        return None, ascent.eps_norm, losses, True

    def _momentum_passes(self, batches, rho: float):
        """``ascent_direction: "momentum"`` after AdamW's first update: eps from AdamW's first
        moment, no pass-1 backward. SAM has no pass 1 (the returned losses are pass 2's, at
        theta + eps), FunctionalSAM's pass 1 is a forward at theta for g_F (as on ascent_every's
        reusing steps). Pass 2 always runs (it is the only backward). Returns (eps_norm, losses)."""
        ascent = self.compute_ascent(rho, momentum=True)
        self._note_ascent(ascent)
        if self.sam.functional:
            losses, rng_states = self._forward_pass(batches, self.logit_grads)
            self._perturbed_pass(batches, ascent, rng_states)
        else:
            losses = self._perturbed_pass(batches, ascent, None)
        return ascent.eps_norm, losses

    def reuses_ascent(self) -> bool:
        """``ascent_every: k > 1``: whether this step reuses the stored direction (every k-th
        step and the first compute it; an unusable one, ``||g|| = 0`` or not finite, is
        recomputed at the next step)."""
        every = self.sam.ascent_every
        return (every > 1 and self._eps_unit is not None and self._eps_unit_ok
                and int(self._engine.global_steps) % every != 0)

    def _stored_ascent(self, rho: float):
        """``ascent_every: k > 1`` on a computing step: the direction at rho = 1 from the pass-1
        gradients, stored; returns (the ascent at ``rho``, ``||g||``)."""
        unit = self.compute_ascent(1.0)
        self._eps_unit = unit.perturbations()  # new fp32 tensors: theta's own layout on this rank
        self._eps_unit_norm = unit.eps_norm
        self._eps_unit_shares = unit.shares
        self._eps_unit_ok = not unit.is_zero
        self._eps_step = int(self._engine.global_steps)
        return self._reused_ascent(rho), unit.grad_norm

    def _runs_pass2(self, ascent: Ascent, grad_norm) -> bool:
        """Pass 2 runs unless the perturbation is zero (then its gradients would be pass 1's) or
        pass 1's gradient is not finite (the step is skipped: pass 1's gradients go to it)."""
        if not ascent.is_zero:
            return True
        return not self.skip_unperturbed_pass2 and bool(torch.isfinite(grad_norm))

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

    def _reused_ascent(self, rho: float) -> Ascent:
        ok = self._eps_unit_ok and rho > 0
        coef = torch.tensor(float(rho) if ok else 0.0, dtype=torch.float32, device=self._eps_unit_norm.device)
        return Ascent(directions=self._eps_unit, coef=coef, grad_norm=None,
                      eps_norm=self._eps_unit_norm * coef, shares=self._eps_unit_shares)

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """What this rank needs, beyond DeepSpeed's own checkpoint, to continue exactly: with
        ``ascent_every > 1`` the stored ascent direction (this rank's tensors, in the layout the
        rank holds: whole parameters at ZeRO 0, flat partitions at ZeRO 1/2, ``ds_tensor``
        partitions at ZeRO 3), its norm and the step it was computed at. Under ZeRO each rank's
        differs: save one per rank (``fsam-train`` does)."""
        state: Dict[str, Any] = {"method": self.sam.method, "ascent_every": self.sam.ascent_every,
                                 "eps_step": self._eps_step, "eps_unit": None}
        if self._eps_unit is not None:
            state.update(eps_unit=[t.detach().cpu().clone() for t in self._eps_unit],
                         eps_unit_norm=float(self._eps_unit_norm), eps_unit_ok=bool(self._eps_unit_ok),
                         eps_unit_shares=(None if self._eps_unit_shares is None
                                          else [float(x) for x in self._eps_unit_shares]))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on the same rank and layout; ValueError
        for a direction of another layout)."""
        eps = state.get("eps_unit")
        if eps is None:
            self._eps_unit, self._eps_unit_norm, self._eps_unit_ok, self._eps_step = None, None, False, -1
            self._eps_unit_shares = None
            return
        shapes = [tuple(s) for s in self.view.local_shapes()]
        if [tuple(t.shape) for t in eps] != shapes:
            raise ValueError("the stored ascent direction was written for another layout (world size, ZeRO stage "
                             "or model) than this rank's; it is recomputed at the next step instead")
        dev = self._engine.device
        self._eps_unit = [t.to(dev, dtype=torch.float32) for t in eps]
        self._eps_unit_norm = torch.tensor(float(state["eps_unit_norm"]), dtype=torch.float32, device=dev)
        self._eps_unit_ok = bool(state["eps_unit_ok"])
        self._eps_step = int(state.get("eps_step", -1))
        shares = state.get("eps_unit_shares")
        self._eps_unit_shares = None if shares is None else torch.tensor(shares, dtype=torch.float32, device=dev)

    # ---- the step ----------------------------------------------------------------------------
    def train_batch(self, data_iter: Optional[Iterator] = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches from ``data_iter``
        (or the engine's own training dataloader). Returns the mean pass-1 loss."""
        loop = self._loop
        if loop is None:
            return self._train_batch(data_iter)
        if loop.records:
            from .loop import LoopModeError

            raise LoopModeError("train_batch() in the middle of a step of your own loop (forwards recorded since the "
                                "last step()); finish that step with engine.step() first")
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
        sam = self.sam
        skipped_before = int(getattr(eng, "skipped_steps", 0))
        rho = self.current_rho() if sam.is_sam else 0.0

        cache = self.logit_grads
        reused = momentum = False
        self._step_shares = None
        try:
            if sam.is_sam and sam.ascent_every > 1:
                grad_norm, eps_norm, losses, reused = self._inexact_passes(batches, rho)
            elif sam.is_sam and self.uses_momentum():
                momentum, grad_norm = True, None
                eps_norm, losses = self._momentum_passes(batches, rho)
            else:
                losses, rng_states = self._backward_pass(batches, logit_grads=cache, keep_logit_grads=sam.functional)
                grad_norm = eps_norm = None
                if sam.is_sam:
                    ascent = self.compute_ascent(rho)
                    grad_norm, eps_norm = ascent.grad_norm, ascent.eps_norm
                    self._note_ascent(ascent)
                    if self._runs_pass2(ascent, grad_norm):
                        self._perturbed_pass(batches, ascent, rng_states)
                    del ascent
                elif self.view.norm_group is None:
                    # AdamW on unsharded gradients: a local norm, no communication
                    grad_norm = global_norm(self.view.grads()) / self.view.grad_scale
        finally:
            if cache is not None:
                cache.clear()
        eng.micro_steps += gas - 1  # DeepSpeed counts micro-batches; step() adds the last one
        self._finish_step(t0, losses, grad_norm, eps_norm, rho, reused, skipped_before, batches[0],
                          momentum=momentum)
        return self.last_metrics_loss

    def _loop_update(self, loop, lr_kwargs=None) -> None:
        """Loop mode at the accumulation boundary (:meth:`fsam_ds.loop.LoopMode.step`): pass 1
        was the loop's own; the ascent, pass 2 over the recorded micro-batches, the restore and
        DeepSpeed's step, as in :meth:`train_batch`."""
        eng = self._engine
        skipped_before = int(getattr(eng, "skipped_steps", 0))
        rho = self.current_rho()
        boundary = eng._is_gradient_accumulation_boundary
        reused = self.reuses_ascent()
        self._step_shares = None
        try:
            if reused:
                ascent, grad_norm = self._reused_ascent(rho), None
            elif self.sam.ascent_every > 1:
                ascent, grad_norm = self._stored_ascent(rho)
            else:
                ascent = self.compute_ascent(rho)
                grad_norm = ascent.grad_norm
            eps_norm = ascent.eps_norm
            self._note_ascent(ascent)
            if reused or self._runs_pass2(ascent, grad_norm):
                loop.perturbed_pass(ascent)
            del ascent
        finally:
            if self.logit_grads is not None:
                self.logit_grads.clear()
        losses = [r.value for r in loop.records]
        self._finish_step(loop.step_start_time(), losses, grad_norm, eps_norm, rho, reused, skipped_before,
                          loop.records[0].batch(), lr_kwargs=lr_kwargs, boundary=boundary)

    def _finish_step(self, t0, losses, grad_norm, eps_norm, rho, reused, skipped_before, first_batch,
                     lr_kwargs=None, boundary=None, momentum: bool = False) -> None:
        """DeepSpeed's step (or its overflow path) after the restore, then the step's metrics."""
        eng, sam = self._engine, self.sam
        lr = float(eng.get_lr()[0])  # the learning rate this step uses
        if self._own_overflow_check and not self._final_grads_finite(grad_norm, sam.is_sam):
            self._skip_step(lr_kwargs)
        else:
            self._ds_step(lr_kwargs)
        # hand the accumulation boundary back to whoever set it (DeepSpeed's own micro-step counting)
        eng._is_gradient_accumulation_boundary = boundary
        if grad_norm is None and not (reused or momentum):  # AdamW under ZeRO: the norm DeepSpeed's step computed anyway
            grad_norm = eng.get_global_grad_norm()
        loss = self._mean_loss(losses)
        self.last_metrics_loss = loss
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
        if sam.ascent_every > 1:
            self.last_metrics["ascent_reused"] = reused
        if sam.ascent_direction == "momentum":
            self.last_metrics["ascent_momentum"] = momentum
        if sam.is_sam:
            shares, self._step_shares = self._step_shares, None
            values = shares.tolist() if shares is not None else [None] * len(SHARE_KEYS)
            have = self._share_params
            for key, value in zip(SHARE_KEYS, values):
                self.last_metrics[key] = (float(value) if have and value is not None and value == value else None)
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
            outputs = self._engine(**_model_inputs(batch))
            logits = logits_of(outputs)
            return self._loss(outputs, logits, batch).detach().float()
        finally:
            self._engine.module.train(was_training)
