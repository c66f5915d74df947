"""The memory-light logit-gradient caches and the sub-2x modes (``ascent_every``, ``ascent_direction:
"momentum"``), one rank in this process; the two-rank ZeRO-0/3 checks run under the deepspeed
launcher (suite "perf")."""

from __future__ import annotations

import json

import pytest
import torch
from common import LR, STEPS, assert_shares, cfg_with, engine_run, reference_state, reference_trace
from reference import micro_batch, tiny_llama, weight_distance

TOL = 2e-3
UNIT = LR * STEPS
FUNCTIONAL = ["FunctionalSAM", "PreconditionedFunctionalSAM"]
SAM_TYPES = ["SAM", "PreconditionedSAM"] + FUNCTIONAL


def exact_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _steps(engine, batches, steps):
    """``steps`` calls of ``engine.train_batch`` over ``batches`` in order; returns the engine."""
    it = iter(batches)
    for _ in range(steps):
        engine.train_batch(it)
    return engine


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
    real = engine.sam_step._perturbed_pass

    def spy(passes, ascent, replay):
        cache = engine.logit_grads
        seen["kept"] = [tuple(t.shape) for t in cache._items.values()]
        seen["weights"] = cache._weights is not None
        return real(passes, ascent, replay)

    engine.sam_step._perturbed_pass = spy
    engine.train_batch(iter([micro_batch(0, 0, i, 1, 2) for i in range(2)]))
    # two micro-batches of 2 x 16 tokens, hidden size 32 (not the 256-wide vocabulary)
    assert seen == {"kept": [(2, 16, 32), (2, 16, 32)], "weights": True}
    assert engine.logit_grads._items == {} and engine.logit_grads._weights is None


# ---- ascent_every ----------------------------------------------------------------------------


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
    runs = {
        c: engine_run(method, steps=5, config=cfg_with(method, ascent_every=2, rho_warmup_steps=3, logit_grad_cache=c))
        for c in ("device", "recompute")
    }
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
    from common import full_state

    import fsam_ds

    method, every = "PreconditionedFunctionalSAM", 4
    data = [micro_batch(s, 0, i, 1, 2) for s in range(6) for i in range(2)]

    def fresh():
        engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with(method, ascent_every=every))
        return engine

    whole = _steps(fresh(), data, 6)
    first = _steps(fresh(), data, 3)
    first.save_checkpoint(str(tmp_path), tag="s3", client_state={"fsam": first.state_dict()})
    state = first.state_dict()
    assert state["eps_step"] == 0 and len(state["eps_unit"]) == len(list(tiny_llama(0).parameters()))

    def resumed(with_state):
        engine = fresh()
        _, client = engine.load_checkpoint(str(tmp_path), tag="s3")
        if with_state:
            engine.load_state_dict(client["fsam"])
        return _steps(engine, data[6:], 3)

    assert exact_equal(full_state(resumed(True)), full_state(whole))
    assert not exact_equal(full_state(resumed(False)), full_state(whole))
    json.dumps({k: v for k, v in state.items() if k != "eps_unit"})  # the scalars are plain JSON


# ---- ascent_direction: "momentum" ------------------------------------------------------------


def _momentum_checks(state, losses, metrics, method, steps, world=1):
    unit = LR * steps
    ref_state, ref_losses = reference_state(method, steps=steps, world=world, ascent_direction="momentum")
    dist = weight_distance(state, ref_state) / unit
    assert dist < TOL
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # the comparison can fail: the exact method and AdamW are far away
    assert weight_distance(state, reference_state(method, steps=steps, world=world)[0]) / unit > 50 * TOL
    assert weight_distance(state, reference_state("AdamW", steps=steps, world=world)[0]) / unit > 50 * TOL
    # exact until AdamW's first update, then from the first moment: no pass-1 gradient norm
    assert [m["ascent_momentum"] for m in metrics] == [False] + [True] * (steps - 1)
    assert [m["grad_norm"] is None for m in metrics] == [False] + [True] * (steps - 1)
    assert all(m["eps_norm"] == pytest.approx(0.05, rel=1e-5) for m in metrics)
    assert_shares(metrics, reference_trace(method, steps=steps, world=world, ascent_direction="momentum"))
    return dist


@pytest.mark.parametrize("method", SAM_TYPES)
def test_momentum_matches_reference(method):
    steps = 5
    state, losses, metrics = engine_run(
        method, steps=steps, config=cfg_with(method, ascent_direction="momentum"), check_restore=True
    )
    _momentum_checks(state, losses, metrics, method, steps)
    assert all(m["restored"] is True for m in metrics)


@pytest.mark.parametrize("method", ["SAM", "PreconditionedFunctionalSAM"])
def test_momentum_zero3_one_rank(method):
    cfg = cfg_with(method, ascent_direction="momentum")
    cfg["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    state, losses, metrics = engine_run(method, config=cfg, check_restore=True)
    _momentum_checks(state, losses, metrics, method, STEPS)
    assert all(m["restored"] is True for m in metrics)


def test_momentum_runs_no_pass1_backward():
    """SAM: one backward pass per micro-batch (pass 2) after the first step; FunctionalSAM: one
    forward at theta plus pass 2's forward and backward."""
    import fsam_ds

    counts = {}
    for method in ("SAM", "FunctionalSAM"):
        engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with(method, ascent_direction="momentum"))
        seen = {"fwd": 0, "bwd": 0}
        engine.module.lm_head.register_forward_hook(lambda *a: seen.__setitem__("fwd", seen["fwd"] + 1))
        real = engine._ds_backward

        def backward(loss, **kw):
            seen["bwd"] += 1
            return real(loss, **kw)

        engine._ds_backward = backward
        it = iter([micro_batch(s, 0, i, 1, 2) for s in range(2) for i in range(2)])
        per_step = []
        for _ in range(2):
            engine.train_batch(it)
            per_step.append(dict(seen))
            seen.update(fwd=0, bwd=0)
        counts[method] = per_step
    # step 1 exact (two passes of 2 micro-batches), step 2 from the first moment
    assert counts["SAM"] == [{"fwd": 4, "bwd": 4}, {"fwd": 2, "bwd": 2}]
    assert counts["FunctionalSAM"] == [{"fwd": 4, "bwd": 4}, {"fwd": 4, "bwd": 2}]


def test_momentum_resumes_exactly(tmp_path):
    """The first moment is DeepSpeed's optimizer state, so DeepSpeed's checkpoint alone resumes
    the mode exactly (FSAMEngine.state_dict holds nothing for it)."""
    from common import full_state

    import fsam_ds

    method = "PreconditionedFunctionalSAM"
    data = [micro_batch(s, 0, i, 1, 2) for s in range(6) for i in range(2)]

    def fresh():
        engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with(method, ascent_direction="momentum"))
        return engine

    whole = _steps(fresh(), data, 6)
    first = _steps(fresh(), data, 3)
    assert first.state_dict()["eps_unit"] is None
    first.save_checkpoint(str(tmp_path), tag="s3")
    resumed = fresh()
    resumed.load_checkpoint(str(tmp_path), tag="s3")
    _steps(resumed, data[6:], 3)
    assert resumed.last_metrics["ascent_momentum"] is True
    assert exact_equal(full_state(resumed), full_state(whole))
    # the same checkpoint continued with the exact method lands elsewhere
    exact, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with(method))
    exact.load_checkpoint(str(tmp_path), tag="s3")
    _steps(exact, data[6:], 3)
    assert not exact_equal(full_state(exact), full_state(whole))


def test_momentum_is_refused_in_loop_mode():
    import fsam_ds
    from fsam_ds import FSAMConfigError

    msg = r'ascent_direction "momentum" runs only in engine.train_batch.*accepted there: "gradient"'
    engine, *_ = fsam_ds.initialize(model=tiny_llama(0), config=cfg_with("SAM", ascent_direction="momentum"))
    ids = micro_batch(0, 0, 0, 1, 2)["input_ids"]
    before = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(FSAMConfigError, match=msg):
        engine(input_ids=ids, labels=ids)
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    with torch.no_grad():  # an evaluation forward is not a step: allowed
        engine(input_ids=ids)
    engine.train_batch(iter([micro_batch(0, 0, i, 1, 2) for i in range(2)]))  # train_batch runs it
    # attach (the Trainer's, Accelerate's and Lightning's door) refuses it before installing anything
    import deepspeed

    from fsam_ds import parse_config

    ds_cfg, sam = parse_config(cfg_with("SAM", ascent_direction="momentum"))
    ds_engine, *_ = deepspeed.initialize(model=tiny_llama(0), config=ds_cfg)
    with pytest.raises(FSAMConfigError, match=msg):
        fsam_ds.attach(ds_engine, sam)
    assert getattr(ds_engine, "_fsam_engine", None) is None


# ---- the host cache's CUDA path, with recording fakes -----------------------------------------


class _FakeOps:
    """CudaCopyOps with recording fakes: CPU tensors stand in for device ones, every stream
    operation goes to ``log`` in order."""

    def __init__(self):
        self.log = []
        self.active = "compute"
        self.events = 0
        ops = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                ops.log.append((self.name, "wait_stream", other.name))

            def wait_event(self, event):
                ops.log.append((self.name, "wait_event", event.name))

        class Event:
            def __init__(self):
                ops.events += 1
                self.name = f"ev{ops.events}"

            def record(self, stream):
                ops.log.append((stream.name, "record", self.name))

        self.Stream, self.Event = Stream, Event
        self.compute = Stream("compute")

    def on_device(self, t):
        return True

    def new_stream(self):
        return self.Stream("side")

    def new_event(self):
        return self.Event()

    def current_stream(self, device):
        return self.compute

    def use_stream(self, stream):
        import contextlib

        ops = self

        @contextlib.contextmanager
        def ctx():
            before, ops.active = ops.active, stream.name
            try:
                yield
            finally:
                ops.active = before

        return ctx()

    def pinned_empty(self, like):
        ops = self

        class Host(torch.Tensor):
            def copy_(self, src, non_blocking=False):
                ops.log.append((ops.active, "copy_to_host", int(src.flatten()[0])))
                return super().copy_(src)

            def to(self, device, non_blocking=False):
                ops.log.append((ops.active, "copy_to_device", int(self.flatten()[0])))
                return self.as_subclass(torch.Tensor).clone()

        return torch.empty(like.shape, dtype=like.dtype).as_subclass(Host)

    def record_stream(self, t, stream):
        self.log.append((stream.name, "record_stream", int(t.flatten()[0])))


def test_host_cache_waits_on_the_copy_it_needs():
    """Pass 2 of micro-batch i waits on the event recorded right after i's copy back, never on
    the whole side stream (which also holds i + 1's copy); the values are the ones put."""
    from fsam_ds.engine import HostLogitGradCache

    ops = _FakeOps()
    cache = HostLogitGradCache(ops=ops)
    for i in range(3):
        cache.put(i, torch.full((2, 3), float(i)))
    assert ops.log == [
        e
        for i in range(3)
        for e in [("side", "wait_stream", "compute"), ("side", "copy_to_host", i), ("side", "record_stream", i)]
    ]
    ops.log.clear()
    got = [cache.get(i, None) for i in range(3)]
    assert all(torch.equal(g, torch.full((2, 3), float(i))) for i, g in enumerate(got))
    assert ops.log == [
        ("side", "copy_to_device", 0),
        ("side", "record", "ev1"),
        ("side", "copy_to_device", 1),
        ("side", "record", "ev2"),
        ("compute", "wait_event", "ev1"),
        ("compute", "record_stream", 0),
        ("side", "copy_to_device", 2),
        ("side", "record", "ev3"),
        ("compute", "wait_event", "ev2"),
        ("compute", "record_stream", 1),
        ("compute", "wait_event", "ev3"),
        ("compute", "record_stream", 2),
    ]
    assert not any(op == "wait_stream" and who == "compute" for who, op, _ in ops.log)
    assert cache._items == {} and cache._on_device == {}


def test_host_cache_on_cpu_keeps_the_tensors():
    from fsam_ds.engine import HostLogitGradCache

    cache = HostLogitGradCache()
    t = torch.randn(2, 3)
    cache.put(0, t)
    assert cache.get(0, None) is t and cache._stream is None


# ---- two ranks, ZeRO-3 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def perf_run(tmp_path_factory):
    from launch import launch_suite

    out = tmp_path_factory.mktemp("perf")
    launch_suite("perf", out)
    return out


def _two_rank(run, method, opts):
    from common import load_case
    from dist_worker import Case

    return load_case(run, Case(method, **opts))


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
@pytest.mark.parametrize(
    "method,opts",
    [
        ("PreconditionedFunctionalSAM", {"stage": 0, "momentum": True}),
        ("PreconditionedFunctionalSAM", {"stage": 3, "persist": 0, "momentum": True}),
        ("SAM", {"stage": 3, "persist": 0, "momentum": True}),
    ],
)
def test_two_ranks_momentum(perf_run, method, opts):
    state, ranks = _two_rank(perf_run, method, opts)
    _momentum_checks(state, ranks[0]["losses"], ranks[0]["metrics"], method, STEPS, world=2)
    # a one-rank gradient would be far away
    assert weight_distance(state, reference_state(method, ascent_direction="momentum")[0]) / UNIT > 50 * TOL
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert all(m["restored"] is True for r in ranks for m in r["metrics"])


@pytest.mark.slow
def test_two_ranks_zero3_eps_shares(perf_run):
    """The shares of ||eps||^2 at ZeRO-3 with every parameter partitioned, the exact method and a
    reused direction, against the reference; both ranks report the same."""
    method, base = "PreconditionedFunctionalSAM", {"stage": 3, "persist": 0}
    _, ranks = _two_rank(perf_run, method, {**base, "cache": "device"})
    assert_shares(ranks[0]["metrics"], reference_trace(method, world=2))
    _, every = _two_rank(perf_run, method, {**base, "every": 2})
    assert_shares(every[0]["metrics"], reference_trace(method, world=2, ascent_every=2))
    for r in (ranks, every):
        assert [(m["eps_share_embed"], m["eps_share_output"]) for m in r[0]["metrics"]] == [
            (m["eps_share_embed"], m["eps_share_output"]) for m in r[1]["metrics"]
        ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,opts",
    [
        ("PreconditionedFunctionalSAM", {"cache": "device"}),
        ("PreconditionedFunctionalSAM", {"cache": "host"}),
        ("PreconditionedFunctionalSAM", {"cache": "recompute"}),
        ("PreconditionedFunctionalSAM", {"every": 2}),
        ("SAM", {"every": 2}),
    ],
    ids=lambda x: x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items()),
)
def test_two_ranks_zero3_loop_mode_is_train_batch(perf_run, method, opts):
    """Loop mode (a plain DeepSpeed loop) with every cache mode and ascent_every, two ranks at
    ZeRO-3 with every parameter partitioned: the same weights, bit for bit, as train_batch."""
    base = {"stage": 3, "persist": 0, **opts}
    loop_state, loop_ranks = _two_rank(perf_run, method, {**base, "loop": "logits"})
    batch_state, batch_ranks = _two_rank(perf_run, method, base)
    assert exact_equal(loop_state, batch_state)
    for a, b in zip(loop_ranks[0]["metrics"], batch_ranks[0]["metrics"]):
        assert (a["grad_norm"], a["eps_norm"], a.get("ascent_reused")) == (
            b["grad_norm"],
            b["eps_norm"],
            b.get("ascent_reused"),
        )
    assert all(m["restored"] is True for r in loop_ranks for m in r["metrics"])


# ---- the tools -------------------------------------------------------------------------------

# the WikiText-2 excerpt shipped with the tests (the same text whether or not ../shared is present)
DATA = __import__("pathlib").Path(__file__).resolve().parent / "data" / "wikitext-2" / "valid-excerpt.txt"


def test_reproduce_extra_runs_ascent_every(tmp_path):
    from tools.reproduce import main

    out, docs = tmp_path / "out", tmp_path / "docs" / "results.md"
    argv = [
        "--smoke",
        "--methods",
        "AdamW,PreconditionedFunctionalSAM",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--docs",
        str(docs),
        "--data",
        str(DATA),
        "--extra-runs",
        "ascent_every",
        "--every",
        "2",
    ]
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
    from fsam_ds.plan import Layout, load_shape, main, plan

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
    from fsam_ds.bench import main

    out = tmp_path / "b.json"
    assert (
        main(
            [
                "--quick",
                "--preset",
                "tiny",
                "--variants",
                "AdamW,PreconditionedFunctionalSAM+recompute,SAM+every2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    names = [r["variant"] for r in res["rows"]]
    assert names == ["AdamW", "PreconditionedFunctionalSAM+recompute", "SAM+every2"]
    assert all(len(r["times_s"]) == 3 and r["peak_bytes"] > 0 for r in res["rows"])
    assert res["rows"][2]["reused_fraction"] == pytest.approx(2 / 3)
    assert main(["--variants", "AdamW,SAM+disk"]) == 2
    # the momentum mode is a variant too (parsed and configured; not timed here)
    from types import SimpleNamespace

    from fsam_ds.bench import ds_config as bench_config
    from fsam_ds.bench import parse_variant

    v = parse_variant("PreconditionedFunctionalSAM+momentum")
    assert (
        v["momentum"]
        and bench_config(v, SimpleNamespace(micro_batch=1, gas=1, zero_stage=0, dtype="fp32"))["optimizer"]["params"][
            "ascent_direction"
        ]
        == "momentum"
    )
    assert main(["--variants", "AdamW,SAM+momentum+every2"]) == 2


def test_fsam_train_resumes_ascent_every(tmp_path, monkeypatch):
    """fsam-train keeps the reused direction in each rank's checkpoint files (and rank 0's in the
    client_state): stopped at step 4 of ascent_every 3 and resumed, steps 5-6 repeat the
    uninterrupted run's losses."""
    import torch
    from common import read_metrics, write_config

    from fsam_ds.train import main, train_argv

    monkeypatch.setenv("FSAM_DS_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    params = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "rho": 0.1, "ascent_every": 3}
    config = write_config(tmp_path / "ds.json", micro=2, params=params)

    def run(folder, steps, *extra):
        assert main([*train_argv(config, tmp_path / folder, steps), "--local_rank=0", *extra]) == 0
        return read_metrics(tmp_path / folder)[0]

    whole = run("whole", 6)
    # metrics.jsonl carries the step's flags and the shares of ||eps||^2
    assert [r["ascent_reused"] for r in whole] == [False, True, True, False, True, True]
    assert all(0 <= r["eps_share_embed"] <= 1 and 0 <= r["eps_share_output"] <= 1 for r in whole)
    assert whole[1]["eps_share_embed"] == whole[0]["eps_share_embed"]  # a reused direction: the same shares
    run("part", 4)
    state = torch.load(tmp_path / "part" / "step4" / "fsam_engine_rank0.pt", weights_only=False)
    assert state["eps_step"] == 3 and state["eps_unit"] is not None
    resumed = run("part", 6, "--resume")
    assert [r["loss"] for r in resumed if r["step"] > 4] == pytest.approx([r["loss"] for r in whole[4:]], rel=1e-6)
