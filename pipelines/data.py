"""Data cards: a small YAML (or Markdown front-matter) file that says where a data set's files are,
what they hold, under which license, and how to read them.

    card = load_card("data_cards/sst2_sample.yaml")   # validates the card only (no rows read)
    dd = card.load(seed=42)                            # datasets.DatasetDict, rows validated
    card.split_notes["validation"]                     # how each split was made

`load_card` checks the card itself: known keys only, required fields, canonical split names
(train / validation / test), a split given once, files that exist and are not empty, a known format.
`DataCard.load` reads the rows through `datasets.load_dataset` (so its cache is used), keeps only the
role columns (`text`, `label`, `source`, `target`), checks every row (no empty text, labels within
`label_names`, valid UTF-8, aligned files of equal length) and makes a seeded validation split from
train when the card has none. CoNLL files (token classification) are parsed here, line by line, into
rows with the roles `tokens` (list of str) and `tags` (list of ids in `label_names` order); their
Dataset's fingerprint is derived from the file's hash, so tokenised caches downstream stay valid. Every problem is a `DataError` naming the file, the row or line where
it applies and what is wrong; errors from pandas / pyarrow / datasets are caught and rephrased.

Card fields (see data_cards/TEMPLATE.yaml for a commented example):
    name, description, source, license, language, task
    format: csv | tsv | json | jsonl | parquet | text | conll
    files: {split: path | [paths] | {role: path}}   # the mapping form: aligned line-per-example files
    columns: {role: column name in the file}         # csv / tsv / json / jsonl / parquet
    split_columns: {split: {role: column name}}      # per-split overrides of `columns`
    label_names: [name0, name1, ...]                 # loaded `label` = ClassLabel ids in this order
                                                     # conll: the BIO tags (O, B-x, I-x); `tags` = their ids
    text_sample_by: line | paragraph | document      # format text only
    validation_split: {fraction: 0.1, seed: null, shuffle: true}

format conll: one `token<TAB>tag` per line (or `token tag`; with more fields, as in CoNLL-2003, the first is
the token and the last the tag), a blank or whitespace-only line between sentences, `-DOCSTART-` lines
skipped. No `columns`: the roles are always `tokens` and `tags`. A line without a tag, a tag not in
`label_names` or a file without sentences is a DataError naming the file and the line.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipelines import yamlio
from pipelines.errors import DataError, PipelinesError, format_loc
from pipelines.fingerprint import hash_file, hash_obj, hash_tree

ROLES = ("text", "image", "label", "labels", "source", "target", "tokens", "tags",
         "messages", "prompt", "completion", "chosen", "rejected")
TEXT_ROLES = ("text", "source", "target", "completion")
# chat and preference rows (pipelines/chat.py): `messages` is a list of turns; a prompt / chosen / rejected cell is
# a text, or a list of turns (the same kind in every row of a split)
TURN_ROLES = ("messages", "prompt", "chosen", "rejected")
SPLITS = ("train", "validation", "test")
FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "text", "conll", "imagefolder")
# images outside these bounds are reported, not decoded: a 1x1 file is a mistake, and Pillow itself warns of a
# decompression bomb above this many pixels
MIN_IMAGE_SIDE = 4
MAX_IMAGE_PIXELS = 89_478_485
# Bump when load() changes what it produces for the same files, so fingerprints change with it.
LOADER_VERSION = "1"

_SPLIT_ALIASES = {"dev": "validation", "valid": "validation", "val": "validation", "eval": "validation"}
_INT_RE = re.compile(r"[+-]?\d+(?:\.0*)?")

# roles a card maps in `columns` (conll: tokens, tags)
Role = Literal["text", "image", "label", "labels", "source", "target", "messages", "prompt", "completion", "chosen", "rejected"]
_TAG_RE = re.compile(r"^(O|[BI]-\S+)$")


# ---------------------------------------------------------------- the card's schema


class ValidationSplit(BaseModel):
    """How to make a validation split when the card has none (only when it has a train split)."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.1, gt=0, lt=1, description="Share of train rows moved to validation.")
    seed: int | None = Field(None, description="Seed of the split; default: the seed passed to load() (the recipe's).")
    shuffle: bool = Field(
        True,
        description="true: a seeded random (stratified by label when there is one) split; "
        "false: the last `fraction` of train rows in file order (the usual held-out tail for LM text).",
    )


class CardModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, description="Default: the card's file name without extension.")
    description: str = ""
    source: str = Field(min_length=1, description="Where the data comes from (URL, paper, commit).")
    license: str = Field(min_length=1, description='Free text, e.g. "CC BY 4.0" or "unknown: research use only".')
    language: str | list[str] | None = None
    task: str | None = Field(None, description="A task of pipelines.tasks (or an alias: translation, language-modeling, ner, ...).")
    format: Literal["csv", "tsv", "json", "jsonl", "parquet", "text", "conll", "imagefolder"]
    files: dict[str, str | list[str] | dict[str, str]] = Field(min_length=1)
    columns: dict[Role, str] = Field(default_factory=dict)
    split_columns: dict[str, dict[Role, str]] = Field(default_factory=dict)
    label_names: list[str] | None = None
    label_separator: str = Field(
        ",", min_length=1, description="`labels` (several labels per row) in a CSV / TSV cell: the separator "
        "between label names, e.g. \"sports,politics\"; JSON / Parquet give a list.")
    text_sample_by: Literal["line", "paragraph", "document"] = "line"
    validation_split: ValidationSplit = Field(default_factory=ValidationSplit)

    @field_validator("label_names", mode="before")
    @classmethod
    def _labels_as_str(cls, v: Any) -> Any:
        # YAML `label_names: [1, 2, 3, 4, 5]` (star ratings) means the names "1".."5".
        if isinstance(v, list):
            return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
        return v


# ---------------------------------------------------------------- YAML reading


def _fail(card_path: Path, problems: list[str]) -> DataError:
    return DataError(f"data card {card_path}: " + "; ".join(problems))


def _read_card_text(path: Path) -> tuple[str, str]:
    """(YAML text, Markdown body) of a card file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data card {path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"data card {path}: is a folder, expected a .yaml/.yml card or a .md card with YAML front matter") from None
    except OSError as e:
        raise DataError(f"data card {path}: cannot read: {e.strerror or e}") from None
    text, problem = yamlio.decode(raw)
    if problem:
        raise DataError(f"data card {path}: {problem}")
    if path.suffix.lower() in (".md", ".markdown"):
        lines = text.split("\n")
        if not lines or lines[0].strip() != "---":
            raise DataError(
                f"data card {path}: a Markdown card must start with YAML front matter: a '---' line, "
                "the card's YAML, then another '---' line"
            )
        for i in range(1, len(lines)):
            if lines[i].strip() in ("---", "..."):
                return "\n".join(lines[1:i]), "\n".join(lines[i + 1 :]).strip()
        raise DataError(f"data card {path}: the YAML front matter has no closing '---' line")
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise DataError(f"data card {path}: expected a .yaml/.yml card or a .md card with YAML front matter")
    return text, ""


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\])$")


def _pydantic_problems(err: ValidationError) -> list[str]:
    """One line per key: union alternatives (`language` as str or list) are merged into one problem."""
    by_loc: dict[str, list[tuple[str, dict]]] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        tags = [p for p in e["loc"] if isinstance(p, str) and _UNION_TAG.match(p)]
        by_loc.setdefault(format_loc(loc), []).append((tags[0] if tags else "", e))
    problems = []
    for loc, errs in by_loc.items():
        e = errs[0][1]
        got = e.get("input")
        got_s = f" (got {got!r})" if "input" in e and not isinstance(got, (dict, list)) else ""
        if e["type"] == "missing":
            msg = "Field required"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (not a card field; check spelling)"
        elif len(errs) > 1 and all(tag for tag, _ in errs):
            msg = "expected " + " or ".join(dict.fromkeys(tag for tag, _ in errs)) + got_s
        elif loc == "files" and e["type"] == "dict_type":
            msg = "expected a mapping split -> path(s), e.g. {train: data.csv, test: test.csv}" + got_s
        else:
            msg = e["msg"].replace("Input should be", "expected") + got_s
        problems.append(f"{loc}: {msg}")
    return problems


# ---------------------------------------------------------------- the card


class _SplitSpec:
    """The files of one split: `paths` (concatenated in order) or `aligned` (role -> line-per-example file)."""

    def __init__(self, name: str, paths: list[Path] | None = None, aligned: dict[str, Path] | None = None):
        self.name = name
        self.paths = paths or []
        self.aligned = aligned or {}

    def all_paths(self) -> list[Path]:
        return list(self.paths) if self.paths else list(self.aligned.values())


class DataCard:
    """A validated data card. Construct with `load_card(path)`."""

    def __init__(self, path: Path, model: CardModel, body: str = ""):
        self.path = path
        self.model = model
        self.body = body
        self.splits: dict[str, _SplitSpec] = {}
        self.split_notes: dict[str, str] = {}
        base = path.parent
        for split in SPLITS:
            spec = model.files.get(split)
            if spec is None:
                continue
            if isinstance(spec, dict):
                self.splits[split] = _SplitSpec(split, aligned={r: (base / p).resolve() for r, p in spec.items()})
            else:
                paths = [spec] if isinstance(spec, str) else spec
                self.splits[split] = _SplitSpec(split, paths=[(base / p).resolve() for p in paths])

    # -- metadata
    @property
    def name(self) -> str:
        """`name:` of the card, else its file name (its folder's name for a README.md card)."""
        if self.model.name:
            return self.model.name
        return self.path.parent.name if self.path.stem.lower() == "readme" else self.path.stem

    @property
    def description(self) -> str:
        return self.model.description or self.body

    @property
    def source(self) -> str:
        return self.model.source

    @property
    def license(self) -> str:
        return self.model.license

    @property
    def language(self) -> str | list[str] | None:
        return self.model.language

    @property
    def task(self) -> str | None:
        return self.model.task

    @property
    def format(self) -> str:
        return self.model.format

    @property
    def label_names(self) -> list[str] | None:
        return self.model.label_names

    @property
    def roles(self) -> list[str]:
        """The columns a loaded split has, in ROLES order."""
        if self.model.format == "conll":
            return ["tokens", "tags"]
        if self.model.format == "imagefolder":
            return ["image", "label"]
        if self.model.format == "text":
            first = next(iter(self.splits.values()))
            have = set(first.aligned) if first.aligned else {"text"}
        else:
            have = set(self.model.columns)
        return [r for r in ROLES if r in have]

    def columns_for(self, split: str) -> dict[str, str]:
        """role -> column name in the files of `split` (`columns` with `split_columns` applied)."""
        cols = dict(self.model.columns)
        cols.update(self.model.split_columns.get(split, {}))
        return cols

    def data_files(self) -> list[Path]:
        """Every data file the card points at (absolute), split by split."""
        out: list[Path] = []
        for spec in self.splits.values():
            out.extend(spec.all_paths())
        return out

    def fingerprint(self) -> str:
        """Changes when the card's validated content, a data file's bytes or the loader change
        (not when the repository moves: file paths enter only as written in the card)."""
        files: dict[str, Any] = {}
        for split, spec in self.splits.items():
            if spec.aligned:
                files[split] = {role: hash_file(p) for role, p in spec.aligned.items()}
            else:
                files[split] = [hash_tree(p) if p.is_dir() else hash_file(p) for p in spec.paths]
        return hash_obj(
            {"card": self.model.model_dump(mode="json"), "files": files, "loader": LOADER_VERSION}
        )[:16]

    def __repr__(self) -> str:
        return f"DataCard({self.name!r}, {self.path}, splits={list(self.splits)})"

    # -- loading
    def load(self, seed: int = 42, cache_dir: str | Path | None = None, keep_blank: bool = False):
        """Read, validate and normalise every split. Returns a datasets.DatasetDict with only the role
        columns; `label` is a ClassLabel (ids 0..n-1 in label_names order). `cache_dir` is passed on to
        datasets.load_dataset (default: its usual cache). keep_blank: a null / empty / whitespace-only text
        cell of a CSV / JSON / Parquet file is kept as "" (for the prepare stage to drop and count) instead
        of being an error."""
        import datasets

        _check_files(self.path, self.model, self.splits)  # again: files may have changed since load_card
        self.split_notes = {}
        out: dict[str, datasets.Dataset] = {}
        for split, spec in self.splits.items():
            if spec.aligned:
                ds, note = _load_aligned(self, split, spec, cache_dir)
            else:
                parts, notes = [], []
                for p in spec.paths:
                    d, n = _load_file(self, split, p, cache_dir, keep_blank)
                    parts.append(d)
                    notes.append(n)
                if len(parts) == 1:
                    ds, note = parts[0], notes[0]
                else:
                    ds = datasets.concatenate_datasets(parts)
                    note = " + ".join(f"{n} [{_rows(len(d))}]" for n, d in zip(notes, parts))
            if len(ds) == 0:
                files = ", ".join(str(p) for p in spec.all_paths())
                raise DataError(f"{files}: split '{split}' is empty: no rows with text (data card {self.path})")
            out[split] = ds
            self.split_notes[split] = f"{note}: {_rows(len(ds))}"

        if "validation" not in out and "train" in out:
            out["train"], out["validation"] = self._make_validation(out["train"], seed)
        ordered = {s: out[s] for s in SPLITS if s in out}
        return datasets.DatasetDict(ordered)

    def _make_validation(self, train, seed: int):
        vs = self.model.validation_split
        s = vs.seed if vs.seed is not None else seed
        n = len(train)
        n_val = max(1, round(n * vs.fraction))
        if n - n_val < 1:
            raise DataError(
                f"data card {self.path}: split 'train' has {n} row(s), too few to hold out a validation split; "
                "add a `validation` file to the card's `files`"
            )
        pct = f"{vs.fraction * 100:g}%"
        if not vs.shuffle:
            val = train.select(range(n - n_val, n))
            train = train.select(range(n - n_val))
            how = f"the last {pct} of train rows in file order"
        else:
            strat = None
            if "label" in train.column_names:
                counts: dict[int, int] = {}
                for v in train.with_format("arrow")["label"].to_pylist():
                    counts[v] = counts.get(v, 0) + 1
                if min(counts.values()) >= 2 and len(counts) <= n_val and len(counts) <= n - n_val:
                    strat = "label"
            parts = train.train_test_split(test_size=n_val, seed=s, shuffle=True, stratify_by_column=strat)
            train, val = parts["train"], parts["test"]
            how = f"{pct} seeded split (seed {s}" + (", stratified by label)" if strat else ")")
        self.split_notes["validation"] = f"made from train: {how}, {_rows(len(val))}"
        self.split_notes["train"] += f", minus {len(val):,} moved to validation = {_rows(len(train))}"
        return train, val


# ---------------------------------------------------------------- load_card


def load_card(path: str | Path) -> DataCard:
    """Read and validate a data card (not its rows). Raises DataError naming the card, the key and the problem."""
    path = Path(path).resolve()
    text, body = _read_card_text(path)
    raw, problems = yamlio.parse(text)
    if problems:
        raise _fail(path, problems)
    if not isinstance(raw, dict):
        raise _fail(path, ["(top level): expected a mapping with source, license, format, files, ..."])
    try:
        model = CardModel.model_validate(raw)
    except ValidationError as e:
        raise _fail(path, _pydantic_problems(e)) from None

    problems = _check_structure(model)
    if problems:
        raise _fail(path, problems)
    card = DataCard(path, model, body)
    _check_files(path, model, card.splits)
    if model.format == "imagefolder" and not model.label_names:
        model.label_names = _class_folders(path, card.splits)  # datasets' imagefolder order: sorted names
    return card


def _class_folders(card_path: Path, splits: dict) -> list[str]:
    names = sorted({d.name for spec in splits.values() for folder in spec.paths
                    for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")})
    if len(names) < 2:
        raise _fail(card_path, [f"files: an imagefolder split holds one sub-folder per class; found {names or 'none'} "
                                "(give label_names, or put each class's images in a folder named after it)"])
    return names


def _check_structure(m: CardModel) -> list[str]:
    problems: list[str] = []
    for split in list(m.files) + list(m.split_columns):
        if split not in SPLITS:
            alias = _SPLIT_ALIASES.get(split.lower(), split.lower() if split.lower() in SPLITS else None)
            hint = f"; rename it to '{alias}'" if alias else ""
            key = "files" if split in m.files else "split_columns"
            problems.append(f"{key}.{split}: unknown split name; expected one of train, validation, test{hint}")
    if problems:
        return problems

    aligned = {s: isinstance(v, dict) for s, v in m.files.items()}
    for split, spec in m.files.items():
        if isinstance(spec, list) and not spec:
            problems.append(f"files.{split}: empty list; give at least one file")
        if isinstance(spec, dict):
            if m.format != "text":
                problems.append(
                    f"files.{split}: a role -> file mapping is for aligned line-per-example files (format: text); "
                    f"with format {m.format} give a path or a list of paths and map columns with `columns`"
                )
            bad = [r for r in spec if r not in ROLES]
            if bad:
                problems.append(f"files.{split}: unknown role(s) {bad}; expected roles from {list(ROLES)}")
            if not spec:
                problems.append(f"files.{split}: empty mapping; give role: path pairs, e.g. source: train.en")
    if problems:
        return problems

    # roles
    if m.format == "conll":
        roles = {"tokens", "tags"}
        if m.columns or m.split_columns:
            problems.append("columns: not used with format conll (its roles are always `tokens` and `tags`)")
        if m.text_sample_by != "line":
            problems.append("text_sample_by: only used with format text; remove it")
        if not m.label_names:
            problems.append(
                "label_names: required for format conll: list every tag in id order, e.g. [O, B-person, I-person]"
            )
        else:
            bad = [n for n in m.label_names if not _TAG_RE.match(n)]
            if bad:
                problems.append(
                    f"label_names: {bad} are not BIO tags; format conll expects O, B-<type> and I-<type>"
                )
    elif m.format == "imagefolder":
        roles = {"image", "label"}
        if m.columns or m.split_columns:
            problems.append("columns: not used with format imagefolder (its roles are `image` and `label`: one "
                            "sub-folder per class)")
        if m.text_sample_by != "line":
            problems.append("text_sample_by: only used with format text; remove it")
    elif m.format == "text":
        if len(set(aligned.values())) > 1:
            problems.append("files: either every split is a role -> file mapping (aligned files) or none is")
            return problems
        if m.columns or m.split_columns:
            problems.append(
                "columns: not used with format text (its role is `text`; aligned files name their roles in `files`)"
            )
        if any(aligned.values()):
            role_sets = {s: tuple(sorted(v)) for s, v in m.files.items()}
            if len(set(role_sets.values())) > 1:
                problems.append(f"files: every split must give the same roles (got {role_sets})")
            roles = set(next(iter(m.files.values())))
            if m.text_sample_by != "line":
                problems.append("text_sample_by: aligned files are read one example per line; use `line`")
        else:
            roles = {"text"}
    else:
        if not m.columns:
            problems.append(
                "columns: required for format " + m.format + ": map roles to the file's column names, "
                "e.g. {text: review, label: stars}"
            )
            return problems
        roles = set(m.columns)
        for split, cols in m.split_columns.items():
            extra = sorted(set(cols) - roles)
            if extra:
                problems.append(
                    f"split_columns.{split}: role(s) {extra} not in `columns`; split_columns only renames "
                    "the columns of roles that `columns` already maps"
                )
            if split not in m.files:
                problems.append(f"split_columns.{split}: the card has no {split} split in `files`")
        for split in m.files:
            cols = {**m.columns, **m.split_columns.get(split, {})}
            names = list(cols.values())
            dup = sorted({c for c in names if names.count(c) > 1})
            if dup:
                problems.append(f"columns: column(s) {dup} mapped to more than one role (split {split})")
        if m.text_sample_by != "line":
            problems.append("text_sample_by: only used with format text; remove it")

    chat = {"messages", "prompt", "completion", "chosen", "rejected"} & roles
    if not ("text" in roles or {"source", "target"} <= roles or "tokens" in roles or "image" in roles or chat):
        problems.append(
            f"roles: the card maps {sorted(roles)}; it needs `text` (classification, language modelling), "
            "both `source` and `target` (translation, summarisation), `image`, `messages` (chat), `prompt` + "
            "`completion` (instructions) or `prompt` + `chosen` + `rejected` (preference pairs)"
        )
    problems += _chat_role_problems(roles)
    if ("source" in roles) != ("target" in roles):
        problems.append("roles: `source` and `target` go together (translation pairs)")
    if "text" in roles and "source" in roles:
        problems.append("roles: use either `text` or `source`/`target`, not both")
    if ("label" in roles or "labels" in roles) and not m.label_names and m.format != "imagefolder":  # (conll: above)
        problems.append(
            f"label_names: required when a `{'label' if 'label' in roles else 'labels'}` column is mapped: list the "
            "label names in id order, e.g. [negative, positive]"
        )
    if "label" in roles and "labels" in roles:
        problems.append("columns: map either `label` (one label per row) or `labels` (a list per row), not both")
    if m.label_names is not None:
        if not {"label", "labels", "tags"} & roles:
            problems.append("label_names: given but no `label` (or `labels`) column is mapped (columns.label)")
        if len(m.label_names) < 2:
            problems.append("label_names: give at least two labels")
        if any(not n.strip() for n in m.label_names):
            problems.append("label_names: names must not be empty")
        dup = sorted({n for n in m.label_names if m.label_names.count(n) > 1})
        if dup:
            problems.append(f"label_names: given more than once: {dup}")

    if m.task is not None:
        from pipelines import tasks

        try:
            task = tasks.get(m.task)
        except PipelinesError as e:
            problems.append(f"task: {e}")
        else:
            need = set(task.required_roles(roles))
            if not need <= roles:
                problems.append(f"task: {m.task} needs the roles {' and '.join(sorted(need))}; the card maps "
                                f"{sorted(roles)}" + (" (token classification reads format: conll)" if "tags" in need else ""))
    return problems


def _chat_role_problems(roles: set[str]) -> list[str]:
    """Chat / instruction / preference roles come in known sets, and not mixed with the other tasks' inputs."""
    chat = {"messages", "prompt", "completion", "chosen", "rejected"} & roles
    if not chat:
        return []
    problems = []
    if ("chosen" in roles) != ("rejected" in roles):
        problems.append("roles: `chosen` and `rejected` go together (a preference pair), with a `prompt`")
    elif "chosen" in roles and "prompt" not in roles:
        problems.append("roles: a preference pair (`chosen`, `rejected`) needs its `prompt`")
    if "completion" in roles and "prompt" not in roles:
        problems.append("roles: `completion` needs its `prompt` (an instruction and its answer)")
    if "prompt" in roles and not ({"completion", "chosen"} & roles):
        problems.append("roles: `prompt` goes with `completion` (instructions) or `chosen` + `rejected` (preferences)")
    if "messages" in roles and roles & {"prompt", "completion"}:
        problems.append("roles: use either `messages` (conversations) or `prompt` + `completion`, not both")
    other = sorted(roles & {"text", "source", "target", "tokens", "image", "label", "labels"})
    if other:
        problems.append(f"roles: chat / preference roles {sorted(chat)} do not go with {other} in one card")
    return problems


def _check_files(card_path: Path, m: CardModel, splits: dict[str, _SplitSpec]) -> None:
    problems: list[str] = []
    owner: dict[Path, str] = {}
    for split, spec in splits.items():
        keyed = (
            [(f"files.{split}.{role}", p) for role, p in spec.aligned.items()]
            if spec.aligned
            else [(f"files.{split}" + (f"[{i}]" if len(spec.paths) > 1 else ""), p) for i, p in enumerate(spec.paths)]
        )
        for key, p in keyed:
            if p in owner:
                if owner[p] == split:
                    problems.append(f"{key}: {p} is given twice in split '{split}'")
                else:
                    problems.append(
                        f"{key}: {p} is also used by split '{owner[p]}'; a file belongs to one split only "
                        "(split given twice)"
                    )
                continue
            owner[p] = split
            if m.format == "imagefolder":
                if not p.is_dir():
                    problems.append(f"{key}: {'not a folder' if p.exists() else 'folder not found'}: {p} (format "
                                    "imagefolder: a folder with one sub-folder of images per class)")
                elif not any(p.iterdir()):
                    problems.append(f"{key}: empty folder: {p}")
            elif not p.exists():
                problems.append(f"{key}: file not found: {p} (relative paths are relative to the card's folder)")
            elif not p.is_file():
                problems.append(f"{key}: not a file: {p}")
            elif p.stat().st_size == 0:
                problems.append(f"{key}: empty file (0 bytes): {p}")
    if problems:
        raise _fail(card_path, problems)


# ---------------------------------------------------------------- reading files


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def _check_utf8(path: Path) -> None:
    """Raise DataError at the first byte that is not UTF-8 (with its offset and line)."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            final = not chunk
            try:
                dec.decode(chunk, final=final)
            except UnicodeDecodeError as e:
                # e.start is relative to the buffer the decoder held: pending bytes + this chunk
                pending = len(e.object) - len(chunk)
                bad = offset - pending + e.start
                with open(path, "rb") as g:
                    head = g.read(bad)
                    snippet = head[-20:] + g.read(4)
                line = head.count(b"\n") + 1
                raise DataError(
                    f"{path}: not valid UTF-8 at byte offset {bad} (line {line}, near {snippet!r}); "
                    "save the file as UTF-8"
                ) from None
            if final:
                return
            offset += len(chunk)


def _where(card: DataCard, split: str) -> str:
    return f"(data card {card.path.name}, split '{split}')"


def _csv_dialect(fmt: str) -> dict:
    if fmt == "tsv":
        return {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    return {"delimiter": ",", "quoting": csv.QUOTE_MINIMAL}


def _csv_header(path: Path, fmt: str) -> list[str]:
    d = _csv_dialect(fmt)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=d["delimiter"], quoting=d["quoting"])
        for row in reader:
            if row:
                return row
    return []


def _pandas_names(header: list[str]) -> list[str]:
    """Column names as pandas gives them: empty -> "Unnamed: i", repeats -> "a.1", "a.2"."""
    out: list[str] = []
    counts: dict[str, int] = {}
    for i, h in enumerate(header):
        name = h if h != "" else f"Unnamed: {i}"
        if name in counts:
            counts[name] += 1
            name = f"{name}.{counts[name]}"
        counts.setdefault(name, 0)
        out.append(name)
    return out


def _csv_line_of_row(path: Path, fmt: str, row: int) -> int | None:
    """1-based line where 1-based data row `row` starts (pandas skips blank lines; quoted fields may span lines)."""
    d = _csv_dialect(fmt)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=d["delimiter"], quoting=d["quoting"])
            seen_header = False
            n = 0
            start = 1
            for rec in reader:
                if rec:
                    if not seen_header:
                        seen_header = True
                    else:
                        n += 1
                        if n == row:
                            return start
                start = reader.line_num + 1
    except (OSError, csv.Error):
        return None
    return None


def _jsonl_line_of_row(path: Path, row: int) -> int | None:
    n = 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    n += 1
                    if n == row:
                        return i
    except OSError:
        return None
    return None


def _row_label(card: DataCard, path: Path, index: int) -> str:
    """'row 3 (line 4)' for 0-based dataset index `index` of a file."""
    row = index + 1
    fmt = card.format
    line = None
    if fmt in ("csv", "tsv"):
        line = _csv_line_of_row(path, fmt, row)
    elif fmt == "jsonl" or (fmt == "json" and _starts_with(path, b"{")):
        line = _jsonl_line_of_row(path, row)
    return f"row {row}" + (f" (line {line})" if line else "")


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip(codecs.BOM_UTF8).lstrip()
    return head.startswith(prefix)


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """(line, problem) of the first line of a JSON-lines file that is not a JSON object."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return i, e.msg
                if not isinstance(obj, dict):
                    return i, f"expected an object {{...}} per line, got {type(obj).__name__}"
    except OSError:
        return None
    return None


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _rephrase(e: BaseException, path: Path, fmt: str, card: DataCard, split: str) -> DataError:
    root = _root_cause(e)
    msg = " ".join(str(root).split()) or type(root).__name__
    if "corresponds to no data" in " ".join(str(e).split()) or "corresponds to no data" in msg:
        return DataError(f"{path}: split '{split}' is empty: the file has no data rows {_where(card, split)}")
    m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
    if m:
        exp, line, saw = m.groups()
        hint = (
            " (a tab inside a text field? TSV is read without quoting)"
            if fmt == "tsv"
            else " (an unquoted comma in a text field? quote fields that contain commas)"
        )
        return DataError(f"{path}: line {line}: {saw} fields where the header has {exp}{hint} {_where(card, split)}")
    if isinstance(root, UnicodeDecodeError):
        return DataError(f"{path}: not valid UTF-8 ({root.reason}); save the file as UTF-8 {_where(card, split)}")
    if fmt in ("json", "jsonl") and not _starts_with(path, b"["):
        bad = _first_bad_json_line(path)
        if bad:
            return DataError(f"{path}: line {bad[0]}: not valid JSON ({bad[1]}) {_where(card, split)}")
    if fmt == "json" and _starts_with(path, b"["):
        try:
            json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as je:
            return DataError(f"{path}: line {je.lineno}: not valid JSON ({je.msg}) {_where(card, split)}")
    if re.search(r"EOF inside string|unexpected end of data", msg):
        return DataError(f"{path}: a quoted field is never closed (unbalanced '\"') {_where(card, split)}")
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return DataError(f"{path}: could not read as {fmt}: {msg} {_where(card, split)}")


def _load_raw(card: DataCard, split: str, path: Path, cache_dir, **kwargs):
    """datasets.load_dataset on one file; library errors become DataError naming the file."""
    import datasets

    fmt = card.format
    builder = {"tsv": "csv", "jsonl": "json"}.get(fmt, fmt)
    # the packaged loaders log their own "Failed to read ..." errors before raising; we rephrase those
    quiet = logging.getLogger("datasets.packaged_modules")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    # one "Generating train split" bar per file is noise for a card's small files; the caller's setting is kept
    bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            builder, data_files={"train": str(path)}, split="train", cache_dir=str(cache_dir) if cache_dir else None, **kwargs
        )
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow/datasets errors, rephrased with the file name
        raise _rephrase(e, path, fmt, card, split) from None
    finally:
        quiet.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _load_file(card: DataCard, split: str, path: Path, cache_dir, keep_blank: bool = False):
    """One file of a split -> (Dataset with only role columns, note)."""
    import datasets

    fmt = card.format
    if fmt == "imagefolder":
        return _load_imagefolder(card, split, path)
    if fmt != "parquet":
        _check_utf8(path)
    if fmt == "conll":
        return _load_conll(card, split, path)
    if fmt == "text":
        mode = card.model.text_sample_by
        raw = _load_raw(card, split, path, cache_dir, sample_by=mode, encoding="utf-8-sig")
        col = _clean_text(_table(raw).column("text"))
        blank = _blank_mask(col)
        dropped = sum(blank)
        if dropped:
            import pyarrow as pa

            col = col.filter(pa.array([not b for b in blank]))
        ds = _dataset({"text": col}, card)
        plural = "s" if dropped != 1 else ""
        note = f"{path.name} (one example per {mode}" + (f", {dropped:,} blank {mode}{plural} dropped)" if dropped else ")")
        return ds, note

    cols = card.columns_for(split)
    if fmt in ("csv", "tsv"):
        header = _csv_header(path, fmt)
        if not header:
            raise DataError(f"{path}: no header row; the first line must name the columns {_where(card, split)}")
        header = _pandas_names(header)
        _check_columns(card, split, path, cols, header)
        # every column read as text (no type guessing: labels stay "1", "pos", ...); all columns are
        # read (not only the mapped ones) so that a row with too many fields is an error, not ignored
        features = datasets.Features({c: datasets.Value("string") for c in header})
        extra = {"quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        raw = _load_raw(
            card,
            split,
            path,
            cache_dir,
            sep="\t" if fmt == "tsv" else ",",
            features=features,
            na_filter=False,
            keep_default_na=False,
            encoding="utf-8-sig",
            **extra,
        )
    else:
        raw = _load_raw(card, split, path, cache_dir)
        _check_columns(card, split, path, cols, raw.column_names)
    if len(raw) == 0:
        raise DataError(f"{path}: split '{split}' is empty: the file has no data rows {_where(card, split)}")
    ds = _to_roles(card, split, path, raw, cols, keep_blank)
    return ds, path.name


def _check_columns(card: DataCard, split: str, path: Path, cols: dict[str, str], have: list[str]) -> None:
    missing = [(r, c) for r, c in cols.items() if c not in have]
    if missing:
        what = ", ".join(f"'{c}' (columns.{r})" for r, c in missing)
        near = [h for h in have if h.strip() in {c for _, c in missing}]
        hint = f"; note the spaces in {near}" if near else ""
        raise DataError(
            f"{path}: missing column {what}; the file has columns: {have}{hint} {_where(card, split)}"
        )


def _table(ds):
    """The pyarrow Table of a freshly loaded Dataset (no indices mapping)."""
    t = ds.data
    return t.table if hasattr(t, "table") else t


def _clean_text(col):
    """Text as loaded: CRLF inside fields -> LF, surrounding whitespace stripped (nulls kept)."""
    import pyarrow.compute as pc

    return pc.utf8_trim_whitespace(pc.replace_substring(col, "\r\n", "\n"))


def _blank_mask(col) -> list[bool]:
    """True where the text is null, empty or whitespace only."""
    import pyarrow.compute as pc

    return pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col.fill_null("")), "")).to_pylist()


def _dataset(columns: dict, card: DataCard, fingerprint: str | None = None):
    """In-memory Dataset of role columns (in ROLES order): text roles as strings, label as ClassLabel ids."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    names, arrays, features = [], [], {}
    for role in ROLES:
        if role not in columns:
            continue
        v = columns[role]
        if role == "label":
            arrays.append(pa.array(v, pa.int64()))
            features[role] = datasets.ClassLabel(names=list(card.label_names))
        elif role == "tokens":
            arrays.append(pa.array(v, pa.list_(pa.string())))
            features[role] = datasets.List(datasets.Value("string"))
        elif role == "image":  # file paths, decoded lazily by datasets' Image feature (Pillow)
            paths = [str(x) for x in v]
            arrays.append(pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), pa.array(paths, pa.string())],
                                                     names=["bytes", "path"]))
            features[role] = datasets.Image()
        elif role in ("tags", "labels"):
            arrays.append(pa.array(v, pa.list_(pa.int64())))
            features[role] = datasets.List(datasets.ClassLabel(names=list(card.label_names)))
        elif role in TURN_ROLES and isinstance(v, list):  # a list of turns per row (text cells come as an Arrow array)
            arrays.append(pa.array(v, pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))))
            features[role] = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
        else:
            if isinstance(v, pa.ChunkedArray):
                v = v.combine_chunks()
            arrays.append(v.cast(pa.string()) if not pa.types.is_string(v.type) else v)
            features[role] = datasets.Value("string")
        names.append(role)
    table = InMemoryTable(pa.Table.from_arrays(arrays, names=names))
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=datasets.Features(features)),
                            fingerprint=fingerprint)


def _to_roles(card: DataCard, split: str, path: Path, raw, cols: dict[str, str], keep_blank: bool = False):
    """Keep the role columns, rename them to roles, check text and labels, labels -> ClassLabel ids."""
    import pyarrow as pa

    table = _table(raw)
    out: dict[str, Any] = {}
    for role in ROLES:
        if role not in cols:
            continue
        col = table.column(cols[role])
        values = None
        feature = raw.features.get(cols[role])
        if type(feature).__name__ == "List" and type(getattr(feature, "feature", None)).__name__ == "Json":
            # a JSON list mixing value types (["x", 1]): datasets keeps each item JSON-encoded
            values = [None if row is None else [json.loads(x) for x in row] for row in col.to_pylist()]
        if type(feature).__name__ == "Json":
            # JSON whose column mixes value types (1 and "1", or text and numbers): datasets keeps each
            # value JSON-encoded; decode them and check them like any other
            values = [None if v is None else json.loads(v) for v in col.to_pylist()]
            if _as_text(role, col, values):
                bad = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
                if bad is not None:
                    raise DataError(
                        f"{path}: {_row_label(card, path, bad)}: column '{cols[role]}' ({role}) should hold text, "
                        f"got {values[bad]!r} {_where(card, split)}"
                    )
                col = pa.array(values, pa.string())
        if role in TURN_ROLES and not _as_text(role, col, values):
            vals = values if values is not None else col.to_pylist()
            out[role] = _turn_lists(card, split, path, role, vals, cols[role])
        elif _as_text(role, col, values):
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
                vals = col.to_pylist()
                bad = next((i for i, v in enumerate(vals) if v is not None and not isinstance(v, str)), 0)
                raise DataError(
                    f"{path}: {_row_label(card, path, bad)}: column '{cols[role]}' ({role}) should hold text, "
                    f"got {vals[bad]!r} ({type(vals[bad]).__name__}) {_where(card, split)}"
                )
            col = _clean_text(col.cast(pa.string()))
            mask = _blank_mask(col)
            if keep_blank:
                col = col.fill_null("")
            elif any(mask):
                i = mask.index(True)
                v = table.column(cols[role])[i].as_py()
                what = "missing (null)" if v is None else ("empty" if v == "" else "whitespace-only")
                more = sum(mask) - 1
                raise DataError(
                    f"{path}: {_row_label(card, path, i)}: {what} text in column '{cols[role]}' ({role})"
                    + (f"; {more} more such row(s)" if more else "")
                    + f" {_where(card, split)}; fix the file, or let a `prepare` stage drop such rows"
                )
            out[role] = col
        elif role == "image":
            vals = values if values is not None else col.to_pylist()
            out[role] = _image_paths(card, split, path, vals, cols[role], lambda i: _row_label(card, path, i))
        elif role == "labels":
            vals = values if values is not None else col.to_pylist()
            out[role] = _label_lists(card, split, path, vals, cols[role], lambda i: _row_label(card, path, i))
        else:
            vals = values if values is not None else col.to_pylist()
            out[role] = _label_ids(
                card, split, path, vals, cols[role], lambda i: _row_label(card, path, i)
            )
    if "chosen" in out:
        _check_pairs(card, split, path, out, cols)
    return _dataset(out, card)


def _as_text(role: str, col, values) -> bool:
    """Whether a role's column is read as text: always for the text roles; for prompt / chosen / rejected when
    the file holds strings there (else they are lists of turns, as `messages` always is)."""
    import pyarrow as pa

    if role in TEXT_ROLES:
        return True
    if role not in TURN_ROLES or role == "messages":
        return False
    if values is not None:
        return all(v is None or isinstance(v, str) for v in values)
    return pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)


def _turn_lists(card: DataCard, split: str, path: Path, role: str, values: list, column: str) -> list[list[dict]]:
    """A column of conversations (or of a preference pair's prompt / reply turns), each checked by pipelines.chat:
    known roles, no empty turn, one system turn at most and first, an assistant turn where one is needed."""
    from pipelines import chat

    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, str):
                raise chat.ConversationError(f"a text where the other rows hold lists of turns ({role} must be the "
                                             "same kind in every row)")
            if role == "messages":
                turns = chat.conversation(v)
            elif role == "prompt":
                turns = chat.conversation(v, need_assistant=False, what="prompt")
                if turns[-1]["role"] != "user":
                    raise chat.ConversationError("prompt: the last turn must be the user's (the reply follows it)")
            else:
                turns = chat.reply(v, what=role)
        except chat.ConversationError as e:
            raise DataError(f"{path}: {_row_label(card, path, i)}: {e} in column '{column}' ({role}) "
                            f"{_where(card, split)}") from None
        out.append(turns)
    return out


def _check_pairs(card: DataCard, split: str, path: Path, out: dict, cols: dict[str, str]) -> None:
    """A preference pair whose chosen and rejected replies are the same teaches nothing (and is usually a bug)."""
    from pipelines import chat

    as_list = lambda v: v if isinstance(v, list) else v.to_pylist()  # noqa: E731
    for i, (c, r) in enumerate(zip(as_list(out["chosen"]), as_list(out["rejected"]))):
        if chat.same_reply(c, r):
            raise DataError(f"{path}: {_row_label(card, path, i)}: chosen == rejected (columns '{cols['chosen']}' and "
                            f"'{cols['rejected']}'): the pair prefers nothing {_where(card, split)}")


def _label_lists(card: DataCard, split: str, path: Path, values: list, column: str, where) -> list[list[int]]:
    """`labels` (several per row): a list (JSON / Parquet) or a `label_separator`-separated cell (CSV / TSV) of
    label names (or ids) -> sorted, distinct ids per row. An empty list or cell is a row with no label."""
    out = []
    for idx, v in enumerate(values):
        if v is None:
            raise DataError(f"{path}: {where(idx)}: missing labels (null) in column '{column}'; write [] (or an empty "
                            f"cell) for a row without labels {_where(card, split)}")
        if isinstance(v, str):
            items = [x.strip() for x in v.split(card.model.label_separator) if x.strip()]
        elif isinstance(v, (list, tuple)):
            items = list(v)
        else:
            raise DataError(f"{path}: {where(idx)}: column '{column}' (labels) should hold a list of labels or a "
                            f"{card.model.label_separator!r}-separated text, got {v!r} {_where(card, split)}")
        ids = _label_ids(card, split, path, items, column, lambda _j, i=idx: where(i))
        out.append(sorted(set(ids)))
    return out


def _label_ids(card: DataCard, split: str, path: Path, values: list, column: str, where) -> list[int]:
    """Labels (names, or ids as int / "1") -> ids in label_names order. `where(i)` names row i."""
    names = list(card.label_names or [])
    by_name = {n: i for i, n in enumerate(names)}
    numeric_names = any(_INT_RE.fullmatch(n.strip()) for n in names)

    def to_id(v) -> int | None:
        if v is None or isinstance(v, (bool, list, dict)):
            return None
        if isinstance(v, float):
            if v != v or not v.is_integer():  # NaN or 0.5
                return None
            v = int(v)
        s = str(v).strip()
        if s in by_name:
            return by_name[s]
        if not numeric_names and _INT_RE.fullmatch(s):
            i = int(float(s))
            if 0 <= i < len(names):
                return i
        return None

    cache: dict[Any, int | None] = {}
    ids: list[int] = []
    for idx, v in enumerate(values):
        try:
            key = (type(v), v)
            if key not in cache:
                cache[key] = to_id(v)
            i = cache[key]
        except TypeError:  # unhashable (a list or object in JSON)
            i = None
        if i is None:
            allowed = names if numeric_names else names + [f"or ids 0..{len(names) - 1}"]
            if v is None or (isinstance(v, str) and not v.strip()):
                what = "missing label (null)" if v is None else "missing label (empty)"
                raise DataError(
                    f"{path}: {where(idx)}: {what} in column '{column}'; expected one of label_names {allowed} "
                    f"{_where(card, split)}"
                )
            raise DataError(
                f"{path}: {where(idx)}: label {v!r} in column '{column}' is not one of label_names {allowed} "
                f"{_where(card, split)}"
            )
        ids.append(i)
    return ids


def _load_aligned(card: DataCard, split: str, spec: _SplitSpec, cache_dir):
    """Aligned line-per-example files (e.g. train.en / train.de): one row per line number."""
    import pyarrow as pa

    cols: dict[str, list] = {}
    for role, p in spec.aligned.items():
        _check_utf8(p)
        raw = _load_raw(card, split, p, cache_dir, sample_by="line", encoding="utf-8-sig")
        lines = _table(raw).column("text").to_pylist()
        while lines and not lines[-1].strip():  # trailing blank lines (a final empty line is common)
            lines.pop()
        cols[role] = lines
    counts = {role: len(v) for role, v in cols.items()}
    if len(set(counts.values())) > 1:
        desc = ", ".join(f"{spec.aligned[r].name} has {n:,} lines" for r, n in counts.items())
        raise DataError(
            f"{', '.join(str(p) for p in spec.aligned.values())}: aligned files have different line counts: "
            f"{desc} (line N of each file must be the same example; trailing blank lines are ignored) "
            f"{_where(card, split)}"
        )
    n = next(iter(counts.values()))
    text_roles = [r for r in cols if r in TEXT_ROLES + TURN_ROLES]
    blank = {r: [not s.strip() for s in cols[r]] for r in text_roles}
    keep: list[int] = []
    for i in range(n):
        b = [r for r in text_roles if blank[r][i]]
        if not b:
            keep.append(i)
        elif len(b) < len(text_roles):
            full = [r for r in text_roles if r not in b]
            raise DataError(
                f"{spec.aligned[b[0]]}: line {i + 1}: empty text ({b[0]}) while line {i + 1} of "
                f"{spec.aligned[full[0]].name} is not; aligned files must have text on the same lines "
                f"{_where(card, split)}"
            )
    dropped = n - len(keep)
    out: dict[str, Any] = {}
    for role in cols:
        vals = [cols[role][i] for i in keep]
        if role == "label":
            out[role] = _label_ids(
                card, split, spec.aligned[role], vals, role, lambda j: f"line {keep[j] + 1}"
            )
        else:
            out[role] = _clean_text(pa.array(vals, pa.string()))
    ds = _dataset(out, card)
    names = " + ".join(p.name for p in spec.aligned.values())
    note = f"{names} (aligned lines" + (f", {dropped:,} blank line(s) dropped)" if dropped else ")")
    return ds, note


def _load_conll(card: DataCard, split: str, path: Path):
    """A CoNLL file -> rows of `tokens` (list of str) + `tags` (ids in label_names order).

    Sentences end at a blank or whitespace-only line (WNUT-17's train file uses a lone TAB); a line is
    `token<TAB>tag` (split on tabs when it has one, else on whitespace; with more fields the first is the
    token and the last the tag, as in CoNLL-2003). Lines are split on \\n only: str.splitlines() would also
    break at U+2028, U+0085, ... which user-generated text holds inside tokens. Zero-width characters
    (U+200B, U+FEFF) inside a token are kept as they are; the tokenizer decides what they become."""
    by_name = {n: i for i, n in enumerate(card.label_names or [])}
    text = path.read_bytes().decode("utf-8-sig")
    rows_tokens: list[list[str]] = []
    rows_tags: list[list[int]] = []
    tokens: list[str] = []
    tags: list[int] = []

    def bad(line_no: int, what: str) -> DataError:
        return DataError(f"{path}: line {line_no}: {what} {_where(card, split)}")

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line.strip():
            if tokens:
                rows_tokens.append(tokens)
                rows_tags.append(tags)
                tokens, tags = [], []
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        fields = [f for f in fields if f]
        if fields and fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2:
            raise bad(n, f"no tag after the token {fields[0]!r}; expected `token<TAB>tag` "
                      "(sentences are separated by blank lines)")
        tag = fields[-1]
        if tag not in by_name:
            shown = list(by_name) if len(by_name) <= 20 else list(by_name)[:20] + ["..."]
            raise bad(n, f"tag {tag!r} (token {fields[0]!r}) is not one of label_names {shown}")
        tokens.append(fields[0])
        tags.append(by_name[tag])
    if tokens:
        rows_tokens.append(tokens)
        rows_tags.append(tags)
    if not rows_tokens:
        raise DataError(f"{path}: split '{split}' is empty: no sentences (token<TAB>tag lines) {_where(card, split)}")
    fp = hash_obj(["conll", hash_file(path), list(card.label_names or []), LOADER_VERSION])[:16]
    ds = _dataset({"tokens": rows_tokens, "tags": rows_tags}, card, fingerprint=fp)
    n_tok = sum(map(len, rows_tokens))
    return ds, f"{path.name} ({n_tok:,} tokens in {len(rows_tokens):,} sentences)"


# ---------------------------------------------------------------- images


def check_image(path: Path) -> tuple[str | None, str | None]:
    """(problem, mode) of one image file: decoded in full with Pillow (a truncated file fails there), its
    size within MIN_IMAGE_SIDE .. MAX_IMAGE_PIXELS checked from the header before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # only the header is read here; its size is checked just below
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                return f"{w}x{h} pixels is over the limit of {MAX_IMAGE_PIXELS:,} pixels (resize it)", None
            if min(w, h) < MIN_IMAGE_SIDE:
                return f"{w}x{h} pixels: smaller than {MIN_IMAGE_SIDE} pixels a side", None
            im.load()
            return None, im.mode
    except UnidentifiedImageError:
        return "not an image Pillow can read (is it a PNG / JPEG / BMP / GIF / TIFF / WebP file?)", None
    except (OSError, SyntaxError, ValueError) as e:
        return f"cannot be decoded ({' '.join(str(e).split())}): a truncated or corrupt file?", None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _check_images(card: DataCard, split: str, paths: list[Path], where) -> str:
    """Every image checked (the first problem raised, naming the file); a note of the colour modes found."""
    from collections import Counter

    modes: Counter = Counter()
    for i, p in enumerate(paths):
        problem, mode = check_image(p)
        if problem:
            raise DataError(f"{p}: {where(i)}image {problem} {_where(card, split)}")
        modes[mode] += 1
    mixed = ", ".join(f"{m} {n:,}" for m, n in modes.most_common())
    return f"modes {mixed}" + ("" if set(modes) == {"RGB"} else ": converted to RGB when read")


def _image_paths(card: DataCard, split: str, path: Path, values: list, column: str, where) -> list[str]:
    """An `image` column of a CSV / JSON(L) / Parquet file: paths relative to that file's folder (or absolute)."""
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{path}: {where(i)}: column '{column}' (image) should hold an image file path, got {v!r} "
                            f"{_where(card, split)}")
        p = Path(v.strip())
        p = p if p.is_absolute() else (path.parent / p).resolve()
        if not p.is_file():
            raise DataError(f"{path}: {where(i)}: image file not found: {p} (paths are relative to {path.parent}) "
                            f"{_where(card, split)}")
        out.append(p)
    _check_images(card, split, out, lambda j: f"{where(j)}: ")
    return [str(p) for p in out]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _load_imagefolder(card: DataCard, split: str, folder: Path):
    """An image folder (datasets' imagefolder layout): <folder>/<class name>/<image file>, classes from
    label_names (sub-folders not in it are an error). Every image is checked with Pillow."""
    names = list(card.label_names or [])
    by_name = {n: i for i, n in enumerate(names)}
    paths, labels = [], []
    for sub in sorted(d for d in folder.iterdir() if not d.name.startswith(".")):
        if not sub.is_dir():
            raise DataError(f"{sub}: a file directly in an imagefolder split; put each image in the folder of its "
                            f"class ({folder}/<class>/{sub.name}) {_where(card, split)}")
        if sub.name not in by_name:
            raise DataError(f"{sub}: class folder {sub.name!r} is not one of label_names {names} {_where(card, split)}")
        for f in sorted(sub.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    raise DataError(f"{f}: not an image file name (expected one of {', '.join(IMAGE_SUFFIXES)}) "
                                    f"{_where(card, split)}")
                paths.append(f)
                labels.append(by_name[sub.name])
    if not paths:
        raise DataError(f"{folder}: split '{split}' is empty: no images in its class folders {_where(card, split)}")
    modes = _check_images(card, split, paths, lambda i: "")
    fp = hash_obj(["imagefolder", hash_tree(folder), names, LOADER_VERSION])[:16]
    ds = _dataset({"image": paths, "label": labels}, card, fingerprint=fp)
    counts = ", ".join(f"{names[k]} {labels.count(k):,}" for k in sorted(set(labels)))
    return ds, f"{folder.name}/ ({len(paths):,} images: {counts}; {modes})"
