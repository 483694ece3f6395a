"""`accelerate launch --num_processes 2 ... pipelines run` for the multi-rank tests.

A hung launch must fail one test, not the rest of the run: each launch gets a free port, and on
timeout every rank gets SIGUSR1 (the CLI's faulthandler prints its Python stack to stderr), then the
whole process tree SIGKILL. `subprocess.run(timeout=)` kills only the launcher: its orphaned ranks
kept the port, the cores and the output pipes, and every later launch in CI hung too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, recipe: Path, *extra: str, script: str | None = None, env: dict | None = None,
                      timeout: float = 600, num_processes: int = 2) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `pipelines run RECIPE EXTRA...` (or `SCRIPT run ...`) under accelerate with an accelerate_configs/ file."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", str(num_processes), "--main_process_port", str(free_port())]  # fmt: skip
    cmd += ["-m", "pipelines"] if script is None else [script]
    cmd += ["run", str(recipe), *extra]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _tree(proc.pid)
        _send(tree[1:], signal.SIGUSR1)  # the ranks (not the launcher, which would just die of it)
        time.sleep(3)
        _send(tree, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launch timed out after {timeout:.0f}s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n--- stderr (ranks' stacks at the end)\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _tree(pid: int) -> list:
    """The launcher and every process under it. torchrun starts each rank in a session of its own, so a
    process-group kill of the launcher would miss them."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _send(procs: list, sig: int) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
