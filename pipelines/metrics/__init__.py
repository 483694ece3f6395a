"""Metrics that work offline: `evaluate` modules shipped in this package, plus thin wrappers for stages.

Two ways in, one implementation
-------------------------------
* `load(name)` returns an `evaluate.EvaluationModule` (`compute`, `add_batch`, ...), loaded from the module
  folder shipped in this package (`pipelines/metrics/<name>/<name>.py`, laid out like the Hub's metric repos),
  never from the Hub, so it works with `HF_HUB_OFFLINE=1` and no network.
* The wrappers (`accuracy`, `f1`, `classification_report`, `roc_auc`, `bleu`, `chrf`, `rouge`, `perplexity`,
  `perplexity_from_loss`, `seqeval`, `token_classification_report`) are plain functions for stages: no `evaluate`/`datasets` import, no Arrow round trip.

Both call the same functions in `pipelines.metrics._impl` (scikit-learn / sacrebleu / seqeval / math). A module script's
`_compute` is a one-line call into `_impl`. `evaluate.load` copies the script into its own module cache
(`$HF_MODULES_CACHE/evaluate_modules/...`) and imports it from there, so the script cannot import `_impl`
relatively; it uses the absolute import `from pipelines.metrics import _impl`. That is reliable because the
scripts only exist as package data of the installed `pipelines` package (pyproject's
`[tool.setuptools.package-data] "pipelines" = ["metrics/*/*.py"]`): wherever a script can be loaded,
`pipelines` is importable (evaluate checks the script's library imports before running it). Because the
cached copy imports `_impl` live, a change to `_impl` takes effect without touching the scripts.

Invalid input raises `pipelines.metrics.MetricInputError` (a `PipelinesError` and a `ValueError`); an unknown
metric name raises `PipelinesError` listing the known ones.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import PipelinesError
from pipelines.metrics import _impl
from pipelines.metrics._impl import MetricInputError

if TYPE_CHECKING:
    import evaluate

__all__ = [
    "MetricInputError",
    "accuracy",
    "available",
    "bleu",
    "chrf",
    "classification_report",
    "f1",
    "load",
    "module_path",
    "perplexity",
    "perplexity_from_loss",
    "roc_auc",
    "rouge",
    "seqeval",
    "split_sentences",
    "token_classification_report",
]

_HERE = Path(__file__).resolve().parent
_CACHE: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def available() -> list[str]:
    """Names of the metric modules shipped here (folders `<name>/<name>.py`)."""
    return sorted(p.parent.name for p in _HERE.glob("*/*.py") if p.stem == p.parent.name)


def module_path(name: str) -> Path:
    """Absolute path of the module folder for `name`; `PipelinesError` (listing the known names) if unknown."""
    known = available()
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in known:
        raise PipelinesError(f"unknown metric {name!r}; known metrics: {', '.join(known)}")
    return _HERE / key


def load(name: str, **load_kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of the shipped module `name` (by absolute path: no Hub, works offline).

    Modules are cached per process and per `load_kwargs` (note: a cached module is shared, so its
    `add_batch` buffer is too; pass e.g. a distinct `experiment_id` for an independent instance).
    `load_kwargs` go to `evaluate.load`; `keep_in_memory` defaults to True (no Arrow cache files on disk)
    unless `num_process > 1`, where evaluate needs the files to gather results across processes.
    """
    path = module_path(name)
    if int(load_kwargs.get("num_process", 1)) <= 1:
        load_kwargs.setdefault("keep_in_memory", True)
    try:
        key = (path.name, tuple(sorted(load_kwargs.items())))
        hash(key)
    except TypeError:  # unhashable kwargs (e.g. a DownloadConfig): do not cache
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    with _LOCK:
        if key is not None and key in _CACHE:
            return _CACHE[key]
        import evaluate

        module = evaluate.load(str(path), **load_kwargs)
        if key is not None:
            _CACHE[key] = module
    return module


# -------------------------------------------------------------------------------- wrappers for stages


def accuracy(predictions, references) -> float:
    """Fraction of predictions equal to their reference."""
    return _impl.accuracy_compute(predictions, references)["accuracy"]


def f1(predictions, references, average: str | None = "macro", **kwargs) -> float | list[float]:
    """F1 score; average: "binary" | "macro" | "micro" | "weighted" | None (per-class list).
    kwargs: labels, pos_label, sample_weight, zero_division (as in the `f1` module)."""
    return _impl.f1_compute(predictions, references, average=average, **kwargs)["f1"]


def classification_report(predictions, references, label_names: Sequence[str]) -> dict:
    """accuracy, f1_macro, f1_micro, f1 (binary, only with 2 labels), f1_per_class {name: f1},
    confusion_matrix (nested list: row = true, column = predicted, label_names order), labels, num_examples.
    predictions/references are label ids (indices into label_names) or label names."""
    return _impl.classification_report_compute(predictions, references, label_names)


def roc_auc(scores, references, label_names: Sequence[str] | None = None, multi_label: bool = False) -> dict:
    """ROC-AUC and PR-AUC: binary (positive-class scores), multi-class (rows of class scores, macro one-vs-rest),
    multi-label (rows of label scores against rows of 0/1, macro over labels). See the `roc_auc` module."""
    return _impl.roc_auc_compute(scores, references, label_names=label_names, multi_label=multi_label)


def bleu(predictions: Sequence[str], references, **kwargs) -> dict:
    """sacreBLEU corpus BLEU: {"score", "counts", "totals", "precisions", "bp", "sys_len", "ref_len"}.
    references: one str per prediction or a list of str per prediction. kwargs as in the `bleu` module."""
    return _impl.bleu_compute(predictions, references, **kwargs)


def chrf(predictions: Sequence[str], references, **kwargs) -> dict:
    """sacreBLEU chrF (word_order=2: chrF++): {"score", "char_order", "word_order", "beta"}."""
    return _impl.chrf_compute(predictions, references, **kwargs)


split_sentences = _impl.split_sentences  # the sentence splitter of rougeLsum (and the lead-N baseline)


def rouge(predictions: Sequence[str], references, **kwargs) -> dict:
    """ROUGE-1/2/L/Lsum F-measures in 0..100, averaged over examples (rouge-score). kwargs: rouge_types, use_stemmer."""
    return _impl.rouge_compute(predictions, references, **kwargs)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total_nll / n_tokens) from a summed NLL (nats) and its token count; inf on overflow."""
    return _impl.perplexity_compute([total_nll], [n_tokens])["perplexity"]


def perplexity_from_loss(mean_loss: float) -> float:
    """exp(mean cross-entropy loss) (the mean NLL over one token); inf on overflow, NaN stays NaN."""
    return _impl.perplexity_compute([mean_loss], [1])["perplexity"]


def seqeval(predictions, references, **kwargs) -> dict:
    """Entity-level scores of BIO tag sequences (one list of tag names per sentence): entity_precision,
    entity_recall, entity_f1 (micro), token_accuracy, per_type, f1_per_type, num_sentences, num_entities.
    kwargs: mode ("strict"), scheme ("IOB2", ...) as in the `seqeval` module."""
    return _impl.seqeval_compute(predictions, references, **kwargs)


def token_classification_report(predictions, references, label_names: Sequence[str]) -> dict:
    """`seqeval` on tag ids per token row (e.g. argmax of a token-classification model and its labels):
    only positions whose reference is not -100 (the first sub-token of each word) are scored."""
    preds, refs = _impl.aligned_tags(predictions, references, label_names)
    return _impl.seqeval_compute(preds, refs)
