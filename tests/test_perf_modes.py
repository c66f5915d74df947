"""The memory-light logit-gradient caches and the sub-2x mode (``ascent_every``), one rank in this
process; the two-rank ZeRO-3 checks run under the deepspeed launcher (suite "perf")."""
from __future__ import annotations

import json

import pytest
import torch

from common import LR, STEPS, ds_config, engine_run, reference_state
from reference import micro_batch, tiny_llama, weight_distance

TOL = 2e-3
UNIT = LR * STEPS
FUNCTIONAL = ["FunctionalSAM", "PreconditionedFunctionalSAM"]
SAM_TYPES = ["SAM", "PreconditionedSAM"] + FUNCTIONAL


def cfg_with(method, rho=0.05, **params):
    cfg = ds_config(method, rho=rho)
    cfg["optimizer"]["params"].update(params)
    return cfg


def exact_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


# ---- logit_grad_cache ------------------------------------------------------------------------

@pytest.mark.parametrize("method", FUNCTIONAL)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cache_modes_give_identical_weights(method, dtype):
    """device, host and recompute: the same g_F, bit for bit, hence the same weights."""
    runs = {}
    for cache in ("device", "host", "recompute"):
        cfg = cfg_with(method, rho=0.2, logit_grad_cache=cache)
        if dtype == "bf16":
            cfg["bf16"] = {"enabled": True}
        runs[cache] = engine_run(method, config=cfg)
    for cache in ("host", "recompute"):
        assert exact_equal(runs[cache][0], runs["device"][0]), cache
        assert runs[cache][1] == runs["device"][1]
    if dtype == "fp32":
        assert weight_distance(runs["recompute"][0], reference_state(method, rho=0.2)[0]) / UNIT < TOL


def test_recompute_keeps_hidden_states_not_logit_grads():
    import fsam_ds

    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with("FunctionalSAM", logit_grad_cache="recompute"))
    seen = {}
    real = engine._perturbed_pass

    def spy(batches, ascent, rng_states):
        cache = engine.logit_grads
        seen["kept"] = [tuple(t.shape) for t in cache._items.values()]
        seen["weights"] = cache._weights is not None
        return real(batches, ascent, rng_states)
    engine._perturbed_pass = spy
    engine.train_batch(iter([micro_batch(0, 0, i, 1, 2) for i in range(2)]))
    # two micro-batches of 2 x 16 tokens, hidden size 32 (not the 256-wide vocabulary)
    assert seen == {"kept": [(2, 16, 32), (2, 16, 32)], "weights": True}
    assert engine.logit_grads._items == {} and engine.logit_grads._weights is None


def test_recompute_refuses_a_model_without_linear_output():
    import fsam_ds
    from fsam_ds import FSAMConfigError

    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(8, 4))

        def forward(self, input_ids):
            return self.w[input_ids]

    with pytest.raises(FSAMConfigError, match='logit_grad_cache "recompute" needs .*accepted for this model: '
                                              'device, host'):
        fsam_ds.initialize(model=Bare(), config=cfg_with("FunctionalSAM", logit_grad_cache="recompute"))


@pytest.mark.parametrize("value", ["disk", None, 1])
def test_bad_cache_is_refused(value):
    from fsam_ds import FSAMConfigError, parse_config

    with pytest.raises(FSAMConfigError, match="logit_grad_cache .* accepted: device, host, recompute"):
        parse_config(cfg_with("FunctionalSAM", logit_grad_cache=value))


# ---- ascent_every ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_bad_ascent_every_is_refused(value):
    from fsam_ds import FSAMConfigError, parse_config

    with pytest.raises(FSAMConfigError, match=r"optimizer.params.ascent_every must be an integer >= 1"):
        parse_config(cfg_with("SAM", ascent_every=value))


def test_ascent_every_is_a_sam_key():
    from fsam_ds import FSAMConfigError, parse_config

    ds, sam = parse_config(cfg_with("FunctionalSAM", ascent_every=4))
    assert sam.ascent_every == 4 and "ascent_every" not in ds["optimizer"]["params"]
    assert parse_config(cfg_with("SAM"))[1].ascent_every == 1
    cfg = ds_config("AdamW")
    cfg["optimizer"]["params"]["ascent_every"] = 2
    with pytest.raises(FSAMConfigError, match="ascent_every is not accepted for AdamW"):
        parse_config(cfg)


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("method", SAM_TYPES)
def test_ascent_every_matches_reference(method, every):
    steps = 5
    state, losses, metrics = engine_run(method, steps=steps, config=cfg_with(method, ascent_every=every))
    ref_state, ref_losses = reference_state(method, steps=steps, ascent_every=every)
    unit = LR * steps
    assert weight_distance(state, ref_state) / unit < TOL
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # the comparison can fail: the exact method (and another k) are far away
    assert weight_distance(state, reference_state(method, steps=steps)[0]) / unit > 50 * TOL
    other = 3 if every == 2 else 2
    assert weight_distance(state, reference_state(method, steps=steps, ascent_every=other)[0]) / unit > 50 * TOL
    assert [m["ascent_reused"] for m in metrics] == [s % every != 0 for s in range(steps)]
    assert all(m["eps_norm"] == pytest.approx(0.05, rel=1e-5) for m in metrics)
    assert all((m["grad_norm"] is None) == m["ascent_reused"] for m in metrics)


def test_ascent_every_with_rho_warmup_and_cache_modes():
    method = "PreconditionedFunctionalSAM"
    runs = {c: engine_run(method, steps=5, config=cfg_with(method, ascent_every=2, rho_warmup_steps=3,
                                                          logit_grad_cache=c)) for c in ("device", "recompute")}
    assert exact_equal(runs["device"][0], runs["recompute"][0])
    assert [m["rho"] for m in runs["device"][2]] == pytest.approx([0.0, 0.05 / 3, 0.1 / 3, 0.05, 0.05])
    ref_state, _ = reference_state(method, steps=5, ascent_every=2, rho_warmup_steps=3)
    assert weight_distance(runs["device"][0], ref_state) / (LR * 5) < TOL


def test_ascent_every_one_is_exact():
    method = "PreconditionedFunctionalSAM"
    a = engine_run(method, config=cfg_with(method, ascent_every=1))
    b = engine_run(method)
    assert exact_equal(a[0], b[0]) and a[1] == b[1]
    assert "ascent_reused" not in a[2][0]


def test_ascent_state_dict_resumes_exactly(tmp_path):
    """Checkpoint after step 3 (a reused direction from step 2 is live), load into a new engine
    with DeepSpeed's load_checkpoint plus FSAMEngine.load_state_dict: steps 4-6 equal the
    uninterrupted run; without the stored direction they do not."""
    import fsam_ds
    from common import full_state

    method, every = "PreconditionedFunctionalSAM", 4
    data = [micro_batch(s, 0, i, 1, 2) for s in range(6) for i in range(2)]

    def fresh():
        engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with(method, ascent_every=every))
        return engine
    whole = fresh()
    it = iter(data)
    for _ in range(6):
        whole.train_batch(it)
    first = fresh()
    it = iter(data)
    for _ in range(3):
        first.train_batch(it)
    first.save_checkpoint(str(tmp_path), tag="s3", client_state={"fsam": first.state_dict()})
    state = first.state_dict()
    assert state["eps_step"] == 0 and len(state["eps_unit"]) == len(list(tiny_llama(0).parameters()))

    def resumed(with_state):
        engine = fresh()
        _, client = engine.load_checkpoint(str(tmp_path), tag="s3")
        if with_state:
            engine.load_state_dict(client["fsam"])
        it = iter(data[6:])
        for _ in range(3):
            engine.train_batch(it)
        return engine
    assert exact_equal(full_state(resumed(True)), full_state(whole))
    assert not exact_equal(full_state(resumed(False)), full_state(whole))
    json.dumps({k: v for k, v in state.items() if k != "eps_unit"})  # the scalars are plain JSON


# ---- two ranks, ZeRO-3 -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def perf_run(tmp_path_factory):
    from test_multirank import launch

    out = tmp_path_factory.mktemp("perf")
    launch("perf", out)
    return out


def _two_rank(run, method, opts):
    from common import load_case

    return load_case(run, method, opts)


@pytest.mark.slow
def test_two_ranks_zero3_cache_modes_identical(perf_run):
    method = "PreconditionedFunctionalSAM"
    base = {"stage": 3, "persist": 0}
    dev, ranks = _two_rank(perf_run, method, {**base, "cache": "device"})
    for cache in ("host", "recompute"):
        state, other = _two_rank(perf_run, method, {**base, "cache": cache})
        assert exact_equal(state, dev), cache
        assert other[0]["losses"] == ranks[0]["losses"]
        assert all(m["restored"] is True for r in other for m in r["metrics"])
    assert weight_distance(dev, reference_state(method, world=2)[0]) / UNIT < TOL


@pytest.mark.slow
@pytest.mark.parametrize("method", ["PreconditionedFunctionalSAM", "SAM"])
def test_two_ranks_zero3_ascent_every(perf_run, method):
    state, ranks = _two_rank(perf_run, method, {"stage": 3, "persist": 0, "every": 2})
    ref_state, ref_losses = reference_state(method, world=2, ascent_every=2)
    assert weight_distance(state, ref_state) / UNIT < TOL
    assert weight_distance(state, reference_state(method, world=2)[0]) / UNIT > 50 * TOL
    assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert [m["ascent_reused"] for m in ranks[0]["metrics"]] == [False, True, False, True]
    assert all(m["restored"] is True for r in ranks for m in r["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("method,opts", [
    ("PreconditionedFunctionalSAM", {"cache": "device"}), ("PreconditionedFunctionalSAM", {"cache": "host"}),
    ("PreconditionedFunctionalSAM", {"cache": "recompute"}), ("PreconditionedFunctionalSAM", {"every": 2}),
    ("SAM", {"every": 2})], ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()))
def test_two_ranks_zero3_loop_mode_is_train_batch(perf_run, method, opts):
    """Loop mode (a plain DeepSpeed loop) with every cache mode and ascent_every, two ranks at
    ZeRO-3 with every parameter partitioned: the same weights, bit for bit, as train_batch."""
    base = {"stage": 3, "persist": 0, **opts}
    loop_state, loop_ranks = _two_rank(perf_run, method, {**base, "loop": "logits"})
    batch_state, batch_ranks = _two_rank(perf_run, method, base)
    assert exact_equal(loop_state, batch_state)
    for a, b in zip(loop_ranks[0]["metrics"], batch_ranks[0]["metrics"]):
        assert (a["grad_norm"], a["eps_norm"], a.get("ascent_reused")) == (b["grad_norm"], b["eps_norm"],
                                                                           b.get("ascent_reused"))
    assert all(m["restored"] is True for r in loop_ranks for m in r["metrics"])


# ---- the tools -------------------------------------------------------------------------------

# the WikiText-2 excerpt shipped with the tests (the same text whether or not ../shared is present)
DATA = __import__("pathlib").Path(__file__).resolve().parent / "data" / "wikitext-2" / "valid-excerpt.txt"


def test_reproduce_extra_runs_ascent_every(tmp_path):
    from tools.reproduce import main

    out, docs = tmp_path / "out", tmp_path / "docs" / "results.md"
    argv = ["--smoke", "--methods", "AdamW,PreconditionedFunctionalSAM", "--seeds", "1", "--out", str(out),
            "--docs", str(docs), "--data", str(DATA), "--extra-runs", "ascent_every", "--every", "2"]
    assert main(argv) == 0
    text = docs.read_text()
    assert "## Sub-2x mode: ascent_every" in text and "| PreconditionedFunctionalSAM ascent_every 2 |" in text
    assert text.index("## Sub-2x mode") < text.index("## Command")
    extra = next((out / "runs").glob("pfsam-*-every2-s1234"))
    cfg = json.loads((extra / "ds_config.json").read_text())
    assert cfg["optimizer"]["params"]["ascent_every"] == 2
    assert main(argv[:-4] + ["--extra-runs", "nope"]) == 2
    assert main(argv + ["--every-methods", "AdamW"]) == 2


def test_plan_memory_matches_its_own_arithmetic_and_refuses_bad_layouts(capsys):
    from tools.plan_memory import Layout, load_shape, main, plan

    shape = load_shape("2m")
    assert shape.params() == 2_098_304  # the preset's real parameter count
    a = plan(shape, Layout(zero=0, bf16=False), 8, 128, 1, "AdamW")
    assert a["weights"] == a["grads"] == 4 * shape.params() and a["optimizer"] == 8 * shape.params()
    f = plan(shape, Layout(zero=0, bf16=False), 8, 128, 2, "FunctionalSAM")
    assert f["logit_grad_cache"] == 2 * 8 * 128 * 4096 * 4 and f["saved_theta"] == 4 * shape.params()
    r = plan(shape, Layout(zero=0, bf16=False), 8, 128, 2, "FunctionalSAM", cache="recompute")
    assert r["logit_grad_cache"] == 2 * 8 * 128 * 128 * 4  # hidden states only: theta's copy is reused
    z3 = plan(load_shape("7b"), Layout(zero=3, dp=8), 1, 4096, 1, "SAM")
    assert z3["comm"] == pytest.approx(2 * plan(load_shape("7b"), Layout(zero=3, dp=8), 1, 4096, 1, "AdamW")["comm"])
    assert main(["--model", "nope"]) == 2
    assert main(["--tp", "2", "--zero-stage", "3"]) == 2
    assert main(["--publish"]) == 0 and "| 70b |" in capsys.readouterr().out


def test_bench_quick_runs(tmp_path):
    """fsam-bench end to end on the tiny preset (the real --quick uses the 2m preset)."""
    from tools.bench_step import main

    out = tmp_path / "b.json"
    assert main(["--quick", "--preset", "tiny", "--variants", "AdamW,PreconditionedFunctionalSAM+recompute,"
                 "SAM+every2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    names = [r["variant"] for r in res["rows"]]
    assert names == ["AdamW", "PreconditionedFunctionalSAM+recompute", "SAM+every2"]
    assert all(len(r["times_s"]) == 3 and r["peak_bytes"] > 0 for r in res["rows"])
    assert res["rows"][2]["reused_fraction"] == pytest.approx(2 / 3)
    assert main(["--variants", "AdamW,SAM+disk"]) == 2


def test_fsam_train_resumes_ascent_every(tmp_path, monkeypatch):
    """fsam-train keeps the reused direction in each rank's checkpoint files (and rank 0's in the
    client_state): stopped at step 4 of ascent_every 3 and resumed, steps 5-6 repeat the
    uninterrupted run's losses."""
    import torch
    from test_train import read_metrics, write_config

    from fsam_ds.train import main

    monkeypatch.setenv("FSAM_DS_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    params = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "rho": 0.1, "ascent_every": 3}
    config = write_config(tmp_path / "ds.json", micro=2, params=params)

    def run(folder, steps, *extra):
        assert main(["--deepspeed_config", str(config), "--model", "tiny", "--seq-len", "32", "--steps", str(steps),
                     "--eval-every", "0", "--eval-batches", "1", "--save-dir", str(tmp_path / folder),
                     "--no-progress", "--local_rank=0", *extra]) == 0
        return read_metrics(tmp_path / folder)[0]
    whole = run("whole", 6)
    run("part", 4)
    state = torch.load(tmp_path / "part" / "step4" / "fsam_engine_rank0.pt", weights_only=False)
    assert state["eps_step"] == 3 and state["eps_unit"] is not None
    resumed = run("part", 6, "--resume")
    assert [r["loss"] for r in resumed if r["step"] > 4] == pytest.approx([r["loss"] for r in whole[4:]], rel=1e-6)
