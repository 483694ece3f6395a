"""`pipelines compare`: two runs side by side (config differences, the main metric with the better run in
bold, every metric, overlaid curves), from the folders the runner writes."""

from __future__ import annotations

import json

import yaml

from pipelines.cli import main
from tests.test_report import is_real_png


def fake_run(folder, lr, acc, losses, fingerprint="f1"):
    stage = folder / "ft"
    stage.mkdir(parents=True)
    (stage / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "stages": [{"name": "ft"}, {"name": "q"}]}))
    (stage / "manifest.json").write_text(json.dumps({
        "name": "ft", "type": "finetune", "fingerprint": fingerprint, "seconds": 12.5,
        "config": {"task": "classification", "train": {"lr": lr, "epochs": 1}},
        "metrics": {"validation_accuracy": acc, "train_loss": losses[-1]},
        "main_metric": {"name": "accuracy", "greater_is_better": True},
        "evaluations": [{"model": "fine-tuned", "role": "output", "split": "validation", "metrics": {"accuracy": acc}},
                        {"model": "majority", "role": "baseline", "split": "validation", "metrics": {"accuracy": 0.5}}],
    }))
    (stage / "log_history.json").write_text(json.dumps(
        [{"step": i + 1, "loss": v} for i, v in enumerate(losses)] + [{"step": 3, "eval_accuracy": acc}]))
    return folder


def test_two_runs_side_by_side(tmp_path, capsys):
    a = fake_run(tmp_path / "base", 1e-3, 0.81, [0.9, 0.7, 0.5])
    b = fake_run(tmp_path / "new", 5e-4, 0.84, [0.9, 0.6, 0.4], fingerprint="f2")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp/compare.md").read_text()
    assert "| train.lr | 0.001 | 0.0005 |" in md                       # only the keys that differ
    assert "train.epochs" not in md
    assert "| accuracy (fine-tuned, validation) | 0.81 | **0.84** |" in md
    assert "| validation_accuracy | 0.81 | 0.84 |" in md and "| seconds | 12.5 | 12.5 |" in md
    is_real_png(tmp_path / "cmp/plots/ft_curves.png")                  # loss overlaid (eval logged once: not)
    assert (tmp_path / "cmp/compare.html").read_text().count("<table>") == 2


def test_same_config_says_whether_inputs_changed_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 1e-3, 0.8, [1.0, 0.9])
    b = fake_run(tmp_path / "b", 1e-3, 0.8, [1.0, 0.9], fingerprint="other")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    assert "the fingerprints differ" in (tmp_path / "cmp/compare.md").read_text()
    assert main(["compare", str(a), "--out", str(tmp_path / "cmp")]) == 2
    assert "two or more runs" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(a), str(tmp_path / "empty")]) == 2
    assert "no finished stage" in capsys.readouterr().err
