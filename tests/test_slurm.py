"""accelerate_configs/slurm.sbatch in a fake SLURM allocation: stub `scontrol` (the node list), `srun` (runs
its command once per node with that node's SLURM_NODEID / SLURM_PROCID, as srun --ntasks-per-node=1 does)
and `accelerate` (records its command line) on PATH. Every node gets the same rendezvous (head node, port,
machine count, total ranks) and its own machine rank; the recipe and overrides pass through unchanged."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "accelerate_configs" / "slurm.sbatch"

SRUN = """#!/bin/bash
# srun --nodes=N --ntasks-per-node=1 [--opts] CMD...: CMD once per node, node i with SLURM_NODEID=i
echo "srun $*" >> "$FAKE_LOG"
nodes=1
while [ $# -gt 0 ]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=}; shift;; --*) shift;; *) break;; esac
done
for i in $(seq 0 $((nodes - 1))); do SLURM_NODEID=$i SLURM_PROCID=$i SLURMD_NODENAME=gpu-node-0$((i + 1)) "$@" || exit $?; done
"""
SCONTROL = """#!/bin/bash
[ "$1 $2 $3" = "show hostnames $SLURM_JOB_NODELIST" ] || { echo "unexpected: scontrol $*" >&2; exit 1; }
for i in $(seq 1 $SLURM_NNODES); do echo gpu-node-0$i; done
"""
ACCELERATE = """#!/bin/bash
printf '%q ' accelerate "$@" >> "$FAKE_LOG"; echo >> "$FAKE_LOG"
"""


def fake_sbatch(tmp_path, *args, **env_vars):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("accelerate", ACCELERATE)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_}{os.pathsep}{env['PATH']}", FAKE_LOG=str(log), **env_vars)
    res = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    calls = log.read_text().splitlines() if log.exists() else []
    return res, [shlex.split(c) for c in calls if c.startswith("accelerate ")], [c for c in calls if c.startswith("srun ")]


def opt(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("gpus, per_node", [({"SLURM_GPUS_PER_NODE": "a100:4"}, 4), ({"SLURM_GPUS_ON_NODE": "8"}, 8),
                                            ({"GPUS_PER_NODE": "2", "SLURM_GPUS_PER_NODE": "4"}, 2)])  # fmt: skip
def test_one_accelerate_launch_per_node_with_the_rendezvous_from_slurm(tmp_path, gpus, per_node):
    env = {"SLURM_JOB_NODELIST": "gpu-node-0[1-3]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "4242", **gpus}
    res, launches, sruns = fake_sbatch(tmp_path, "recipes/pretrain_tinyshakespeare.yaml", "seed=7", **env)
    assert res.returncode == 0, res.stderr
    assert len(sruns) == 1 and "--ntasks-per-node=1" in sruns[0] and "--nodes=3" in sruns[0]
    assert len(launches) == 3
    for node, cmd in enumerate(launches):
        assert cmd[:2] == ["accelerate", "launch"]
        assert opt(cmd, "--machine_rank") == str(node)
        assert opt(cmd, "--num_machines") == "3"
        assert opt(cmd, "--num_processes") == str(3 * per_node)
        assert opt(cmd, "--main_process_ip") == "gpu-node-01"  # the first host of the node list, on every node
        assert opt(cmd, "--main_process_port") == str(20000 + 4242 % 20000)
        assert opt(cmd, "--config_file") == "accelerate_configs/multinode_zero3.yaml"
        assert cmd[cmd.index("-m"):] == ["-m", "pipelines", "run", "recipes/pretrain_tinyshakespeare.yaml", "seed=7"]
    assert f"3 node(s) x {per_node} rank(s) = {3 * per_node}, head gpu-node-01:24242" in res.stdout


def test_config_and_port_can_be_chosen_and_a_missing_allocation_is_refused(tmp_path):
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1",
           "ACCELERATE_CONFIG": "accelerate_configs/deepspeed_zero2.yaml", "MAIN_PROCESS_PORT": "29555"}  # fmt: skip
    res, launches, _ = fake_sbatch(tmp_path, "r.yaml", **env)
    assert res.returncode == 0, res.stderr
    assert [opt(c, "--config_file") for c in launches] == ["accelerate_configs/deepspeed_zero2.yaml"] * 2
    assert [opt(c, "--main_process_port") for c in launches] == ["29555"] * 2
    assert [opt(c, "--num_processes") for c in launches] == ["2", "2"]

    (tmp_path / "none").mkdir()
    res, launches, _ = fake_sbatch(tmp_path / "none", "r.yaml")
    assert res.returncode != 0 and "not inside a SLURM allocation" in res.stderr and not launches
    res, _, _ = fake_sbatch(tmp_path, **env)
    assert res.returncode == 2 and "usage:" in res.stderr
