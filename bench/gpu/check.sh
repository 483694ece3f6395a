#!/usr/bin/env bash
# GPU check (run on a machine with one CUDA GPU, from the repo root; CI never has one).
#  1. one process, bf16 autocast on CUDA
#  2. DeepSpeed ZeRO-2, one rank per GPU, bf16
#  3. DeepSpeed ZeRO-3 (gathered 16-bit save) + LoRA under ZeRO-3
# Each run's model folders are then loaded in a plain process and compared (eval loss) with run 1.
# Prints one table of the stages' metrics. Needs: pipelines' deps + deepspeed importable.
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
R=bench/gpu/recipe.yaml
OUT=${GPU_CHECK_OUT:-/tmp/gpu_check}
NP=${NPROC:-1}
python3 - <<'PY'
import torch, transformers, accelerate, deepspeed, peft, datasets
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
print("transformers", transformers.__version__, "accelerate", accelerate.__version__, "deepspeed", deepspeed.__version__, "peft", peft.__version__, "datasets", datasets.__version__)
PY
RUNS=${RUNS:-single zero2 zero3}
for run in $RUNS; do
  t0=$(date +%s)
  case $run in
    single) timeout 240 python3 -m pipelines run "$R" "output_dir=$OUT/single" "$@" ;;
    *) timeout 240 python3 -m accelerate.commands.launch --config_file "accelerate_configs/deepspeed_$run.yaml" --num_processes "$NP" -m pipelines run "$R" "output_dir=$OUT/$run" "$@" ;;
  esac
  echo "$run rc=$? $(( $(date +%s)-t0 ))s"
done
python3 - "$OUT" <<'PY'
import json, sys, math, pathlib, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = pathlib.Path(sys.argv[1])
text = open("data/tinyshakespeare/validation.txt").read()[:20000]
rows = []
for run in sorted(p.name for p in out.iterdir() if p.is_dir()):
    for stage in ("pretrain", "lora"):
        m = out / run / stage / "manifest.json"
        if not m.exists():
            rows.append((run, stage, "MISSING", "", "", "")); continue
        man = json.loads(m.read_text())
        folder = out / run / stage / man["outputs"]["model"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # a plain process
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(text, return_tensors="pt")["input_ids"][:, : 128 * 8].view(8, 128)
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        mt = man["metrics"]
        rows.append((run, stage, f"{man['seconds']:.0f}s", next((f"{k}={v:.2f}" for k, v in mt.items() if "perplexity" in k and "unigram" not in k and isinstance(v, float)), ""),
                     f"{math.exp(loss):.2f}", f"{mt.get('tokens_per_s', '')}"))
print(f"{'run':<8}{'stage':<10}{'time':>7}  {'stage ppl':>28}  {'reloaded ppl':>12}  tokens/s")
for r in rows:
    print(f"{r[0]:<8}{r[1]:<10}{r[2]:>7}  {str(r[3])[:28]:>28}  {r[4]:>12}  {r[5]}")
PY
