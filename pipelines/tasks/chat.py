"""Chat / instruction tuning of a causal LM: the loss is on the assistant's turns only.

Data: `messages` (conversations: system / user / assistant turns) or `prompt` + `completion` (an instruction and
its answer, i.e. a user and an assistant turn). The tokenizer's chat template renders them (`chat_template`
in the tokenizer or the training stage sets one where it has none); every label is -100 except the assistant
turns' content and their end-of-turn token, and generation stops at that token (a model that never stops
is the classic failure). A conversation longer than max_length is cut after its last assistant turn that
fits whole; one whose first assistant turn does not fit is left out (counted in the log). See pipelines/chat.py.

Metrics: token-weighted perplexity over the assistant tokens (main), and on the held-out conversations the
model's greedy reply to the turns before the last assistant turn: exact match with the reference reply, and
the share of replies that ended with the end-of-turn token (`stopped`). Baseline: the add-one unigram model
of the train split's assistant tokens. The trained model is a causal LM marked `"pipelines_task": "chat"` in its
config.json (so later stages and serve know it as a chat model): served with /generate and the OpenAI-style
/v1/chat/completions (its template travels in the tokenizer).
"""

from __future__ import annotations

from pipelines import chat
from pipelines.tasks.base import MARKER, EvalOptions, Scored, Task
from pipelines.tasks.causal_lm import CausalLM


class Chat(CausalLM):
    name = "chat"
    aliases = ("chat-sft", "sft", "instruction", "instruction-tuning", "conversational")
    description = "chat / instruction tuning: a causal LM learns the assistant's turns"
    roles = ("messages",)
    conversational = True

    def detect(self, config: dict) -> bool:
        return config.get(MARKER) == self.name  # a causal LM whose config says it was chat-tuned

    def required_roles(self, columns):
        return ("messages",) if "messages" in columns or "prompt" not in columns else ("prompt", "completion")

    def prepare_processor(self, tokenizer):
        notes = super().prepare_processor(tokenizer)
        chat.check_template(tokenizer)
        return notes

    def configure(self, model, tokenizer):
        super().configure(model, tokenizer)
        setattr(model.config, MARKER, self.name)  # saved in config.json: the folder is recognised as a chat model
        gen = model.generation_config
        if gen is None:
            return
        eot = chat.end_of_turn_id(tokenizer)
        if eot is not None:  # generation stops at the end of the assistant's turn (and at EOS)
            gen.eos_token_id = list(dict.fromkeys([eot, tokenizer.eos_token_id]))
        if gen.max_new_tokens is None:  # a reply's length, not prompt + reply (a long prompt would leave no room)
            gen.max_new_tokens = 64

    # ---- data

    def encode(self, ds, tokenizer, opts: EvalOptions):
        """Each conversation rendered by the chat template; labels on the assistant turns only."""

        def fn(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for row in (dict(zip(batch, vals)) for vals in zip(*batch.values())):
                enc = chat.encode(tokenizer, chat.as_messages(row), opts.max_length)
                if enc is None:
                    continue  # not even the first assistant turn fits max_length: nothing to learn
                out["input_ids"].append(enc[0])
                out["attention_mask"].append([1] * len(enc[0]))
                out["labels"].append(enc[1])
            return out

        return self._cached_map(ds, fn, tokenizer, opts, extra=("chat-v1", tokenizer.chat_template))

    def train_notes(self, train, label_names):
        return []

    # ---- evaluation

    def evaluate(self, model, tokenizer, raw, opts: EvalOptions) -> Scored:
        scored = Task.evaluate(self, model, tokenizer, raw, opts)
        dropped = len(raw) - int(len(self.encode(raw, tokenizer, opts)))
        if dropped:
            scored.metrics["too_long"] = dropped
        rows = [dict(zip(raw.column_names, vals)) for vals in zip(*(raw[c] for c in raw.column_names))]
        prompts = [chat.render(tokenizer, chat.prompt_messages(r), add_generation_prompt=True) for r in rows]
        refs = [chat.last_reply(r) for r in rows]
        replies, stopped = generate_replies(model, tokenizer, prompts, batch_size=opts.batch_size, gen_kwargs=opts.generation)
        scored.metrics["exact_match"] = round(sum(g == t.strip() for g, t in zip(replies, refs)) / max(len(refs), 1), 4)
        scored.metrics["stopped"] = round(sum(stopped) / max(len(stopped), 1), 4)
        scored.rows = [{"prompt": p, "reference": t, "predicted": g, "stopped": s}
                       for p, t, g, s in zip(prompts, refs, replies, stopped)]
        return scored

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'chat = pipeline("text-generation", model="{repo}")',
            'messages = [{"role": "user", "content": "Hello!"}]',
            'print(chat(messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])',
        ]


def generate_replies(model, tokenizer, prompts: list[str], *, batch_size: int, gen_kwargs: dict):
    """(greedy / beam replies, whether each ended with the end-of-turn token) to rendered chat prompts."""
    import torch

    from pipelines.tasks.translation import decode

    eot = chat.end_of_turn_id(tokenizer)
    stop = {eot, tokenizer.eos_token_id} - {None}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    replies, stopped = [], []
    try:
        model.eval()
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, **gen_kwargs, pad_token_id=tokenizer.pad_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            replies.extend(decode(tokenizer, new))
            stopped.extend(bool(stop & set(row.tolist())) for row in new)
    finally:
        tokenizer.padding_side = side
    return replies, stopped


TASK = Chat()
