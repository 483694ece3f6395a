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


FULL_DISK = """
import os, resource, signal, sys
from pipelines.checkpoints import atomic_write_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as with ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    atomic_write_text(sys.argv[1], "new " * 10_000)
except OSError as e:
    print(e.errno)
"""


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    import errno
    import subprocess
    import sys

    from tests.conftest import ROOT

    target = tmp_path / "manifest.json"
    target.write_text("old")
    res = subprocess.run([sys.executable, "-c", FULL_DISK, str(target)], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, check=False)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == str(errno.EFBIG), res.stderr
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]  # the half-written temp is gone


def test_disk_full_recognises_every_library_s_report():
    import errno

    from pipelines.checkpoints import disk_full

    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EFBIG, "File too large"))
    # safetensors (Rust) and torch.save (C++) do not raise OSError
    assert disk_full(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    assert disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving checkpoint-16 failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer)
    assert not disk_full(OSError(errno.EACCES, "Permission denied")) and not disk_full(ValueError("bad shape")) and not disk_full(None)
