"""Runner behaviour with fake stages: skip, re-run, downstream invalidation, --only/--from/--force,
atomic manifests under kill -9, resume, failures, and the lock."""

import json
import signal
import subprocess
import sys
import time

import pytest

from pipelines import runner
from pipelines.errors import LockedError, PipelinesError, StageFailed
from pipelines.recipe import load_recipe
from tests.conftest import ROOT


def two_stage(tmp_path, produce=None, consume=None):
    return {
        "name": "t",
        "output_dir": str(tmp_path / "out"),
        "stages": [
            {"name": "a", "type": "fake_produce", "config": produce or {"value": 3}},
            {"name": "b", "type": "fake_consume", "inputs": {"source": "a"}, "config": consume or {"add": 1}},
        ],
    }


def calls(tmp_path, name):
    p = tmp_path / "out" / f"calls_{name}.json"
    return json.loads(p.read_text()) if p.exists() else []


def actions(steps):
    return {s.stage.name: s.action for s in steps}


def test_run_then_skip_everything(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path))
    runner.run(load_recipe(path))
    assert (tmp_path / "out/b/sum.txt").read_text() == "4"
    manifest = json.loads((tmp_path / "out/b/manifest.json").read_text())
    assert manifest["metrics"] == {"sum": 4}
    assert manifest["inputs"]["source"]["stage"] == "a"
    assert (tmp_path / "out/b/recipe.yaml").exists()
    steps = runner.run(load_recipe(path))
    assert actions(steps) == {"a": "skip", "b": "skip"}
    assert len(calls(tmp_path, "a")) == 1 and len(calls(tmp_path, "b")) == 1
    assert [r["state"] for r in runner.status(load_recipe(path))] == ["done", "done"]


def test_changed_config_reruns_it_and_downstream_only(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path))
    runner.run(load_recipe(path))
    # downstream change: only b
    steps = runner.run(load_recipe(path, ["stages.b.config.add=10"]))
    assert actions(steps) == {"a": "skip", "b": "run"}
    assert (tmp_path / "out/b/sum.txt").read_text() == "13"
    # upstream change: a and b (b because its input changed), reported as such
    recipe = load_recipe(path, ["stages.a.config.value=5", "stages.b.config.add=10"])
    assert [r["state"] for r in runner.status(recipe)] == ["stale", "stale"]
    plan = runner.plan(recipe)
    assert actions(plan) == {"a": "run", "b": "run"}
    assert "input stage(s) ['a'] changed" in plan[1].reason
    runner.run(recipe)
    assert (tmp_path / "out/b/sum.txt").read_text() == "15"
    assert len(calls(tmp_path, "a")) == 2 and len(calls(tmp_path, "b")) == 3


def test_a_setting_added_by_an_upgrade_keeps_finished_runs_and_stale_ones_say_what_changed(fake_stages, write_recipe, tmp_path):
    """A later version of a stage with one more setting (its default keeps the old behaviour) must not re-run
    users' finished stages; a stage that is stale says which key changed, or that its version did."""
    import dataclasses

    from pydantic import Field

    from pipelines.stages import STAGES

    path = write_recipe(two_stage(tmp_path, consume={"add": 1}))
    runner.run(load_recipe(path))

    class UpgradedConsume(fake_stages.ConsumeConfig):
        scale: float = Field(1.0, description="new in this version; 1.0 = what it did before")

    STAGES["fake_consume"] = dataclasses.replace(STAGES["fake_consume"], Config=UpgradedConsume)
    assert [r["state"] for r in runner.status(load_recipe(path))] == ["done", "done"]
    assert actions(runner.run(load_recipe(path))) == {"a": "skip", "b": "skip"}

    plan = runner.plan(load_recipe(path, ["stages.b.config.add=5", "stages.b.config.scale=2.0"]))
    assert plan[1].state == "stale" and plan[1].reason == "config add 1 -> 5, scale 2.0 (a newer setting)"
    STAGES["fake_consume"] = dataclasses.replace(STAGES["fake_consume"], version="9")
    assert runner.plan(load_recipe(path))[1].reason.startswith("stage version 1 -> 9")
    plan = runner.plan(load_recipe(path, ["stages.a.config.inner.r=4"]))
    assert plan[0].reason == "config inner.r 8 -> 4" and "input stage(s) ['a'] changed" in plan[1].reason


def test_only_from_force(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path))
    with pytest.raises(PipelinesError, match="stage 'a' is pending, but the selected stage"):
        runner.run(load_recipe(path), only="b")
    assert actions(runner.run(load_recipe(path), only="a")) == {"a": "run", "b": "-"}
    assert actions(runner.run(load_recipe(path), only="b")) == {"a": "-", "b": "run"}
    assert actions(runner.run(load_recipe(path), from_="b")) == {"a": "-", "b": "run"}
    assert actions(runner.run(load_recipe(path), force=True)) == {"a": "run", "b": "run"}
    with pytest.raises(PipelinesError, match="--only 'zz': no such stage"):
        runner.run(load_recipe(path), only="zz")
    with pytest.raises(PipelinesError, match="--only 'zz': no such stage"):
        runner.run(load_recipe(path), only="a,zz")
    # several stages: a pending input that is itself selected runs first
    fresh = write_recipe(two_stage(tmp_path / "fresh"))
    assert actions(runner.run(load_recipe(fresh), only="b, a")) == {"a": "run", "b": "run"}


def test_failure_is_recorded_and_resumed(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path, produce={"value": 1, "fail": True}))
    with pytest.raises(StageFailed, match="stage 'a' \\(fake_produce\\) failed: RuntimeError: asked to fail"):
        runner.run(load_recipe(path))
    assert not (tmp_path / "out/a/manifest.json").exists()
    assert (tmp_path / "out/a/failed.traceback.txt").exists()
    assert [r["state"] for r in runner.status(load_recipe(path))] == ["failed", "pending"]
    assert runner.status(load_recipe(path))[0]["error"] == "RuntimeError: asked to fail"
    assert actions(runner.plan(load_recipe(path))) == {"a": "resume", "b": "run"}
    # the same fingerprint is resumed (here: it fails again), a fixed config starts afresh and leaves
    # no failure record behind
    runner.run(load_recipe(path, ["stages.a.config.fail=false"]))
    assert not (tmp_path / "out/a/failed.json").exists()
    assert not (tmp_path / "out/a/failed.traceback.txt").exists()
    assert [r["state"] for r in runner.status(load_recipe(path, ["stages.a.config.fail=false"]))] == ["done", "done"]


def _run_in_subprocess(path, extra=""):
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from tests import fake_stages; fake_stages.register()\n"
        "from pipelines.cli import main\n"
        "raise SystemExit(main(['run', %r] + %r))\n" % (str(ROOT), str(path), extra.split() if extra else [])
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_leaves_stage_partial_and_next_run_resumes(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path, produce={"value": 2, "steps": 40, "sleep": 0.1}))
    proc = _run_in_subprocess(path)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "out/a").glob("step-*.txt"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_steps = len(list((tmp_path / "out/a").glob("step-*.txt")))
    assert 5 <= done_steps < 40
    assert not (tmp_path / "out/a/manifest.json").exists()
    recipe = load_recipe(path)
    assert runner.status(recipe)[0]["state"] == "partial"
    # the lock died with the process: the next run is not blocked, and resumes
    steps = runner.run(recipe)
    assert actions(steps) == {"a": "resume", "b": "run"}
    manifest = json.loads((tmp_path / "out/a/manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["metrics"]["started_at_step"] >= done_steps - 1
    assert calls(tmp_path, "a")[-1]["resuming"] is True


def test_sigusr1_prints_the_stacks_of_a_running_run_and_it_goes_on(fake_stages, write_recipe, tmp_path):
    """`kill -USR1 PID` of a run that seems hung shows where each thread is, without stopping it."""
    path = write_recipe(two_stage(tmp_path, produce={"value": 2, "steps": 30, "sleep": 0.1}))
    proc = _run_in_subprocess(path)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "out/a").glob("step-*.txt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "most recent call first" in err and "in produce" in err, err  # the fake stage's frame
    assert json.loads((tmp_path / "out/a/manifest.json").read_text())["metrics"]["value"] == 2


def test_partial_output_of_another_config_is_not_resumed(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path, produce={"value": 2, "steps": 3}))
    (tmp_path / "out/a").mkdir(parents=True)
    (tmp_path / "out/a/.inprogress.json").write_text(json.dumps({"fingerprint": "someothercfg"}))
    (tmp_path / "out/a/step-2.txt").write_text("2")
    steps = runner.run(load_recipe(path))
    assert actions(steps)["a"] == "run"
    assert json.loads((tmp_path / "out/a/manifest.json").read_text())["metrics"]["started_at_step"] == 0


def test_second_run_on_same_output_dir_is_refused(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path, produce={"value": 2, "steps": 100, "sleep": 0.05}))
    proc = _run_in_subprocess(path)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list((tmp_path / "out/a").glob("step-*.txt")):
            time.sleep(0.05)
        with pytest.raises(LockedError, match="is in use by another `pipelines run` \\(held by pid"):
            runner.run(load_recipe(path))
    finally:
        proc.kill()
        proc.wait()


def test_cli_user_errors_exit_2_without_traceback(fake_stages, write_recipe, tmp_path):
    path = write_recipe(two_stage(tmp_path, produce={"value": 1, "fail": True}))
    proc = _run_in_subprocess(path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "error: stage 'a' (fake_produce) failed: RuntimeError: asked to fail" in err
    assert "Traceback" not in err


def test_cli_status_json_and_dry_run(fake_stages, write_recipe, tmp_path, capsys):
    from pipelines.cli import main

    path = write_recipe(two_stage(tmp_path))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "a                run     state=pending" in capsys.readouterr().out
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["type"], s["state"]) for s in doc["stages"]] == [
        ("a", "fake_produce", "done"),
        ("b", "fake_consume", "done"),
    ]
    assert doc["stages"][1]["metrics"] == {"sum": 4}
    assert set(doc["stages"][0]) >= {"name", "type", "state", "metrics", "output_dir", "seconds"}
    assert main(["status", str(path)]) == 0
    assert "sum=4" in capsys.readouterr().out
