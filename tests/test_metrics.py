"""pipelines.metrics: every metric against scikit-learn / sacrebleu computed directly, through both
`load(name).compute(...)` (the shipped `evaluate` modules) and the plain wrappers; plus edge cases and an
offline subprocess load."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from sacrebleu.metrics import CHRF
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

import pipelines
from pipelines import metrics as M
from pipelines.errors import PipelinesError
from pipelines.metrics import MetricInputError, _impl, load

NAMES = ["accuracy", "bleu", "chrf", "f1", "perplexity", "roc_auc", "rouge", "seqeval"]

# Imbalanced 4-class problem: class 0 dominates, class 3 is rare and never predicted.
_rng = np.random.default_rng(0)
REFS = _rng.choice(4, size=200, p=[0.6, 0.25, 0.1, 0.05]).tolist()
PREDS = [r if r != 3 and _rng.random() < 0.7 else int(_rng.choice(3)) for r in REFS]
assert 3 in REFS and 3 not in PREDS

# German, with umlauts and ß; multiple references per hypothesis.
HYPS = [
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Ich möchte heute Abend ins Kino gehen.",
    "Die Straße ist nass, weil es geregnet hat.",
    "Wir haben das Problem gelöst.",
]
REFS_A = [
    "Der schnelle braune Fuchs springt über den trägen Hund.",
    "Ich würde heute Abend gern ins Kino gehen.",
    "Die Straße ist nass, da es geregnet hat.",
    "Wir haben das Problem gelöst.",
]
REFS_B = [
    "Der flinke braune Fuchs springt über den faulen Hund.",
    "Heute Abend möchte ich ins Kino gehen.",
    "Weil es geregnet hat, ist die Straße nass.",
    "Das Problem haben wir gelöst.",
]
MULTI_REFS = [[a, b] for a, b in zip(REFS_A, REFS_B)]


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------- loading


def test_available_modules_ship_as_package_data():
    root = Path(pipelines.__file__).parent
    # exactly what pyproject's package-data glob "metrics/*/*.py" picks up
    shipped = sorted(p.parent.name for p in root.glob("metrics/*/*.py"))
    assert shipped == NAMES == M.available()
    for name in NAMES:
        assert (M.module_path(name) / f"{name}.py").is_file()


def test_load_returns_evaluate_module_with_info_and_is_cached():
    import evaluate

    for name in NAMES:
        module = load(name)
        assert isinstance(module, evaluate.EvaluationModule)
        assert module.name == name
        assert module.description.strip() and module.citation.strip() and module.features
        assert load(name) is module
    assert load(" F1 ") is load("f1")


def test_unknown_metric_lists_known_ones():
    with pytest.raises(PipelinesError) as e:
        load("meteor")
    msg = str(e.value)
    assert "meteor" in msg and all(name in msg for name in NAMES)


def test_module_and_wrapper_share_one_implementation(monkeypatch):
    monkeypatch.setattr(_impl, "accuracy_compute", lambda *a, **k: {"accuracy": -42.0})
    monkeypatch.setattr(_impl, "perplexity_compute", lambda *a, **k: {"perplexity": -7.0})
    assert load("accuracy").compute(predictions=[0, 1], references=[0, 1]) == {"accuracy": -42.0}
    assert M.accuracy([0, 1], [0, 1]) == -42.0
    assert load("perplexity").compute(predictions=[1.0], references=[1]) == {"perplexity": -7.0}
    assert M.perplexity(1.0, 1) == -7.0 and M.perplexity_from_loss(1.0) == -7.0


def test_loads_offline_in_a_fresh_process(tmp_path):
    """No Hub, no network, an empty HF cache, and a cwd from which `pipelines` is not importable by accident."""
    code = r"""
import json
from pipelines.metrics import load
out = {
    "accuracy": load("accuracy").compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]),
    "f1": load("f1").compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2], average="macro"),
    "bleu": load("bleu").compute(predictions=["Der Hund bellt."], references=[["Der Hund bellt laut."]]),
    "chrf": load("chrf").compute(predictions=["Der Hund bellt."], references=["Der Hund bellt laut."], word_order=2),
    "perplexity": load("perplexity").compute(predictions=[2.0, 4.0], references=[2, 4]),
}
print(json.dumps(out))
"""
    repo_root = str(Path(pipelines.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf_home" / "modules"),
        # any attempt to reach the network fails fast instead of hanging
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "PYTHONPATH": os.pathsep.join(p for p in [repo_root, os.environ.get("PYTHONPATH", "")] if p),
    }
    env.pop("HF_ENDPOINT", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["accuracy"] == {"accuracy": 0.75}
    assert out["f1"]["f1"] == approx(f1_score([0, 1, 1, 2], [0, 1, 2, 2], average="macro"))
    assert out["bleu"]["score"] == approx(sacrebleu.corpus_bleu(["Der Hund bellt."], [["Der Hund bellt laut."]]).score)
    expected_chrf = sacrebleu.corpus_chrf(["Der Hund bellt."], [["Der Hund bellt laut."]], word_order=2).score
    assert out["chrf"]["score"] == approx(expected_chrf)
    assert out["perplexity"]["perplexity"] == approx(math.e)
    # the modules were materialised in the fresh cache, not fetched
    assert (tmp_path / "hf_home" / "modules" / "evaluate_modules" / "metrics" / "bleu").is_dir()


# ------------------------------------------------------------------------------------ classification


def test_accuracy_matches_sklearn():
    expected = accuracy_score(REFS, PREDS)
    assert 0.5 < expected < 0.95
    assert load("accuracy").compute(predictions=PREDS, references=REFS) == {"accuracy": approx(expected)}
    assert M.accuracy(PREDS, REFS) == approx(expected)
    assert M.accuracy(np.array(PREDS), np.array(REFS)) == approx(expected)
    weights = _rng.random(len(REFS)).tolist()
    got = load("accuracy").compute(predictions=PREDS, references=REFS, sample_weight=weights)["accuracy"]
    assert got == approx(accuracy_score(REFS, PREDS, sample_weight=weights))
    got = load("accuracy").compute(predictions=PREDS, references=REFS, normalize=False)["accuracy"]
    assert got == accuracy_score(REFS, PREDS, normalize=False)


def test_accuracy_string_labels():
    preds, refs = ["pos", "neg", "neu", "pos"], ["pos", "neg", "pos", "neu"]
    assert load("accuracy").compute(predictions=preds, references=refs)["accuracy"] == 0.5
    assert M.accuracy(preds, refs) == 0.5


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_f1_multiclass_matches_sklearn(average):
    expected = f1_score(REFS, PREDS, average=average, zero_division=0)
    assert load("f1").compute(predictions=PREDS, references=REFS, average=average)["f1"] == approx(expected)
    assert M.f1(PREDS, REFS, average=average) == approx(expected)


def test_f1_per_class_and_labels_match_sklearn():
    expected = f1_score(REFS, PREDS, average=None, zero_division=0).tolist()
    assert len(expected) == 4 and expected[3] == 0.0  # the never-predicted rare class
    got = load("f1").compute(predictions=PREDS, references=REFS, average=None)["f1"]
    assert got == [approx(x) for x in expected]
    assert M.f1(PREDS, REFS, average=None) == [approx(x) for x in expected]
    # labels: a subset, in a chosen order
    expected = f1_score(REFS, PREDS, labels=[2, 0], average=None, zero_division=0).tolist()
    assert load("f1").compute(predictions=PREDS, references=REFS, average=None, labels=[2, 0])["f1"] == [
        approx(x) for x in expected
    ]
    expected = f1_score(REFS, PREDS, labels=[0, 1], average="macro", zero_division=0)
    assert M.f1(PREDS, REFS, labels=[0, 1]) == approx(expected)


def test_f1_binary_matches_sklearn():
    refs = [int(r == 2) for r in REFS]  # imbalanced binary: ~10% positive
    preds = [int(p == 2) for p in PREDS]
    for pos_label in (1, 0):
        expected = f1_score(refs, preds, pos_label=pos_label)
        got = load("f1").compute(predictions=preds, references=refs, pos_label=pos_label)["f1"]  # default: binary
        assert got == approx(expected)
        assert M.f1(preds, refs, average="binary", pos_label=pos_label) == approx(expected)
    with pytest.raises(ValueError, match="multiclass"):
        load("f1").compute(predictions=PREDS, references=REFS)  # binary average on multi-class input


def test_classification_report_matches_sklearn():
    names = ["neutral", "positive", "negative", "mixed"]
    report = M.classification_report(PREDS, REFS, names)
    assert report["accuracy"] == approx(accuracy_score(REFS, PREDS))
    assert report["f1_macro"] == approx(f1_score(REFS, PREDS, average="macro", zero_division=0))
    assert report["f1_micro"] == approx(f1_score(REFS, PREDS, average="micro"))
    assert "f1" not in report  # binary F1 only for 2 labels
    per_class = f1_score(REFS, PREDS, average=None, labels=[0, 1, 2, 3], zero_division=0)
    assert report["f1_per_class"] == {n: approx(v) for n, v in zip(names, per_class)}
    assert report["confusion_matrix"] == confusion_matrix(REFS, PREDS, labels=[0, 1, 2, 3]).tolist()
    assert report["labels"] == names and report["num_examples"] == len(REFS)
    assert json.loads(json.dumps(report)) == report  # plain JSON-able types
    # label names instead of ids give the same report
    by_name = M.classification_report([names[p] for p in PREDS], [names[r] for r in REFS], names)
    assert by_name == report


def test_classification_report_binary_and_single_class():
    refs, preds = [0, 0, 0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 0, 0, 0, 1]
    report = M.classification_report(preds, refs, ["neg", "pos"])
    assert report["f1"] == approx(f1_score(refs, preds))
    assert report["f1_per_class"]["pos"] == approx(report["f1"])
    assert report["confusion_matrix"] == [[4, 1], [1, 2]]
    # only one class present anywhere: defined values, no exception, no sklearn warning leaking as error
    report = M.classification_report([0, 0, 0], [0, 0, 0], ["neg", "pos"])
    assert report["accuracy"] == 1.0 and report["f1_macro"] == 1.0 and report["f1"] == 0.0
    assert report["f1_per_class"] == {"neg": 1.0, "pos": 0.0}
    assert report["confusion_matrix"] == [[3, 0], [0, 0]]
    assert M.f1([2, 2], [2, 2]) == 1.0
    assert load("f1").compute(predictions=[1, 1], references=[1, 1])["f1"] == 1.0


def test_classification_report_rejects_bad_labels():
    with pytest.raises(MetricInputError, match="index"):
        M.classification_report([0, 5], [0, 1], ["a", "b"])
    with pytest.raises(MetricInputError, match="'c'"):
        M.classification_report(["a", "c"], ["a", "b"], ["a", "b"])
    with pytest.raises(MetricInputError, match="duplicate"):
        M.classification_report([0], [0], ["a", "a"])


# ---------------------------------------------------------------------------------------- generation


def test_bleu_single_reference_matches_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPS, [REFS_A])
    assert 20 < expected.score < 100
    for got in (
        load("bleu").compute(predictions=HYPS, references=REFS_A),  # list of str
        load("bleu").compute(predictions=HYPS, references=[[r] for r in REFS_A]),  # list of lists
        M.bleu(HYPS, REFS_A),
    ):
        assert got["score"] == approx(expected.score)
        assert got["precisions"] == [approx(p) for p in expected.precisions]
        assert got["counts"] == list(expected.counts) and got["totals"] == list(expected.totals)
        assert got["bp"] == approx(expected.bp)
        assert (got["sys_len"], got["ref_len"]) == (expected.sys_len, expected.ref_len)


def test_bleu_multiple_references_and_options_match_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPS, [REFS_A, REFS_B])
    assert expected.score > sacrebleu.corpus_bleu(HYPS, [REFS_A]).score
    assert load("bleu").compute(predictions=HYPS, references=MULTI_REFS)["score"] == approx(expected.score)
    assert M.bleu(HYPS, MULTI_REFS)["score"] == approx(expected.score)
    expected = sacrebleu.corpus_bleu(HYPS, [REFS_A, REFS_B], lowercase=True, tokenize="intl")
    got = load("bleu").compute(predictions=HYPS, references=MULTI_REFS, lowercase=True, tokenize="intl")
    assert got["score"] == approx(expected.score)


def test_bleu_and_chrf_variable_number_of_references():
    # a duplicated reference changes neither metric, so padding the 1-reference rows by repeating their
    # reference gives an independent expected value for a ragged reference list
    ragged = [[REFS_A[0]], MULTI_REFS[1], [REFS_B[2]], MULTI_REFS[3]]
    streams = [[r[0] for r in ragged], [r[-1] for r in ragged]]
    expected = sacrebleu.corpus_bleu(HYPS, streams).score
    assert load("bleu").compute(predictions=HYPS, references=ragged)["score"] == approx(expected)
    assert M.bleu(HYPS, ragged)["score"] == approx(expected)
    expected = sacrebleu.corpus_chrf(HYPS, streams, word_order=2).score
    assert load("chrf").compute(predictions=HYPS, references=ragged, word_order=2)["score"] == approx(expected)
    assert M.chrf(HYPS, ragged, word_order=2)["score"] == approx(expected)


@pytest.mark.parametrize("word_order", [0, 2])  # chrF, chrF++
def test_chrf_matches_sacrebleu(word_order):
    for refs, streams in ((REFS_A, [REFS_A]), (MULTI_REFS, [REFS_A, REFS_B])):
        expected = sacrebleu.corpus_chrf(HYPS, streams, word_order=word_order).score
        assert 30 < expected < 100
        got = load("chrf").compute(predictions=HYPS, references=refs, word_order=word_order)
        assert got["score"] == approx(expected)
        assert (got["char_order"], got["word_order"], got["beta"]) == (6, word_order, 2)
        assert M.chrf(HYPS, refs, word_order=word_order)["score"] == approx(expected)
    expected = CHRF(lowercase=True).corpus_score([h.upper() for h in HYPS], [REFS_A]).score
    assert M.chrf([h.upper() for h in HYPS], REFS_A, lowercase=True)["score"] == approx(expected)


def test_generation_metrics_reject_bad_references():
    with pytest.raises(MetricInputError, match="at least|>= 1"):
        M.bleu(["a b"], [[]])
    with pytest.raises(MetricInputError, match="strings"):
        M.chrf(["a b"], [[1]])
    with pytest.raises(MetricInputError, match="single str"):
        M.bleu("a b", "a b")


# ---------------------------------------------------------------------------------------- perplexity


def test_perplexity_hand_computed():
    # per-example summed NLL / token counts: total 6 nats over 6 tokens -> mean 1 -> e
    got = load("perplexity").compute(predictions=[2.0, 4.0], references=[2, 4])
    assert got == {"perplexity": approx(math.e), "mean_nll": approx(1.0), "total_nll": approx(6.0), "n_tokens": 6}
    # per-token NLLs (count 1 each): p = 1/2, 1/4, 1/8 -> mean NLL 2 ln 2 -> perplexity 4
    nlls = [math.log(2), math.log(4), math.log(8)]
    got = load("perplexity").compute(predictions=nlls, references=[1, 1, 1])
    assert got["perplexity"] == approx(4.0) and got["mean_nll"] == approx(2 * math.log(2))
    assert M.perplexity(sum(nlls), 3) == approx(4.0)
    assert M.perplexity(0.0, 10) == 1.0
    assert M.perplexity_from_loss(math.log(7)) == approx(7.0)
    assert M.perplexity_from_loss(np.float32(0.0)) == 1.0
    # empty examples (0 tokens, 0 NLL) are allowed as long as the total is positive
    assert load("perplexity").compute(predictions=[0.0, 3.0], references=[0, 3])["perplexity"] == approx(math.e)


def test_perplexity_overflow_and_nan():
    assert M.perplexity(1e6, 1) == math.inf
    assert M.perplexity_from_loss(710.0) == math.inf
    assert M.perplexity_from_loss(math.inf) == math.inf
    assert load("perplexity").compute(predictions=[5e5, 5e5], references=[1, 1])["perplexity"] == math.inf
    assert math.isnan(M.perplexity(float("nan"), 3))
    assert math.isnan(M.perplexity_from_loss(float("nan")))


def test_perplexity_rejects_bad_input():
    with pytest.raises(MetricInputError, match="sum to 0"):
        M.perplexity(0.0, 0)
    with pytest.raises(MetricInputError, match="negative NLL"):
        M.perplexity(-1.0, 2)  # a log-probability, not an NLL
    with pytest.raises(MetricInputError, match="negative NLL"):
        M.perplexity_from_loss(-0.5)
    with pytest.raises(MetricInputError, match="non-negative integer"):
        M.perplexity(1.0, 2.5)
    with pytest.raises(MetricInputError, match="negative NLL"):
        load("perplexity").compute(predictions=[1.0, -2.0], references=[1, 1])


# ---------------------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", NAMES)
def test_empty_input_is_a_clear_error(name):
    with pytest.raises(MetricInputError, match="empty input") as e:
        load(name).compute(predictions=[], references=[])
    assert isinstance(e.value, PipelinesError) and isinstance(e.value, ValueError)
    # the module is still usable afterwards
    assert load(name).compute(
        predictions={"bleu": ["a b c d"], "chrf": ["a b c d"], "rouge": ["a b c d"], "perplexity": [1.0],
                     "seqeval": [["B-x"]]}.get(name, [1]),
        references={"bleu": ["a b c d"], "chrf": ["a b c d"], "rouge": ["a b c d"], "perplexity": [1],
                    "seqeval": [["B-x"]]}.get(name, [1]),
    )


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.accuracy([], []),
        lambda: M.f1([], []),
        lambda: M.classification_report([], [], ["a", "b"]),
        lambda: M.bleu([], []),
        lambda: M.chrf([], []),
        lambda: M.seqeval([], []),
        lambda: M.token_classification_report([], [], ["O", "B-x"]),
    ],
)
def test_wrappers_empty_input_is_a_clear_error(call):
    with pytest.raises(MetricInputError, match="empty input"):
        call()


def test_length_mismatch_is_an_error():
    with pytest.raises(MetricInputError, match="2 prediction"):
        M.accuracy([0, 1], [0])
    with pytest.raises(MetricInputError, match="1 prediction"):
        M.bleu(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        load("f1").compute(predictions=[0, 1], references=[0])


def test_add_batch_accumulates_on_cached_module():
    module = load("accuracy")
    for i in range(0, len(REFS), 64):
        module.add_batch(predictions=PREDS[i : i + 64], references=REFS[i : i + 64])
    assert module.compute()["accuracy"] == approx(accuracy_score(REFS, PREDS))
    assert module.compute(predictions=[1, 1], references=[1, 0])["accuracy"] == 0.5  # state was reset


# ------------------------------------------------------------------------------------- AUC and ROUGE


def test_roc_auc_matches_sklearn_binary_multiclass_and_multilabel():
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    got = load("roc_auc").compute(predictions=p.tolist(), references=y.tolist())
    assert got["roc_auc"] == approx(roc_auc_score(y, p)) and got["pr_auc"] == approx(average_precision_score(y, p))
    assert M.roc_auc(np.stack([1 - p, p], 1), y)["roc_auc"] == approx(roc_auc_score(y, p))  # rows of 2 class scores

    y3 = rng.integers(0, 3, 300)
    P = rng.random((300, 3)) + np.eye(3)[y3] * 0.5
    P /= P.sum(1, keepdims=True)
    got = M.roc_auc(P, y3, label_names=["a", "b", "c"])
    assert got["roc_auc"] == approx(roc_auc_score(y3, P, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[y3]
    assert got["pr_auc"] == approx(np.mean([average_precision_score(onehot[:, j], P[:, j]) for j in range(3)]))
    assert set(got["roc_auc_per_class"]) == {"a", "b", "c"}

    Y = rng.integers(0, 2, (150, 4))
    Y[:, 3] = 0  # a label that never occurs: no AUC, left out of the average and named
    S = np.clip(Y * 0.4 + rng.random((150, 4)) * 0.6, 0, 1)
    got = load("roc_auc").compute(predictions=S.tolist(), references=Y.tolist(), multi_label=True)
    assert got["roc_auc"] == approx(np.mean([roc_auc_score(Y[:, j], S[:, j]) for j in range(3)]))
    assert got["undefined"] == ["3"] and got["average"] == "macro"
    assert M.roc_auc([0.2, 0.9], [1, 1])["roc_auc"] is None  # one class only: undefined, not an error
    with pytest.raises(MetricInputError, match="score row"):
        M.roc_auc([[0.1, 0.9]], [0, 1])


def test_rouge_matches_rouge_score_directly():
    from rouge_score import rouge_scorer

    preds = ["The cat sat on the mat. It was happy.", "police killed the gunman", "a b c"]
    refs = ["The cat was sitting on the mat. The cat was happy.", "the gunman was shot dead by police", "x y z"]
    got = load("rouge").compute(predictions=preds, references=refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for t in ("rouge1", "rouge2", "rougeL"):
        want = 100 * sum(scorer.score(r, p)[t].fmeasure for p, r in zip(preds, refs)) / 3
        assert got[t] == approx(want)
    # rougeLsum: sentences on their own lines, as rouge-score expects them
    lsum = [scorer.score("The cat was sitting on the mat.\nThe cat was happy.", "The cat sat on the mat.\nIt was happy.")]
    lsum += [scorer.score(r, p) for p, r in zip(preds[1:], refs[1:])]
    assert got["rougeLsum"] == approx(100 * sum(s["rougeLsum"].fmeasure for s in lsum) / 3)
    # several references: the best one counts
    best = M.rouge(["the gunman was shot"], [["nothing alike", "the gunman was shot"]])
    assert best["rouge1"] == approx(100.0)
    assert M.split_sentences('He left. "Why?" she asked!  Then\nnothing') == ["He left.", '"Why?"', "she asked!", "Then", "nothing"]
