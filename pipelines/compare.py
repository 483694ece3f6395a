"""`pipelines compare RUN_OR_RECIPE RUN_OR_RECIPE ...`: did my change help? Two or more runs side by side,
without a tracking server.

Each argument is a recipe (its output_dir is the run) or a run directory (a folder of stage folders with
manifest.json). Writes compare.md and compare.html (same content) with PNG plots into --out (default
./compare): per stage, the config keys whose values differ between the runs, every numeric metric of the
stage in each run (the better value of the stage's main metric marked), and the training curves of the
stage overlaid (loss; each eval metric logged more than once).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.checkpoints import atomic_write_text
from pipelines.errors import PipelinesError
from pipelines.report import _fmt, _num, _series, render_html, render_markdown


class Run:
    def __init__(self, label: str, folder: Path):
        self.label, self.folder = label, folder
        self.stages: dict[str, dict] = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            try:
                self.stages[sub.name] = json.loads((sub / "manifest.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        order = self._recipe_order()
        if order:
            self.stages = {k: self.stages[k] for k in order if k in self.stages} | self.stages

    def _recipe_order(self) -> list[str]:
        import yaml

        for m in self.stages.values():
            try:
                raw = yaml.safe_load((self.folder / m["name"] / "recipe.yaml").read_text(encoding="utf-8"))
                return [s["name"] for s in raw.get("stages", [])]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        return []

    def history(self, stage: str) -> list[dict]:
        try:
            h = json.loads((self.folder / stage / "log_history.json").read_text(encoding="utf-8"))
            return h if isinstance(h, list) else []
        except (OSError, ValueError):
            return []


def resolve(arg: str) -> tuple[str, Path]:
    """(label, run folder) of a recipe file or a run directory."""
    p = Path(arg)
    if p.is_file():
        from pipelines.recipe import load_recipe

        recipe = load_recipe(p, check_data=False)
        return recipe.name, recipe.output_dir
    if p.is_dir():
        if not any((sub / "manifest.json").is_file() for sub in p.iterdir() if sub.is_dir()):
            raise PipelinesError(f"{p}: no finished stage in this folder (no <stage>/manifest.json); give a run "
                                 "directory (a recipe's output_dir) or a recipe file")
        return p.name, p.resolve()
    raise PipelinesError(f"{arg}: no such file or directory (give recipes or run directories)")


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def plot_overlaid(runs: list[Run], stage: str, out_dir: Path) -> list[tuple[str, Path]]:
    from matplotlib.figure import Figure

    histories = {r.label: h for r in runs if (h := r.history(stage))}
    if len(histories) < 2:
        return []
    keys = sorted({k for h in histories.values() for row in h for k, v in row.items() if _num(v)})
    wanted = [k for k in keys if k == "loss" or (k.startswith("eval_") and not any(
        b in k for b in ("runtime", "per_second", "epoch", "step")))]
    wanted = [k for k in wanted if sum(len(_series(h, k)[0]) > 1 for h in histories.values()) >= 2]
    if not wanted:
        return []
    fig = Figure(figsize=(7, 2.8 * len(wanted)))
    axes = fig.subplots(len(wanted), 1, squeeze=False)[:, 0]
    for ax, k in zip(axes, wanted):
        for label, h in histories.items():
            x, y = _series(h, k)
            if len(x) > 1:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
        ax.set(ylabel=k, title=f"{stage}: {k}")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path = out_dir / f"{stage}_curves.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return [(f"{stage}: curves", path)]


def main_rows(runs: list[Run], stage: str) -> list[list]:
    """One row per (split, model) the stage declared as its output: the task's main metric in each run, the
    best one in bold when they differ (from the manifest's evaluations, not from metric names)."""
    judged = next((r.stages[stage].get("main_metric") for r in runs if r.stages[stage].get("main_metric")), None)
    if not judged:
        return []
    name, up = judged["name"], judged["greater_is_better"]
    found: dict[tuple, dict] = {}
    for r in runs:
        for e in r.stages[stage].get("evaluations") or []:
            if e["role"] == "output" and _num(e["metrics"].get(name)):
                found.setdefault((e["split"], e["model"]), {})[r.label] = e["metrics"][name]
    rows = []
    for (split, model), vals in found.items():
        cells = [vals.get(r.label) for r in runs]
        nums = [v for v in cells if _num(v)]
        best = (max if up else min)(nums) if len(set(nums)) > 1 else None
        rows.append([f"{name} ({model}, {split})",
                     *(f"**{_fmt(v)}**" if best is not None and v == best else _fmt(v) for v in cells)])
    return rows


def compare(args: list[str], out: Path) -> list[Path]:
    if len(args) < 2:
        raise PipelinesError("compare needs two or more runs (recipes or run directories)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PipelinesError("`pipelines compare` needs matplotlib: pip install 'pipelines[report]'") from None
    resolved = [resolve(a) for a in args]
    labels = [lab for lab, _ in resolved]
    if len(set(labels)) < len(labels):  # same recipe name: tell them apart by folder
        labels = [f"{lab} ({folder.parent.name}/{folder.name})" for lab, folder in resolved]
    runs = [Run(lab, folder) for lab, (_, folder) in zip(labels, resolved)]
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for old in plots.glob("*.png"):
        old.unlink()
    blocks: list[tuple] = [("h1", "Compare: " + " vs ".join(r.label for r in runs)),
                           ("p", "Runs: " + "; ".join(f"{r.label} = `{r.folder}`" for r in runs) + ".")]
    names = list(dict.fromkeys(n for r in runs for n in r.stages))
    written = []
    for stage in names:
        have = [r for r in runs if stage in r.stages]
        blocks.append(("h2", f"{stage}" + ("" if len(have) == len(runs) else
                                           f" (only in {', '.join(r.label for r in have)})")))
        configs = {r.label: flatten(r.stages[stage].get("config")) for r in have}
        keys = sorted({k for c in configs.values() for k in c})
        differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs.values()}) > 1]
        if differ:
            blocks.append(("table", ["config key", *configs], [[k, *(_fmt(c.get(k)) for c in configs.values())] for k in differ]))
        elif len(have) > 1:
            blocks.append(("p", "Same config in every run" + (
                " and the same fingerprint (inputs unchanged)." if len({r.stages[stage]["fingerprint"] for r in have}) == 1
                else "; the fingerprints differ: an input (data, upstream stage, seed, version) changed.")))
        metrics = {r.label: {k: v for k, v in (r.stages[stage].get("metrics") or {}).items() if _num(v)} for r in have}
        mkeys = list(dict.fromkeys(k for m in metrics.values() for k in m))
        rows = main_rows(have, stage)
        rows += [[k, *(_fmt(m.get(k)) for m in metrics.values())] for k in mkeys]
        rows.append(["seconds", *(_fmt(r.stages[stage].get("seconds")) for r in have)])
        blocks.append(("table", ["metric", *metrics], rows))
        for title, path in plot_overlaid(have, stage, plots):
            blocks.append(("img", title, path.relative_to(out).as_posix()))
            written.append(path)
    atomic_write_text(out / "compare.md", render_markdown(blocks))
    atomic_write_text(out / "compare.html", render_html(blocks, "compare"))
    return [out / "compare.md", out / "compare.html", *written]
