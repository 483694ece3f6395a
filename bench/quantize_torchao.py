"""CPU int8 on SST-2: torch.ao dynamic int8 (the quantize stage's default) vs torchao int8 vs ONNX Runtime int8, and
PTQ vs QAT (torchao fake-quantised fine-tuning) on the same student. Two tables.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/quantize_torchao.py --threads 1 \
        [--repeats 20] [--compile] [--skip-run] [key=value ...]

Runs recipes/qat_sst2.yaml through the runner (stages already done are skipped), then times every saved model in this
one process: a forward pass on the same 32 validation sentences (batch of 32) and on the first one (batch of 1), median
of repeated passes after warm-up, the models taking turns. Torch folders load with `pipelines.modelio.load_quantized`,
the ONNX Runtime folder with `pipelines.runtimes.load`. `--compile` also times torchao int8 under
`torch.compile` (inductor; the compile time is printed). Accuracy / F1 are the stages' own evaluations on GLUE dev.
"""

from __future__ import annotations

import json
import os
import time

import recipe_bench  # bench/recipe_bench.py (sets HF_HUB_OFFLINE before pipelines is imported)


def main() -> None:
    ap = recipe_bench.arguments(__doc__, "qat_sst2.yaml", 20, "stages.qat_fp32.config.train.lr=5e-5",
                                threads_help="torch / runtime threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also time torchao int8 under torch.compile")
    a = ap.parse_args()

    import torch

    from pipelines import modelio, quiet, runner, runtimes, tasks

    quiet.install()
    recipe, man, wall = recipe_bench.run_recipe(a)
    sdir = lambda name: runner.stage_dir(recipe, name)  # noqa: E731

    def qscore(name, which="quantized"):
        return man[name]["info"]["eval"]["validation"][which]

    onnx = man["ptq_onnx"]
    fmt = onnx["info"]["formats"][0] if isinstance(onnx["info"]["formats"], list) else next(iter(onnx["info"]["formats"]))
    # name: (folder, dev scores, which fp32 model it came from)
    rows = {
        "fp32 (plain fine-tuning)": (sdir("ptq_fp32") / "model", qscore("ptq_int8", "fp32"), None),
        "torch.ao dynamic int8 (`dynamic_int8`, today's default)": (sdir("ptq_int8") / "model", qscore("ptq_int8"), "ptq"),
        "torch.ao dynamic int8, embeddings fp32 (`embeddings: keep`)": (sdir("ptq_int8_linear") / "model",
                                                                         qscore("ptq_int8_linear"), "ptq"),
        "torchao int8 (`torchao_int8`), eager": (sdir("ptq_torchao") / "model", qscore("ptq_torchao"), "ptq"),
        f"ONNX Runtime int8 dynamic (export `{fmt}`)": (sdir("ptq_onnx") / fmt, onnx["info"]["eval"]["validation"][fmt], "ptq"),
        "fp32 (QAT fine-tuning, fake quant removed)": (sdir("qat_fp32") / "model", qscore("qat_int8", "fp32"), None),
        "QAT -> torch.ao dynamic int8": (sdir("qat_int8") / "model", qscore("qat_int8"), "qat"),
        "QAT -> torch.ao dynamic int8, embeddings fp32": (sdir("qat_int8_linear") / "model", qscore("qat_int8_linear"), "qat"),
        "QAT -> torchao int8": (sdir("qat_torchao") / "model", qscore("qat_torchao"), "qat"),
    }

    # ---- every model on the same sentences, batch 32 and batch 1, timed in turns
    task = tasks.get("classification")
    card = recipe.cards[recipe.stage("ptq_fp32").spec.data]
    texts = card.load(seed=recipe.seed)["validation"].select(range(32))
    tok = modelio.load_processor(task, rows["fp32 (plain fine-tuning)"][0])
    task.prepare_processor(tok)
    models = {n: (runtimes.load(f) if runtimes.read_export(f) else modelio.load_quantized(f)) for n, (f, _, _) in rows.items()}
    compile_s = {}
    if a.compile:
        name = "torchao int8 (`torchao_int8`), torch.compile"
        base = "torchao int8 (`torchao_int8`), eager"
        rows[name] = rows[base]
        models[name] = torch.compile(modelio.load_quantized(rows[base][0]))
        batches = [modelio.latency_batch(task, tok, models[name], texts, tasks.EvalOptions(), bs) for bs in (32, 1)]
        t = time.time()
        with torch.inference_mode():
            for b in batches:
                models[name](**b)
        compile_s[name] = time.time() - t
    lat = {bs: modelio.latency_ms({n: (m, modelio.latency_batch(task, tok, m, texts, tasks.EvalOptions(), bs))
                                   for n, m in models.items()}, repeats=a.repeats, warmup=3) for bs in (32, 1)}

    ref = "fp32 (plain fine-tuning)"
    ref32, ref1 = lat[32][ref]["median_ms"], lat[1][ref]["median_ms"]
    print(f"\nrun wall time {wall / 60:.1f} min (0 if already done); threads {torch.get_num_threads()}; load average "
          f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())}; latency: median of {a.repeats} forward passes after 3 "
          f"warm-ups, models in turns; batch of 32 padded to {lat[32][ref]['batch_shape'][1]} tokens, batch of 1 = the "
          "first sentence" + (f"; compile {', '.join(f'{v:.0f} s' for v in compile_s.values())}" if compile_s else "")
          + "\n")
    print("| model | dev acc | dev F1 | vs its fp32 (points) | MB on disk | ms / batch of 32 | speedup | ms / sentence | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    fp32_acc = {"ptq": rows[ref][1]["accuracy"], "qat": rows["fp32 (QAT fine-tuning, fake quant removed)"][1]["accuracy"]}
    out = []
    for name, (folder, s, origin) in rows.items():
        b32, b1 = lat[32][name]["median_ms"], lat[1][name]["median_ms"]
        delta = (s["accuracy"] - fp32_acc[origin]) * 100 if origin else 0.0
        mb = modelio.size_on_disk_mb(folder)
        print(f"| {name} | {s['accuracy']:.4f} | {s['f1']:.4f} | {delta:+.2f} | {mb:.1f} | {b32:.1f} | {ref32 / b32:.2f}x "
              f"| {b1:.2f} | {ref1 / b1:.2f}x |")
        out.append({"model": name, "accuracy": s["accuracy"], "f1": s["f1"], "delta_points": round(delta, 2), "mb": mb,
                    "ms32": b32, "ms1": b1})

    print("\nPTQ vs QAT (same MiniLM, data, steps, seed; dev accuracy):\n")
    print("| int8 method | PTQ fp32 | PTQ int8 | PTQ Δ | QAT fp32 | QAT int8 | QAT Δ | QAT int8 − PTQ int8 |")
    print("|---|---|---|---|---|---|---|---|")
    for method, p, q in (("torch.ao dynamic int8 (+ int8 embeddings)", "ptq_int8", "qat_int8"),
                         ("torch.ao dynamic int8, embeddings fp32", "ptq_int8_linear", "qat_int8_linear"),
                         ("torchao int8 (embeddings fp32)", "ptq_torchao", "qat_torchao")):
        pf, pq, qf, qq = (qscore(p, "fp32")["accuracy"], qscore(p)["accuracy"], qscore(q, "fp32")["accuracy"],
                          qscore(q)["accuracy"])
        print(f"| {method} | {pf:.4f} | {pq:.4f} | {100 * (pq - pf):+.2f} | {qf:.4f} | {qq:.4f} | {100 * (qq - qf):+.2f} "
              f"| {100 * (qq - pq):+.2f} |")
    print(json.dumps({"rows": out, "compile_s": compile_s}))


if __name__ == "__main__":
    main()
