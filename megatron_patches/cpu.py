"""Running megatron-core on a machine without a GPU (CPU tensors, the gloo backend).

This module is the one place where megatron-core's CUDA assumptions are routed around. It is
applied only when ``torch.cuda.is_available()`` is false; on a GPU machine :func:`apply` does
nothing, so behaviour there is megatron-core's own, unchanged.

What it changes (megatron-core 0.16.1; file:line into ``megatron/core``):

``current_device``
    ``torch.cuda.current_device()`` (about 100 allocations: RoPE, attention buffers, TP
    all-gathers, pipeline receive buffers, DDP buffers) returns the CPU device.
``rng``
    a CPU ``CudaRNGStatesTracker`` and ``model_parallel_cuda_manual_seed`` with megatron's own seed
    offsets (data-parallel ``seed``, model-parallel ``seed + 2718 + tp_rank``, expert
    ``seed + 1024 + 100 * ep_rank + etp_rank``); activation recompute saves and restores the CPU
    generator. On CPU all streams share the one global generator.
``cuda_literals``
    modules that write ``device="cuda"`` literally (pipeline_parallel/schedules.py:596,983,2138;
    optimizer/optimizer.py:473,481,485,907; optimizer/clip_grads.py:90-207;
    optimizer/grad_scaler.py; distributed/param_and_grad_buffer.py:768; utils.py:1207) see a
    ``torch`` whose factory functions map a CUDA device to the CPU and drop ``pin_memory``.
``tensor_type``
    ``Tensor.type()`` reports ``torch.cuda.*`` names to megatron callers, whose optimizers check
    parameter types by those names (optimizer/distrib_optimizer.py:361,420,582,
    optimizer/optimizer.py:671,690, optimizer/clip_grads.py:167).
``tensor_cuda``
    ``Tensor.cuda()`` returns the tensor itself (the distributed optimizer's ``fully_reshardable``
    checkpoint save, distrib_optimizer.py:1089).
``cuda_sync``
    ``torch.cuda.synchronize()`` is a no-op (pipeline p2p, p2p_communication.py:242,398; gloo
    operations are complete after ``wait()``).
``p2p_pairs``
    pipeline point-to-point goes through megatron's unbatched path (``_p2p_ops``) instead of
    ``batch_isend_irecv`` (pipeline_parallel/p2p_communication.py:16). gloo matches the messages
    between two ranks in the order they were posted; with two pipeline stages the previous and the
    next stage are the same rank, so when the interleaved schedule sends and receives in both
    directions at once, a batch posts "send to previous" where the peer posted "receive from
    next" first, and activations and gradients of the same shape are silently swapped (measured:
    wrong gradients, no error). The unbatched path sends the two directions on two different
    process groups.
``distopt_step``
    not a CPU matter but a real bug without apex/TransformerEngine: after
    ``DistributedOptimizer.load_state_dict`` every parameter shares one Adam ``step`` tensor
    (distrib_optimizer.py:817-823) that torch's Adam then increments once per parameter, and the
    ``fully_reshardable`` loader raises ``KeyError: 'step'`` (:940). Each parameter gets its own,
    correct step again. Applied on every machine where megatron-core runs without apex/TE.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

APPLIED: list = []

CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)


class CPURNGStatesTracker:
    """megatron's ``CudaRNGStatesTracker`` with CPU generator states (same interface)."""

    def __init__(self, *args, **kwargs):
        self.reset()
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()
        self._current_state_name = "default-rng"

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig, orig_name = torch.get_rng_state(), self._current_state_name
        if orig_name != "default-rng":
            self.states_[orig_name] = orig
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            if orig_name != "default-rng":
                orig = self.states_[orig_name]
            torch.set_rng_state(orig)
            self._current_state_name = orig_name


def _patch_current_device():
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment,return-value]


def _patch_rng():
    import megatron.core.tensor_parallel as TP
    from megatron.core.tensor_parallel import random as R

    def initialize_rng_tracker(*args, force_reset=False, **kwargs):
        if force_reset or not R._CUDA_RNG_STATE_TRACKER_INITIALIZED:
            R._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
            R._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    def model_parallel_cuda_manual_seed(
        seed, *args, tp_rank=None, ep_rank=None, etp_rank=None, force_reset_rng=False, **kwargs
    ):
        tp_rank = R.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        ep_rank = R.get_expert_model_parallel_rank() if ep_rank is None else ep_rank
        etp_rank = R.get_expert_tensor_parallel_rank() if etp_rank is None else etp_rank
        initialize_rng_tracker(force_reset=True)
        torch.manual_seed(seed)
        tracker = R._CUDA_RNG_STATE_TRACKER
        tracker.add(R._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        tracker.add(R._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
        tracker.add(R._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)

    R._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    R._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    R.CudaRNGStatesTracker = CPURNGStatesTracker
    R.initialize_rng_tracker = initialize_rng_tracker
    R.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    TP.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


def _cpu_device(device):
    if device is not None and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _TorchOnCPU(types.ModuleType):
    """``torch`` as seen by a module with CUDA literals: factories allocate on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_cuda_literals():
    shim = _TorchOnCPU("torch")
    for fname in ("tensor", "zeros", "ones", "empty", "full", "arange"):
        real = getattr(torch, fname)

        def factory(*args, device=None, pin_memory=False, _real=real, **kwargs):
            return _real(*args, device=_cpu_device(device), **kwargs)

        setattr(shim, fname, factory)
    for name in CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = shim


def _patch_tensor_type():
    original = torch.Tensor.type
    if getattr(original, "_fsam_cpu", False):
        return

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.") and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch.") :]
            return name
        return original(self, dtype, non_blocking, **kwargs)

    type_._fsam_cpu = True
    torch.Tensor.type = type_


def _patch_tensor_cuda():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_cuda_sync():
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_p2p_pairs():
    from megatron.core.pipeline_parallel import p2p_communication as P

    def batched_as_pairs(**kwargs):
        return list(P._p2p_ops(**kwargs).values())

    P._batched_p2p_ops = batched_as_pairs


def _patch_distopt_step():
    from megatron.core.optimizer import distrib_optimizer as DO

    if getattr(DO.DistributedOptimizer.load_state_dict, "_fsam_fixed", False) or DO.HAVE_APEX_OR_TE:
        return
    original_load = DO.DistributedOptimizer.load_state_dict

    def load_state_dict(self, state_dict):
        out = original_load(self, state_dict)
        for group in self.optimizer.param_groups:
            if "step" in group:
                for p in group["params"]:
                    st = self.optimizer.state.get(p)
                    if st is not None and "step" in st:
                        st["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
        return out

    original_set = DO.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            gi, go = self.model_param_group_index_map[model_param]
            st = self.optimizer.state.get(self.optimizer.param_groups[gi]["params"][go], {})
            if "step" in st:
                tensors = {**tensors, "step": st["step"]}
        return original_set(self, model_param, tensors)

    load_state_dict._fsam_fixed = True
    DO.DistributedOptimizer.load_state_dict = load_state_dict
    DO.DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states


_CPU_PATCHES = (
    ("current_device", _patch_current_device),
    ("rng", _patch_rng),
    ("cuda_literals", _patch_cuda_literals),
    ("tensor_type", _patch_tensor_type),
    ("tensor_cuda", _patch_tensor_cuda),
    ("cuda_sync", _patch_cuda_sync),
    ("p2p_pairs", _patch_p2p_pairs),
)


def apply() -> list:
    """Install the patches this machine needs (idempotent); returns the names applied so far.

    Call it in every rank after ``import megatron.core`` and before any ``from megatron.core...
    import model_parallel_cuda_manual_seed`` binds the original. With a GPU only ``distopt_step``
    is applied (and only where megatron-core runs without apex/TransformerEngine).
    """
    wanted = [] if torch.cuda.is_available() else list(_CPU_PATCHES)
    wanted.append(("distopt_step", _patch_distopt_step))
    for name, fn in wanted:
        if name not in APPLIED:
            fn()
            APPLIED.append(name)
    return list(APPLIED)
