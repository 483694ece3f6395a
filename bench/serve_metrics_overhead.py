"""Should prometheus-fastapi-instrumentator replace the hand-written Prometheus middleware of `pipelines serve`?
Per-request cost of each, measured on the real app (pipelines.serve.create_app, a tiny classifier) called
directly as ASGI in one event loop, so that neither network nor client noise hides a few microseconds:

    none          the app with our `Measure` middleware taken out (no request metrics at all)
    ours          the app as served: `Measure` (counts, latency histogram, errors, in-flight, auth, body cap)
    instrumentator  `Measure` taken out, Instrumentator().instrument(app) in its place (its default metrics)

for GET /health (no model work: the middleware is most of the cost) and POST /predict (one text, batching off).
Then it prints which metric names each exports, against what deploy/grafana/pipelines-serve.json needs.

    .venv/bin/pip install prometheus-fastapi-instrumentator==8.1.0   # only for this benchmark
    .venv/bin/python bench/serve_metrics_overhead.py            # ~1 min on a 2-core machine, 1 torch thread
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_app(folder: Path, variant: str):
    from pipelines.serve import ServeSettings, create_app, load_served

    app = create_app(load_served(folder), ServeSettings(batching=False))
    if variant != "ours":  # the middleware stack is built at the first call: drop ours before it
        app.user_middleware = [m for m in app.user_middleware if getattr(m.cls, "__name__", "") != "Measure"]
    if variant == "instrumentator":
        from prometheus_client import CollectorRegistry
        from prometheus_fastapi_instrumentator import Instrumentator

        app.state.instrumentator_registry = registry = CollectorRegistry()
        Instrumentator(registry=registry).instrument(app)
    return app


async def call(app, method: str, path: str, body: bytes = b"") -> int:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 8000)}
    sent = False
    status = 0

    async def receive():
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def rounds(app, method, path, body, n: int) -> float:
    """Seconds per request over n requests."""
    t0 = time.perf_counter()
    for _ in range(n):
        await call(app, method, path, body)
    return (time.perf_counter() - t0) / n


async def exported(app, variant: str) -> set[str]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = app.state.instrumentator_registry if variant == "instrumentator" else app.state.registry
    return {s.name for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}


def dashboard_names() -> set[str]:
    board = json.loads((ROOT / "deploy/grafana/pipelines-serve.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return {n for e in exprs for n in re.findall(r"\b((?:pipelines|process)_[a-z_]+)\b", e)}


VARIANTS = ("none", "ours", "instrumentator")


async def main(n_health: int, n_predict: int, repeats: int) -> None:
    import torch

    from tests.test_serve import tiny_classifier

    torch.set_num_threads(1)
    folder = tiny_classifier(Path(tempfile.mkdtemp()) / "cls")
    body = json.dumps({"text": "a gripping , funny film"}).encode()
    apps = {v: build_app(folder, v) for v in VARIANTS}
    times = {(v, what): [] for v in VARIANTS for what in ("health", "predict")}
    names = {}
    async with contextlib.AsyncExitStack() as stack:
        for v, app in apps.items():
            await stack.enter_async_context(app.router.lifespan_context(app))
            assert await call(app, "GET", "/health") == 200 and await call(app, "POST", "/predict", body) == 200
            await rounds(app, "POST", "/predict", body, 50)  # warm-up: torch's first calls are slower
        for _ in range(repeats):  # interleaved, so that a busy neighbour slows every variant alike
            for v, app in apps.items():
                times[v, "health"].append(await rounds(app, "GET", "/health", b"", n_health))
                times[v, "predict"].append(await rounds(app, "POST", "/predict", body, n_predict))
        for v, app in apps.items():
            names[v] = await exported(app, v)
    us = lambda v, what: statistics.median(times[v, what]) * 1e6  # noqa: E731
    rows = [(v, us(v, "health"), us(v, "predict")) for v in VARIANTS]
    base_h, base_p = rows[0][1], rows[0][2]
    print(f"\nper request, median of {repeats} interleaved rounds ({n_health} GET /health, {n_predict} POST /predict each), 1 torch thread\n")
    print("| metrics middleware | GET /health µs | + over none | POST /predict µs | + over none |")
    print("|---|---:|---:|---:|---:|")
    for variant, h, p in rows:
        print(f"| {variant} | {h:.0f} | {h - base_h:+.0f} | {p:.0f} | {p - base_p:+.0f} |")
    needed = dashboard_names()
    print("\nexported by instrumentator:", sorted(n for n in names["instrumentator"] if not n.startswith("process_")))
    print(f"the dashboard's {len(needed)} metric names: instrumentator exports {len(needed & names['instrumentator'])}; "
          f"missing: {sorted(needed - names['instrumentator'])}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--health", type=int, default=2000)
    ap.add_argument("--predict", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    asyncio.run(main(args.health, args.predict, args.repeats))
