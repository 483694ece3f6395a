"""Text classification: one label per text (sentiment, topic, intent).

Data roles `text` + `label` (ids in the card's `label_names` order); an AutoModelForSequenceClassification
with the label names in its config. Metrics: accuracy, F1 (binary for two labels, macro / micro always,
per class), a confusion matrix, and ROC-AUC / PR-AUC from the class probabilities (binary, or macro
one-vs-rest). Baselines on the same split: the majority class and TF-IDF + logistic regression
(scikit-learn) trained on the train split.
"""

from __future__ import annotations

from pipelines import metrics as M
from pipelines.errors import PipelinesError
from pipelines.tasks.base import (
    EvalOptions, Scored, Task, arch_in, heads_present, id2label, label_kwargs, numbers, rounded,
)


class Classification(Task):
    name = "classification"
    aliases = ("text-classification", "sequence-classification", "sentiment-analysis")
    pipeline_tag = "text-classification"
    peft_task_type = "SEQ_CLS"
    endpoint = "/predict"
    description = "a label per text"
    roles = ("text", "label")
    labelled = True
    family = "encoder"
    main_metric = "accuracy"
    per_example = True
    class_weighted = True

    # ---- model

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def detect(self, config: dict) -> bool:
        multi = config.get("problem_type") == "multi_label_classification"
        return not multi and (arch_in(config, "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")
                              or any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []))

    def model_kwargs(self, label_names):
        return label_kwargs(label_names)

    def head_modules(self, model):
        return heads_present(model)

    # ---- data

    def train_notes(self, train, label_names):
        return missing_labels(list(train["label"]), label_names, self.name)

    def encode(self, ds, tokenizer, opts: EvalOptions):
        def fn(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=opts.max_length)
            enc["labels"] = batch["label"]
            return enc

        return self._cached_map(ds, fn, tokenizer, opts)

    def vocab_texts(self, ds):
        return list(ds["text"])

    def loss_function(self, train_raw, opts: EvalOptions, class_weights):
        if class_weights is None:
            return None
        return weighted_ce(weights_for(train_raw["label"], opts.label_names, class_weights))

    # ---- evaluation

    def preprocess_logits(self, logits, labels):
        """Class probabilities (rows of C floats): the argmax for accuracy / F1, the scores for AUC."""
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.float().softmax(-1)

    def score(self, predictions, label_ids, raw, tokenizer, opts, references=None) -> Scored:
        import numpy as np

        probs = np.asarray(predictions, dtype=np.float64)
        pred = probs.argmax(-1)
        names = opts.label_names or [str(i) for i in range(probs.shape[1])]
        return score_labels(pred, probs, np.asarray(label_ids), names, raw)

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        return text_baselines(train_raw["text"], train_raw["label"], raw["text"], raw["label"], opts.label_names)

    def baseline_notes(self):
        return BASELINE_NOTES

    # ---- serving

    def serve_setup(self, served):
        tok = served.processor
        if tok.pad_token is None:  # inference only: padding positions are masked, so any known token will do
            tok.pad_token = tok.eos_token or tok.unk_token

    def serve_batch(self, served, params, items):
        import torch

        enc = served.processor(items, padding=True, truncation=True, max_length=served.max_length, return_tensors="pt")
        with torch.inference_mode():
            probs = served.model(**enc).logits.float().softmax(-1)
        return answers(probs, id2label(served.config))

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'classify = pipeline("text-classification", model="{repo}")',
            'print(classify("a gorgeous, witty film"))',
        ]


# ---------------------------------------------------------------- shared with other label tasks

BASELINE_NOTES = {
    "majority": "always the train split's most frequent label",
    "tfidf_logreg": "TF-IDF of word 1-2-grams + logistic regression (scikit-learn), fit on the train split",
}


def answers(probs, names: dict[int, str]) -> list[dict]:
    """Served predictions from rows of class probabilities: the best label, its score, every label's score."""
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": names.get(best, f"LABEL_{best}"), "score": row[best],
                    "scores": {names.get(i, f"LABEL_{i}"): p for i, p in enumerate(row)}})
    return out


def missing_labels(ids: list[int], names: list[str], task: str, per_row: int = 1) -> list[str]:
    """A label that never occurs in train is never learnt: say so; fewer than two labels cannot be learnt."""
    seen = set(ids)
    missing = [n for i, n in enumerate(names) if i not in seen]
    if per_row == 1 and len(seen) < 2:
        raise PipelinesError(f"task {task}: the train split holds only the label(s) {[names[i] for i in sorted(seen)]}; "
                             f"a classifier needs at least two of {names}")
    if not missing:
        return []
    return [f"label(s) {missing} never occur in the train split: the model cannot learn them (they still count in "
            "the evaluation)"]


def score_labels(pred, probs, refs, names: list[str], raw=None) -> Scored:
    """Accuracy / F1 / confusion matrix (classification_report) + ROC-AUC / PR-AUC from class scores."""
    report = M.classification_report(pred.tolist(), refs.tolist(), names)
    auc = M.roc_auc(probs.tolist(), refs.tolist(), label_names=names)
    metrics = {k: v for k, v in numbers(report).items() if k != "num_examples"}
    metrics.setdefault("f1", report["f1_macro"])  # binary F1 with two labels, else macro
    metrics.update(roc_auc=auc["roc_auc"], pr_auc=auc["pr_auc"])
    metrics = rounded({k: v for k, v in metrics.items() if v is not None})
    report["roc_auc_per_class"], report["pr_auc_per_class"] = auc["roc_auc_per_class"], auc["pr_auc_per_class"]
    rows = []
    if raw is not None:
        rows = [{"text": t, "label": names[int(y)], "predicted": names[int(p)], "score": round(float(s[int(p)]), 4)}
                for t, y, p, s in zip(raw["text"], refs, pred, probs)]
    return Scored(metrics, report, rows, [int(p) for p in pred])


def text_baselines(train_texts, train_labels, texts, labels, names) -> dict[str, dict]:
    """Majority class and TF-IDF + logistic regression, scored like a model on (texts, labels)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    y_train, y = np.asarray(train_labels), np.asarray(labels)
    k = len(names)
    prior = np.bincount(y_train, minlength=k) / len(y_train)
    majority = np.tile(prior, (len(y), 1))  # the prior as scores: AUC 0.5, argmax = the majority class
    out = {"majority": score_labels(majority.argmax(-1), majority, y, names).metrics}
    if len(set(y_train.tolist())) >= 2:
        vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True, max_features=200_000)
        X = vec.fit_transform(list(train_texts))
        clf = LogisticRegression(max_iter=1000, C=4.0).fit(X, y_train)
        probs = np.zeros((len(y), k))
        probs[:, clf.classes_] = clf.predict_proba(vec.transform(list(texts)))
        out["tfidf_logreg"] = score_labels(probs.argmax(-1), probs, y, names).metrics
    return out


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

    loss_fn.weights = list(weights)  # recorded in the manifest
    return loss_fn


def weights_for(train_labels, label_names: list[str], spec) -> list[float]:
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


TASK = Classification()
