"""Continuous batching for a served causal LM (`pipelines serve --continuous-batching`): transformers'
ContinuousBatchingManager (a paged KV cache; requests join and leave the running batch at every decoding step)
behind the OpenAI-style routes (streamed or not) and gRPC's GenerateStream.

Without it, concurrent requests with equal sampling parameters share one generate() call on the single
inference thread, and that call runs until its longest row ends: a request that arrives meanwhile waits for the
whole call, and a short reply waits for the longest one of its batch. With it, a request joins the batch at the
next step and leaves it when it ends (EOS, a stop string, max_tokens, its client gone), and the inference
thread stays free for the other calls (the task's /generate, gRPC Generate).

Sampling parameters: transformers' manager takes do_sample for all its requests, so there are two managers,
started on first use: greedy (temperature 0) and sampling (temperature and top_p per request, through its
per-request logits processors). A seeded request still goes through the micro-batcher, alone: a seed must give
the same text whoever else is being served, and a continuous batch draws every row's token from one random
stream. Stop strings, EOS and max_tokens are applied per request by openai_api's `_Row`, as for batched streams.
"""

from __future__ import annotations

import asyncio
import copy
import uuid

from pipelines import openai_api
from pipelines.errors import PipelinesError
from pipelines.tasks.causal_lm import encode_prompts

# Temperature and top_p the sampling manager is built with: transformers only builds a logits processor for a
# value that differs from 1.0, and only a built processor takes a per-request value.
_BUILT_TEMPERATURE, _BUILT_TOP_P = 0.5, 0.5


def check_supported(served) -> None:
    """Refuse a model continuous batching can't serve, before the server starts."""
    if not served.task.openai_compatible:
        raise PipelinesError(f"--continuous-batching: {served.name!r} is a {served.task.name} model; continuous "
                             "batching serves causal LMs (the OpenAI-style routes)")
    # an exported graph (pipelines.runtimes: .runtime) has no paged attention, even behind generate()
    if getattr(served.model, "runtime", None) or not hasattr(served.model, "init_continuous_batching"):
        raise PipelinesError(f"--continuous-batching: the {served.quantized} model in {served.folder} is not a "
                             "transformers model (an exported graph?); serve it without --continuous-batching")


class Continuous:
    """The two managers and the requests in them. All methods but stop() run on the event loop (the managers
    call their result handlers there), so the tokenizer copy here is never used by two threads at once."""

    def __init__(self, served, settings, run_items, metrics):
        check_supported(served)
        self.served, self.run_items, self.metrics = served, run_items, metrics
        self.tok = copy.deepcopy(served.processor)  # the inference thread encodes with the original
        self.max_batch = settings.max_batch
        self.max_new_tokens = settings.max_new_tokens
        self.managers: dict[bool, object] = {}  # do_sample -> ContinuousBatchingManager

    def _manager(self, sample: bool):
        old = self.managers.get(sample)
        if old is not None and old.background_thread_status.fatal_error is not None:
            # an error in a model step ends transformers' loop for good: a new manager serves the next requests
            old.stop(block=False)
            del self.managers[sample]
        if sample not in self.managers:
            from transformers import ContinuousBatchingConfig

            gen = copy.deepcopy(self.served.model.generation_config)
            gen.do_sample = sample
            gen.temperature, gen.top_p = (_BUILT_TEMPERATURE, _BUILT_TOP_P) if sample else (None, None)
            gen.eos_token_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else -1
            gen.max_new_tokens = self.max_new_tokens
            # The KV cache, sized for the server's limits: room for max_batch requests of a 256-token prompt and
            # max_new_tokens (and for one of the model's whole length). Left to transformers, it is sized from
            # free memory, which on a CPU box means gigabytes allocated (a minute) before the first token. A
            # request that finds the cache full waits for room.
            page, length = 64, self.served.max_length
            typical = min(length, 256 + self.max_new_tokens)
            blocks = max(-(-length // page), self.max_batch * -(-typical // page)) + 1
            config = ContinuousBatchingConfig(page_size=page, num_blocks=blocks,
                                              max_batch_tokens=min(4 * length, 2048),
                                              max_requests_per_batch=self.max_batch, per_request_processors=sample,
                                              allow_block_sharing=False)
            manager = self.served.model.init_continuous_batching(generation_config=gen, continuous_batching_config=config)
            manager.start()
            self.managers[sample] = manager
        return self.managers[sample]

    def stop(self) -> None:
        for manager in self.managers.values():
            manager.stop(block=True, timeout=5)
        self.managers.clear()

    async def complete(self, params: tuple, prompts: list[str]) -> list[dict]:
        """Non-streamed requests: each prompt its own request in the running batch (a seeded one through the
        micro-batcher, as without continuous batching)."""
        if params[-1] is not None:
            return await self.run_items(params, prompts)
        return list(await asyncio.gather(*(self._complete_one(params, p) for p in prompts)))

    async def _complete_one(self, params: tuple, prompt: str) -> dict:
        ids = self._encode(prompt, params[1])
        pieces, end = [], None
        # Without stop strings (EOS and max_tokens the manager applies itself) the manager hands over the whole
        # reply once, instead of one event-loop wake-up per token: nothing can end the request earlier
        async for kind, *rest in self._generate(params, ids, streaming=bool(params[4])):
            if kind == "text":
                pieces.append(rest[0])
            else:
                end = rest
        return {"text": "".join(pieces), "finish_reason": end[0], "prompt_tokens": len(ids), "completion_tokens": end[1]}

    async def stream_text(self, params: tuple, prompt: str):
        """openai_api.stream_text's events ("text", piece) ... ("end", finish_reason, completion_tokens)."""
        if params[-1] is not None:
            async for event in openai_api.stream_text(self.run_items, params, prompt):
                yield event
            return
        async for event in self._generate(params, self._encode(prompt, params[1])):
            yield event

    async def _generate(self, params: tuple, ids: list[int], streaming: bool = True):
        """One request in the running batch: its events as they come (its row applies EOS, stop strings and
        max_tokens); the request is cancelled in the manager when its row ends first (a stop string) or when
        the consumer stops listening (a client gone). `streaming=False`: the manager delivers the reply when
        it is finished, all its tokens at once."""
        _, max_new, temperature, top_p, stops, _seed = params
        events: asyncio.Queue = asyncio.Queue()
        row = openai_api._Row(openai_api.StreamJob(None, events.put_nowait), self.tok, max_new, stops)
        manager = self._manager(temperature > 0)
        rid, seen = f"pl-{uuid.uuid4().hex}", 0

        def on_output(output) -> None:  # on the event loop, for each new token of this request
            nonlocal seen
            if output.error is not None:
                row._emit(("error", RuntimeError(f"continuous batching failed: {output.error}")))
                return
            for token in output.generated_tokens[seen:]:
                row.add(token)
            seen = len(output.generated_tokens)
            if output.is_finished():
                row.finish("length")  # a no-op when the row has ended itself (EOS, a stop string)
            elif row.finished:  # a stop string: the manager would go on to max_tokens
                self._cancel(manager, rid)

        manager.register_result_handler(rid, on_output)
        kwargs = {"temperature": float(temperature), "top_p": float(top_p)} if temperature > 0 else {}
        added = manager.add_request(ids, request_id=rid, max_new_tokens=max_new, streaming=streaming,
                                    eos_token_id=manager.generation_config.eos_token_id, **kwargs)
        if added is None:
            self._cancel(manager, rid)
            raise RuntimeError("the continuous batching manager refused the request (stopping, or its loop died)")
        try:
            while True:
                kind, *rest = await events.get()
                if kind == "error":
                    raise rest[0]
                yield (kind, *rest)
                if kind == "end":
                    self.metrics.count_tokens(rest[1])
                    return
        finally:
            if not row.done:  # the client left (or an error): free its slot in the batch
                row.job.gone = True
                self._cancel(manager, rid)

    def _encode(self, prompt: str, max_new: int) -> list[int]:
        """The prompt's ids, cut as the micro-batcher cuts them (encode_prompts), with this loop's tokenizer."""
        return encode_prompts(self.served, [prompt], max_new, tok=self.tok, return_tensors=None)["input_ids"][0]

    @staticmethod
    def _cancel(manager, rid: str) -> None:
        manager.cancel_request(rid)
        # a cancelled request never delivers a finished output, which is what drops its handler in transformers
        with manager.output_router._lock:
            manager.output_router.result_handlers.pop(rid, None)
