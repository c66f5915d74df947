"""A Hugging Face Trainer job with preconditioned Functional-SAM: the usual Trainer script with one
change, FSAMTrainer in place of Trainer; the method comes from the DeepSpeed JSON.

    deepspeed --num_gpus 2 launch_scripts/hf_trainer.py            # CPU: about 3 minutes
    deepspeed --num_gpus 8 launch_scripts/hf_trainer.py --model 118m --bf16 --steps 2000
    bash launch_scripts/hf_trainer.sh                              # the first line, set up

Trains a size preset on the embedded corpus (or --dataset), logs loss, grad_norm, eps_norm and rho
every step, saves Trainer checkpoints (--save-steps; resume with --resume) and evaluates at the end.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import DataCollatorForLanguageModeling, TrainingArguments

from fsam_ds.data import get_tokenizer, load_texts, token_ids
from fsam_ds.hf import FSAMTrainer
from fsam_ds.models import build_model


class Blocks(torch.utils.data.Dataset):
    """Fixed-length blocks of the concatenated token stream."""

    def __init__(self, ids, seq_len: int):
        self.ids, self.seq_len = torch.as_tensor(ids, dtype=torch.long), seq_len

    def __len__(self):
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i):
        return {"input_ids": self.ids[i * self.seq_len : (i + 1) * self.seq_len]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", default="ds_configs/hf/preconditioned_functional_sam.json")
    ap.add_argument("--model", default="2m")
    ap.add_argument("--dataset", default="default")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4, help="per device")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--save-steps", type=int, default=50)
    ap.add_argument("--output-dir", default="runs/hf-trainer")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = ap.parse_args()

    train_texts, eval_texts = load_texts(args.dataset)
    tokenizer = get_tokenizer(train_texts, vocab_size=4096)
    torch.manual_seed(0)
    model = build_model(args.model, vocab_size=len(tokenizer), max_seq_len=args.seq_len)
    accelerator_config = None
    if not torch.cuda.is_available():
        # CPU ranks: Accelerate counts DeepSpeed's processes only with an explicit gloo backend
        from accelerate.state import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        accelerator_config = {"use_configured_state": True}
    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        bf16=args.bf16,
        logging_steps=1,
        save_steps=args.save_steps,
        report_to="none",
        deepspeed=args.deepspeed_config,
        accelerator_config=accelerator_config,
        disable_tqdm=True,
    )
    trainer = FSAMTrainer(
        model=model,
        args=targs,
        train_dataset=Blocks(token_ids(train_texts, tokenizer), args.seq_len),
        eval_dataset=Blocks(token_ids(eval_texts, tokenizer), args.seq_len),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(f"final eval_loss: {metrics['eval_loss']:.4f}")


if __name__ == "__main__":
    main()
