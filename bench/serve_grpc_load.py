"""REST against gRPC on one `pipelines serve --grpc-port` process: requests/s and p50 / p99 at 1, 8 and 32
concurrent clients, each sending one SST-2 validation sentence per request back to back, to the fp32 MiniLM
classifier of bench/serve_load.py (micro-batcher on). Both transports reach the same micro-batcher, so the
difference is the transport: JSON over HTTP/1.1 (httpx) against protobuf over HTTP/2 (grpc.aio, one channel).

    .venv/bin/python bench/serve_grpc_load.py                 # ~40 s on a 2-core machine
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_load import batch_counters, build_models, free_port, load  # noqa: E402


def start_server(folder: Path, threads: int, max_batch: int, max_wait_ms: float):
    import grpc
    import httpx

    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "serve", str(folder), "--port", str(port),
                             "--grpc-port", str(grpc_port), "--threads", str(threads), "--max-batch", str(max_batch),
                             "--max-wait-ms", str(max_wait_ms)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.2)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
    return proc, url, f"127.0.0.1:{grpc_port}"


async def load_grpc(target: str, texts: list[str], clients: int, seconds: float, max_requests: int) -> dict:
    import grpc

    from pipelines.proto import inference_pb2 as pb
    from pipelines.proto import inference_pb2_grpc as pb_grpc

    latencies: list[float] = []
    errors = sent = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for t in texts[:3]:  # warm-up
            await stub.Predict(pb.PredictRequest(text=[t]))
        stop = time.perf_counter() + seconds

        async def client():
            nonlocal errors, sent
            while time.perf_counter() < stop and sent < max_requests:
                text = texts[sent % len(texts)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    await stub.Predict(pb.PredictRequest(text=[text]), timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50": statistics.median(latencies) * 1000,
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.5, help="per cell")
    ap.add_argument("--max-requests", type=int, default=600, help="per cell")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (see bench/serve_load.py)")
    args = ap.parse_args()
    with open(ROOT / "data" / "sst2" / "validation.tsv", encoding="utf-8") as f:
        texts = [row["sentence"] for row in csv.DictReader(f, delimiter="\t")]
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; server threads {args.threads}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_models(Path(tmp))["fp32"]
        proc, url, target = start_server(folder, args.threads, 16, 2.0)
        try:
            for c in [int(x) for x in args.clients.split(",")]:
                for transport in ("REST", "gRPC"):
                    s0, n0 = batch_counters(url)
                    if transport == "REST":
                        r = asyncio.run(load(url, texts, c, args.seconds, args.max_requests))
                    else:
                        r = asyncio.run(load_grpc(target, texts, c, args.seconds, args.max_requests))
                    s1, n1 = batch_counters(url)
                    rows.append({"transport": transport, "clients": c, **r, "batch": (s1 - s0) / max(n1 - n0, 1)})
                    print(f"  {transport:<4} clients={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  "
                          f"p99 {r['p99']:7.1f} ms  batch {rows[-1]['batch']:.1f}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print("\n| transport | clients | requests | req/s | p50 ms | p99 ms | texts per model call | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['transport']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['batch']:.1f} | {r['errors']} |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
