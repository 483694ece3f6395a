"""Causal-LM export bench: a decoder as torch fp32, as the export stage's ONNX decode graph (fp32) and as ONNX
Runtime int8, side by side: perplexity, MB, one forward pass, and generate() tokens/s (greedy, batch 1 and 8).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/export_decoder.py [--model FOLDER] [--threads 1]

FOLDER (default runs/prune_wikitext_llama/pretrain/model, the 4.95 M Llama that
`pipelines run --only tokenizer,pretrain recipes/prune_wikitext_llama.yaml` pretrains in ~11 min) is exported by an
export stage (formats onnx, onnx_int8_dynamic) on data_cards/wikitext2_lm.yaml: the stage re-scores every folder in
a fresh process (perplexity on the first 200 validation rows = wiki.test.raw, forward ms of a batch of 8). Then this
process loads the three models (pipelines.runtimes.load for the graphs) and times generate() on the same prompts
(the first 12 words of validation texts), 64 new tokens forced (min_new_tokens), models in turns, median of
--repeats runs after one warm-up, and checks that the fp32 graph's greedy tokens are torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs/prune_wikitext_llama/pretrain/model"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "runs/export_decoder"))
    a = ap.parse_args()

    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import runner, runtimes
    from pipelines.data import load_card
    from pipelines.recipe import load_recipe

    if a.threads:
        torch.set_num_threads(a.threads)
    card = ROOT / "data_cards/wikitext2_lm.yaml"
    recipe = {"name": "export_decoder", "output_dir": a.out, "data": {"wikitext": str(card)}, "stages": [
        {"name": "export", "type": "export", "data": "wikitext", "config": {
            "model_path": a.model, "formats": ["onnx", "onnx_int8_dynamic"], "max_length": 256, "max_eval_samples": 200,
            "eval_splits": ["validation"], "latency_batch_size": 8, "latency_repeats": 10}}]}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        t0 = time.perf_counter()
        runner.run(load_recipe(path))
        stage_s = time.perf_counter() - t0
    stage = Path(a.out) / "export"
    m = json.loads((stage / "manifest.json").read_text())
    ev, lat = m["info"]["eval"]["validation"], m["info"]["latency"]

    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    texts = [t for t in load_card(card).load(seed=42)["validation"]["text"] if len(t.split()) > 20][:8]
    prompts = [" ".join(t.split()[:12]) for t in texts]
    models = {"torch fp32": AutoModelForCausalLM.from_pretrained(a.model).eval(),
              "onnx (fp32)": runtimes.load(stage / "onnx"), "onnx_int8_dynamic": runtimes.load(stage / "onnx_int8_dynamic")}
    label = {"torch fp32": "torch", "onnx (fp32)": "onnx", "onnx_int8_dynamic": "onnx_int8_dynamic"}
    size = {"torch fp32": m["metrics"]["torch_mb"], "onnx (fp32)": m["metrics"]["mb"],
            "onnx_int8_dynamic": m["metrics"]["onnx_int8_dynamic_mb"]}

    def generate(model, batch):
        enc = tok(prompts[:batch], padding=True, return_tensors="pt")
        with torch.inference_mode():
            return model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)

    times = {(n, b): [] for n in models for b in (1, 8)}
    outs = {}
    for b in (1, 8):
        for n, model in models.items():  # warm-up
            outs[(n, b)] = generate(model, b)
        for _ in range(a.repeats):
            for n, model in models.items():
                t = time.perf_counter()
                generate(model, b)
                times[(n, b)].append(time.perf_counter() - t)
    same = all(torch.equal(outs[("onnx (fp32)", b)], outs[("torch fp32", b)]) for b in (1, 8))

    print(f"\nexport stage {stage_s:.0f} s (0 if already done); threads {torch.get_num_threads()}; generate: greedy, "
          f"{a.new_tokens} new tokens forced, prompts of 12 words, median of {a.repeats} after a warm-up, models in "
          f"turns; fp32 graph's greedy tokens == torch's: {same}\n")
    print("| model | val perplexity | MB | ms / forward, batch 8 x 256 | gen tok/s, batch 1 | speedup | gen tok/s, batch 8 | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    ref = {b: statistics.median(times[("torch fp32", b)]) for b in (1, 8)}
    for n in models:
        tps = {b: b * a.new_tokens / statistics.median(times[(n, b)]) for b in (1, 8)}
        sp = {b: ref[b] / statistics.median(times[(n, b)]) for b in (1, 8)}
        print(f"| {n} | {ev[label[n]]['perplexity']:.2f} | {size[n]:.1f} | {lat[label[n]]['median_ms']:.1f} | "
              f"{tps[1]:.0f} | {sp[1]:.2f}x | {tps[8]:.0f} | {sp[8]:.2f}x |")


if __name__ == "__main__":
    main()
