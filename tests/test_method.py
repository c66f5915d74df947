"""The pure method functions against independent float64 computations (torch.func, explicit
formulas), on a real tiny Llama and real text."""

from __future__ import annotations

import pytest
import torch
from reference import micro_batch, tiny_llama
from torch.func import functional_call, grad, jvp, vjp

from fsam_ds.method import adam_denominator, ascent_direction, causal_lm_loss, functional_surrogate, global_norm, rho_at


@pytest.fixture(scope="module")
def toy():
    model = tiny_llama(0, dtype=torch.float64, attn="eager")  # eager: forward-mode AD needs it
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = micro_batch(0, 0, 0, 1, 1, mbs=2, seq=12)["input_ids"]

    def logits_fn(p):
        return functional_call(model, p, (), {"input_ids": ids}).logits

    def ce(logits):  # hand-written shifted cross-entropy
        logp = torch.log_softmax(logits[:, :-1], -1)
        return -logp.gather(-1, ids[:, 1:, None]).mean()

    return model, params, ids, logits_fn, ce


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_causal_lm_loss_matches_hand_written(toy):
    _, params, ids, logits_fn, ce = toy
    logits = logits_fn(params)
    assert torch.allclose(causal_lm_loss(logits, ids).double(), ce(logits), rtol=1e-6)
    labels = ids.clone()
    labels[:, :5] = -100
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    keep = labels[:, 1:] != -100
    expected = -(logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)[keep]).mean()
    assert torch.allclose(causal_lm_loss(logits, labels).float(), expected, rtol=1e-6)
    # float64 logits keep float64 (the references run in float64), float32 ones give float32
    assert causal_lm_loss(logits.double(), labels).dtype == torch.float64
    assert causal_lm_loss(logits.float(), labels).dtype == torch.float32


def _sam_pieces(toy, rho):
    _, params, ids, logits_fn, ce = toy
    names = list(params)
    g = grad(lambda p: ce(logits_fn(p)))(params)
    asc = ascent_direction([g[k] for k in names], rho)
    eps = dict(zip(names, asc.perturbations()))
    gf = grad(ce)(logits_fn(params))
    return names, params, g, eps, gf, asc


def test_sam_and_fsam_gradients(toy):
    _, params, ids, logits_fn, ce = toy
    rho = 0.05
    names, params, g, eps, gf, asc = _sam_pieces(toy, rho)
    gvec = flat([g[k] for k in names])
    assert torch.allclose(flat([eps[k] for k in names]).double(), (rho * gvec / gvec.norm()), atol=1e-7)
    assert float(asc.grad_norm) == pytest.approx(float(gvec.norm()), rel=1e-6)
    pert = {k: params[k] + eps[k].double() for k in names}
    # SAM: the loss gradient at theta + eps
    p2 = {k: v.clone().requires_grad_(True) for k, v in pert.items()}
    ours = torch.autograd.grad(causal_lm_loss(logits_fn(p2), ids), [p2[k] for k in names])
    expected = grad(lambda p: ce(logits_fn(p)))(pert)
    for k, o in zip(names, ours):
        assert torch.allclose(o.double(), expected[k], atol=1e-6, rtol=1e-5), k
    # FunctionalSAM: the surrogate's gradient is J(theta+eps)^T g_F(theta), a torch.func vjp
    p3 = {k: v.clone().requires_grad_(True) for k, v in pert.items()}
    ours = torch.autograd.grad(functional_surrogate(logits_fn(p3), gf), [p3[k] for k in names])
    _, pullback = vjp(logits_fn, pert)
    (expected,) = pullback(gf)
    for k, o in zip(names, ours):
        assert torch.allclose(o, expected[k], atol=1e-12, rtol=1e-10), k
    # and it is not the SAM gradient
    assert not torch.allclose(flat(ours), flat([grad(lambda p: ce(logits_fn(p)))(pert)[k] for k in names]), atol=1e-8)


def test_sam_minus_fsam_over_rho_tends_to_gauss_newton_product(toy):
    _, params, ids, logits_fn, ce = toy
    names = list(params)
    g = grad(lambda p: ce(logits_fn(p)))(params)
    gnorm = flat([g[k] for k in names]).norm()
    unit = {k: g[k] / gnorm for k in names}
    # delta_logit = J^T H_l J eps_hat: jvp, the loss Hessian in logit space, vjp (all exact)
    logits, j_eps = jvp(logits_fn, (params,), (unit,))
    _, h_j_eps = jvp(grad(ce), (logits,), (j_eps,))
    _, pullback = vjp(logits_fn, params)
    delta = flat([pullback(h_j_eps)[0][k] for k in names])
    gf = grad(ce)(logits)
    errors = []
    # (eager attention keeps its softmax in float32, so rho stays above that round-off)
    for rho in (1e-1, 1e-2, 1e-3):
        pert = {k: params[k] + rho * unit[k] for k in names}
        g_sam = grad(lambda p: ce(logits_fn(p)))(pert)
        _, pb = vjp(logits_fn, pert)
        g_fsam = pb(gf)[0]
        diff = flat([(g_sam[k] - g_fsam[k]) / rho for k in names])
        errors.append(float((diff - delta).norm() / delta.norm()))
    assert errors[1] < 0.1
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


def _explicit(gs, vs, rho, beta2, eps, step, mode):
    g = flat(gs).double()
    m = torch.sqrt(flat(vs).double() / (1 - beta2**step)) + eps
    if mode == "perturbation":
        e = rho * (g / m) / (g / m).norm()
    else:
        e = rho * (g / g.norm()) / m
    return e


@pytest.mark.parametrize("mode", ["perturbation", "gradient"])
def test_preconditioned_ascent_explicit(mode):
    gen = torch.Generator().manual_seed(0)
    gs = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    vs = [torch.rand(5, 3, generator=gen) * 1e-2, torch.rand(7, generator=gen) * 1e-3]
    denoms = [adam_denominator(v, 0.95, 1e-8, 3) for v in vs]
    asc = ascent_direction(gs, 0.3, denoms, mode)
    expected = _explicit(gs, vs, 0.3, 0.95, 1e-8, 3, mode)
    assert torch.allclose(flat(asc.perturbations()).double(), expected, rtol=1e-5)
    assert float(asc.eps_norm) == pytest.approx(float(expected.norm()), rel=1e-5)
    # fp16-style loss scaling: scaled gradients give the same perturbation
    scaled = ascent_direction([g * 1024 for g in gs], 0.3, denoms, mode, grad_scale=1024.0)
    assert torch.allclose(flat(scaled.perturbations()), flat(asc.perturbations()), rtol=1e-6)
    # bias correction off: M = sqrt(v) + eps
    assert torch.allclose(adam_denominator(vs[0], 0.95, 1e-8, 3, bias_correction=False), vs[0].sqrt() + 1e-8)


@pytest.mark.parametrize("precond", [False, True])
def test_zero_or_non_finite_gradient_gives_no_perturbation(precond):
    denoms = [torch.ones(4)] if precond else None
    for g in (torch.zeros(4), torch.tensor([1.0, float("nan"), 0.0, 2.0]), torch.tensor([float("inf"), 0, 0, 0])):
        asc = ascent_direction([g], 0.1, denoms)
        assert asc.is_zero and float(asc.eps_norm) == 0.0
        assert torch.equal(asc.perturbations()[0], torch.zeros(4))
    asc = ascent_direction([torch.ones(4)], 0.0, denoms)
    assert asc.is_zero and float(asc.eps_norm) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="precondition_norm"):
        ascent_direction([torch.ones(2)], 0.1, [torch.ones(2)], "both")
    with pytest.raises(ValueError, match="rho"):
        ascent_direction([torch.ones(2)], -0.1)
    with pytest.raises(ValueError, match="shape"):
        functional_surrogate(torch.ones(2, 3), torch.ones(3, 2))


def test_rho_warmup_ramp():
    assert [rho_at(s, 0.2, 4) for s in range(6)] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert rho_at(0, 0.2, 0) == 0.2


def _norm_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(10, generator=gen), torch.randn(6, generator=gen)]
    mine = [t.chunk(world)[rank] for t in full]  # each rank holds a slice of each tensor
    n = global_norm(mine, group=dist.group.WORLD)
    local = global_norm(mine)
    asc = ascent_direction(mine, 0.5, group=dist.group.WORLD)
    if rank == 0:
        torch.save({"n": n, "local": local, "coef": asc.coef, "full": torch.cat(full).norm()}, out_file)
    dist.destroy_process_group()


def test_global_norm_over_a_process_group(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    mp.spawn(_norm_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    r = torch.load(out)
    assert float(r["n"]) == pytest.approx(float(r["full"]), rel=1e-6)
    assert float(r["local"]) < float(r["full"])
    assert float(r["coef"]) == pytest.approx(0.5 / float(r["full"]), rel=1e-6)
