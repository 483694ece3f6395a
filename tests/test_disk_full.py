"""The disk fills up while a training stage saves (slow): a tokenizer -> tiny GPT-2 pretrain run in a
subprocess whose file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so that writes fail with EFBIG as
they do with ENOSPC on a full disk) drops once checkpoint-8 is complete, so the next checkpoint or the
final model cannot be written. The stage fails with one `error:` line (exit code 2, no traceback on the
terminal) that says the disk is full and which checkpoint the next run resumes from; that checkpoint is
intact, no temporary file is left behind, and the next `pipelines run` (limit lifted) resumes from it and
finishes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from pipelines.checkpoints import is_complete, latest_checkpoint
from tests.conftest import ROOT
from tests.launch import _env

pytestmark = pytest.mark.slow

FILLS_UP = textwrap.dedent(
    """
    import os, resource, signal, sys
    from transformers import TrainerCallback
    from pipelines import cli, training

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit then fails with EFBIG

    def disk_full():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    class DiskFills(TrainerCallback):
        def on_save(self, args, state, control, **kw):   # after the complete marker (callbacks run in order)
            if os.environ["DISK_FULL_AFTER"] == f"checkpoint-{state.global_step}":
                disk_full()
        def on_train_end(self, args, state, control, **kw):
            if os.environ["DISK_FULL_AFTER"] == "training":
                disk_full()

    original = training.callbacks
    training.callbacks = lambda cfg: original(cfg) + [DiskFills()]
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def write_recipe(out):
    train = {"batch_size": 8, "lr": 3e-3, "max_steps": 24, "save_steps": 8, "eval_steps": 24, "logging_steps": 1,
             "precision": "fp32", "save_total_limit": 5}  # fmt: skip
    doc = {
        "name": "diskfull",
        "output_dir": str(out),
        "data": {"d": str(ROOT / "data_cards" / "tinyshakespeare_sample.yaml")},
        "stages": [
            {"name": "tok", "type": "tokenizer", "data": "d", "config": {"kind": "bpe", "vocab_size": 1000, "model_max_length": 64}},
            {"name": "p", "type": "pretrain", "data": "d", "inputs": {"tokenizer": "tok"},
             "config": {"objective": "causal_lm", "model": {"layers": 2, "heads": 2, "hidden": 64, "context_length": 64}, "train": train}},
        ],
    }  # fmt: skip
    path = out.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("full_after, resumes_from", [("checkpoint-8", "checkpoint-8"), ("training", "checkpoint-24")])
def test_a_full_disk_fails_the_stage_in_one_line_and_the_next_run_resumes(tmp_path, full_after, resumes_from):
    out = tmp_path / "run"
    recipe = write_recipe(out)
    script = tmp_path / "fills_up.py"
    script.write_text(FILLS_UP)
    env = {**_env(None), "PIPELINES_CACHE": str(tmp_path / "cache"), "DISK_FULL_AFTER": full_after}
    failed = subprocess.run([sys.executable, str(script), "run", str(recipe)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback (most recent call last)" not in failed.stderr
    errors = [x for x in failed.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, failed.stderr[-3000:]
    line = errors[0]
    print(line)
    assert "stage 'p' (pretrain) failed" in line and "disk full" in line and f"resumes from {resumes_from}" in line, line
    stage = out / "p"
    assert not (stage / "manifest.json").exists() and not (stage / "model" / "model.safetensors").exists()
    # the last complete checkpoint is intact, what was being written is not taken for one, no temp file left
    ckpts = stage / "checkpoints"
    assert latest_checkpoint(ckpts).name == resumes_from and is_complete(ckpts / resumes_from)
    state = json.loads((ckpts / resumes_from / "trainer_state.json").read_text())
    assert state["global_step"] == int(resumes_from.split("-")[1])
    assert not [p for p in out.rglob("*.tmp")], list(out.rglob("*.tmp"))
    if full_after == "checkpoint-8":
        assert (ckpts / "checkpoint-16").is_dir() and not is_complete(ckpts / "checkpoint-16")

    env.pop("DISK_FULL_AFTER")
    again = subprocess.run([sys.executable, "-m", "pipelines", "run", str(recipe)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {resumes_from}" in again.stdout
    m = json.loads((stage / "manifest.json").read_text())
    assert m["resumed"] is True and m["metrics"]["steps"] == 24
    history = json.loads((stage / "log_history.json").read_text())
    assert sorted(h["step"] for h in history if "loss" in h) == list(range(1, 25))
    assert is_complete(ckpts / "checkpoint-24")
