"""Causal language modelling: continue a text (or complete a prompt).

Data: `text` (a completion learned whole) or `source` + `target` (the prompt, formatted with
`prompt_template`, is masked with -100; the target is learned). Every example ends with EOS and EOS keeps
its label (a model that never learns to stop is the classic failure). Metrics: token-weighted
perplexity and mean NLL over the label tokens (the Trainer's eval_loss averages per batch, which is not
the same); with source/target rows also exact match of greedy / beam completions of the prompts; on plain
text a few continuations of the first words of validation texts beside how the texts go on (to read).
Baseline: an add-one unigram model of the train split's label tokens, on the same tokens.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from pipelines import metrics as M
from pipelines.errors import PipelinesError
from pipelines.tasks.base import (EvalOptions, Scored, ServeLimits, Task, arch_in, check_lengths, new_token_counts,
                                  new_tokens, rounded)


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr = Field(min_length=1)
    max_new_tokens: StrictInt | None = Field(None, ge=1)


class CausalLM(Task):
    name = "causal-lm"
    aliases = ("language-modeling", "text-generation", "generation", "causal_lm", "clm")
    pipeline_tag = "text-generation"
    peft_task_type = "CAUSAL_LM"
    endpoint = "/generate"
    description = "continue a text / complete a prompt"
    roles = ("text",)
    family = "decoder"
    main_metric = "perplexity"
    greater_is_better = False
    scores_base_model = True
    shift_labels = True
    vocab_output = True
    Request = GenerateRequest
    openai_compatible = True
    export_outputs = ("logits",)
    export_graph = "decode"  # one ONNX graph over a KV cache: perplexity is its forward, generate() drives it
    packable = True

    # ---- model

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def detect(self, config: dict) -> bool:
        return not config.get("is_encoder_decoder") and (
            arch_in(config, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
            or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or []))

    def configure(self, model, tokenizer):
        super().configure(model, tokenizer)
        if getattr(model, "loss_type", None) is None:
            # GPT2LMHeadModel's class name does not say ForCausalLM: without this the Trainer counts labels[:, 0]
            # (never a prediction target) in num_items_in_batch and scales every loss by (T-1)/T
            model.loss_type = "ForCausalLM"
        set_eos(model, tokenizer)

    def prepare_processor(self, tokenizer):
        notes = super().prepare_processor(tokenizer)
        if tokenizer.eos_token is None:
            raise PipelinesError("causal-lm needs a tokenizer with an EOS token (examples end with EOS)")
        return notes

    # ---- data

    def required_roles(self, columns):
        return ("text",) if "text" in columns else ("source", "target")

    def encode(self, ds, tokenizer, opts: EvalOptions):
        """text: a completion to learn whole; source/target: prompt (masked with -100) + target.
        Each example ends with EOS, and EOS keeps its label (the model must learn to stop)."""
        eos, max_length = tokenizer.eos_token_id, opts.max_length
        prompted = "source" in ds.column_names

        def fn(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            if prompted:
                prompts = [opts.prompt_template.format(source=s) for s in batch["source"]]
                p_ids = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
                c_ids = tokenizer(batch["target"], add_special_tokens=False, verbose=False)["input_ids"]
            else:
                p_ids = [[] for _ in batch["text"]]
                c_ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
            for p, c in zip(p_ids, c_ids):
                c = c[: max_length - 1] + [eos]
                p = p[-(max_length - len(c)):] if len(c) < max_length else []
                out["input_ids"].append(p + c)
                out["attention_mask"].append([1] * (len(p) + len(c)))
                out["labels"].append([-100] * len(p) + c)
            return out

        return self._cached_map(ds, fn, tokenizer, opts, extra=opts.prompt_template if prompted else None)

    def collator(self, tokenizer, model=None):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)  # labels padded by position

    # ---- evaluation

    def preprocess_logits(self, logits, labels):
        """Per row [summed NLL, predicted tokens], so perplexity is exact (token-weighted) and the eval
        keeps 2 numbers per row instead of T x V logits."""
        import torch
        import torch.nn.functional as F

        if isinstance(logits, tuple):
            logits = logits[0]
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
        mask = shift_labels.ne(-100)
        return torch.stack([(nll * mask).sum(dim=1), mask.sum(dim=1).to(nll.dtype)], dim=1)

    def score(self, predictions, label_ids, raw, tokenizer, opts, references=None) -> Scored:
        total, n = float(predictions[:, 0].sum()), int(predictions[:, 1].sum())
        metrics = {"perplexity": M.perplexity(total, n), "loss": total / max(n, 1), "eval_tokens": n}
        return Scored(rounded(metrics), outputs=[float(x) for x in predictions[:, 0]])

    def evaluate(self, model, tokenizer, raw, opts: EvalOptions) -> Scored:
        scored = super().evaluate(model, tokenizer, raw, opts)
        if "source" in raw.column_names:  # prompt -> target rows: do the completions match?
            prompts = [opts.prompt_template.format(source=s) for s in raw["source"]]
            got = generate_completions(model, tokenizer, prompts, batch_size=opts.batch_size, gen_kwargs=opts.generation)
            hits = [g == t.strip() for g, t in zip(got, raw["target"])]
            scored.metrics["exact_match"] = round(sum(hits) / max(len(hits), 1), 4)
            scored.rows = [{"prompt": p, "target": t, "predicted": g} for p, t, g in zip(prompts, raw["target"], got)]
        elif "text" in raw.column_names:  # plain text: how a few texts go on, beside how the model continues them
            scored.rows = continuations(model, tokenizer, raw["text"], opts)
        return scored

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        import numpy as np

        from pipelines.packing import unigram_nll

        vocab = len(tokenizer)
        counts = np.zeros(vocab, dtype=np.int64)
        for labels in self.encode(train_raw, tokenizer, opts)["labels"]:
            ids = np.asarray(labels[1:])  # targets only: the first token is never predicted
            counts += np.bincount(ids[ids >= 0], minlength=vocab)[:vocab]
        targets = [t for labels in self.encode(raw, tokenizer, opts)["labels"] for t in labels[1:] if t >= 0]
        nll, n = unigram_nll(counts, targets)
        return {"unigram": rounded({"perplexity": M.perplexity(nll, n), "loss": nll / max(n, 1)})}

    def baseline_notes(self):
        return {"unigram": "add-one unigram model of the train split's target tokens, on the same tokens"}

    # ---- serving

    def serve_setup(self, served):
        tok = served.processor
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.padding_side = "left"  # new tokens follow the prompt in every row

    def serve_items(self, req, limits: ServeLimits):
        n = new_tokens(req.max_new_tokens, limits.default_new_tokens, limits)
        check_lengths([req.prompt], limits, "prompt")
        return (n,), [req.prompt]

    def serve_batch(self, served, params, items):
        import torch

        (max_new,) = params
        tok = served.processor
        enc = encode_prompts(served, items, max_new)
        with torch.inference_mode():
            out = served.model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        ids = out[:, enc["input_ids"].shape[1]:]
        new = tok.batch_decode(ids, skip_special_tokens=True)
        full = tok.batch_decode(out, skip_special_tokens=True)  # left padding is skipped too
        return [{"completion": n, "generated_text": f, "completion_tokens": k}
                for n, f, k in zip(new, full, new_token_counts(ids.tolist(), tok.eos_token_id))]

    def serve_response(self, served, outputs):
        return {"model": served.name, **outputs[0]}

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'generate = pipeline("text-generation", model="{repo}")',
            'print(generate("To be, or not to be", max_new_tokens=40)[0]["generated_text"])',
        ]


def encode_prompts(served, prompts: list[str], max_new: int, tok=None, return_tensors: str | None = "pt"):
    """A batch of prompts for generate() on a served model: left-padded, and cut from the left so that prompt
    + new tokens fit the model's positions. `tok`: another copy of the served tokenizer (another thread's)."""
    tok = tok or served.processor
    tok.truncation_side = "left"
    return tok(prompts, padding=True, truncation=True, max_length=max(1, served.max_length - max_new),
               return_tensors=return_tensors, return_token_type_ids=False)


def set_eos(model, tokenizer) -> None:
    """EOS / pad ids of a generating model's config and generation config from its tokenizer."""
    if tokenizer.eos_token_id is None:
        return
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def continuations(model, tokenizer, texts, opts, n: int = 4, prompt_words: int = 12, target_words: int = 24) -> list[dict]:
    """Predictions worth reading for plain text: the first `n` texts (of the first 200) long enough, their
    first `prompt_words` words as the prompt, the next `target_words` as the reference, the model's greedy /
    beam continuation (at most 32 new tokens, a quarter of max_length) as the prediction."""
    pairs = []
    for text in texts[:200]:
        words = text.split()
        if len(words) >= prompt_words + 4:
            pairs.append((" ".join(words[:prompt_words]), " ".join(words[prompt_words:prompt_words + target_words])))
        if len(pairs) == n:
            break
    if not pairs:
        return []
    # prompt + new tokens within the positions the model was trained on: the prompt cut from the left
    new = min(opts.generation.get("max_new_tokens", 32), 32, opts.max_length // 4)
    prompts = [tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"][-(opts.max_length - new):])
               for p, _ in pairs]
    got = generate_completions(model, tokenizer, prompts, batch_size=opts.batch_size,
                               gen_kwargs={**opts.generation, "max_new_tokens": new})
    return [{"prompt": p, "target": t, "predicted": g} for p, (_, t), g in zip(prompts, pairs, got)]


def generate_completions(model, tokenizer, prompts: list[str], *, batch_size: int, gen_kwargs: dict) -> list[str]:
    """Greedy / beam completions of prompts by a causal LM (left-padded; only new tokens decoded)."""
    from pipelines.tasks.translation import decode

    return [text for new in generate_new_ids(model, tokenizer, prompts, batch_size=batch_size, gen_kwargs=gen_kwargs)
            for text in decode(tokenizer, new)]


def generate_new_ids(model, tokenizer, prompts: list[str], *, batch_size: int, gen_kwargs: dict):
    """Per batch of prompts (left-padded), the ids generate() added after them (a (batch, new) tensor)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        model.eval()
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, **gen_kwargs, pad_token_id=tokenizer.pad_token_id)
            yield gen[:, enc["input_ids"].shape[1]:]
    finally:
        tokenizer.padding_side = side


TASK = CausalLM()
