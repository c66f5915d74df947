"""Helpers of tests/test_convert_megatron.py, in processes of their own.

``megatron`` (under torchrun, every rank of a TP x PP layout): loads a fsam-megatron-train
checkpoint into this rank's ``GPTModel`` stage with megatron-core's own ``dist_checkpointing``
(resharded to this layout), runs megatron's forward-only pipeline schedule on a held-out batch,
gathers the vocabulary-parallel logits over the tensor-parallel group and writes them (with the
text and token ids) from the last stage.

``check`` (a fresh process that never imported megatron): loads exported folders with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and prints, as JSON, how its logits compare with
megatron's and what ``generate()`` returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HELD_OUT_ROWS, HELD_OUT_LEN = 2, 32


def held_out_text() -> str:
    """Documents of the embedded corpus's evaluation split (never trained on)."""
    from fsam_ds import data as fdata

    _, eval_texts = fdata.load_texts("default")
    return "\n\n".join(eval_texts[:4])


def megatron_logits(ckpt: Path, tp: int, pp: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    import megatron.core  # noqa: F401

    from megatron_patches import cpu

    cpu.apply()
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig, AutoTokenizer

    from megatron_patches import layout

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    hf_config = AutoConfig.from_pretrained(ckpt / "hf")
    tok = AutoTokenizer.from_pretrained(ckpt / "hf")
    gpt = layout.build_gpt(hf_config, layout.transformer_config(hf_config, tp, pp, torch.float32))
    state = dist_checkpointing.load({"model": gpt.sharded_state_dict()}, str(ckpt))
    gpt.load_state_dict(state["model"])
    gpt.eval()

    text = held_out_text()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    held = torch.tensor(ids[: HELD_OUT_ROWS * HELD_OUT_LEN]).reshape(HELD_OUT_ROWS, HELD_OUT_LEN)
    b, s = held.shape
    kept = []

    def loss_func(output_tensor):
        kept.append(output_tensor.detach())  # [b, s, vocabulary / tp] on the last stage
        return output_tensor.float().sum() * 0.0, {}

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.tril(torch.ones(s, s, dtype=torch.bool)).logical_not().view(1, 1, s, s)
        return model(tokens, position_ids, mask), loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([held]),
            model=[gpt],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    if ps.is_pipeline_last_stage():
        (local,) = kept
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, -1).float()
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save({"text": text, "ids": ids, "held": held, "logits": logits, "tp": tp, "pp": pp}, out)
    dist.barrier()
    dist.destroy_process_group()


def check(folder: Path, ref: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held, logits = ref["held"], ref["logits"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    r = {
        "class": type(model).__name__,
        "dtype": str(model.dtype).replace("torch.", ""),
        "tokenizer_ids_equal": tok(ref["text"], add_special_tokens=False)["input_ids"] == ref["ids"],
        "tokenizer_size": len(tok),
        "logits_shape": list(logits.shape),
    }
    with torch.no_grad():
        got = model(input_ids=held).logits.float()
    r["logits_max_diff"] = float((got - logits).abs().max())
    r["logits_scale"] = float(logits.abs().max())
    out = model.generate(held[:1], max_new_tokens=6, do_sample=False)
    r["generated_shape"] = list(out.shape)
    r["generated_prefix_kept"] = bool(torch.equal(out[0, : held.shape[1]], held[0]))
    r["first_new_token"] = int(out[0, held.shape[1]])
    r["megatron_argmax"] = int(logits[0, -1].argmax())
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["megatron", "check"], required=True)
    ap.add_argument("--ckpt")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--folders", nargs="+")
    ap.add_argument("--reference")
    args = ap.parse_args()
    if args.mode == "megatron":
        megatron_logits(Path(args.ckpt), args.tp, args.pp, Path(args.out))
    else:
        import torch

        assert not any(m.startswith("megatron") for m in sys.modules)
        ref = torch.load(args.reference, weights_only=False)
        print("CHECK " + json.dumps({f: check(Path(f), ref) for f in args.folders}), flush=True)


if __name__ == "__main__":
    main()
