"""gRPC serving (pipelines/grpc_api.py) with a real grpc client on loopback against tiny models: every call answers
what the REST endpoint answers, health checking, reflection, API keys, status codes, concurrency and cancelled
clients; and the Grafana dashboard (deploy/) against the /metrics of a live server."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

grpc = pytest.importorskip("grpc")

from google.protobuf import json_format  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402

from pipelines.proto import inference_pb2 as pb  # noqa: E402
from pipelines.proto import inference_pb2_grpc as pb_grpc  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.test_serve import TEXTS, direct_classify, metric_values, minilm_tokenizer, tiny_classifier, tiny_gpt2, tiny_t5  # noqa: E402

SERVICE = "pipelines.v1.Inference"
Code = grpc.StatusCode


class GrpcServed:
    """A served model with HTTP and gRPC (port 0 each: free ones), as `pipelines serve --grpc-port` starts it."""

    def __init__(self, folder, **settings):
        from pipelines.serve import ServeSettings, create_app, load_served, start_in_thread

        self.model = load_served(folder)
        app = create_app(self.model, ServeSettings(grpc_port=0, **settings))
        self.server, self.thread, port = start_in_thread(app)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        self.target = f"127.0.0.1:{app.state.grpc_port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def metrics(self) -> dict:
        return metric_values(self.http.get("/metrics").text)

    def count(self, call: str, status: str = "OK") -> float:
        return self.metrics().get(("pipelines_requests_total",
                                   frozenset({("endpoint", f"/{SERVICE}/{call}"), ("status", status)})), 0)

    def in_flight(self) -> float:
        return self.metrics()[("pipelines_requests_in_flight", frozenset())]  # (a scrape does not count itself)

    def close(self):
        self.channel.close()
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_grpc():
    started = []

    def _start(folder, **settings):
        started.append(GrpcServed(folder, **settings))
        return started[-1]

    yield _start
    for s in started:
        s.close()


def code_of(call, request, **kw) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=30, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return Code.OK, ""


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def holds(rest, got, where="") -> None:
    """Every key and value of the REST answer is in the gRPC one (floats to 1e-6)."""
    if isinstance(rest, dict):
        for k, v in rest.items():
            assert k in got, f"{where}.{k} missing from the gRPC answer {got}"
            holds(v, got[k], f"{where}.{k}")
    elif isinstance(rest, list):
        assert len(rest) == len(got), where
        for i, (a, b) in enumerate(zip(rest, got)):
            holds(a, b, f"{where}[{i}]")
    elif isinstance(rest, float):
        assert got == pytest.approx(rest, abs=1e-6), where
    else:
        assert got == rest, where


# ---------------------------------------------------------------- tiny models of the other tasks


def _bert_config(**kw):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(minilm_tokenizer()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)


def tiny_tagger(folder: Path) -> Path:
    import torch
    from transformers import BertForTokenClassification

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    torch.manual_seed(0)
    model = BertForTokenClassification(_bert_config(id2label=dict(enumerate(names)),
                                                    label2id={n: i for i, n in enumerate(names)}))
    with torch.no_grad():
        model.classifier.weight.mul_(30)
        model.classifier.bias[0] = -3.0  # fewer O: entities to group
    model.save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return folder


def tiny_tagger_multi(folder: Path) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    names = ["person", "place", "thing"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config(id2label=dict(enumerate(names)), problem_type="multi_label_classification",
                                                       label2id={n: i for i, n in enumerate(names)}))
    with torch.no_grad():
        model.classifier.weight.mul_(30)
    model.save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return folder


def tiny_image_classifier(folder: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         id2label={0: "cat", 1: "dog", 2: "bird"},
                                         label2id={"cat": 0, "dog": 1, "bird": 2})).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def tiny_summariser(folder: Path) -> Path:
    tiny_t5(folder)
    config = json.loads((folder / "config.json").read_text())
    config["task_specific_params"] = {"summarization": {"max_new_tokens": 8}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def png(colour, side: int = 24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = [png((200, 30, 30)), png((20, 200, 90)), png((10, 10, 10), side=40)]

# task -> (tiny model, REST path + JSON, gRPC call + message, a message with a field the task does not take)
CASES = {
    "token-classification": (tiny_tagger, "/predict", {"text": ["Jane Doe flew to Paris", TEXTS[0]]},
                             "Predict", pb.PredictRequest(text=["Jane Doe flew to Paris", TEXTS[0]]),
                             pb.PredictRequest(image=IMAGES[:1])),
    "multi-label-classification": (tiny_tagger_multi, "/predict", {"text": TEXTS}, "Predict",
                                   pb.PredictRequest(text=TEXTS), pb.PredictRequest(text=TEXTS, image=IMAGES[:1])),
    "image-classification": (tiny_image_classifier, "/predict",
                             {"image": [__import__("base64").b64encode(x).decode() for x in IMAGES]},
                             "Predict", pb.PredictRequest(image=IMAGES), pb.PredictRequest(text=["a text"])),
    "causal-lm": (tiny_gpt2, "/generate", {"prompt": TEXTS[1], "max_new_tokens": 5}, "Generate",
                  pb.GenerateRequest(prompt=TEXTS[1], max_new_tokens=5), pb.PredictRequest(text=["a text"])),
    "translation": (tiny_t5, "/translate", {"text": TEXTS, "max_new_tokens": 6}, "Translate",
                    pb.TranslateRequest(text=TEXTS, max_new_tokens=6), pb.SummarizeRequest(text=TEXTS)),
    "summarization": (tiny_summariser, "/summarize", {"text": TEXTS[:2], "max_new_tokens": 4}, "Summarize",
                      pb.SummarizeRequest(text=TEXTS[:2], max_new_tokens=4), pb.TranslateRequest(text=TEXTS)),
}


# ---------------------------------------------------------------- the calls


def test_predict_answers_like_rest_with_info_health_and_reflection(tmp_path, serve_grpc):
    folder = tiny_classifier(tmp_path / "cls")
    s = serve_grpc(folder)
    expected = direct_classify(folder, TEXTS)
    got = s.stub.Predict(pb.PredictRequest(text=TEXTS), timeout=30)
    assert got.model == "cls"
    assert [(p.label, pytest.approx(p.score, abs=1e-4)) for p in got.predictions] == expected
    holds(s.http.post("/predict", json={"text": TEXTS}).json(), as_dict(got))
    assert set(got.predictions[0].scores) == {"negative", "positive"}

    info = s.stub.Info(pb.InfoRequest(), timeout=30)
    assert (info.model, info.task, info.call, info.quantize, info.batching) == ("cls", "classification", "Predict", "none", True)

    checks = health_pb2_grpc.HealthStub(s.channel)
    for name in ("", SERVICE):
        assert checks.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert code_of(checks.Check, health_pb2.HealthCheckRequest(service="nope"))[0] == Code.NOT_FOUND

    services = reflected(s.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {x.name for x in services.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    described = reflected(s.channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
    assert described.file_descriptor_response.file_descriptor_proto  # what grpcurl describes the service from

    assert s.count("Predict") == 1 and s.count("Info") == 0  # Info is not an inference call


def reflected(channel, request, metadata=None):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata)))


@pytest.mark.parametrize("task", list(CASES))
def test_each_task_call_answers_what_its_rest_endpoint_answers(task, tmp_path, serve_grpc):
    make, path, body, call, message, wrong = CASES[task]
    s = serve_grpc(make(tmp_path / "model"))
    assert s.model.task.name == task
    rest = s.http.post(path, json=body)
    assert rest.status_code == 200, rest.text
    got = getattr(s.stub, call)(message, timeout=30)
    holds(rest.json(), as_dict(got))
    assert s.stub.Info(pb.InfoRequest(), timeout=30).call == call

    # a field of another task, and a call of another task
    code, details = code_of(getattr(s.stub, type(wrong).__name__.removesuffix("Request")), wrong)
    assert code == (Code.INVALID_ARGUMENT if type(wrong) is type(message) else Code.UNIMPLEMENTED), details
    other = "Generate" if call != "Generate" else "Predict"
    code, details = code_of(getattr(s.stub, other), getattr(pb, f"{other}Request")())
    assert code == Code.UNIMPLEMENTED and call in details
    assert s.count(call) == 1 and s.count(other, "UNIMPLEMENTED") >= 1

    m = s.metrics()
    tokens = m[("pipelines_generated_tokens_total", frozenset())]
    if call == "Generate":  # counted for REST and gRPC alike: the tokens both answers report
        assert got.completion_tokens >= 1 and tokens == rest.json()["completion_tokens"] + got.completion_tokens
    elif call in ("Translate", "Summarize"):
        assert tokens >= 2 * len(body["text"])
    else:
        assert tokens == 0


def test_bad_requests_get_their_status_codes_and_the_server_keeps_answering(tmp_path, serve_grpc):
    s = serve_grpc(tiny_classifier(tmp_path / "cls"), max_chars=100, max_items=4)
    cases = [
        (pb.PredictRequest(), Code.INVALID_ARGUMENT, "text"),  # no text
        (pb.PredictRequest(text=[""]), Code.INVALID_ARGUMENT, "empty text"),
        (pb.PredictRequest(text=["ok", "  "]), Code.INVALID_ARGUMENT, "empty text"),
        (pb.PredictRequest(image=[png((1, 2, 3))]), Code.INVALID_ARGUMENT, "image"),  # a field of image tasks
        (pb.PredictRequest(text=["x" * 101]), Code.RESOURCE_EXHAUSTED, "limit is 100"),
        (pb.PredictRequest(text=["a"] * 5), Code.RESOURCE_EXHAUSTED, "limit is 4"),
        (pb.PredictRequest(text=["x" * 200_000]), Code.RESOURCE_EXHAUSTED, ""),  # over the message cap: grpc's own refusal
    ]
    for message, want, words in cases:
        code, details = code_of(s.stub.Predict, message)
        assert code == want and words in details, (message.ListFields()[:1], code, details)
    assert code_of(s.stub.Generate, pb.GenerateRequest(prompt="hi"))[0] == Code.UNIMPLEMENTED
    assert s.stub.Predict(pb.PredictRequest(text=["fine"]), timeout=30).predictions[0].label in ("negative", "positive")
    m = s.metrics()
    # the six that reached the service are counted (the over-cap message never did)
    assert s.count("Predict", "INVALID_ARGUMENT") == 4 and s.count("Predict", "RESOURCE_EXHAUSTED") == 2
    assert s.count("Predict") == 1
    assert m[("pipelines_errors_total", frozenset({("endpoint", f"/{SERVICE}/Predict"), ("kind", "client")}))] == 6

    lm = serve_grpc(tiny_gpt2(tmp_path / "gpt2"), max_new_tokens=8)
    for message, want in [(pb.GenerateRequest(), Code.INVALID_ARGUMENT),
                          (pb.GenerateRequest(prompt="hi", max_new_tokens=0), Code.INVALID_ARGUMENT),
                          (pb.GenerateRequest(prompt="hi", max_new_tokens=9), Code.INVALID_ARGUMENT),
                          (pb.GenerateRequest(prompt="x" * 2001), Code.RESOURCE_EXHAUSTED)]:
        assert code_of(lm.stub.Generate, message)[0] == want, message
    assert lm.stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=2), timeout=30).completion_tokens <= 2


@pytest.mark.parametrize("continuous", [False, True], ids=["batched", "continuous"])
def test_generate_stream_sends_generates_text_as_it_is_made(tmp_path, serve_grpc, continuous):
    s = serve_grpc(tiny_gpt2(tmp_path / "gpt2"), max_new_tokens=16, continuous_batching=continuous)
    whole = s.stub.Generate(pb.GenerateRequest(prompt=TEXTS[1], max_new_tokens=12), timeout=30)
    chunks = list(s.stub.GenerateStream(pb.GenerateRequest(prompt=TEXTS[1], max_new_tokens=12), timeout=30))
    *pieces, last = chunks
    assert len(pieces) >= 2 and all(c.text and not c.finish_reason for c in pieces)  # text as it comes, in pieces
    assert "".join(c.text for c in pieces) == whole.completion  # greedy, as Generate
    assert (last.text, last.model, last.completion_tokens) == ("", "gpt2", whole.completion_tokens)
    assert last.finish_reason == ("length" if whole.completion_tokens == 12 else "stop")
    assert s.count("GenerateStream") == 1
    assert s.metrics()[("pipelines_generated_tokens_total", frozenset())] == 2 * whole.completion_tokens

    # refused as Generate is: over the server's max_new_tokens, an empty prompt
    for message in (pb.GenerateRequest(prompt="hi", max_new_tokens=17), pb.GenerateRequest()):
        with pytest.raises(grpc.RpcError) as e:
            list(s.stub.GenerateStream(message, timeout=30))
        assert e.value.code() == Code.INVALID_ARGUMENT
    # a client that goes away after the first chunk: the server goes on answering
    stream = s.stub.GenerateStream(pb.GenerateRequest(prompt=TEXTS[0], max_new_tokens=16), timeout=30)
    assert next(stream).text
    stream.cancel()
    wait_for(lambda: s.in_flight() == 0)
    assert "".join(c.text for c in s.stub.GenerateStream(pb.GenerateRequest(prompt=TEXTS[1], max_new_tokens=12),
                                                         timeout=30)) == whole.completion
    # a model of another task
    cls = serve_grpc(tiny_classifier(tmp_path / "cls"))
    with pytest.raises(grpc.RpcError) as e:
        list(cls.stub.GenerateStream(pb.GenerateRequest(prompt="hi"), timeout=30))
    assert e.value.code() == Code.UNIMPLEMENTED and "Predict" in e.value.details()


def test_api_keys_through_metadata(tmp_path, serve_grpc):
    s = serve_grpc(tiny_classifier(tmp_path / "cls"), api_keys=("key-one", "key-two"))
    message = pb.PredictRequest(text=[TEXTS[0]])
    for metadata in (None, [("authorization", "Bearer nope")], [("authorization", "Basic key-one")],
                     [("authorization", "key-one")], [("authorization", "Bearer")]):
        code, details = code_of(s.stub.Predict, message, metadata=metadata)
        assert code == Code.UNAUTHENTICATED and "API key" in details, metadata
    for key in ("key-one", "key-two"):
        assert s.stub.Predict(message, timeout=30, metadata=[("authorization", f"Bearer {key}")]).predictions
    assert code_of(s.stub.Info, pb.InfoRequest())[0] == Code.UNAUTHENTICATED
    # health stays open (like /health); reflection is keyed (like /docs)
    checks = health_pb2_grpc.HealthStub(s.channel)
    assert checks.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        reflected(s.channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert e.value.code() == Code.UNAUTHENTICATED
    keyed = reflected(s.channel, reflection_pb2.ServerReflectionRequest(list_services=""),
                      metadata=[("authorization", "Bearer key-two")])
    assert SERVICE in {x.name for x in keyed.list_services_response.service}
    assert s.count("Predict", "UNAUTHENTICATED") == 5 and s.count("Predict") == 2
    assert s.http.post("/predict", json={"text": "x"}).status_code == 401  # the same key set as REST


def test_concurrent_calls_are_batched_and_cancelled_clients_do_not_break_the_server(tmp_path, serve_grpc):
    folder = tiny_classifier(tmp_path / "cls")
    expected = direct_classify(folder, TEXTS)
    s = serve_grpc(folder, max_wait_ms=1000, max_batch=16)  # 16 calls fill a batch; fewer wait up to 1 s
    texts = TEXTS * 4  # 16 concurrent calls, each answered with its own text's label
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: s.stub.Predict(pb.PredictRequest(text=[t]), timeout=30), texts))
    for t, a in zip(texts, answers):
        label, score = expected[TEXTS.index(t)]
        assert a.predictions[0].label == label and a.predictions[0].score == pytest.approx(score, abs=1e-4)
    m = s.metrics()
    calls = m[("pipelines_batch_size_count", frozenset())]
    assert m[("pipelines_batch_size_sum", frozenset())] == 16 and calls <= 8, f"16 calls in {calls} model calls"
    assert s.count("Predict") == 16

    # clients that go away while their call waits in the micro-batcher: one cancels, one closes its channel
    gone = grpc.insecure_channel(s.target)
    stub = pb_grpc.InferenceStub(gone)
    pending = [s.stub.Predict.future(pb.PredictRequest(text=[t]), timeout=30) for t in TEXTS[:2]]
    cancelled = [s.stub.Predict.future(pb.PredictRequest(text=[t]), timeout=30) for t in TEXTS[2:]]
    dropped = [stub.Predict.future(pb.PredictRequest(text=[t]), timeout=30) for t in TEXTS]
    wait_for(lambda: s.in_flight() == 8)
    for f in cancelled:
        f.cancel()
    gone.close()
    assert [f.result().predictions[0].label for f in pending] == [label for label, _ in expected[:2]]
    assert all(f.cancelled() for f in cancelled) and {f.code() for f in dropped} == {Code.CANCELLED}
    wait_for(lambda: s.count("Predict", "CANCELLED") == 6)
    assert s.stub.Predict(pb.PredictRequest(text=TEXTS), timeout=30).predictions[3].label == expected[3][0]
    assert s.in_flight() == 0


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "condition not met in time"
        time.sleep(0.01)


# ---------------------------------------------------------------- the dashboard against a live server

DASHBOARD = ROOT / "deploy" / "grafana" / "pipelines-serve.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every scraped sample


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    panels = [p for top in board["panels"] for p in [top, *top.get("panels", [])]]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return queries


def names_and_labels(query: str) -> tuple[set[str], set[str]]:
    """The metric names of a PromQL query and every label it selects, groups or matches on."""
    names = set(re.findall(r"\b((?:pipelines|process)_[a-z_]+)\b", query))
    labels = set()
    for selector in re.findall(r"\{([^}]*)\}", query):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", selector))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", query):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    labels |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", query))
    return names, labels


def test_every_metric_and_label_of_the_dashboard_is_exported(tmp_path, serve_grpc):
    from prometheus_client.parser import text_string_to_metric_families

    s = serve_grpc(tiny_gpt2(tmp_path / "gpt2"))
    traffic(s)

    samples: dict[str, set[str]] = {}  # sample name -> its label names
    for fam in text_string_to_metric_families(s.http.get("/metrics").text):
        for sample in fam.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = set()
    for q in queries:
        names, labels = names_and_labels(q)
        assert names, f"no metric in {q}"
        missing = names - set(samples)
        assert not missing, f"{q}: {missing} not exported"
        have = set().union(*(samples[n] for n in names)) | SCRAPE_LABELS
        assert labels <= have, f"{q}: labels {labels - have} not on {names}"
        used |= names
    for needed in ("pipelines_requests_total", "pipelines_errors_total", "pipelines_request_latency_seconds_bucket",
                   "pipelines_batch_size_bucket", "pipelines_queue_depth", "pipelines_generated_tokens_total",
                   "pipelines_model_info", "pipelines_model_load_seconds"):
        assert needed in used, f"the dashboard does not draw {needed}"
    # the scrape config scrapes what the server serves
    import yaml

    job = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["localhost:8000"]


def traffic(s, seconds: float = 0.0) -> None:
    """REST and gRPC generations, good and bad, for at least `seconds`."""
    t_end = time.time() + seconds
    while True:
        assert s.http.post("/generate", json={"prompt": "hi", "max_new_tokens": 3}).status_code == 200
        assert s.http.post("/generate", json={"prompt": ""}).status_code == 422
        assert s.stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=3), timeout=30).completion
        assert code_of(s.stub.Generate, pb.GenerateRequest())[0] == Code.INVALID_ARGUMENT
        if time.time() >= t_end:
            return
        time.sleep(0.05)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary (.ci/run installs it)")
def test_every_dashboard_query_answers_on_a_real_prometheus(tmp_path, serve_grpc):
    """A real Prometheus scrapes a live server (the shipped scrape config, every 0.5 s) and runs every query of the
    dashboard: each must parse and return data."""
    import yaml

    s = serve_grpc(tiny_gpt2(tmp_path / "gpt2"))
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "500ms"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [s.http.base_url.netloc.decode()]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=10)

    def query(q: str) -> dict:
        try:
            return api.get("/query", params={"query": q}).json()
        except (httpx.TransportError, ValueError):  # not up yet; "Service Unavailable" (text) while it starts
            return {"status": "down"}

    def scrapes() -> float:
        result = (query("sum(count_over_time(pipelines_model_info[1m]))").get("data") or {}).get("result") or []
        return float(result[0]["value"][1]) if result else 0.0

    try:
        deadline = time.time() + 60
        while scrapes() < 4:  # traffic between scrapes, so that every rate has something to show
            traffic(s)
            assert time.time() < deadline, "Prometheus did not scrape the server 4 times in 60 s"
        for q in dashboard_queries():
            q = q.replace("$__rate_interval", "3s").replace("$__range", "1m").replace("$instance", ".*")
            if q.startswith("label_values("):  # a Grafana function: the series it lists
                q = q[len("label_values("):].split(",")[0]
            answer = query(q)
            assert answer["status"] == "success" and answer["data"]["result"], f"{q}: {answer}"
    finally:
        api.close()
        prom.terminate()
        prom.wait(timeout=30)


# ---------------------------------------------------------------- the command line


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serve_grpc_port(tmp_path):
    folder = tiny_classifier(tmp_path / "cls")
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "serve", str(folder), "--port", str(port),
                             "--grpc-port", str(grpc_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=90)
            checks = health_pb2_grpc.HealthStub(channel)
            assert checks.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
            got = pb_grpc.InferenceStub(channel).Predict(pb.PredictRequest(text=[TEXTS[0]]), timeout=30)
            assert got.predictions[0].label == direct_classify(folder, TEXTS[:1])[0][0]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["grpc_port"] == grpc_port
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"grpc://127.0.0.1:{grpc_port}" in out
