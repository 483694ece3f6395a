"""`pipelines report RECIPE`: one page about a run, from the runner's status and the stages' manifests.

Writes <output_dir>/report/report.md and report.html (same content) with PNG plots beside them:
  - the recipe as a picture: the stage graph (inputs and prepared data as arrows), each stage coloured by its
    state with its time and main metric;
  - every stage: state, time, metrics; per-class F1 bars and a confusion-matrix heatmap for each split report
    that has them (`<split>_report` in the manifest's info: f1_per_class / f1_per_type / f1_per_label,
    confusion_matrix);
  - training stages (those with <stage>/log_history.json, written by pipelines.training.write_log_history):
    loss curves (every *loss* key: train loss, eval_loss, distillation terms), the learning rate, and the
    eval_* metrics against the step; for a language model (train_tokens, steps, unigram_perplexity in its
    metrics) the loss against tokens seen with the unigram baseline as a line;
  - `lr: auto`: the learning-rate range test's loss against the lr, with the lr it picked;
  - a sweep (pipelines.sweep): its trials (state, parameters, value) and Optuna's own plots (optimization
    history, parameter importances, slices);
  - predictions worth reading: a stage's wrong predictions (predictions_<split>.jsonl), most confident first;
  - model vs baseline: every stage's model beside the task's trivial baselines on the same split, by the
    task's main metric, as bars (one panel per metric) and a table saying plainly when the model does not beat them;
  - data preparation (a stage whose info has `splits` and `overlap`): rows in / out per split and reason, the
    overlap between splits, input-length histograms before / after;
  - a compression table of every stage that declares a reference and an output model with size and
    latency (distill: teacher / student, quantize: fp32 / quantized, ...): their metrics, parameters,
    MB on disk, latency, and speedup / retained / size ratio of the output against the reference; and the
    trade-off chart: every such model's main metric against latency, marker size = MB, the Pareto front.
What is compared comes from the `evaluations` each stage declares in its manifest (pipelines.stage.Evaluation),
never from metric names.
TensorBoard event files (train.report_to: [tensorboard]) are in <stage>/logs: the report names the folder.

matplotlib is imported only here, through its object API (no pyplot state, Agg canvas).
"""

from __future__ import annotations

import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path

from pipelines import sweep as sweeps
from pipelines.checkpoints import atomic_write_text

BOOKKEEPING = ("runtime", "per_second", "flos", "epoch", "step")


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


# ---------------------------------------------------------------- plots


def _series(history: list[dict], key: str) -> tuple[list, list]:
    pts = [(h["step"], h[key]) for h in history if key in h and "step" in h and _num(h[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def eval_panels(history: list[dict]) -> list[list[str]]:
    """The eval_* metrics worth a curve, grouped into panels: the scores in [0, 1] (accuracy, F1, AUC...) share
    one, any other metric (perplexity, BLEU, lengths) gets its own. A metric evaluated at a single step is a
    number for the tables, not a curve (the Trainer's last evaluation and a stage's final one share a step)."""
    keys = sorted({k for h in history for k, v in h.items() if k.startswith("eval_") and _num(v)})
    keys = [k for k in keys if "loss" not in k and not any(b in k for b in BOOKKEEPING)
            and len(set(_series(history, k)[0])) > 1]
    scores = [k for k in keys if all(0 <= v <= 1 for v in _series(history, k)[1])]
    return ([scores] if scores else []) + [[k] for k in keys if k not in scores]


def plot_history(history: list[dict], out_dir: Path, stage: str) -> list[tuple[str, Path]]:
    """PNG plots of a Trainer log_history: [(title, path)] for the ones with data."""
    from matplotlib.figure import Figure

    keys = sorted({k for h in history for k, v in h.items() if _num(v)})
    # train_loss is the run's final average (one point), not a curve
    loss_keys = sorted((k for k in keys if "loss" in k and k != "train_loss" and not any(b in k for b in BOOKKEEPING)),
                       key=lambda k: (k != "loss", k))
    panels = eval_panels(history)
    plots = []

    def save(fig, name: str, title: str):
        path = out_dir / f"{stage}_{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plots.append((title, path))

    if loss_keys:
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for k in loss_keys:
            x, y = _series(history, k)
            ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=k)
        ax.set(xlabel="step", ylabel="loss", title=f"{stage}: loss")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss", "loss")
    x, y = _series(history, "learning_rate")
    if x:
        fig = Figure(figsize=(7, 3))
        ax = fig.subplots()
        ax.plot(x, y)
        ax.set(xlabel="step", ylabel="learning rate", title=f"{stage}: learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        save(fig, "lr", "learning rate")
    if panels:
        fig = Figure(figsize=(7, 2.8 * len(panels)))
        axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, group in zip(axes, panels):
            for k in group:
                x, y = _series(history, k)
                ax.plot(x, y, marker="o", markersize=3, label=k[len("eval_"):])
            ax.set(ylabel=group[0] if len(group) == 1 else "score", title=f"{stage}: {', '.join(group)}"
                   if len(group) == 1 else f"{stage}: evaluation scores")
            if len(group) > 1:
                ax.legend(fontsize=8, ncol=min(3, len(group)))
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        save(fig, "eval", "evaluation metrics")
    return plots


def plot_lr_range(found: dict, out_dir: Path, stage: str) -> Path | None:
    """The learning-rate range test of `lr: auto` (pipelines.training.lr_range_test): smoothed loss against the lr
    (log scale), the lr picked and torch-lr-finder's steepest-descent point marked."""
    from matplotlib.figure import Figure

    if not found or not found.get("lrs"):
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(found["lrs"], found["losses"])
    ax.set_xscale("log")
    ax.axvline(found["lr"], color="tab:green", linestyle="--", label=f"picked {found['lr']:.3g} ({found['rule']})")
    if found.get("steepest_lr"):
        ax.axvline(found["steepest_lr"], color="tab:grey", linestyle=":", label=f"steepest descent {found['steepest_lr']:.3g}")
    ax.set(xlabel="learning rate", ylabel="smoothed train loss", title=f"{stage}: learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out_dir / f"{stage}_lr_range.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_tokens(history: list[dict], metrics: dict, out_dir: Path, stage: str) -> Path | None:
    """Language-model loss against tokens seen, with the unigram baseline's loss (ln of its perplexity) as a
    line: for a stage whose metrics have train_tokens, steps and unigram_perplexity (pretrain)."""
    from matplotlib.figure import Figure

    if not all(_num(metrics.get(k)) for k in ("train_tokens", "steps", "unigram_perplexity")) or not metrics["steps"]:
        return None
    per_step = metrics["train_tokens"] / metrics["steps"]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    drawn = 0
    for key in ("loss", "eval_loss"):
        x, y = _series(history, key)
        if x:
            ax.plot([s * per_step for s in x], y, marker="o" if len(x) < 30 else None, markersize=3, label=key)
            drawn += 1
    if not drawn:
        return None
    ax.axhline(math.log(metrics["unigram_perplexity"]), color="k", ls="--", lw=1,
               label=f"unigram baseline (ppl {metrics['unigram_perplexity']:.4g})")
    ax.set(xlabel="tokens seen", ylabel="loss (nats / token)", title=f"{stage}: loss against tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / f"{stage}_tokens.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


STATE_COLOURS = {"done": "#b7e1b0", "stale": "#f6d58e", "partial": "#a9c8f0", "failed": "#f2a3a3", "pending": "#dddddd"}


def plot_graph(recipe, rows: list[dict], out_dir: Path) -> Path:
    """The recipe as a picture: stages in columns by depth (inputs and prepared data as arrows), each box
    coloured by its state, with its type, time and main metric."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    by_name = {r["name"]: r for r in rows}
    depth: dict[str, int] = {}
    for st in recipe.stages:
        depth[st.name] = 1 + max((depth[u] for u in st.upstream if u in depth), default=-1)
    columns: dict[int, list[str]] = {}
    for st in recipe.stages:
        columns.setdefault(depth[st.name], []).append(st.name)
    n_cols, n_rows = len(columns), max(len(v) for v in columns.values())
    pos = {name: (c * 3.8, -(i - (len(names) - 1) / 2) * 1.7) for c, names in columns.items() for i, name in enumerate(names)}
    fig = Figure(figsize=(max(6, 3.0 * n_cols), max(2.2, 1.4 * n_rows + 0.8)))
    ax = fig.subplots()
    w, h = 3.0, 1.2
    for st in recipe.stages:
        for u in st.upstream:
            (x0, y0), (x1, y1) = pos[u], pos[st.name]
            skip = depth[st.name] - depth[u] > 1  # an edge over a column bends around the boxes between
            ax.annotate("", xy=(x1 - w / 2, y1), xytext=(x0 + w / 2, y0),
                        arrowprops={"arrowstyle": "->", "color": "#555", "lw": 1.2,
                                    "connectionstyle": f"arc3,rad={-0.35 if skip else 0}"})
    for st in recipe.stages:
        r, (x, y) = by_name[st.name], pos[st.name]
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                    fc=STATE_COLOURS.get(r["state"], "#eee"), ec="#333"))
        main = _main_value(r)
        lines = [f"{st.name} ({st.type})", f"{r['state']}" + (f", {r['seconds']:.0f} s" if _num(r.get("seconds")) else "")]
        if main:
            lines.append(main)
        ax.text(x, y, "\n".join(lines), ha="center", va="center", fontsize=8)
    xs, ys = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
    ax.set_xlim(min(xs) - w, max(xs) + w)
    ax.set_ylim(min(ys) - h * 1.2, max(ys) + h * 1.2)
    ax.axis("off")
    ax.set_title(f"{recipe.name}: stages (arrows: inputs)")
    path = out_dir / "recipe_graph.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def _main_value(row: dict) -> str:
    """'accuracy 0.82' from a stage's baseline verdicts (the task's main metric on its first split)."""
    v = (row.get("baselines") or [None])[0]
    return f"{v['metric']} {_fmt(v['value'])} ({v['split']})" if v else ""


def plot_classes(report: dict, out_dir: Path, stage: str, split: str) -> Path | None:
    """Per-class F1 bars and the confusion matrix as a heatmap, from a classification report of a split."""
    from matplotlib.figure import Figure

    # classes (classification), entity types (token classification), labels (multi-label)
    unit = next((u for u in ("class", "type", "label") if report.get(f"f1_per_{u}")), None)
    per = report.get(f"f1_per_{unit}") if unit else None
    cm, labels = report.get("confusion_matrix"), report.get("labels")
    if not per and not cm:
        return None
    panels = (1 if per else 0) + (1 if cm and labels else 0)
    fig = Figure(figsize=(6 * panels, max(3, 0.35 * len(per or labels or []) + 1.5)))
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    if per:
        ax = axes.pop(0)
        names = list(per)
        ax.barh(names, [per[n] for n in names], color="#4c72b0")
        ax.set(xlim=(0, 1), xlabel="F1", title=f"{stage}: F1 per {unit} ({split})")
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    if cm and labels:
        import numpy as np

        ax = axes.pop(0)
        m = np.asarray(cm, dtype=float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xlabel="predicted", ylabel="true",
               title=f"{stage}: confusion ({split}; rows sum to 1)")
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
        if len(labels) <= 12:
            for i in range(len(labels)):
                for j in range(len(labels)):
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    path = out_dir / f"{stage}_{split}_classes.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def tradeoff_points(manifests: list[dict]) -> tuple[str | None, bool, list[tuple]]:
    """(metric, greater_is_better, [(latency ms, metric value, MB, label)]) of every model of the run scored with a
    latency on validation.

    Latencies are only comparable within one stage (each stage times its reference and its output side by side,
    in one process; two stages run minutes apart on a machine whose load moves). So a stage whose reference is a
    model already drawn (the quantize stage's fp32 model = the distill stage's student) is put on that model's
    clock: its models at the drawn latency times the ratio the stage measured against its own reference."""
    points, placed = [], {}  # placed: model folder (or stage:model) -> the latency it is drawn at
    metric, up = None, True
    for m in manifests:
        judged = m.get("main_metric")
        if not judged:
            continue
        evs = [e for e in m.get("evaluations") or [] if e["role"] != "baseline" and _num(e.get("latency_ms"))
               and e["split"] == "validation" and _num(e["metrics"].get(judged["name"]))]
        if not evs or (metric and judged["name"] != metric):
            continue
        metric, up = judged["name"], judged["greater_is_better"]
        key = lambda e: e.get("folder") or f"{m['name']}:{e['model']}"  # noqa: E731
        ref = next((e for e in evs if e["role"] == "reference" and key(e) in placed), None)
        scale = placed[key(ref)] / ref["latency_ms"] if ref is not None and ref["latency_ms"] else 1.0
        for e in evs:
            if key(e) in placed:
                continue
            placed[key(e)] = e["latency_ms"] * scale
            points.append((placed[key(e)], e["metrics"][judged["name"]], e.get("size_mb") or 1.0, f"{m['name']}: {e['model']}"))
    return metric, up, points


def plot_tradeoff(manifests: list[dict], out_dir: Path) -> Path | None:
    """Every model of the run scored with a latency (references and compressed outputs), on one task's main
    metric (`tradeoff_points`): metric against latency, marker area by MB on disk, the Pareto front drawn."""
    from matplotlib.figure import Figure

    metric, up, points = tradeoff_points(manifests)
    if len(points) < 2:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    sizes = [max(p[2], 0.1) for p in points]
    scale = 600 / max(sizes)
    for (lat, val, mb, label), sz in zip(points, sizes):
        ax.scatter(lat, val, s=30 + sz * scale, alpha=0.6)
        ax.annotate(f"{label}\n{mb:.1f} MB", (lat, val), fontsize=7, xytext=(5, 5), textcoords="offset points")
    front, best = [], None
    for lat, val, _, _ in sorted(points):
        if best is None or (val > best if up else val < best):
            front.append((lat, val))
            best = val
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto front")
    ax.set(xlabel="latency (ms per batch; a later stage's models at its measured ratio to its input model)",
           ylabel=f"{metric} (validation)", title="compression trade-off")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / "tradeoff.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def plot_lengths(lengths: dict, out_dir: Path, stage: str) -> Path | None:
    """Histogram of input length (words) per split, before and after a data-preparation stage."""
    from matplotlib.figure import Figure

    splits = [s for s, h in lengths.items() if h["before"]["counts"]]
    if not splits:
        return None
    fig = Figure(figsize=(7, 2.4 * len(splits)))
    axes = fig.subplots(len(splits), 1, squeeze=False)[:, 0]
    for ax, split in zip(axes, splits):
        for key, style in (("before", {"alpha": 0.4, "label": "before"}), ("after", {"histtype": "step", "label": "after",
                                                                                     "linewidth": 1.5})):
            h = lengths[split][key]
            if h["counts"]:
                ax.hist(h["edges"][:-1], bins=h["edges"], weights=h["counts"], **style)
        ax.set(ylabel="rows", title=f"{stage}: {split} length (words)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1].set_xlabel("words")
    fig.tight_layout()
    path = out_dir / f"{stage}_lengths.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


REFERENCE_KEYS = ("label", "labels", "tags", "target", "reference")


def worth_reading(folder: Path, n: int = 8) -> tuple[str, list[str], list[list]] | None:
    """(split, columns, rows): the predictions a person should look at first, from the stage's
    predictions_<split>.jsonl (validation preferred): wrong ones, the most confident first where the row has a
    score, else in file order (generated text: every row differs from its reference, so the first ones)."""
    files = sorted(folder.glob("predictions_*.jsonl"), key=lambda p: p.stem != "predictions_validation")
    if not files:
        return None
    rows = []
    with open(files[0], encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 20_000:
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    ref = next((k for k in REFERENCE_KEYS if rows and k in rows[0]), None)
    if ref is None or not rows or "predicted" not in rows[0]:
        return None
    wrong = [r for r in rows if r.get("predicted") != r.get(ref)]
    if any("score" in r for r in wrong):
        wrong.sort(key=lambda r: -(r.get("score") or 0))
    if not wrong:
        return None
    cols = list(rows[0])
    cell = lambda v: (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))  # noqa: E731
    table = [[cell(r.get(c))[:160] for c in cols] for r in wrong[:n]]
    return files[0].stem.removeprefix("predictions_"), cols, table


def preparation_blocks(manifest: dict, folder: Path, plots_dir: Path, out: Path) -> tuple[list, list[Path]]:
    """Rows in / out per split and reason, the overlap between splits and length histograms, for a stage that
    prepared data (its manifest's info has `splits` and `overlap`)."""
    info = manifest.get("info") or {}
    if not ("splits" in info and "overlap" in info):
        return [], []
    blocks: list = [("table", ["split", "rows in", "rows out", "found (removed)"],
                     [[split, _fmt(t["rows_in"]), _fmt(t["rows_out"]),
                       ", ".join(f"{k} {v:,} ({t['removed'].get(k, 0):,})" for k, v in t["found"].items()) or "-"]
                      for split, t in info["splits"].items()])]
    if info["overlap"]:
        blocks.append(("table", ["rows of", "found in", "rows", "found", "share", "exact", "near", "13-gram",
                                 "same label"],
                       [[k.split("_in_")[0], k.split("_in_")[1], _fmt(o["rows"]), _fmt(o["found"]),
                         f"{o['share']:.1%}", o["exact"], o["near"], o["ngram"], _fmt(o.get("same_label"))]
                        for k, o in info["overlap"].items()]))
    blocks.append(("p", f"Splits changed: {', '.join(info.get('changed_splits') or []) or 'none'} (the others are "
                        f"only measured). Every row found: `{folder / 'removed'}/<split>.jsonl`; a sample per reason "
                        f"to read: `{folder / 'removed' / 'samples.md'}`."))
    written = []
    path = plot_lengths(info.get("lengths") or {}, plots_dir, manifest.get("name", "data"))
    if path is not None:
        blocks.append(("img", f"{manifest.get('name')}: length before / after", path.relative_to(out).as_posix()))
        written.append(path)
    return blocks, written


# ---------------------------------------------------------------- compression and baselines


def compression_rows(manifests: list[dict]) -> tuple[list[str], list[dict]]:
    """(columns, rows): the reference and the output model of every stage that declares both with a
    latency, on the first split they were scored on, by the metric the stage is judged on (its task's main one;
    every metric stays in the stage's own section), so that the table fits a page."""
    from pipelines import modelio, tasks

    rows = []
    for m in manifests:
        evs = [e for e in m.get("evaluations") or [] if e["role"] in ("reference", "output") and _num(e.get("latency_ms"))]
        if not m.get("task") or not any(e["role"] == "output" for e in evs) or not any(e["role"] == "reference" for e in evs):
            continue
        split = evs[0]["split"]
        ref = next(e for e in evs if e["role"] == "reference" and e["split"] == split)
        out = next(e for e in evs if e["role"] == "output" and e["split"] == split)
        task = tasks.get(m["task"])
        main = (m.get("main_metric") or {}).get("name") or task.main_metric
        for e in (ref, out):
            row = {"stage": m["name"], "model": e["model"], "split": split,
                   **{k: v for k, v in e["metrics"].items() if k == main and _num(v)},
                   "params": e.get("params"), "size_mb": e.get("size_mb"), "latency_ms": e.get("latency_ms")}
            if e is out:
                row["speedup"] = round(ref["latency_ms"] / out["latency_ms"], 3) if out["latency_ms"] else None
                row["retained"] = modelio.retained(task, out["metrics"], ref["metrics"])
                if _num(ref.get("size_mb")) and out.get("size_mb"):
                    row["size_ratio"] = round(ref["size_mb"] / out["size_mb"], 3)
            rows.append(row)
    if not rows:
        return [], []
    cols = ["stage", "model", "split"]
    for r in rows:
        cols += [k for k in r if k not in cols and k not in ("params", "size_mb", "latency_ms", "speedup", "retained", "size_ratio")]
    cols += [c for c in ("params", "size_mb", "latency_ms", "speedup", "retained", "size_ratio") if any(r.get(c) is not None for r in rows)]
    return cols, rows


def plot_baselines(manifests: list[dict], out_dir: Path) -> Path | None:
    """Each stage's model beside the best of its task's baselines on the same split, by the task's main metric,
    and beside its input model where the stage scored it (teacher, SFT model, fp32 model): one panel per metric
    (accuracy, perplexity, BLEU... are not on one scale), a group of bars per stage and split."""
    from matplotlib.figure import Figure

    from pipelines.stage import baseline_verdicts

    by_metric: dict[tuple[str, bool], list[tuple[str, dict]]] = {}
    for m in manifests:
        up = (m.get("main_metric") or {}).get("greater_is_better", True)
        for v in baseline_verdicts(m):
            by_metric.setdefault((v["metric"], up), []).append((f"{m['name']} ({v['split']})", v))
    if not by_metric:
        return None
    heights = [0.8 * len(rows) + 1.2 for rows in by_metric.values()]
    fig = Figure(figsize=(7, sum(heights)))
    axes = fig.subplots(len(by_metric), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, ((metric, up), rows) in zip(axes, by_metric.items()):
        ys = range(len(rows))
        model = ax.barh([y - 0.27 for y in ys], [v["value"] for _, v in rows], height=0.26,
                        color=["#4c72b0" if v["beats"] else "#c44e52" for _, v in rows])
        ax.bar_label(model, labels=[_fmt(v["value"]) for _, v in rows], fontsize=7, padding=2)
        refs = [(y, v) for y, (_, v) in zip(ys, rows) if "reference" in v]
        if refs:  # the stage's input model, where it was scored: did this stage help or cost?
            ref = ax.barh([y for y, _ in refs], [v["reference_value"] for _, v in refs], height=0.26, color="#9ecae1")
            ax.bar_label(ref, labels=[f"{v['reference']} {_fmt(v['reference_value'])}" for _, v in refs], fontsize=7, padding=2)
        base = ax.barh([y + 0.27 for y in ys], [v["baseline_value"] for _, v in rows], height=0.26, color="#bbbbbb")
        ax.bar_label(base, labels=[f"{v['baseline']} {_fmt(v['baseline_value'])}" for _, v in rows], fontsize=7, padding=2)
        ax.set_yticks(list(ys), [label for label, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(max(v["value"], v["baseline_value"], v.get("reference_value", 0)) for _, v in rows) * 1.4)
        ax.set(xlabel=f"{metric} ({'higher' if up else 'lower'} is better)",
               title=f"{metric}: model (blue; red: does not beat the baseline), its input model (light blue), "
                     "best baseline (grey)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = out_dir / "baselines.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def baseline_rows(manifests: list[dict]) -> list[list]:
    """[stage, split, metric, this model, its input model, best baseline, verdict] for every stage that scored
    baselines."""
    from pipelines.stage import baseline_verdicts

    rows = []
    for m in manifests:
        for v in baseline_verdicts(m):
            ref = f"{v['reference']}: {_fmt(v['reference_value'])}" if "reference" in v else "-"
            rows.append([m["name"], v["split"], v["metric"], _fmt(v["value"]), ref,
                         f"{v['baseline']}: {_fmt(v['baseline_value'])}", "beats it" if v["beats"] else "DOES NOT BEAT IT"])
    return rows


# ---------------------------------------------------------------- the report


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_report(recipe) -> list[Path]:
    """Write report.md, report.html and the plots into <output_dir>/report; returns the files written."""
    from pipelines.runner import plan, status

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from pipelines.errors import PipelinesError

        raise PipelinesError("`pipelines report` needs matplotlib: pip install 'pipelines[report]'") from None
    out = recipe.output_dir / "report"
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):
        old.unlink()
    rows = status(recipe)
    why = {step.stage.name: step.reason for step in plan(recipe) if step.state == "stale"}
    graph = plot_graph(recipe, rows, plots_dir)
    blocks: list[tuple] = [
        ("h1", f"Report: {recipe.name}"),
        ("p", f"Recipe `{recipe.path}`, output `{recipe.output_dir}`, written "
              f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}."),
        ("img", "the recipe: stages by state (green done, amber stale, blue partial, red failed, grey pending)",
         graph.relative_to(out).as_posix()),
        ("h2", "Stages"),
        ("table", ["stage", "type", "state", "time (s)", "key metrics"],
         [[r["name"], r["type"], r["state"], _fmt(r["seconds"]),
           ", ".join(f"{k}={_fmt(v)}" for k, v in list((r["metrics"] or {}).items())[:5] if _num(v))
           or (r.get("error") or "")] for r in rows]),
    ]
    manifests: list[dict] = []
    written: list[Path] = [graph]
    sections: list[tuple] = []  # each stage's own, after the summaries (model vs baseline, compression)
    for r in rows:
        folder = Path(r["output_dir"])
        manifest = _read(folder / "manifest.json") or {}
        metrics = r["metrics"] or {}
        sections.append(("h2", f"{r['name']} ({r['type']}): {r['state']}"))
        if r["state"] == "stale":
            sections.append(("p", f"Stale ({why.get(r['name'], 'the recipe, its data or an upstream stage changed')}) "
                                "since this ran: the numbers below are from the previous run."))
        if r.get("error"):
            sections.append(("p", f"Failed: {r['error']}"))
        if manifest.get("seconds") is not None:
            sections.append(("p", f"Ran in {manifest['seconds']} s"
                                + (f" on {manifest.get('world_size', 1)} process(es)" if manifest.get("world_size", 1) > 1 else "")
                                + (", resumed" if manifest.get("resumed") else "") + "."))
        nums = [(k, v) for k, v in metrics.items() if _num(v)]
        if nums:
            sections.append(("table", ["metric", "value"], [[k, _fmt(v)] for k, v in nums]))
        if manifest and r["state"] in ("done", "stale"):
            manifests.append(manifest)
        if r["state"] in ("done", "stale"):
            more, files = preparation_blocks(manifest, folder, plots_dir, out)
            sections += more
            written += files
            for key, report in (manifest.get("info") or {}).items():
                if key.endswith("_report") and isinstance(report, dict):
                    path = plot_classes(report, plots_dir, r["name"], key[: -len("_report")])
                    if path is not None:
                        sections.append(("img", f"{r['name']}: classes ({key[:-len('_report')]})",
                                       path.relative_to(out).as_posix()))
                        written.append(path)
            worst = worth_reading(folder)
            if worst is not None:
                split, cols, table = worst
                order = "the most confident first" if "score" in cols else "the first ones"
                sections.append(("p", f"Predictions worth reading ({split}, from `{folder}/predictions_{split}.jsonl`): "
                                      f"wrong ones, {order}."))
                sections.append(("table", cols, table))
        if r["state"] in ("done", "stale") and sweeps.describe(manifest):
            sections.append(("p", sweeps.describe(manifest)))
            sections.append(("table", *sweeps.table(manifest)))
            for title, path in sweeps.plot(manifest, folder, plots_dir, r["name"]):
                sections.append(("img", f"{r['name']}: {title}", path.relative_to(out).as_posix()))
                written.append(path)
        lr_plot = plot_lr_range((manifest.get("info") or {}).get("lr_range_test"), plots_dir, r["name"])
        if lr_plot is not None and r["state"] in ("done", "stale"):
            found = manifest["info"]["lr_range_test"]
            sections.append(("p", f"lr: auto picked {found['lr']:.3g}: {found['rule']}, from a range test of "
                                f"{found['steps']} steps."))
            sections.append(("img", f"{r['name']}: learning-rate range test", lr_plot.relative_to(out).as_posix()))
            written.append(lr_plot)
        history = _read(folder / "log_history.json")
        if isinstance(history, list) and history:
            for title, path in plot_history(history, plots_dir, r["name"]):
                sections.append(("img", f"{r['name']}: {title}", path.relative_to(out).as_posix()))
                written.append(path)
            path = plot_tokens(history, metrics, plots_dir, r["name"])
            if path is not None:
                sections.append(("img", f"{r['name']}: loss against tokens seen, unigram baseline as a line",
                               path.relative_to(out).as_posix()))
                written.append(path)
        if (folder / "logs").is_dir() and any((folder / "logs").rglob("events.out.tfevents.*")):
            sections.append(("p", f"TensorBoard: `tensorboard --logdir {folder / 'logs'}`"))
    versus = baseline_rows(manifests)
    if versus:
        blocks.append(("h2", "Model vs baseline"))
        chart = plot_baselines(manifests, plots_dir)
        if chart is not None:
            blocks.append(("img", "model vs best baseline, by each task's main metric", chart.relative_to(out).as_posix()))
            written.append(chart)
        blocks.append(("table", ["stage", "split", "metric", "model", "input model", "best baseline", "verdict"], versus))
        blocks.append(("p", "Each stage's model against the task's trivial baselines (majority class, TF-IDF + logistic "
                            "regression, most frequent tag, copy of the source, lead sentences, unigram LM) fit on the "
                            "train split and scored on the same split, and against the model the stage started from "
                            "where it scored it (a distill's teacher, a preference stage's SFT model, a quantize's "
                            "fp32 model). A model that does not beat the baselines learned less than a trivial one: "
                            "more data, epochs or another learning rate before anything else."))
    cols, comp = compression_rows(manifests)
    if comp:
        blocks.append(("h2", "Compression"))
        blocks.append(("table", cols, [[_fmt(row.get(c)) for c in cols] for row in comp]))
        trade = plot_tradeoff(manifests, plots_dir)
        if trade is not None:
            blocks.append(("img", "compression trade-off: main metric against latency, marker size = MB on disk",
                           trade.relative_to(out).as_posix()))
            written.append(trade)
        blocks.append(("p", "Reference and compressed model as each compression stage measured them, in the same "
                            "process (latency: median ms of one forward pass of a batch; size: weight files on disk). "
                            "Timings come from a shared machine: compare rows of one stage, not across runs."))
    blocks += sections
    md, page = render_markdown(blocks), render_html(blocks, recipe.name)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", page)
    return [out / "report.md", out / "report.html", *written]


def render_markdown(blocks) -> str:
    lines = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            cols, rows = b[1], b[2]
            lines.append("| " + " | ".join(cols) + " |")
            lines.append("|" + "---|" * len(cols))
            lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>") for c in row) + " |"
                      for row in rows]  # a newline (a chat prompt, a generation) would end the table row
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{b[1]}]({b[2]})", ""]
    return "\n".join(lines)


def render_html(blocks, title: str) -> str:
    esc = html.escape
    body = []
    for b in blocks:
        if b[0] in ("h1", "h2"):
            body.append(f"<{b[0]}>{esc(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{esc(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{esc(str(c))}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            body.append(f'<figure><img src="{esc(b[2])}" alt="{esc(b[1])}"><figcaption>{esc(b[1])}</figcaption></figure>')
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left;white-space:pre-wrap}img{max-width:100%}"
             "table{display:block;max-width:100%;overflow-x:auto}")  # a wide table scrolls, the page keeps its width
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
