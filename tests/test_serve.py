"""`pipelines serve`: real HTTP on loopback against tiny models, compared with the models called directly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipelines import tasks
from pipelines.errors import PipelinesError

TEXTS = ["a gripping , funny film", "dull and far too long", "ok", "the cast is great but the plot is thin and slow"]


# ---------------------------------------------------------------- tiny models (also used by the publish / report tests)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from tests.tiny_models import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


def tiny_classifier(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT classifier with named labels and a real (MiniLM) tokenizer, saved as safetensors."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = minilm_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # spread the logits and centre them, so that TEXTS get both labels
        model.classifier.weight.mul_(50)
        logits = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in TEXTS])
        margin = logits[:, 1] - logits[:, 0]
        model.classifier.bias[1] -= margin.median() + 1e-3 * (margin.max() - margin.min())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    # initializer_range 0.2: a random model whose greedy output depends on the prompt
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64, initializer_range=0.2,
                               bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.sep_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- helpers


class Served:
    def __init__(self, folder, **settings):
        from pipelines.serve import ServedModel, ServeSettings, create_app, start_in_thread

        quantize = settings.pop("quantize", "none")
        self.model = ServedModel(folder, quantize=quantize)
        self.server, self.thread, port = start_in_thread(create_app(self.model, ServeSettings(**settings)))
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def close(self):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve_folder():
    started = []

    def _start(folder, **settings):
        s = Served(folder, **settings)
        started.append(s)
        return s

    yield _start
    for s in started:
        s.close()


def metric_values(text: str) -> dict:
    """{(name, frozenset(labels)): value} from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def direct_classify(folder, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    for t in texts:  # one at a time: no padding involved
        with torch.no_grad():
            p = model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0]
        out.append((model.config.id2label[int(p.argmax())], float(p.max())))
    return out


# ---------------------------------------------------------------- classification


def test_classifier_answers_like_the_model_called_directly(tmp_path, serve_folder):
    folder = tiny_classifier(tmp_path / "cls")
    expected = direct_classify(folder, TEXTS)
    assert len({label for label, _ in expected}) == 2, "test model should predict both labels"
    s = serve_folder(folder, max_wait_ms=20)

    one = s.client.post("/predict", json={"text": TEXTS[0]})
    assert one.status_code == 200
    body = one.json()
    assert body["predictions"][0]["label"] == expected[0][0]
    assert body["predictions"][0]["score"] == pytest.approx(expected[0][1], abs=1e-5)
    assert set(body["predictions"][0]["scores"]) == {"negative", "positive"}

    many = s.client.post("/predict", json={"text": TEXTS}).json()["predictions"]
    assert [(p["label"], pytest.approx(p["score"], abs=1e-4)) for p in many] == expected

    # concurrent clients: the micro-batcher pads them together; answers stay per-request and equal
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda t: s.client.post("/predict", json={"text": t}).json(), TEXTS * 4))
    for t, a in zip(TEXTS * 4, answers):
        label, score = expected[TEXTS.index(t)]
        assert a["predictions"][0]["label"] == label
        assert a["predictions"][0]["score"] == pytest.approx(score, abs=1e-4)

    m = metric_values(s.client.get("/metrics").text)
    assert m[("pipelines_requests_total", frozenset({("endpoint", "/predict"), ("status", "200")}))] == 18
    assert m[("pipelines_batch_size_sum", frozenset())] == 1 + len(TEXTS) + 16  # every text went through a batch
    assert m[("pipelines_batch_size_count", frozenset())] <= 18
    info = [k for k in m if k[0] == "pipelines_model_info"][0]
    assert ("task", "classification") in info[1] and ("name", "cls") in info[1]
    assert s.client.get("/health").json()["task"] == "classification"


def test_bad_requests_get_4xx_json_and_are_counted(tmp_path, serve_folder):
    s = serve_folder(tiny_classifier(tmp_path / "cls"), max_chars=100, max_items=4)
    raw = {"content-type": "application/json"}
    cases = [
        (s.client.post("/predict", content=b'{"text": "unterminated', headers=raw), 400),  # invalid JSON
        (s.client.post("/predict", json={"txt": "typo"}), 422),  # missing field (+ unknown one)
        (s.client.post("/predict", json={"text": 5}), 422),  # wrong type
        (s.client.post("/predict", json={"text": ["ok", 3]}), 422),
        (s.client.post("/predict", json=["text"]), 422),  # not an object
        (s.client.post("/predict", json={"text": "x" * 101}), 413),  # over the length limit
        (s.client.post("/predict", json={"text": ["a"] * 5}), 413),  # too many texts
        (s.client.post("/predict", json={"text": []}), 422),
        (s.client.post("/predict", json={"text": "   "}), 422),
        (s.client.post("/predict", json={"text": "ok", "max_new_tokens": 3}), 422),
        (s.client.post("/predict", content=b"x" * 2_000_000, headers=raw), 413),  # body over the size limit
        (s.client.post("/predict", content=(b"x" * 100_000 for _ in range(3)), headers=raw), 413),  # chunked, no length
        (s.client.post("/generate", json={"prompt": "hi"}), 404),  # not this model's task
        (s.client.get("/predict"), 405),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        assert isinstance(resp.json()["error"], str) and resp.json()["error"]
    assert "limit is 100" in cases[5][0].json()["error"]
    assert "invalid JSON" in cases[0][0].json()["error"]
    # the server is alive and still right
    assert s.client.get("/health").status_code == 200
    assert s.client.post("/predict", json={"text": "fine"}).status_code == 200
    m = metric_values(s.client.get("/metrics").text)
    count = lambda status, ep="/predict": m.get(("pipelines_requests_total", frozenset({("endpoint", ep), ("status", status)})), 0)
    assert count("400") == 1 and count("422") == 7 and count("413") == 4 and count("405") == 1 and count("200") == 1
    assert count("404", "other") == 1
    assert m[("pipelines_errors_total", frozenset({("endpoint", "/predict"), ("kind", "client")}))] == 13
    assert not any(k[0] == "pipelines_errors_total" and ("kind", "server") in k[1] for k in m)


def test_batching_off_and_dynamic_int8_serve_the_same_labels(tmp_path, serve_folder):
    folder = tiny_classifier(tmp_path / "cls")
    expected = [label for label, _ in direct_classify(folder, TEXTS)]
    plain = serve_folder(folder, batching=False)
    assert [p["label"] for p in plain.client.post("/predict", json={"text": TEXTS}).json()["predictions"]] == expected
    q = serve_folder(folder, quantize="dynamic-int8")
    assert q.client.get("/health").json()["quantize"] == "dynamic-int8"
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in q.model.model.modules()}
    assert "torch.ao.nn.quantized.dynamic.modules.linear.Linear" in kinds  # int8 Linear layers (the stage's recipe)
    assert "torch.nn.modules.linear.Linear" not in kinds and "torch.nn.modules.sparse.Embedding" in kinds  # embeddings fp32
    scores = q.client.post("/predict", json={"text": TEXTS}).json()["predictions"]
    assert all(0 <= p["score"] <= 1 for p in scores)


@pytest.mark.parametrize("method", ["dynamic_int8", "torchao_int8"])
def test_quantize_stage_folder_is_served_through_load_quantized(tmp_path, serve_folder, method):
    import torch

    from pipelines import modelio
    from pipelines.stages.quantize import QuantizeConfig, quantize_and_save

    src = tiny_classifier(tmp_path / "cls")
    out = tmp_path / "quantized"
    quantize_and_save(QuantizeConfig(method=method), src, out, tasks.get("classification"))
    minilm_tokenizer().save_pretrained(out)
    direct = modelio.load_quantized(out)
    tok = minilm_tokenizer()
    with torch.no_grad():
        want = [direct.config.id2label[int(direct(**tok(t, return_tensors="pt")).logits.argmax())] for t in TEXTS]
    s = serve_folder(out)
    assert s.client.get("/health").json()["quantize"] == method
    got = [p["label"] for p in s.client.post("/predict", json={"text": TEXTS}).json()["predictions"]]
    assert got == want


# ---------------------------------------------------------------- generation and translation


def test_generation_matches_greedy_generate(tmp_path, serve_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_gpt2(tmp_path / "gpt2")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = {}
    for p in TEXTS[:3]:
        enc = tok(p, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        want[p] = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(set(want.values())) == 3
    s = serve_folder(folder, max_wait_ms=20)
    with ThreadPoolExecutor(6) as ex:  # prompts of different lengths, left-padded into one batch
        got = list(ex.map(lambda p: s.client.post("/generate", json={"prompt": p, "max_new_tokens": 5}).json(), TEXTS[:3] * 2))
    for p, g in zip(TEXTS[:3] * 2, got):
        assert g["completion"] == want[p]
    assert s.client.post("/generate", json={"prompt": "hi", "max_new_tokens": 10_000}).status_code == 422
    assert s.client.post("/generate", json={"prompt": "hi", "max_new_tokens": "5"}).status_code == 422
    assert s.client.post("/generate", json={"max_new_tokens": 5}).status_code == 422


def test_translation_matches_generate(tmp_path, serve_folder):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = tiny_t5(tmp_path / "t5")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    with torch.no_grad():
        want = [tok.decode(model.generate(**tok(t, return_tensors="pt", return_token_type_ids=False),
                                          max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True) for t in TEXTS]
    assert len(set(want)) == len(TEXTS)
    s = serve_folder(folder)
    got = s.client.post("/translate", json={"text": TEXTS, "max_new_tokens": 6}).json()["translations"]
    assert got == want
    assert s.client.get("/health").json()["endpoint"] == "/translate"


# ---------------------------------------------------------------- finding the model


def test_resolve_model_dir_from_stage_and_run_dirs(tmp_path):
    from pipelines.serve import resolve_model_dir

    run = tmp_path / "run"
    (run / "finetune" / "model").mkdir(parents=True)
    (run / "finetune" / "model" / "config.json").write_text("{}")
    (run / "finetune" / "manifest.json").write_text(json.dumps({"name": "finetune", "type": "finetune", "outputs": {"model": "model"}}))
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "manifest.json").write_text(json.dumps({"name": "tokenizer", "type": "tokenizer", "outputs": {"tokenizer": "tokenizer"}}))
    assert resolve_model_dir(run / "finetune")[0] == run / "finetune" / "model"
    assert resolve_model_dir(run, stage="finetune")[0] == run / "finetune" / "model"
    assert resolve_model_dir(run / "finetune" / "model") == (run / "finetune" / "model", None)
    with pytest.raises(PipelinesError, match=r"--stage \(one of \['finetune'\]\)"):
        resolve_model_dir(run)
    with pytest.raises(PipelinesError, match="no model output"):
        resolve_model_dir(run / "tokenizer")
    with pytest.raises(PipelinesError, match="has not finished"):
        resolve_model_dir(run, stage="distill")
    with pytest.raises(PipelinesError, match="no such file"):
        resolve_model_dir(tmp_path / "nowhere")


def start_cli_server(folder, env) -> tuple[subprocess.Popen, int]:
    """`pipelines serve FOLDER --port P` as a user starts it, once /health answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "serve", str(folder), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not come up: {proc.stdout.read()}")
        time.sleep(0.3)


def test_cli_serve_subprocess(tmp_path):
    """`pipelines serve` as a user runs it: a process that answers on the port it was given."""
    folder = tiny_classifier(tmp_path / "cls")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc, port = start_cli_server(folder, env)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"text": TEXTS[0]}, timeout=30)
        assert r.json()["predictions"][0]["label"] == direct_classify(folder, TEXTS[:1])[0][0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    missing = subprocess.run([sys.executable, "-m", "pipelines", "serve", str(tmp_path / "nope")],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "no such file" in missing.stderr


# ---------------------------------------------------------------- API keys


def test_api_keys_guard_every_endpoint_but_health(tmp_path, serve_folder):
    folder = tiny_classifier(tmp_path / "cls")
    s = serve_folder(folder, api_keys=("key-one", "key-two"))
    body = {"text": TEXTS[0]}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic key-one"},
                    {"Authorization": "Bearer"}, {"Authorization": "key-one"}):
        r = s.client.post("/predict", json=body, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"], headers
        assert r.headers["www-authenticate"] == "Bearer"
    for key in ("key-one", "key-two"):
        r = s.client.post("/predict", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("negative", "positive")
    assert s.client.get("/docs").status_code == 401 and s.client.get("/openapi.json").status_code == 401
    assert s.client.get("/openapi.json", headers={"Authorization": "Bearer key-two"}).status_code == 200
    assert s.client.get("/health").status_code == 200
    m = metric_values(s.client.get("/metrics").text)  # open by default: a Prometheus scraper has no key
    assert m[("pipelines_requests_total", frozenset({("endpoint", "/predict"), ("status", "401")}))] == 5
    assert m[("pipelines_requests_total", frozenset({("endpoint", "/predict"), ("status", "200")}))] == 2

    keyed = serve_folder(folder, api_keys=("k",), metrics_open=False)
    assert keyed.client.get("/metrics").status_code == 401
    assert keyed.client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    assert keyed.client.get("/health").status_code == 200


def test_api_keys_from_flags_and_environment_and_the_exposure_warning():
    from pipelines.serve import ServeSettings, api_keys, exposure_warning

    assert api_keys(["a", " b ", ""], {"PIPELINES_API_KEYS": "c, a,,d"}) == ("a", "b", "c", "d")
    assert api_keys(None, {}) == ()
    assert "without an API key" in exposure_warning("0.0.0.0", ServeSettings())
    assert exposure_warning("0.0.0.0", ServeSettings(api_keys=("k",))) is None
    assert exposure_warning("127.0.0.1", ServeSettings()) is None and exposure_warning("localhost", ServeSettings()) is None


def test_cli_serve_with_a_key_from_the_environment_never_prints_it(tmp_path):
    folder = tiny_classifier(tmp_path / "cls")
    secret = "s3cret-key-9f1c"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PIPELINES_API_KEYS=secret)
    proc, port = start_cli_server(folder, env)
    try:
        url = f"http://127.0.0.1:{port}/predict"
        assert httpx.post(url, json={"text": TEXTS[0]}, timeout=30).status_code == 401
        ok = httpx.post(url, json={"text": TEXTS[0]}, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
        assert ok.status_code == 200
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "1 API key(s)" in out and secret not in out
