"""Entity-level token-classification metrics (seqeval) against hand-computed values, through the shipped
`evaluate` module and the wrappers; only first sub-tokens (labels != -100) are scored."""

import pytest

from pipelines import metrics as M
from pipelines.metrics import MetricInputError, load

# Two sentences. Reference entities: PER(0-1), LOC(3) | ORG(0), LOC(2-3)   -> 4 entities
# Predicted entities:                PER(0-1), ORG(3) | ORG(0), LOC(2)     -> 4 entities
# Correct (type and span): PER(0-1), ORG(0)                               -> 2
REFS = [["B-PER", "I-PER", "O", "B-LOC", "O"], ["B-ORG", "O", "B-LOC", "I-LOC"]]
PREDS = [["B-PER", "I-PER", "O", "B-ORG", "O"], ["B-ORG", "O", "B-LOC", "O"]]


def check_hand_computed(r):
    assert r["entity_precision"] == pytest.approx(2 / 4)
    assert r["entity_recall"] == pytest.approx(2 / 4)
    assert r["entity_f1"] == pytest.approx(0.5)
    assert r["token_accuracy"] == pytest.approx(7 / 9)  # 2 wrong tags of 9
    # PER: 1/1 right -> 1.0; LOC: 0 of 1 predicted right, 0 of 2 found -> 0.0; ORG: P = 1/2, R = 1/1 -> 2/3
    assert r["f1_per_type"] == pytest.approx({"LOC": 0.0, "ORG": 2 / 3, "PER": 1.0})
    assert r["per_type"]["LOC"]["number"] == 2 and r["per_type"]["ORG"]["precision"] == pytest.approx(0.5)
    assert r["num_sentences"] == 2 and r["num_entities"] == 4


def test_wrapper_hand_computed():
    check_hand_computed(M.seqeval(PREDS, REFS))


def test_evaluate_module_hand_computed_and_add_batch():
    check_hand_computed(load("seqeval").compute(predictions=PREDS, references=REFS))
    mod = load("seqeval", experiment_id="tokcls-batches")
    for p, r in zip(PREDS, REFS):
        mod.add_batch(predictions=[p], references=[r])
    check_hand_computed(mod.compute())


def test_token_ids_report_scores_only_first_subtokens():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    ids = {n: i for i, n in enumerate(names)}
    # each word's first sub-token carries the reference; the others (and specials, padding) are -100 and
    # their predictions, deliberately wrong, must not count
    refs, preds = [], []
    for r, p in zip(REFS, PREDS):
        rr, pp = [-100], [ids["B-ORG"]]  # [CLS]
        for a, b in zip(r, p):
            rr += [ids[a], -100]  # a word of two sub-tokens
            pp += [ids[b], ids["B-LOC"]]
        rr += [-100] * (12 - len(rr))  # [SEP] + padding as the Trainer pads
        pp += [-100] * (12 - len(pp))
        refs.append(rr)
        preds.append(pp)
    check_hand_computed(M.token_classification_report(preds, refs, names))


def test_strict_mode_differs_from_the_lenient_default():
    # I-PER without a B-: conlleval (default) reads it as an entity, strict IOB2 does not
    refs, preds = [["B-PER", "I-PER"]], [["I-PER", "I-PER"]]
    assert M.seqeval(preds, refs)["entity_f1"] == 1.0
    assert M.seqeval(preds, refs, mode="strict", scheme="IOB2")["entity_f1"] == 0.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(MetricInputError, match="sentence 1: 3 predicted tag"):
        M.seqeval([["O"], ["O", "O", "O"]], [["O"], ["O", "O"]])
    with pytest.raises(MetricInputError, match="expected tag names"):
        M.seqeval([[0, 1]], [[0, 1]])
    with pytest.raises(MetricInputError, match="id 9 outside 0..1"):
        M.token_classification_report([[9]], [[0]], ["O", "B-x"])
