"""Fingerprints: what makes a stage's output valid.

A stage's fingerprint hashes its type, its stage version, its typed config and the fingerprints of
its inputs (data files by content, earlier stages by their own fingerprints, local model folders the
config names by content). Change any of those
and the stage (and everything downstream, transitively) is stale; change nothing and it is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

_HASH_CACHE: dict[tuple, str] = {}
_CACHE_FILE = Path(os.environ.get("PIPELINES_CACHE", Path.home() / ".cache" / "pipelines")) / "file-hashes.json"
_disk_cache: dict | None = None
_unsaved = 0  # new entries not yet written to _CACHE_FILE
_batch_depth = 0


@contextlib.contextmanager
def batched_cache():
    """Hash many files, write the on-disk cache once at the end (rewriting it after each of 70,000 image
    files made fingerprinting an image folder quadratic: an hour and tens of GB written)."""
    global _batch_depth
    _batch_depth += 1
    try:
        yield
    finally:
        _batch_depth -= 1
        if _batch_depth == 0:
            _save_disk_cache()


def _save_disk_cache() -> None:
    global _unsaved
    if not _unsaved or _disk_cache is None:
        return
    try:
        _CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_disk_cache))
        os.replace(tmp, _CACHE_FILE)
        _unsaved = 0
    except OSError:
        pass  # a read-only home only costs re-hashing


def _load_disk_cache() -> dict:
    global _disk_cache
    if _disk_cache is None:
        try:
            _disk_cache = json.loads(_CACHE_FILE.read_text())
        except (OSError, ValueError):
            _disk_cache = {}
    return _disk_cache


def hash_file(path: str | Path) -> str:
    """sha256 of a file's bytes. Cached by (path, size, mtime_ns) in memory and on disk, so that
    re-running a finished recipe on large data does not re-read it (mtime changes force a re-hash)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    disk = _load_disk_cache()
    skey = "|".join(map(str, key))
    if skey in disk:
        _HASH_CACHE[key] = disk[skey]
        return disk[skey]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _HASH_CACHE[key] = digest
    disk[skey] = digest
    global _unsaved
    _unsaved += 1
    if _batch_depth == 0:
        _save_disk_cache()
    return digest


def hash_tree(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (by path relative to it, so a moved folder keeps
    its hash). Hidden entries (.git, .cache, .gitattributes) are left out: they change without the
    model changing. Each file goes through hash_file's cache, so an unchanged folder costs a stat per file."""
    root = Path(path).resolve()
    if root.is_file():
        return hash_file(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    with batched_cache():
        return hash_obj(sorted((f.relative_to(root).as_posix(), hash_file(f)) for f in files))


def hash_obj(obj: Any) -> str:
    """sha256 of a JSON-able object, key order independent."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_fingerprint(stage_type: str, version: str, config: dict, inputs: dict[str, str], seed: int) -> str:
    """The one function that decides whether a stage's output is still valid."""
    return hash_obj(
        {"type": stage_type, "version": version, "config": config, "inputs": inputs, "seed": seed}
    )[:16]
