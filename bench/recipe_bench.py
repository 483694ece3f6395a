"""What the recipe benches (compress_sst2, export_sst2, prune_sst2, quantize_torchao) share: their command line
(--recipe, --threads, --repeats, --skip-run, recipe overrides), running the recipe through the runner (stages
already done are skipped) and reading back every stage's manifest."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def arguments(doc: str, recipe: str, repeats: int, example: str, threads_help: str = "torch threads (default: torch's)"):
    """The parser with the shared options; a bench adds its own before parse_args()."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / recipe))
    ap.add_argument("--threads", type=int, default=None, help=threads_help)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--skip-run", action="store_true", help="only measure what an earlier run left")
    ap.add_argument("overrides", nargs="*", help=f"recipe overrides, e.g. {example}")
    return ap


def run_recipe(a) -> tuple:
    """(recipe, {stage name: manifest}, wall seconds of the run: 0 when skipped or already done), torch's threads set
    from --threads first."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from pipelines import runner
    from pipelines.recipe import load_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    t0 = time.time()
    if not a.skip_run:
        runner.run(recipe)
    wall = time.time() - t0
    manifests = {s.name: json.loads((runner.stage_dir(recipe, s.name) / "manifest.json").read_text()) for s in recipe.stages}
    return recipe, manifests, wall
