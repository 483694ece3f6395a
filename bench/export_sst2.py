"""SST-2 export bench: fp32 torch, torch dynamic int8 and every export runtime of one model, one table.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/export_sst2.py --threads 1 [--repeats 20] [key=value ...]

Runs recipes/export_sst2.yaml through the runner (stages already done are skipped), then times every saved model
in this one process: a forward pass on the same 32 validation sentences (batch of 32) and on one sentence (batch
of 1), median of repeated passes after warm-up, the models taking turns. Torch models load with
`pipelines.modelio.load_quantized`, exported folders with `pipelines.runtimes.load`. Accuracy / F1 are the stages'
own evaluations on GLUE dev (the export stage's ran in a fresh process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import recipe_bench  # bench/recipe_bench.py (sets HF_HUB_OFFLINE before pipelines is imported)


def main() -> None:
    ap = recipe_bench.arguments(__doc__, "export_sst2.yaml", 20, "stages.export.config.calibration_samples=256",
                                threads_help="torch / runtime threads (default: torch's)")
    a = ap.parse_args()

    import torch

    from pipelines import modelio, runner, runtimes, tasks
    recipe, man, wall = recipe_bench.run_recipe(a)
    man = {m["type"]: m for m in man.values()}
    q, e = man["quantize"], man["export"]
    qdir, edir = runner.stage_dir(recipe, q["name"]), runner.stage_dir(recipe, e["name"])
    folders = {"torch fp32": Path(e["info"]["source"]), "torch dynamic int8": qdir / q["outputs"]["model"]}
    folders.update({f"{runtimes.read_export(edir / f)['runtime']} {f}": edir / f for f in e["info"]["formats"]})
    scores = {"torch fp32": e["info"]["eval"]["validation"]["torch"],
              "torch dynamic int8": q["info"]["eval"]["validation"]["quantized"]}
    scores.update({f"{runtimes.read_export(edir / f)['runtime']} {f}": e["info"]["eval"]["validation"][f]
                   for f in e["info"]["formats"]})

    # ---- every model on the same sentences, batch 32 and batch 1, timed in turns
    task = tasks.get("classification")
    card = recipe.cards[recipe.stage(e["name"]).spec.data]
    texts = card.load(seed=recipe.seed)["validation"].select(range(32))
    models, tok = {}, None
    for name, folder in folders.items():
        models[name] = runtimes.load(folder) if runtimes.read_export(folder) else modelio.load_quantized(folder)
        tok = tok or modelio.load_processor(task, folder)
    task.prepare_processor(tok)
    lat = {bs: modelio.latency_ms({n: (m, modelio.latency_batch(task, tok, m, texts, tasks.EvalOptions(), bs))
                                   for n, m in models.items()}, repeats=a.repeats, warmup=3) for bs in (32, 1)}

    ref, ref_acc = lat[32]["torch fp32"]["median_ms"], scores["torch fp32"]["accuracy"]
    print(f"\nrun wall time {wall / 60:.1f} min (0 if already done); threads {torch.get_num_threads()}; latency: median of "
          f"{a.repeats} forward passes after 3 warm-ups, models in turns; batch of 32 padded to "
          f"{lat[32]['torch fp32']['batch_shape'][1]} tokens, batch of 1 = the first sentence\n")
    print("| model | dev acc | dev F1 | vs fp32 (points) | MB on disk | ms / batch of 32 | speedup | ms / sentence | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in models:
        s, b32, b1 = scores[name], lat[32][name]["median_ms"], lat[1][name]["median_ms"]
        row = {"model": name, "accuracy": s["accuracy"], "f1": s["f1"], "mb": modelio.size_on_disk_mb(folders[name]),
               "ms32": b32, "ms1": b1}
        rows.append(row)
        print(f"| {name} | {s['accuracy']:.4f} | {s['f1']:.4f} | {100 * (s['accuracy'] - ref_acc):+.2f} | {row['mb']:.1f} | "
              f"{b32:.1f} | {ref / b32:.2f}x | {b1:.2f} | {lat[1]['torch fp32']['median_ms'] / b1:.2f}x |")
    print("stage seconds: " + ", ".join(f"{k} {m['seconds']:.0f}" for k, m in man.items()))
    print(json.dumps({"rows": rows, "threads": torch.get_num_threads()}), file=sys.stderr)


if __name__ == "__main__":
    main()
