"""SST-2 compression bench: teacher -> distilled student -> int8 student, one table.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/compress_sst2.py [--threads N] [--repeats 30] [key=value overrides]

Runs recipes/compress_sst2.yaml through the runner (stages already done are skipped), then measures the
three saved models side by side in this one process: CPU latency of a forward pass on the same 32
validation sentences (each model with its own tokenizer; median of repeated timed batches after warm-up,
the models taking turns), size of the weight files on disk and parameter counts. Accuracy / F1 come
from the stages' own evaluations (GLUE dev = validation, and the labelled SST test set).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import recipe_bench  # bench/recipe_bench.py (sets HF_HUB_OFFLINE before pipelines is imported)


def main() -> None:
    ap = recipe_bench.arguments(__doc__, "compress_sst2.yaml", 30, "stages.distill.config.train.epochs=2",
                                threads_help="torch threads for the whole run (default: torch's)")
    a = ap.parse_args()

    import torch

    from pipelines import modelio, runner, tasks
    recipe, man, wall = recipe_bench.run_recipe(a)
    by_type = {m["type"]: m for m in man.values()}
    d, q = by_type["distill"], by_type["quantize"]
    folders = {
        "teacher": Path(d["info"]["teacher"]),
        "student": runner.stage_dir(recipe, d["name"]) / d["outputs"]["model"],
        "int8 student": runner.stage_dir(recipe, q["name"]) / q["outputs"]["model"],
    }

    # ---- the three models, each with its own tokenizer, on the same 32 validation sentences
    card = recipe.cards[recipe.stage(d["name"]).spec.data]
    texts = card.load(seed=recipe.seed)["validation"].select(range(32))
    runs, params = {}, {}
    task = tasks.get("classification")
    for name, folder in folders.items():
        model = modelio.load_quantized(folder)  # a plain folder loads as fp32
        tok = modelio.load_processor(task, folder)
        task.prepare_processor(tok)
        runs[name] = (model, modelio.latency_batch(task, tok, model, texts, tasks.EvalOptions(), 32))
        params[name] = modelio.num_parameters(model) if name != "int8 student" else None
    params["int8 student"] = params["student"]  # same weights, stored in 8 bits
    lat = modelio.latency_ms(runs, repeats=a.repeats, warmup=5)

    # ---- accuracy / F1 from the stages' evaluations
    ev = d["info"]["eval"]
    qe = q["info"]["eval"]
    rows = []
    for name in folders:
        row = {"model": name}
        for split in ("validation", "test"):
            if name == "teacher":
                m = ev[split]["teacher"]
            elif name == "student":
                m = ev[split]["student"]
            else:
                m = qe[split]["quantized"]
            row[f"{split}_accuracy"], row[f"{split}_f1"] = m["accuracy"], m["f1"]
        row.update(params=params[name], mb=modelio.size_on_disk_mb(folders[name]), ms=lat[name]["median_ms"],
                   ms_min=lat[name]["min_ms"], seq_len=lat[name]["batch_shape"][1])
        rows.append(row)

    t = rows[0]
    print(f"\nrun wall time {wall / 60:.1f} min (0 if already done); torch threads {torch.get_num_threads()}; "
          f"latency: median of {a.repeats} forward passes of 32 validation sentences after 5 warm-ups, models in turns\n")
    print("| model | dev acc | dev F1 | test acc | test F1 | params | vs teacher | MB on disk | ms / batch of 32 | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['validation_accuracy']:.4f} | {r['validation_f1']:.4f} | {r['test_accuracy']:.4f} | "
              f"{r['test_f1']:.4f} | {r['params'] / 1e6:.2f} M | {r['params'] / t['params']:.0%} | {r['mb']:.1f} | "
              f"{r['ms']:.1f} | {t['ms'] / r['ms']:.2f}x |")
    s, i8 = rows[1], rows[2]
    print(f"\nstudent keeps {s['validation_accuracy'] / t['validation_accuracy']:.1%} of the teacher's dev accuracy "
          f"({s['test_accuracy'] / t['test_accuracy']:.1%} on test) with {s['params'] / t['params']:.0%} of its parameters; "
          f"int8 vs fp32 student: {s['mb'] / i8['mb']:.2f}x smaller on disk, {s['ms'] / i8['ms']:.2f}x faster, "
          f"dev accuracy {100 * (i8['validation_accuracy'] - s['validation_accuracy']):+.2f} points, "
          f"test {100 * (i8['test_accuracy'] - s['test_accuracy']):+.2f}")
    print("stage seconds: " + ", ".join(f"{k} {m['seconds']:.0f}" for k, m in man.items()))
    print(json.dumps({"rows": rows, "threads": torch.get_num_threads()}), file=sys.stderr)


if __name__ == "__main__":
    main()
