"""CoNLL data cards (token classification): the shipped WNUT-17 sample and full card load with the
expected sentences, tokens and tag ids; separators, odd characters and column layouts are read right; bad
files and bad cards give one DataError naming the file, the line and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.data import load_card
from pipelines.errors import DataError

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "data_cards"
SHARED = REPO.parent / "shared" / "datasets"
WNUT_TAGS = ["O", "B-corporation", "I-corporation", "B-creative-work", "I-creative-work", "B-group", "I-group",
             "B-location", "I-location", "B-person", "I-person", "B-product", "I-product"]
TAGS = "[O, B-per, I-per, B-loc]"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


def conll_card(folder: Path, files: dict[str, str], extra: str = "", labels: str = TAGS) -> Path:
    """Write each file's text (bytes as given) and a conll card naming them."""
    lines = []
    for split, text in files.items():
        (folder / f"{split}.conll").write_bytes(text.encode("utf-8"))
        lines.append(f"  {split}: {split}.conll")
    card = folder / "card.yaml"
    card.write_text("source: test\nlicense: CC0\nformat: conll\nfiles:\n" + "\n".join(lines)
                    + f"\nlabel_names: {labels}\n{extra}", encoding="utf-8")
    return card


def load_error(card: Path, cache: Path) -> str:
    with pytest.raises(DataError) as ei:
        load_card(card).load(cache_dir=cache)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---------------------------------------------------------------- shipped cards


def test_wnut17_sample(cache):
    card = load_card(CARDS / "wnut17_sample.yaml")
    assert card.task == "token-classification" and card.format == "conll" and "CC BY 4.0" in card.license
    assert card.roles == ["tokens", "tags"] and card.label_names == WNUT_TAGS
    dd = card.load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 250, "validation": 80, "test": 80}
    assert {k: sum(map(len, v["tokens"])) for k, v in dd.items()} == {"train": 4716, "validation": 1346, "test": 1228}
    for ds in dd.values():
        assert ds.column_names == ["tokens", "tags"]
        assert ds.features["tags"].feature.names == WNUT_TAGS
        assert all(len(t) == len(g) > 0 for t, g in zip(ds["tokens"], ds["tags"]))
    # train separates sentences with lines holding just a TAB: each must end a sentence
    raw = (REPO / "data/wnut17_sample/train.conll").read_text(encoding="utf-8").split("\n")
    assert raw.count("\t") == 250 and "" not in raw[:-1]
    first = dd["train"][0]
    assert first["tokens"][:3] == ["@paulwalk", "It", "'s"] and len(first["tokens"]) == 27
    named = [(w, WNUT_TAGS[t]) for w, t in zip(first["tokens"], first["tags"]) if t]
    assert named == [("Empire", "B-location"), ("State", "I-location"), ("Building", "I-location"), ("ESB", "B-location")]
    size = sum(p.stat().st_size for p in card.data_files())
    assert size < 60_000


@pytest.mark.skipif(not (SHARED / "wnut17").exists(), reason="needs the shared WNUT-17 files")
def test_full_wnut17(cache):
    """Sentence / token / entity counts as the data set's README states them; dev's zero-width space and
    U+FEFF stay inside their tokens."""
    dd = load_card(CARDS / "wnut17.yaml").load(cache_dir=cache)
    assert {k: len(v) for k, v in dd.items()} == {"train": 3394, "validation": 1009, "test": 1287}
    assert {k: sum(map(len, v["tokens"])) for k, v in dd.items()} == {"train": 62730, "validation": 15733, "test": 23394}
    b_tags = [i for i, n in enumerate(WNUT_TAGS) if n.startswith("B-")]
    assert {k: sum(t in b_tags for row in v["tags"] for t in row) for k, v in dd.items()} == \
        {"train": 1975, "validation": 836, "test": 1079}
    dev_tokens = {t for row in dd["validation"]["tokens"] for t in row}
    assert "watched\u200bwas" in dev_tokens and "Dubbz\ufeff" in dev_tokens


def test_data_check_cli_prints_rows_per_split():
    r = subprocess.run([sys.executable, "-m", "pipelines", "data", "check", str(CARDS / "wnut17_sample.yaml")],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "train            250 rows" in r.stdout and "validation        80 rows" in r.stdout
    assert "tokens: train=4,716" in r.stdout and "B-person=58" in r.stdout


# ---------------------------------------------------------------- reading


def test_separators_columns_and_odd_characters(tmp_path, cache):
    text = (
        "-DOCSTART-\tO\n\n"
        "John\tB-per\r\nSmith\tI-per\r\n\t\r\n"       # CRLF; a TAB-only separator
        "in   O\nParis loc-ignored B-loc\n   \n"     # spaces between fields; 3 fields: first = token, last = tag
        "a\u2028b\tO\nzero\u200bwidth\tO\n\ufeffx\tO\n\n\n"  # U+2028 is not a line break; ZWSP, FEFF kept
        "last\tO"                                     # no final newline
    )
    dd = load_card(conll_card(tmp_path, {"train": text, "test": "x\tO\n"})).load(seed=1, cache_dir=cache)
    rows = list(dd["train"]) + list(dd["validation"])
    by_first = {r["tokens"][0]: r for r in rows}
    assert sorted(map(len, (r["tokens"] for r in rows))) == [1, 2, 2, 3]
    assert by_first["John"] == {"tokens": ["John", "Smith"], "tags": [1, 2]}
    assert by_first["in"] == {"tokens": ["in", "Paris"], "tags": [0, 3]}
    assert by_first["a\u2028b"]["tokens"] == ["a\u2028b", "zero\u200bwidth", "\ufeffx"]
    assert by_first["last"]["tokens"] == ["last"]


@pytest.mark.parametrize(
    "text, expect",
    [
        ("John\tB-per\nSmith\n\n", r"train\.conll: line 2: no tag after the token 'Smith'"),
        ("John\tB-per\n\nin\tO\nParis\tB-city\n", r"train\.conll: line 4: tag 'B-city' \(token 'Paris'\) is not one of label_names"),
        ("John\tb-per\n", r"line 1: tag 'b-per'"),
        ("\n\t\n  \n", r"train\.conll: split 'train' is empty: no sentences"),
    ],
    ids=["no-tag", "unknown-tag", "case", "blank-only"],
)
def test_bad_conll_names_file_and_line(tmp_path, cache, text, expect):
    msg = load_error(conll_card(tmp_path, {"train": text}), cache)
    assert str(tmp_path / "train.conll") in msg or "split 'train' is empty" in msg
    assert __import__("re").search(expect, msg), msg
    assert "(data card card.yaml, split 'train')" in msg


def test_empty_conll_file_is_a_card_error(tmp_path):
    (tmp_path / "train.conll").write_bytes(b"")
    card = conll_card(tmp_path, {})
    card.write_text(card.read_text().replace("files:\n", "files:\n  train: train.conll"))
    with pytest.raises(DataError, match=r"files.train: empty file \(0 bytes\)"):
        load_card(card)


def test_non_utf8_conll_names_the_line(tmp_path, cache):
    (tmp_path / "train.conll").write_bytes(b"ok\tO\n\ncaf\xe9\tO\n")
    card = tmp_path / "card.yaml"
    card.write_text(f"source: s\nlicense: l\nformat: conll\nfiles: {{train: train.conll}}\nlabel_names: {TAGS}\n")
    assert "not valid UTF-8 at byte offset 9 (line 3" in load_error(card, cache)


@pytest.mark.parametrize(
    "extra, labels, expect",
    [
        ("", "[O, PER, LOC]", "label_names: ['PER', 'LOC'] are not BIO tags"),
        ("columns: {text: a}\n", TAGS, "columns: not used with format conll"),
        ("task: classification\n", TAGS, "task: classification needs the roles label and text; the card maps ['tags', 'tokens']"),
    ],
    ids=["not-bio", "columns", "task"],
)
def test_bad_conll_cards(tmp_path, extra, labels, expect):
    card = conll_card(tmp_path, {"train": "a\tO\n"}, extra=extra, labels=labels)
    with pytest.raises(DataError, match="data card") as ei:
        load_card(card)
    assert expect in str(ei.value) and str(card) in str(ei.value)


def test_conll_card_needs_label_names(tmp_path):
    (tmp_path / "train.conll").write_text("a\tO\n")
    card = tmp_path / "card.yaml"
    card.write_text("source: s\nlicense: l\nformat: conll\nfiles: {train: train.conll}\n")
    with pytest.raises(DataError, match="label_names: required for format conll"):
        load_card(card)


def test_fingerprint_follows_the_file(tmp_path, cache):
    card = conll_card(tmp_path, {"train": "a\tO\n\nb\tB-per\n", "validation": "c\tO\n"})
    fp1 = load_card(card).load(cache_dir=cache)["train"]._fingerprint
    assert load_card(card).load(cache_dir=cache)["train"]._fingerprint == fp1  # stable: tokenised caches reused
    (tmp_path / "train.conll").write_text("a\tO\n\nb\tB-loc\n")
    assert load_card(card).load(cache_dir=cache)["train"]._fingerprint != fp1
