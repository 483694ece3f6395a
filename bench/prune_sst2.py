"""SST-2 pruning bench: the fine-tuned MiniLM teacher pruned 30 % / 50 % by magnitude and by Taylor importance, before
and after a short recovery fine-tune, one table.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/prune_sst2.py --threads 1 [--repeats 20] [key=value ...]

Runs recipes/prune_sst2.yaml through the runner (stages already done are skipped), then times the teacher and every
saved level (recovered models: the same shapes as before recovery) in this one process: a forward pass on the same
32 dev sentences (batch of 32) and on one sentence, median of repeated passes after warm-up, the models taking turns.
Accuracies are the prune stages' own evaluations on GLUE dev (`info.curve`: before and after recovery).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import recipe_bench  # bench/recipe_bench.py (sets HF_HUB_OFFLINE before pipelines is imported)


def main() -> None:
    ap = recipe_bench.arguments(__doc__, "prune_sst2.yaml", 20, "stages.taylor.config.importance_batches=16")
    a = ap.parse_args()

    import torch

    from pipelines import modelio, runner, tasks
    recipe, man, wall = recipe_bench.run_recipe(a)
    prunes = [n for n, m in man.items() if m["type"] == "prune"]
    teacher_dir = Path(man[prunes[0]]["info"]["source"])
    folders, curve_rows = {"teacher": teacher_dir}, {}
    for n in prunes:
        for c in man[n]["info"]["curve"]["levels"]:
            label = f"{n} {c['sparsity']:.0%}"
            folders[label] = runner.stage_dir(recipe, n) / "levels" / f"sparsity_{c['sparsity']:.2f}" / "model"
            curve_rows[label] = c
    teacher_acc = man[prunes[0]]["info"]["curve"]["unpruned"]["accuracy"]

    # ---- every model on the same sentences, batch 32 and batch 1, timed in turns
    task = tasks.get("classification")
    card = recipe.cards[recipe.stage(prunes[0]).spec.data]
    texts = card.load(seed=recipe.seed)["validation"].select(range(32))
    models = {name: modelio.load_model(folder)[0] for name, folder in folders.items()}
    tok = modelio.load_processor(task, teacher_dir)
    task.prepare_processor(tok)
    lat = {bs: modelio.latency_ms({n: (m, modelio.latency_batch(task, tok, m, texts, tasks.EvalOptions(), bs))
                                   for n, m in models.items()}, repeats=a.repeats, warmup=3) for bs in (32, 1)}

    ref32, ref1 = lat[32]["teacher"]["median_ms"], lat[1]["teacher"]["median_ms"]
    print(f"\nrun wall time {wall / 60:.1f} min (0 if already done); threads {torch.get_num_threads()}; latency: median of "
          f"{a.repeats} forward passes after 3 warm-ups, models in turns; batch of 32 padded to "
          f"{lat[32]['teacher']['batch_shape'][1]} tokens, batch of 1 = the first sentence\n")
    print("| model | layers | FFN width | params | vs teacher | MB | dev acc pruned | dev acc recovered | vs teacher (points) "
          "| ms / batch of 32 | speedup | ms / sentence | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    p0 = modelio.num_parameters(models["teacher"])
    rows = []
    for name, m in models.items():
        c = curve_rows.get(name, {})
        p = modelio.num_parameters(m)
        before = c.get("accuracy_before_recovery", c.get("accuracy", teacher_acc))
        after = c.get("accuracy", teacher_acc)
        b32, b1 = lat[32][name]["median_ms"], lat[1][name]["median_ms"]
        row = {"model": name, "layers": m.config.num_hidden_layers, "intermediate_size": m.config.intermediate_size, "params": p,
               "mb": modelio.size_on_disk_mb(folders[name]), "acc_pruned": before, "acc_recovered": after,
               "ms32": b32, "ms1": b1}
        rows.append(row)
        print(f"| {name} | {m.config.num_hidden_layers} | {m.config.intermediate_size} | {p / 1e6:.2f} M | {100 * p / p0:.0f}% | {row['mb']:.1f} | "
              f"{before:.4f} | {after:.4f} | {100 * (after - teacher_acc):+.2f} | {b32:.1f} | {ref32 / b32:.2f}x | "
              f"{b1:.2f} | {ref1 / b1:.2f}x |")
    print("stage seconds: " + ", ".join(f"{k} {m['seconds']:.0f}" for k, m in man.items()))
    print(json.dumps({"rows": rows, "threads": torch.get_num_threads()}), file=sys.stderr)


if __name__ == "__main__":
    main()
