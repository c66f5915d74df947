"""fsam-convert on megatron-core checkpoints written by fsam-megatron-train (CPU, gloo).

fsam-megatron-train trains the tiny preset with preconditioned Functional-SAM at TP=2 x PP=2 (four
ranks), at TP=2 (two ranks) and at TP=1 (one rank) from the same seed on the same global batch.
The TP=2 x PP=2 checkpoint is loaded by a second four-rank launch into megatron-core's own
GPTModel stages, whose forward-only pipeline schedule gives the logits of held-out text; the
converted folder, loaded by transformers in a fresh process, reproduces them and generates. The
three layouts convert to the same weights, which are not the initial ones. Then every bad input's
one-line error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from optional import require_module  # noqa: E402

require_module("megatron.core", "megatron-core is an optional extra: pip install -e .[megatron]")

from launch import HERE, ROOT, torchrun_cmd  # noqa: E402
from launch import child_env as _child_env
from launch import run as _run

WORKER = HERE / "megatron_logits_worker.py"
TINY_PARAMS = 53_408  # the tiny preset at vocabulary 512 (README table)
ITERS, SEED = 3, 1234
TRAIN_ARGS = [
    "--model",
    "tiny",
    "--sam-type",
    "PreconditionedFunctionalSAM",
    "--train-iters",
    str(ITERS),
    "--seq-len",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--seed",
    str(SEED),
    "--eval-interval",
    "0",
    "--eval-iters",
    "1",
]


def child_env(work: Path) -> dict:
    return _child_env(cache=work / "cache", tmp=work / "tmp", OMP_NUM_THREADS="1")


def run(cmd, env, timeout=400) -> subprocess.CompletedProcess:
    return _run(cmd, env=env, cwd=ROOT, timeout=timeout, tail=5000)


torchrun = torchrun_cmd


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert_megatron")


@pytest.fixture(scope="module")
def runs(work):
    """fsam-megatron-train at TP=1 (checkpoints at iterations 2 and 3), TP=2, and TP=2 x PP=2."""
    env = child_env(work)
    layouts = {
        "tp1": (1, ["--save-interval", "2"]),
        "tp2": (2, ["--tensor-model-parallel-size", "2"]),
        "tp2pp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    }
    for name, (ranks, extra) in layouts.items():
        (work / name).mkdir()  # the last pipeline stage opens metrics.jsonl there, maybe before rank 0 creates it
        run(torchrun(ranks, "-m", "megatron_patches.trainer", *TRAIN_ARGS, *extra, "--save", str(work / name)), env)
    return {name: work / name for name in layouts}


@pytest.fixture(scope="module")
def megatron_logits(work, runs):
    """The TP=2 x PP=2 checkpoint's logits on held-out text, from megatron-core at TP=2 x PP=2."""
    out = work / "megatron_logits.pt"
    run(
        torchrun(
            4,
            str(WORKER),
            "--mode",
            "megatron",
            "--ckpt",
            str(runs["tp2pp2"] / f"iter_{ITERS:07d}"),
            "--tp",
            "2",
            "--pp",
            "2",
            "--out",
            str(out),
        ),
        child_env(work),
    )
    return out


@pytest.fixture(scope="module")
def exports(work, runs):
    """Every run converted in this process (the latest iteration; TP=1 also at iteration 2)."""
    import torch.distributed as dist

    from fsam_ds.convert import convert

    had_group = dist.is_initialized()  # an earlier in-process test may have left a 1-rank group
    reports = {name: convert(path, work / f"hf_{name}") for name, path in runs.items()}
    reports["tp1_iter2"] = convert(runs["tp1"], work / "hf_tp1_iter2", tag="2")
    assert dist.is_initialized() == had_group  # a group the reader made for itself is gone again
    return reports


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_tp2_pp2_export_reproduces_megatron_logits_in_fresh_process(work, exports, megatron_logits):
    folders = [work / "hf_tp2pp2", work / "hf_tp1_iter2"]
    proc = run(
        [
            sys.executable,
            str(WORKER),
            "--mode",
            "check",
            "--folders",
            *map(str, folders),
            "--reference",
            str(megatron_logits),
        ],
        child_env(work),
    )
    got = json.loads([x for x in proc.stdout.splitlines() if x.startswith("CHECK ")][-1][len("CHECK ") :])
    r, earlier = got[str(folders[0])], got[str(folders[1])]
    assert r["class"] == "LlamaForCausalLM" and r["dtype"] == "float32"
    assert r["logits_shape"] == [2, 32, 512]
    assert r["logits_max_diff"] <= 1e-4, r
    assert r["tokenizer_ids_equal"] and r["tokenizer_size"] == 512
    assert r["generated_shape"] == [1, 32 + 6] and r["generated_prefix_kept"]
    assert r["first_new_token"] == r["megatron_argmax"]
    # the tolerance can fail: the export of one iteration earlier is far off
    assert earlier["logits_max_diff"] > 10 * 1e-4, earlier


@pytest.mark.slow
def test_report(exports, work):
    rep = exports["tp2pp2"]
    assert rep["format"] == "megatron" and (rep["tp"], rep["pp"], rep["dp"], rep["world_size"]) == (2, 2, 1, 4)
    assert rep["tag"] == f"iter_{ITERS:07d}" and rep["iteration"] == ITERS
    assert rep["parameters"] == TINY_PARAMS and rep["dtype"] == "fp32" and rep["shards"] == 1
    assert rep["vocab_size"] == 512 and rep["tokenizer"]["size"] == 512 and not rep["tied_embeddings"]
    assert rep["checkpoint_files"] == 8  # two .distcp files per rank
    assert "dist_checkpointing" in rep["weights_from"]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(rep["files"])
    assert (exports["tp1"]["tp"], exports["tp1"]["world_size"]) == (1, 1)
    assert exports["tp1_iter2"]["tag"] == "iter_0000002" and exports["tp1_iter2"]["iteration"] == 2
    from fsam_ds.convert import summary

    text = summary(dict(rep, source="x"))
    assert "TP 2 x PP 2 x DP 1" in text and "53,408 parameters" in text and "1 safetensors shard" in text


@pytest.mark.slow
def test_layouts_convert_to_the_same_weights(exports, work):
    from transformers import AutoConfig

    from fsam_ds.models import build_model
    from fsam_ds.train import seed_everything

    tp1, tp2, tp2pp2 = (_weights(work / f"hf_{n}") for n in ("tp1", "tp2", "tp2pp2"))
    assert _max_diff(tp1, tp2) <= 1e-5
    assert _max_diff(tp1, tp2pp2) <= 1e-5
    # the initial weights: the Hugging Face tiny preset built with the seed (the trainer's start)
    hf_config = AutoConfig.from_pretrained(work / "hf_tp1")
    seed_everything(SEED)
    model = build_model("tiny", vocab_size=hf_config.vocab_size, max_seq_len=hf_config.max_position_embeddings)
    initial = {k: v.detach().float() for k, v in model.state_dict().items()}
    moved = _max_diff(tp1, initial)
    assert moved > 100 * 1e-5  # trained: the comparison above can fail
    assert 1e-5 < _max_diff(_weights(work / "hf_tp1_iter2"), tp1) < moved


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and what is accepted
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(work, runs, exports):
    bad = work / "bad"
    bad.mkdir()
    (bad / "empty").mkdir()
    src = runs["tp2pp2"] / f"iter_{ITERS:07d}"

    def copy(name: str) -> Path:
        shutil.copytree(src, bad / name / src.name)
        (bad / name / "latest_checkpointed_iteration.txt").write_text(f"{ITERS}\n")
        return bad / name

    shard = copy("shard")
    (shard / src.name / "__1_0.distcp").unlink()
    no_hf = copy("no_hf")
    shutil.rmtree(no_hf / src.name / "hf")
    legacy = bad / "legacy" / "iter_0000001" / "mp_rank_00_000"
    legacy.mkdir(parents=True)
    (legacy / "model_optim_rng.pt").write_text("x")
    cfg = json.loads((src / "hf" / "config.json").read_text())
    (bad / "cfg600").mkdir()
    (bad / "cfg600" / "config.json").write_text(json.dumps(dict(cfg, vocab_size=600)))
    (bad / "cfg3layers").mkdir()
    (bad / "cfg3layers" / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    run_ = str(runs["tp2pp2"])
    return {  # name: (arguments, words the message must contain)
        "not a checkpoint": (
            [str(bad / "empty"), str(bad / "o1")],
            ["not a checkpoint folder", "latest_checkpointed_iteration.txt", "iter_NNNNNNN"],
        ),
        "shard": (
            [str(shard), str(bad / "o2")],
            ["missing shard file", "__1_0.distcp", "TP 2 x PP 2 x DP 1", "every rank"],
        ),
        "no hf": ([str(no_hf), str(bad / "o3")], ["no hf/config.json", "--config"]),
        "tag": ([run_, str(bad / "o4"), "--tag", "9"], ["'iter_0000009' not found", "iter_0000003"]),
        "tag name": ([run_, str(bad / "o5"), "--tag", "iter_0000002"], ["'iter_0000002' not found"]),
        "legacy": ([str(bad / "legacy"), str(bad / "o6")], ["per-rank torch-format", "dist_checkpointing"]),
        "config vocab": (
            [run_, str(bad / "o7"), "--config", str(bad / "cfg600")],
            ["vocabulary mismatch", "512 token embeddings", "vocab_size is 600"],
        ),
        "config layers": (
            [run_, str(bad / "o8"), "--config", str(bad / "cfg3layers")],
            ["do not match the config", "decoder.layers", "(2,", "(3,"],
        ),
    }


@pytest.mark.slow
def test_bad_inputs_raise_one_line(bad_inputs, work):
    import torch.distributed as dist

    from fsam_ds.convert import ConvertError, build_parser, convert

    had_group = dist.is_initialized()
    for name, (argv, words) in bad_inputs.items():
        with pytest.raises(ConvertError) as info:
            a = build_parser().parse_args(argv)
            convert(a.checkpoint, a.output, tag=a.tag, config=a.config)
        msg = str(info.value)
        assert "\n" not in msg, (name, msg)
        for word in words:
            assert word in msg, (name, word, msg)
    assert not any((work / "bad" / f"o{i}").exists() for i in range(1, 9))  # nothing written
    assert dist.is_initialized() == had_group


@pytest.mark.slow
def test_cli_error_exits_2_without_traceback(bad_inputs, work):
    argv, words = bad_inputs["shard"]
    proc = subprocess.run(
        [sys.executable, "-m", "fsam_ds.convert", *argv, "--source", "megatron"],
        cwd=ROOT,
        env=child_env(work),
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("fsam-convert: error: ") and all(w in lines[0] for w in words), lines[0]
