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


def _command(config: str, recipe: Path, extra, script: str | None, launch_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           *launch_args]  # fmt: skip
    cmd += ["-m", "pipelines"] if script is None else [script]
    return cmd + ["run", str(recipe), *extra]


def _env(env: dict | None) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}  # fmt: skip


def _kill_on_timeout(proc: subprocess.Popen) -> None:
    tree = _tree(proc.pid)
    _send(tree[1:], signal.SIGUSR1)  # the ranks (not the launcher, which would just die of it)
    time.sleep(3)
    _send(tree, signal.SIGKILL)


def accelerate_launch(config: str, recipe: Path, *extra: str, script: str | None = None, env: dict | None = None,
                      timeout: float = 600, num_processes: int = 2) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `pipelines run RECIPE EXTRA...` (or `SCRIPT run ...`) under accelerate with an accelerate_configs/ file."""
    cmd = _command(config, recipe, extra, script, ["--num_processes", str(num_processes), "--main_process_port", str(free_port())])
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_on_timeout(proc)
        out, err = proc.communicate()
        pytest.fail(f"launch timed out after {timeout:.0f}s: {' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n--- stderr (ranks' stacks at the end)\n{err[-12000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Machines:
    """`accelerate launch` started once per simulated machine on loopback (`--num_machines N --machine_rank
    i --main_process_ip 127.0.0.1`, one process each, so rank i is local rank 0 of machine i), all sharing
    one free port and the recipe's output folder as a shared file system would. Output goes to files
    (`logs/machine<i>.out|err`) so that neither launch blocks on a full pipe. `wait()` has the same safety
    as `accelerate_launch`: on timeout every rank prints its stack, then every tree is killed."""

    def __init__(self, config: str, recipe: Path, *extra: str, logs: Path, script: str | None = None,
                 env: dict | None = None, machines: int = 2, envs: dict[int, dict] | None = None):  # fmt: skip
        port = str(free_port())
        logs.mkdir(parents=True, exist_ok=True)
        self.logs, self.procs, self.cmds, self._files = logs, [], [], []
        for i in range(machines):
            cmd = _command(config, recipe, extra, script, ["--num_machines", str(machines), "--num_processes", str(machines),
                           "--machine_rank", str(i), "--main_process_ip", "127.0.0.1", "--main_process_port", port])  # fmt: skip
            out, err = open(logs / f"machine{i}.out", "w"), open(logs / f"machine{i}.err", "w")  # noqa: SIM115 (closed by kill_all)
            self._files += [out, err]
            self.cmds.append(cmd)
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env({**(env or {}), **((envs or {}).get(i, {}))}),
                                               stdout=out, stderr=err, text=True))  # fmt: skip

    def out(self, i: int) -> str:
        return (self.logs / f"machine{i}.out").read_text()

    def err(self, i: int) -> str:
        return (self.logs / f"machine{i}.err").read_text()

    def signal_machine(self, i: int, sig: int) -> None:
        """`sig` to machine i's launcher and every rank under it at once (SIGKILL: the machine died;
        SIGSTOP: it froze, or its network went away without closing a connection)."""
        _send(_tree(self.procs[i].pid), sig)

    def wait(self, timeout: float, only: list[int] | None = None) -> list[int | None]:
        """Return codes of the machines in `only` (default all), failing the test if one outlives `timeout`."""
        deadline = time.monotonic() + timeout
        codes = []
        for i, proc in enumerate(self.procs):
            if only is not None and i not in only:
                codes.append(proc.poll())
                continue
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill_all()
                pytest.fail(f"machine {i} still running after {timeout:.0f}s: {' '.join(self.cmds[i])}\n"
                            + "".join(f"--- machine {j} stdout\n{self.out(j)[-2000:]}\n--- machine {j} stderr (stacks at the end)\n"
                                      f"{self.err(j)[-8000:]}\n" for j in range(len(self.procs))))  # fmt: skip
        if all(p.poll() is not None for p in self.procs):
            for f in self._files:
                f.close()
        return codes

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _send(_tree(proc.pid), signal.SIGCONT)
                _kill_on_timeout(proc)
        for proc in self.procs:
            proc.wait()
        for f in self._files:
            f.close()


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


def run_killed_after_checkpoint(recipe: Path, checkpoints: Path, timeout: float = 240) -> list[str]:
    """`pipelines run RECIPE` killed with SIGKILL as soon as a complete checkpoint is in `checkpoints`; returns the
    command, for the run that resumes it."""
    cmd = [sys.executable, "-m", "pipelines", "run", str(recipe)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if list(checkpoints.glob("checkpoint-*/.pipelines-complete")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return cmd
