"""Decoder pruning bench: a small Llama pretrained on WikiText-2, pruned by Taylor and by magnitude importance (FFN
neurons) and by Taylor with half the attention heads (whole key/value groups) removed, before and after a short
recovery fine-tune, one table.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python bench/prune_decoder.py [--repeats 20] [key=value ...]

Runs recipes/prune_wikitext_llama.yaml through the runner (stages already done are skipped), then times the unpruned
model and every saved level (recovered models: the same shapes as before recovery) in this one process: a forward
pass on the same batch of `--batch` contiguous windows of `context_length` tokens of the validation text (no padding),
median of repeated passes after 3 warm-ups, the models taking turns. Perplexities are the prune stages' own
evaluations (`info.curve`: before and after recovery; each validation row scored on its own, truncated to max_length),
beside the add-one unigram baseline on the same tokens (the stage's `unigram` evaluation) and the pretrain stage's
packed-block perplexity and unigram baseline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import recipe_bench  # bench/recipe_bench.py (sets HF_HUB_OFFLINE before pipelines is imported)


def main() -> None:
    ap = recipe_bench.arguments(__doc__, "prune_wikitext_llama.yaml", 20, "stages.pretrain.config.train.max_steps=300")
    ap.add_argument("--batch", type=int, default=8, help="windows per timed forward batch")
    a = ap.parse_args()

    import torch

    from pipelines import modelio, runner
    from pipelines.stages.prune import level_name
    recipe, man, wall = recipe_bench.run_recipe(a)
    prunes = [n for n, m in man.items() if m["type"] == "prune"]
    pre = next((m for m in man.values() if m["type"] == "pretrain"), None)
    src = Path(man[prunes[0]]["info"]["source"])
    folders, curve_rows = {"unpruned": src}, {}
    for n in prunes:
        for c in man[n]["info"]["curve"]["levels"]:
            label = f"{n} {c['sparsity']:g}"
            folders[label] = runner.stage_dir(recipe, n) / "levels" / level_name(c["sparsity"]) / "model"
            curve_rows[label] = c
    ref_ppl = man[prunes[0]]["info"]["curve"]["unpruned"]["perplexity"]
    unigram = next(e["metrics"]["perplexity"] for e in man[prunes[0]]["evaluations"] if e["model"] == "unigram")

    # ---- every model on the same batch of contiguous validation windows, timed in turns
    models = {name: modelio.load_model(folder, dtype=torch.float32)[0].eval() for name, folder in folders.items()}
    block = models["unpruned"].config.max_position_embeddings
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    card = recipe.cards[recipe.stage(prunes[0]).spec.data]
    text = "\n".join(card.load(seed=recipe.seed)["validation"]["text"][:100])
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][: a.batch * block]).view(a.batch, block)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    lat = modelio.latency_ms({n: (m, batch) for n, m in models.items()}, repeats=a.repeats, warmup=3)
    ref_ms = lat["unpruned"]["median_ms"]

    print(f"\nrun wall time {wall / 60:.1f} min (0 if already done); threads {torch.get_num_threads()}; latency: median of "
          f"{a.repeats} forward passes after 3 warm-ups, models in turns, batch {a.batch} x {block} tokens (no padding)")
    print(f"validation perplexity of the prune stages: first {man[prunes[0]]['config'].get('max_eval_samples')} rows of "
          f"the validation split, each scored alone (max_length {man[prunes[0]]['config'].get('max_length')}); "
          f"add-one unigram baseline on the same tokens: {unigram:.1f}")
    if pre:
        pm = pre["metrics"]
        print(f"pretrain stage (packed {block}-token blocks of validation): perplexity {pm['val_perplexity']:.1f}, "
              f"unigram {pm['unigram_perplexity']:.1f}, {pm['steps']} steps, {pm['tokens_per_s']:.0f} tokens/s\n")
    print("| model | FFN width | q / kv heads | params | layer params removed | ppl pruned | ppl recovered | vs unpruned "
          "| MB | ms / batch | speedup | stage speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, m in models.items():
        c = curve_rows.get(name, {})
        cfg = m.config
        p = modelio.num_parameters(m)
        before = c.get("perplexity_before_recovery", c.get("perplexity", ref_ppl))
        after = c.get("perplexity", ref_ppl)
        ms = lat[name]["median_ms"]
        row = {"model": name, "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
               "kv_heads": cfg.num_key_value_heads, "params": p, "layer_sparsity": c.get("encoder_sparsity", 0.0),
               "ppl_pruned": before, "ppl_recovered": after, "mb": modelio.size_on_disk_mb(folders[name]), "ms": ms,
               "speedup": ref_ms / ms, "stage_speedup": c.get("speedup", 1.0), "latency": lat[name]}
        rows.append(row)
        print(f"| {name} | {cfg.intermediate_size} | {cfg.num_attention_heads} / {cfg.num_key_value_heads} | "
              f"{p / 1e6:.2f} M | {100 * row['layer_sparsity']:.1f}% | {before:.1f} | {after:.1f} | "
              f"{100 * (after / ref_ppl - 1):+.1f}% | {row['mb']:.1f} | {ms:.1f} | {ref_ms / ms:.2f}x | "
              f"{row['stage_speedup']:.2f}x |")
    print(f"| unigram baseline | | | | | {unigram:.1f} | {unigram:.1f} | {100 * (unigram / ref_ppl - 1):+.1f}% | | | | |")
    print("stage seconds: " + ", ".join(f"{k} {m['seconds']:.0f}" for k, m in man.items()))
    print(json.dumps({"rows": rows, "unigram": unigram, "threads": torch.get_num_threads(), "wall_s": wall}), file=sys.stderr)


if __name__ == "__main__":
    main()
