"""Stale torch-extension build locks (a killed DeepSpeed op build) are cleared; live ones are not."""

import subprocess
import sys
import time

import pytest

from pipelines import runner
from pipelines.extlocks import clear_stale_build_locks, extension_roots
from pipelines.recipe import load_recipe


def plant(root, *parts):
    lock = root.joinpath(*parts, "lock")
    lock.parent.mkdir(parents=True)
    lock.touch()
    return lock


def test_a_lock_nobody_holds_is_removed_at_either_depth(tmp_path):
    flat = plant(tmp_path, "deepspeed_shm_comm")  # $TORCH_EXTENSIONS_DIR/<op>/lock
    nested = plant(tmp_path, "py311_cpu", "cpu_adam")  # ~/.cache/torch_extensions/<py>_<dev>/<op>/lock
    (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").touch()
    assert sorted(clear_stale_build_locks([tmp_path])) == sorted([flat, nested])
    assert not flat.exists() and not nested.exists()
    assert (tmp_path / "py311_cpu" / "cpu_adam" / "cpu_adam.so").exists()  # nothing else touched


def test_a_lock_a_live_builder_holds_open_is_kept(tmp_path):
    lock = plant(tmp_path, "cpu_adam")
    # a "builder" in another process: FileBaton keeps the lock's descriptor open while it compiles
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({str(lock)!r}, os.O_RDONLY); print('open', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open"
        assert clear_stale_build_locks([tmp_path]) == [] and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert clear_stale_build_locks([tmp_path]) == [lock]  # its builder died: now it is stale


def test_roots_follow_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_roots() == [tmp_path]
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extension_roots()[0].name == "torch_extensions"


@pytest.mark.usefixtures("fake_stages")
def test_the_runner_clears_stale_locks_before_any_stage(write_recipe, tmp_path, monkeypatch):
    ext = tmp_path / "ext"
    lock = plant(ext, "deepspeed_shm_comm")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    path = write_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": [{"name": "a", "type": "fake_produce", "config": {"value": 1}}]})
    said = []
    runner.run(load_recipe(path), echo=said.append)
    assert not lock.exists()
    assert any("stale torch extension build lock" in s and str(lock) in s for s in said), said
