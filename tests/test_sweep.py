"""Sweeps (a stage's `sweep:` block, pipelines/sweep.py) on a tiny BERT and a keyword data set that a good
learning rate learns in a few steps and a bad one never does: a sweep killed with kill -9 resumes with its
finished trials kept and picks the good lr, a diverging trial is recorded as failed while the sweep goes on,
the best trial's model is the stage's output, the report shows Optuna's plots; two processes share one
SQLite study; the pruning reporter; what `validate` refuses; and `lr: auto` (the learning-rate range test)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines import runner
from pipelines.errors import RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.tiny_models import tiny_bert

GOOD, BAD, DIVERGES = 1.0e-2, 1.0e-7, 1.0e6
CONFIG = {"task": "classification", "method": "full", "eval_splits": ["validation"], "max_length": 16,
          "train": {"batch_size": 16, "max_steps": 20, "eval_steps": 4, "save_steps": 4, "logging_steps": 4,
                    "lr": 1e-3, "warmup": 0, "scheduler": "constant"}}


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory):
    """(card, base model folder): 7-word texts whose label is whether they hold 'great' or 'awful'."""
    root = tmp_path_factory.mktemp("sweep_data")
    rng = random.Random(0)
    words = "the a movie film plot actor scene story was is very quite".split()
    for split, n in (("train", 128), ("validation", 64)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["text", "label"])
            for i in range(n):
                w = [rng.choice(words) for _ in range(6)]
                w.insert(rng.randrange(7), "great" if i % 2 else "awful")
                out.writerow([" ".join(w), ["negative", "positive"][i % 2]])
    (root / "card.yaml").write_text(yaml.safe_dump({
        "name": "keywords", "source": "made up for tests/test_sweep.py", "license": "CC0", "format": "csv",
        "files": {"train": "train.csv", "validation": "validation.csv"},
        "columns": {"text": "text", "label": "label"}, "label_names": ["negative", "positive"]}))
    return root / "card.yaml", tiny_bert(root / "bert")


def write(tmp_path: Path, data, sweep: dict, out: str = "run", config: dict | None = None, name="recipe.yaml") -> Path:
    card, bert = data
    doc = {"name": "sw", "output_dir": str(tmp_path / out), "seed": 1, "data": {"kw": str(card)},
           "stages": [{"name": "ft", "type": "finetune", "data": "kw",
                       "config": {**CONFIG, "base_model": str(bert), **(config or {})}, "sweep": sweep}]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def db_trials(db: Path) -> list[tuple]:
    """(number, state) of every trial, read with sqlite3 as another process would."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("select number, state from trials order by number").fetchall()
    except sqlite3.OperationalError:  # tables not made yet
        return []


def start_run(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "pipelines", "run", str(recipe)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(proc: subprocess.Popen, cond, timeout: float = 120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = cond()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) first:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def load_study(url: str, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


# ---------------------------------------------------------------- kill -9 mid-sweep, resume, best trial


def test_killed_sweep_resumes_keeps_finished_trials_and_picks_the_good_lr(keyword_data, tmp_path, capsys):
    import torch
    from optuna.trial import TrialState as S
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.report import write_report

    sweep = {"trials": 3, "sampler": "grid", "startup_trials": 1, "params": {"train.lr": [BAD, GOOD, DIVERGES]}}
    recipe = write(tmp_path, keyword_data, sweep)
    db = tmp_path / "run/ft/sweep.db"
    proc = start_run(recipe)

    def one_finished_one_running():
        rows = db_trials(db)
        done = [n for n, s in rows if s in ("COMPLETE", "PRUNED", "FAIL")]
        running = [n for n, s in rows if s == "RUNNING"]
        return (done, running[0]) if done and running and (tmp_path / f"run/ft/trials/{running[0]}").is_dir() else None

    done_before, killed = wait_for(proc, one_finished_one_running)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    rec = load_recipe(recipe)
    fp = runner.fingerprints(rec)["ft"]
    before = {t.number: (t.state, t.datetime_complete, t.value)
              for t in load_study(f"sqlite:///{db}", f"sw.ft.{fp}").trials if t.number in done_before}
    assert runner.plan(rec)[0].action == "resume"

    runner.run(rec)  # the same command again, in this process
    log = capsys.readouterr().out
    assert f"{len(done_before)} finished trial(s) kept" in log and f"trial {killed} was interrupted" in log
    study = load_study(f"sqlite:///{db}", f"sw.ft.{fp}")
    trials = {t.number: t for t in study.trials}
    for n, was in before.items():  # finished trials were not run again
        assert (trials[n].state, trials[n].datetime_complete, trials[n].value) == was
    assert trials[killed].state == S.FAIL and trials[killed].user_attrs["interrupted"]
    retry = [t for t in study.trials if killed in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].params == trials[killed].params and retry[0].state != S.RUNNING
    # the retry took over the killed trial's folder (and its checkpoints, had it saved one)
    assert not (tmp_path / f"run/ft/trials/{killed}").exists() and (tmp_path / f"run/ft/trials/{retry[0].number}").is_dir()
    finished = [t for t in study.trials if not t.user_attrs.get("interrupted")]
    assert sorted(t.params["train.lr"] for t in finished) == sorted([BAD, GOOD, DIVERGES])  # each grid point once

    m = json.loads((tmp_path / "run/ft/manifest.json").read_text())
    sw = m["info"]["sweep"]
    assert sw["best"]["params"] == {"train.lr": GOOD} and sw["best"]["value"] == 1.0, (sw["trials"], log)
    assert sw["best"]["config"]["train"]["lr"] == GOOD and sw["best"]["config"]["train"]["max_steps"] == 20
    assert sw["final_model"].startswith("kept") and sw["storage"] == "sweep.db"
    by_lr = {t["params"]["train.lr"]: t for t in sw["trials"]}
    assert by_lr[DIVERGES]["state"] == "failed" and "NaN" in by_lr[DIVERGES]["error"]  # the sweep went on
    assert by_lr[BAD]["state"] in ("complete", "pruned") and by_lr[BAD].get("value") in (None, 0.5)
    assert m["metrics"]["validation_accuracy"] == 1.0 and m["metrics"]["sweep_failed"] == 1

    # the stage's model is the best trial's, as a plain process loads it
    model_dir = tmp_path / "run/ft/model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (tmp_path / "run/ft/predictions_validation.jsonl").read_text().splitlines()]
    with torch.no_grad():
        pred = model(**tok([r["text"] for r in rows], return_tensors="pt", padding=True)).logits.argmax(-1)
    assert [model.config.id2label[i] for i in pred.tolist()] == [r["label"] for r in rows]
    assert runner.plan(load_recipe(recipe))[0].action == "skip"

    files = {p.name for p in write_report(load_recipe(recipe))}
    assert {"ft_sweep_history.png", "ft_sweep_slice.png"} <= files
    report = (tmp_path / "run/report/report.md").read_text()
    assert "best trial" in report and "| trial | state | train.lr |" in report


# ---------------------------------------------------------------- two processes, one study


def test_two_processes_share_one_sqlite_study(keyword_data, tmp_path):
    shared = tmp_path / "shared.db"
    sweep = {"trials": 2, "sampler": "grid", "pruner": "none", "storage": f"sqlite:///{shared}", "study": "shared",
             "params": {"train.lr": [BAD, GOOD]}}
    a, b = write(tmp_path, keyword_data, sweep, "run_a", name="a.yaml"), write(tmp_path, keyword_data, sweep, "run_b", name="b.yaml")
    proc = start_run(a)
    wait_for(proc, lambda: any(s == "RUNNING" for _, s in db_trials(shared)))
    runner.run(load_recipe(b))  # while the other process runs its trials
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]

    study = load_study(f"sqlite:///{shared}", "shared")
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)  # 2 in all, not 2 each
    assert sorted(t.params["train.lr"] for t in study.trials) == [BAD, GOOD]  # no grid point twice
    workers = {t.user_attrs["worker"].split(":", 1)[1] for t in study.trials}
    assert workers == {str(tmp_path / "run_a/ft"), str(tmp_path / "run_b/ft")}
    ma, mb = (json.loads((tmp_path / f"{r}/ft/manifest.json").read_text())["info"]["sweep"] for r in ("run_a", "run_b"))
    assert ma["best"]["trial"] == mb["best"]["trial"] and ma["best"]["value"] == mb["best"]["value"] == 1.0
    assert ma["best"]["params"]["train.lr"] == GOOD
    ran_it = ma if study.best_trial.user_attrs["worker"].endswith("run_a/ft") else mb
    other = mb if ran_it is ma else ma
    assert ran_it["final_model"].startswith("kept") and other["final_model"].startswith("retrained")
    metrics = [json.loads((tmp_path / f"{r}/ft/manifest.json").read_text())["metrics"] for r in ("run_a", "run_b")]
    assert metrics[0]["validation_accuracy"] == metrics[1]["validation_accuracy"] == 1.0  # the retrained one too
    losses = [[h["loss"] for h in json.loads((tmp_path / f"{r}/ft/log_history.json").read_text()) if "loss" in h]
              for r in ("run_a", "run_b")]
    # retrained with the same seed: the same run, step by step (to float rounding: in CI the two processes' losses
    # differed in the 7th digit)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) >= 5


# ---------------------------------------------------------------- pruning reporter


def test_trial_reporter_prunes_below_the_median_and_fails_on_nan():
    import optuna
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from pipelines.sweep import trial_reporter

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    first = study.ask()
    first.report(0.9, 4)
    study.tell(first, 0.95)
    trial = study.ask()
    cb = trial_reporter(trial, "accuracy")
    args, state, control = TrainingArguments(output_dir="/tmp/unused", use_cpu=True), TrainerState(), TrainerControl()
    state.global_step = 4
    cb.on_evaluate(args, state, control, metrics={"eval_loss": 0.1})  # no eval_accuracy: nothing to report
    assert trial.should_prune() is False
    with pytest.raises(optuna.TrialPruned, match="eval_accuracy 0.5 at step 4"):
        cb.on_evaluate(args, state, control, metrics={"eval_accuracy": 0.5})
    assert study.trials[1].intermediate_values == {4: 0.5}
    with pytest.raises(FloatingPointError, match="nan at step 4"):
        cb.on_log(args, state, control, logs={"loss": float("nan")})


# ---------------------------------------------------------------- validate


def test_validate_refuses_bad_sweeps_naming_the_key_path(keyword_data, tmp_path):
    def problems(sweep, **kw):
        with pytest.raises(RecipeError) as e:
            load_recipe(write(tmp_path, keyword_data, sweep, **kw))
        return str(e.value)

    assert "stages[0].sweep.params.train.lrx: no key 'lrx' in train" in problems(
        {"trials": 2, "params": {"train.lrx": {"low": 1e-5, "high": 1e-2, "log": True}}})
    assert "stages[0].sweep.params.lora.rank: no key 'rank' in lora" in problems({"trials": 2, "params": {"lora.rank": [4, 8]}})
    msg = problems({"trials": 2, "params": {"train.batch_size": [8, 0], "lora.r": {"low": 1.5, "high": 4}}})
    assert "stages[0].sweep.params.train.batch_size: value 0 makes an invalid config" in msg
    assert "train.batch_size: Input should be greater than or equal to 1" in msg
    assert "stages[0].sweep.params.lora.r: value 1.5 makes an invalid config" in msg
    assert "stages[0].sweep.params.train.lr: Value error, log: true needs low > 0" in problems(
        {"trials": 2, "params": {"train.lr": {"low": 0.0, "high": 1e-2, "log": True}}})
    assert "the grid has 2 points; trials 3 would repeat them" in problems(
        {"trials": 3, "sampler": "grid", "params": {"train.lr": [1e-4, 1e-3]}})
    assert "stages[0].sweep.params.method: value 'both' makes an invalid config" in problems(
        {"trials": 2, "params": {"method": ["lora", "both"]}})
    assert "stages[0].sweep.trials: Field required" in problems({"params": {"train.lr": [1e-4, 1e-3]}})

    # a stage that does not train has nothing to sweep
    card, bert = keyword_data
    doc = {"name": "q", "output_dir": str(tmp_path / "q"), "data": {"kw": str(card)}, "stages": [
        {"name": "quantize", "type": "quantize", "data": "kw", "config": {"model_path": str(bert)},
         "sweep": {"trials": 2, "params": {"method": ["dynamic_int8"]}}}]}
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(RecipeError, match=r"stages\[0\].sweep: stage type 'quantize' does not train"):
        load_recipe(tmp_path / "q.yaml")

    # the sweep block is part of the fingerprint
    fp = lambda sweep: runner.fingerprints(load_recipe(write(tmp_path, keyword_data, sweep)))["ft"]  # noqa: E731
    one = {"trials": 2, "params": {"train.lr": [1e-4, 1e-3]}}
    assert fp(one) != fp({**one, "trials": 3}) != fp({**one, "params": {"train.lr": [1e-4, 1e-2]}})
    assert fp(one) == fp(dict(one))


# ---------------------------------------------------------------- lr: auto


def test_lr_auto_range_test_picks_the_lr_and_leaves_the_model_as_it_was(keyword_data, tmp_path, monkeypatch):
    """lr: auto runs the range test (20 steps here), trains with a tenth of the lowest-loss lr, records the curve in
    the manifest; the range test leaves no trace on the model: the first training loss equals that of a run given
    the picked lr as a number."""
    from pipelines import training

    monkeypatch.setattr(training, "LR_RANGE_STEPS", 20)
    card, bert = keyword_data

    def run(lr, out):
        doc = {"name": "au", "output_dir": str(tmp_path / out), "seed": 1, "data": {"kw": str(card)},
               "stages": [{"name": "ft", "type": "finetune", "data": "kw", "config": {
                   **CONFIG, "base_model": str(bert), "train": {**CONFIG["train"], "max_steps": 4, "lr": lr}}}]}
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(doc))
        runner.run(load_recipe(tmp_path / f"{out}.yaml"))
        m = json.loads((tmp_path / out / "ft/manifest.json").read_text())
        return m, json.loads((tmp_path / out / "ft/log_history.json").read_text())

    m, history = run("auto", "auto")
    found = m["info"]["lr_range_test"]
    assert found["steps"] <= 20 and len(found["lrs"]) == len(found["losses"]) == found["steps"]
    assert found["lrs"][0] == pytest.approx(1e-7) and all(a < b for a, b in zip(found["lrs"], found["lrs"][1:]))
    assert found["lr"] == pytest.approx(found["min_loss_lr"] / 10) and m["config"]["train"]["lr"] == "auto"
    # a curve that ran all its steps without diverging has no edge of stability to read: the pick is flagged
    assert found["diverged"] == (found["steps"] < 20) and ("warning" in found) == (not found["diverged"])
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert lrs and lrs == pytest.approx([found["lr"]] * len(lrs))
    assert (tmp_path / "auto/ft/lr_range_test.json").is_file()  # a resumed run trains with the same lr
    _, fixed = run(found["lr"], "fixed")
    first = lambda h: next(x["loss"] for x in h if "loss" in x)  # noqa: E731
    assert first(history) == first(fixed)

    from pipelines.report import write_report

    assert "ft_lr_range.png" in {p.name for p in write_report(load_recipe(tmp_path / "auto.yaml"))}
