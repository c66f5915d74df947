"""Sharpness diagnostics against independent float64 computations with materialised Jacobians
and Hessians, calibration against a hand-computed case, the config key and in-training logging."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from fsam_ds.sharpness import CalibrationStats, calibration, lambda_max, model_calibration, sharpness_terms

V, D, B, T = 5, 3, 2, 4  # vocabulary, width, batch, sequence length


# ---------------------------------------------------------------------------------------------
# A tiny language model small enough to materialise everything (47 parameters)
# ---------------------------------------------------------------------------------------------

SHAPES = [("emb", (V, D)), ("w1", (D, D)), ("b1", (D,)), ("out", (V, D)), ("bout", (V,))]


def split(theta):
    out, i = {}, 0
    for name, shape in SHAPES:
        n = math.prod(shape)
        out[name] = theta[i : i + n].reshape(shape)
        i += n
    return out


def logits_flat(theta, ids):
    """The model's logits written directly as a function of the flat parameter vector."""
    p = split(theta)
    h = torch.tanh(p["emb"][ids] @ p["w1"].T + p["b1"])
    return h @ p["out"].T + p["bout"]


def ce_of_logits(logits, ids):
    """Mean next-token cross-entropy with the shift, written out (no F.cross_entropy)."""
    lg = logits[:, :-1].reshape(-1, V)
    tgt = ids[:, 1:].reshape(-1)
    return (torch.logsumexp(lg, -1) - lg[torch.arange(len(tgt)), tgt]).mean()


class TinyLM(torch.nn.Module):
    def __init__(self, theta):
        super().__init__()
        for name, t in split(theta.detach().clone()).items():
            setattr(self, name, torch.nn.Parameter(t.clone()))

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.emb[input_ids] @ self.w1.T + self.b1)
        return h @ self.out.T + self.bout


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    n = sum(math.prod(s) for _, s in SHAPES)
    theta = torch.randn(n, dtype=torch.float64) * 0.8
    ids = torch.randint(0, V, (B, T))
    model = TinyLM(theta)
    # materialised: gradient, loss Hessian, Jacobian of the logits, logit-space loss Hessian
    loss = lambda th: ce_of_logits(logits_flat(th, ids), ids)  # noqa: E731
    g = jacobian(loss, theta)
    H_L = hessian(loss, theta)
    J = jacobian(lambda th: logits_flat(th, ids).reshape(-1), theta)  # [B*T*V, n]
    F = logits_flat(theta, ids)
    H_ell = hessian(lambda f: ce_of_logits(f.reshape(B, T, V), ids), F.reshape(-1))
    H_G = J.T @ H_ell @ J
    # the functional part built on its own: sum_k [g_F]_k * Hessian of logit k
    g_F = jacobian(lambda f: ce_of_logits(f.reshape(B, T, V), ids), F.reshape(-1))
    second = jacobian(
        lambda th: jacobian(lambda t2: logits_flat(t2, ids).reshape(-1), th, create_graph=True, vectorize=True),
        theta,
        vectorize=True,
    )  # [B*T*V, n, n]
    H_F = torch.einsum("k,kij->ij", g_F, second)
    return dict(theta=theta, ids=ids, model=model, g=g, H_L=H_L, H_G=H_G, H_F=H_F)


def test_hessian_splits_into_gauss_newton_and_functional(problem):
    # the materialised pieces themselves are consistent: H_L = H_G + H_F
    torch.testing.assert_close(problem["H_L"], problem["H_G"] + problem["H_F"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("given", [False, True])
def test_tau_against_materialised_matrices(problem, given):
    g = problem["g"]
    if given:  # an explicit direction, as a dict by parameter name, normalised by the function
        torch.manual_seed(1)
        d = torch.randn_like(g)
        direction = {name: t for name, t in split(d * 3.0).items()}
    else:
        d, direction = g, None
    e = d / d.norm()
    d_logit = problem["H_G"] @ e
    d_func = problem["H_F"] @ e
    hv = problem["H_L"] @ e
    r = sharpness_terms(problem["model"], {"input_ids": problem["ids"]}, direction=direction)
    expect = {
        "tau_logit": float(d_logit @ d_logit),
        "tau_func": float(d_func @ d_func),
        "tau_cross": float(2 * d_logit @ d_func),
        "hvp_sq_norm": float(hv @ hv),
        "curv_hessian": float(e @ hv),
        "curv_gn": float(e @ d_logit),
        "grad_norm": float(g.norm()),
    }
    for k, v in expect.items():
        assert r[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert r["tau_logit"] + r["tau_func"] + r["tau_cross"] == pytest.approx(r["hvp_sq_norm"], rel=1e-10)
    assert r["logit_fraction"] == pytest.approx(expect["tau_logit"] / (expect["tau_logit"] + expect["tau_func"]))


def test_unnormalised_direction_and_zero_direction(problem):
    g = problem["g"]
    d = 0.3 * g
    r = sharpness_terms(problem["model"], {"input_ids": problem["ids"]}, direction=split(d), normalize=False)
    d_logit = problem["H_G"] @ d
    assert r["tau_logit"] == pytest.approx(float(d_logit @ d_logit), rel=1e-9)
    z = sharpness_terms(problem["model"], {"input_ids": problem["ids"]}, direction=split(torch.zeros_like(g)))
    assert z["tau_logit"] == z["tau_func"] == z["hvp_sq_norm"] == 0.0


@pytest.mark.parametrize("matrix,key", [("hessian", "H_L"), ("gauss_newton", "H_G")])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_lambda_max_against_eigvalsh(problem, matrix, key, method):
    evals = torch.linalg.eigvalsh(problem[key])
    batch = {"input_ids": problem["ids"]}
    if method == "power":
        # power iteration finds the eigenvalue of largest magnitude
        target = float(evals[evals.abs().argmax()])
        r = lambda_max(problem["model"], batch, matrix=matrix, method="power", iters=3000, tol=1e-7)
        assert r.value == pytest.approx(target, rel=1e-6)
    else:
        target = float(evals.max())
        r = lambda_max(problem["model"], batch, matrix=matrix, iters=60, tol=1e-9)
        assert r.value == pytest.approx(target, rel=1e-8)
        assert r.converged and r.residual <= 1e-7 * abs(target)
        assert 1 <= r.iterations <= 47
    # the reported residual is ||A v - lambda v|| of the returned vector
    A = problem[key]
    assert r.residual == pytest.approx(float((A @ r.vector - r.value * r.vector).norm()), rel=1e-6, abs=1e-12)
    # few iterations: not converged, and it says so
    short = lambda_max(problem["model"], batch, matrix=matrix, iters=2, tol=1e-12)
    assert short.iterations == 2 and not short.converged and short.value <= float(evals.max()) + 1e-9


def test_identity_on_a_hugging_face_llama():
    from reference import micro_batch, tiny_llama

    model = tiny_llama(0, dtype=torch.float64)
    r = sharpness_terms(model, micro_batch(0, 0, 0, 1, 1))
    assert r["tau_logit"] > 0 and r["tau_func"] > 0
    assert r["tau_logit"] + r["tau_func"] + r["tau_cross"] == pytest.approx(r["hvp_sq_norm"], rel=1e-10)
    # the weights and their gradients are left alone
    assert all(p.grad is None for p in model.parameters()) and model.training


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def test_ece_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.25, 0.75], [0.55, 0.45], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1, -100])  # the last one is ignored
    # 15 bins of width 1/15: 0.9 -> bin 13 (two tokens, one right), 0.75 -> bin 11 (right),
    # 0.55 -> bin 8 (wrong): ECE = 2/4 |0.5 - 0.9| + 1/4 |1 - 0.75| + 1/4 |0 - 0.55| = 0.4
    r = calibration(probs.log(), labels)
    assert r["ece"] == pytest.approx(0.4, abs=1e-12)
    assert r["mean_max_prob"] == pytest.approx((0.9 + 0.9 + 0.75 + 0.55) / 4)
    assert r["accuracy"] == pytest.approx(0.5)
    ent = lambda p: -sum(x * math.log(x) for x in p)  # noqa: E731
    assert r["mean_entropy"] == pytest.approx((2 * ent([0.9, 0.1]) + ent([0.25, 0.75]) + ent([0.55, 0.45])) / 4)
    assert r["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.75) + math.log(0.45)) / 4)
    assert r["n_tokens"] == 4
    # one bin: ECE = |accuracy - confidence|
    assert calibration(probs[:2].log(), labels[:2], n_bins=1)["ece"] == pytest.approx(0.4)
    # accumulated over batches = all at once
    s = CalibrationStats()
    s.update(probs[:3].log(), labels[:3])
    s.update(probs[3:].log(), labels[3:])
    assert s.result() == pytest.approx(r)


def test_model_calibration_shifts_and_matches(problem):
    ids = problem["ids"]
    logits = logits_flat(problem["theta"], ids)
    expect = calibration(logits[:, :-1], ids[:, 1:])
    got = model_calibration(problem["model"], [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}])
    assert got == pytest.approx(expect)


# ---------------------------------------------------------------------------------------------
# Config key and in-training logging
# ---------------------------------------------------------------------------------------------


def test_in_training_logging(tmp_path):
    from common import ds_config
    from reference import micro_batch, tiny_llama

    import fsam_ds
    from fsam_ds.sharpness import TRAINING_KEYS

    cfg = ds_config("PreconditionedFunctionalSAM", gas=1)
    cfg["optimizer"]["params"]["sharpness_every"] = 2
    cfg["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path), "job_name": "job"}
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
    batches = [micro_batch(s, 0, 0, 1, 1) for s in range(4)]
    seen = []
    for s in range(4):
        engine.train_batch(iter([batches[s]]))
        seen.append(dict(engine.last_metrics))
        if s == 1:  # the logged values are those of the weights after the step, on its batch
            direct = sharpness_terms(engine, batches[s])
    assert not set(TRAINING_KEYS) & set(seen[0]) and not set(TRAINING_KEYS) & set(seen[2])
    for m in (seen[1], seen[3]):
        assert set(TRAINING_KEYS) <= set(m)
        assert m["tau_logit"] + m["tau_func"] + m["tau_cross"] == pytest.approx(m["hvp_sq_norm"], rel=1e-4)
        assert m["lambda_max"] > 0 and m["lambda_max_iters"] >= 1
    assert seen[1]["tau_logit"] == pytest.approx(direct["tau_logit"], rel=1e-4)
    files = {p.name for p in tmp_path.rglob("*.csv")}
    assert any("tau_logit" in f for f in files) and any("lambda_max" in f for f in files), files


def test_metrics_jsonl_from_fsam_train(tmp_path):
    """fsam-train writes the diagnostics into metrics.jsonl on the configured steps."""
    from common import ds_config

    from fsam_ds.train import main, train_argv

    cfg = ds_config("FunctionalSAM", gas=1)
    cfg["optimizer"]["params"]["sharpness_every"] = 2
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    rc = main(train_argv(path, tmp_path / "run", 3))
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    assert "tau_func" in steps[2] and "lambda_max" in steps[2]
    assert "tau_func" not in steps[1] and "tau_func" not in steps[3]


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_engines_give_the_plain_values(stage):
    from common import ds_config
    from reference import micro_batch, tiny_llama

    import fsam_ds

    batch = micro_batch(0, 0, 0, 1, 1)
    plain = sharpness_terms(tiny_llama(0), batch)
    lm_plain = lambda_max(tiny_llama(0), batch, iters=5)
    cfg = ds_config("SAM", gas=1, zero_optimization={"stage": stage})
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg)
    got = sharpness_terms(engine, batch)
    for k in ("tau_logit", "tau_func", "tau_cross", "hvp_sq_norm", "loss", "grad_norm"):
        assert got[k] == pytest.approx(plain[k], rel=1e-4), k
    assert lambda_max(engine, batch, iters=5).value == pytest.approx(lm_plain.value, rel=1e-4)
    cal = model_calibration(engine, [batch])
    assert cal["n_tokens"] == batch["input_ids"][:, 1:].numel()
