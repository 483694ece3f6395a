"""Translation: a text in one language -> its translation (a sequence-to-sequence model).

Data roles `source` + `target`; an AutoModelForSeq2SeqLM (Marian, BART, T5, ...). Source and target each
end with EOS. Metrics come from generate() text, decoded with special tokens skipped, against the raw
(untokenised) references (PITFALLS: never from teacher-forced outputs): sacreBLEU BLEU and chrF++.
Baseline: copying the source unchanged (what a model that learned nothing but to echo scores; it is not
zero between related languages, and names and numbers survive it).

The summarisation task (pipelines/tasks/summarization.py) is this task with other metrics, baselines,
names and endpoint.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from pipelines import metrics as M
from pipelines.errors import PipelinesError
from pipelines.tasks.base import (EvalOptions, Scored, Task, arch_in, batches, new_token_counts, new_tokens, on_device,
                                  texts_of)


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr | list[StrictStr] = Field(description="One text or a list of texts.")
    max_new_tokens: StrictInt | None = Field(None, ge=1)


class Translation(Task):
    name = "translation"
    aliases = ("seq2seq", "text2text-generation", "translate")
    pipeline_tag = "translation"
    peft_task_type = "SEQ_2_SEQ_LM"
    endpoint = "/translate"
    description = "a text -> its translation"
    roles = ("source", "target")
    family = "encoder-decoder"
    main_metric = "bleu"
    generative = True
    vocab_output = True
    Request = TranslateRequest
    response_key = "translations"
    task_params_key = "translation"  # config.task_specific_params key that marks a model of this task
    export_outputs = ("logits",)
    export_graph = "encoder-decoder"  # encoder, decoder prefill, decoder step over an EncoderDecoderCache

    # ---- model

    def auto_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def detect(self, config: dict) -> bool:
        return is_seq2seq(config) and not summariser(config)

    def from_pretrained(self, folder, **kwargs):
        """A seq2seq LM folder as it is; an encoder-only one (BERT, MiniLM, RoBERTa) warm-starts both halves of
        an EncoderDecoderModel (Rothe, Narayan, Severyn 2020: "BERT2BERT"; the decoder gets causal masks and new
        cross-attention), which is how a pretrained starting point is had offline from the shipped MiniLM."""
        from transformers import AutoConfig, EncoderDecoderModel

        config = AutoConfig.from_pretrained(folder, trust_remote_code=kwargs.get("trust_remote_code", False))
        if config.is_encoder_decoder:
            return super().from_pretrained(folder, **kwargs)
        try:
            return EncoderDecoderModel.from_encoder_decoder_pretrained(str(folder), str(folder))
        except (ValueError, TypeError, KeyError) as e:
            raise PipelinesError(f"{folder} holds a {config.model_type} model, which is not a sequence-to-sequence "
                                 f"model and cannot warm-start one ({' '.join(str(e).split())[:160]})") from None

    def configure(self, model, tokenizer):
        from pipelines.tasks.causal_lm import set_eos

        super().configure(model, tokenizer)
        if type(model).__name__ == "EncoderDecoderModel" and model.config.decoder_start_token_id is None:
            # BERT2BERT: [CLS] starts the decoder, [SEP] ends a text (WordPiece tokenizers have no BOS / EOS)
            model.config.decoder_start_token_id = tokenizer.cls_token_id
            model.config.eos_token_id = tokenizer.sep_token_id
            model.generation_config.decoder_start_token_id = tokenizer.cls_token_id
            model.generation_config.eos_token_id = tokenizer.sep_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        set_eos(model, tokenizer)
        params = dict(getattr(model.config, "task_specific_params", None) or {})
        params.setdefault(self.task_params_key, {})
        model.config.task_specific_params = params  # saved in config.json: what the folder is for

    # ---- data

    def encode(self, ds, tokenizer, opts: EvalOptions):
        eos = tokenizer.eos_token_id
        # a WordPiece tokenizer (BERT2BERT) wraps texts in [CLS] ... [SEP]; [CLS] starts the decoder, so a target
        # keeps only what follows it: the decoder learns the first word from [CLS], not [CLS] again
        lead = tokenizer.cls_token_id if eos is None else None

        def with_eos(ids):
            return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]

        def target(ids):
            return with_eos(ids[1:] if lead is not None and ids and ids[0] == lead else ids)

        def fn(batch):
            src = tokenizer(batch["source"], truncation=True, max_length=opts.max_length - 1)["input_ids"]
            tgt = tokenizer(text_target=batch["target"], truncation=True, max_length=opts.max_target_length - 1)["input_ids"]
            src = [with_eos(s) for s in src]
            return {"input_ids": src, "attention_mask": [[1] * len(s) for s in src], "labels": [target(t) for t in tgt]}

        return self._cached_map(ds, fn, tokenizer, opts)

    def collator(self, tokenizer, model=None):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)

    def vocab_texts(self, ds):
        return list(ds["source"])

    # ---- evaluation

    def compute_metrics(self, tokenizer, opts, references=None):
        def fn(p) -> dict:
            return self.text_scores(decode(tokenizer, p.predictions), references)

        return fn

    def text_scores(self, predictions: list[str], references: list[str]) -> dict:
        return {"bleu": round(M.bleu(predictions, references)["score"], 3),
                "chrf": round(M.chrf(predictions, references)["score"], 3)}

    def score(self, predictions, label_ids, raw, tokenizer, opts, references=None) -> Scored:
        texts = decode(tokenizer, predictions)
        refs = references if references is not None else list(raw["target"])
        rows = [] if raw is None else [{"source": s, "target": t, "predicted": p}
                                       for s, t, p in zip(raw["source"], refs, texts)]
        return Scored(self.text_scores(texts, refs), rows=rows, outputs=texts)

    def predict(self, model, data, collate, opts):
        """Generated ids (rows padded with -100) and the label ids, in row order."""
        import numpy as np
        import torch

        model.eval()
        preds, labels = [], []
        with torch.inference_mode():
            for batch in batches(data, collate, opts.batch_size):
                batch = on_device(batch, model)
                lab = batch.pop("labels")
                batch.pop("decoder_input_ids", None)
                gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **opts.generation)
                preds += gen.tolist()
                labels += lab.tolist()
        width = max(map(len, preds))
        return np.array([p + [-100] * (width - len(p)) for p in preds]), labels

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        return {"copy_source": self.text_scores(list(raw["source"]), list(raw["target"]))}

    def baseline_notes(self):
        return {"copy_source": "the source text unchanged, as the translation"}

    # ---- serving

    def serve_items(self, req, limits):
        n = new_tokens(req.max_new_tokens, min(limits.default_new_tokens * 4, limits.max_new_tokens), limits)
        return (n,), texts_of(req.text, limits)

    def serve_batch(self, served, params, items):
        import torch

        (max_new,) = params
        enc = served.processor(items, padding=True, truncation=True, max_length=served.max_length, return_tensors="pt",
                               return_token_type_ids=False)
        with torch.inference_mode():
            out = served.model.generate(**enc, max_new_tokens=max_new, do_sample=False, num_beams=1)
        texts = served.processor.batch_decode(out, skip_special_tokens=True)
        counts = new_token_counts(out[:, 1:].tolist(), served.processor.eos_token_id)  # (after the decoder start)
        return [{"text": t, "completion_tokens": n} for t, n in zip(texts, counts)]

    def serve_response(self, served, outputs):
        return {"model": served.name, self.response_key: [o["text"] for o in outputs]}

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            f'model = AutoModelForSeq2SeqLM.from_pretrained("{repo}")',
            'inputs = tokenizer("A man is riding a bicycle.", return_tensors="pt")',
            "out = model.generate(**inputs, max_new_tokens=64)",
            "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        ]


def is_seq2seq(config: dict) -> bool:
    return bool(config.get("is_encoder_decoder")) or arch_in(config, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")


def summariser(config: dict) -> bool:
    """A seq2seq folder marked as a summariser in task_specific_params (as facebook/bart-large-cnn's
    config.json is, and as the summarisation task saves it), and not also as a translator (T5 is both)."""
    keys = list(config.get("task_specific_params") or {})
    return "summarization" in keys and not any(k.startswith("translation") for k in keys)


def decode(tokenizer, ids) -> list[str]:
    """Generated ids -> text, special tokens skipped (-100 padding from the Trainer's gather removed)."""
    import numpy as np

    ids = np.asarray(ids)
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)]


TASK = Translation()
