"""fsam-convert: DeepSpeed checkpoints to Hugging Face folders and back into fsam-train.

One launcher start (two ranks, ZeRO-3, fp32, a few steps of preconditioned FSAM through
fsam-train) feeds most checks: the exported folder, loaded by transformers in a fresh process,
reproduces the logits the training engine itself computed on held-out text and the weights
DeepSpeed's GatheredParameters returned; generate() runs; bf16, sharding and tag choice. Then the
exported folder starts a one-step fsam-train run whose converted result equals an independent
single-process step (tests/reference.py); ZeRO stages 0 and 2, tied embeddings and bf16 masters on
one in-process rank; and every bad input's one-line error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import HERE, ROOT, child_env, deepspeed, run

from fsam_ds.train import train_argv  # noqa: E402

WORKER = HERE / "convert_worker.py"
TINY_PARAMS = 53_408  # the tiny preset at vocabulary 512 (README table)
SHARD = 100_000  # bytes: the tiny model's 214 kB of fp32 weights go into three files


def zero3_fp32_config(path: Path) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "zero3" / "preconditioned_functional_sam.json").read_text())
    cfg.pop("bf16")
    cfg.pop("scheduler")  # a constant lr: every step moves the weights
    cfg["train_micro_batch_size_per_gpu"] = 4
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def zero3_run(work):
    """fsam-train, 2 ranks, ZeRO-3 fp32, preconditioned FSAM, 3 steps; checkpoints step2 and step3."""
    deepspeed(
        WORKER,
        "--mode",
        "train",
        "--out",
        work,
        *train_argv(zero3_fp32_config(work / "z3.json"), work / "run", 3, save_every=2),
        env=child_env(work / "cache"),
        timeout=600,
    )
    return work / "run"


@pytest.fixture(scope="module")
def exports(work, zero3_run):
    """fp32 (sharded) and step2 in this process; bf16 through the command line."""
    from fsam_ds.convert import convert

    reports = {
        "fp32": convert(zero3_run, work / "hf_fp32", max_shard_size=SHARD),
        "step2": convert(zero3_run, work / "hf_step2", tag="step2"),
    }
    proc = run(
        [sys.executable, "-m", "fsam_ds.convert", str(zero3_run), str(work / "hf_bf16"), "--dtype", "bf16", "--json"],
        env=child_env(work / "cache"),
        cwd=ROOT,
        timeout=300,
    )
    reports["bf16"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return reports


@pytest.fixture(scope="module")
def fresh(work, exports):
    folders = [work / "hf_fp32", work / "hf_bf16", work / "hf_step2"]
    proc = run(
        [
            sys.executable,
            str(WORKER),
            "--mode",
            "check",
            "--reference",
            str(work / "training_side.pt"),
            "--folders",
            *map(str, folders),
        ],
        env=child_env(work / "cache"),
        cwd=ROOT,
        timeout=300,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("CHECK ")][-1]
    got = json.loads(line[len("CHECK ") :])
    return {name: got[str(work / f"hf_{name}")] for name in ("fp32", "bf16", "step2")}


@pytest.mark.slow
def test_zero3_export_reproduces_training_logits_in_fresh_process(fresh, exports, work):
    r = fresh["fp32"]
    assert r["class"] == "LlamaForCausalLM" and r["dtype"] == "float32"
    assert r["logits_max_diff"] <= 1e-5
    assert r["weights_max_diff"] == 0.0  # bit-exact against DeepSpeed's gathered weights
    assert r["tokenizer_ids_equal"] and r["tokenizer_size"] == 512
    # generate() runs, keeps the prompt, and its first greedy token is the training model's argmax
    assert r["generated_shape"] == [1, 40 + 6] and r["generated_prefix_kept"]
    assert r["first_new_token"] == r["training_argmax"]
    # an earlier checkpoint is measurably different: the tolerance above can fail
    assert fresh["step2"]["logits_max_diff"] > 1e-4 and fresh["step2"]["weights_max_diff"] > 1e-5


@pytest.mark.slow
def test_report_and_files(exports, work):
    rep = exports["fp32"]
    assert rep["format"] == "deepspeed" and rep["zero_stage"] == 3 and rep["world_size"] == 2
    assert rep["tag"] == "step3" and exports["step2"]["tag"] == "step2"
    assert "zero_to_fp32" in rep["weights_from"]
    assert rep["parameters"] == TINY_PARAMS and rep["dtype"] == "fp32" and rep["vocab_size"] == 512
    assert rep["tokenizer"]["size"] == 512 and not rep["tied_embeddings"]
    out = work / "hf_fp32"
    shards = sorted(out.glob("*.safetensors"))
    assert rep["shards"] == len(shards) == 3 and (out / "model.safetensors.index.json").is_file()
    assert rep["size_bytes"] == sum(p.stat().st_size for p in shards)
    assert 4 * TINY_PARAMS <= rep["size_bytes"] <= 4 * TINY_PARAMS + 20_000
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] <= 3 * SHARD
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(rep["files"])
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 512 and config["dtype"] == "float32" and config["use_cache"] is True
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and gen["pad_token_id"] == 0  # from the tokenizer's <|endoftext|>
    assert exports["step2"]["shards"] == 1


@pytest.mark.slow
def test_bf16_export(fresh, exports, work):
    rep = exports["bf16"]
    assert rep["dtype"] == "bf16" and rep["parameters"] == TINY_PARAMS
    assert 2 * TINY_PARAMS <= rep["size_bytes"] <= 2 * TINY_PARAMS + 20_000
    assert fresh["bf16"]["dtype"] == "bfloat16"
    assert fresh["bf16"]["weights_max_diff_cast"] == 0.0  # exactly the fp32 weights rounded to bf16
    assert 0 < fresh["bf16"]["weights_max_diff"] < 1e-2
    assert fresh["bf16"]["generated_shape"] == [1, 46]


# ---------------------------------------------------------------------------------------------
# Hugging Face folder -> fsam-train -> back
# ---------------------------------------------------------------------------------------------

LR_B, RHO_B, WD_B = 1e-3, 0.1, 0.1


@pytest.mark.slow
def test_hf_folder_trains_one_step_and_converts_back(work, exports, monkeypatch):
    import reference
    from transformers import AutoModelForCausalLM

    from fsam_ds import data as fdata
    from fsam_ds.convert import convert

    start = work / "hf_fp32"
    cfg = json.loads((ROOT / "ds_configs" / "preconditioned_functional_sam.json").read_text())
    cfg.pop("scheduler", None)
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, gradient_clipping=1.0)
    cfg["optimizer"]["params"].update(lr=LR_B, rho=RHO_B, weight_decay=WD_B, betas=[0.9, 0.95], eps=1e-8)
    (work / "ds0.json").write_text(json.dumps(cfg))
    cache = work / "cache_b"
    run(
        [
            sys.executable,
            "-m",
            "fsam_ds.train",
            *train_argv(work / "ds0.json", work / "run_b", 1, model=start),
        ],
        env=child_env(cache),
        cwd=work,
        timeout=300,
    )
    report = convert(work / "run_b", work / "hf_b")
    assert report["zero_stage"] == 0 and report["world_size"] == 1 and report["tag"] == "step1"
    assert report["weights_from"].startswith("module") and report["tokenizer"]["size"] == 512
    assert (work / "hf_b" / "tokenizer.json").read_text() == (start / "tokenizer.json").read_text()

    # the independent reference: the start folder loaded by transformers, the batch fsam-train
    # reads first (fsam_ds.data's documented order), one step of tests/reference.py
    tok = fdata.get_tokenizer(str(start), vocab_size=512)
    train_texts, _ = fdata.load_texts("default")
    blocks = fdata.TokenBlocks(train_texts, tok, 32, cache=False)
    batch = next(fdata.micro_batches(blocks, 2, 0, 1, seed=1234))
    monkeypatch.setattr(reference, "global_batch", lambda step, world, gas, **kw: [batch])

    def reference_step(method):
        model = AutoModelForCausalLM.from_pretrained(start, attn_implementation="sdpa").train()
        losses = reference.reference_train(
            model, 1, 1, 1, method, RHO_B, lr=LR_B, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD_B, clip=1.0
        )
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses

    expected, ref_losses = reference_step("PreconditionedFunctionalSAM")
    adamw, _ = reference_step("AdamW")
    before = AutoModelForCausalLM.from_pretrained(start).state_dict()
    after = AutoModelForCausalLM.from_pretrained(work / "hf_b").state_dict()
    assert set(after) == set(expected)
    moved = reference.weight_distance(after, before)
    assert 0.5 * LR_B < moved < 3 * LR_B  # one AdamW-sized step, from the folder's weights
    assert reference.weight_distance(after, expected) < 5e-6  # fp32 round-off (measured 3e-7)
    assert reference.weight_distance(after, adamw) > 1e-4  # another method's step is far away
    logged = [json.loads(x) for x in (work / "run_b" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["loss"] == pytest.approx(ref_losses[0], rel=1e-5)  # pass 1 ran at the folder's weights


# ---------------------------------------------------------------------------------------------
# ZeRO 0 and 2 on one rank: tied embeddings, bf16 masters, --config without saved metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,bf16,tied", [(0, False, True), (2, True, False)])
def test_one_rank_stages_tied_and_bf16(tmp_path, stage, bf16, tied):
    from common import ds_config
    from deepspeed.utils import safe_get_full_fp32_param
    from reference import micro_batch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import fsam_ds
    from fsam_ds.convert import convert

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    extra = {"zero_optimization": {"stage": stage}}
    if bf16:
        extra["bf16"] = {"enabled": True}
    engine, *_ = fsam_ds.initialize(model=model, config=ds_config("PreconditionedFunctionalSAM", gas=1, **extra))
    data = iter([micro_batch(s, 0, 0, 1, 1) for s in range(2)])
    for _ in range(2):
        engine.train_batch(data)
    engine.save_checkpoint(str(tmp_path / "ckpt"), tag="t2")
    if stage == 0:
        truth = {k: v.detach().float().clone() for k, v in engine.module.named_parameters()}
    else:  # DeepSpeed's fp32 master, read through its own accessor
        truth = {k: safe_get_full_fp32_param(p).detach().float().clone() for k, p in engine.module.named_parameters()}
    cfg.save_pretrained(tmp_path / "cfg")  # no <tag>/hf here: the config comes from --config

    rep = convert(tmp_path / "ckpt", tmp_path / "hf", config=tmp_path / "cfg")
    assert rep["zero_stage"] == stage and rep["tokenizer"] is None and rep["tied_embeddings"] == tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    state = dict(loaded.named_parameters())
    assert rep["parameters"] == sum(p.numel() for p in model.parameters())
    assert max(float((state[k] - v).abs().max()) for k, v in truth.items()) == 0.0
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    if tied:
        assert "lm_head.weight" not in keys  # stored once
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in keys
        # the masters differ from the bf16 weights the model ran with: the export took the masters
        assert any(not torch.equal(v, engine.module.get_parameter(k).detach().float()) for k, v in truth.items())


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the problem and what is accepted
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(work, zero3_run, exports):
    from transformers import AutoTokenizer

    bad = work / "bad"
    bad.mkdir()
    (bad / "empty").mkdir()
    (bad / "a_file").write_text("x")
    broken = bad / "broken"
    broken.mkdir()
    shutil.copytree(zero3_run / "step3", broken / "step3")
    (broken / "latest").write_text("step3")
    (broken / "step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    tok = AutoTokenizer.from_pretrained(work / "hf_fp32")
    tok.add_tokens([f"<extra_{i}>" for i in range(10)])
    tok.save_pretrained(bad / "big_tok")
    cfg = json.loads((work / "hf_fp32" / "config.json").read_text())
    (bad / "cfg600").mkdir()
    (bad / "cfg600" / "config.json").write_text(json.dumps(dict(cfg, vocab_size=600)))
    (bad / "full").mkdir()
    (bad / "full" / "keep.txt").write_text("x")
    run_ = str(zero3_run)
    return {  # name: (arguments, words the message must contain)
        "empty folder": ([str(bad / "empty"), str(bad / "o1")], ["not a checkpoint folder", "latest", "accepted"]),
        "a file": ([str(bad / "a_file"), str(bad / "o2")], ["a_file", "not a checkpoint folder"]),
        "missing": ([str(bad / "nope"), str(bad / "o3")], ["nope", "no such folder"]),
        "tag": ([run_, str(bad / "o4"), "--tag", "step9"], ["'step9'", "not found", "step2, step3"]),
        "shard": (
            [str(broken), str(bad / "o5")],
            ["missing shard", "zero_pp_rank_1_mp_rank_00_optim_states.pt", "2 data-parallel rank"],
        ),
        "tokenizer vocab": (
            [run_, str(bad / "o6"), "--tokenizer", str(bad / "big_tok")],
            ["vocabulary mismatch", "tokenizer has 522", "only 512"],
        ),
        "config vocab": (
            [run_, str(bad / "o7"), "--config", str(bad / "cfg600")],
            ["vocabulary mismatch", "512 token embeddings", "vocab_size is 600"],
        ),
        "output": ([run_, str(bad / "full")], ["full", "not empty", "--overwrite"]),
        "dtype": ([run_, str(bad / "o8"), "--dtype", "fp16"], ["--dtype", "fp16"]),
    }


CLI_CASES = ("empty folder", "shard", "tokenizer vocab", "dtype")


@pytest.mark.slow
def test_bad_inputs_raise_one_line(bad_inputs, work):
    from fsam_ds.convert import ConvertError, build_parser, convert

    for name, (argv, words) in bad_inputs.items():
        with pytest.raises(ConvertError) as info:
            a = build_parser().parse_args(argv)
            convert(a.checkpoint, a.output, tag=a.tag, dtype=a.dtype, config=a.config, tokenizer=a.tokenizer)
        msg = str(info.value)
        assert "\n" not in msg, (name, msg)
        for word in words:
            assert word in msg, (name, word, msg)
    assert not any((work / "bad" / f"o{i}").exists() for i in range(1, 9))  # nothing written
    assert sorted(p.name for p in (work / "bad" / "full").iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_cli_errors_exit_2_without_traceback(bad_inputs, work):
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "fsam_ds.convert", *bad_inputs[name][0]],
            cwd=ROOT,
            env=child_env(work / "cache"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in CLI_CASES
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        lines = [x for x in err.splitlines() if x.strip()]
        assert proc.returncode == 2, (name, out, err)
        assert "Traceback" not in err and len(lines) == 1, (name, err)
        assert lines[0].startswith("fsam-convert: error: "), (name, err)
        assert all(w in lines[0] for w in bad_inputs[name][1]), (name, lines[0])
