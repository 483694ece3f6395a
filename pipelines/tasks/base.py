"""The Task contract: everything that differs between tasks, in one object per task.

A stage asks its task; it never branches on a task name. A task module (`pipelines/tasks/<task>.py`)
exposes `TASK = <a Task subclass>()` and one line in `TASKS` (`pipelines/tasks/__init__.py`) registers it.

What a task owns, by the stage that asks for it:

    names        name (the one used in recipes, data cards, manifests, cards, endpoints) + aliases,
                 the Hub pipeline_tag, peft's TaskType, the serve endpoint
    data         roles it reads from a data card, checks of a loaded card (label names, roles)
    model        Auto class, how a model folder is recognised (config.json), label kwargs, pad / EOS
                 ids, the heads a LoRA run must train in full, the model family (encoder, decoder, ...)
    training     encode (role columns -> model inputs + labels), collator, the Trainer's
                 preprocess_logits / compute_metrics, its loss when it has its own
    evaluation   predict a split offline (what every stage uses: finetune, distill, quantize, ...),
                 score it (metrics + a report + prediction rows), the main metric and its direction,
                 trivial baselines scored on the same split
    distill      the per-item KD loss, which positions hidden / attention terms compare
    serve        request schema, how a request becomes items, the batched model call, the response
    export       which graphs are exported (one forward pass, or the steps of generate() over a KV cache) and
                 the outputs they return
    publish      the usage snippet of the model card

Defaults here are what most text tasks share; a task overrides what differs, and a capability a task
lacks raises a clear PipelinesError (checked at `validate` where the config says enough).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from pipelines.errors import PipelinesError


# config.json key naming the task, for a task whose models have no head of their own (a chat model is a causal LM)
MARKER = "pipelines_task"


@dataclass
class EvalOptions:
    """How a split is encoded and predicted; the same options the finetune stage trained with."""

    max_length: int = 128
    max_target_length: int = 128
    prompt_template: str = "{source}\n"
    generation: dict = field(default_factory=lambda: {"num_beams": 1, "max_new_tokens": 64})
    batch_size: int = 32
    label_names: list[str] | None = None
    threshold: float | list[float] = 0.5  # multi-label: per-label decision thresholds


@dataclass
class Scored:
    """One model scored on one split."""

    metrics: dict[str, float]  # flat numbers; the task's main metric among them
    report: dict = field(default_factory=dict)  # detail for the manifest (confusion matrix, per type, ...)
    rows: list[dict] = field(default_factory=list)  # predictions_<split>.jsonl: input, reference, prediction
    outputs: list = field(default_factory=list)  # per example, comparable across reloads (ids, texts, NLL)


class RequestError(PipelinesError):
    """A serve request the task cannot take: HTTP `status` with a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class TextsRequest(BaseModel):
    """Strict types: a number is not silently turned into a text."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr | list[StrictStr] = Field(description="One text or a list of texts.")


@dataclass
class ServeLimits:
    max_chars: int = 2000  # per text
    max_items: int = 64  # texts (images) per request
    max_new_tokens: int = 256  # upper bound a client may ask for
    default_new_tokens: int = 32
    max_image_bytes: int = 10_000_000  # per image file

    def body_bytes(self, inputs: str) -> int:
        """Cap of a request body: a JSON-escaped char takes up to 6 bytes; base64 makes 4 of 3 bytes."""
        per_item = self.max_image_bytes * 4 // 3 + 1024 if inputs == "image" else self.max_chars * 6
        return per_item * self.max_items + 65536


class Task:
    # ---- names
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    pipeline_tag: ClassVar[str] = ""
    peft_task_type: ClassVar[str | None] = None  # a peft TaskType member name
    endpoint: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # ---- data and model
    roles: ClassVar[tuple[str, ...]] = ()  # data card roles it reads
    labelled: ClassVar[bool] = False  # the card's label_names become the model's id2label
    family: ClassVar[str] = "encoder"  # encoder | decoder | encoder-decoder | vision
    inputs: ClassVar[str] = "text"  # text | image: what the processor turns into model inputs
    # ---- evaluation
    main_metric: ClassVar[str] = ""
    greater_is_better: ClassVar[bool] = True
    generative: ClassVar[bool] = False  # scored on generate() text (Seq2SeqTrainer, predict_with_generate)
    scores_base_model: ClassVar[bool] = False  # the untrained base already does the task: score it too
    class_weighted: ClassVar[bool] = False  # takes finetune's class_weights (a weighted loss over its labels)
    thresholded: ClassVar[bool] = False  # predictions are scores against decision thresholds (tunable)
    packable: ClassVar[bool] = False  # finetune's `packing` (examples concatenated per batch row) is safe for it
    conversational: ClassVar[bool] = False  # reads conversations through a chat template (takes `chat_template`)
    Augment: ClassVar[type[BaseModel] | None] = None  # finetune's `augment:` (train-time only), if the task has one
    # ---- distillation
    shift_labels: ClassVar[bool] = False  # logits at t are scored against the label at t+1 (causal LM)
    per_example: ClassVar[bool] = False  # one KD item per example (else per labelled position)
    vocab_output: ClassVar[bool] = False  # the output layer is the vocabulary (no vocabulary trimming)
    trainer_args: ClassVar[dict] = {}  # TrainingArguments this task needs (e.g. keep columns a transform reads)
    Request: ClassVar[type[BaseModel]] = TextsRequest
    openai_compatible: ClassVar[bool] = False  # serve: also the OpenAI-style /v1 completions + chat endpoints
    upload_field: ClassVar[str | None] = None  # serve: a field whose values may come as uploaded files (multipart)
    # ---- export (the export stage: ONNX Runtime / OpenVINO graphs)
    export_outputs: ClassVar[tuple[str, ...]] = ("logits",)  # what one forward pass must return: all that evaluate
    # and serve_batch read of a model call, so the exported graph is a drop-in for the torch model
    export_graph: ClassVar[str] = "forward"  # "forward": one graph of the forward pass (torch.onnx); "decode": a
    # decoding step over a KV cache, "encoder-decoder": encoder + decoder graphs over one (transformers.exporters),
    # which generate() drives (pipelines/runtimes_lm.py)

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # ================================================================ model

    def auto_class(self):
        raise NotImplementedError

    def detect(self, config: dict) -> bool:
        """Whether a model folder's config.json (as a dict) holds a model of this task."""
        return False

    def from_pretrained(self, folder, **kwargs):
        """The task's model on a pretrained folder (or Hub name)."""
        return self.auto_class().from_pretrained(folder, **kwargs)

    def model_kwargs(self, label_names: list[str] | None) -> dict:
        """Extra from_pretrained / from_config kwargs (label heads)."""
        return {}

    def configure(self, model, tokenizer) -> None:
        """Embeddings sized for the tokenizer, pad / EOS ids and task markers in the config, after loading
        (saved with the model)."""
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))  # pitfall: added tokens beyond the model's vocab
        model.config.pad_token_id = tokenizer.pad_token_id
        if hasattr(model.config, MARKER):  # a task that marks its models (chat) marked this one: not any more
            delattr(model.config, MARKER)

    def head_modules(self, model) -> list[str]:
        """Freshly initialised head modules a LoRA run must train and save in full."""
        return []

    def load_processor(self, folder):
        """The tokenizer (image processor for image tasks) saved in a model folder."""
        from pathlib import Path

        from transformers import AutoTokenizer

        if not (Path(folder) / "tokenizer_config.json").is_file():
            raise PipelinesError(f"no tokenizer (tokenizer_config.json) in {folder}")
        return AutoTokenizer.from_pretrained(folder)

    def base_processor(self, base, tokenizer_dir, scratch_overrides: dict, trust_remote_code: bool = False):
        """The processor a training stage starts from: an earlier tokenizer stage's, else the base model's."""
        from pipelines import basemodel

        return basemodel.load_tokenizer(base, tokenizer_dir, trust_remote_code)

    def prepare_processor(self, tokenizer) -> list[str]:
        """Padding for training and batched inference: a real pad token where the tokenizer has one.
        Without one, EOS doubles as pad, which is safe here because labels are padded with -100 *by
        position* (the collators), never by comparing ids with the pad id, so the EOS that ends each
        example keeps its label."""
        notes = []
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise PipelinesError("the tokenizer has neither a pad nor an EOS token; add a pad token to it")
            tokenizer.pad_token = tokenizer.eos_token
            notes.append("tokenizer has no pad token: EOS is used for padding (labels masked by position, EOS kept)")
        tokenizer.padding_side = "right"
        return notes

    # ================================================================ data

    def required_roles(self, columns) -> tuple[str, ...]:
        """The roles this task needs from a split that has `columns`."""
        return self.roles

    def data_problems(self, roles, label_names, where) -> list[str]:
        """What a data card with these roles and label names lacks for this task (validate asks this too)."""
        have = set(roles)
        need = set(self.required_roles(have))
        problems = []
        if not need <= have:
            problems.append(f"task {self.name} needs the roles {sorted(need)}; data card {where} gives {sorted(have)}")
        if self.labelled and not label_names:
            problems.append(f"task {self.name} needs label_names in data card {where}")
        return problems

    def check_data(self, card, dsd) -> list[str] | None:
        """Fail before any model work when the loaded card cannot serve this task; returns label names
        (labelled tasks) or None."""
        have = dsd["train"].column_names if "train" in dsd else next(iter(dsd.values())).column_names
        problems = self.data_problems(have, card.label_names, card.path)
        if problems:
            raise PipelinesError(problems[0])
        return list(card.label_names) if self.labelled else None

    def train_notes(self, train, label_names) -> list[str]:
        """Warnings about the train split worth a line in the log and the manifest (raise when it cannot
        train this task at all)."""
        return []

    def encode(self, ds, tokenizer, opts: EvalOptions):
        raise NotImplementedError

    def encode_train(self, ds, tokenizer, opts: EvalOptions, augment=None):
        """The train split as the Trainer reads it: `encode`, plus the task's train-time augmentation
        (an `Augment` instance) where it has one; evaluation never sees it."""
        return self.encode(ds, tokenizer, opts)

    def collator(self, tokenizer, model=None):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def vocab_texts(self, ds) -> list[str]:
        """The texts a split feeds the tokenizer (vocabulary trimming)."""
        raise PipelinesError(f"task {self.name} has no text inputs whose vocabulary could be trimmed")

    def _cached_map(self, ds, fn, tokenizer, opts: EvalOptions, extra=None):
        """ds.map on disk under $PIPELINES_CACHE/tokenized (packing.cached_map), keyed by the rows' content
        fingerprint, the task, the tokenizer's content and the options that change the encoding: a second
        run on the same rows reads the encoded split back instead of re-tokenising it, and a changed
        tokenizer is a miss, never stale ids (PITFALLS: 'stale preprocessing cache')."""
        from pipelines.packing import cached_map, tokenizer_fingerprint

        key = {"what": "encode", "task": self.name, "tokenizer": tokenizer_fingerprint(tokenizer),
               "max_length": opts.max_length, "max_target_length": opts.max_target_length, "extra": extra,
               "version": "encode-v3"}
        return cached_map(ds, fn, key, remove_columns=ds.column_names, desc=f"encoding ({self.name})")

    # ================================================================ training metrics

    def preprocess_logits(self, logits, labels):
        """The Trainer's preprocess_logits_for_metrics: what is kept of the logits per batch."""
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.argmax(dim=-1)

    def compute_metrics(self, tokenizer, opts: EvalOptions, references=None):
        """The Trainer's compute_metrics during training (early stopping, best checkpoint): the main
        scores of `score` on the validation split."""

        def fn(p) -> dict:
            m = self.score(p.predictions, p.label_ids, None, tokenizer, opts, references=references).metrics
            return {k: v for k, v in m.items() if isinstance(v, (int, float))}

        return fn

    def loss_function(self, train_raw, opts: EvalOptions, class_weights):
        """compute_loss_func for the Trainer, or None for the model's own loss."""
        if class_weights is not None:
            raise PipelinesError(f"class_weights is not used by task {self.name}")
        return None

    # ================================================================ evaluation

    def score(self, predictions, label_ids, raw, tokenizer, opts: EvalOptions, references=None) -> Scored:
        """Metrics (and, when `raw` is the split's raw rows, prediction rows) from what `predict` (or the
        Trainer with preprocess_logits) returned."""
        raise NotImplementedError

    def predict(self, model, data, collate, opts: EvalOptions):
        """(predictions, label_ids) of `model` on an encoded split, as Trainer.predict returns them:
        preprocess_logits per batch, rows padded with -100 and concatenated, in row order."""
        import torch
        from transformers.trainer_pt_utils import nested_concat, nested_numpify

        model.eval()
        preds = labels = None
        with torch.inference_mode():
            for batch in batches(data, collate, opts.batch_size):
                batch = on_device(batch, model)
                lab = batch.pop("labels")
                out = self.preprocess_logits(model(**batch).logits.float(), lab)
                preds = out if preds is None else nested_concat(preds, out, padding_index=-100)
                labels = lab if labels is None else nested_concat(labels, lab, padding_index=-100)
        return nested_numpify(preds), nested_numpify(labels)

    def evaluate(self, model, tokenizer, raw, opts: EvalOptions) -> Scored:
        """THE offline evaluation of a model on a split's raw rows: encode, predict, score."""
        data = self.encode(raw, tokenizer, opts)
        preds, label_ids = self.predict(model, data, self.collator(tokenizer, model), opts)
        return self.score(preds, label_ids, raw, tokenizer, opts)

    def tune(self, model, tokenizer, raw, opts: EvalOptions):
        """Fit the decision thresholds on a (validation) split, store them in model.config; returns them."""
        raise PipelinesError(f"task {self.name} has no decision thresholds to tune")

    def baselines(self, train_raw, raw, opts: EvalOptions, tokenizer=None) -> dict[str, dict]:
        """Trivial models scored on the same split: {name: metrics}. What a trained model must beat."""
        return {}

    def baseline_notes(self) -> dict[str, str]:
        """{baseline name: what it is}, for reports and cards."""
        return {}

    # ================================================================ distillation

    def kd_loss_sum(self, s_logits, t_logits, labels, alpha: float, temperature: float):
        """Sum over items of alpha*CE + (1-alpha)*T^2*KL(teacher || student), and the item mask.
        Items: rows of (B, C) logits with (B,) labels, or positions of (B, L, V) logits with (B, L) labels;
        shift_labels aligns causal-LM logits at t with the label at t+1. Labels of -100 are not items."""
        import torch.nn.functional as F

        if self.shift_labels:
            s_logits, labels = s_logits[:, :-1], labels[:, 1:]
            t_logits = t_logits[:, :-1] if t_logits is not None else None
        mask = labels.ne(-100)
        s = s_logits[mask].float()
        total = alpha * F.cross_entropy(s, labels[mask], reduction="sum") if alpha > 0 else s.new_zeros(())
        if alpha < 1:
            t = t_logits[mask].float()
            T = temperature
            kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="sum")
            total = total + (1 - alpha) * T * T * kl
        return total, mask

    def kd_positions(self, inputs: dict, labels):
        """(B, L) positions whose hidden states / attention rows the KD terms compare: real tokens of
        each example (per_example tasks), else the positions that predict a label."""
        import torch

        if self.per_example:
            am = inputs.get("attention_mask")
            return am.bool() if am is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        mask = torch.zeros_like(labels, dtype=torch.bool)
        if self.shift_labels:
            mask[:, :-1] = labels[:, 1:].ne(-100)
        else:
            mask[:] = labels.ne(-100)
        return mask

    # ================================================================ serving

    def serve_setup(self, served) -> None:
        """Adjust the served processor for batched inference (pad token, padding side)."""

    def serve_items(self, req, limits: ServeLimits) -> tuple[tuple, list]:
        """A validated request -> (params that must be equal within one batch, items); RequestError if bad."""
        return (), texts_of(req.text, limits)

    def serve_batch(self, served, params: tuple, items: list) -> list[dict]:
        """One model call for a batch of items (on the inference thread)."""
        raise NotImplementedError

    def serve_response(self, served, outputs: list[dict]) -> dict:
        return {"model": served.name, "predictions": outputs}

    # ================================================================ publish

    def usage(self, repo: str) -> list[str]:
        """Lines of Python that load and call the published model."""
        raise NotImplementedError


# ---------------------------------------------------------------- helpers shared by tasks


def texts_of(text, limits: ServeLimits, field_name: str = "text") -> list[str]:
    """One text or a list -> a non-empty list within the serve limits; RequestError otherwise."""
    texts = [text] if isinstance(text, str) else list(text)
    if not texts:
        raise RequestError(422, f"{field_name}: give at least one text")
    if len(texts) > limits.max_items:
        raise RequestError(413, f"{field_name}: {len(texts)} texts in one request; the limit is {limits.max_items}")
    if any(not t.strip() for t in texts):
        raise RequestError(422, f"{field_name}: empty text")
    check_lengths(texts, limits, field_name)
    return texts


def check_lengths(texts: list[str], limits: ServeLimits, field_name: str) -> None:
    for i, t in enumerate(texts):
        if len(t) > limits.max_chars:
            where = field_name if len(texts) == 1 else f"{field_name}[{i}]"
            raise RequestError(413, f"{where} has {len(t)} characters; the limit is {limits.max_chars} (serve --max-chars)")


def new_tokens(n: int | None, default: int, limits: ServeLimits) -> int:
    if n is not None and n > limits.max_new_tokens:
        raise RequestError(422, f"max_new_tokens: {n} is over the limit of {limits.max_new_tokens} (serve --max-new-tokens)")
    return default if n is None else n


def new_token_counts(rows: list[list[int]], eos: int | None) -> list[int]:
    """Tokens generate() made per row: up to and including the first end-of-sequence token (after it, padding)."""
    return [row.index(eos) + 1 if eos is not None and eos in row else len(row) for row in rows]


def batches(ds, collate, batch_size: int):
    for i in range(0, len(ds), batch_size):
        yield collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])


def on_device(batch: dict, model) -> dict:
    """The batch's tensors on the model's device (a bitsandbytes model lives on the GPU), its float inputs (image
    pixels) in the model's dtype (a bf16 model takes bf16 pixels); labels as they are."""
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    out = {}
    for k, v in batch.items():
        if hasattr(v, "to"):
            if dtype is not None and k != "labels" and v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
            if device is not None:
                v = v.to(device)
        out[k] = v
    return out


def label_kwargs(label_names: list[str]) -> dict:
    """num_labels + id2label / label2id: saved in config.json, so served models answer with names."""
    return dict(
        num_labels=len(label_names),
        id2label={i: n for i, n in enumerate(label_names)},
        label2id={n: i for i, n in enumerate(label_names)},
    )


def id2label(config) -> dict[int, str]:
    return {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}


def arch_in(config: dict, mapping_name: str) -> bool:
    """Whether config.json's architectures are in a transformers Auto mapping (by its NAMES table)."""
    from transformers.models.auto import modeling_auto as ma

    names = set(getattr(ma, mapping_name).values())
    return any(a in names for a in config.get("architectures") or [])


def heads_present(model, candidates=("classifier", "score", "pre_classifier")) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [h for h in candidates if h in names]


def rounded(d: dict, digits: int = 6) -> dict:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in d.items()}


def numbers(d: dict[str, Any]) -> dict[str, Any]:
    """Only the flat numbers of a report (what `pipelines status` shows)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
