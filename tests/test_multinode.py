"""Two machines on loopback (slow): `accelerate launch --num_machines 2 --machine_rank 0|1` with one process
each, so machine 1's rank is global rank 1 but LOCAL rank 0, sharing one output folder as a shared file
system would. A tokenizer -> tiny GPT-2 pretrain recipe under DDP (gloo) and DeepSpeed ZeRO-2:

- the run completes on both machines, gives the same losses and validation metrics as one machine with two
  ranks, and only global rank 0 writes the manifests, markers, lock, log history and final model (an audit
  hook in every rank records what it writes under the output folder);
- kill -9 of one machine after a checkpoint: the other stops within seconds with a one-line message, and
  the same two commands resume from the last complete checkpoint and finish with the uninterrupted result;
- a frozen machine (SIGSTOP: a connection that never closes, as with a lost machine or network) stops the
  other within the collective timeout (`PIPELINES_COLLECTIVE_TIMEOUT`), where it used to wait 30 minutes;
- a rank-0-only stage longer than that timeout does not trip it (rank 0 sends a heartbeat meanwhile).
"""

from __future__ import annotations

import json
import re
import signal
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipelines.checkpoints import latest_checkpoint
from tests.conftest import ROOT
from tests.launch import Machines, accelerate_launch

pytestmark = pytest.mark.slow

TOKENIZER = {"name": "tok", "type": "tokenizer", "data": "d", "config": {"kind": "bpe", "vocab_size": 1000, "model_max_length": 64}}


def recipe(out: Path, max_steps: int = 12, save_steps: int = 6) -> Path:
    train = {"batch_size": 8, "lr": 3e-3, "warmup": 2, "max_steps": max_steps, "save_steps": save_steps,
             "eval_steps": save_steps, "logging_steps": 1, "precision": "fp32"}  # fmt: skip
    doc = {
        "name": "multinode",
        "output_dir": str(out),
        "seed": 42,
        "data": {"d": str(ROOT / "data_cards" / "tinyshakespeare_sample.yaml")},
        "stages": [TOKENIZER, {"name": "p", "type": "pretrain", "data": "d", "inputs": {"tokenizer": "tok"},
                               "config": {"objective": "causal_lm", "model": {"layers": 2, "heads": 2, "hidden": 64, "context_length": 64},
                                          "train": train}}],
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# Every rank records what it writes under the output folder: builtin / os.open for writing and renames
# (audit hooks), plus torch.save and safetensors' save_file, which write from C++ / Rust. Optionally each
# optimizer step sleeps (STEP_SLEEP), so that a kill lands mid-training.
WRAPPER = textwrap.dedent(
    """
    import json, os, sys, time
    OUT = os.environ["AUDIT_OUT"]
    _log_file = open(os.path.join(os.environ["AUDIT_DIR"], f"rank{os.environ['RANK']}.jsonl"), "a", buffering=1)
    _log_file.write(json.dumps({"event": "start", "rank": os.environ["RANK"], "local_rank": os.environ["LOCAL_RANK"]}) + "\\n")

    def _log(event, path):
        try:
            p = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return
        if p.startswith(OUT + os.sep):
            _log_file.write(json.dumps({"event": event, "path": os.path.relpath(p, OUT)}) + "\\n")

    def _hook(event, args):
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (not mode and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                _log("write", args[0])
        elif event == "os.rename":
            _log("rename", args[1])

    sys.addaudithook(_hook)
    import safetensors.torch, torch
    _st_save, _torch_save = safetensors.torch.save_file, torch.save
    def _save_file(tensors, filename, *a, **k):
        _log("write", filename)
        return _st_save(tensors, filename, *a, **k)
    def _tsave(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            _log("write", f)
        return _torch_save(obj, f, *a, **k)
    safetensors.torch.save_file, torch.save = _save_file, _tsave

    from transformers import TrainerCallback
    from pipelines import cli, training

    class Slow(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            time.sleep(float(os.environ.get("STEP_SLEEP", "0")))

    original = training.callbacks
    training.callbacks = lambda cfg: original(cfg) + [Slow()]
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def wrapper(tmp_path: Path) -> str:
    path = tmp_path / "audited_run.py"
    path.write_text(WRAPPER)
    return str(path)


def audit(folder: Path) -> dict[int, list[dict]]:
    out = {}
    for f in sorted(folder.glob("rank*.jsonl")):
        out[int(f.stem[4:])] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def manifest(out: Path, stage: str = "p") -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


def losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((out / "p" / "log_history.json").read_text()) if "loss" in h}


PER_RANK = re.compile(r"(^|/)(rng_state_1\.pth|zero_pp_rank_1_mp_rank_\d+_optim_states\.pt)$")  # a rank's own share


@pytest.mark.parametrize("config", ["ddp.yaml", "deepspeed_zero2.yaml"])
def test_two_machines_match_one_machine_and_only_global_rank_0_writes(tmp_path, config):
    script = wrapper(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    t0 = time.monotonic()
    (tmp_path / "audit_one").mkdir()
    ref = accelerate_launch(config, recipe(one), script=script, env={"AUDIT_OUT": str(one), "AUDIT_DIR": str(tmp_path / "audit_one")},
                            timeout=300)  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-4000:]
    t1 = time.monotonic()
    (tmp_path / "audit_two").mkdir()
    machines = Machines(config, recipe(two), logs=tmp_path / "logs", script=script,
                        env={"AUDIT_OUT": str(two), "AUDIT_DIR": str(tmp_path / "audit_two")})  # fmt: skip
    assert machines.wait(timeout=300) == [0, 0], (machines.err(0)[-3000:], machines.err(1)[-3000:])
    t2 = time.monotonic()
    print(f"one machine x 2 ranks: {t1 - t0:.1f}s, two machines x 1 rank: {t2 - t1:.1f}s")

    # the case that catches a runner keyed on the LOCAL rank: machine 1's only rank is local rank 0
    log = audit(tmp_path / "audit_two")
    assert sorted(log) == [0, 1]
    assert [e for e in log[1] if e["event"] == "start"] == [{"event": "start", "rank": "1", "local_rank": "0"}]

    # the same files as one machine writes, and the same numbers
    assert files(two) == files(one)
    assert ".pipelines.lock.json" not in files(two)
    a, b = manifest(one), manifest(two)
    assert a["world_size"] == b["world_size"] == 2
    assert b["metrics"]["steps"] == 12 and b["metrics"]["train_tokens"] == 12 * 8 * 2 * 64
    assert abs(a["metrics"]["val_loss"] - b["metrics"]["val_loss"]) < 1e-3, (a["metrics"], b["metrics"])
    la, lb = losses(one), losses(two)
    assert sorted(la) == sorted(lb) == list(range(1, 13))
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-3), (step, la[step], lb[step])

    # rank 1 wrote nothing but its own share of each checkpoint; every shared file was written by rank 0, once
    rank1 = [e["path"] for e in log[1] if e["event"] != "start"]
    assert rank1 and all(PER_RANK.search(p) for p in rank1), rank1
    rank0 = [e["path"] for e in log[0] if e["event"] != "start"]
    for final in ("p/manifest.json", "tok/manifest.json", "p/log_history.json", "p/recipe.yaml", ".pipelines.lock"):
        assert any(p == final for p in rank0), final
    assert rank0.count("p/model/model.safetensors") == 1
    assert [p for p in rank0 if p.endswith("manifest.json")].count("p/manifest.json") == 1
    for ckpt in ("p/checkpoints/checkpoint-6", "p/checkpoints/checkpoint-12"):
        assert rank0.count(f"{ckpt}/model.safetensors") == 1
        assert f"{ckpt}/rng_state_1.pth" in rank1 and f"{ckpt}/rng_state_1.pth" not in rank0


def _start_and_wait_for_checkpoint(tmp_path, config, out, env, step=6, logs="logs"):
    machines = Machines(config, recipe(out, max_steps=30), logs=tmp_path / logs, script=wrapper(tmp_path),
                        env={"AUDIT_OUT": str(out), "AUDIT_DIR": str(tmp_path), "STEP_SLEEP": "0.4", **env})  # fmt: skip
    marker = out / "p" / "checkpoints" / f"checkpoint-{step}" / ".pipelines-complete"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in machines.procs):
            machines.kill_all()
            pytest.fail(f"no {marker} (machines: {[p.poll() for p in machines.procs]})\n{machines.err(0)[-3000:]}")
        time.sleep(0.1)
    return machines


def _relaunch_resumes(tmp_path, config, out, reference: Path):
    ckpt = latest_checkpoint(out / "p" / "checkpoints")
    assert ckpt is not None and not (out / "p" / "manifest.json").exists()
    again = Machines(config, recipe(out, max_steps=30), logs=tmp_path / "relaunch")
    assert again.wait(timeout=300) == [0, 0], (again.err(0)[-3000:], again.err(1)[-3000:])
    assert f"resuming from {ckpt.name}" in again.out(0)
    m, ref = manifest(out), manifest(reference)
    assert m["resumed"] is True and m["metrics"]["steps"] == 30 and sorted(losses(out)) == list(range(1, 31))
    assert m["metrics"]["val_loss"] == pytest.approx(ref["metrics"]["val_loss"], abs=1e-3)
    for step, loss in losses(reference).items():
        assert losses(out)[step] == pytest.approx(loss, rel=1e-3), step
    return ckpt


def test_kill_9_of_a_machine_stops_the_other_and_the_same_commands_resume(tmp_path):
    """ZeRO-2: each rank's optimizer partition lives in the shared checkpoint folder."""
    config = "deepspeed_zero2.yaml"
    ref = accelerate_launch(config, recipe(tmp_path / "ref", max_steps=30), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    machines = _start_and_wait_for_checkpoint(tmp_path, config, out, {})
    machines.signal_machine(1, signal.SIGKILL)
    t0 = time.monotonic()
    codes = machines.wait(timeout=120, only=[0])
    stopped = time.monotonic() - t0
    print(f"machine 0 stopped {stopped:.1f}s after kill -9 of machine 1")
    assert codes[0] != 0 and stopped < 60
    err = machines.err(0)
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert "stage 'p' (pretrain) failed on rank 0 of 2" in line and "Another rank stopped answering" in line, line
    assert (out / "p" / "failed.traceback.txt").exists()
    machines.kill_all()
    ckpt = _relaunch_resumes(tmp_path, config, out, tmp_path / "ref")
    assert int(ckpt.name.split("-")[1]) >= 6


def test_a_frozen_machine_stops_the_other_within_the_collective_timeout(tmp_path):
    """SIGSTOP of machine 0 (the main one, which also hosts the rendezvous store) keeps its sockets open, as a
    machine that lost power or its network does: gloo then waits for the collective timeout (torch's
    default: 30 minutes), here 15 s. Machine 1 stops with its own traceback, then the same two commands
    resume."""
    config = "ddp.yaml"
    ref = accelerate_launch(config, recipe(tmp_path / "ref", max_steps=30), timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    machines = _start_and_wait_for_checkpoint(tmp_path, config, out, {"PIPELINES_COLLECTIVE_TIMEOUT": "15"})
    machines.signal_machine(0, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        codes = machines.wait(timeout=120, only=[1])
    finally:
        machines.signal_machine(0, signal.SIGKILL)
    stopped = time.monotonic() - t0
    print(f"machine 1 stopped {stopped:.1f}s after machine 0 froze (collective timeout 15 s)")
    assert codes[1] != 0 and 14 < stopped < 60
    line = next(x for x in machines.err(1).splitlines() if x.startswith("error: "))
    assert "failed on rank 1 of 2" in line and "collective timeout 15s" in line, line
    assert (out / "p" / "failed.traceback.rank1.txt").exists()  # the survivor's own traceback, named in its message
    machines.kill_all()
    _relaunch_resumes(tmp_path, config, out, tmp_path / "ref")


HEARTBEAT = textwrap.dedent(
    """
    import sys
    from tests import fake_stages
    from pipelines import cli
    fake_stages.register()
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_a_rank_0_stage_longer_than_the_timeout_does_not_trip_it(tmp_path):
    """A single-process stage (tokenizer, quantize, publish) runs on rank 0 while the others wait for it:
    with rank 0's heartbeat they wait as long as it takes, however short the collective timeout."""
    script = tmp_path / "fake_run.py"
    script.write_text(HEARTBEAT)
    doc = {"name": "hb", "output_dir": str(tmp_path / "run"),
           "stages": [{"name": "slow", "type": "fake_produce", "config": {"steps": 3, "sleep": 5}}]}  # fmt: skip
    path = tmp_path / "hb.yaml"
    path.write_text(yaml.safe_dump(doc))
    t0 = time.monotonic()
    res = accelerate_launch("ddp.yaml", path, script=str(script), env={"PIPELINES_COLLECTIVE_TIMEOUT": "10"}, timeout=200)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert took > 15  # the stage alone slept 15 s, 1.5x the timeout (rank 0 beats every 2 s)
    assert json.loads((tmp_path / "run" / "slow" / "manifest.json").read_text())["world_size"] == 2
