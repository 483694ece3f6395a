"""A plain Hugging Face Trainer causal-LM script, written the way transformers' example
examples/pytorch/language-modeling/run_clm.py does it: the baseline that bench/pretrain_throughput.py
compares the pretrain stage with. Library defaults everywhere (fp32 on the CPU, the default attention
and optimizer of this transformers version), same model shape, data split, seed and schedule as the stage.

  --mode padded   one example per paragraph, truncated and padded to the block size (the naive way;
                  pad labels are -100, so only the real tokens count)
  --mode grouped  run_clm's group_texts: each map batch of 1,000 rows is concatenated and cut into
                  block_size chunks (each batch's remainder dropped; no EOS between documents)

Prints one JSON line: real (non-padding) tokens trained, summed step time, train() wall time, losses.
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import chain

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from pipelines.data import load_card


class StepTimer(TrainerCallback):
    """Measurement only: the same step timing as the pretrain stage (forward, backward, optimizer)."""

    def __init__(self):
        self.seconds, self._t, self.first = 0.0, None, None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        dt = time.perf_counter() - self._t
        self.seconds += dt
        self.first = dt if self.first is None else self.first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["padded", "grouped"], required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--card", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    raw = load_card(a.card).load(seed=a.seed)["train"]

    def tokenize(batch):
        if a.mode == "padded":
            return tokenizer(batch["text"], truncation=True, max_length=a.block, padding="max_length")
        return tokenizer(batch["text"])

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    if a.mode == "grouped":

        def group_texts(examples):  # as in run_clm.py
            concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
            total_length = len(concatenated[list(examples.keys())[0]])
            total_length = (total_length // a.block) * a.block
            result = {k: [t[i : i + a.block] for i in range(0, total_length, a.block)] for k, t in concatenated.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        train = tokenized.map(group_texts, batched=True)
        collator = default_data_collator
    else:
        train = tokenized
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    import torch

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=a.block, n_embd=256, n_layer=6, n_head=8, n_inner=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config)
    args = TrainingArguments(
        output_dir=f"{a.out}/checkpoints", max_steps=a.steps, per_device_train_batch_size=a.batch,
        learning_rate=a.lr, warmup_steps=a.warmup, lr_scheduler_type="cosine", weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=min(10, a.steps), save_strategy="no", eval_strategy="no", report_to="none",
        seed=a.seed, data_seed=a.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )  # fmt: skip
    timer = StepTimer()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[timer])
    out = trainer.train()
    trainer.save_model(f"{a.out}/model")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps({
        "real_tokens": int(trainer.state.num_input_tokens_seen), "step_seconds": timer.seconds, "first_step": timer.first,
        "train_runtime": out.metrics["train_runtime"], "losses": losses, "steps": trainer.state.global_step,
        "params": sum(p.numel() for p in model.parameters()), "train_rows": len(train),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
