"""The one implementation of every metric in `pipelines.metrics`.

Both consumers call these functions:

* the `evaluate` module scripts (`pipelines/metrics/<name>/<name>.py`): their `_compute` is a one-line call
  into this file. `evaluate.load` copies a script into its own module cache and imports it from there, so a
  script cannot use relative imports; it imports this file absolutely (`from pipelines.metrics import _impl`),
  which works wherever the scripts exist at all, because they ship as package data of the installed
  `pipelines` package;
* the thin wrappers in `pipelines/metrics/__init__.py` that stages call directly (no `evaluate`/`datasets`
  import, no Arrow round trip).

Everything here returns plain Python numbers / lists / dicts (JSON-able, no numpy scalars). scikit-learn and
sacrebleu are imported lazily, so importing this file is cheap.

Invalid input (empty, length mismatch, negative NLL, unknown label, ...) raises `MetricInputError`, which is a
`PipelinesError` (the CLI prints it as one message) and a `ValueError` (what `evaluate` users expect).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipelines.errors import PipelinesError


class MetricInputError(PipelinesError, ValueError):
    """The predictions/references handed to a metric are unusable."""


# --------------------------------------------------------------------------------------------- helpers


def _as_list(x: Any, what: str) -> list:
    if x is None:
        raise MetricInputError(f"{what} is None")
    if isinstance(x, (str, bytes)):
        raise MetricInputError(f"{what} must be a sequence of items, got a single {type(x).__name__}")
    if hasattr(x, "tolist"):  # numpy arrays, torch tensors
        x = x.tolist()
    try:
        return list(x)
    except TypeError:
        raise MetricInputError(f"{what} must be a sequence, got {type(x).__name__}") from None


def check_pair(predictions: Any, references: Any, metric: str) -> tuple[list, list]:
    """Both inputs as lists; non-empty and of equal length, else `MetricInputError`."""
    preds = _as_list(predictions, f"{metric}: predictions")
    refs = _as_list(references, f"{metric}: references")
    if not preds and not refs:
        raise MetricInputError(f"{metric}: got no predictions and no references (empty input); nothing to score")
    if len(preds) != len(refs):
        raise MetricInputError(
            f"{metric}: {len(preds)} prediction(s) but {len(refs)} reference(s); they must pair up one to one"
        )
    return preds, refs


def reject_empty_call(predictions, references, metric: str) -> None:
    """For the modules' `compute`: explicit empty inputs get `MetricInputError` instead of whatever `evaluate`
    happens to raise (an IndexError while it infers the feature format). None (data came via add_batch) passes."""
    sizes = [len(x) for x in (predictions, references) if x is not None and hasattr(x, "__len__")]
    if sizes and not any(sizes):
        raise MetricInputError(f"{metric}: got no predictions and no references (empty input); nothing to score")


def safe_exp(x: float) -> float:
    """`math.exp` that returns `inf` instead of raising `OverflowError` (and passes NaN through)."""
    x = float(x)
    if math.isnan(x):
        return math.nan
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _floats(values) -> float | list[float]:
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, list):
        return [float(v) for v in values]
    return float(values)


# ------------------------------------------------------------------------------------- classification


def accuracy_compute(predictions, references, normalize: bool = True, sample_weight=None) -> dict:
    """{"accuracy": fraction (or count if normalize=False) of exact matches} via sklearn.accuracy_score."""
    preds, refs = check_pair(predictions, references, "accuracy")
    from sklearn.metrics import accuracy_score

    return {"accuracy": float(accuracy_score(refs, preds, normalize=normalize, sample_weight=sample_weight))}


def f1_compute(
    predictions,
    references,
    average: str | None = "binary",
    labels=None,
    pos_label=1,
    sample_weight=None,
    zero_division: float = 0.0,
) -> dict:
    """{"f1": float} via sklearn.f1_score; with average=None, {"f1": [per-class f1, ...]} in `labels` order
    (sorted union of the labels seen when `labels` is None). average: binary | macro | micro | weighted | None.
    zero_division=0.0 (sklearn's value without its warning) for classes with no predicted and no true samples."""
    preds, refs = check_pair(predictions, references, "f1")
    if average not in ("binary", "macro", "micro", "weighted", None):
        raise MetricInputError(f"f1: average must be binary, macro, micro, weighted or None, got {average!r}")
    from sklearn.metrics import f1_score

    try:
        score = f1_score(
            refs,
            preds,
            labels=None if labels is None else list(labels),
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
    except ValueError as e:  # e.g. "Target is multiclass but average='binary'"
        raise MetricInputError(f"f1: {e}") from e
    return {"f1": _floats(score)}


def _label_indices(values: list, label_names: list[str], what: str) -> list[int]:
    index = {name: i for i, name in enumerate(label_names)}
    out = []
    for v in values:
        if isinstance(v, str):
            if v not in index:
                raise MetricInputError(f"classification_report: {what} label {v!r} is not one of {label_names}")
            out.append(index[v])
        else:
            try:
                i = int(v)
            except (TypeError, ValueError):
                raise MetricInputError(f"classification_report: {what} label {v!r} is not an int or a name") from None
            if i != v or not 0 <= i < len(label_names):
                raise MetricInputError(
                    f"classification_report: {what} label {v!r} is not an index into the "
                    f"{len(label_names)} label name(s) {label_names}"
                )
            out.append(i)
    return out


def classification_report_compute(predictions, references, label_names: Sequence[str]) -> dict:
    """Everything a classification stage reports, in one pass.

    predictions/references: label ids (ints indexing `label_names`) or label names. Returns
      accuracy; f1_macro, f1_micro (sklearn's default: over the labels that occur in predictions or
      references); f1 (binary, positive = label_names[1]) only when there are exactly 2 labels;
      f1_per_class {name: f1} over ALL label names (0.0 for a label never seen or predicted);
      confusion_matrix: nested list, row = true label, column = predicted label, in label_names order;
      labels: label_names; num_examples.
    """
    label_names = [str(n) for n in _as_list(label_names, "classification_report: label_names")]
    if not label_names:
        raise MetricInputError("classification_report: label_names is empty")
    if len(set(label_names)) != len(label_names):
        raise MetricInputError(f"classification_report: duplicate label names in {label_names}")
    preds, refs = check_pair(predictions, references, "classification_report")
    preds = _label_indices(preds, label_names, "predicted")
    refs = _label_indices(refs, label_names, "reference")
    from sklearn.metrics import confusion_matrix

    all_ids = list(range(len(label_names)))
    report = {
        "accuracy": accuracy_compute(preds, refs)["accuracy"],
        "f1_macro": f1_compute(preds, refs, average="macro")["f1"],
        "f1_micro": f1_compute(preds, refs, average="micro")["f1"],
    }
    if len(label_names) == 2:
        report["f1"] = f1_compute(preds, refs, average="binary", pos_label=1)["f1"]
    per_class = f1_compute(preds, refs, average=None, labels=all_ids)["f1"]
    report["f1_per_class"] = dict(zip(label_names, per_class))
    report["confusion_matrix"] = [[int(c) for c in row] for row in confusion_matrix(refs, preds, labels=all_ids)]
    report["labels"] = label_names
    report["num_examples"] = len(refs)
    return report


def _score_matrix(scores, n: int, what: str):
    import numpy as np

    try:
        s = np.asarray(_as_list(scores, f"{what}: scores"), dtype=np.float64)
    except (TypeError, ValueError):
        raise MetricInputError(f"{what}: scores must be numbers (one per example, or one row of class scores per example)") from None
    if s.ndim == 1:
        s = s[:, None]
    if s.ndim != 2 or s.shape[0] != n:
        raise MetricInputError(f"{what}: {s.shape[0] if s.ndim else 0} score row(s) for {n} reference(s)")
    if not np.isfinite(s).all():
        raise MetricInputError(f"{what}: scores contain NaN or infinity")
    return s


def roc_auc_compute(scores, references, label_names: Sequence[str] | None = None, multi_label: bool = False) -> dict:
    """Areas under the ROC and precision-recall curves (sklearn `roc_auc_score`, `average_precision_score`).

    Binary (2 classes): `scores` per example = the positive class's score (or a row of 2 class scores);
    roc_auc / pr_auc of class 1. Multi-class: rows of class scores (probabilities), references = class
    ids; macro average of one-vs-rest AUCs. Multi-label (`multi_label=True`): rows of per-label scores,
    references = rows of 0/1; macro average of per-label AUCs. A class (label) whose one-vs-rest split
    has only one side in the references has no AUC: it is left out of the average and listed in
    `undefined`; with none left, roc_auc / pr_auc are None. Per class: roc_auc_per_class, pr_auc_per_class.
    """
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    refs = _as_list(references, "roc_auc: references")
    if not refs:
        raise MetricInputError("roc_auc: got no references (empty input); nothing to score")
    s = _score_matrix(scores, len(refs), "roc_auc")
    if multi_label:
        y = np.asarray([_as_list(r, "roc_auc: references row") for r in refs], dtype=np.int64)
        if y.shape != s.shape:
            raise MetricInputError(f"roc_auc: references of shape {y.shape} but scores of shape {s.shape}")
        onehot = y
    else:
        y = np.asarray(refs, dtype=np.int64)
        n_classes = max(s.shape[1], 2)
        if s.shape[1] == 1:  # the positive class's score
            s = np.concatenate([1 - s, s], axis=1)
        if y.min() < 0 or y.max() >= n_classes:
            raise MetricInputError(f"roc_auc: reference ids outside 0..{n_classes - 1}")
        onehot = np.eye(n_classes, dtype=np.int64)[y]
    names = [str(n) for n in label_names] if label_names is not None else [str(i) for i in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise MetricInputError(f"roc_auc: {len(names)} label name(s) for {s.shape[1]} score column(s)")
    roc, pr, undefined = {}, {}, []
    for j, name in enumerate(names):
        col = onehot[:, j]
        if col.min() == col.max():
            undefined.append(name)
            continue
        roc[name] = float(roc_auc_score(col, s[:, j]))
        pr[name] = float(average_precision_score(col, s[:, j]))
    binary = not multi_label and len(names) == 2
    if binary:
        out_roc, out_pr = roc.get(names[1]), pr.get(names[1])
    else:
        out_roc = float(np.mean(list(roc.values()))) if roc else None
        out_pr = float(np.mean(list(pr.values()))) if pr else None
    return {"roc_auc": out_roc, "pr_auc": out_pr, "roc_auc_per_class": roc, "pr_auc_per_class": pr,
            "undefined": undefined, "average": "binary" if binary else "macro"}


# ----------------------------------------------------------------------------------------- generation


def _strings(values: list, what: str) -> list[str]:
    for v in values:
        if not isinstance(v, str):
            raise MetricInputError(f"{what} must be strings, got {type(v).__name__}: {v!r}")
    return values


def reference_streams(predictions, references, metric: str) -> tuple[list[str], list[list[str | None]]]:
    """Validate and transpose references into sacrebleu's layout.

    references: one str per prediction, or a list of str per prediction (any number >= 1, may differ between
    predictions). sacrebleu wants reference *streams*: stream k holds the k-th reference of every prediction;
    predictions with fewer references are padded with None, which sacrebleu skips.
    """
    preds, refs = check_pair(predictions, references, metric)
    preds = _strings(preds, f"{metric}: predictions")
    per_pred: list[list[str]] = []
    for i, r in enumerate(refs):
        if isinstance(r, str):
            r = [r]
        else:
            r = _as_list(r, f"{metric}: references[{i}]")
        if not r:
            raise MetricInputError(f"{metric}: references[{i}] is empty; every prediction needs >= 1 reference")
        per_pred.append(_strings(r, f"{metric}: references[{i}]"))
    n_streams = max(len(r) for r in per_pred)
    streams = [[r[k] if k < len(r) else None for r in per_pred] for k in range(n_streams)]
    return preds, streams


def bleu_compute(
    predictions,
    references,
    tokenize: str = "13a",
    lowercase: bool = False,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    use_effective_order: bool = False,
    force: bool = False,
) -> dict:
    """sacreBLEU corpus BLEU (0-100). Returns score, counts, totals, precisions (per n-gram order, %),
    bp (brevity penalty), sys_len, ref_len."""
    preds, streams = reference_streams(predictions, references, "bleu")
    from sacrebleu.metrics import BLEU

    bleu = BLEU(
        lowercase=lowercase,
        force=force,
        tokenize=tokenize,
        smooth_method=smooth_method,
        smooth_value=smooth_value,
        effective_order=use_effective_order,
    )
    out = bleu.corpus_score(preds, streams)
    return {
        "score": float(out.score),
        "counts": [int(c) for c in out.counts],
        "totals": [int(t) for t in out.totals],
        "precisions": [float(p) for p in out.precisions],
        "bp": float(out.bp),
        "sys_len": int(out.sys_len),
        "ref_len": int(out.ref_len),
    }


def chrf_compute(
    predictions,
    references,
    char_order: int = 6,
    word_order: int = 0,
    beta: int = 2,
    lowercase: bool = False,
    whitespace: bool = False,
    eps_smoothing: bool = False,
) -> dict:
    """sacreBLEU corpus chrF (0-100); word_order=2 gives chrF++. Returns score, char_order, word_order, beta."""
    preds, streams = reference_streams(predictions, references, "chrf")
    from sacrebleu.metrics import CHRF

    chrf = CHRF(
        char_order=char_order,
        word_order=word_order,
        beta=beta,
        lowercase=lowercase,
        whitespace=whitespace,
        eps_smoothing=eps_smoothing,
    )
    out = chrf.corpus_score(preds, streams)
    return {"score": float(out.score), "char_order": char_order, "word_order": word_order, "beta": beta}


# ----------------------------------------------------------------------------------------- perplexity


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = None


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, split after . ! ? (and their closing quotes / brackets) before whitespace, and
    at newlines. A dependency-free stand-in for nltk's punkt (which needs a download): used for rougeLsum
    and the lead-N baseline."""
    import re

    global _SENTENCE_END
    if _SENTENCE_END is None:
        _SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+|\n+")
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s and s.strip()]


def rouge_compute(predictions, references, rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer: bool = True) -> dict:
    """ROUGE F-measures (Google's rouge-score, the reimplementation of ROUGE-1.5.5) averaged over examples, in
    0..100: {rouge1, rouge2, rougeL, rougeLsum} (those asked for). rougeLsum is the summary-level LCS over
    sentences: both texts are split into sentences (`split_sentences`) and joined with newlines, as
    rouge-score expects. references: one str per prediction, or a list per prediction (the best-scoring
    reference counts, as rouge-score's score_multi does)."""
    preds, refs = check_pair(predictions, references, "rouge")
    preds = _strings(preds, "rouge: predictions")
    bad = [t for t in rouge_types if t not in ROUGE_TYPES]
    if bad:
        raise MetricInputError(f"rouge: unknown rouge_types {bad}; expected some of {list(ROUGE_TYPES)}")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(rouge_types, 0.0)
    for p, r in zip(preds, refs):
        rs = [r] if isinstance(r, str) else _strings(_as_list(r, "rouge: references row"), "rouge: references")
        if not rs:
            raise MetricInputError("rouge: a prediction has an empty list of references")
        p_sum = "\n".join(split_sentences(p))
        best = dict.fromkeys(rouge_types, 0.0)
        for ref in rs:
            r_sum = "\n".join(split_sentences(ref))
            for t in rouge_types:
                f = (scorer.score(r_sum, p_sum) if t == "rougeLsum" else scorer.score(ref, p))[t].fmeasure
                best[t] = max(best[t], f)
        for t in rouge_types:
            totals[t] += best[t]
    return {t: 100.0 * totals[t] / len(preds) for t in rouge_types}


def perplexity_compute(nll_sums, token_counts) -> dict:
    """Corpus perplexity from per-example summed negative log-likelihoods (natural log) and token counts.

    perplexity = exp(sum(nll_sums) / sum(token_counts)); per-token NLLs are the special case of count 1 each.
    Returns perplexity (inf on overflow, never an OverflowError; NaN passes through), mean_nll, total_nll,
    n_tokens.
    """
    nlls, counts = check_pair(nll_sums, token_counts, "perplexity")
    nll_values, count_values = [], []
    for i, (nll, n) in enumerate(zip(nlls, counts)):
        try:
            nll, n = float(nll), float(n)
        except (TypeError, ValueError):
            raise MetricInputError(f"perplexity: example {i}: NLL {nll!r} / token count {n!r} is not a number") from None
        if nll < 0:
            raise MetricInputError(
                f"perplexity: example {i}: negative NLL {nll}; pass negative log-likelihoods (-log p), "
                "not log-probabilities"
            )
        if not (n >= 0 and math.isfinite(n) and n == int(n)):
            raise MetricInputError(f"perplexity: example {i}: token count {n} is not a non-negative integer")
        nll_values.append(nll)
        count_values.append(int(n))
    total_tokens = sum(count_values)
    if total_tokens <= 0:
        raise MetricInputError("perplexity: the token counts sum to 0; perplexity needs at least one token")
    total_nll = math.fsum(nll_values)
    mean_nll = total_nll / total_tokens
    return {"perplexity": safe_exp(mean_nll), "mean_nll": mean_nll, "total_nll": total_nll, "n_tokens": total_tokens}


# ----------------------------------------------------------------------------------- token classification


def _tag_rows(values: Any, what: str) -> list[list[str]]:
    rows = _as_list(values, what)
    out = []
    for i, row in enumerate(rows):
        row = _as_list(row, f"{what}[{i}]")
        if any(not isinstance(t, str) for t in row):
            raise MetricInputError(f"{what}[{i}]: expected tag names (str) such as 'B-person', got {row[:5]!r}")
        out.append(row)
    return out


def seqeval_compute(predictions, references, mode: str | None = None, scheme: str | None = None) -> dict:
    """Entity-level scores of BIO-tagged sentences with seqeval (conlleval's lenient chunking by default;
    mode="strict" + scheme="IOB2" for exact chunks). predictions/references: one list of tag names per
    sentence, equally long. Returns entity_precision, entity_recall, entity_f1 (micro over entities),
    token_accuracy, per_type {type: {precision, recall, f1, number}}, f1_per_type {type: f1},
    num_sentences, num_entities (in the references). Undefined scores (0/0) are 0.0."""
    from seqeval import metrics as sm
    from seqeval import scheme as schemes

    preds, refs = check_pair(predictions, references, "seqeval")
    preds, refs = _tag_rows(preds, "seqeval: predictions"), _tag_rows(refs, "seqeval: references")
    for i, (p, r) in enumerate(zip(preds, refs)):
        if len(p) != len(r):
            raise MetricInputError(f"seqeval: sentence {i}: {len(p)} predicted tag(s) but {len(r)} reference tag(s)")
    kw: dict = {"zero_division": 0}
    if mode is not None:
        kw["mode"] = mode
    if scheme is not None:
        if not hasattr(schemes, scheme):
            raise MetricInputError(f"seqeval: unknown scheme {scheme!r}; e.g. IOB2, IOE2, IOBES, BILOU")
        kw["scheme"] = getattr(schemes, scheme)
    report = sm.classification_report(refs, preds, output_dict=True, **kw)
    per_type = {
        k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
            "number": int(v["support"])}
        for k, v in sorted(report.items())
        if k not in ("micro avg", "macro avg", "weighted avg")
    }
    n_tokens = sum(map(len, refs))
    micro = report["micro avg"]  # what f1_score / precision_score / recall_score would recompute from scratch
    return {
        "entity_f1": float(micro["f1-score"]),  # first: `pipelines status` shows the first metrics
        "entity_precision": float(micro["precision"]),
        "entity_recall": float(micro["recall"]),
        "token_accuracy": float(sm.accuracy_score(refs, preds)) if n_tokens else 0.0,
        "per_type": per_type,
        "f1_per_type": {k: v["f1"] for k, v in per_type.items()},
        "num_sentences": len(refs),
        "num_entities": sum(v["number"] for v in per_type.values()),
    }


def aligned_tags(predictions, references, label_names: Sequence[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(predicted, reference) tag names per row, keeping only the positions whose reference id is not
    -100 (the first sub-token of each word); ids index label_names. Rows may be padded with -100."""
    names = list(label_names)
    preds = _as_list(predictions, "token classification: predictions")
    refs = _as_list(references, "token classification: references")
    if len(preds) != len(refs):
        raise MetricInputError(f"token classification: {len(preds)} prediction row(s) but {len(refs)} reference row(s)")
    out_p, out_r = [], []
    for i, (p, r) in enumerate(zip(preds, refs)):
        p, r = _as_list(p, "predictions row"), _as_list(r, "references row")
        if len(p) != len(r):
            raise MetricInputError(f"token classification: row {i}: {len(p)} predicted ids but {len(r)} reference ids")
        rp, rr = [], []
        for a, b in zip(p, r):
            b = int(b)
            if b == -100:
                continue
            a = int(a)
            if not (0 <= a < len(names) and 0 <= b < len(names)):
                raise MetricInputError(f"token classification: row {i}: id {a if not 0 <= a < len(names) else b} "
                                       f"outside 0..{len(names) - 1} (label_names {names})")
            rp.append(names[a])
            rr.append(names[b])
        out_p.append(rp)
        out_r.append(rr)
    return out_p, out_r
