"""Helpers of tests/test_convert.py, in processes of their own.

``train`` (under the deepspeed launcher, every rank): runs ``fsam_ds.train.main`` with the
remaining arguments and then, from the very engine it trained, writes what the exported model
must reproduce: the logits of a held-out batch (the training model's forward, ZeRO-3 hooks
gathering the weights) and the full weights gathered with ``deepspeed.zero.GatheredParameters``.

``check`` (a fresh process that never saw DeepSpeed): loads exported folders with
``AutoModelForCausalLM`` / ``AutoTokenizer`` and reports, as JSON on stdout, how they compare
with what ``train`` wrote, and what ``generate()`` returns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELD_OUT_ROWS, HELD_OUT_LEN = 2, 40


def held_out_text() -> str:
    """Documents of the embedded corpus's evaluation split (never trained on)."""
    from fsam_ds import data as fdata

    _, eval_texts = fdata.load_texts("default")
    return "\n\n".join(eval_texts[:4])


def train(out: Path, train_argv) -> None:
    import torch
    import torch.distributed as dist

    import fsam_ds
    from fsam_ds import data as fdata
    from fsam_ds import train as ftrain

    captured = {}
    real_initialize = fsam_ds.initialize

    def spy(*args, **kwargs):
        result = real_initialize(*args, **kwargs)
        captured["engine"] = result[0]
        return result

    fsam_ds.initialize = spy  # fsam_ds.train calls fsam_ds.initialize by attribute
    rc = ftrain.main(train_argv)
    if rc != 0:
        sys.exit(rc)
    engine = captured["engine"]
    rank = dist.get_rank()

    # the training tokenizer: the same call fsam-train makes for a preset (cached by then)
    train_texts, _ = fdata.load_texts("default")
    tokenizer = fdata.get_tokenizer(train_texts, vocab_size=512)
    text = held_out_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    held = torch.tensor(ids[: HELD_OUT_ROWS * HELD_OUT_LEN]).reshape(HELD_OUT_ROWS, HELD_OUT_LEN)

    module = engine.module
    module.eval()
    with torch.no_grad():
        logits = module(input_ids=held).logits.float()  # every rank: ZeRO-3 gathers in the forward
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        weights = {k: v.detach().float().cpu().clone() for k, v in module.named_parameters()}
    if rank == 0:
        torch.save(
            {"text": text, "ids": ids, "held": held, "logits": logits, "weights": weights}, out / "training_side.pt"
        )
    dist.barrier()


def check(folders, reference: Path) -> dict:
    """Everything the test asserts on, computed in this fresh process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "deepspeed" not in sys.modules
    ref = torch.load(reference, weights_only=False)
    held, logits = ref["held"], ref["logits"]
    report = {}
    for folder in folders:
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.eval()
        tok = AutoTokenizer.from_pretrained(folder)
        r = {
            "dtype": str(model.dtype).replace("torch.", ""),
            "class": type(model).__name__,
            "tokenizer_ids_equal": tok(ref["text"], add_special_tokens=False)["input_ids"] == ref["ids"],
            "tokenizer_size": len(tok),
        }
        state = model.state_dict()
        r["weights_max_diff"] = max(float((state[k].float() - v).abs().max()) for k, v in ref["weights"].items())
        r["weights_max_diff_cast"] = max(
            float((state[k] - v.to(state[k].dtype)).float().abs().max()) for k, v in ref["weights"].items()
        )
        with torch.no_grad():
            got = model.float()(input_ids=held).logits
        r["logits_max_diff"] = float((got - logits).abs().max())
        # greedy generation from the first held-out row: its first new token is the argmax of the
        # training model's logits at the last position
        model.to(torch.float32)
        out = model.generate(held[:1], max_new_tokens=6, do_sample=False)
        r["generated_shape"] = list(out.shape)
        r["generated_prefix_kept"] = bool(torch.equal(out[0, : held.shape[1]], held[0]))
        r["first_new_token"] = int(out[0, held.shape[1]])
        r["training_argmax"] = int(logits[0, -1].argmax())
        r["generated_text"] = tok.decode(out[0, held.shape[1] :])
        report[str(folder)] = r
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["train", "check"], required=True)
    ap.add_argument("--out")
    ap.add_argument("--reference")
    ap.add_argument("--folders", nargs="+")
    args, rest = ap.parse_known_args()  # the rest (launcher's --local_rank included) goes to fsam-train
    if args.mode == "train":
        train(Path(args.out), rest)
    else:
        print("CHECK " + json.dumps(check(args.folders, Path(args.reference))), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
