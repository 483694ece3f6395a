"""Data cards: the shipped cards load with the expected rows and roles; bad cards and bad data give one
clear DataError naming the file, the row and the problem; awkward but valid files load correctly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines.data import DataCard, load_card
from pipelines.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "data_cards"
SHARED = REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A private datasets cache, so tests neither depend on nor litter the user's cache."""
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(autouse=True)
def _quiet():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if was:
        datasets.enable_progress_bars()


def write_card(folder: Path, body: str, name: str = "card.yaml") -> Path:
    p = folder / name
    p.write_text(body, encoding="utf-8")
    return p


def csv_card(folder: Path, files: str = "  train: data.csv", extra: str = "", fmt: str = "csv") -> Path:
    return write_card(
        folder,
        f"""\
source: test
license: CC0
format: {fmt}
files:
{files}
columns: {{text: text, label: label}}
label_names: [negative, positive]
{extra}""",
    )


def load_error(card_path: Path, cache: Path | None = None, seed: int = 42) -> str:
    with pytest.raises(DataError) as ei:
        load_card(card_path).load(seed=seed, cache_dir=cache)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def card_error(card_path: Path) -> str:
    with pytest.raises(DataError) as ei:
        load_card(card_path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(card_path) in msg
    return msg


# ---------------------------------------------------------------- shipped cards


def test_tinyshakespeare_sample(cache):
    card = load_card(CARDS / "tinyshakespeare_sample.yaml")
    assert card.name == "tinyshakespeare_sample" and card.task == "causal-lm"
    assert "MIT" in card.license and card.source
    dd = card.load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 1577, "validation": 193}
    assert dd["train"].column_names == ["text"]
    assert dd["train"][0]["text"].startswith("First Citizen:\nBefore we proceed")
    assert all(t.strip() == t and t for t in dd["validation"]["text"])
    size = sum(p.stat().st_size for p in card.data_files())
    assert 200_000 < size < 300_000


def test_sst2_sample(cache):
    card = load_card(CARDS / "sst2_sample.yaml")
    assert card.label_names == ["negative", "positive"] and card.language == "en"
    assert "research" in card.license
    dd = card.load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 2000, "validation": 400, "test": 400}
    for ds in dd.values():
        assert ds.column_names == ["text", "label"]
        assert ds.features["label"].names == ["negative", "positive"]
    assert sorted(dd["train"]["label"]) == [0] * 1000 + [1] * 1000
    texts = {s: set(ds["text"]) for s, ds in dd.items()}
    assert not texts["train"] & (texts["validation"] | texts["test"])
    assert not any("-lrb-" in t for t in texts["test"])
    assert card.split_notes["validation"] == "validation.tsv: 400 rows"


def test_multi30k_sample(cache):
    card = load_card(CARDS / "multi30k_sample.yaml")
    assert card.language == ["en", "de"] and card.task == "translation"
    dd = card.load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 3000, "validation": 300, "test": 300}
    assert dd["test"].column_names == ["source", "target"]
    assert "Mann" in dd["train"][0]["target"] and "man" in dd["train"][0]["source"]


def test_sample_sizes_stay_small():
    # 1.0 MB of text samples + 0.75 MB for the multi-label, image (600 PNGs) and summarisation samples + 0.47 MB of
    # chat conversations and preference pairs (built from the SST-2 sample)
    total = sum(p.stat().st_size for p in (REPO / "data").rglob("*")
                if p.is_file() and "full" not in p.relative_to(REPO / "data").parts[:1])  # data/full: not committed
    assert total < 2_400_000


def test_every_card_validates_or_only_misses_shared_files():
    """Cards of full-size sets read ../shared or data/full/ (made by data/make_task_samples.py --full): a clone
    may lack those, nothing else."""
    for path in sorted(CARDS.glob("*.yaml")):
        if path.name == "TEMPLATE.yaml":
            continue
        try:
            card = load_card(path)
        except DataError as e:
            msg = str(e)
            assert "not found" in msg and (not SHARED.exists() or "data/full/" in msg), msg
            continue
        assert card.source and card.license and card.name == path.stem


def test_template_card_with_a_users_csv(tmp_path, cache):
    shutil.copy(CARDS / "TEMPLATE.yaml", tmp_path / "reviews.yaml")
    rows = ['"Great phone, battery lasts two days",positive'] * 10 + ["Screen cracked after a week,negative"] * 10
    (tmp_path / "reviews.csv").write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    card = load_card(tmp_path / "reviews.yaml")
    dd = card.load(seed=1, cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 18, "validation": 2}
    assert sorted(dd["validation"]["label"]) == [0, 1]  # stratified by label


needs_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"shared data sets not present at {SHARED}")


@needs_shared
def test_full_sst2(cache):
    card = load_card(CARDS / "sst2.yaml")
    dd = card.load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 67349, "validation": 872, "test": 1821}
    assert sum(dd["train"]["label"]) == 37569 and sum(dd["validation"]["label"]) == 444
    assert sum(dd["test"]["label"]) == 909
    assert dd["validation"][0]["text"] == "it 's a charming and often affecting journey ."  # trailing space stripped
    assert dd["test"].column_names == ["text", "label"]


@needs_shared
def test_full_multi30k(cache):
    dd = load_card(CARDS / "multi30k.yaml").load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 29000, "validation": 1014, "test": 1000}


@needs_shared
def test_full_tinyshakespeare_holds_out_the_tail(cache):
    card = load_card(CARDS / "tinyshakespeare.yaml")
    dd = card.load(cache_dir=cache)
    n_train, n_val = len(dd["train"]), len(dd["validation"])
    assert n_val == round((n_train + n_val) * 0.1)
    assert dd["train"][0]["text"].startswith("First Citizen:")
    assert "last 10% of train rows in file order" in card.split_notes["validation"]


@needs_shared
def test_full_wikitext2_has_no_train_and_makes_no_split(cache):
    card = load_card(CARDS / "wikitext2.yaml")
    dd = card.load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"validation": 2461, "test": 2891}
    assert "validation" in card.split_notes and "made from train" not in card.split_notes["validation"]


def test_full_cards_without_shared_fail_clearly(tmp_path):
    # the same card copied elsewhere cannot find ../../shared: a one-line "file not found", not a traceback
    (tmp_path / "cards").mkdir()
    shutil.copy(CARDS / "sst2.yaml", tmp_path / "cards" / "sst2.yaml")
    msg = card_error(tmp_path / "cards" / "sst2.yaml")
    assert "files.train: file not found:" in msg and "sst2-glue/train.tsv" in msg


# ---------------------------------------------------------------- bad cards and bad data


def test_missing_file(tmp_path):
    msg = card_error(csv_card(tmp_path))
    assert f"files.train: file not found: {tmp_path / 'data.csv'}" in msg


def test_empty_file(tmp_path):
    (tmp_path / "data.csv").write_bytes(b"")
    msg = card_error(csv_card(tmp_path))
    assert f"files.train: empty file (0 bytes): {tmp_path / 'data.csv'}" in msg


def test_missing_column_lists_the_files_columns(tmp_path, cache):
    (tmp_path / "data.csv").write_text("review,stars\ngood,1\n", encoding="utf-8")
    msg = load_error(csv_card(tmp_path), cache)
    assert str(tmp_path / "data.csv") in msg
    assert "missing column 'text' (columns.text), 'label' (columns.label)" in msg
    assert "the file has columns: ['review', 'stars']" in msg


def test_empty_split(tmp_path, cache):
    (tmp_path / "data.csv").write_text("text,label\n", encoding="utf-8")
    msg = load_error(csv_card(tmp_path), cache)
    assert f"{tmp_path / 'data.csv'}: split 'train' is empty: the file has no data rows" in msg
    # a text file of blank lines only
    (tmp_path / "blank.txt").write_text("\n  \n\n", encoding="utf-8")
    card = write_card(tmp_path, "source: s\nlicense: l\nformat: text\nfiles: {test: blank.txt}\n", "t.yaml")
    msg = load_error(card, cache)
    assert "blank.txt: split 'test' is empty" in msg


@pytest.mark.parametrize(
    "cell,what", [('""', "empty"), ('"   "', "whitespace-only")], ids=["empty", "whitespace"]
)
def test_empty_text_names_the_row_and_line(tmp_path, cache, cell, what):
    (tmp_path / "data.csv").write_text(
        f'text,label\nfine,1\n"two\nlines",0\n{cell},1\nok,0\n', encoding="utf-8"
    )
    msg = load_error(csv_card(tmp_path), cache)
    # data row 3 starts on line 5 (the header is line 1 and row 2 spans two lines)
    assert f"{tmp_path / 'data.csv'}: row 3 (line 5): {what} text in column 'text' (text)" in msg
    assert "card.yaml" in msg and "split 'train'" in msg


def test_null_text_in_jsonl(tmp_path, cache):
    (tmp_path / "d.jsonl").write_text(
        '{"text": "a", "label": 1}\n{"text": null, "label": 0}\n', encoding="utf-8"
    )
    msg = load_error(csv_card(tmp_path, "  train: d.jsonl", fmt="jsonl"), cache)
    assert f"{tmp_path / 'd.jsonl'}: row 2 (line 2): missing (null) text in column 'text'" in msg


def test_label_outside_label_names(tmp_path, cache):
    (tmp_path / "data.csv").write_text("text,label\ngood,positive\nmeh,neutral\n", encoding="utf-8")
    msg = load_error(csv_card(tmp_path), cache)
    assert (
        f"{tmp_path / 'data.csv'}: row 2 (line 3): label 'neutral' in column 'label' is not one of label_names "
        "['negative', 'positive', 'or ids 0..1']"
    ) in msg
    (tmp_path / "data.csv").write_text("text,label\ngood,1\nbad,2\n", encoding="utf-8")
    assert "row 2 (line 3): label '2' in column 'label' is not one of" in load_error(csv_card(tmp_path), cache)


def test_non_utf8_bytes_name_the_offset(tmp_path, cache):
    data = b"text,label\ngood,1\ncaf\xe9 au lait,0\n"
    (tmp_path / "data.csv").write_bytes(data)
    msg = load_error(csv_card(tmp_path), cache)
    offset = data.index(b"\xe9")  # 21
    assert f"{tmp_path / 'data.csv'}: not valid UTF-8 at byte offset {offset} (line 3" in msg


def test_split_given_twice(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nx,1\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("text,label\ny,0\n", encoding="utf-8")
    msg = card_error(csv_card(tmp_path, "  train: a.csv\n  train: b.csv"))
    assert "files.train: split given twice (lines 5 and 6)" in msg
    msg = card_error(csv_card(tmp_path, "  train: a.csv\n  test: a.csv"))
    assert f"files.test: {tmp_path / 'a.csv'} is also used by split 'train'" in msg


def test_misaligned_parallel_files(tmp_path, cache):
    (tmp_path / "train.en").write_text("a dog\na cat\na bird\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("ein Hund\neine Katze\n\n", encoding="utf-8")  # trailing blank ignored
    card = write_card(
        tmp_path, "source: s\nlicense: l\nformat: text\nfiles:\n  train: {source: train.en, target: train.de}\n"
    )
    msg = load_error(card, cache)
    assert "aligned files have different line counts: train.en has 3 lines, train.de has 2 lines" in msg
    assert str(tmp_path / "train.en") in msg
    # same length, but one side empty on a line
    (tmp_path / "train.de").write_text("ein Hund\n\nein Vogel\n", encoding="utf-8")
    msg = load_error(card, cache)
    assert f"{tmp_path / 'train.de'}: line 2: empty text (target) while line 2 of train.en is not" in msg


def test_ragged_tsv_row(tmp_path, cache):
    (tmp_path / "d.tsv").write_text("text\tlabel\ngood\t1\nbad\tone\ttab\t0\n", encoding="utf-8")
    msg = load_error(csv_card(tmp_path, "  train: d.tsv", fmt="tsv"), cache)
    assert f"{tmp_path / 'd.tsv'}: line 3: 4 fields where the header has 2" in msg


@pytest.mark.parametrize(
    "body,expected",
    [
        ("format: csv\nfiles: {train: a.csv}\ncolumns: {text: t}\n", "license: Field required"),
        ("source: s\nlicense: l\nformat: xlsx\nfiles: {train: a.csv}\n", "format: expected 'csv', 'tsv'"),
        ("source: s\nlicense: l\nformat: text\nfiles: {dev: a.txt}\n", "files.dev: unknown split name; expected one of train, validation, test; rename it to 'validation'"),
        ("source: s\nlicense: l\nformat: text\nfiles: {train: a.txt}\nlabels: [a, b]\n", "labels: unknown key"),
        ("source: s\nlicense: l\nformat: csv\nfiles: {train: a.csv}\ncolumns: {text: t, label: l}\n", "label_names: required when a `label` column is mapped"),
        ("source: s\nlicense: l\nformat: csv\nfiles: {train: a.csv}\ncolumns: {txt: t}\n", "columns.txt"),
        ("source: s\nlicense: l\nformat: csv\nfiles: {train: a.csv}\n", "columns: required for format csv"),
        ("source: s\nlicense: l\ntask: translation\nformat: text\nfiles: {train: a.txt}\n", "task: translation needs the roles source and target"),
        ("source: s\nlicense: l\nformat: text\nfiles: {train: []}\n", "files.train: empty list"),
        ("source: s\nlicense: l\nformat: text\nfiles: {train: a.txt}\nvalidation_split: {fraction: 1.5}\n", "validation_split.fraction: expected less than 1 (got 1.5)"),
        ("- not a mapping\n", "(top level): expected a mapping"),
        ("source: [unclosed\n", "not valid YAML"),
    ],
    ids=["no-license", "bad-format", "dev-split", "unknown-key", "no-label-names", "bad-role", "no-columns",
         "task-roles", "empty-list", "bad-fraction", "not-mapping", "bad-yaml"],
)
def test_bad_card_fields(tmp_path, body, expected):
    (tmp_path / "a.csv").write_text("t,l\nx,1\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("x\n", encoding="utf-8")
    msg = card_error(write_card(tmp_path, body))
    assert expected in msg


def test_markdown_card_needs_front_matter(tmp_path):
    msg = card_error(write_card(tmp_path, "# My data\n\nsource: x\n", "README.md"))
    assert "must start with YAML front matter" in msg


# ---------------------------------------------------------------- awkward but valid files


def test_crlf_bom_and_quoted_csv(tmp_path, cache):
    raw = (
        '\ufefftext,label,extra\r\n'
        '"hello, ""world""",1,x\r\n'
        '"two\r\nlines",0,y\r\n'
        'plain,"1",z\r\n'
    ).encode("utf-8")
    (tmp_path / "data.csv").write_bytes(raw)
    ds = load_card(csv_card(tmp_path, "  test: data.csv")).load(cache_dir=cache)["test"]
    assert ds.column_names == ["text", "label"]  # `extra` is not loaded
    assert ds["text"] == ['hello, "world"', "two\nlines", "plain"]
    assert ds["label"] == [1, 0, 1]


def test_tsv_is_read_without_quoting(tmp_path, cache):
    (tmp_path / "d.tsv").write_text(
        'text\tlabel\nthe " pleasant " one \t1\n"quoted" start\t0\n', encoding="utf-8"
    )
    ds = load_card(csv_card(tmp_path, "  test: d.tsv", fmt="tsv")).load(cache_dir=cache)["test"]
    assert ds["text"] == ['the " pleasant " one', '"quoted" start'] and ds["label"] == [1, 0]


def test_labels_as_ids_strings_and_names(tmp_path, cache):
    (tmp_path / "a.csv").write_text("text,label\nw,1\nx,0\ny,positive\nz, negative \n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"text": "w", "label": 1}, {"text": "x", "label": "0"},
                                          {"text": "y", "label": "positive"}, {"text": "z", "label": 0}]) + "\n",
        encoding="utf-8",
    )
    for fmt, f in [("csv", "a.csv"), ("jsonl", "b.jsonl")]:
        shutil.copy(tmp_path / f, tmp_path / f"copy-{f}")
        card = load_card(csv_card(tmp_path, f"  validation: {f}\n  test: copy-{f}", fmt=fmt))
        dd = card.load(cache_dir=cache)
        assert list(dd) == ["validation", "test"]  # no train: no split made
        assert dd["validation"]["label"] == [1, 0, 1, 0], fmt
        assert dd["validation"]["text"] == ["w", "x", "y", "z"]


def test_numeric_label_names_match_by_name(tmp_path, cache):
    (tmp_path / "a.csv").write_text("text,stars\na,1\nb,5\nc,3\n", encoding="utf-8")
    card = write_card(
        tmp_path,
        "source: s\nlicense: l\nformat: csv\nfiles: {test: a.csv}\ncolumns: {text: text, label: stars}\n"
        "label_names: [1, 2, 3, 4, 5]\n",
    )
    assert load_card(card).load(cache_dir=cache)["test"]["label"] == [0, 4, 2]
    (tmp_path / "a.csv").write_text("text,stars\na,0\n", encoding="utf-8")
    assert "label '0' in column 'stars' is not one of label_names ['1', '2', '3', '4', '5']" in load_error(card, cache)


def test_json_and_parquet(tmp_path, cache):
    import pandas as pd

    rows = [{"review": f"text {i}", "y": i % 2, "other": i} for i in range(10)]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for fmt in ["json", "parquet"]:
        card = write_card(
            tmp_path,
            f"source: s\nlicense: l\nformat: {fmt}\nfiles: {{test: d.{fmt}}}\ncolumns: {{text: review, label: y}}\n"
            "label_names: [even, odd]\n",
        )
        ds = load_card(card).load(cache_dir=cache)["test"]
        assert ds.column_names == ["text", "label"] and ds["label"] == [i % 2 for i in range(10)]


def test_markdown_card_with_front_matter(tmp_path, cache):
    (tmp_path / "poems.txt").write_text("Roses are red.\n\nViolets are blue.\nSugar is sweet.\n", encoding="utf-8")
    md = """---
name: poems
source: me
license: CC BY 4.0
language: en
format: text
text_sample_by: paragraph
files:
  test: poems.txt
---
# Poems

Two tiny poems.
"""
    card = load_card(write_card(tmp_path, md, "README.md"))
    assert isinstance(card, DataCard) and card.name == "poems"
    assert card.description.startswith("# Poems") and card.path == (tmp_path / "README.md").resolve()
    ds = card.load(cache_dir=cache)["test"]
    assert ds["text"] == ["Roses are red.", "Violets are blue.\nSugar is sweet."]


def test_validation_split_is_seeded_reproducible_and_noted(tmp_path, cache):
    lines = [f"example {i},{'positive' if i % 3 else 'negative'}" for i in range(200)]
    (tmp_path / "data.csv").write_text("text,label\n" + "\n".join(lines) + "\n", encoding="utf-8")
    path = csv_card(tmp_path)
    a = load_card(path)
    d1 = a.load(seed=7, cache_dir=cache)
    d2 = load_card(path).load(seed=7, cache_dir=cache)
    d3 = load_card(path).load(seed=8, cache_dir=cache)
    assert len(d1["validation"]) == 20 and len(d1["train"]) == 180
    assert d1["validation"]["text"] == d2["validation"]["text"]
    assert d1["validation"]["text"] != d3["validation"]["text"]
    assert not set(d1["train"]["text"]) & set(d1["validation"]["text"])
    assert a.split_notes["validation"] == "made from train: 10% seeded split (seed 7, stratified by label), 20 rows"
    assert a.split_notes["train"] == "data.csv: 200 rows, minus 20 moved to validation = 180 rows"
    # the card's own seed wins over the recipe's
    path.write_text(path.read_text() + "validation_split: {fraction: 0.25, seed: 3}\n", encoding="utf-8")
    b = load_card(path)
    assert len(b.load(seed=7, cache_dir=cache)["validation"]) == 50
    assert "25% seeded split (seed 3" in b.split_notes["validation"]


def test_fingerprint_and_data_files(tmp_path):
    (tmp_path / "data.csv").write_text("text,label\nx,1\n", encoding="utf-8")
    path = csv_card(tmp_path)
    card = load_card(path)
    assert card.data_files() == [(tmp_path / "data.csv").resolve()]
    fp = card.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and load_card(path).fingerprint() == fp
    (tmp_path / "data.csv").write_text("text,label\nx,0\n", encoding="utf-8")
    fp2 = load_card(path).fingerprint()
    assert fp2 != fp
    path.write_text(path.read_text() + "validation_split: {fraction: 0.2}\n", encoding="utf-8")
    assert load_card(path).fingerprint() not in (fp, fp2)
