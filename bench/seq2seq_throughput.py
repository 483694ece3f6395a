"""Seq2seq training throughput on Multi30k: the translate recipe's model, four ways, side by side.

Run: OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/seq2seq_throughput.py

The model of recipes/translate_multi30k.yaml (scratch:marian 3+3 layers, d_model 256, ffn 1024, 7.1 M parameters,
its 6,000-token BPE trained by the tokenizer stage), the translation task's own encoding (pipelines.tasks, max
length 64) and collator (DataCollatorForSeq2Seq), batches of 64 pairs, AdamW (fused) lr 5e-4, gradient clipping
1.0 as the Trainer does. One training step = forward + backward + clip + optimizer step. Variants:

  (d) the finetune stage's defaults: fp32, batches in random order (group_by_length: false)
  (g) fp32, length-grouped batches (transformers' LengthGroupedSampler, as group_by_length: true)
  (r) the recipe: bf16 autocast + length-grouped
  (c) the recipe + torch.compile (inductor, dynamic shapes; --no-compile leaves it out)

The variants are stepped in turns, one step each per round, so they share the machine's load. Each draws its
own batches from its own sampler, so tokens per second counts real tokens (source + target, padding excluded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (torch.compile compiles here)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="/tmp/pipelines_bench_seq2seq")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, MarianMTModel
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from transformers.utils import logging

    from pipelines import basemodel, tasks
    from pipelines.data import load_card
    from pipelines.recipe import load_recipe

    logging.set_verbosity_error()
    out = Path(a.out)
    recipe_path = ROOT / "recipes" / "translate_multi30k.yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "pipelines", "run", str(recipe_path), "--only", "tokenizer",
                    f"output_dir={out}"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer" / "tokenizer")
    stage = next(s for s in load_recipe(recipe_path).stages if s.name == "translate").config
    task = tasks.get("translation")
    rows = load_card(ROOT / "data_cards" / "multi30k.yaml").load(seed=42)["train"]
    enc = task.encode(rows, tok, stage.eval_options(None))
    collate = task.collator(tok)
    lengths = [len(s) + len(t) for s, t in zip(enc["input_ids"], enc["labels"])]
    bs = stage.train.batch_size

    def batches(grouped: bool, seed: int):
        g = torch.Generator().manual_seed(seed)
        order = list(LengthGroupedSampler(bs, lengths=lengths, generator=g)) if grouped else torch.randperm(len(enc), generator=g).tolist()
        for i in range(0, len(order) - bs + 1, bs):
            yield collate([{k: enc[j][k] for k in ("input_ids", "attention_mask", "labels")} for j in order[i:i + bs]])

    variants = {"d": ("(d) stage defaults: fp32, random batches", False, False, False),
                "g": ("(g) fp32, length-grouped", True, False, False),
                "r": ("(r) the recipe: bf16 autocast, length-grouped", True, True, False)}
    if not a.no_compile:
        variants["c"] = ("(c) the recipe + torch.compile", True, True, True)
    state = {}
    for key, (_, grouped, bf16, compiled) in variants.items():
        torch.manual_seed(0)
        config = basemodel.scratch_config("marian", "encoder-decoder", tok, stage.max_length, stage.scratch_config, {})
        model = MarianMTModel(config).train()
        fwd = torch.compile(model, dynamic=True) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=stage.train.lr, weight_decay=0.0, fused=True)
        state[key] = dict(model=model, fwd=fwd, opt=opt, bf16=bf16, it=batches(grouped, 0), times=[], real=0, padded=0,
                          losses=[], first=None)
    params = sum(p.numel() for p in state["d"]["model"].parameters())
    print(f"Multi30k train {len(enc):,} pairs, batch {bs}, {params:,} parameters, torch threads {a.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}, load {os.getloadavg()[0]:.1f}", flush=True)

    def step(s):
        batch = next(s["it"])
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s["bf16"]):
            loss = s["fwd"](**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s["model"].parameters(), 1.0)
        s["opt"].step()
        s["opt"].zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        real = int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
        padded = batch["input_ids"].numel() + batch["labels"].numel()
        return dt, real, padded, loss.item()

    for i in range(a.warmup + a.steps):
        for key, s in state.items():
            dt, real, padded, loss = step(s)
            if i == 0:
                s["first"] = dt
            if i >= a.warmup:
                s["times"].append(dt)
                s["real"] += real
                s["padded"] += padded
                s["losses"].append(loss)
    load = os.getloadavg()[0]

    print("\n| variant | real tokens / step | padding | ms / step (median) | real tokens / s | vs (d) | step 1 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for key, s in state.items():
        tps = s["real"] / sum(s["times"])
        base = base or tps
        pad = 1 - s["real"] / s["padded"]
        print(f"| {variants[key][0]} | {s['real'] / a.steps:,.0f} | {pad:.0%} | {statistics.median(s['times']) * 1000:,.0f} | "
              f"{tps:,.0f} | {tps / base:.2f}x | {s['first']:.1f} |")
    print(f"\n{a.steps} timed steps per variant after {a.warmup} untimed; load average at the end {load:.1f}")


if __name__ == "__main__":
    main()
