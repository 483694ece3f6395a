"""`pipelines serve`: a trained model behind HTTP, with the endpoint its task calls for.

    pipelines serve runs/quickstart/finetune              # a stage folder (its manifest's "model" output)
    pipelines serve runs/quickstart --stage finetune      # a run directory + a stage name
    pipelines serve path/to/hf_model_folder               # any plain HF folder (config.json + safetensors)

The model's task (pipelines.tasks.of_folder: config.json) gives the endpoint, its request schema, how a
request becomes items, the batched model call and the response (pipelines/tasks/<task>.py):
    classification         POST /predict    {"text": str | [str]}        -> labels (id2label names) + scores
    token-classification   POST /predict    {"text": str | [str]}        -> entities with character spans
    causal-lm              POST /generate   {"prompt": str, "max_new_tokens": n} -> generated text
    translation            POST /translate  {"text": str | [str], "max_new_tokens": n}
    summarization          POST /summarize  {"text": str | [str], "max_new_tokens": n}
    causal-lm, also        GET /v1/models, POST /v1/completions, POST /v1/chat/completions (OpenAI-style,
                           streaming as server-sent events: pipelines/openai_api.py; with --continuous-batching
                           through transformers' continuous batching: pipelines/continuous.py)
    always                 GET /health, GET /metrics (Prometheus text format), GET /docs (OpenAPI)
    --grpc-port N          the same calls over gRPC (pipelines/grpc_api.py, pipelines/proto/inference.proto), with
                           health checking and reflection, on the same micro-batcher and metrics
With API keys (ServeSettings.api_keys: --api-key / $PIPELINES_API_KEYS) every path but /health (and /metrics
unless metrics_open is False) needs `Authorization: Bearer <key>`, else 401.

Concurrent requests are grouped by a small asyncio micro-batcher (max batch, max wait) and run one
batch at a time on a single inference thread: torch already uses every core for one batch, so
running requests side by side would only fight over them. Bad requests (invalid JSON, a missing
field, a wrong type, a text over the length limit) get a 4xx with a JSON `error`, never a 500.

fastapi, uvicorn and prometheus-client are imported only when serving, so `pipelines run` needs none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from types import SimpleNamespace
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from pipelines.errors import PipelinesError

# ---------------------------------------------------------------- which model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelinesError(f"cannot read {path}: {e}") from None


def resolve_model_dir(path: str | Path, stage: str | None = None) -> tuple[Path, dict | None]:
    """A model folder from a model folder, a stage folder (its manifest's "model" output) or a run
    directory plus a stage name. Returns (folder, the stage's manifest or None)."""
    path = Path(path).resolve()
    if not path.exists():
        raise PipelinesError(f"{path}: no such file or directory")
    if stage is not None:
        path = path / stage
        if not (path / "manifest.json").exists():
            raise PipelinesError(f"{path}: no manifest.json: stage {stage!r} has not finished in this run directory")
    if (path / "manifest.json").exists():
        manifest = _read_json(path / "manifest.json")
        outputs = manifest.get("outputs", {})
        key = next((k for k in ("model", "repo") if k in outputs), None)
        if key is None:
            raise PipelinesError(
                f"stage {manifest.get('name')!r} ({manifest.get('type')}) in {path} has no model output "
                f"(outputs: {sorted(outputs) or 'none'})"
            )
        return path / outputs[key], manifest
    if (path / "config.json").exists():
        return path, None
    # a run directory without --stage: offer the finished stages that have a model
    stages = sorted(
        p.parent.name
        for p in path.glob("*/manifest.json")
        if any(k in _read_json(p).get("outputs", {}) for k in ("model", "repo"))
    )
    if stages:
        raise PipelinesError(f"{path} is a run directory: pick the stage to serve with --stage (one of {stages})")
    raise PipelinesError(f"{path}: neither a model folder (config.json), a stage folder (manifest.json) nor a run directory")


# ---------------------------------------------------------------- the model


class ServedModel:
    """Processor + model of one task; `run_batch` takes a batch and runs synchronously (call it from the
    inference thread)."""

    load_seconds: float | None = None  # set by load_served (the pipelines_model_load_seconds metric)

    def __init__(self, folder: str | Path, manifest: dict | None = None, quantize: str = "none", name: str | None = None):
        from transformers import AutoConfig

        from pipelines import tasks

        if quantize not in ("none", "dynamic-int8"):
            raise PipelinesError(f"--quantize {quantize!r}: expected none or dynamic-int8")
        self.folder = Path(folder)
        self.task = tasks.of_folder(self.folder)
        self.name = name or (manifest or {}).get("name") or self.folder.name
        self.quantized = quantize
        self.processor = self.task.load_processor(self.folder)
        self.model = self._load_model()
        if quantize != "none" and self.quantized != quantize:
            raise PipelinesError(f"{self.folder} is already quantized ({self.quantized}); drop --quantize")
        if quantize == "dynamic-int8":
            # int8 weights for every nn.Linear, activations quantized on the fly (CPU inference): the quantize
            # stage's dynamic_int8 recipe, embeddings kept fp32
            from pipelines import modelio

            self.model = modelio.apply_dynamic(self.model, {"embeddings": "keep"})
        self.model.eval()
        self.config = AutoConfig.from_pretrained(self.folder)
        cfg = self.config
        positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        tok_max = getattr(self.processor, "model_max_length", None)
        tok_max = tok_max if tok_max and tok_max < 1_000_000 else None
        self.max_length = min(x for x in (positions, tok_max, 4096) if x)
        self.task.serve_setup(self)

    def _load_model(self):
        from pipelines import modelio, runtimes

        exported = runtimes.read_export(self.folder)
        if exported is not None:  # the export stage's output (export.json): ONNX Runtime / OpenVINO
            self.quantized = exported["format"]
            return runtimes.load(self.folder)
        recipe = modelio.read_recipe(self.folder)
        if recipe is not None:  # the quantize stage's output (quantization.json)
            self.quantized = recipe.get("method", "quantized")
            return modelio.load_quantized(self.folder)
        try:
            return self.task.auto_class().from_pretrained(self.folder, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise PipelinesError(f"cannot load the model in {self.folder}: {e}") from None

    def run_batch(self, key: tuple, items: list) -> list[dict]:
        """One model call for a group of requests that share `key` (the task's parameters, or an OpenAI-style
        request's sampling parameters)."""
        from pipelines import openai_api

        if key and key[0] == openai_api.KIND:
            return openai_api.complete(self, key, items)
        if key and key[0] == openai_api.STREAM:  # streamed requests: each row's text sent as it is made
            return openai_api.stream_batch(self, key, items)
        return self.task.serve_batch(self, key, items)


def load_served(path: str | Path, stage: str | None = None, quantize: str = "none") -> ServedModel:
    """resolve_model_dir + ServedModel, timed (reading and building the model; not the imports before it)."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    t0 = time.perf_counter()
    folder, manifest = resolve_model_dir(path, stage)
    model = ServedModel(folder, manifest, quantize=quantize)
    model.load_seconds = time.perf_counter() - t0
    return model


# ---------------------------------------------------------------- the micro-batcher


class MicroBatcher:
    """Collects concurrent requests into one model call: after the first request arrives it waits at
    most `max_wait_s` for more, up to `max_batch` texts, then runs them on the inference thread.
    Requests whose parameters differ (e.g. max_new_tokens) go into separate calls."""

    def __init__(self, fn, executor: ThreadPoolExecutor, max_batch: int, max_wait_s: float, on_batch=None):
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def submit(self, key: tuple, texts: list[str]) -> list[dict]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((key, texts, fut))
        return await fut

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            size = len(batch[0][1])
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                size += len(item[1])
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(item[0], []).append(item)
            for key, items in groups.items():
                texts = [t for _, ts, _ in items for t in ts]
                self.on_batch(len(texts))
                try:
                    results = await loop.run_in_executor(self.executor, self.fn, key, texts)
                except Exception as e:  # delivered to each waiting request, the worker keeps going
                    for _, _, fut in items:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                i = 0
                for _, ts, fut in items:
                    if not fut.done():
                        fut.set_result(results[i : i + len(ts)])
                    i += len(ts)


# ---------------------------------------------------------------- the app


@dataclass
class ServeSettings:
    batching: bool = True
    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_chars: int = 2000  # per text
    max_items: int = 64  # texts (images) per request
    max_image_bytes: int = 10_000_000  # per image
    max_new_tokens: int = 256  # upper bound a client may ask for
    default_new_tokens: int = 32
    threads: int | None = None  # torch intra-op threads (None: torch's default, one per core)
    api_keys: tuple[str, ...] = ()  # when given, every endpoint but /health needs `Authorization: Bearer <key>`
    metrics_open: bool = True  # with api_keys: /metrics stays open (a Prometheus scraper) unless False
    grpc_port: int | None = None  # also serve gRPC (pipelines/grpc_api.py) on this port (0: any free one)
    grpc_host: str = "127.0.0.1"
    continuous_batching: bool = False  # causal LMs: transformers' continuous batching (pipelines/continuous.py)

    def limits(self):
        from pipelines.tasks import ServeLimits

        return ServeLimits(self.max_chars, self.max_items, self.max_new_tokens, self.default_new_tokens,
                           self.max_image_bytes)


API_KEYS_ENV = "PIPELINES_API_KEYS"  # comma-separated keys, for those who keep them out of the command line


def api_keys(given: list[str] | None = None, env: dict | None = None) -> tuple[str, ...]:
    """The keys `serve` accepts: --api-key values plus $PIPELINES_API_KEYS (comma-separated); blanks dropped."""
    env = os.environ if env is None else env
    keys = [k.strip() for k in (given or [])] + [k.strip() for k in env.get(API_KEYS_ENV, "").split(",")]
    return tuple(dict.fromkeys(k for k in keys if k))


def exposure_warning(host: str, settings: ServeSettings) -> str | None:
    """A warning for a server reachable from other machines with no key."""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if not loopback and not settings.api_keys:
        return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
                f"(--api-key KEY or ${API_KEYS_ENV})")
    return None


def _authorized(headers: dict, keys: tuple[str, ...]) -> bool:
    return authorized(headers.get(b"authorization", b"").decode("latin-1"), keys)


def authorized(value: str, keys: tuple[str, ...]) -> bool:
    """An `Authorization` value (HTTP header, gRPC metadata) `Bearer <key>` against every key in constant time
    (no early exit on the first match)."""
    import hmac

    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    token_b = token.strip().encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token_b, key.encode())
    return ok


def create_app(model: ServedModel, settings: ServeSettings | None = None):
    """The FastAPI app for `model`: the task's endpoint, /health and /metrics."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pipelines.serve_metrics import ServeMetrics
    from pipelines.tasks import RequestError

    s = settings or ServeSettings()
    task, limits = model.task, s.limits()
    endpoint = task.endpoint
    known = {endpoint, "/health", "/metrics"}

    # -- one model call at a time on the inference thread; metrics shared by HTTP and gRPC (pipelines/serve_metrics.py)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")

    def run_batch(key: tuple, items: list) -> list[dict]:
        t0 = time.perf_counter()
        out = model.run_batch(key, items)
        metrics.batch(len(items), time.perf_counter() - t0, out)
        return out

    batcher = MicroBatcher(run_batch, executor, s.max_batch, s.max_wait_ms / 1000)
    metrics = ServeMetrics(model, s, queue_depth=lambda: batcher.queue.qsize() if batcher.queue else 0)
    in_flight = metrics.in_flight

    async def run_items(key: tuple, items: list) -> list[dict]:
        """The task's items through the micro-batcher (or one model call each): what every transport calls."""
        if s.batching:
            return await batcher.submit(key, items)
        return await asyncio.get_running_loop().run_in_executor(executor, run_batch, key, items)

    from pipelines import openai_api

    generation = None  # how a causal LM's OpenAI-style requests (and gRPC GenerateStream) are run
    if s.continuous_batching:
        from pipelines.continuous import Continuous

        generation = Continuous(model, s, run_items, metrics)  # refuses, before the server starts, what it can't serve
    elif task.openai_compatible:
        generation = openai_api.Batched(run_items)

    async def lifespan(app):
        if s.batching:
            batcher.start()
        grpc_server = None
        if s.grpc_port is not None:  # on this event loop, so that gRPC requests share the micro-batcher
            from pipelines import grpc_api

            grpc_server = await grpc_api.start(model, s, run_items, metrics, generation)
            app.state.grpc_port = grpc_server.port
        yield
        if grpc_server is not None:
            await grpc_server.stop()
        await batcher.stop()
        if generation is not None:
            generation.stop()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"pipelines serve: {model.name}", lifespan=lifespan)
    limit = limits.body_bytes(task.inputs)  # body cap in bytes
    app.state.model, app.state.settings, app.state.registry, app.state.metrics = model, s, metrics.registry, metrics
    app.state.generation = generation

    def error(status: int, message: str, detail: Any = None, path: str = "", headers: dict | None = None) -> JSONResponse:
        """Our JSON error: {"error": message, "detail"}; under /v1/ OpenAI's shape, which its clients read."""
        if path.startswith("/v1/"):
            body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                              "param": None, "code": status}}
        else:
            body = {"error": message}
        if detail is not None:
            body["detail"] = detail
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs, path = exc.errors(), request.url.path
        if any(e.get("type") == "json_invalid" for e in errs):
            return error(400, "invalid JSON body", [{"msg": e.get("msg"), "ctx": str(e.get("ctx", ""))} for e in errs], path)
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": e.get("msg"), "type": e.get("type")} for e in errs]
        first = ".".join(detail[0]["loc"][1:]) or "body"
        return error(422, f"invalid request: {first}: {detail[0]['msg']}", detail, path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), path=request.url.path)

    class Measure:
        """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): counts, times and labels every
        request, and turns any unexpected error into a JSON 500, so the server never dies on a request."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            path = scope["path"] if scope["path"] in known else "other"
            status, started, seen = 500, False, 0
            t0 = time.perf_counter()

            async def send_(message):
                nonlocal status, started
                if message["type"] == "http.response.start":
                    status, started = message["status"], True
                await send(message)

            async def receive_():  # a chunked body has no Content-Length: count what arrives
                nonlocal seen
                message = await receive()
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body over the limit of {limit} bytes")
                return message

            counted = path != "/metrics"  # a scrape is not load: it would always read itself as one in flight
            if counted:
                in_flight.inc()
            try:
                headers = dict(scope["headers"])
                length = headers.get(b"content-length", b"0")
                if s.api_keys and scope["path"] not in open_paths and not _authorized(headers, s.api_keys):
                    await error(401, "missing or invalid API key: send `Authorization: Bearer <key>`", path=scope["path"],
                                headers={"WWW-Authenticate": "Bearer"})(scope, receive, send_)
                elif length.isdigit() and int(length) > limit:
                    await error(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes "
                                     "(serve --max-chars / --max-items)", path=scope["path"])(scope, receive, send_)
                else:
                    await self.app(scope, receive_, send_)
            except Exception as e:  # never let a request take the server down
                if not started:
                    await error(500, f"internal error: {type(e).__name__}: {e}")(scope, receive, send_)
            finally:
                if counted:
                    in_flight.dec()
                metrics.request(path, str(status), time.perf_counter() - t0,
                                None if status < 400 else "client" if status < 500 else "server")

    open_paths = {"/health"} | ({"/metrics"} if s.metrics_open else set())
    app.add_middleware(Measure)

    async def infer(key: tuple, items: list, path: str = ""):
        try:
            return await run_items(key, items)
        except Exception as e:
            return error(500, f"inference failed: {type(e).__name__}: {e}", path=path)

    async def handle(req):
        try:
            key, items = task.serve_items(req, limits)
        except RequestError as e:
            return error(e.status, str(e))
        out = await infer(key, items)
        return out if isinstance(out, JSONResponse) else task.serve_response(model, out)

    if task.upload_field is None:
        handle.__annotations__ = {"req": task.Request}  # the task's request schema (validation, OpenAPI)
        app.post(endpoint, summary=f"{task.name}: {task.description}")(handle)
    else:
        from pydantic import ValidationError

        async def handle_any(request: Request):
            """JSON (the task's schema), multipart/form-data files, or the raw bytes of one file."""
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind == "multipart/form-data":
                try:
                    form = await request.form()
                except Exception as e:  # a malformed multipart body
                    return error(400, f"invalid multipart body: {e}")
                files = [await f.read() for f in form.getlist(task.upload_field) if hasattr(f, "read")]
                if not files:
                    return error(422, f"multipart body without a `{task.upload_field}` file")
                req = SimpleNamespace(**{task.upload_field: files})
            elif kind.startswith(("image/", "application/octet-stream")):
                req = SimpleNamespace(**{task.upload_field: [await request.body()]})
            else:
                try:
                    req = task.Request.model_validate_json(await request.body())
                except ValidationError as e:
                    raise RequestValidationError(e.errors()) from None
            return await handle(req)

        handle_any.__annotations__ = {"request": Request}  # (a local name: FastAPI cannot resolve the string)
        schema = {"schema": task.Request.model_json_schema()}
        upload = {"schema": {"type": "object", "properties": {task.upload_field: {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}}
        app.post(endpoint, summary=f"{task.name}: {task.description}", openapi_extra={"requestBody": {
            "content": {"application/json": schema, "multipart/form-data": upload}, "required": True}})(handle_any)

    if generation is not None:
        known.update(openai_api.add_routes(app, model, limits, error, generation))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.name, "task": task.name, "endpoint": endpoint,
                "quantize": model.quantized, "batching": s.batching,
                "continuous_batching": s.continuous_batching, "grpc_port": getattr(app.state, "grpc_port", None)}

    @app.get("/metrics")
    async def prometheus():
        body, kind = metrics.exposition()
        return Response(body, media_type=kind)

    return app


# ---------------------------------------------------------------- running it


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run uvicorn in a daemon thread (tests, benchmarks). Returns (server, thread, port);
    stop with `server.should_exit = True; thread.join()`."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, bound


def serve(path: str | Path, stage: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          quantize: str = "none", settings: ServeSettings | None = None) -> None:
    """`pipelines serve`: load, then run uvicorn in the foreground until Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn

        s = settings or ServeSettings()
        if s.grpc_port is not None:
            import grpc  # noqa: F401
            import grpc_health  # noqa: F401
            import grpc_reflection  # noqa: F401
    except ImportError as e:
        raise PipelinesError(f"`pipelines serve` needs the serve extra: pip install 'pipelines[serve]' ({e})") from None
    s = dataclasses.replace(s, grpc_host=host)  # gRPC listens where HTTP does
    if s.threads:
        import torch

        # on a busy machine fewer threads can be much faster: a parallel op waits for its slowest thread
        torch.set_num_threads(s.threads)
    model = load_served(path, stage, quantize=quantize)
    keys = (f"{len(s.api_keys)} API key(s), /metrics {'open' if s.metrics_open else 'keyed'}" if s.api_keys
            else "no API key")  # how many, never which
    print(
        f"serving {model.name} ({model.task.name}) from {model.folder} on http://{host}:{port}{model.task.endpoint}"
        + (f" and grpc://{host}:{s.grpc_port} (pipelines.v1.Inference)" if s.grpc_port is not None else "")
        + f"  [batching={'on' if s.batching else 'off'}, max_batch={s.max_batch}, quantize={model.quantized}, "
        f"threads={s.threads or 'default'}, {keys}]",
        flush=True,
    )
    warning = exposure_warning(host, s)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # gRPC's asyncio server shares uvicorn's event loop: the standard asyncio loop, which grpc.aio supports (not uvloop)
    loop = "asyncio" if s.grpc_port is not None else "auto"
    uvicorn.run(create_app(model, s), host=host, port=port, log_level="info", loop=loop)
