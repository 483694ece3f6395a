"""OpenAI-compatible endpoints for a served causal LM, so that the `openai` client (or anything that speaks
its API) works with `base_url=http://host:port/v1`:

    GET  /v1/models
    POST /v1/completions        {model, prompt: str | [str], max_tokens, temperature, top_p, stop, seed, stream}
    POST /v1/chat/completions   {model, messages: [{role, content}], max_tokens | max_completion_tokens, ...}

Chat prompts are built with the tokenizer's own `chat_template` (a model without one answers 400 on the chat
endpoint; completions still work). `temperature: 0` is greedy decoding; otherwise sampling with `top_p`,
seeded by `seed` when given. `stop` strings end the completion (they are not part of the text);
`finish_reason` is "stop" (a stop string or the end-of-sequence token) or "length" (max_tokens reached).
`stream: true` answers with server-sent events (`data: {chunk}` ... `data: [DONE]`), each chunk the new text;
a generation that fails mid-stream ends it with `data: {"error": {...}}` instead (the openai client raises it).
Requests go through the server's micro-batcher: streamed or not, those with equal sampling parameters share one
generate() call (`Batched`); with `serve --continuous-batching`, through transformers' continuous batching
instead (pipelines/continuous.py). Only `n: 1` is served.
"""

from __future__ import annotations

import asyncio
import json
import time
import unicodedata
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from pipelines.tasks import RequestError
from pipelines.tasks.base import new_token_counts
from pipelines.tasks.causal_lm import encode_prompts

KIND = "openai"  # first item of a micro-batch key: ServedModel.run_batch sends such batches here


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is served.")
    user: str | None = None

    @model_validator(mode="after")
    def _stops(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return self

    def params(self, limits, max_tokens: int | None) -> tuple:
        """The batch key: requests with equal parameters share one generate() call."""
        n = max_tokens if max_tokens is not None else limits.default_new_tokens
        if n > limits.max_new_tokens:
            raise RequestError(422, f"max_tokens: {n} is over the limit of {limits.max_new_tokens} (serve --max-new-tokens)")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return (KIND, n, self.temperature, self.top_p, stops, self.seed)


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- generation (inference thread)


def _generate_kwargs(tok, max_new: int, temperature: float, top_p: float, stops: tuple) -> dict:
    kw = {"max_new_tokens": max_new, "pad_token_id": tok.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False)
    if stops:
        kw.update(stop_strings=list(stops), tokenizer=tok)
    return kw


def _cut(text: str, stops: tuple) -> tuple[str, bool]:
    """The text up to the first stop string, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


def complete(served, params: tuple, prompts: list[str]) -> list[dict]:
    """One generate() for a batch of prompts that share sampling parameters: text, finish_reason, token counts."""
    import torch

    _, max_new, temperature, top_p, stops, seed = params
    tok = served.processor
    enc = encode_prompts(served, prompts, max_new)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = served.model.generate(**enc, **_generate_kwargs(tok, max_new, temperature, top_p, stops))
    results = []
    for row, ids in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
        eos = tok.eos_token_id
        n = new_token_counts([ids], eos)[0]
        text, stopped = _cut(tok.decode(ids[:n], skip_special_tokens=True), stops)
        ended = stopped or (eos is not None and eos in ids[:n])
        results.append({"text": text, "finish_reason": "stop" if ended or n < max_new else "length",
                        "prompt_tokens": int(enc["attention_mask"][row].sum()), "completion_tokens": n})
    return results


# ---------------------------------------------------------------- the routes


def _prompt_of(served, req: ChatRequest) -> str:
    tok = served.processor
    if not getattr(tok, "chat_template", None):
        raise RequestError(400, f"the model {served.name!r} has no chat template (its tokenizer's chat_template is "
                                "empty); use /v1/completions, or give the tokenizer a template")
    try:
        return tok.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
        raise RequestError(400, f"the chat template refused these messages: {e}") from None


class Batched:
    """How the routes generate by default: through the server's micro-batcher (`run_items`), non-streamed
    requests by complete(), streams by stream_batch(). pipelines/continuous.py's Continuous has the same methods."""

    def __init__(self, run_items):
        self.run_items = run_items

    async def complete(self, params: tuple, prompts: list[str]) -> list[dict]:
        return await self.run_items(params, prompts)

    def stream_text(self, params: tuple, prompt: str):
        return stream_text(self.run_items, params, prompt)

    def stop(self) -> None:
        pass


def add_routes(app, served, limits, error, generation) -> list[str]:
    """Register the /v1 routes on `app`; returns their paths (for the metrics labels). `generation` (Batched,
    or continuous.Continuous) runs the requests."""
    from fastapi.responses import JSONResponse

    from pipelines.tasks.base import check_lengths

    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "pipelines"}]}

    def stream_error(path: str, e: Exception) -> bytes:
        """The SSE event that ends a stream whose generation failed after its 200: error()'s own OpenAI-shaped
        body, counted as the server error it is (the metrics middleware saw a success)."""
        app.state.metrics.errors.labels(path, "server").inc()
        return b"data: " + error(500, f"inference failed: {type(e).__name__}: {e}", path=path).body + b"\n\n"

    def usage(results):
        p = sum(r["prompt_tokens"] for r in results)
        c = sum(r["completion_tokens"] for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def run(prompts: list[str], params: tuple, path: str):
        check_lengths(prompts, limits, "prompt")
        if len(prompts) > limits.max_items:
            raise RequestError(413, f"{len(prompts)} prompts; the limit is {limits.max_items} (serve --max-items)")
        try:
            return await generation.complete(params, prompts)
        except Exception as e:
            return error(500, f"inference failed: {type(e).__name__}: {e}", path=path)

    @app.post("/v1/completions", summary="OpenAI-compatible text completion")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        try:
            params = req.params(limits, req.max_tokens)
            if req.stream:
                if len(prompts) != 1:
                    raise RequestError(422, "stream: one prompt per streamed request")
                check_lengths(prompts, limits, "prompt")
                return _stream(served, generation, params, prompts[0], False, lambda e: stream_error("/v1/completions", e))
            results = await run(prompts, params, "/v1/completions")
        except RequestError as e:
            return error(e.status, str(e), path="/v1/completions")
        if isinstance(results, JSONResponse):
            return results
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.name, "usage": usage(results),
                "choices": [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None}
                            for i, r in enumerate(results)]}

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion (the tokenizer's chat template)")
    async def chat(req: ChatRequest):
        try:
            prompt = _prompt_of(served, req)
            params = req.params(limits, req.max_completion_tokens or req.max_tokens)
            if req.stream:
                check_lengths([prompt], limits, "messages")
                return _stream(served, generation, params, prompt, True, lambda e: stream_error("/v1/chat/completions", e))
            results = await run([prompt], params, "/v1/chat/completions")
        except RequestError as e:
            return error(e.status, str(e), path="/v1/chat/completions")
        if isinstance(results, JSONResponse):
            return results
        r = results[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": served.name, "usage": usage(results),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "finish_reason": r["finish_reason"], "logprobs": None}]}

    del models, completions, chat  # registered on the app
    return ["/v1/models", "/v1/completions", "/v1/chat/completions"]


# ---------------------------------------------------------------- streams, batched (inference thread)


STREAM = "openai-stream"  # first item of a streamed micro-batch key: ServedModel.run_batch sends those to stream_batch


def stream_key(params: tuple) -> tuple:
    """The micro-batch key of a stream: streams with equal sampling parameters share one generate(). A seeded
    stream is a batch of its own (a unique last item), so that its seed gives the same text whoever else is
    streaming: a batch draws every row's tokens from one random stream."""
    _, max_new, temperature, top_p, stops, seed = params
    return (STREAM, max_new, temperature, top_p, stops, seed, None if seed is None else object())


class StreamJob:
    """One streamed request in the micro-batcher's queue: its prompt, where its events go (called from the
    inference thread), and whether its client has gone (set by the event loop; the batch then skips its row)."""

    def __init__(self, prompt: str, emit):
        self.prompt, self.emit, self.gone = prompt, emit, False


class _Row:
    """One request's row of a streamed batch: its tokens, its text and what of it was sent. Events:
    ("text", piece) (held back while it could be the start of a stop string, or a word still being spelled),
    then ("end", finish_reason, completion_tokens), or ("error", exception)."""

    def __init__(self, job: StreamJob, tok, max_new: int, stops: tuple):
        self.job, self.tok, self.max_new, self.stops = job, tok, max_new, stops
        self.hold = max((len(s) - 1 for s in stops), default=0)
        self.ids: list[int] = []
        self.text, self.sent, self.n, self.done = "", 0, 0, False

    @property
    def finished(self) -> bool:
        return self.done or self.job.gone

    def add(self, token: int) -> None:
        """The row's next token. EOS ends it (counted, as complete() counts it); so does padding, which the
        batch gives a row that generate() stopped (a stop string it matched); nothing after either is sent."""
        if self.finished:
            return
        if token == self.tok.eos_token_id:
            self.n += 1
            return self.finish("stop")
        if token == self.tok.pad_token_id:
            return self.finish("stop")
        self.ids.append(token)
        self.n += 1
        self.text, stopped = _cut(self.tok.decode(self.ids, skip_special_tokens=True), self.stops)
        if stopped:
            return self.finish("stop")
        self._send(min(_printable(self.text, self.sent), len(self.text) - self.hold))
        if self.n >= self.max_new:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.done = True
            self._send(len(self.text))
            self._emit(("end", reason, self.n))

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self._emit(("text", self.text[self.sent:upto]))
            self.sent = upto

    def _emit(self, event: tuple) -> None:
        if self.job.gone:  # its client left: nothing more is sent
            return
        try:
            self.job.emit(event)
        except RuntimeError:  # the event loop is closed (the server stops): nobody is listening
            self.job.gone = True


def _printable(text: str, sent: int) -> int:
    """How much of `text` can be sent, as transformers' TextStreamer decides: all of it when the new part is
    letters, digits and spaces; else up to its last space (a symbol may be half a character, or change with
    the next token)."""
    new = text[sent:]
    if all(c.isspace() or unicodedata.category(c)[0] in "LMN" for c in new):
        return len(text)
    return text.rfind(" ") + 1


class FanOut(BaseStreamer):
    """generate()'s streamer for a batch of streams: each put() hands every row its new token. The first put
    is the prompt (skipped); a row that has ended (EOS, its stop string, its client gone) takes no more."""

    def __init__(self, rows: list[_Row]):
        self.rows, self.prompt = rows, True

    def put(self, value) -> None:
        if self.prompt:
            self.prompt = False
            return
        for row, tokens in zip(self.rows, value.reshape(len(self.rows), -1).tolist()):
            for token in tokens:
                row.add(token)

    def end(self) -> None:
        for row in self.rows:
            row.finish("length")


class _Finished(StoppingCriteria):
    """Rows whose request has ended or whose client has gone are done for generate() too: when all are, the
    batch stops early."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.tensor([r.finished for r in self.rows], dtype=torch.bool, device=input_ids.device)


def stream_batch(served, key: tuple, jobs: list[StreamJob]) -> list[dict]:
    """One generate() for streams that share sampling parameters (left-padded, as complete() batches), each
    row's text sent to its own client as it comes; returns each job's completion_tokens (the batch metrics)."""
    import torch
    from transformers import StoppingCriteriaList

    _, max_new, temperature, top_p, stops, seed, _ = key
    tok = served.processor
    rows = [None if j.gone else _Row(j, tok, max_new, stops) for j in jobs]  # None: its client left while queued
    live = [r for r in rows if r is not None]
    try:
        if live:
            enc = encode_prompts(served, [r.job.prompt for r in live], max_new)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                served.model.generate(**enc, streamer=FanOut(live), stopping_criteria=StoppingCriteriaList([_Finished(live)]),
                                      **_generate_kwargs(tok, max_new, temperature, top_p, stops))
    except BaseException as e:
        for r in live:
            if not r.finished:
                r._emit(("error", e))
        raise
    return [{"completion_tokens": r.n if r is not None else 0} for r in rows]


async def stream_text(run_items, params: tuple, prompt: str):
    """The new text of one prompt as it is generated, in a batch with the concurrent streams of equal
    parameters (`run_items`: the server's micro-batcher, the one non-streamed requests go through): yields
    ("text", piece) for each new piece (held back while it could still be the start of a stop string), then
    ("end", finish_reason, completion_tokens). Shared by the SSE stream here and gRPC's GenerateStream. A
    client that goes away (the generator closed) leaves the batch; the other rows go on."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = StreamJob(prompt, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    batch = asyncio.ensure_future(run_items(stream_key(params), [job]))
    batch.add_done_callback(lambda t: events.put_nowait(("closed", None if t.cancelled() else t.exception())))
    try:
        while True:
            kind, *rest = await events.get()
            if kind == "text":
                yield ("text", rest[0])
            elif kind == "end":
                yield ("end", *rest)
                return
            else:  # "error", or the batch over without this row's end
                raise rest[0] or RuntimeError("the streamed batch ended without this stream's end")
    finally:
        job.gone = True


def _stream(served, generation, params: tuple, prompt: str, chat: bool, failed):
    """Server-sent events: each new piece of text of `stream_text` is one chunk, then the finish reason and
    `data: [DONE]`. A generation that fails once the stream has begun (its 200 is sent) ends it with OpenAI's
    error event, `failed(exception)` (`data: {"error": {...}}`), which the openai client raises as APIError,
    instead of a cut connection."""
    from fastapi.responses import StreamingResponse

    sid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return "data: " + json.dumps({"id": sid, "object": obj, "created": created, "model": served.name,
                                      "choices": [choice]}) + "\n\n"

    async def events():
        if chat:
            yield chunk(None, None, first=True)
        try:
            async for kind, *rest in generation.stream_text(params, prompt):
                yield chunk(rest[0], None) if kind == "text" else chunk(None, rest[0])
        except Exception as e:
            yield failed(e)
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
