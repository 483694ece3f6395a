"""Generative export bench: a causal LM or an encoder-decoder as torch fp32 and as the export stage's graphs over a
KV cache (ONNX Runtime fp32 / int8, OpenVINO fp32 / int8 weights), side by side: the task's main metric, MB, one forward pass, and
generate() tokens/s (greedy, batch 1 and 8).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/export_decoder.py [--model FOLDER] [--threads 1]
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/export_decoder.py --model runs/translate_multi30k/translate/model \
        --card data_cards/multi30k.yaml --out runs/export_translator

FOLDER (default runs/prune_wikitext_llama/pretrain/model, the 4.95 M Llama that
`pipelines run --only tokenizer,pretrain recipes/prune_wikitext_llama.yaml` pretrains in ~11 min; the translator:
`pipelines run recipes/translate_multi30k.yaml`) is exported by an export stage (formats onnx, onnx_int8_dynamic, openvino, openvino_int8) on
--card (default data_cards/wikitext2_lm.yaml): the stage re-scores every folder in a fresh process (the first 200
validation rows: perplexity; BLEU / chrF of generate() for a translator; forward ms of a batch of 8). Then this
process loads the five models (pipelines.runtimes.load for the graphs) and times generate() on the same inputs
(a causal LM: the first 12 words of validation texts; a translator: validation sources), --new-tokens new tokens
forced (min_new_tokens), models in turns, median of --repeats runs after one warm-up, and checks that the fp32
graphs' greedy tokens are torch's.
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
FORMATS = ["onnx", "onnx_int8_dynamic", "openvino", "openvino_int8"]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "runs/prune_wikitext_llama/pretrain/model"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--card", default=str(ROOT / "data_cards/wikitext2_lm.yaml"))
    ap.add_argument("--out", default=str(ROOT / "runs/export_decoder"))
    a = ap.parse_args()
    a.model, a.out = str(Path(a.model).resolve()), str(Path(a.out).resolve())  # the recipe is in a temporary folder

    import torch
    import yaml
    from transformers import AutoTokenizer

    from pipelines import modelio, runner, runtimes
    from pipelines.data import load_card
    from pipelines.recipe import load_recipe

    if a.threads:
        torch.set_num_threads(a.threads)
    card = Path(a.card).resolve()
    recipe = {"name": "export_decoder", "output_dir": a.out, "data": {"wikitext": str(card)}, "stages": [
        {"name": "export", "type": "export", "data": "wikitext", "config": {
            "model_path": a.model, "formats": FORMATS, "max_length": 256, "max_eval_samples": 200,
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

    torch_model, task = modelio.load_model(a.model)
    seq2seq = torch_model.config.is_encoder_decoder
    tok = AutoTokenizer.from_pretrained(a.model, **({} if seq2seq else {"padding_side": "left"}))
    rows = load_card(card).load(seed=42)["validation"]
    if seq2seq:
        prompts = list(rows["source"][:8])
    else:
        prompts = [" ".join(t.split()[:12]) for t in rows["text"] if len(t.split()) > 20][:8]
    main = task.main_metric
    models = {"torch fp32": torch_model, **{f: runtimes.load(stage / f) for f in FORMATS}}
    label = {"torch fp32": "torch", **{f: f for f in FORMATS}}
    size = {"torch fp32": m["metrics"]["torch_mb"], "onnx": m["metrics"]["mb"],
            **{f: m["metrics"][f"{f}_mb"] for f in FORMATS[1:]}}

    def generate(model, batch):
        enc = tok(prompts[:batch], padding=True, return_tensors="pt")
        with torch.inference_mode():
            return model.generate(**enc, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                                  num_beams=1, pad_token_id=tok.pad_token_id)

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
    same = all(torch.equal(outs[(f, b)], outs[("torch fp32", b)]) for f in ("onnx", "openvino") for b in (1, 8))

    print(f"\nexport stage {stage_s:.0f} s (0 if already done); threads {torch.get_num_threads()}; generate: greedy, "
          f"{a.new_tokens} new tokens forced, median of {a.repeats} after a warm-up, models in turns; fp32 graphs' "
          f"greedy tokens == torch's: {same}\n")
    shape = "x".join(str(n) for n in lat["torch"]["batch_shape"])
    print(f"| model | val {main} | MB | ms / forward, batch {shape} | gen tok/s, batch 1 | speedup | gen tok/s, batch 8 | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    ref = {b: statistics.median(times[("torch fp32", b)]) for b in (1, 8)}
    for n in models:
        tps = {b: b * a.new_tokens / statistics.median(times[(n, b)]) for b in (1, 8)}
        sp = {b: ref[b] / statistics.median(times[(n, b)]) for b in (1, 8)}
        print(f"| {n} | {ev[label[n]][main]:.2f} | {size[n]:.1f} | {lat[label[n]]['median_ms']:.1f} | "
              f"{tps[1]:.0f} | {sp[1]:.2f}x | {tps[8]:.0f} | {sp[8]:.2f}x |")


if __name__ == "__main__":
    main()
