"""The Prometheus metrics of `pipelines serve`, one set per app, shared by its HTTP and gRPC transports.

    pipelines_requests_total{endpoint, status}         requests; HTTP: the path and status code, gRPC: the full
                                                       method name (/pipelines.v1.Inference/Predict) and code name (OK,
                                                       INVALID_ARGUMENT, ...)
    pipelines_errors_total{endpoint, kind}             failed requests, kind = client | server
    pipelines_request_latency_seconds{endpoint}        histogram, request in -> answer out
    pipelines_requests_in_flight                       requests being served (both transports)
    pipelines_queue_depth                              requests waiting in the micro-batcher for a model call
    pipelines_batch_size                               histogram, items (texts, images, prompts) per model call
    pipelines_batch_seconds                            histogram, seconds per model call
    pipelines_generated_tokens_total                   new tokens generated (causal LM, seq2seq, OpenAI routes)
    pipelines_model_info{name, task, path, quantize, batching, max_batch, grpc}
    pipelines_model_load_seconds                       time to load the model (when the server loaded it)
    process_*                                          the server process: CPU seconds, resident memory, start time

deploy/grafana/pipelines-serve.json draws them; tests/test_serve_grpc.py checks that every name and label its
queries use is exported. A registry per app, so several apps (tests, benchmarks) never share counters.
"""

from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self, model, settings, queue_depth=lambda: 0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

        self.registry = r = CollectorRegistry()
        self.requests = Counter("pipelines_requests", "Requests by endpoint and status (HTTP code or gRPC code name)",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("pipelines_errors", "Failed requests by endpoint and kind (client / server)",
                              ["endpoint", "kind"], registry=r)
        self.latency = Histogram("pipelines_request_latency_seconds", "Request latency in seconds", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("pipelines_requests_in_flight", "Requests being served", registry=r)
        Gauge("pipelines_queue_depth", "Requests waiting in the micro-batcher for a model call",
              registry=r).set_function(queue_depth)
        self.batch_size = Histogram("pipelines_batch_size", "Items (texts, images, prompts) per model call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("pipelines_batch_seconds", "Seconds per model call", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.tokens = Counter("pipelines_generated_tokens", "New tokens generated", registry=r)
        Info("pipelines_model", "The served model", registry=r).info(
            {"name": str(model.name), "task": model.task.name, "path": str(model.folder), "quantize": model.quantized,
             "batching": str(settings.batching), "max_batch": str(settings.max_batch),
             "grpc": "off" if settings.grpc_port is None else "on"}
        )
        load_seconds = getattr(model, "load_seconds", None)
        if load_seconds is not None:
            Gauge("pipelines_model_load_seconds", "Seconds it took to load the model", registry=r).set(load_seconds)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ... (Linux)

    def request(self, endpoint: str, status: str, seconds: float, error: str | None = None) -> None:
        """One answered request; `error` is "client" or "server" for a failed one."""
        self.latency.labels(endpoint).observe(seconds)
        self.requests.labels(endpoint, status).inc()
        if error:
            self.errors.labels(endpoint, error).inc()

    def batch(self, items: int, seconds: float, outputs: list) -> None:
        """One model call: its size, its time, and the tokens it generated (outputs' `completion_tokens`)."""
        self.batch_size.observe(items)
        self.batch_seconds.observe(seconds)
        self.count_tokens(sum(o.get("completion_tokens", 0) for o in outputs if isinstance(o, dict)))

    def count_tokens(self, n: int) -> None:
        if n:
            self.tokens.inc(n)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
