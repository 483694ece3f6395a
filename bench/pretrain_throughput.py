"""Pretraining throughput: the pretrain stage against two plain Hugging Face Trainer scripts.

    python bench/pretrain_throughput.py                 # 40 steps each, ~10 min on a busy 2-core CPU
    python bench/pretrain_throughput.py --steps 150 --variants ak   # does torch.compile pay here?
    python bench/pretrain_throughput.py --precision fp32 --sample

The same small GPT-2 (6 layers, 256 wide, context 256, ~6.9M parameters with the embeddings), the same
8k byte-level BPE (trained by the tokenizer stage, as the quick start does), the same corpus (full Tiny
Shakespeare from ../shared, else the shipped sample), batch, seed, schedule and number of steps, three ways:

  (a) stage    `pipelines run` of the pretrain stage: packed blocks, bf16 autocast where the CPU/GPU has
               bf16 units, fused AdamW, SDPA attention (all recipe settings)
  (k) compiled (a) + `train.torch_compile: true` (optional: --variants abck); its one-off compile time
               (~1-2 min on 2 cores) is inside its step time, so it pays only over longer runs
  (l) compiled loss  (a) + `train.compile_loss: true` (optional: --variants acl): only the loss function under
               torch.compile (bench/fused_ce.py: the 8,000-way head and its loss are ~1/5 of this model's step)
  (b) padded   bench/plain_clm.py --mode padded: one example per paragraph padded to 256 (fp32 defaults)
  (c) grouped  bench/plain_clm.py --mode grouped: run_clm's group_texts packing (fp32 defaults)

Each runs in its own subprocess (its peak RSS is its own, read with wait4). Printed per variant: real
(non-padding) tokens/s over the timed training steps (forward + backward + optimizer, as the stage
measures them) and over the whole train() call, MFU = 6 * params * real tokens/s / matmul peak of the
variant's precision (measured once, cached), peak RSS, the last logged train loss, and the loss of each
final model on the same validation blocks (the stage's packed validation split), so that a speed-up
that broke the loss would show. Then the ratios a/b and a/c.

The machine is shared: read timings as indicative, run it twice, and compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FULL_CARD = ROOT / "data_cards" / "tinyshakespeare.yaml"
SAMPLE_CARD = ROOT / "data_cards" / "tinyshakespeare_sample.yaml"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def run_child(cmd: list[str], env: dict) -> tuple[str, float, int]:
    """Run a subprocess; return (stdout, wall seconds, its own peak RSS in MiB via wait4)."""
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}):\n{out[-4000:]}")
    return out, time.time() - t, usage.ru_maxrss // 1024


def val_loss(model_dir: Path, blocks, batch: int = 16) -> float:
    """Mean next-token NLL of a saved model on the common validation blocks (fp32, no autocast)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.as_tensor(blocks).long()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x = ids[i : i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            n += x[:, 1:].numel()
    return total / n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="(a) only; auto: bf16 where the hardware has it")
    p.add_argument("--variants", default="abc", help="any of a, b, c, k: (a) + train.torch_compile, and l: (a) + "
                   "train.compile_loss")
    p.add_argument("--omp-active", action="store_true",
                   help="leave OpenMP's default spin-waiting on (default here: OMP_WAIT_POLICY=PASSIVE for every variant, "
                        "which on a shared, oversubscribed CPU is up to 2x faster for all of them)")
    p.add_argument("--out", default="/tmp/pipelines_bench_pretrain")
    p.add_argument("--peak-fp32", type=float, help="FLOP/s for MFU (default: measured once on this machine, cached)")
    p.add_argument("--peak-bf16", type=float, help="FLOP/s for MFU (default: measured once on this machine, cached)")
    p.add_argument("--sample", action="store_true", help="use the shipped sample even if ../shared has the full corpus")
    a = p.parse_args()

    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    card = SAMPLE_CARD if a.sample or not (ROOT.parent / "shared/datasets/tinyshakespeare/input.txt").exists() else FULL_CARD
    precision = a.precision
    if precision == "auto":
        precision = "bf16" if (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) or (not torch.cuda.is_available() and cpu_has_bf16()) else "fp32"
    warmup = max(1, a.steps // 10)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if not a.omp_active:
        env["OMP_WAIT_POLICY"] = "PASSIVE"

    # ---- the recipe of (a) (and k: the same with torch.compile); its tokenizer also serves (b) and (c)
    def stage(name, compile_, compile_loss=False):
        return {"name": name, "type": "pretrain", "data": "corpus", "inputs": {"tokenizer": "tokenizer"}, "config": {
            "objective": "causal_lm",
            "model": {"architecture": "gpt2", "layers": 6, "heads": 8, "hidden": 256, "intermediate": 1024,
                      "context_length": 256, "dropout": 0.0, "attn_implementation": "sdpa"},
            "train": {"max_steps": a.steps, "batch_size": a.batch, "lr": a.lr, "warmup": warmup, "scheduler": "cosine",
                      "weight_decay": 0.1, "max_grad_norm": 1.0, "precision": precision, "optim": "adamw_torch_fused",
                      "torch_compile": compile_, "compile_loss": compile_loss, "logging_steps": min(10, a.steps)},
        }}  # fmt: skip

    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "bench_pretrain", "output_dir": str(out / "runs"), "seed": 42, "data": {"corpus": str(card)},
        "stages": [
            {"name": "tokenizer", "type": "tokenizer", "data": "corpus", "config": {"kind": "bpe", "vocab_size": 8000, "model_max_length": 256}},
            stage("pretrain", False),
            stage("pretrain_compiled", True),
            stage("pretrain_compiled_loss", False, compile_loss=True),
        ],
    }, sort_keys=False))  # fmt: skip
    print(f"corpus {card.name}, {a.steps} steps x batch {a.batch} x 256 tokens, (a) precision {precision}; "
          f"torch threads {torch.get_num_threads()}; "
          f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', 'default')}; load avg {os.getloadavg()[0]:.1f}")
    run_child([sys.executable, "-m", "pipelines", "run", str(recipe), "--only", "tokenizer"], env)
    tok_dir = out / "runs" / "tokenizer" / "tokenizer"

    # ---- the common validation blocks (the stage's packed validation split)
    from transformers import AutoTokenizer

    from pipelines import packing
    from pipelines.data import load_card

    import numpy as np

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    val = load_card(card).load(seed=42)["validation"]
    cache = out / "cache"
    blocks = np.asarray(packing.pack(packing.tokenize_documents(val, tokenizer, cache_dir=cache), 256, cache_dir=cache).dataset.with_format("numpy")["input_ids"])
    from pipelines.stages.pretrain import matmul_peak_flops

    peaks = {"fp32": a.peak_fp32 or matmul_peak_flops("fp32")}
    if precision == "bf16":
        peaks["bf16"] = a.peak_bf16 or matmul_peak_flops("bf16")

    rows = {}
    for v in a.variants:
        load = os.getloadavg()[0]
        if v in "akl":
            name = {"a": "pretrain", "k": "pretrain_compiled", "l": "pretrain_compiled_loss"}[v]
            _, wall, rss = run_child([sys.executable, "-m", "pipelines", "run", str(recipe), "--only", name, "--force"], env)
            m = json.loads((out / "runs" / name / "manifest.json").read_text())
            hist = json.loads((out / "runs" / name / "log_history.json").read_text())
            losses = [h["loss"] for h in hist if "loss" in h]
            tokens, secs = m["metrics"]["train_tokens"], m["info"]["train_seconds_this_session"]
            label = f"({v}) stage, packed, {precision}, fused AdamW, SDPA" + {"a": "", "k": ", torch.compile",
                                                                                  "l": ", compile_loss"}[v]
            rows[v] = dict(name=label, tokens=tokens, step_s=secs, runtime=m["info"]["train_runtime"], first=m["info"]["first_step_seconds"],
                           params=m["metrics"]["params"], loss=losses[-1], precision=precision, model=out / "runs" / name / "model")  # fmt: skip
        else:
            mode = {"b": "padded", "c": "grouped"}[v]
            text, wall, rss = run_child([
                sys.executable, str(ROOT / "bench" / "plain_clm.py"), "--mode", mode, "--tokenizer", str(tok_dir), "--card", str(card),
                "--out", str(out / mode), "--steps", str(a.steps), "--batch", str(a.batch), "--lr", str(a.lr), "--warmup", str(warmup),
            ], env)  # fmt: skip
            r = json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])
            rows[v] = dict(name=f"({v}) plain Trainer, {mode}, fp32", tokens=r["real_tokens"], step_s=r["step_seconds"], first=r["first_step"],
                           runtime=r["train_runtime"], params=r["params"], loss=r["losses"][-1], precision="fp32", model=out / mode / "model")  # fmt: skip
        rows[v].update(rss=rss, wall=wall, load=load)
        print(f"  ({v}) done in {wall:.0f}s (load avg at start {load:.1f})", flush=True)

    # ---- table
    print("\n| variant | real tokens | real tok/s (steps) | after step 1 | real tok/s (train()) | MFU | peak RSS | last train loss | val loss (same blocks) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, r in rows.items():
        r["tps"] = r["tokens"] / r["step_s"]
        r["tps_wall"] = r["tokens"] / r["runtime"]
        r["tps_steady"] = r["tokens"] * (a.steps - 1) / a.steps / (r["step_s"] - r["first"])  # without step 1 (compilation)
        r["mfu"] = 6 * r["params"] * r["tps"] / peaks[r["precision"]]
        r["val"] = val_loss(r["model"], blocks)
        print(f"| {r['name']} | {r['tokens']:,} | {r['tps']:,.0f} | {r['tps_steady']:,.0f} | {r['tps_wall']:,.0f} | {r['mfu']:.1%} | {r['rss']:,} MiB | {r['loss']:.3f} | {r['val']:.3f} |")
    for top, base in (("a", "b"), ("a", "c"), ("k", "a"), ("k", "c"), ("l", "a"), ("l", "c")):
        if top in rows and base in rows:
            print(f"{top}/{base}: {rows[top]['tps'] / rows[base]['tps']:.2f}x real tokens/s over training steps "
                  f"({rows[top]['tps_steady'] / rows[base]['tps_steady']:.2f}x after step 1), "
                  f"{rows[top]['tps_wall'] / rows[base]['tps_wall']:.2f}x over train()")  # fmt: skip
    how = "given" if (a.peak_fp32 or a.peak_bf16) else "measured once and cached"
    print(f"matmul peaks (GFLOP/s, {how}): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items()))
    print(f"MFU = 6 x {rows[next(iter(rows))]['params']:,} params x real tokens/s / peak of the variant's precision")


if __name__ == "__main__":
    main()
