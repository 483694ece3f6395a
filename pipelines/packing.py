"""Tokenise text with a trained tokenizer and pack it into fixed-length blocks for LM pretraining.

    tok = tokenize_documents(ds, tokenizer, column="text")   # one row per document: its ids + separator
    packed = pack(tok, block_size=256)                       # PackResult: .dataset (int32 blocks), counts

Documents are the rows of a split (a speech for a `paragraph` card, a line for a `line` card, a file for
a `document` card). Each document's ids are followed by the tokenizer's EOS (or SEP for a BERT-style
vocabulary), so a packed block never loses where one document ended and the next began. Packing runs
over the whole split, carrying each batch's leftover tokens into the next: unlike `group_texts` in
transformers' run_clm example (which drops a remainder per map batch of 1,000 rows), the only tokens not
in a block are the final < block_size remainder of the split. Blocks hold no padding.

Both steps are cached on disk under `$PIPELINES_CACHE/tokenized` (default ~/.cache/pipelines). The cache
key hashes the input rows (datasets' content fingerprint), the column, the tokenizer's *own* content
(vocab, merges, normaliser, special tokens: `tokenizer_fingerprint`), the separator and the block size:
retraining the tokenizer can never serve stale ids (PITFALLS: "stale preprocessing cache").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import PipelinesError

PACKING_VERSION = "1"  # bump when tokenize/pack change what they produce for the same inputs


def cache_root() -> Path:
    base = Path(os.environ.get("PIPELINES_CACHE", Path.home() / ".cache" / "pipelines"))
    return base / "tokenized"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer *does* (its serialised model, normaliser, pre-tokeniser, added and
    special tokens), not of its name or path: the same folder retrained gives a new fingerprint. The
    backend's truncation and padding are left out: transformers sets them on each call (`truncation=True,
    max_length=64` stays in the backend afterwards), so they say what the last call asked, not what the
    tokenizer is; the cache keys that depend on a length carry it themselves."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = json.loads(backend.to_str())
        body.pop("truncation", None)
        body.pop("padding", None)
    else:  # a slow (Python) tokenizer: hash the files it saves
        with tempfile.TemporaryDirectory() as d:
            tokenizer.save_pretrained(d)
            body = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}
    return _hash(
        {
            "class": type(tokenizer).__name__,
            "body": body,
            "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
            "len": len(tokenizer),
        }
    )


def separator_id(tokenizer) -> int:
    """The token placed after every document: EOS, else SEP (WordPiece vocabularies have no EOS)."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if tid is not None:
            return tid
    raise PipelinesError(
        "the tokenizer has neither an eos_token nor a sep_token, so packed documents could not be "
        "separated; train it with one (the tokenizer stage's bpe/unigram kinds have </s>, wordpiece has [SEP])"
    )


def cached_map(ds, fn, key: dict, cache_dir: str | Path | None = None, num_proc: int | None = None, **map_kwargs):
    """`ds.map(fn, batched=True)` cached in a file named by `key` (+ the rows' fingerprint and
    PACKING_VERSION). We name the cache ourselves rather than let datasets hash `fn`: its closure holds a
    tokenizer, whose pickled hash is both slow and not guaranteed to follow the tokenizer's content."""
    fp = _hash({"rows": ds._fingerprint, "version": PACKING_VERSION, **key})
    folder = Path(cache_dir) if cache_dir else cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    return ds.map(
        fn,
        batched=True,
        num_proc=num_proc,
        cache_file_name=str(folder / f"map-{fp}.arrow"),
        new_fingerprint=fp,
        load_from_cache_file=True,
        desc=map_kwargs.pop("desc", None),
        **map_kwargs,
    )


def tokenize_documents(ds, tokenizer, column: str = "text", cache_dir=None, num_proc: int | None = None):
    """One row per document: `input_ids` = the document's ids + separator. No special tokens are added
    by the tokenizer (a WordPiece [CLS] per document would be noise inside a packed block)."""
    if column not in ds.column_names:
        raise PipelinesError(f"the data has no '{column}' column (it has {ds.column_names})")
    sep = separator_id(tokenizer)

    def encode(batch):
        ids = tokenizer(batch[column], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {"input_ids": [x + [sep] for x in ids["input_ids"]]}

    key = {"what": "documents", "column": column, "tokenizer": tokenizer_fingerprint(tokenizer), "sep": sep}
    return cached_map(ds, encode, key, cache_dir, num_proc, remove_columns=ds.column_names, desc="tokenise")


def tokenize_pairs(ds, tokenizer, max_source_length: int, max_target_length: int, cache_dir=None, num_proc=None):
    """Seq2seq rows: `input_ids` = source ids (truncated) + EOS, `labels` = target ids (truncated) + EOS."""
    missing = [c for c in ("source", "target") if c not in ds.column_names]
    if missing:
        raise PipelinesError(f"seq2seq needs a data card with source and target columns; missing {missing}")
    eos = separator_id(tokenizer)

    def encode(batch):
        src = tokenizer(batch["source"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        tgt = tokenizer(batch["target"], add_special_tokens=False, return_attention_mask=False, verbose=False)
        return {
            "input_ids": [x[: max_source_length - 1] + [eos] for x in src["input_ids"]],
            "labels": [y[: max_target_length - 1] + [eos] for y in tgt["input_ids"]],
        }

    key = {
        "what": "pairs",
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "eos": eos,
        "max_source_length": max_source_length,
        "max_target_length": max_target_length,
    }
    return cached_map(ds, encode, key, cache_dir, num_proc, remove_columns=ds.column_names, desc="tokenise pairs")


@dataclass
class PackResult:
    dataset: object  # datasets.Dataset with one column `input_ids`: int32 lists of block_size
    n_tokens: int  # tokens in the split (documents + separators)
    n_blocks: int
    remainder: int  # tokens after the last full block: the only ones not trained on


def pack(tokenized, block_size: int, cache_dir=None, batch_rows: int = 10_000) -> PackResult:
    """Concatenate the documents of a tokenised split and cut full blocks of `block_size`, streaming
    Arrow batches (memory stays flat) into a cached Arrow file. Raises when not even one block fits."""
    import datasets
    import numpy as np
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    if block_size < 2:
        raise PipelinesError(f"block size must be at least 2 tokens (got {block_size})")
    fp = _hash({"rows": tokenized._fingerprint, "block_size": block_size, "version": PACKING_VERSION, "what": "pack"})
    folder = Path(cache_dir) if cache_dir else cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / f"pack-{fp}.arrow", folder / f"pack-{fp}.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return PackResult(datasets.Dataset.from_file(str(path)), meta["n_tokens"], meta["n_blocks"], meta["remainder"])

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=block_size)})
    tmp = folder / f".pack-{fp}.{os.getpid()}.tmp"
    n_tokens = n_blocks = 0
    carry = np.empty(0, dtype=np.int32)
    with ArrowWriter(features=features, path=str(tmp)) as writer:
        for batch in tokenized.with_format("arrow").iter(batch_size=batch_rows):
            flat = batch.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            n_tokens += len(flat)
            buf = np.concatenate([carry, flat.astype(np.int32, copy=False)])
            n = len(buf) // block_size
            if n:
                blocks = pa.FixedSizeListArray.from_arrays(pa.array(buf[: n * block_size]), block_size)
                writer.write_table(pa.table({"input_ids": blocks}))
                n_blocks += n
            carry = buf[n * block_size :]
        writer.finalize()
    if n_blocks == 0:
        tmp.unlink(missing_ok=True)
        raise PipelinesError(
            f"the split has {n_tokens} tokens, fewer than one block of {block_size}: lower context_length "
            "or give more text"
        )
    os.replace(tmp, path)
    meta = {"n_tokens": n_tokens, "n_blocks": n_blocks, "remainder": len(carry)}
    meta_path.write_text(json.dumps(meta))
    return PackResult(datasets.Dataset.from_file(str(path)), **meta)


def token_counts(tokenized, vocab_size: int, batch_rows: int = 10_000):
    """How often each id occurs in a tokenised split (numpy int64 array of length vocab_size)."""
    import numpy as np

    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in tokenized.with_format("arrow").iter(batch_size=batch_rows):
        flat = batch.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_nll(train_counts, targets) -> tuple[float, int]:
    """Summed NLL (nats) and count of `targets` (int ids) under the add-one-smoothed unigram model of
    `train_counts`: the 'knows only word frequencies' baseline a trained LM must clearly beat."""
    import numpy as np

    targets = np.asarray(targets, dtype=np.int64)
    logp = np.log(train_counts + 1.0) - np.log(train_counts.sum() + len(train_counts))
    return float(-logp[targets].sum()), int(len(targets))
