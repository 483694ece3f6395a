import json

from pipelines.checkpoints import MARKER, atomic_write_json, latest_checkpoint


def _ckpt(root, step, complete=True, state=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    if state:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        (d / MARKER).write_text(str(step))
    return d


def test_latest_skips_half_written_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    _ckpt(tmp_path, 5)
    good = _ckpt(tmp_path, 10)
    _ckpt(tmp_path, 15, complete=False)  # killed during save: no marker
    _ckpt(tmp_path, 20, complete=True, state=False)  # trainer_state never written
    (tmp_path / "checkpoint-25").mkdir()
    (tmp_path / "checkpoint-25" / "trainer_state.json").write_text("{trunc")
    (tmp_path / "checkpoint-25" / MARKER).write_text("25")
    assert latest_checkpoint(tmp_path) == good


def test_numeric_not_lexical_order(tmp_path):
    _ckpt(tmp_path, 9)
    big = _ckpt(tmp_path, 100)
    assert latest_checkpoint(tmp_path) == big


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
