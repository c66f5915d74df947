"""Sharpness diagnostics: where the sharpness along a direction goes, the top Hessian and
Gauss-Newton eigenvalues, and calibration.

Definitions (the README's "The method", with ``H_L`` the loss Hessian, ``J = dF/dtheta`` the
Jacobian of the logits, ``H_ell`` the Hessian of the loss with respect to the logits)::

    H_G      = J^T H_ell J                      Gauss-Newton matrix ("logit path", PSD)
    H_F      = H_L - H_G                        functional part ("functional path")
    eps_hat  = direction / ||direction||        default direction: the gradient g
    d_logit  = H_G eps_hat                      Gauss-Newton-vector product: jvp, H_ell, vjp
    d_func   = H_L eps_hat - d_logit            H_L eps_hat a Hessian-vector product
    tau_logit = ||d_logit||^2,  tau_func = ||d_func||^2,  tau_cross = 2 <d_logit, d_func>
    tau_logit + tau_func + tau_cross = ||H_L eps_hat||^2

Everything is exact autograd (double backward for ``H_L v``; forward-mode ``jvp`` through the
network, the logit-space Hessian of the loss, and a ``vjp`` for ``H_G v``); nothing is a finite
difference. To first order in ``rho`` SAM's gradient is ``g + rho (d_logit + d_func)``, and
FunctionalSAM's is ``g + rho d_func``.

The public functions take ``model`` as any of

* a plain ``torch.nn.Module`` whose forward returns logits (or an object with ``.logits``, as
  Hugging Face causal LMs do);
* a DeepSpeed engine or an :class:`fsam_ds.engine.FSAMEngine` at ZeRO stage 0 to 3. Stages 0-2
  hold whole parameters and are read in place. At stage 3 every rank gathers the full parameters
  (``deepspeed.zero.GatheredParameters``, a collective: **every rank must call**) into a plain,
  unpartitioned copy of the module (Hugging Face models; rebuilt from ``module.config`` on the meta
  device, nothing initialised twice) and computes on it; with the same batch every rank gets the
  same numbers, with its own batch each rank gets the values of its own batch.

Products are computed on a detached copy of the weights (``torch.func.functional_call``), with
the module in eval mode (no dropout, so every product sees the same function) and attention on
PyTorch's math kernel (the fused kernels have no double backward), in the
parameters' dtype promoted to at least float32 (``dtype=`` overrides it; float64 for tests). The
model's weights, gradients and random state are left untouched.

``batch`` is a dict with ``input_ids`` and optionally ``labels`` and ``attention_mask`` (Hugging
Face conventions); ``loss_fn(logits, batch) -> scalar`` defaults to the mean next-token
cross-entropy (the engine's own loss for an FSAMEngine).

Main entry points: :func:`sharpness_terms`, :func:`lambda_max`, :func:`calibration` /
:class:`CalibrationStats` / :func:`model_calibration`. ``fsam_ds/sharpness_report.py`` runs them
on a saved checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union, cast

import torch
from torch.func import functional_call

from .distributed import comm_device
from .lm import default_loss, labels_of, logits_of
from .names import SHARPNESS_METRICS

__all__ = [
    "sharpness_terms",
    "lambda_max",
    "LambdaMax",
    "calibration",
    "CalibrationStats",
    "model_calibration",
    "Problem",
    "plain_module",
    "training_diagnostics",
    "TRAINING_KEYS",
]

LossFn = Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]
Direction = Union[None, Sequence[torch.Tensor], Mapping[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# The model as a pure function of its parameters
# ---------------------------------------------------------------------------------------------


def _unwrap(model) -> tuple:
    """(module, default loss_fn or None, DeepSpeed engine or None)."""
    if hasattr(model, "loss_fn") and hasattr(getattr(model, "engine", None), "module"):  # an FSAMEngine
        return model.engine.module, model.loss_fn, model.engine
    if hasattr(model, "zero_optimization_stage") and hasattr(model, "module"):
        return model.module, None, model
    return model, None, None


def _math_attention():
    """PyTorch's math kernel for scaled-dot-product attention: the fused CPU/GPU kernels have no
    double backward, which Hessian-vector products need."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _plain_linear():
    """PyTorch's own ``F.linear``: a ZeRO-3 engine replaces it process-wide with an autograd
    Function (memory-efficient linear) that has neither forward-mode nor double backward."""
    import torch.nn.functional as F

    saved = F.linear
    patched = getattr(saved, "__name__", "") == "zero3_linear_wrap"
    if patched:
        F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        if patched:
            F.linear = saved


def _is_zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def plain_module(model, dtype: Optional[torch.dtype] = None) -> tuple:
    """``(module, params)``: a module to call with ``torch.func.functional_call`` and a dict of
    detached full parameters (name -> tensor) of ``dtype`` (default: the parameters' dtype promoted
    to at least float32).

    For ZeRO-3 the parameters are gathered on every rank (a collective) and the module is an
    unpartitioned copy; otherwise the module is the model's own and the tensors share nothing
    with its weights when a cast is needed (and are detached views otherwise, never written).
    """
    module, _, _ = _unwrap(model)

    def cast(t: torch.Tensor) -> torch.Tensor:
        want = dtype or (t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32)
        return t.detach().to(want)

    if not _is_zero3(module):
        params = {n: cast(p) for n, p in module.named_parameters()}
        return module, params
    import deepspeed

    if not hasattr(module, "config"):
        raise TypeError(
            "sharpness diagnostics under ZeRO stage 3 need a Hugging Face model (a module with "
            f".config to rebuild unpartitioned); got {type(module).__name__}"
        )
    names = [n for n, _ in module.named_parameters()]
    plist = [p for _, p in module.named_parameters()]
    with deepspeed.zero.GatheredParameters(plist, modifier_rank=None):
        params = {n: cast(p).clone() for n, p in zip(names, plist)}
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    with torch.device("meta"):
        copy = type(module)(module.config)
    copy.load_state_dict({**params}, strict=False, assign=True)
    for name, buf in buffers.items():  # non-persistent buffers (e.g. rotary frequencies)
        owner, _, leaf = name.rpartition(".")
        mod = copy.get_submodule(owner) if owner else copy
        mod._buffers[leaf] = buf
    missing = [n for n, t in list(copy.named_parameters()) + list(copy.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"ZeRO-3 copy of {type(module).__name__}: {missing[0]} was not gathered")
    copy.train(module.training)
    return copy, params


class Problem:
    """The loss of one batch as a function of the parameters, with cached autograd graphs for
    repeated Hessian and Gauss-Newton products (used by :func:`sharpness_terms` and
    :func:`lambda_max`; public for custom analyses).

    Vectors are dicts name -> tensor shaped like the parameters, or flat 1-D tensors
    (:meth:`flat` / :meth:`unflat` convert).
    """

    def __init__(
        self, model, batch: Mapping[str, Any], loss_fn: Optional[LossFn] = None, dtype: Optional[torch.dtype] = None
    ):
        module, engine_loss, engine = _unwrap(model)
        self.module, self.params = plain_module(model, dtype)
        self.names = list(self.params)
        self.loss_fn: LossFn = loss_fn or engine_loss or default_loss
        dev = next(iter(self.params.values())).device
        self.batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        self._inputs = {k: v for k, v in self.batch.items() if k != "labels"}
        self._logits_of = logits_of
        # (leaves, loss, gradients with their graph) and (leaves, logits, logit leaf, g_F with its graph)
        self._hvp_graph: Optional[tuple[List[torch.Tensor], torch.Tensor, List[Optional[torch.Tensor]]]] = None
        self._gn_graph: Optional[tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = None

    # ---- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self):
        was = self.module.training
        self.module.eval()
        try:
            with _math_attention(), _plain_linear():
                yield
        finally:
            self.module.train(was)

    def logits(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(self.module, dict(params), (), dict(self._inputs))
        logits = self._logits_of(out)
        if logits is None:
            raise TypeError(
                f"sharpness diagnostics need a model whose forward returns logits; got {type(out).__name__}"
            )
        return logits

    def loss_of_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, self.batch)

    def flat(self, vec: Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]) -> torch.Tensor:
        items = [vec[n] for n in self.names] if isinstance(vec, Mapping) else list(vec)
        if len(items) != len(self.names):
            raise ValueError(f"a direction needs one tensor per parameter ({len(self.names)}), got {len(items)}")
        ref = next(iter(self.params.values()))
        return torch.cat([t.detach().reshape(-1).to(ref.dtype) for t in items])

    def unflat(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, i = {}, 0
        for n in self.names:
            p = self.params[n]
            out[n] = flat[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def _grads(self, outputs, inputs, grad_outputs=None, **kw):
        gs = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, allow_unused=True, **kw)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs)]

    # ---- loss, gradient, products -----------------------------------------------------------------
    def _hvp_graph_built(self) -> tuple[List[torch.Tensor], torch.Tensor, List[Optional[torch.Tensor]]]:
        if self._hvp_graph is None:
            with self._eval_mode():
                leaves = [self.params[n].clone().requires_grad_(True) for n in self.names]
                loss = self.loss_of_logits(self.logits(dict(zip(self.names, leaves))))
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            self._hvp_graph = (leaves, loss.detach(), list(grads))
        return self._hvp_graph

    def loss_and_grad(self) -> tuple:
        """(loss, flat gradient)."""
        leaves, loss, grads = self._hvp_graph_built()
        return loss, torch.cat(
            [(torch.zeros_like(p) if g is None else g.detach()).reshape(-1) for g, p in zip(grads, leaves)]
        )

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H_L v`` (flat in, flat out) by double backward through a cached gradient graph."""
        leaves, _, grads = self._hvp_graph_built()
        vs = self.unflat(v)
        pairs = [(g, vs[n]) for g, n in zip(grads, self.names) if g is not None and g.requires_grad]
        if not pairs:
            return torch.zeros_like(v)
        dot = sum((g * u).sum() for g, u in pairs)
        return torch.cat([x.reshape(-1) for x in self._grads(dot, leaves, retain_graph=True)])

    def _gn_graph_built(self) -> tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._gn_graph is None:
            with self._eval_mode():
                leaves = [self.params[n].clone().requires_grad_(True) for n in self.names]
                logits = self.logits(dict(zip(self.names, leaves)))
                f_leaf = logits.detach().requires_grad_(True)
                (g_f,) = torch.autograd.grad(self.loss_of_logits(f_leaf), f_leaf, create_graph=True)
            self._gn_graph = (leaves, logits, f_leaf, g_f)
        return self._gn_graph

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """``J v``: the logits' directional derivative, by forward-mode autodiff."""
        with self._eval_mode():
            jv: torch.Tensor = torch.func.jvp(self.logits, (dict(self.params),), (self.unflat(v),))[1]
        return jv

    def gnvp(self, v: torch.Tensor) -> torch.Tensor:
        """``H_G v = J^T H_ell J v``: a jvp, the loss Hessian in logit space (double backward of
        the loss with respect to the logits), then a vjp through a cached graph."""
        leaves, logits, f_leaf, g_f = self._gn_graph_built()
        jv = self.jvp(v)
        if g_f.requires_grad:
            (h_jv,) = torch.autograd.grad(
                g_f, f_leaf, grad_outputs=jv.to(g_f.dtype), retain_graph=True, allow_unused=True
            )
            h_jv = torch.zeros_like(f_leaf) if h_jv is None else h_jv
        else:  # a loss linear in the logits
            h_jv = torch.zeros_like(f_leaf)
        out = self._grads(logits, leaves, grad_outputs=h_jv.to(logits.dtype), retain_graph=True)
        return torch.cat([x.reshape(-1) for x in out])

    def operator(self, matrix: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if matrix in ("hessian", "H", "H_L"):
            return self.hvp
        if matrix in ("gauss_newton", "gn", "GN", "H_G"):
            return self.gnvp
        raise ValueError(f"matrix {matrix!r} is not supported; accepted: hessian, gauss_newton")


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


# ---------------------------------------------------------------------------------------------
# tau_logit / tau_func / tau_cross
# ---------------------------------------------------------------------------------------------


def sharpness_terms(
    model,
    batch: Mapping[str, Any],
    loss_fn: Optional[LossFn] = None,
    direction: Direction = None,
    normalize: bool = True,
    dtype: Optional[torch.dtype] = None,
    problem: Optional[Problem] = None,
) -> Dict[str, float]:
    """Split the Hessian-vector product along ``eps_hat`` into its logit and functional paths.

    Args:
        model: a module, DeepSpeed engine or FSAMEngine (see the module docstring; ZeRO-3: every
            rank must call).
        batch: one micro-batch (dict with ``input_ids``, optionally ``labels``, ``attention_mask``).
        loss_fn: ``loss_fn(logits, batch)``; default the engine's or the mean next-token CE.
        direction: one tensor per parameter (list in ``named_parameters`` order, or a dict by
            name); default the gradient of this batch's loss.
        normalize: ``eps_hat = direction / ||direction||`` (default); ``False`` uses the direction
            as given (e.g. ``eps / rho`` of a preconditioned step whose ``||eps|| != rho``).
        dtype: compute dtype (default: parameters' dtype promoted to at least float32).

    Returns a dict of floats: ``tau_logit``, ``tau_func``, ``tau_cross``, ``hvp_sq_norm``
    (``||H_L eps_hat||^2``, equal to the sum of the three), ``logit_fraction``
    (``tau_logit / (tau_logit + tau_func)``), ``curv_hessian`` (``eps_hat^T H_L eps_hat``),
    ``curv_gn`` (``eps_hat^T H_G eps_hat``), ``loss`` and ``grad_norm`` of the batch. A zero
    direction gives zeros.
    """
    pb = problem or Problem(model, batch, loss_fn, dtype)
    loss, g = pb.loss_and_grad()
    grad_norm = float(g.double().norm())
    d = g if direction is None else pb.flat(direction)
    d_norm = float(d.double().norm())
    if normalize:
        d = d / d_norm if d_norm > 0 and math.isfinite(d_norm) else torch.zeros_like(d)
    hv = pb.hvp(d)
    d_logit = pb.gnvp(d)
    d_func = hv - d_logit
    t_logit, t_func = _dot(d_logit, d_logit), _dot(d_func, d_func)
    out = {
        "tau_logit": t_logit,
        "tau_func": t_func,
        "tau_cross": 2.0 * _dot(d_logit, d_func),
        "hvp_sq_norm": _dot(hv, hv),
        "logit_fraction": t_logit / (t_logit + t_func) if (t_logit + t_func) > 0 else 0.0,
        "curv_hessian": _dot(d, hv),
        "curv_gn": _dot(d, d_logit),
        "loss": float(loss),
        "grad_norm": grad_norm,
    }
    return out


# ---------------------------------------------------------------------------------------------
# lambda_max
# ---------------------------------------------------------------------------------------------


@dataclass
class LambdaMax:
    """Result of :func:`lambda_max`: the eigenvalue estimate ``value``, the matrix-vector
    products used (``iterations``), the explicit residual ``||A v - value v||`` of the unit
    eigenvector estimate ``vector`` (flat), and whether ``residual <= tol * |value|``."""

    value: float
    iterations: int
    residual: float
    converged: bool
    matrix: str
    method: str
    vector: Optional[torch.Tensor] = field(default=None, repr=False)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "value": self.value,
            "iterations": self.iterations,
            "residual": self.residual,
            "converged": self.converged,
            "matrix": self.matrix,
            "method": self.method,
        }


def _start_vector(n: int, like: torch.Tensor, seed: int, init: Optional[torch.Tensor]) -> torch.Tensor:
    if init is not None and init.numel() == n and float(init.double().norm()) > 0:
        v = init.detach().reshape(-1).to(like)
    else:
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=gen, dtype=torch.float64).to(like)
    return v / v.norm()


def lambda_max(
    model,
    batch: Mapping[str, Any],
    matrix: str = "hessian",
    method: str = "lanczos",
    iters: int = 20,
    tol: float = 1e-3,
    loss_fn: Optional[LossFn] = None,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    init: Optional[torch.Tensor] = None,
    problem: Optional[Problem] = None,
) -> LambdaMax:
    """The largest eigenvalue of the loss Hessian ``H_L`` (``matrix="hessian"``) or of the
    Gauss-Newton matrix ``H_G`` (``matrix="gauss_newton"``) on one batch.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalisation; the largest Ritz value
    of the tridiagonal matrix is the estimate of the largest (algebraic) eigenvalue, and it stops
    once the Ritz residual bound ``beta_k |s_k|`` is ``<= tol * |value|`` or after ``iters``
    products. ``method="power"``: power iteration (the eigenvalue of largest magnitude; for the
    indefinite ``H_L`` prefer Lanczos), stopping when ``||A v - value v|| <= tol * |value|``.
    Either way the reported ``residual`` is recomputed explicitly with one more product.
    ``init`` (a flat vector, e.g. the previous call's ``vector``) warm-starts it; otherwise a
    normal vector from ``seed``.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method {method!r} is not supported; accepted: lanczos, power")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    pb = problem or Problem(model, batch, loss_fn, dtype)
    op = pb.operator(matrix)
    ref = next(iter(pb.params.values()))
    n = pb.numel
    q = _start_vector(n, ref, seed, init)
    products = 0
    if method == "power":
        v, value = q, 0.0
        for _ in range(iters):
            av = op(v)
            products += 1
            value = _dot(v, av)
            res = float((av - value * v).double().norm())
            nrm = av.norm()
            if res <= tol * abs(value) or float(nrm) == 0.0:
                break
            v = av / nrm
        vec = v
    else:
        basis: List[torch.Tensor] = [q]
        alphas: List[float] = []
        betas: List[float] = []
        value = 0.0
        s: Optional[torch.Tensor] = None  # the Ritz vector in the Krylov basis
        for k in range(min(iters, n)):
            w = op(basis[-1])
            products += 1
            a = _dot(w, basis[-1])
            alphas.append(a)
            for _ in range(2):  # full reorthogonalisation, twice for stability
                for b in basis:
                    w = w - _dot(w, b) * b
            beta = float(w.double().norm())
            t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if betas:
                off = torch.tensor(betas, dtype=torch.float64)
                t = t + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(t)
            value, s = float(evals[-1]), evecs[:, -1]
            if beta * abs(float(s[-1])) <= tol * abs(value) or beta <= 1e-12 * max(1.0, abs(value)):
                break
            if k + 1 < min(iters, n):
                betas.append(beta)
                basis.append(w / beta)
        assert s is not None, "lambda_max: iters must be >= 1"
        vec = cast(torch.Tensor, sum(float(c) * b for c, b in zip(s, basis)))
        vec = vec / vec.norm()
    av = op(vec)
    value = _dot(vec, av) if method == "power" else value
    residual = float((av - value * vec).double().norm())
    return LambdaMax(
        value=value,
        iterations=products,
        residual=residual,
        converged=residual <= tol * abs(value),
        matrix=matrix,
        method=method,
        vector=vec.detach(),
    )


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


class CalibrationStats:
    """Accumulates calibration over many batches (exact over the whole set, not a mean of
    per-batch values). Bins are ``n_bins`` equal-width intervals ``(i/n, (i+1)/n]`` of the
    confidence (the top softmax probability); ECE ``= sum_b (n_b / N) |accuracy_b - confidence_b|``.
    """

    def __init__(self, n_bins: int = 15):
        if not (isinstance(n_bins, int) and n_bins >= 1):
            raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
        self.n_bins = n_bins
        # per bin: count, sum of confidence, number correct; then total entropy, total NLL
        self.sums = torch.zeros(3 * n_bins + 2, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> None:
        """``logits [..., V]`` and aligned ``labels [...]`` (no shift; ``ignore_index`` skipped)."""
        logits = logits.reshape(-1, logits.shape[-1]).double()
        labels = labels.reshape(-1).to(logits.device)
        keep = labels != ignore_index
        logits, labels = logits[keep], labels[keep]
        if labels.numel() == 0:
            return
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        conf, pred = p.max(-1)
        correct = (pred == labels).double()
        entropy = -(p * logp).sum(-1)
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        idx = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        nb = self.n_bins
        s = torch.zeros_like(self.sums)
        s[:nb] = torch.bincount(idx, minlength=nb).double().cpu()
        s[nb : 2 * nb] = torch.bincount(idx, weights=conf, minlength=nb).cpu()
        s[2 * nb : 3 * nb] = torch.bincount(idx, weights=correct, minlength=nb).cpu()
        s[3 * nb] = entropy.sum().cpu()
        s[3 * nb + 1] = nll.sum().cpu()
        self.sums += s

    def all_reduce(self, group=None) -> "CalibrationStats":
        """Sum the statistics over ``group`` (all ranks by default) when distributed is running."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            t = self.sums.to(comm_device(group))
            dist.all_reduce(t, group=group)
            self.sums = t.cpu()
        return self

    def result(self) -> Dict[str, float]:
        """``ece``, ``mean_max_prob``, ``mean_entropy`` (nats), ``accuracy``, ``nll``, ``n_tokens``."""
        nb = self.n_bins
        count, conf, correct = self.sums[:nb], self.sums[nb : 2 * nb], self.sums[2 * nb : 3 * nb]
        n = float(count.sum())
        if n == 0:
            return {
                "ece": float("nan"),
                "mean_max_prob": float("nan"),
                "mean_entropy": float("nan"),
                "accuracy": float("nan"),
                "nll": float("nan"),
                "n_tokens": 0,
            }
        ece = float((conf - correct).abs().sum() / n)  # sum_b n_b/N |acc_b - conf_b|
        return {
            "ece": ece,
            "mean_max_prob": float(conf.sum() / n),
            "mean_entropy": float(self.sums[3 * nb] / n),
            "accuracy": float(correct.sum() / n),
            "nll": float(self.sums[3 * nb + 1] / n),
            "n_tokens": int(n),
        }


def calibration(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, ignore_index: int = -100
) -> Dict[str, float]:
    """Calibration of predictions ``logits [..., V]`` against aligned ``labels [...]`` (already
    shifted for a causal LM): expected calibration error over ``n_bins`` equal-width confidence
    bins, mean max-probability, mean entropy (nats), accuracy, NLL and the token count."""
    stats = CalibrationStats(n_bins)
    stats.update(logits, labels, ignore_index)
    return stats.result()


@torch.no_grad()
def model_calibration(
    model,
    batches: Iterable[Mapping[str, Any]],
    n_bins: int = 15,
    shift: bool = True,
    dtype: Optional[torch.dtype] = None,
    group=None,
) -> Dict[str, float]:
    """Calibration of ``model`` over all tokens of ``batches`` (eval mode). ``shift``: next-token
    prediction (logits at ``t`` against labels at ``t + 1``, Hugging Face convention; labels from
    ``labels`` or ``input_ids`` with padding ignored). With ``group`` (or under a running
    distributed job with a DeepSpeed engine) the statistics are summed over the ranks' batches."""
    module, params = plain_module(model, dtype)
    dev = next(iter(params.values())).device
    stats = CalibrationStats(n_bins)
    was = module.training
    module.eval()
    try:
        for batch in batches:
            batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            out = functional_call(module, params, (), {k: v for k, v in batch.items() if k != "labels"})
            logits = logits_of(out)
            if logits is None:
                raise ValueError(f"model_calibration: the model's output ({type(out).__name__}) holds no logits")
            labels = labels_of(batch)
            if shift:
                logits, labels = logits[..., :-1, :], labels[..., 1:]
            stats.update(logits, labels)
    finally:
        module.train(was)
    _, _, engine = _unwrap(model)
    if group is not None or engine is not None:
        stats.all_reduce(group if group is not None else getattr(engine, "data_parallel_group", None))
    return stats.result()


# ---------------------------------------------------------------------------------------------
# In training (optimizer.params.sharpness_every)
# ---------------------------------------------------------------------------------------------

#: The keys :func:`training_diagnostics` adds to ``engine.last_metrics`` and ``metrics.jsonl``.
TRAINING_KEYS = SHARPNESS_METRICS
#: Lanczos products per in-training lambda_max (warm-started from the previous estimate).
TRAINING_LANCZOS_ITERS = 8


def training_diagnostics(engine, batch: Mapping[str, Any], init: Optional[torch.Tensor] = None) -> tuple:
    """The diagnostics an :class:`~fsam_ds.engine.FSAMEngine` records every ``sharpness_every``
    steps: :func:`sharpness_terms` along the normalised gradient of ``batch`` and the Hessian's
    :func:`lambda_max` (Lanczos, :data:`TRAINING_LANCZOS_ITERS` products, warm-started from
    ``init``), at the weights after the step. Every data-parallel rank computes on its own
    ``batch``; the values are averaged over the ranks. Returns ``(dict of TRAINING_KEYS, vector)``
    with the eigenvector estimate for the next warm start."""
    import time

    import torch.distributed as dist

    t0 = time.perf_counter()
    pb = Problem(engine, batch)
    terms = sharpness_terms(engine, batch, problem=pb)
    lm = lambda_max(engine, batch, matrix="hessian", iters=TRAINING_LANCZOS_ITERS, tol=1e-3, init=init, problem=pb)
    values = {k: terms[k] for k in TRAINING_KEYS[:7]}
    values.update(lambda_max=lm.value, lambda_max_iters=lm.iterations, lambda_max_residual=lm.residual)
    ds = engine.engine if hasattr(engine, "engine") else engine
    world = int(getattr(ds, "dp_world_size", 1))
    if world > 1 and dist.is_initialized():
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t, group=ds.data_parallel_group)
        values = {k: float(x) / world for k, x in zip(keys, t.cpu())}
        values["lambda_max_iters"] = int(round(values["lambda_max_iters"]))
    values["sharpness_time"] = time.perf_counter() - t0
    return values, lm.vector
