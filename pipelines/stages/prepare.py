"""prepare stage: clean, deduplicate and decontaminate a data card's rows; write a prepared data set and a
data card for it, which later stages take as their `data:` exactly like a card (`data: <this stage>`).

data -> filters (empty, non-printable, length, language, regex rules) -> exact + near duplicates within
each split -> overlap between splits (always measured; train rows that repeat validation / test rows
removed unless `decontaminate.action: report`) -> prepared split files + card -> a record of every row
removed (removed/<split>.jsonl) and a readable sample per reason (removed/samples.md). Optionally, augmented
copies of the kept train rows (`augment:`, EDA-style word swaps / deletions; train only).

Only the splits in `splits` (default: train) lose rows; the others are measured the same way and their
would-be removals are counted, so a benchmark's validation / test sets stay the published ones unless the
user says otherwise. Empty rows are dropped from every split (no stage can use them). A row is removed for
the first reason that applies, in the order above. Rows are compared in normalised form (`normalize`:
Unicode NFKC, lower case, punctuation and digits dropped, spaces collapsed, by default).

What a row's text is: `text`, or `source` (a translation / summarisation pair is matched across splits on
its input; within a split on source + target), or a CoNLL sentence's tokens joined by spaces; an image is
matched on its file's bytes (exact duplicates only).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines import cleaning
from pipelines.checkpoints import atomic_write_text
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult

SPLIT_ORDER = ("train", "validation", "test")
TextRole = Literal["text", "source", "target", "tokens"]
REASONS = ("empty", "non_printable", "length", "language", "rule", "exact_duplicate", "near_duplicate",
           "contaminated_exact", "contaminated_near", "contaminated_ngram")


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NearDuplicates(_Part):
    threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity of shingle sets at or over "
                             "which two rows are near duplicates.")
    shingle: Literal["chars", "words"] = Field("chars", description="chars: character n-grams (short rows: "
                                               "sentences, names); words: word n-grams (documents).")
    ngram: int = Field(5, ge=1, le=64)
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: a finer estimate, slower).")


class Dedup(_Part):
    exact: bool = Field(True, description="Drop rows whose normalised text repeats an earlier row of the split.")
    near: NearDuplicates | None = Field(default_factory=NearDuplicates, description="MinHash LSH near duplicates "
                                        "(datasketch); null turns it off.")


class Decontaminate(_Part):
    action: Literal["remove", "report"] = Field("remove", description="remove: train rows that repeat a row of an "
                                                "`against` split are dropped; report: only counted.")
    against: list[Literal["validation", "test"]] = Field(default_factory=lambda: ["validation", "test"])
    near: bool = Field(True, description="Also near duplicates (the `dedup.near` settings, or their defaults).")
    ngram: int | None = Field(13, ge=4, le=200, description="Long documents: a train row sharing any word n-gram of "
                              "this length with an `against` row is contaminated (GPT-3's 13-gram test); null: off.")


class Length(_Part):
    column: TextRole | None = Field(None, description="The text role measured; default: the row's input text.")
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=1)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _bounds(self):
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{lo} ({a}) is over {hi} ({b})")
        if all(getattr(self, k) is None for k in ("min_chars", "max_chars", "min_words", "max_words")):
            raise ValueError("give at least one of min_chars, max_chars, min_words, max_words")
        return self


class Language(_Part):
    keep: list[str] | None = Field(None, description="ISO 639-1 codes of the languages kept (e.g. [en]); default: "
                                   "the data card's `language`.")
    column: TextRole | None = Field(None, description="The text role detected; default: the row's input text.")
    min_words: int = Field(10, ge=1, description="Rows with fewer words are kept undetected: on the all-English "
                           "SST-2 sample, 3 / 6 / 10 words flag 3.1% / 0.6% / 0.05% of train rows, all wrongly "
                           "('a pale imitation' -> Latin).")


class Rule(_Part):
    name: str | None = Field(None, description="Shown as the reason (rule:<name>); default rule[i].")
    column: TextRole | None = Field(None, description="The text role matched; default: the row's input text.")
    drop: str | None = Field(None, description="Regex (Python re, searched): a matching row is dropped.")
    keep: str | None = Field(None, description="Regex: a row that does NOT match is dropped.")
    ignore_case: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.drop is None) == (self.keep is None):
            raise ValueError("give exactly one of drop (regex) or keep (regex)")
        pattern = self.drop if self.drop is not None else self.keep
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{'drop' if self.drop is not None else 'keep'}: not a valid regex ({e}): {pattern!r}") from None
        return self

    def regex(self) -> re.Pattern:
        return re.compile(self.drop if self.drop is not None else self.keep, re.IGNORECASE if self.ignore_case else 0)


class TextAugment(_Part):
    """EDA-style word-level augmentation of train rows (random swap / deletion / crop of whitespace tokens): each
    kept train row gets up to `copies` more rows, each one random op away. Train only: validation / test never
    change."""

    ops: list[Literal["swap", "delete", "crop"]] = Field(default_factory=lambda: ["swap", "delete"], min_length=1)
    copies: int = Field(1, ge=1, le=16, description="Augmented rows added per train row.")
    aug_p: float = Field(0.1, gt=0, lt=1, description="Share of a row's words an op touches.")


class PrepareConfig(StageConfig):
    splits: list[Literal["train", "validation", "test"]] = Field(
        default_factory=lambda: ["train"], description="Splits that lose the rows found; the others are only "
        "measured (their would-be removals counted). Empty rows are dropped everywhere.")
    normalize: list[Literal["nfkc", "lowercase", "punctuation", "digits", "whitespace"]] = Field(
        default_factory=lambda: list(cleaning.NORMALIZE_STEPS), description="How rows are normalised before "
        "they are compared (duplicates, overlap).")
    drop_empty: bool = Field(True, description="Rows whose text is empty or whitespace only (always dropped from "
                             "the prepared data; false makes them an error, as a card is).")
    max_non_printable: float | None = Field(0.1, ge=0, le=1, description="Drop rows with a larger share of control "
                                            "/ unassigned characters or U+FFFD; null: off.")
    length: Length | None = None
    language: Language | None = None
    rules: list[Rule] = Field(default_factory=list)
    dedup: Dedup = Field(default_factory=Dedup)
    decontaminate: Decontaminate = Field(default_factory=Decontaminate)
    augment: TextAugment | None = Field(None, description="Add augmented copies of train rows (text rows only; "
                                        "images: finetune's `augment`).")
    removed_samples: int = Field(10, ge=0, le=1000, description="Rows per split and reason shown in removed/samples.md "
                                 "(removed/<split>.jsonl always lists every removed row).")

    @field_validator("splits")
    @classmethod
    def _distinct(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"a split is named twice: {v}")
        return v


# ---------------------------------------------------------------- rows as text


class Rows:
    """One split seen as text for matching: the input text of each row (what a model is given), the whole
    row's text (all text roles), labels as comparable values, image digests."""

    def __init__(self, split: str, ds, norm):
        self.split, self.ds, self.n = split, ds, len(ds)
        cols = ds.column_names
        self.is_image = "image" in cols
        self.text_roles = [r for r in ("text", "source", "target") if r in cols] or (["tokens"] if "tokens" in cols else [])
        self.input_role = self.text_roles[0] if self.text_roles else None
        self.raw = {r: self._column(r) for r in self.text_roles}
        self._minhashes: dict[tuple, dict] = {}
        label_col = next((c for c in ("label", "labels", "tags") if c in cols), None)
        self.labels = [json.dumps(v) for v in ds[label_col]] if label_col else [None] * self.n
        if self.is_image:
            from datasets import Image

            paths = [d["path"] for d in ds.cast_column("image", Image(decode=False))["image"]]
            self.image_paths = paths
            self.input_keys = [cleaning.digest(Path(p).read_bytes()) for p in paths]
            self.row_keys = self.input_keys
            self.input_norm = [""] * self.n
        else:
            self.input_norm = [norm(t) for t in self.raw[self.input_role]]
            whole = (self.input_norm if len(self.text_roles) == 1 else
                     ["\x1f".join(norm(self.raw[r][i]) for r in self.text_roles) for i in range(self.n)])
            self.row_norm = whole
            self.input_keys = [cleaning.digest(t) for t in self.input_norm]
            self.row_keys = self.input_keys if len(self.text_roles) == 1 else [cleaning.digest(t) for t in whole]

    def minhashes(self, whole_row: bool, near: NearDuplicates, indices: list[int]) -> dict:
        """MinHash of rows `indices` (the whole row's normalised text, or the input's), each computed once per
        row and setting however many indexes and matches ask for it."""
        texts = self.row_norm if whole_row else self.input_norm
        key = (texts is self.input_norm, near.shingle, near.ngram, near.num_perm)
        cache = self._minhashes.setdefault(key, {})
        todo = [i for i in indices if i not in cache]
        if todo:
            from datasketch import MinHash

            sets = [cleaning.shingles(texts[i], near.shingle, near.ngram) for i in todo]
            cache.update(zip(todo, MinHash.bulk(sets, num_perm=near.num_perm, seed=1)))
        return cache

    def _column(self, role: str) -> list[str]:
        values = self.ds[role]
        return [" ".join(v) for v in values] if role == "tokens" else values

    def text(self, role: str | None) -> list[str]:
        return self.raw[role or self.input_role]

    def show(self, i: int) -> dict:
        """Row i as the user wrote it (after the card's loading), for the record of removed rows."""
        row = {r: self.raw[r][i] for r in self.text_roles}
        if self.is_image:
            row["image"] = self.image_paths[i]
        if self.labels[i] is not None:
            row["label"] = json.loads(self.labels[i])
        return row


# ---------------------------------------------------------------- the steps


def load_rows(ctx: RunContext, cfg: PrepareConfig) -> tuple[dict, dict]:
    dsd = ctx.data.load(seed=ctx.seed, keep_blank=cfg.drop_empty)
    norm = cleaning.normalizer(cfg.normalize)
    views = {s: Rows(s, dsd[s], norm) for s in SPLIT_ORDER if s in dsd}
    for s, rows in views.items():
        ctx.log(f"{s}: {rows.n:,} rows")
    return dsd, views


def filter_junk(cfg: PrepareConfig, rows: Rows, card_language, found: dict[int, tuple]) -> None:
    """empty, non-printable, length, language, rules: the first that applies is the row's reason."""
    if rows.is_image:
        return
    texts = {r: rows.raw[r] for r in rows.text_roles}
    for i in range(rows.n):
        if any(not texts[r][i].strip() for r in rows.text_roles):
            found[i] = ("empty", "no text")
    if cfg.max_non_printable is not None:
        for i in range(rows.n):
            if i in found:
                continue
            share = max(cleaning.non_printable_share(texts[r][i]) for r in rows.text_roles)
            if share > cfg.max_non_printable:
                found[i] = ("non_printable", f"{share:.0%} non-printable characters")
    if cfg.length is not None:
        L = cfg.length
        for i, t in enumerate(rows.text(L.column)):
            if i in found:
                continue
            chars, words = len(t), len(t.split())
            bad = [f"{chars} chars < {L.min_chars}" if L.min_chars is not None and chars < L.min_chars else None,
                   f"{chars} chars > {L.max_chars}" if L.max_chars is not None and chars > L.max_chars else None,
                   f"{words} words < {L.min_words}" if L.min_words is not None and words < L.min_words else None,
                   f"{words} words > {L.max_words}" if L.max_words is not None and words > L.max_words else None]
            bad = [b for b in bad if b]
            if bad:
                found[i] = ("length", "; ".join(bad))
    if cfg.language is not None:
        _filter_language(cfg.language, rows, card_language, found)
    for k, rule in enumerate(cfg.rules):
        rx, label = rule.regex(), f"rule:{rule.name or f'rule[{k}]'}"
        for i, t in enumerate(rows.text(rule.column)):
            if i in found:
                continue
            hit = rx.search(t) is not None
            if hit == (rule.drop is not None):
                found[i] = ("rule", f"{label}: {'matches' if hit else 'does not match'} {rx.pattern!r}")


def expected_languages(lang: Language, card_language) -> list[str]:
    keep = lang.keep or ([card_language] if isinstance(card_language, str) else list(card_language or []))
    return [k.lower().split("-")[0].split("_")[0] for k in keep]


def _filter_language(lang: Language, rows: Rows, card_language, found: dict) -> None:
    """lingua (its language models ship in the wheel: nothing is downloaded), high-accuracy mode."""
    from lingua import LanguageDetectorBuilder

    keep = set(expected_languages(lang, card_language))
    texts = rows.text(lang.column)
    todo = [i for i, t in enumerate(texts) if i not in found and len(t.split()) >= lang.min_words]
    detector = LanguageDetectorBuilder.from_all_languages().build()
    for i, detected in zip(todo, detector.detect_languages_in_parallel_of([texts[i] for i in todo])):
        code = detected.iso_code_639_1.name.lower() if detected is not None else None
        if code not in keep:
            found[i] = ("language", f"detected {code or 'no language'}, expected {sorted(keep)}")


def _near_settings(cfg: PrepareConfig) -> NearDuplicates:
    return cfg.dedup.near or NearDuplicates()


def dedup_within(cfg: PrepareConfig, rows: Rows, found: dict[int, tuple]) -> dict:
    """Exact (normalised whole-row hash) then near (MinHash LSH) duplicates of an earlier kept row of the
    split. Returns how many duplicates carry another label than the row they repeat."""
    conflicts = {"exact_duplicate": 0, "near_duplicate": 0}
    if cfg.dedup.exact:
        first: dict[str, int] = {}
        for i, key in enumerate(rows.row_keys):
            if i in found:
                continue
            if key in first:
                j = first[key]
                found[i] = ("exact_duplicate", f"repeats {rows.split} #{j}", j)
                conflicts["exact_duplicate"] += rows.labels[i] != rows.labels[j]
            else:
                first[key] = i
    near = cfg.dedup.near
    if near is not None and not rows.is_image:
        todo = [i for i in range(rows.n) if i not in found and rows.row_norm[i]]
        hashes = rows.minhashes(True, near, todo)
        index = cleaning.NearIndex(near.threshold, near.num_perm)
        for i in todo:
            hit = index.best(hashes[i])
            if hit is None:
                index.add(i, hashes[i])
            else:
                j, sim = hit
                found[i] = ("near_duplicate", f"~{sim:.2f} similar to {rows.split} #{j}", j)
                conflicts["near_duplicate"] += rows.labels[i] != rows.labels[j]
    return conflicts


class Reference:
    """The kept rows of one split, indexed to find another split's rows in it: exact input hashes, MinHash
    LSH and (long documents) word n-grams."""

    def __init__(self, cfg: PrepareConfig, rows: Rows, kept: list[int]):
        self.rows = rows
        self.exact = {}
        for i in kept:
            self.exact.setdefault(rows.input_keys[i], i)
        self.near = None
        self.ngrams: dict[str, int] = {}
        if rows.is_image:
            return
        if cfg.decontaminate.near:
            settings = _near_settings(cfg)
            todo = [i for i in kept if rows.input_norm[i]]
            hashes = rows.minhashes(False, settings, todo)
            self.near = cleaning.NearIndex(settings.threshold, settings.num_perm)
            self.settings = settings
            for i in todo:
                self.near.add(i, hashes[i])
        n = cfg.decontaminate.ngram
        if n:
            for i in kept:
                for g in cleaning.word_ngrams(rows.input_norm[i], n):
                    self.ngrams.setdefault(g, i)

    def match(self, cfg: PrepareConfig, other: Rows, indices: list[int]) -> dict[int, tuple]:
        """Rows of `other` found here: index -> (kind, detail, row here)."""
        out: dict[int, tuple] = {}
        where = self.rows.split
        for i in indices:
            j = self.exact.get(other.input_keys[i])
            if j is not None:
                out[i] = ("exact", f"repeats {where} #{j}", j)
        if self.near is not None:
            rest = [i for i in indices if i not in out and other.input_norm[i]]
            hashes = other.minhashes(False, self.settings, rest)
            for i in rest:
                hit = self.near.best(hashes[i])
                if hit is not None:
                    out[i] = ("near", f"~{hit[1]:.2f} similar to {where} #{hit[0]}", hit[0])
        n = cfg.decontaminate.ngram
        if n and self.ngrams:
            for i in indices:
                if i in out:
                    continue
                for g in cleaning.word_ngrams(other.input_norm[i], n):
                    if g in self.ngrams:
                        out[i] = ("ngram", f"shares the {n}-gram {g!r} with {where} #{self.ngrams[g]}", self.ngrams[g])
                        break
        return out


def measure_overlap(cfg: PrepareConfig, views: dict[str, Rows], found: dict[str, dict]) -> dict:
    """For each later split B and earlier split A: how many of the rows B keeps repeat a row A keeps (exact,
    near, n-gram) and how many of those carry the same label. Then train rows that repeat a row of an
    `against` split are marked (contaminated_*). Returns the overlap table."""
    gone = removals(cfg, found)
    kept = {s: [i for i in range(r.n) if i not in gone[s]] for s, r in views.items()}
    refs = {s: Reference(cfg, views[s], kept[s]) for s in views}
    overlap = {}
    names = list(views)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            hits = refs[a].match(cfg, views[b], kept[b])
            kinds = Counter(h[0] for h in hits.values())
            same = sum(views[b].labels[i] == views[a].labels[h[2]] for i, h in hits.items())
            overlap[f"{b}_in_{a}"] = {
                "rows": len(kept[b]), "found": len(hits), "share": round(len(hits) / max(len(kept[b]), 1), 4),
                "exact": kinds.get("exact", 0), "near": kinds.get("near", 0), "ngram": kinds.get("ngram", 0),
                "same_label": same if views[b].labels[0] is not None else None,
            }
    if "train" in views:
        train = views["train"]
        for against in cfg.decontaminate.against:
            if against not in views:
                continue
            todo = [i for i in kept["train"] if i not in found["train"]]
            for i, (kind, detail, j) in refs[against].match(cfg, train, todo).items():
                found["train"][i] = (f"contaminated_{kind}", detail, j, against)
    return overlap


def removals(cfg: PrepareConfig, found: dict[str, dict]) -> dict[str, set[int]]:
    """Which found rows actually leave each split (the others are only counted)."""
    out = {}
    for split, rows in found.items():
        gone = set()
        for i, f in rows.items():
            reason = f[0]
            if reason == "empty":
                gone.add(i)
            elif reason.startswith("contaminated_"):
                if cfg.decontaminate.action == "remove" and split in cfg.splits:
                    gone.add(i)
            elif split in cfg.splits:
                gone.add(i)
        out[split] = gone
    return out


def augment_rows(aug: TextAugment, ds, keep: list[int], seed: int) -> tuple[list[int], list[str]]:
    """(source row of each augmented row, its text): up to `copies` distinct variants per kept row, each one
    seeded op away (EDA's random swap and deletion, plus crop: a contiguous span dropped). Written here on
    whitespace tokens: nlpaug's RandomWordAug re-capitalises a swapped first word ('Quiet a about film') and
    re-joins punctuation, so tokenised text such as SST-2's would change style, not only words."""
    import random

    rng = random.Random(seed)
    texts = ds["text"]
    src, out = [], []
    for i in keep:
        words = texts[i].split()
        seen = {texts[i]}
        for _ in range(aug.copies):
            new = " ".join(word_op(rng.choice(aug.ops), words, aug.aug_p, rng))
            if new and new not in seen:
                seen.add(new)
                src.append(i)
                out.append(new)
    return src, out


def word_op(op: str, words: list[str], p: float, rng) -> list[str]:
    n = len(words)
    if n < 2:
        return words
    k = max(1, round(p * n))
    if op == "swap":
        w = list(words)
        for _ in range(k):
            a, b = rng.sample(range(n), 2)
            w[a], w[b] = w[b], w[a]
        return w
    if op == "delete":
        kept = [x for x in words if rng.random() >= p]
        return kept or [rng.choice(words)]
    start = rng.randrange(0, n - k + 1) if k < n else 0  # crop
    return words[:start] + words[start + min(k, n - 1):]


# ---------------------------------------------------------------- writing


def write_prepared(dsd, gone: dict[str, set[int]], card, out: Path, stage: str, added=None) -> Path:
    """Each split without its removed rows (train plus `added` = (source rows, texts) of augmented rows), in
    a format the card loader reads back (CoNLL for token classification, Parquet otherwise: labels by name,
    images by absolute path), and its data card."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    names = list(card.label_names or [])
    files, columns, fmt = {}, {}, "parquet"
    for split, ds in dsd.items():
        keep = [i for i in range(len(ds)) if i not in gone.get(split, set())]
        if not keep:
            raise PipelinesError(f"prepare removed every row of split '{split}' ({len(ds):,}); loosen the filters "
                                 f"(removed/{split}.jsonl lists the rows and reasons)")
        part = ds.select(keep)
        if split == "train" and added and added[0]:
            from datasets import concatenate_datasets

            extra = ds.select(added[0]).remove_columns("text").add_column("text", added[1])
            part = concatenate_datasets([part, extra.select_columns(part.column_names)])
        if "tokens" in part.column_names:
            fmt = "conll"
            lines = []
            for toks, tags in zip(part["tokens"], part["tags"]):
                lines += [f"{t}\t{names[g]}" for t, g in zip(toks, tags)] + [""]
            atomic_write_text(out / f"{split}.conll", "\n".join(lines) + "\n")
            files[split] = f"{split}.conll"
            continue
        table = {}
        for col in part.column_names:
            if col == "image":
                from datasets import Image

                table[col] = [d["path"] for d in part.cast_column("image", Image(decode=False))["image"]]
            elif col == "label":
                table[col] = [names[v] for v in part[col]]
            elif col == "labels":
                table[col] = pa.array([[names[v] for v in row] for row in part[col]], pa.list_(pa.string()))
            else:
                table[col] = part[col]
            columns[col] = col
        tmp = out / f".{split}.parquet.tmp"
        pq.write_table(pa.table(table), tmp)
        tmp.replace(out / f"{split}.parquet")
        files[split] = f"{split}.parquet"
    doc = {
        "name": card.name,
        "description": f"{card.name} as prepared by stage '{stage}' (cleaned, deduplicated, decontaminated); "
                       f"original card: {card.path}",
        "source": card.source,
        "license": card.license,
        "language": card.language,
        "task": card.task,
        "format": fmt,
        "files": files,
        "columns": columns or None,
        "label_names": names or None,
    }
    doc = {k: v for k, v in doc.items() if v is not None}
    path = out / "card.yaml"
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def write_record(views: dict[str, Rows], found: dict[str, dict], gone: dict[str, set[int]], out: Path,
                 samples: int) -> None:
    """removed/<split>.jsonl: every row found, with its reason and whether it left the split; samples.md: a few
    per split and reason, next to the row they repeat, for a person to read."""
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Rows found by the prepare stage", "",
          "Every row found is in `<split>.jsonl`; #N is its 0-based index in the split as loaded (a CSV's data row "
          "N+1). `removed: false` = counted only: the split is not in `splits`, or decontamination only reports.", ""]
    for split, rows in views.items():
        lines, by_reason = [], {}
        for i in sorted(found[split]):
            f = found[split][i]
            entry = {"index": i, "reason": f[0], "detail": f[1], "removed": i in gone[split], **rows.show(i)}
            if len(f) > 2:
                other = views[f[3]] if len(f) > 3 else rows
                entry["matches"] = {"split": other.split, "index": f[2], **other.show(f[2])}
            lines.append(json.dumps(entry, ensure_ascii=False))
            by_reason.setdefault(f[0], []).append(entry)
        atomic_write_text(out / f"{split}.jsonl", "".join(line + "\n" for line in lines))
        for reason, entries in by_reason.items():
            md.append(f"## {split}: {reason} ({len(entries):,} rows)")
            md.append("")
            for e in entries[:samples]:
                shown = {k: v for k, v in e.items() if k not in ("reason", "matches")}
                md.append(f"- #{e['index']}: {json.dumps({k: v for k, v in shown.items() if k != 'index'}, ensure_ascii=False)[:300]}")
                if "matches" in e:
                    m = e["matches"]
                    md.append(f"  - matches {m['split']} #{m['index']}: "
                              f"{json.dumps({k: v for k, v in m.items() if k not in ('split', 'index')}, ensure_ascii=False)[:300]}")
            md.append("")
    atomic_write_text(out / "samples.md", "\n".join(md) + "\n")


def summarize(views, found, gone, conflicts, overlap) -> tuple[dict, dict]:
    """(metrics for status, info tables for the report)."""
    metrics, table = {}, {}
    for split, rows in views.items():
        reasons = Counter(f[0] for f in found[split].values())
        removed = Counter(found[split][i][0] for i in gone[split])
        table[split] = {"rows_in": rows.n, "rows_out": rows.n - len(gone[split]),
                        "found": dict(reasons), "removed": dict(removed),
                        "duplicates_with_other_label": conflicts.get(split, {})}
        metrics[f"{split}_rows"] = rows.n - len(gone[split])
        metrics[f"{split}_removed"] = len(gone[split])
    for key, o in overlap.items():
        metrics[f"{key}_share"] = o["share"]
    return metrics, table


def lengths(views: dict[str, Rows], gone: dict[str, set[int]]) -> dict:
    """Histograms of input length in words, before and after, per split."""
    out = {}
    for split, rows in views.items():
        if rows.is_image:
            continue
        words = [len(t.split()) for t in rows.text(None)]
        before = cleaning.histogram(words)
        out[split] = {"before": before,
                      "after": cleaning.histogram([w for i, w in enumerate(words) if i not in gone[split]], before["edges"])}
    return out


def run(cfg: PrepareConfig, ctx: RunContext) -> StageResult:
    dsd, views = load_rows(ctx, cfg)
    found: dict[str, dict] = {s: {} for s in views}
    conflicts = {}
    for split, rows in views.items():
        filter_junk(cfg, rows, ctx.data.language, found[split])
        conflicts[split] = dedup_within(cfg, rows, found[split])
    overlap = measure_overlap(cfg, views, found)
    gone = removals(cfg, found)
    added = None
    if cfg.augment is not None and "train" in dsd:
        keep = [i for i in range(len(dsd["train"])) if i not in gone["train"]]
        added = augment_rows(cfg.augment, dsd["train"], keep, ctx.seed)
        ctx.log(f"train: {len(added[0]):,} augmented rows added ({cfg.augment.copies} per row, ops {cfg.augment.ops})")
    card_path = write_prepared(dsd, gone, ctx.data, ctx.output_dir / "data", ctx.stage_name, added)
    write_record(views, found, gone, ctx.output_dir / "removed", cfg.removed_samples)
    metrics, table = summarize(views, found, gone, conflicts, overlap)
    if added is not None:
        table["train"]["augmented"] = len(added[0])
        metrics["train_rows"] += len(added[0])
        metrics["train_augmented"] = len(added[0])
    for split, t in table.items():
        ctx.log(f"{split}: {t['rows_in']:,} -> {t['rows_out']:,} rows; found {t['found'] or 'nothing'}")
    for key, o in overlap.items():
        ctx.log(f"overlap {key}: {o['found']:,} of {o['rows']:,} rows ({o['share']:.1%}; exact {o['exact']}, "
                f"near {o['near']}, n-gram {o['ngram']})")
    return StageResult(
        metrics=metrics,
        outputs={"card": str(card_path.relative_to(ctx.output_dir)), "data": "data", "removed": "removed"},
        info={"splits": table, "overlap": overlap, "lengths": lengths(views, gone),
              "changed_splits": cfg.splits, "split_notes": ctx.data.split_notes},
    )


def plan(cfg: PrepareConfig, inputs: dict, recipe_dir: Path, card):
    """What a filter reads must exist in the card; a language filter needs languages to keep."""
    problems = []
    if card is None:
        return None, problems
    roles = set(card.roles)
    chat_roles = roles & {"messages", "prompt", "completion", "chosen", "rejected"}
    if chat_roles:
        return None, [f"prepare does not clean chat or preference rows yet (the data card {card.path.name} maps "
                      f"{sorted(chat_roles)}); give it text, source / target, CoNLL or image cards"]
    text_roles = roles & {"text", "source", "target", "tokens"}
    wanted = [("length.column", cfg.length.column if cfg.length else None),
              ("language.column", cfg.language.column if cfg.language else None)]
    wanted += [(f"rules[{k}].column", r.column) for k, r in enumerate(cfg.rules)]
    for key, role in wanted:
        if role is not None and role not in roles:
            problems.append(f"{key}: the data card {card.path.name} has no {role!r} role (it has {sorted(roles)})")
    if not text_roles and (cfg.length or cfg.language or cfg.rules):
        problems.append(f"length / language / rules filter text; the data card {card.path.name} has none "
                        f"(roles {sorted(roles)}): images are only deduplicated")
    if cfg.augment is not None and "text" not in roles:
        problems.append(f"augment: word-level augmentation is for rows with a `text` role; the data card "
                        f"{card.path.name} has {sorted(roles)} (images: finetune's `augment`)")
    if cfg.language is not None:
        import importlib.util

        if importlib.util.find_spec("lingua") is None:
            return None, problems + ["language: needs the lingua language detector: pip install 'pipelines[langid]' "
                                     "(or pip install lingua-language-detector)"]
        if not expected_languages(cfg.language, card.language):
            problems.append(f"language.keep: give the languages to keep (ISO 639-1, e.g. [en]); the data card "
                            f"{card.path.name} has no `language`")
        else:
            from lingua import Language as Lang

            known = {lang.iso_code_639_1.name.lower() for lang in Lang.all()}
            bad = [c for c in expected_languages(cfg.language, card.language) if c not in known]
            if bad:
                problems.append(f"language.keep: {bad} not ISO 639-1 codes the detector knows")
    return None, problems


STAGE = StageDef(
    name="prepare",
    Config=PrepareConfig,
    run=run,
    version="1",
    data="required",
    provides_data=True,
    description="Clean, deduplicate and decontaminate a data card's rows; later stages take it as their data.",
    plan=plan,
)
