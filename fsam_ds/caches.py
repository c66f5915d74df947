"""Where FunctionalSAM keeps ``g_F`` between pass 1 and pass 2 (``logit_grad_cache``).

One interface for every mode: ``put(i, g_f)`` after micro-batch ``i`` of pass 1, ``get(i, batch)``
in pass 2 (each entry released once read), ``clear()`` at the end of the step, ``nbytes()``.
``"device"``: :class:`LogitGradCache`; ``"host"``: :class:`HostLogitGradCache`; ``"recompute"``:
:class:`RecomputeLogitGradCache` (a Hugging Face-style model whose output layer is an
``nn.Linear``). :func:`make_logit_grad_cache` picks the one configured.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch

from .config import FSAMConfigError
from .lm import LossFn, logit_grad


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

    def get(self, i: int, batch: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
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

    def get(self, i, batch=None):
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

    def __init__(
        self,
        module: torch.nn.Module,
        saved_copy: Optional[Callable[[torch.Tensor], Any]] = None,
        loss_fn: Optional[LossFn] = None,
    ):
        super().__init__()
        self.loss_fn = loss_fn  # the loss g_F is the gradient of (the engine sets it)
        get = getattr(module, "get_output_embeddings", None)
        out = get() if callable(get) else None
        if type(out) is not torch.nn.Linear:
            raise FSAMConfigError(
                'optimizer.params.logit_grad_cache "recompute" needs a model whose '
                "get_output_embeddings() is a torch.nn.Linear producing the logits; got "
                f"{type(out).__name__}; accepted for this model: device, host"
            )
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
        if (
            not isinstance(out, torch.Tensor)
            or out.data_ptr() != logits.data_ptr()
            or out.shape != logits.shape
            or out.dtype != logits.dtype
            or out.stride() != logits.stride()
        ):
            raise FSAMConfigError(
                'optimizer.params.logit_grad_cache "recompute" needs the model\'s logits to be '
                "the output of get_output_embeddings() unchanged (no scaling or soft-capping "
                "after it); accepted for this model: device, host"
            )
        self._items[i] = last[0]

    def put(self, i, g_f):  # the hidden states were kept by put_hidden; g_F itself is dropped
        pass

    def get(self, i, batch=None):
        hidden = self._items.pop(i)
        w, b = self._weights
        if callable(w):
            w = w()
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden, w, b)
        del hidden
        return logit_grad(self.loss_fn, logits, batch)[1]

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


def make_logit_grad_cache(
    mode: str,
    module: Optional[torch.nn.Module] = None,
    saved_copy: Optional[Callable[[torch.Tensor], Any]] = None,
    loss_fn: Optional[LossFn] = None,
) -> LogitGradCache:
    """The cache of ``logit_grad_cache`` ``mode`` (``"recompute"`` needs the model ``module`` and
    the ``loss_fn`` whose gradient ``g_F`` is)."""
    if mode == "recompute":
        if module is None:
            raise ValueError('logit_grad_cache "recompute" needs the model (module=)')
        return RecomputeLogitGradCache(module, saved_copy, loss_fn)
    if mode == "host":
        return HostLogitGradCache()
    return LogitGradCache()
