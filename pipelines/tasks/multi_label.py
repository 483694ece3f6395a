"""Multi-label text classification: each text carries any number of labels (tags, topics), none included.

Data roles `text` + `labels` (a list of names from the card's `label_names` per row: a JSON list, or a
`label_separator`-separated CSV cell). The model is an AutoModelForSequenceClassification with
`problem_type: multi_label_classification` (binary cross-entropy over the labels, a sigmoid per label).
A label is predicted when its probability reaches its threshold: 0.5 for every label, or per-label
thresholds tuned on the validation split (finetune's `tune_thresholds: true`: the threshold that
maximises that label's F1 there), saved in config.json (`task_specific_params`) so that evaluation by
later stages and serving use them. Metrics: micro / macro F1, subset accuracy (every label of the text
right), Hamming loss, and ROC-AUC / PR-AUC per label (macro averages), independent of thresholds.
Baselines: each label's train prevalence as its score (the "majority" answer: no label above 0.5 unless
most texts carry it) and TF-IDF + one-vs-rest logistic regression with balanced class weights (unweighted,
a rare label's probability almost never reaches 0.5 and the baseline would predict nothing).
"""

from __future__ import annotations

from pipelines import metrics as M
from pipelines.tasks.base import EvalOptions, Scored, heads_present, id2label, label_kwargs, numbers, rounded
from pipelines.tasks.classification import Classification

PARAMS_KEY = "multi-label-classification"  # config.task_specific_params[PARAMS_KEY]["thresholds"]


class MultiLabel(Classification):
    name = "multi-label-classification"
    aliases = ("multi-label", "multilabel", "multi_label_classification", "multi-label-text-classification")
    pipeline_tag = "text-classification"
    endpoint = "/predict"
    description = "any number of labels per text"
    roles = ("text", "labels")
    main_metric = "f1_micro"
    class_weighted = False
    thresholded = True

    # ---- model

    def detect(self, config: dict) -> bool:
        return config.get("problem_type") == "multi_label_classification" and any(
            a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])

    def model_kwargs(self, label_names):
        return {**label_kwargs(label_names), "problem_type": "multi_label_classification"}

    def head_modules(self, model):
        return heads_present(model)

    # ---- data

    def train_notes(self, train, label_names):
        from pipelines.tasks.classification import missing_labels

        return missing_labels([i for row in train["labels"] for i in row], label_names, self.name, per_row=0)

    def encode(self, ds, tokenizer, opts: EvalOptions):
        k = len(opts.label_names)

        def fn(batch):
            enc = tokenizer(batch["text"], truncation=True, max_length=opts.max_length)
            enc["labels"] = [[1.0 if j in ids else 0.0 for j in range(k)] for ids in map(set, batch["labels"])]
            return enc

        return self._cached_map(ds, fn, tokenizer, opts, extra=k)

    def collator(self, tokenizer, model=None):
        """Dynamic padding; the multi-hot labels as floats (binary cross-entropy targets)."""
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(tokenizer)

        def collate(features):
            batch = pad(features)
            batch["labels"] = batch["labels"].float()
            return batch

        return collate

    # ---- evaluation

    def preprocess_logits(self, logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits.float().sigmoid()

    def score(self, predictions, label_ids, raw, tokenizer, opts, references=None) -> Scored:
        import numpy as np

        probs = np.asarray(predictions, dtype=np.float64)
        return score_multi(probs, np.asarray(label_ids) > 0.5, opts.label_names, thresholds(opts, probs.shape[1]), raw)

    def evaluate(self, model, tokenizer, raw, opts: EvalOptions) -> Scored:
        saved = (getattr(model.config, "task_specific_params", None) or {}).get(PARAMS_KEY, {}).get("thresholds")
        if saved is not None and opts.threshold == EvalOptions.threshold:
            opts = EvalOptions(**{**opts.__dict__, "threshold": saved})  # the model's own, tuned thresholds
        return super().evaluate(model, tokenizer, raw, opts)

    def tune(self, model, tokenizer, raw, opts: EvalOptions) -> list[float]:
        """Per label, the threshold (over the validation probabilities) that maximises its F1; saved in the
        model's config so that every later evaluation and the server use it."""
        import numpy as np

        data = self.encode(raw, tokenizer, opts)
        probs, refs = self.predict(model, data, self.collator(tokenizer, model), opts)
        probs, refs = np.asarray(probs), np.asarray(refs) > 0.5
        out = []
        for j in range(probs.shape[1]):
            best, best_f1 = 0.5, -1.0
            for t in np.unique(np.concatenate([probs[:, j], [0.5]])):
                pred = probs[:, j] >= t
                tp = float((pred & refs[:, j]).sum())
                f1 = 2 * tp / max(float(pred.sum() + refs[:, j].sum()), 1.0)
                if f1 > best_f1 + 1e-12:
                    best, best_f1 = float(t), f1
            out.append(round(best, 6))
        params = dict(getattr(model.config, "task_specific_params", None) or {})
        params[PARAMS_KEY] = {"thresholds": out, "tuned_on": f"{len(raw)} validation rows (max F1 per label)"}
        model.config.task_specific_params = params
        return out

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        import numpy as np
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier

        names, k = opts.label_names, len(opts.label_names)
        y_train = multi_hot(train_raw["labels"], k)
        y = multi_hot(raw["labels"], k)
        prior = np.tile(y_train.mean(0), (len(y), 1))
        out = {"majority": score_multi(prior, y, names, [0.5] * k).metrics}
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=200_000)
        X = vec.fit_transform(list(train_raw["text"]))
        probs = np.tile(y_train.mean(0), (len(y), 1))  # labels never (or always) seen in train: their prior
        fit = [j for j in range(k) if 0 < y_train[:, j].sum() < len(y_train)]
        if fit:
            # balanced: a rare label's probability can reach the 0.5 threshold (unweighted, it almost never does)
            clf = OneVsRestClassifier(LogisticRegression(max_iter=1000, C=4.0, class_weight="balanced")).fit(X, y_train[:, fit])
            probs[:, fit] = clf.predict_proba(vec.transform(list(raw["text"])))
        out["tfidf_logreg"] = score_multi(probs, y, names, [0.5] * k).metrics
        return out

    def baseline_notes(self):
        return {"majority": "each label's share of the train texts as its score (threshold 0.5)",
                "tfidf_logreg": "TF-IDF of word 1-2-grams + one-vs-rest logistic regression (balanced class weights: a "
                                "rare label can reach the 0.5 threshold), fit on the train split"}

    # ---- distillation: a sigmoid per label, so KD is binary cross-entropy against the teacher's probabilities

    def kd_loss_sum(self, s_logits, t_logits, labels, alpha: float, temperature: float):
        """Items are (example, label) pairs: alpha * BCE(student, label) + (1 - alpha) * T^2 *
        BCE(sigmoid(student / T), sigmoid(teacher / T)), summed (the Trainer's num_items_in_batch counts
        the label entries of a multi-hot batch)."""
        import torch.nn.functional as F

        s = s_logits.float()
        mask = labels.ne(-100)
        total = alpha * F.binary_cross_entropy_with_logits(s, labels.float(), reduction="sum") if alpha > 0 else s.new_zeros(())
        if alpha < 1:
            T = temperature
            soft = (t_logits.float() / T).sigmoid()
            total = total + (1 - alpha) * T * T * F.binary_cross_entropy_with_logits(s / T, soft, reduction="sum")
        return total, mask

    # ---- serving

    def serve_batch(self, served, params, items):
        import torch

        enc = served.processor(items, padding=True, truncation=True, max_length=served.max_length, return_tensors="pt")
        with torch.inference_mode():
            probs = served.model(**enc).logits.float().sigmoid()
        names = id2label(served.config)
        saved = (getattr(served.config, "task_specific_params", None) or {}).get(PARAMS_KEY, {}).get("thresholds")
        ts = saved or [0.5] * probs.shape[1]
        out = []
        for row in probs.tolist():
            out.append({"labels": [names.get(j, f"LABEL_{j}") for j, p in enumerate(row) if p >= ts[j]],
                        "scores": {names.get(j, f"LABEL_{j}"): p for j, p in enumerate(row)}})
        return out

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'tag = pipeline("text-classification", model="{repo}", top_k=None)  # a sigmoid score per label',
            'print(tag("a text to tag"))',
        ]


def multi_hot(rows, k: int):
    import numpy as np

    y = np.zeros((len(rows), k), dtype=bool)
    for i, ids in enumerate(rows):
        y[i, list(ids)] = True
    return y


def thresholds(opts: EvalOptions, k: int) -> list[float]:
    t = opts.threshold
    return [float(t)] * k if isinstance(t, (int, float)) else [float(x) for x in t]


def score_multi(probs, refs, names: list[str], ts: list[float], raw=None) -> Scored:
    """Micro / macro F1, subset accuracy, Hamming loss at thresholds `ts`; ROC-AUC / PR-AUC per label."""
    import numpy as np
    from sklearn.metrics import f1_score, hamming_loss

    pred = probs >= np.asarray(ts)[None, :]
    y = refs.astype(int)
    auc = M.roc_auc(probs.tolist(), y.tolist(), label_names=names, multi_label=True)
    per_label = f1_score(y, pred.astype(int), average=None, zero_division=0.0)
    metrics = {
        "f1_micro": float(f1_score(y, pred.astype(int), average="micro", zero_division=0.0)),
        "f1_macro": float(f1_score(y, pred.astype(int), average="macro", zero_division=0.0)),
        "subset_accuracy": float((pred == refs).all(1).mean()),
        "hamming_loss": float(hamming_loss(y, pred.astype(int))),
        "roc_auc": auc["roc_auc"], "pr_auc": auc["pr_auc"],
    }
    report = {"f1_per_label": dict(zip(names, map(float, per_label))), "thresholds": dict(zip(names, ts)),
              "roc_auc_per_label": auc["roc_auc_per_class"], "pr_auc_per_label": auc["pr_auc_per_class"],
              "label_counts": dict(zip(names, map(int, y.sum(0)))), "num_examples": len(y)}
    rows = []
    if raw is not None:
        rows = [{"text": t, "labels": [names[j] for j in np.flatnonzero(r)], "predicted": [names[j] for j in np.flatnonzero(p)]}
                for t, r, p in zip(raw["text"], refs, pred)]
    outputs = [[int(j) for j in np.flatnonzero(p)] for p in pred]
    return Scored(rounded(numbers({k: v for k, v in metrics.items() if v is not None})), report, rows, outputs)


TASK = MultiLabel()
