"""Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/step_mfu_by_width.py 256,512,1024 bf16,fp32

One training step (forward, backward, fused AdamW; no Trainer, no clipping) of a 6-layer GPT-2 at each width, on
random tokens, batch 16 x 256, vocabulary 8,000: tokens/s (best of 4 steps after 2 warm-ups) and MFU against the
matmul peak of its precision (pipelines.stages.pretrain.matmul_peak_flops, as the pretrain stage reports it).
Shows how far a model of a given width can get on this CPU, whatever runs the training loop."""
import os
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipelines.stages.pretrain import matmul_peak_flops  # noqa: E402

B, T = 16, 256
widths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "256,512").split(",")]
precisions = (sys.argv[2] if len(sys.argv) > 2 else "bf16,fp32").split(",")
peak = {p: matmul_peak_flops(p) for p in precisions}
print(f"torch threads {torch.get_num_threads()}, peaks " + ", ".join(f"{p} {v / 1e9:,.0f} GFLOP/s" for p, v in peak.items()))
for w in widths:
    for prec in precisions:
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=w, n_layer=6, n_head=max(4, w // 64), n_inner=4 * w, n_positions=T, vocab_size=8000,
                         resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        cfg._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(cfg).train()
        n = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, 8000, (B, T))
        times = []
        for i in range(6):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times.append(time.perf_counter() - t)
        tps = B * T / min(times)
        print(f"width {w} {prec}: {n / 1e6:.1f}M params, {min(times) * 1000:,.0f} ms/step, {tps:,.0f} tok/s, "
              f"MFU {6 * n * tps / peak[prec]:.1%}, load {os.getloadavg()[0]:.1f}", flush=True)
