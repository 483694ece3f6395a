"""What the prepare stage finds in our data cards: duplicates within each split and overlap between splits,
measured only (nothing removed: `splits: []`, `decontaminate.action: report`), through the real runner.

    python bench/prepare_overlap.py                       # every shipped card whose files are here
    python bench/prepare_overlap.py data_cards/sst2.yaml  # chosen cards

Prints one table row per card: rows per split, exact / near duplicates within train, and how many
validation / test rows repeat a train row (exact + near + 13-gram), with how many of those share the label.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def measure(card: Path, work: Path) -> dict:
    from pipelines import runner
    from pipelines.recipe import load_recipe

    recipe = work / f"{card.stem}.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "overlap", "output_dir": str(work / card.stem), "data": {"d": str(card)},
        "stages": [{"name": "prep", "type": "prepare", "data": "d",
                    "config": {"splits": [], "decontaminate": {"action": "report"}}}]}))
    t0 = time.time()
    runner.run(load_recipe(recipe), echo=lambda *a, **k: None)
    m = json.loads((work / card.stem / "prep/manifest.json").read_text())
    m["seconds_total"] = time.time() - t0
    return m


def row(card: Path, m: dict) -> str:
    sp, ov = m["info"]["splits"], m["info"]["overlap"]
    rows = "/".join(f"{sp[s]['rows_in']:,}" if s in sp else "-" for s in ("train", "validation", "test"))

    def cell(key):
        o = ov.get(key)
        if not o:
            return "-"
        same = f", same label {o['same_label']}" if o.get("same_label") is not None and o["found"] else ""
        return f"{o['found']:,} of {o['rows']:,} ({o['share']:.1%}: {o['exact']}/{o['near']}/{o['ngram']}{same})"

    f = sp["train"]["found"] if "train" in sp else None
    dup = f"{f.get('exact_duplicate', 0):,} / {f.get('near_duplicate', 0):,}" if f is not None else "-"
    return (f"| {card.name} | {rows} | {dup} | {cell('validation_in_train')} | {cell('test_in_train')} | "
            f"{m['seconds_total']:.1f} |")


def main(argv: list[str]) -> int:
    from pipelines.data import load_card
    from pipelines.errors import PipelinesError

    cards = [Path(a) for a in argv] or sorted((ROOT / "data_cards").glob("*.yaml"))
    print("| card | rows train/val/test | train exact / near duplicates | validation rows in train "
          "(exact/near/13-gram) | test rows in train (exact/near/13-gram) | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for card in cards:
            if card.name == "TEMPLATE.yaml":
                continue
            try:
                load_card(card)
                m = measure(card.resolve(), Path(tmp))
            except PipelinesError as e:
                print(f"| {card.name} | skipped: {str(e).splitlines()[0][:120]} |")
                continue
            print(row(card, m), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
