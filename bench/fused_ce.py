"""Liger-style fused linear + cross-entropy on this CPU: does it pay for the pretrain stage's LM head?

Run: OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/fused_ce.py [--steps 20]

The head of bench/pretrain_throughput.py's GPT-2: 16 x 256 = 4,096 token states of width 256, an 8,000-way tied
output matrix, bf16 autocast as the stage trains. One step = loss forward + backward to the states and the matrix.
Variants, each in its own process (so each one's peak memory is its own):

  (p) plain: logits = h @ W.T under autocast, F.cross_entropy(logits.float()) (what transformers' GPT-2 does)
  (f) fused, chunked (what Liger's FusedLinearCrossEntropy does in Triton, here in plain torch): per chunk of rows,
      the logits, their log-softmax, the loss and the gradients of h and W are computed in the forward pass and the
      chunk's logits dropped, so the 4,096 x 8,000 logits (and their gradient) never exist at once
  (c) plain under torch.compile (cut-cross-entropy's CPU path, `impl="torch_compile"`: its CCE kernel and all of
      liger-kernel are Triton, GPU only)

Columns: ms per step (median), peak RSS above the process's RSS after building the inputs, and the loss and gradient
differences against (p) (bf16 matmuls: agreement to ~1e-3 relative is expected).

Then the same inside the whole model's step (forward + backward of the 6-layer, 256-wide GPT-2 on a batch of 16 x 256
random tokens, bf16 autocast, no optimizer): (P) `model(input_ids, labels)` as the Trainer calls it; (F) the body
(`model.transformer`) and the fused loss on its states; (C) the body and the compiled head + loss; (L) the model with
its `loss_function` compiled (the head's matmul stays in the model's forward).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

N, D, V, CHUNK = 16 * 256, 256, 8000, 1024


def inputs(torch):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y


def plain_loss(torch, h, w, y):
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h @ w.T
    return F.cross_entropy(logits.float(), y)


def fused_function(torch):
    class FusedLinearCE(torch.autograd.Function):
        """Mean cross-entropy of (h @ w.T, y), chunk by chunk; the gradients are made in forward."""

        @staticmethod
        def forward(ctx, h, w, y):
            grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
            total = h.new_zeros(())
            for start in range(0, h.shape[0], CHUNK):
                hc, yc = h[start:start + CHUNK], y[start:start + CHUNK]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = hc @ w.T
                logp = torch.log_softmax(logits.float(), dim=-1)
                total += -logp.gather(1, yc[:, None]).sum()
                g = logp.exp_()  # softmax, in place: d loss / d logits = softmax - onehot
                g[torch.arange(len(yc)), yc] -= 1
                g = g.to(torch.bfloat16)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    grad_h[start:start + CHUNK] = g @ w
                    grad_w += (g.T @ hc).float()
            n = h.shape[0]
            ctx.save_for_backward(grad_h / n, grad_w / n)
            return total / n

        @staticmethod
        def backward(ctx, grad_out):
            grad_h, grad_w = ctx.saved_tensors
            return grad_h * grad_out, grad_w * grad_out, None

    return FusedLinearCE.apply


def one(variant: str, steps: int) -> dict:
    import torch

    h, w, y = inputs(torch)
    if variant == "p":
        fn = lambda: plain_loss(torch, h, w, y)  # noqa: E731
    elif variant == "f":
        apply = fused_function(torch)
        fn = lambda: apply(h, w, y)  # noqa: E731
    else:
        compiled = torch.compile(lambda h, w, y: plain_loss(torch, h, w, y))
        fn = lambda: compiled(h, w, y)  # noqa: E731
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, t_first = [], None
    for i in range(steps + 1):
        h.grad = w.grad = None
        t = time.perf_counter()
        loss = fn()
        loss.backward()
        dt = time.perf_counter() - t
        if i == 0:
            t_first = dt
        else:
            times.append(dt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"loss": loss.detach(), "h": h.grad, "w": w.grad}, f"/tmp/fused_ce_{variant}.pt")
    return {"ms": statistics.median(times) * 1e3, "first_s": t_first, "peak_mib": (peak - base) / 1024}


def model_step(variant: str, steps: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=6, n_head=8, n_positions=256, n_inner=1024))
    model.train()
    model.loss_type = "ForCausalLM"
    ids = torch.randint(0, V, (16, 256), generator=torch.Generator().manual_seed(1))
    if variant == "L":
        from transformers.loss.loss_utils import ForCausalLMLoss

        compiled_loss = torch.compile(ForCausalLMLoss)
        type(model).loss_function = property(lambda self: compiled_loss)
    head = fused_function(torch) if variant == "F" else torch.compile(lambda h, w, y: plain_loss(torch, h, w, y))

    def loss():
        if variant in ("P", "L"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(input_ids=ids, labels=ids).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.transformer(input_ids=ids).last_hidden_state
        return head(h[:, :-1].reshape(-1, D).float(), model.lm_head.weight, ids[:, 1:].reshape(-1))

    times = []
    for _ in range(steps + 1):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        value = loss()
        value.backward()
        times.append(time.perf_counter() - t)
    return {"ms": statistics.median(times[1:]) * 1e3, "first_s": times[0], "loss": float(value)}


def _sub(key: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--variant", key, "--steps", str(steps)], capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{key} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[7:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        r = one(a.variant, a.steps) if a.variant.islower() else model_step(a.variant, max(4, a.steps // 3))
        print("RESULT " + json.dumps(r), flush=True)
        return
    import torch

    names = {"p": "(p) plain: logits, then F.cross_entropy", "f": f"(f) fused, chunked ({CHUNK} rows)",
             "c": "(c) plain under torch.compile"}
    got = {key: _sub(key, a.steps) for key in names}
    ref = torch.load("/tmp/fused_ce_p.pt")
    logits_mib = N * V * 4 / 2**20
    print(f"\n{N:,} states x width {D} -> {V:,} classes (fp32 logits alone: {logits_mib:.0f} MiB), bf16 autocast, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {a.steps} steps\n")
    print("| variant | ms / step | vs (p) | first step s | peak RSS over inputs MiB | loss diff | grad h max rel diff | grad W max rel diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in got.items():
        o = torch.load(f"/tmp/fused_ce_{key}.pt")
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
        print(f"| {names[key]} | {r['ms']:.1f} | {got['p']['ms'] / r['ms']:.2f}x | {r['first_s']:.2f} | {r['peak_mib']:.0f} | "
              f"{abs(float(o['loss'] - ref['loss'])):.1e} | {rel(o['h'], ref['h']):.1e} | {rel(o['w'], ref['w']):.1e} |")

    steps = {"P": "(P) model(input_ids, labels), as the Trainer calls it", "F": "(F) body + fused, chunked loss",
             "C": "(C) body + compiled head and loss", "L": "(L) model with its loss_function compiled"}
    model_got = {key: _sub(key, a.steps) for key in steps}
    print(f"\nthe whole GPT-2 step (6 x {D}, batch 16 x 256, forward + backward), median of {max(4, a.steps // 3)} steps\n")
    print("| variant | ms / step | vs (P) | first step s | loss |")
    print("|---|---:|---:|---:|---:|")
    for key, r in model_got.items():
        print(f"| {steps[key]} | {r['ms']:.0f} | {model_got['P']['ms'] / r['ms']:.2f}x | {r['first_s']:.2f} | {r['loss']:.5f} |")


if __name__ == "__main__":
    main()
