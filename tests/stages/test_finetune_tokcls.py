"""Token classification (NER) in the finetune stage, on the shipped WNUT-17 sample and a tiny BERT with the
MiniLM tokenizer: word -> sub-token label alignment, LoRA end to end (entity metrics in the manifest, the
adapter and the merged model predicting alike, label names kept), full fine-tuning, tokenizers that
cannot take pre-split words, and the stages that refuse token-classification models (distill, quantize,
serve, publish) with a clear message before any work."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import modelio, runner, tasks
from pipelines.data import load_card
from pipelines.errors import PipelinesError, RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from pipelines.tasks.base import label_kwargs
from tests.tiny_models import minilm_dir
from tests.tiny_models import tiny_bert as make_tiny_bert  # the fixture below is tiny_bert

CARDS = ROOT / "data_cards"
FAST = {"batch_size": 8, "logging_steps": 1, "lr": 5e-3}
NAMES = load_card(CARDS / "wnut17_sample.yaml").label_names
NER = tasks.get("token-classification")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT encoder (no head) with the MiniLM WordPiece tokenizer, random weights."""
    return make_tiny_bert(tmp_path_factory.mktemp("tok_models") / "bert")


@pytest.fixture(scope="module")
def ner_model(tmp_path_factory, tiny_bert):
    """A tiny BertForTokenClassification folder with the WNUT-17 label names (what finetune's model/ holds)."""
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    out = tmp_path_factory.mktemp("tok_models") / "ner"
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    torch.manual_seed(0)
    BertForTokenClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                          **label_kwargs(NAMES))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write(write_recipe, tmp_path, stages, card="wnut17_sample"):
    return write_recipe({"name": "tc", "output_dir": str(tmp_path / "run"), "seed": 1,
                         "data": {"w": str(CARDS / f"{card}.yaml")}, "stages": stages})


def ft(config):
    return {"name": "ft", "type": "finetune", "data": "w", "config": {"task": "token-classification", **config}}


# ---------------------------------------------------------------- encoding


def test_only_the_first_subtoken_of_each_word_is_labelled():
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    words = ["Redondo", "Beach", "Blvd", "rocks", "!"]
    pieces = [tok.tokenize(w) for w in words]
    assert len(pieces[0]) > 1 and len(pieces[2]) > 1  # words of several sub-tokens
    ds = datasets.Dataset.from_dict({"tokens": [words], "tags": [[7, 8, 8, 0, 0]]})
    enc = NER.encode(ds, tok, tasks.EvalOptions(max_length=64))
    expect = [-100]  # [CLS]
    for p, t in zip(pieces, [7, 8, 8, 0, 0]):
        expect += [t] + [-100] * (len(p) - 1)
    expect += [-100]  # [SEP]
    assert enc[0]["labels"] == expect and len(enc[0]["input_ids"]) == len(expect)
    assert tok.convert_ids_to_tokens(enc[0]["input_ids"])[1 : 1 + len(pieces[0])] == pieces[0]

    # truncation: words beyond max_length get no label at all (and nothing crashes)
    short = NER.encode(ds, tok, tasks.EvalOptions(max_length=4))
    assert short[0]["labels"] == [-100, 7, -100, -100] and len(short[0]["input_ids"]) == 4

    # the cache key follows the tokenizer (pitfall: stale tokenised cache)
    other = AutoTokenizer.from_pretrained(minilm_dir())
    other.add_tokens(["redondo"])
    again = NER.encode(ds, other, tasks.EvalOptions(max_length=64))
    assert again._fingerprint != enc._fingerprint and len(again[0]["input_ids"]) < len(expect)


def test_collator_pads_labels_with_minus_100():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    batch = NER.collator(tok)([
        {"input_ids": [101, 7, 102], "attention_mask": [1, 1, 1], "labels": [-100, 3, -100]},
        {"input_ids": [101, 7, 8, 9, 102], "attention_mask": [1] * 5, "labels": [-100, 1, 2, -100, -100]},
    ])
    assert batch["labels"].tolist()[0] == [-100, 3, -100, -100, -100]


def test_byte_level_bpe_without_prefix_space_is_refused(tmp_path):
    from tests.tiny_models import shakespeare_gpt2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shakespeare_gpt2(tmp_path / "gpt2", n_embd=16))
    with pytest.raises(PipelinesError, match="byte-level BPE .* needs add_prefix_space=True"):
        NER.prepare_processor(tok)
    NER.prepare_processor(AutoTokenizer.from_pretrained(minilm_dir()))  # WordPiece: fine


# ---------------------------------------------------------------- the stage


def test_lora_token_classification_end_to_end(write_recipe, tmp_path, tiny_bert):
    """LoRA + the classifier head on the WNUT-17 sample: entity metrics per split in the manifest, best
    checkpoint picked by eval_entity_f1, adapter and merged model reload in plain code and predict alike,
    label names in config.json, per-word predictions written."""
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    cfg = {"base_model": str(tiny_bert), "method": "lora", "max_train_rows": 64, "max_eval_rows": 24,
           "lora": {"r": 4, "alpha": 8}, "group_by_length": True,  # must not reorder the predictions
           "train": {**FAST, "max_steps": 6, "eval_steps": 3, "save_steps": 3,
                     "metric_for_best_model": "eval_entity_f1", "load_best_model_at_end": True}}
    publish = {"name": "publish", "type": "publish", "inputs": {"model": "ft"}, "config": {"dry_run": True}}
    runner.run(load_recipe(write(write_recipe, tmp_path, [ft(cfg), publish])))
    card = (tmp_path / "run/publish/repo/README.md").read_text()
    assert "pipeline_tag: token-classification" in card and 'aggregation_strategy="first"' in card
    assert "| ft | validation | most_frequent_tag | baseline | entity_f1 |" in card
    m = json.loads((tmp_path / "run/ft/manifest.json").read_text())
    met, info = m["metrics"], m["info"]
    assert m["outputs"] == {"adapter": "adapter", "model": "model"}
    for split in ("validation", "test"):
        for k in ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"):
            assert 0.0 <= met[f"{split}_{k}"] <= 1.0
        assert met[f"{split}_token_accuracy"] > 0.5  # mostly O, learnt in 6 steps
        report = info[f"{split}_report"]
        assert set(report["f1_per_type"]) <= {"corporation", "creative-work", "group", "location", "person", "product"}
        assert "person" in report["per_type"] and report["num_sentences"] == 24
        assert all(met[f"{split}_entity_f1_{t}"] == f for t, f in report["f1_per_type"].items())
    assert info["lora"]["modules_to_save"] == ["classifier"] and info["best_checkpoint"] is not None
    assert 0 < met["trainable_share"] < 0.5 and info["merge_max_abs_logit_diff"] < 1e-4
    history = json.loads((tmp_path / "run/ft/log_history.json").read_text())
    assert sum("eval_entity_f1" in h for h in history) == 2  # evaluated during training at steps 3 and 6

    run = tmp_path / "run/ft"
    assert json.loads((run / "model/config.json").read_text())["id2label"]["9"] == "B-person"
    rows = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(len(r["tokens"]) == len(r["predicted"]) == len(r["tags"]) for r in rows)

    tok = AutoTokenizer.from_pretrained(run / "model")
    words = [r["tokens"] for r in rows[:8]]
    enc = tok(words, is_split_into_words=True, return_tensors="pt", padding=True)
    merged = AutoModelForTokenClassification.from_pretrained(run / "model").eval()
    base = AutoModelForTokenClassification.from_pretrained(tiny_bert, **label_kwargs(NAMES))
    adapter = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        a, b = merged(**enc).logits, adapter(**enc).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # the model the stage evaluated is the one it saved: same per-word predictions as predictions_*.jsonl
    pred = a.argmax(-1)
    for i, r in enumerate(rows[:8]):
        seen, got = set(), []
        for pos, w in enumerate(enc.word_ids(i)):
            if w is not None and w not in seen:
                seen.add(w)
                got.append(NAMES[int(pred[i, pos])])
        assert got == r["predicted"]


def test_full_token_classification_and_card_mismatch(write_recipe, tmp_path, tiny_bert):
    cfg = {"base_model": str(tiny_bert), "method": "full", "max_train_rows": 16, "max_eval_rows": 8,
           "eval_splits": ["validation"], "train": {**FAST, "max_steps": 2}}
    runner.run(load_recipe(write(write_recipe, tmp_path, [ft(cfg)])))
    m = json.loads((tmp_path / "run/ft/manifest.json").read_text())
    assert m["outputs"] == {"model": "model"} and m["metrics"]["trainable_share"] == 1.0
    assert "validation_entity_f1" in m["metrics"] and "test_entity_f1" not in m["metrics"]
    # a text-classification card for a token-classification task: refused before any training
    with pytest.raises(RecipeError, match=r"task token-classification needs the roles \['tags', 'tokens'\]"):
        load_recipe(write(write_recipe, tmp_path / "other", [ft(cfg)], card="sst2_sample"))  # by validate


# ---------------------------------------------------------------- the other stages


def test_quantize_takes_a_token_classification_model(write_recipe, tmp_path, ner_model):
    """dynamic int8 of a NER model: entity metrics for fp32 and int8 side by side; the saved folder reloads
    with load_quantized and predicts, word for word, what the stage recorded."""
    from transformers import AutoTokenizer

    from pipelines import modelio

    quant = {"name": "quantize", "type": "quantize", "data": "w",
             "config": {"model_path": str(ner_model), "max_eval_samples": 40, "eval_splits": ["validation"],
                        "latency_repeats": 2}}  # fmt: skip
    runner.run(load_recipe(write(write_recipe, tmp_path, [quant])))
    m = json.loads((tmp_path / "run/quantize/manifest.json").read_text())
    met = m["metrics"]
    for k in ("entity_f1", "entity_precision", "entity_recall", "token_accuracy"):
        assert 0 <= met[k] <= 1 and 0 <= met[f"fp32_{k}"] <= 1, (k, met)
    assert met["token_accuracy"] > 0 and "entity_f1_delta" in met and met["size_ratio"] > 1
    assert m["info"]["task"] == "token-classification"
    assert m["info"]["eval"]["validation"]["quantized"]["token_accuracy"] == met["token_accuracy"]

    recorded = json.loads((tmp_path / "run/quantize/predictions.json").read_text())
    assert recorded["task"] == "token-classification" and len(recorded["outputs"]) == 40
    folder = tmp_path / "run/quantize/model"
    model, tok = modelio.load_quantized(folder), AutoTokenizer.from_pretrained(folder)
    rows = load_card(CARDS / "wnut17_sample.yaml").load(seed=1)["validation"].select(range(40))
    NER.prepare_processor(tok)
    scored = NER.evaluate(model, tok, rows, tasks.EvalOptions(label_names=NAMES))
    words = scored.outputs
    assert words == recorded["outputs"] and scored.metrics["token_accuracy"] == met["token_accuracy"]
    n_words = sum(map(len, rows["tokens"]))
    assert 0.95 * n_words <= sum(map(len, words)) <= n_words  # one prediction per word (bar words with no sub-token)


def test_distill_token_classification_on_first_subtoken_logits(write_recipe, tmp_path, ner_model):
    """A 1-layer student of the NER teacher: per-token KD over the labelled (first sub-token) positions,
    entity metrics of student and teacher side by side, the most-frequent-tag baseline on the same split."""
    dist = {"name": "distill", "type": "distill", "data": "w",
            "config": {"teacher_model": str(ner_model), "student": {"every_other": True}, "max_eval_samples": 30,
                       "eval_splits": ["validation"], "latency_repeats": 2,
                       "train": {"max_steps": 3, "batch_size": 8, "logging_steps": 1}}}
    runner.run(load_recipe(write(write_recipe, tmp_path, [dist])))
    m = json.loads((tmp_path / "run/distill/manifest.json").read_text())
    met = m["metrics"]
    assert m["task"] == "token-classification" and met["train_steps"] == 3
    for k in ("entity_f1", "token_accuracy"):
        assert 0 <= met[f"student_{k}"] <= 1 and 0 <= met[f"teacher_{k}"] <= 1
    assert met["student_params"] < met["teacher_params"]
    roles = {(e["model"], e["role"]) for e in m["evaluations"]}
    assert roles == {("teacher", "reference"), ("student", "output"), ("most_frequent_tag", "baseline")}
    student, task = modelio.load_model(tmp_path / "run/distill/model")
    assert task is NER and student.config.num_hidden_layers == 1 and student.config.id2label[1] == NAMES[1]


def test_kd_items_are_the_labelled_positions():
    """Token classification: an item is a position whose label is not -100 (no shift), so the CE part equals
    cross-entropy over the first sub-tokens only."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, 1, -100, 2, -100], [-100, 0, 1, -100, -100]])
    total, mask = NER.kd_loss_sum(s, t, labels, 1.0, 2.0)
    assert mask.sum() == 4
    torch.testing.assert_close(total, F.cross_entropy(s[mask], labels[mask], reduction="sum"))


def test_served_entities_have_character_spans(ner_model):
    """/predict of a NER model: BIO tags grouped into entities whose spans index the request's text."""
    from pipelines.serve import ServedModel
    from pipelines.tasks.token_classification import group_entities

    served = ServedModel(ner_model)
    text = "Jane Doe flew from Paris to New York"
    (out,) = served.run_batch((), [text])
    for e in out["entities"]:
        assert text[e["start"]:e["end"]] == e["word"] and 0 <= e["score"] <= 1 and e["entity_group"] in {
            n.split("-", 1)[1] for n in NAMES if "-" in n}
    words = [("B-person", 0.9, 0, 4), ("I-person", 0.7, 5, 8), ("O", 0.9, 9, 13), ("B-location", 0.8, 19, 24),
             ("I-person", 0.6, 28, 31), ("I-person", 0.4, 32, 36)]
    got = group_entities(text, words)
    assert [(e["entity_group"], e["word"]) for e in got] == [("person", "Jane Doe"), ("location", "Paris"),
                                                             ("person", "New York")]
    assert got[0]["score"] == pytest.approx(0.8)
