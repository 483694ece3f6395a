"""The only resume code: atomic writes, and finding the latest *complete* Trainer checkpoint.

A kill during a save leaves a `checkpoint-N` folder that looks real. The Trainer writes
`trainer_state.json` last, and our `CompleteMarker` callback drops a marker after the whole save
(all ranks) returned; `latest_checkpoint` only trusts folders that have both.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

MARKER = ".pipelines-complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk (ENOSPC / EFBIG), a kill: the old file stays, no temp file is left
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# the same failures as C++ (torch.save) and Rust (safetensors) report them, without an OSError
_DISK_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded", "os error 28", "os error 27",
                   "os error 122", "failed writing file", "file write failed")


def disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or one it was raised from, is a write that failed for want of space (a full disk,
    a quota, a file-size limit), however the library that wrote reported it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(error).lower() for t in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_complete(ckpt: Path) -> bool:
    state = ckpt / "trainer_state.json"
    if not (ckpt / MARKER).exists() or not state.exists():
        return False
    try:
        json.loads(state.read_text())
    except ValueError:
        return False
    return True


def checkpoints(folder: str | Path) -> list[Path]:
    """All `checkpoint-N` folders, oldest step first (complete or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under `folder`, skipping half-written ones."""
    for ckpt in reversed(checkpoints(folder)):
        if is_complete(ckpt):
            return ckpt
    return None


def complete_marker_callback():
    """A TrainerCallback that marks a checkpoint complete once the Trainer's save returned."""
    from transformers import TrainerCallback

    class CompleteMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    atomic_write_text(ckpt / MARKER, f"{state.global_step}\n")
            return control

    return CompleteMarker()
