"""Token classification (NER): a BIO tag per word.

Data roles `tokens` (a sentence's words) + `tags` (ids in the card's `label_names`, the BIO tags), from a
`format: conll` card. Words are fed pre-split (is_split_into_words=True); only the first sub-token of each
word carries its tag (the word's other sub-tokens, special tokens and padding are -100: not trained on,
not scored, not distilled). Metrics: seqeval's entity precision / recall / F1 (micro), F1 per entity
type, token accuracy. Baseline: each word's most frequent tag in the train split (else O). Served as
entities with character spans, grouped from BIO tags like transformers' token-classification pipeline
with aggregation_strategy="first".
"""

from __future__ import annotations

from collections import Counter, defaultdict

from pipelines import metrics as M
from pipelines.errors import PipelinesError
from pipelines.tasks.base import EvalOptions, Scored, Task, arch_in, heads_present, id2label, label_kwargs, rounded

# the headline numbers of a token-classification evaluation (seqeval's report has per-type detail besides)
ENTITY_SCORES = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")


class TokenClassification(Task):
    name = "token-classification"
    aliases = ("ner", "token_classification")
    pipeline_tag = "token-classification"
    peft_task_type = "TOKEN_CLS"
    endpoint = "/predict"
    description = "a BIO tag per word (named entities)"
    roles = ("tokens", "tags")
    labelled = True
    family = "encoder"
    main_metric = "entity_f1"

    # ---- model

    def auto_class(self):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    def detect(self, config: dict) -> bool:
        return arch_in(config, "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES") or any(
            a.endswith("ForTokenClassification") for a in config.get("architectures") or [])

    def model_kwargs(self, label_names):
        return label_kwargs(label_names)

    def head_modules(self, model):
        return heads_present(model)

    def prepare_processor(self, tokenizer):
        notes = super().prepare_processor(tokenizer)
        check_word_tokenizer(tokenizer)
        return notes

    # ---- data

    def encode(self, ds, tokenizer, opts: EvalOptions):
        def fn(batch):
            enc = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=opts.max_length)
            labels = []
            for i, tags in enumerate(batch["tags"]):
                ids = enc.word_ids(i)
                row = [-100] * len(ids)
                for pos, w in first_subtokens(ids):
                    row[pos] = tags[w]
                labels.append(row)
            enc["labels"] = labels
            return enc

        return self._cached_map(ds, fn, tokenizer, opts)

    def collator(self, tokenizer, model=None):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer, label_pad_token_id=-100)

    def vocab_texts(self, ds):
        # BERT's pre-tokenizer splits on whitespace and punctuation, so the joined words give the pieces
        # that is_split_into_words gives word by word
        return [" ".join(words) for words in ds["tokens"]]

    # ---- evaluation

    def score(self, predictions, label_ids, raw, tokenizer, opts, references=None) -> Scored:
        names = opts.label_names
        report = M.token_classification_report(predictions, label_ids, names)
        metrics = {k: report[k] for k in ENTITY_SCORES}
        metrics.update({f"entity_f1_{t}": f for t, f in report["f1_per_type"].items()})
        outputs = [[int(p) for p, r in zip(pr, rr) if r != -100] for pr, rr in zip(predictions, label_ids)]
        rows = []
        if raw is not None:
            words = word_predictions(tokenizer, list(raw["tokens"]), predictions, opts.max_length)
            n_words, n_scored = sum(map(len, words)), sum(p is not None for w in words for p in w)
            report["words_scored"] = f"{n_scored:,} of {n_words:,} words (the rest: cut by max_length or no sub-token)"
            rows = [{"tokens": t, "tags": [names[y] for y in ys],
                     "predicted": [names[p] if p is not None else None for p in ps]}
                    for t, ys, ps in zip(raw["tokens"], raw["tags"], words)]
        return Scored(rounded(metrics), report, rows, outputs)

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        """Each word's most frequent tag in train (lower-cased), O for unseen words: scored with seqeval."""
        names = opts.label_names
        o = names.index("O") if "O" in names else 0
        counts: dict[str, Counter] = defaultdict(Counter)
        for words, tags in zip(train_raw["tokens"], train_raw["tags"]):
            for w, t in zip(words, tags):
                counts[w.lower()][t] += 1
        best = {w: c.most_common(1)[0][0] for w, c in counts.items()}
        preds = [[names[best.get(w.lower(), o)] for w in words] for words in raw["tokens"]]
        refs = [[names[t] for t in tags] for tags in raw["tags"]]
        rep = M.seqeval(preds, refs)
        return {"most_frequent_tag": rounded({k: rep[k] for k in ENTITY_SCORES})}

    def baseline_notes(self):
        return {"most_frequent_tag": "each word's most frequent tag in the train split (lower-cased; unseen words: O)"}

    # ---- serving

    def serve_setup(self, served):
        if not getattr(served.processor, "is_fast", False):
            raise PipelinesError(f"{served.folder}: serving token classification needs a fast tokenizer (tokenizer.json)")

    def serve_batch(self, served, params, items):
        import torch

        tok = served.processor
        enc = tok(items, padding=True, truncation=True, max_length=served.max_length, return_tensors="pt",
                  return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping").tolist()
        with torch.inference_mode():
            probs = served.model(**enc).logits.float().softmax(-1)
        names = id2label(served.config)
        out = []
        for i, text in enumerate(items):
            word_ids = enc.word_ids(i)
            spans: dict[int, list[int]] = {}
            for pos, w in enumerate(word_ids):
                if w is not None:
                    spans.setdefault(w, [offsets[i][pos][0], offsets[i][pos][1]])[1] = offsets[i][pos][1]
            words = []
            for pos, w in first_subtokens(word_ids):
                p = probs[i, pos]
                k = int(p.argmax())
                words.append((names.get(k, f"LABEL_{k}"), float(p[k]), *spans[w]))
            out.append({"entities": group_entities(text, words)})
        return out

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'ner = pipeline("token-classification", model="{repo}", aggregation_strategy="first")',
            'print(ner("Jane Doe flew from Paris to New York"))',
        ]


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


def group_entities(text: str, words: list[tuple[str, float, int, int]]) -> list[dict]:
    """Words (tag, score, start, end) -> entities {entity_group, score, word, start, end}: B-x opens an
    entity, I-x continues an open x entity (else opens one), O closes; score = mean over its words."""
    entities: list[dict] = []
    cur = None
    for tag, score, start, end in words:
        prefix, _, kind = tag.partition("-")
        if prefix not in ("B", "I") or not kind:
            cur = None
            continue
        if prefix == "B" or cur is None or cur["entity_group"] != kind:
            cur = {"entity_group": kind, "scores": [], "start": start, "end": end}
            entities.append(cur)
        cur["scores"].append(score)
        cur["end"] = end
    return [{"entity_group": e["entity_group"], "score": sum(e["scores"]) / len(e["scores"]),
             "word": text[e["start"]:e["end"]], "start": e["start"], "end": e["end"]} for e in entities]


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


TASK = TokenClassification()
