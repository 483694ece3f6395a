"""Makes the committed samples of the multi-label, image-classification and summarisation tasks, and (with
--full DIR) the full-size versions the full-size recipes read. Deterministic: re-running reproduces the
files byte for byte. Run from the repository root:

    python data/make_task_samples.py                     # data/{wnut17_entity_types,fashion_mnist,aclsum}_sample/
    python data/make_task_samples.py --full ../shared_derived   # + full-size sets (not committed)

Sources (see data/README.md for licenses):
  wnut17_entity_types  /work/shared/datasets/wnut17/*.conll (WNUT-17, CC BY 4.0): each sentence's text and the
                       set of entity types its BIO tags mention (multi-label, possibly none)
  fashion_mnist        Debian package dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Zalando SE, MIT/Expat):
                       `apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*_all.deb X`,
                       then --fashion-mnist X/usr/share/datasets/fashion-mnist (the original IDX .gz files)
  aclsum               PyPI wheel aclsum==0.1.2 (MIT; paper text from the ACL Anthology): `pip download --no-deps
                       aclsum==0.1.2 && unzip aclsum-0.1.2-py3-none-any.whl 'aclsum/dataset/*'`, then
                       --aclsum aclsum/dataset. Sample: papers of 2016 and later only (ACL Anthology: CC BY 4.0)
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import struct
from pathlib import Path

SHARED = Path("/work/shared/datasets")
DATA = Path("data")
FASHION = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
TYPES = ["corporation", "creative-work", "group", "location", "person", "product"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- WNUT-17 entity types (multi-label)


def conll_sentences(path: Path) -> list[tuple[list[str], list[str]]]:
    out, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            if words:
                out.append((words, tags))
                words, tags = [], []
            continue
        fields = [f for f in (line.split("\t") if "\t" in line else line.split()) if f.strip()]
        words.append(fields[0].strip())
        tags.append(fields[-1].strip())
    if words:
        out.append((words, tags))
    return out


def entity_types(split_file: Path) -> list[dict]:
    rows = []
    for words, tags in conll_sentences(split_file):
        kinds = sorted({t.split("-", 1)[1] for t in tags if t.startswith("B-")})
        rows.append({"text": " ".join(words), "labels": kinds})
    return rows


def make_wnut17_entity_types(out: Path, sample: bool) -> None:
    files = {"train": "train.conll", "validation": "dev.conll", "test": "test.conll"}
    take = {"train": 800, "validation": 200, "test": 200}
    for split, name in files.items():
        rows = entity_types(SHARED / "wnut17" / name)
        write_jsonl(out / f"{split}.jsonl", rows[: take[split]] if sample else rows)


# ---------------------------------------------------------------- Fashion-MNIST (image classification)


def idx(path: Path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return [data[16 + i * rows * cols: 16 + (i + 1) * rows * cols] for i in range(n)], (cols, rows)
    return list(data[8: 8 + n]), None


def write_png(path: Path, pixels: bytes, size) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("L", size, pixels).save(path, format="PNG", optimize=True)


def make_fashion_mnist(src: Path, out: Path, sample: bool) -> None:
    train_x, size = idx(src / "train-images-idx3-ubyte.gz")
    train_y, _ = idx(src / "train-labels-idx1-ubyte.gz")
    test_x, _ = idx(src / "t10k-images-idx3-ubyte.gz")
    test_y, _ = idx(src / "t10k-labels-idx1-ubyte.gz")
    if sample:  # per class: 40 train + 10 validation from the train file, 10 test from t10k (first ones)
        plan = {"train": (train_x, train_y, 0, 40), "validation": (train_x, train_y, 40, 50), "test": (test_x, test_y, 0, 10)}
        for split, (xs, ys, lo, hi) in plan.items():
            seen = [0] * 10
            for i, (x, y) in enumerate(zip(xs, ys)):
                if lo <= seen[y] < hi:
                    write_png(out / split / FASHION[y] / f"{i:05d}.png", x, size)
                seen[y] += 1
        return
    for split, xs, ys in (("train", train_x, train_y), ("test", test_x, test_y)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            write_png(out / split / FASHION[y] / f"{i:05d}.png", x, size)


# ---------------------------------------------------------------- ACLSum (summarisation)


def detok(sentences: list[str]) -> str:
    text = " ".join(sentences)
    text = re.sub(r" ([,.;:!?%)\]}])", r"\1", text)
    text = re.sub(r"([(\[{]) ", r"\1", text)
    return re.sub(r" (n't|'s|'re|'ve|'ll|'d)\b", r"\1", text)


def year(paper_id: str) -> int:
    m = re.match(r"^(\d{4})\.", paper_id) or re.match(r"^[A-Z](\d{2})-", paper_id)
    y = int(m.group(1))
    return y if y > 1900 else (1900 + y if y > 50 else 2000 + y)


def make_aclsum(src: Path, out: Path, sample: bool) -> None:
    """document = the paper's abstract; summary = ACLSum's expert challenge + approach + outcome sentences."""
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = []
        for line in (src / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if sample and year(r["id"]) < 2016:  # ACL Anthology: CC BY 4.0 from 2016 on (CC BY-NC-SA 3.0 before)
                continue
            s = r["summary"]
            rows.append({"id": r["id"], "document": detok(r["sentences"]["abstract"]),
                         "summary": " ".join(s[k].strip() for k in ("challenge", "approach", "outcome"))})
        write_jsonl(out / f"{split}.jsonl", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fashion-mnist", type=Path, default=Path("/tmp/mldata/dataset-fashion-mnist/extracted/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--aclsum", type=Path, default=Path("/tmp/sumdata/aclsum/ext/aclsum/dataset"))
    ap.add_argument("--full", type=Path, help="also write the full-size sets under this folder")
    a = ap.parse_args()
    random.seed(0)
    make_wnut17_entity_types(DATA / "wnut17_entity_types_sample", sample=True)
    make_fashion_mnist(a.fashion_mnist, DATA / "fashion_mnist_sample", sample=True)
    make_aclsum(a.aclsum, DATA / "aclsum_sample", sample=True)
    if a.full:
        make_wnut17_entity_types(a.full / "wnut17_entity_types", sample=False)
        make_fashion_mnist(a.fashion_mnist, a.full / "fashion_mnist", sample=False)
        make_aclsum(a.aclsum, a.full / "aclsum", sample=False)


if __name__ == "__main__":
    main()
