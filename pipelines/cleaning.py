"""Row-level data cleaning primitives used by the prepare stage: text normalisation for matching, exact
and near-duplicate (MinHash LSH, datasketch) indexes, long-document n-gram overlap, and the junk
measures behind the filters. Pure functions and small classes, tested on known values without a stage.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Callable, Iterable

NORMALIZE_STEPS = ("nfkc", "lowercase", "punctuation", "digits", "whitespace")
_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_DIGITS = re.compile(r"\d", re.UNICODE)
_SPACE = re.compile(r"\s+", re.UNICODE)


def normalizer(steps: Iterable[str]) -> Callable[[str], str]:
    """text -> the form rows are compared in. Steps (applied in NORMALIZE_STEPS order): nfkc (Unicode
    compatibility forms: full-width letters, ligatures), lowercase, punctuation (dropped), digits (dropped:
    'Qt 5 module' == 'Qt 6 module'), whitespace (runs collapsed to one space, ends trimmed)."""
    wanted = set(steps)
    unknown = wanted - set(NORMALIZE_STEPS)
    if unknown:
        raise ValueError(f"unknown normalisation step(s) {sorted(unknown)}; expected {list(NORMALIZE_STEPS)}")

    def norm(text: str) -> str:
        if "nfkc" in wanted:
            text = unicodedata.normalize("NFKC", text)
        if "lowercase" in wanted:
            text = text.lower()
        if "punctuation" in wanted:
            text = _PUNCT.sub(" ", text)
        if "digits" in wanted:
            text = _DIGITS.sub("", text)
        if "whitespace" in wanted:
            text = _SPACE.sub(" ", text).strip()
        return text

    return norm


def digest(data: str | bytes) -> str:
    """The one content hash of rows (blake2b, 128 bits)."""
    return hashlib.blake2b(data.encode("utf-8") if isinstance(data, str) else data, digest_size=16).hexdigest()


def shingles(text: str, unit: str, n: int) -> set[bytes]:
    """The set a row's near-duplicate similarity is measured on: character n-grams (unit "chars", robust for
    short rows such as sentences or product names) or word n-grams ("words", for documents). A text shorter
    than n units is one shingle."""
    if unit == "words":
        items = text.split()
        grams = {" ".join(items[i:i + n]) for i in range(len(items) - n + 1)} if len(items) >= n else {" ".join(items)}
    else:
        grams = {text[i:i + n] for i in range(len(text) - n + 1)} if len(text) >= n else {text}
    return {g.encode("utf-8") for g in grams if g}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearIndex:
    """MinHash LSH over shingle sets (datasketch): candidates come from the LSH bands, then are kept only if
    their estimated Jaccard similarity (MinHash agreement) reaches `threshold`. Keys are whatever the caller
    uses to find a row again."""

    def __init__(self, threshold: float, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.seed = seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.hashes: dict = {}

    def minhash(self, grams: set[bytes]):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(grams))
        return m

    def add(self, key, m) -> None:
        self.lsh.insert(key, m, check_duplication=False)
        self.hashes[key] = m

    def best(self, m) -> tuple[object, float] | None:
        """The most similar indexed row at or over the threshold, with its estimated Jaccard similarity."""
        found = None
        for key in self.lsh.query(m):
            sim = m.jaccard(self.hashes[key])
            if sim >= self.threshold and (found is None or sim > found[1]):
                found = (key, sim)
        return found


def word_ngrams(text: str, n: int) -> set[str]:
    words = text.split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def non_printable_share(text: str) -> float:
    """Share of characters that are control / format / private-use / unassigned code points or U+FFFD (the
    replacement character of a bad decode); newline and tab count as printable."""
    if not text:
        return 0.0
    bad = sum(1 for c in text if c == "\ufffd" or (unicodedata.category(c)[0] == "C" and c not in "\n\t\r"))
    return bad / len(text)


def histogram(values: list[float], bins: int | list[float] = 20) -> dict:
    """{edges, counts} of values for a report (numpy's bins; give another histogram's edges to compare the
    two bar by bar); empty input -> no bins."""
    import numpy as np

    if not values or (isinstance(bins, list) and not bins):
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return {"edges": [round(float(e), 3) for e in edges], "counts": [int(c) for c in counts]}
