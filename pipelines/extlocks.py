"""Stale build locks of torch's JIT extensions (the ops DeepSpeed compiles on first use).

torch guards each extension build folder with a plain `lock` file (torch.utils.file_baton): the
builder creates it, compiles, then deletes it; every other process polls until it is gone, with no
timeout. A build killed mid-way (kill -9, a job's time limit, a machine image snapshotted during a
build) leaves the file behind, and every later DeepSpeed run that needs that op rebuilt (a new
venv, a new torch) waits on it forever, silently. We hit exactly this: two-rank ZeRO runs hung in
`deepspeed.comm` while building `deepspeed_shm_comm`.

A live builder keeps the lock file open (FileBaton holds the descriptor until release), so a lock
that no process has open is stale and safe to delete. Only locks owned by our own user are judged:
those are the ones whose builders' /proc entries we can read.
"""

from __future__ import annotations

import os
from pathlib import Path


def extension_roots() -> list[Path]:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/<py>_<device>."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return [Path(env)]
    from torch.utils.cpp_extension import get_default_build_root

    return [Path(get_default_build_root())]


def _open_paths() -> set[str] | None:
    """Every file any process of ours has open; None where /proc cannot tell (not Linux)."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[str] = set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            fds = list((pid / "fd").iterdir())
        except OSError:  # another user's process, or one that just ended
            continue
        for fd in fds:
            try:
                held.add(os.readlink(fd))
            except OSError:
                continue
    return held


def clear_stale_build_locks(roots: list[Path] | None = None) -> list[Path]:
    """Delete torch extension build locks that no running process holds; returns what was deleted."""
    roots = extension_roots() if roots is None else roots
    locks = [p for root in roots if root.is_dir() for pattern in ("*/lock", "*/*/lock") for p in root.glob(pattern)]
    locks = [p for p in locks if _owned_by_us(p)]
    if not locks:
        return []
    held = _open_paths()
    if held is None:
        return []
    removed = []
    for lock in locks:
        if os.path.realpath(lock) in held or str(lock) in held:
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # its builder finished (or another rank cleared it) meanwhile
            continue
        removed.append(lock)
    return removed


def _owned_by_us(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.getuid()
    except OSError:
        return False
