"""The OpenAI-compatible endpoints of a served causal LM, called with the `openai` Python client itself."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests import test_serve
from tests.test_serve import TEXTS, tiny_classifier, tiny_gpt2

serve_folder = test_serve.serve_folder  # the fixture that starts a server per test

openai = pytest.importorskip("openai")
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture
def lm(tmp_path):
    folder = tiny_gpt2(tmp_path / "gpt2")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(params=[False, True], ids=["batched", "continuous"])
def cb(request) -> bool:
    """serve --continuous-batching off / on: the routes answer the same either way."""
    return request.param


def greedy(folder, prompt: str, n: int) -> tuple[str, int, int]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), enc["input_ids"].shape[1], len(new)


def client(s, key="unused"):
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_completions_match_greedy_generate_and_stream_the_same_text(lm, serve_folder, cb):
    s = serve_folder(lm, max_wait_ms=20, continuous_batching=cb)
    c = client(s)
    assert [m.id for m in c.models.list().data] == ["gpt2"]
    for prompt in TEXTS[:3]:
        want, n_prompt, n_new = greedy(lm, prompt, 6)
        r = c.completions.create(model="gpt2", prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == want
        assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == n_new
        assert r.choices[0].finish_reason == ("length" if n_new == 6 else "stop")
        streamed = c.completions.create(model="gpt2", prompt=prompt, max_tokens=6, temperature=0, stream=True)
        chunks = list(streamed)
        assert "".join(ch.choices[0].text for ch in chunks) == want
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    batch = c.completions.create(model="gpt2", prompt=TEXTS[:3], max_tokens=6, temperature=0)  # left-padded batch
    assert [ch.text for ch in batch.choices] == [greedy(lm, p, 6)[0] for p in TEXTS[:3]]


def test_stop_strings_cut_the_text_and_end_with_stop(lm, serve_folder, cb):
    s = serve_folder(lm, continuous_batching=cb)
    c = client(s)
    full = c.completions.create(model="gpt2", prompt=TEXTS[0], max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = c.completions.create(model="gpt2", prompt=TEXTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="gpt2", prompt=TEXTS[0], max_tokens=12, temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == cut.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_uses_the_tokenizer_template(lm, serve_folder, cb):
    s = serve_folder(lm, continuous_batching=cb)
    c = client(s)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a gripping film"}]
    want, _, _ = greedy(lm, "system: be brief\nuser: a gripping film\nassistant:", 5)
    r = c.chat.completions.create(model="gpt2", messages=messages, max_tokens=5, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    chunks = list(c.chat.completions.create(model="gpt2", messages=messages, max_completion_tokens=5, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want


def test_sampling_is_seeded_and_bad_requests_are_4xx(lm, serve_folder, tmp_path, cb):
    s = serve_folder(lm, continuous_batching=cb)
    c = client(s)
    a = c.completions.create(model="gpt2", prompt="ok", max_tokens=8, temperature=1.5, top_p=0.9, seed=3).choices[0].text
    b = c.completions.create(model="gpt2", prompt="ok", max_tokens=8, temperature=1.5, top_p=0.9, seed=3).choices[0].text
    assert a == b
    with pytest.raises(openai.UnprocessableEntityError):
        c.completions.create(model="gpt2", prompt="ok", max_tokens=10_000)
    with pytest.raises(openai.UnprocessableEntityError):
        c.completions.create(model="gpt2", prompt="ok", n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="gpt2", messages=[{"role": "robot", "content": "hi"}])
    raw = httpx.post(f"{s.url}/v1/completions", json={"prompt": "ok", "presence_penalty": 1}, timeout=30)
    assert raw.status_code == 422 and "presence_penalty" in raw.text
    # a model without a chat template: completions work, chat says why not
    plain = serve_folder(tiny_gpt2(tmp_path / "plain"))
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(plain).chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    # a classifier has no /v1 routes
    cls = serve_folder(tiny_classifier(tmp_path / "cls"))
    assert httpx.get(f"{cls.url}/v1/models", timeout=30).status_code == 404


def test_api_key_through_the_client(lm, serve_folder):
    s = serve_folder(lm, api_keys=("sk-test",))
    with pytest.raises(openai.AuthenticationError):
        client(s, "wrong").completions.create(model="gpt2", prompt="ok", max_tokens=2)
    assert client(s, "sk-test").completions.create(model="gpt2", prompt="ok", max_tokens=2).choices[0].text is not None


def test_a_batch_of_streams_sends_each_row_its_own_text_and_nothing_to_a_client_that_left(lm):
    from pipelines import openai_api, serve

    served = serve.load_served(lm)
    key = openai_api.stream_key((openai_api.KIND, 12, 0.0, 1.0, (), None))
    events: dict[int, list] = {0: [], 1: [], 2: []}
    jobs: list = []

    def emit(i, event):
        events[i].append(event)
        if i == 0 and event[0] == "text":
            jobs[0].gone = True  # client 0 leaves after its first piece of text

    for i, prompt in enumerate(TEXTS[:3]):
        jobs.append(openai_api.StreamJob(prompt, lambda event, i=i: emit(i, event)))
    out = openai_api.stream_batch(served, key, jobs)  # one generate() for the three
    for i in (1, 2):
        want, _, n = greedy(lm, TEXTS[i], 12)
        assert "".join(e[1] for e in events[i] if e[0] == "text") == want
        assert events[i][-1] == ("end", "length" if n == 12 else "stop", n) and out[i]["completion_tokens"] == n
    assert [e[0] for e in events[0]] == ["text"]  # no more text and no end once it left


def test_concurrent_streams_are_batched_and_each_gets_its_greedy_text(lm, serve_folder):
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_serve import metric_values

    s = serve_folder(lm, max_wait_ms=400)
    prompts = TEXTS[:4]

    def stream(prompt):
        chunks = client(s).completions.create(model="gpt2", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in chunks)

    calls = ("pipelines_batch_size_count", frozenset())
    before = metric_values(httpx.get(f"{s.url}/metrics", timeout=30).text)[calls]
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(stream, prompts))
    assert got == [greedy(lm, p, 8)[0] for p in prompts]
    after = metric_values(httpx.get(f"{s.url}/metrics", timeout=30).text)
    assert after[calls] - before < len(prompts)  # fewer model calls than streams: some shared a generate()
    assert after[("pipelines_generated_tokens_total", frozenset())] >= sum(greedy(lm, p, 8)[2] for p in prompts)


def slowed(s, seconds: float):
    """Each forward of the served model sleeps `seconds` first: a long reply takes long enough to overlap."""
    import time

    return s.model.model.register_forward_pre_hook(lambda *args: time.sleep(seconds))


@pytest.mark.parametrize("continuous", [False, True], ids=["batched", "continuous"])
def test_continuous_batching_answers_a_short_request_while_a_long_stream_runs(lm, serve_folder, continuous):
    """The point of --continuous-batching: a request that arrives during a long generation joins the running
    batch and leaves it when done, instead of waiting for the whole generation (the micro-batcher's call). The
    long stream keeps its greedy text, the newcomer gets its own."""
    import threading
    import time

    s = serve_folder(lm, continuous_batching=continuous)
    slowed(s, 0.05)  # 40 tokens: over 2 s
    want_long, _, _ = greedy(lm, TEXTS[3], 40)
    want_short, _, _ = greedy(lm, TEXTS[0], 3)
    first_text, ended = threading.Event(), {}

    def long_stream():
        pieces = []
        for ch in client(s).completions.create(model="gpt2", prompt=TEXTS[3], max_tokens=40, temperature=0, stream=True):
            pieces.append(ch.choices[0].text)
            first_text.set()
        ended["text"], ended["at"] = "".join(pieces), time.perf_counter()

    t = threading.Thread(target=long_stream)
    t.start()
    assert first_text.wait(60)
    short = client(s).completions.create(model="gpt2", prompt=TEXTS[0], max_tokens=3, temperature=0)
    short_at = time.perf_counter()
    t.join(60)
    assert short.choices[0].text == want_short and ended["text"] == want_long
    if continuous:
        assert short_at < ended["at"] - 0.5  # answered while the stream still had a second or more to go
    else:
        assert short_at >= ended["at"]  # waited for the stream's generate() on the inference thread


def test_a_stream_that_fails_midway_ends_with_an_error_event_the_client_raises(lm, serve_folder, cb):
    """A model step that fails after the stream's first chunks (its 200 already sent) ends the stream with
    OpenAI's error event, which the openai client raises as APIError (not a cut connection, not a stream that
    looks finished); it counts as a server error, and the server answers the next request."""
    from prometheus_client.parser import text_string_to_metric_families

    s = serve_folder(lm, continuous_batching=cb)
    calls = {"n": 0}

    def fail_on_the_sixth_step(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("boom at step 6")

    hook = s.model.model.register_forward_pre_hook(fail_on_the_sixth_step)
    pieces = []
    with pytest.raises(openai.APIError, match="inference failed: .*boom at step 6") as raised:
        for ch in client(s).completions.create(model="gpt2", prompt=TEXTS[3], max_tokens=20, temperature=0, stream=True):
            pieces.append(ch.choices[0].text)
    assert not isinstance(raised.value, openai.APIConnectionError)
    assert len(pieces) >= 3  # text came first: the failure is mid-stream
    with pytest.raises(openai.APIError, match="boom"):  # the chat route too (the hook has passed its sixth step:
        calls["n"] = 5                                  # fail again at once)
        list(client(s).chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, temperature=0, stream=True))
    hook.remove()
    want, _, _ = greedy(lm, TEXTS[1], 5)
    assert "".join(ch.choices[0].text for ch in client(s).completions.create(
        model="gpt2", prompt=TEXTS[1], max_tokens=5, temperature=0, stream=True)) == want
    scraped = httpx.get(f"{s.url}/metrics").text
    errors = {tuple(x.labels.values()): x.value for f in text_string_to_metric_families(scraped)
              if f.name == "pipelines_errors" for x in f.samples if x.name == "pipelines_errors_total"}
    assert errors[("/v1/completions", "server")] == 1 and errors[("/v1/chat/completions", "server")] == 1


def test_continuous_batching_frees_a_gone_client_and_serves_sampling_per_request(lm, serve_folder, tmp_path):
    import time

    from pipelines.errors import PipelinesError
    from pipelines.serve import ServedModel, ServeSettings, create_app

    s = serve_folder(lm, continuous_batching=True)
    hook = slowed(s, 0.02)
    generation = s.server.config.app.state.generation
    stream = client(s).completions.create(model="gpt2", prompt=TEXTS[3], max_tokens=40, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client leaves after its first chunk
    scheduler = generation.managers[False].batch_processor.scheduler
    deadline = time.time() + 20
    while (scheduler.active_requests or scheduler.waiting_requests) and time.time() < deadline:
        time.sleep(0.05)
    assert not scheduler.active_requests and not scheduler.waiting_requests  # cancelled, not run to max_tokens
    assert not generation.managers[False].output_router.result_handlers
    hook.remove()
    # a model step that fails answers 500, and the next request gets a fresh manager (transformers' loop is dead)
    def boom(*args):
        raise RuntimeError("boom in forward")

    hook = s.model.model.register_forward_pre_hook(boom)
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "ok", "max_tokens": 4, "temperature": 0}, timeout=30)
    assert r.status_code == 500 and "boom in forward" in r.text
    hook.remove()
    assert client(s).completions.create(model="gpt2", prompt=TEXTS[1], max_tokens=4, temperature=0).choices[0].text
    # sampling: temperature and top_p per request; a top_p this small keeps only the likeliest token, i.e. greedy
    want, _, _ = greedy(lm, TEXTS[1], 8)
    r = client(s).completions.create(model="gpt2", prompt=TEXTS[1], max_tokens=8, temperature=1.0, top_p=1e-6)
    assert r.choices[0].text == want and True in generation.managers
    hot = client(s).completions.create(model="gpt2", prompt=TEXTS[1], max_tokens=8, temperature=2.0)
    assert hot.usage.completion_tokens >= 1
    # continuous batching is for causal LMs: a classifier is refused before the server starts
    with pytest.raises(PipelinesError, match="causal LMs"):
        create_app(ServedModel(tiny_classifier(tmp_path / "cls")), ServeSettings(continuous_batching=True))


def test_serve_cli_refuses_continuous_batching_for_a_classifier(tmp_path):
    import subprocess
    import sys

    folder = tiny_classifier(tmp_path / "cls")
    r = subprocess.run([sys.executable, "-m", "pipelines", "serve", str(folder), "--port", "0", "--continuous-batching"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "--continuous-batching" in r.stderr and "causal LMs" in r.stderr and "Traceback" not in r.stderr
