"""`pipelines report`: Markdown + HTML + PNG plots from a run's status, manifests and Trainer log history.

The training stage here runs a real (tiny) Trainer through pipelines.training with
`report_to: [tensorboard]`, so the test also proves TensorBoard event files are written."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml

from pipelines.errors import StageFailed
from pipelines.stage import Evaluation, StageConfig, StageDef, StageResult
from tests.test_serve import minilm_tokenizer, tiny_classifier

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a gripping , funny film", "dull and far too long", "great cast", "a mess", "moving and smart", "boring"] * 4


class TinyTrainConfig(StageConfig):
    steps: int = 6


def tiny_train(cfg: TinyTrainConfig, ctx):
    """A real Trainer run on a tiny classifier, set up the way training stages do it."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    from pipelines import training

    folder = tiny_classifier(ctx.output_dir / "init")
    tok = minilm_tokenizer()
    ds = Dataset.from_dict({"text": TEXTS, "label": [i % 2 for i in range(len(TEXTS))]})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    tcfg = training.TrainConfig(max_steps=cfg.steps, batch_size=4, lr=5e-3, logging_steps=1, eval_steps=2,
                                save_steps=100, warmup=2, report_to=["tensorboard"])
    trainer = Trainer(
        model=AutoModelForSequenceClassification.from_pretrained(folder),
        args=training.training_args(tcfg, ctx),
        train_dataset=ds,
        eval_dataset=ds.select(range(8)),
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
    )
    training.train(trainer, ctx)
    training.write_log_history(trainer, ctx)
    return StageResult(metrics={"validation_accuracy": 0.5, "train_loss": trainer.state.log_history[-1].get("train_loss")})


class MetricsConfig(StageConfig):
    metrics: dict = {}
    evaluations: list[dict] = []
    info: dict = {}
    fail: bool = False


def metrics_only(cfg: MetricsConfig, ctx):
    if cfg.fail:
        raise RuntimeError("asked to fail")
    return StageResult(metrics=cfg.metrics, task="classification" if cfg.evaluations else None, info=cfg.info,
                       evaluations=[Evaluation(**e) for e in cfg.evaluations])


FAKES = {
    "tiny_train": StageDef("tiny_train", TinyTrainConfig, tiny_train),
    "fake_metrics": StageDef("fake_metrics", MetricsConfig, metrics_only, inputs={"model": "optional"}),
}


@contextlib.contextmanager
def fake_stages():
    """The fake stage types registered (only those not already there are removed afterwards)."""
    from pipelines.stages import STAGES

    added = [k for k in FAKES if k not in STAGES]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TENSORBOARD_LOGGING_DIR", "")  # training_args sets it; restored afterwards
        STAGES.update(FAKES)
        try:
            yield
        finally:
            for k in added:
                STAGES.pop(k, None)


@pytest.fixture
def stages():
    with fake_stages():
        yield


DISTILL = {"student_accuracy": 0.84, "teacher_accuracy": 0.87, "retained": 0.9655, "student_params": 11_000_000,
           "teacher_params": 22_700_000, "params_ratio": 0.4846, "student_mb": 44.1, "teacher_mb": 90.9,
           "student_ms": 21.5, "teacher_ms": 40.2, "speedup": 1.87}
DISTILL_EV = [
    {"model": "teacher", "role": "reference", "split": "validation", "metrics": {"accuracy": 0.87},
     "params": 22_700_000, "size_mb": 90.9, "latency_ms": 40.2},
    {"model": "student", "role": "output", "split": "validation", "metrics": {"accuracy": 0.84},
     "params": 11_000_000, "size_mb": 44.1, "latency_ms": 21.5},
    {"model": "majority", "role": "baseline", "split": "validation", "metrics": {"accuracy": 0.51}},
]
QUANTIZE_EV = [
    {"model": "fp32", "role": "reference", "split": "validation", "metrics": {"accuracy": 0.84, "f1": 0.84},
     "params": 11_000_000, "size_mb": 44.1, "latency_ms": 21.5},
    {"model": "quantized", "role": "output", "split": "validation", "metrics": {"accuracy": 0.835, "f1": 0.83},
     "params": 11_000_000, "size_mb": 12.0, "latency_ms": 10.1},
    {"model": "tfidf_logreg", "role": "baseline", "split": "validation", "metrics": {"accuracy": 0.86, "f1": 0.85}},
]
QUANTIZE = {"accuracy": 0.835, "f1": 0.83, "fp32_accuracy": 0.84, "fp32_f1": 0.84, "accuracy_delta": -0.005,
            "fp32_mb": 44.1, "quantized_mb": 12.0, "size_ratio": 3.675, "fp32_ms": 21.5, "quantized_ms": 10.1,
            "speedup": 2.13, "params": 11_000_000}


def is_real_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = imread(path)
    assert img.shape[0] > 150 and img.shape[1] > 300, img.shape
    assert img[..., :3].std() > 0.05  # not a blank canvas: axes, lines, text


STUDENT_REPORT = {"f1_per_class": {"negative": 0.82, "positive": 0.86},
                  "confusion_matrix": [[40, 9], [7, 44]], "labels": ["negative", "positive"]}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A run of a recipe with a real tiny Trainer stage, a distill and a quantize stage that declare their
    evaluations (one with a class report), a failed stage and a pending one: (recipe path, run folder).
    Shared by the report tests of this module (made once)."""
    from pipelines import runner
    from pipelines.recipe import load_recipe

    tmp_path = tmp_path_factory.mktemp("report_demo")
    doc = {
        "name": "report-demo",
        "output_dir": "run",
        "stages": [
            {"name": "train", "type": "tiny_train"},
            {"name": "distill", "type": "fake_metrics", "inputs": {"model": "train"},
             "config": {"metrics": DISTILL, "evaluations": DISTILL_EV, "info": {"validation_report": STUDENT_REPORT}}},
            {"name": "quantize", "type": "fake_metrics", "inputs": {"model": "distill"}, "config": {"metrics": QUANTIZE, "evaluations": QUANTIZE_EV}},
            {"name": "broken", "type": "fake_metrics", "config": {"fail": True}},
            {"name": "later", "type": "fake_metrics", "inputs": {"model": "broken"}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with fake_stages():
        with pytest.raises(StageFailed):
            runner.run(load_recipe(path))
        yield path, tmp_path / "run"


def test_report_plots_the_logged_curves_and_tabulates_compression(demo_run, stages):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines.cli import main

    path, run = demo_run

    # TensorBoard: event files under <stage>/logs with the Trainer's scalars
    events = list((run / "train" / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"train/loss", "train/learning_rate", "eval/accuracy"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 6

    assert main(["report", str(path)]) == 0
    report = run / "report"
    md = (report / "report.md").read_text()
    for png in ("train_loss.png", "train_lr.png", "train_eval.png"):
        is_real_png(report / "plots" / png)
        assert f"](plots/{png})" in md
        assert f'src="plots/{png}"' in (report / "report.html").read_text()
    assert sorted(p.name for p in (report / "plots").iterdir()) == [
        "baselines.png", "distill_validation_classes.png", "recipe_graph.png", "tradeoff.png", "train_eval.png",
        "train_loss.png", "train_lr.png"]
    is_real_png(report / "plots/recipe_graph.png")   # the recipe as a picture, at the top
    assert md.index("](plots/recipe_graph.png)") < md.index("## Stages")
    is_real_png(report / "plots/tradeoff.png")       # teacher / student / quantized: metric vs latency
    assert "](plots/tradeoff.png)" in md.split("## Compression")[1]

    # stages: state, time, metrics (a failed and a pending one included)
    assert "| train | tiny_train | done |" in md and "| broken | fake_metrics | failed |" in md
    assert "| later | fake_metrics | pending |" in md
    assert "Failed: RuntimeError: asked to fail" in md
    assert f"tensorboard --logdir {run / 'train' / 'logs'}" in md

    # compression: the reference and output models each stage declared, ratios computed from them, by the
    # judged metric only (the quantize stage's f1 stays in its own section): the table fits the page
    table = md.split("## Compression")[1]
    header = table.strip().splitlines()[0]
    assert header == "| stage | model | split | accuracy | params | size_mb | latency_ms | speedup | retained | size_ratio |"
    assert "| distill | teacher | validation | 0.87 | 22,700,000 | 90.9 | 40.2 | - | - | - |" in table
    assert "| distill | student | validation | 0.84 | 11,000,000 | 44.1 | 21.5 | 1.87 | 0.9655 | 2.061 |" in table
    assert "| quantize | fp32 | validation | 0.84 | 11,000,000 | 44.1 | 21.5 | - | - | - |" in table
    assert "| quantize | quantized | validation | 0.835 | 11,000,000 | 12 | 10.1 | 2.129 | 0.994 | 3.675 |" in table
    assert "| f1 | 0.83 |" in md.split("## quantize (fake_metrics)")[1]

    # model vs baseline, said plainly
    versus = md.split("## Model vs baseline")[1].split("##")[0]
    assert "](plots/baselines.png)" in versus
    is_real_png(report / "plots/baselines.png")
    assert "| distill | validation | accuracy | 0.84 | teacher: 0.87 | majority: 0.51 | beats it |" in versus
    assert "| quantize | validation | accuracy | 0.835 | fp32: 0.84 | tfidf_logreg: 0.86 | DOES NOT BEAT IT |" in versus


def test_plot_history_from_a_log_history_list(tmp_path):
    """What training.write_log_history writes: train rows, eval rows and the final summary row."""
    from pipelines.report import eval_panels, plot_history

    history = [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "learning_rate": 1e-3 * (1 - s / 20), "grad_norm": 1.0}
               for s in range(1, 21)]
    history += [{"step": s, "eval_loss": 1.5 / s, "eval_accuracy": 0.5 + s / 50, "eval_runtime": 0.1} for s in (5, 10, 15, 20)]
    history += [{"step": 20, "train_runtime": 3.0, "train_loss": 0.4, "total_flos": 1.0}]
    plots = dict(plot_history(history, tmp_path, "s"))
    assert set(plots) == {"loss", "learning rate", "evaluation metrics"}
    assert eval_panels(history) == [["eval_accuracy"]]
    more = history + [{"step": s, "eval_f1": 0.4, "eval_perplexity": 9.0 - s / 5, "eval_bleu": 2.0 * s} for s in (5, 20)]
    assert eval_panels(more) == [["eval_accuracy", "eval_f1"], ["eval_bleu"], ["eval_perplexity"]]  # scores share one
    for p in plots.values():
        is_real_png(p)
    assert plot_history([{"step": 1, "epoch": 0.1}], tmp_path, "empty") == []


def test_single_point_eval_metrics_are_not_plotted_and_class_charts_are(tmp_path):
    from pipelines.report import plot_classes, plot_history

    history = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-3} for s in range(1, 11)]
    history += [{"step": 10, "eval_loss": 1.0, "eval_accuracy": 0.7, "eval_perplexity": 3.0}] * 2  # once (logged twice)
    assert set(dict(plot_history(history, tmp_path, "once"))) == {"loss", "learning rate"}
    report = {"f1_per_class": {"cat": 0.9, "dog": 0.5, "bird": 0.1},
              "confusion_matrix": [[9, 1, 0], [3, 5, 2], [4, 5, 1]], "labels": ["cat", "dog", "bird"]}
    is_real_png(plot_classes(report, tmp_path, "ft", "validation"))
    is_real_png(plot_classes({"f1_per_type": {"person": 0.6, "location": 0.4}}, tmp_path, "ner", "test"))
    is_real_png(plot_classes({"f1_per_label": {"person": 0.6, "location": 0.4}}, tmp_path, "tags", "test"))
    assert plot_classes({"accuracy": 0.5}, tmp_path, "x", "test") is None


def test_predictions_worth_reading_are_the_confidently_wrong_ones(tmp_path):
    import json

    from pipelines.report import worth_reading

    rows = [{"text": "fine", "label": "pos", "predicted": "pos", "score": 0.99},
            {"text": "meh", "label": "pos", "predicted": "neg", "score": 0.55},
            {"text": "awful", "label": "pos", "predicted": "neg", "score": 0.97}]
    (tmp_path / "predictions_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "predictions_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    split, cols, table = worth_reading(tmp_path)
    assert split == "validation" and cols == ["text", "label", "predicted", "score"] and table == [["meh", "pos", "neg", "0.55"]]
    (tmp_path / "predictions_validation.jsonl").unlink()
    assert [r[0] for r in worth_reading(tmp_path)[2]] == ["awful", "meh"]
    gen = [{"source": "ein Hund", "target": "a dog", "predicted": "a cat"}]
    (tmp_path / "predictions_test.jsonl").write_text(json.dumps(gen[0]) + "\n")
    assert worth_reading(tmp_path)[2] == [["ein Hund", "a dog", "a cat"]]


def test_language_model_loss_against_tokens_with_the_unigram_line(tmp_path):
    from pipelines.report import plot_tokens

    history = [{"step": s, "loss": 8 - s / 10} for s in range(1, 41)] + [{"step": 40, "eval_loss": 4.2}]
    metrics = {"train_tokens": 40 * 2048, "steps": 40, "unigram_perplexity": 554.1}
    is_real_png(plot_tokens(history, metrics, tmp_path, "pre"))
    assert plot_tokens(history, {"steps": 40}, tmp_path, "cls") is None   # not a language model


# ---------------------------------------------------------------- checked in a real browser


def needs_browser() -> None:
    """Skip without playwright or a Chromium, with the reason; in CI (CI=true) fail instead: .ci/run installs both."""
    import os

    from pipelines.browser import find_chromium

    try:
        import playwright.sync_api  # noqa: F401
        missing = None if find_chromium() else "no Chromium ($PIPELINES_CHROMIUM, or chromium on PATH: apt-get install chromium)"
    except ImportError:
        missing = "playwright is not installed (pip install 'pipelines[browser]')"
    if missing and os.environ.get("CI") == "true":
        pytest.fail(f"{missing}: CI must check the report in a browser (.ci/run installs Chromium)")
    if missing:
        pytest.skip(missing)


def test_report_in_headless_chromium(demo_run, stages, tmp_path, capsys):
    """report.html of the demo run opened in Chromium: every image loads, no console error, nothing fetched
    from outside the report folder. The screenshot is kept as this test's artifact, in pytest's tmp dir
    (<basetemp>/test_report_in_headless_chromi0/report.png; pytest keeps the last three basetemps)."""
    needs_browser()
    from PIL import Image

    from pipelines.cli import main

    path, run = demo_run
    shot = tmp_path / "report.png"
    assert main(["report", str(path), "--screenshot", str(shot)]) == 0
    said = capsys.readouterr().out
    n_png = len(list((run / "report" / "plots").glob("*.png")))
    assert n_png == 7
    assert f"opened {run / 'report' / 'report.html'} in headless Chromium: {n_png} image(s), 0 problem(s)" in said
    with Image.open(shot) as img:
        assert img.width >= 1000 and img.height > 2000  # the whole page: graph, tables, curves, charts
    print(f"screenshot: {shot}")


def test_the_browser_check_sees_what_a_reader_would(tmp_path):
    """A broken image, a console error, an uncaught exception and a fetch from the network are each reported."""
    needs_browser()
    from PIL import Image

    from pipelines.browser import check_page

    Image.new("RGB", (40, 20), "teal").save(tmp_path / "ok.png")
    (tmp_path / "page.html").write_text(
        "<!doctype html><html><body><h1>hi</h1><img src='ok.png'><img src='missing.png'>"
        "<img src='http://example.invalid/chart.png'>"
        "<script>console.error('boom'); null.x</script></body></html>")
    check = check_page(tmp_path / "page.html")
    problems = check.problems()
    assert check.images[0] == {"src": "ok.png", "alt": "", "width": 40, "height": 20}
    assert "image did not load: missing.png" in problems
    assert "image did not load: http://example.invalid/chart.png" in problems
    assert "fetched from outside the report: http://example.invalid/chart.png" in problems
    assert "console error: boom" in problems
    assert any(p.startswith("page error: ") and "null" in p for p in problems), problems
    assert check.outside_requests == ["http://example.invalid/chart.png"]  # the page and its folder's files are fine
    assert sum(p.startswith("console error: Failed to load resource") for p in problems) == 2  # Chromium's own
    assert len(problems) == 7, problems


def test_a_chromium_start_that_hangs_is_tried_again(tmp_path, monkeypatch):
    """A Chromium whose first start hangs (seen once in CI on a loaded box) is started again; one that never
    starts is a clear error naming it, not playwright's traceback."""
    needs_browser()
    from pipelines.browser import _launch, check_page, find_chromium
    from pipelines.errors import PipelinesError

    real = find_chromium()
    flaky = tmp_path / "flaky-chromium"
    flaky.write_text(f"#!/bin/sh\nif [ ! -e {tmp_path}/started ]; then touch {tmp_path}/started; exec sleep 60; fi\n"
                     f'exec {real} "$@"\n')
    flaky.chmod(0o755)
    (tmp_path / "page.html").write_text("<!doctype html><p>hi</p>")
    import pipelines.browser as browser

    monkeypatch.setenv("PIPELINES_CHROMIUM", str(flaky))
    monkeypatch.setattr(browser, "_launch", lambda p, c, t: _launch(p, c, 3))
    assert check_page(tmp_path / "page.html").problems() == []
    assert (tmp_path / "started").exists()

    hangs = tmp_path / "hanging-chromium"
    hangs.write_text("#!/bin/sh\nexec sleep 60\n")
    hangs.chmod(0o755)
    monkeypatch.setenv("PIPELINES_CHROMIUM", str(hangs))
    monkeypatch.setattr(browser, "_launch", lambda p, c, t: _launch(p, c, 1, tries=2))
    with pytest.raises(PipelinesError, match=r"hanging-chromium did not start in 1 s, 2 times"):
        check_page(tmp_path / "page.html")


def test_tradeoff_puts_a_later_stage_on_the_clock_of_the_model_it_started_from():
    """Two stages time their models minutes apart on a shared machine: the quantize stage's fp32 model (the
    distill stage's student, drawn already) measured 242 ms where distill measured it at 106. Its int8 model is
    drawn at the ratio quantize measured (137.9 / 242.3) of the student's drawn latency, not at its raw 137.9 ms
    (which would put it slower than the model it was made from)."""
    from pipelines.report import tradeoff_points

    def ev(model, role, folder, acc, ms, mb):
        return {"model": model, "role": role, "split": "validation", "folder": folder, "metrics": {"accuracy": acc},
                "latency_ms": ms, "size_mb": mb}

    judged = {"name": "accuracy", "greater_is_better": True}
    distill = {"name": "distill", "main_metric": judged, "evaluations": [
        ev("student", "output", "/r/distill/model", 0.8291, 106.3, 43.4), ev("teacher", "reference", "/r/teacher/model", 0.8142, 205.5, 90.9),
        {"model": "tfidf", "role": "baseline", "split": "validation", "metrics": {"accuracy": 0.78}}]}
    quantize = {"name": "quantize", "main_metric": judged, "evaluations": [
        ev("quantized", "output", "/r/quantize/model", 0.8268, 137.9, 11.2), ev("fp32", "reference", "/r/distill/model", 0.8291, 242.3, 43.4)]}
    metric, up, points = tradeoff_points([distill, quantize])
    assert (metric, up) == ("accuracy", True)
    got = {label: (round(ms, 1), acc) for ms, acc, _, label in points}
    assert got == {"distill: student": (106.3, 0.8291), "distill: teacher": (205.5, 0.8142),
                   "quantize: quantized": (round(106.3 * 137.9 / 242.3, 1), 0.8268)}  # the fp32 model is drawn once
