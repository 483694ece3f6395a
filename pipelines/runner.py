"""Plan, skip what is done, resume what was interrupted, run the rest.

States of a stage (from its folder under the recipe's output_dir):
  done     manifest.json exists and its fingerprint equals the planned one
  stale    manifest.json exists with another fingerprint (config, input or data changed)
  partial  no manifest, but an `.inprogress.json` with the planned fingerprint: resumes from it
  failed   the last attempt with the planned fingerprint raised (`failed.json`): resumes too
  pending  never ran (or ran with another fingerprint and did not finish: started afresh)

The manifest is written atomically and last, so a kill at any point before it never leaves a stage
looking done. Under `accelerate launch` every rank plans identically; rank 0 alone writes
(manifests, markers, lock), the others wait at barriers; single-process stages run on rank 0 only.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from pipelines.checkpoints import (
    atomic_write_json,
    atomic_write_text,
    disk_full,
    latest_checkpoint,
)
from pipelines.errors import LockedError, PipelinesError, StageFailed
from pipelines.extlocks import clear_stale_build_locks
from pipelines.fingerprint import batched_cache, hash_obj, hash_tree, stage_fingerprint
from pipelines.recipe import Recipe, Stage
from pipelines.stage import Artifact, RunContext, baseline_verdicts, read_json

MANIFEST = "manifest.json"
INPROGRESS = ".inprogress.json"
FAILED = "failed.json"
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "deepspeed", "pipelines")


# ---------------------------------------------------------------- distributed helpers


TIMEOUT_ENV = "PIPELINES_COLLECTIVE_TIMEOUT"


def collective_timeout(recipe: Recipe | None = None) -> float:
    """Seconds a rank waits in a collective for a silent peer: $PIPELINES_COLLECTIVE_TIMEOUT, else the
    recipe's `collective_timeout_s` (default 1800, torch's own default)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise PipelinesError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
        if value < 10:
            raise PipelinesError(f"{TIMEOUT_ENV}={raw!r}: must be at least 10 seconds")
        return value
    return float(recipe.model.collective_timeout_s) if recipe is not None else 1800.0


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _state: object | None = None
    timeout_s: float = 1800.0
    _beat_group: object | None = None

    @classmethod
    def from_env(cls, timeout_s: float = 1800.0) -> Dist:
        """The GLOBAL rank decides who writes (rank 0 of all machines); the local rank (0 on every
        machine) only what is per machine (build locks in the home folder)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        # accelerate's PartialState initialises the process group the way the Trainer / DeepSpeed
        # will expect it (backend, device), so later stages reuse it instead of fighting over it.
        from datetime import timedelta

        import torch
        import torch.distributed as tdist
        from accelerate import PartialState
        from torch.distributed import distributed_c10d

        timeout = timedelta(seconds=timeout_s)
        # groups made later (DeepSpeed's data-parallel groups, the Trainer's) take torch's default
        # timeout (30 min), not the default group's: give them ours too
        distributed_c10d.default_pg_timeout = timeout
        # cpu=True on a machine without CUDA: otherwise, under a DeepSpeed launch, accelerate leaves
        # every rank believing it is rank 0 of 1 (no backend) and all of them act as the main process.
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)
        beat = tdist.new_group(backend="gloo", timeout=timeout)
        return cls(state.process_index, state.num_processes, state.local_process_index, state, timeout_s, beat)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def close(self) -> None:
        """Every rank done: tear the process groups down before the interpreter does. Left to exit,
        a rank can abort in a C++ destructor (gloo's threads: 'terminate called without an active
        exception', SIGABRT) after all its work is written, and the launcher reports the run failed."""
        if self._state is None:
            return
        from accelerate.state import AcceleratorState

        self.barrier()
        self._state.destroy_process_group()  # all groups: the default one, ours, DeepSpeed's, the Trainer's
        AcceleratorState._reset_state(reset_partial_state=True)  # a later run in this process starts a new group
        self._state, self._beat_group = None, None

    def broadcast_ok(self, ok: bool) -> bool:
        """Rank 0's verdict for everyone (so a rank-0-only failure stops all ranks cleanly)."""
        if self._state is None:
            return ok
        import torch.distributed as dist

        obj = [ok]
        dist.broadcast_object_list(obj, src=0)
        return bool(obj[0])

    @property
    def beat_s(self) -> float:
        return min(30.0, self.timeout_s / 5)

    def on_main(self, fn) -> None:
        """fn() on rank 0 while the other ranks wait. Rank 0 sends a heartbeat every `beat_s` seconds
        meanwhile, so the collective timeout bounds how long a rank waits for a peer that went silent
        (dead, frozen, cut off), never how long rank 0's single-process stage may take."""
        if self._state is None:
            return fn()
        import threading

        import torch.distributed as dist

        if not self.is_main:
            while True:
                obj = [None]
                dist.broadcast_object_list(obj, src=0, group=self._beat_group)
                if obj[0] != "working":
                    return None
        stop = threading.Event()

        def beat():
            try:
                while not stop.wait(self.beat_s):
                    dist.broadcast_object_list(["working"], src=0, group=self._beat_group)
            except RuntimeError:  # a peer is gone (torch's DistError is a RuntimeError): the broadcast after the stage reports it
                return

        thread = threading.Thread(target=beat, name="pipelines-heartbeat", daemon=True)
        thread.start()
        try:
            return fn()
        finally:
            stop.set()
            thread.join()
            dist.broadcast_object_list(["finished"], src=0, group=self._beat_group)


# ---------------------------------------------------------------- lock


class RunLock:
    """One `pipelines run` per output directory. An OS-level lock (fcntl via filelock) dies with its
    process, so a stale lock left by a kill -9 never blocks the next run."""

    def __init__(self, output_dir: Path):
        from filelock import FileLock

        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / ".pipelines.lock"
        self.info = output_dir / ".pipelines.lock.json"
        self._lock = FileLock(str(self.path), timeout=0)

    def __enter__(self):
        from filelock import Timeout

        try:
            self._lock.acquire()
        except Timeout:
            holder = ""
            try:
                h = json.loads(self.info.read_text())
                holder = f" (held by pid {h['pid']} on {h['host']} since {h['since']})"
            except (OSError, ValueError, KeyError):
                pass
            raise LockedError(
                f"{self.path.parent} is in use by another `pipelines run`{holder}; "
                "wait for it to finish, or use another output_dir"
            ) from None
        atomic_write_json(self.info, {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()})
        return self

    def __exit__(self, *exc):
        try:
            self.info.unlink()
        except OSError:
            pass
        self._lock.release()


def lock_holder(output_dir: Path) -> dict | None:
    """Who holds the run lock of `output_dir` ({pid, host, since}, or {} if unknown), or None when no run is
    in progress. Takes the lock for an instant to find out; creates nothing when no run ever used the folder."""
    from filelock import FileLock, Timeout

    path = output_dir / ".pipelines.lock"
    if not path.exists():
        return None
    probe = FileLock(str(path), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        try:
            return json.loads((output_dir / ".pipelines.lock.json").read_text())
        except (OSError, ValueError):
            return {}
    probe.release()
    return None


# ---------------------------------------------------------------- planning


@dataclass
class Step:
    stage: Stage
    fingerprint: str
    state: str  # done | stale | partial | failed | pending
    action: str  # skip | run | resume | -
    reason: str
    dir: Path


def stage_dir(recipe: Recipe, name: str) -> Path:
    return recipe.output_dir / name


def _read(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def stage_state(folder: Path, fingerprint: str) -> tuple[str, dict | None]:
    manifest = _read(folder / MANIFEST)
    if manifest is not None:
        return ("done" if manifest.get("fingerprint") == fingerprint else "stale"), manifest
    failed = _read(folder / FAILED)
    if failed is not None and failed.get("fingerprint") == fingerprint:
        return "failed", failed
    progress = _read(folder / INPROGRESS)
    if progress is not None and progress.get("fingerprint") == fingerprint:
        return "partial", progress
    return "pending", None


def fingerprinted_config(config) -> dict:
    """What of a stage's config its fingerprint hashes: the values that differ from the code's defaults. A setting
    added to a stage in a later version (with a default that keeps the old behaviour) leaves finished runs done;
    changing what a default does is a new stage `version`, which does make them stale."""
    return config.model_dump(mode="json", exclude_defaults=True)


def fingerprints(recipe: Recipe) -> dict[str, str]:
    """Planned fingerprint of every stage: upstream changes flow downstream through here."""
    fps: dict[str, str] = {}
    with batched_cache():  # many data / model files: the hash cache is written once
        card_fps = {key: card.fingerprint() for key, card in recipe.cards.items()}
        local = {st.name: {k: hash_tree(p) for k, p in st.config.local_paths(recipe.path.parent).items()}
                 for st in recipe.stages}
    for st in recipe.stages:
        inputs = {f"stage:{role}": fps[ref] for role, ref in st.spec.inputs.items()}
        if st.data_stage:
            inputs["data"] = fps[st.data_stage]  # a prepared card: its stage's fingerprint covers it
        elif st.spec.data:
            inputs["data"] = card_fps[st.spec.data]
        for key, digest in local[st.name].items():
            inputs[f"local:{key}"] = digest
        if implied := st.config.implied_defaults():
            inputs["implied_defaults"] = hash_obj(implied)
        if st.sweep is not None:  # the search space, trials, sampler, storage ...: another sweep, another output
            inputs["sweep"] = hash_obj(fingerprinted_config(st.sweep))
        fps[st.name] = stage_fingerprint(st.type, st.stage_def.version, fingerprinted_config(st.config), inputs, recipe.seed)
    return fps


def plan(recipe: Recipe, only: str | None = None, from_: str | None = None, force: bool = False) -> list[Step]:
    names = [s.name for s in recipe.stages]
    only_names = [n.strip() for n in only.split(",")] if only else []  # --only a,b: several stages, recipe order
    for flag, value in [("--only", n) for n in only_names] + [("--from", from_)]:
        if value is not None and value not in names:
            raise PipelinesError(f"{flag} {value!r}: no such stage in {recipe.path.name} (stages: {names})")
    fps = fingerprints(recipe)
    selected = set(names)
    if only_names:
        selected = set(only_names)
    elif from_:
        selected = set(names[names.index(from_):])
    steps: list[Step] = []
    will_change: set[str] = set()
    for st in recipe.stages:
        folder = stage_dir(recipe, st.name)
        state, doc = stage_state(folder, fps[st.name])
        if st.name not in selected:
            action, reason = "-", "not selected"
            if state != "done":
                upstream_of_selected = any(
                    st.name in s.upstream for s in recipe.stages if s.name in selected
                )
                if upstream_of_selected:
                    raise PipelinesError(
                        f"stage {st.name!r} is {state}, but the selected stage(s) need its output; "
                        f"run it first (drop --only/--from) "
                    )
        elif force or (from_ and st.name in selected):
            action, reason = "run", "forced" if force else f"--from {from_}"
        elif state == "done":
            action, reason = "skip", "done, fingerprint unchanged"
        elif state == "stale":
            changed = [r for r in st.upstream if r in will_change]
            reason = f"input stage(s) {changed} changed" if changed else why_stale(recipe, st, doc, fps)
            action = "run"
        elif state in ("partial", "failed"):
            action, reason = "resume", f"{state} run with the same fingerprint"
        else:
            changed = [r for r in st.upstream if r in will_change]
            action, reason = "run", (f"input stage(s) {changed} will run" if changed else "not run yet")
        if action in ("run", "resume"):
            will_change.add(st.name)
        steps.append(Step(st, fps[st.name], state, action, reason, folder))
    return steps


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def why_stale(recipe: Recipe, st, manifest: dict, fps: dict[str, str]) -> str:
    """What differs between a finished stage's manifest and the recipe now: config keys (old -> new), the stage
    version, the data card's content, an input's fingerprint."""
    why = []
    if manifest.get("stage_version") != st.stage_def.version:
        why.append(f"stage version {manifest.get('stage_version')} -> {st.stage_def.version}")
    old, new = _flat(manifest.get("config")), _flat(st.config.model_dump(mode="json"))
    set_now = _flat(fingerprinted_config(st.config))  # a setting newer than the run counts where it is not the default
    keys = [k for k in new if (old[k] != new[k] if k in old else k in set_now)] + [k for k in old if k not in new]
    if keys:
        shown = [(f"{k} {old[k]!r} -> {new[k]!r}" if k in old else f"{k} {new[k]!r} (a newer setting)") if k in new
                 else f"{k} (no longer a setting)" for k in keys[:3]]
        why.append("config " + ", ".join(shown) + (f" and {len(keys) - 3} more" if len(keys) > 3 else ""))
    data = manifest.get("data") or {}
    if st.spec.data and not st.data_stage and data.get("fingerprint") not in (None, recipe.cards[st.spec.data].fingerprint()):
        why.append(f"data card {st.spec.data!r} (its files or fields) changed")
    for role, was in (manifest.get("inputs") or {}).items():
        ref = st.spec.inputs.get(role)
        if ref is None or ref != was.get("stage"):
            why.append(f"input {role}: stage {was.get('stage')!r} -> {ref!r}")
        elif was.get("fingerprint") != fps.get(ref):
            why.append(f"input {role} ({ref}) was re-run since")
    return "; ".join(why) or "the recipe's seed, a local folder it reads, or its sweep changed"


# ---------------------------------------------------------------- running


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def _artifact(recipe: Recipe, st: Stage, ref: str) -> Artifact:
    folder = stage_dir(recipe, ref)
    manifest = _read(folder / MANIFEST)
    if manifest is None:
        raise PipelinesError(f"stage {st.name!r} needs {ref!r}, which has no manifest in {folder}")
    return Artifact(ref, recipe.stage(ref).type, folder, manifest)


def _artifacts(recipe: Recipe, st: Stage) -> dict[str, Artifact]:
    return {role: _artifact(recipe, st, ref) for role, ref in st.spec.inputs.items()}


def _data_card(recipe: Recipe, st: Stage):
    """The stage's data card: one of the recipe's, or the card an earlier stage (prepare) wrote."""
    if st.data_stage:
        from pipelines.data import load_card

        return load_card(_artifact(recipe, st, st.data_stage).output("card"))
    return recipe.cards.get(st.spec.data) if st.spec.data else None


def run(recipe: Recipe, only=None, from_=None, force=False, dry_run=False, echo=print) -> list[Step]:
    steps = plan(recipe, only=only, from_=from_, force=force)
    if dry_run:
        return steps
    dist = Dist.from_env(collective_timeout(recipe))
    say = echo if dist.is_main else (lambda *a, **k: None)
    lock = RunLock(recipe.output_dir) if dist.is_main else None
    try:
        if lock:
            lock.__enter__()
        if dist.local_rank == 0:  # one process per machine, before any rank can start a build
            for stale in clear_stale_build_locks():
                echo(f"removed a stale torch extension build lock (its build was killed; no process holds it): {stale}")
        dist.barrier()
        for step in steps:
            _run_step(recipe, step, dist, say)
        dist.close()
    finally:
        if lock:
            lock.__exit__(None, None, None)
    return steps


def _run_step(recipe: Recipe, step: Step, dist: Dist, say) -> None:
    st = step.stage
    if step.action == "-":
        return
    if step.action == "skip":
        say(f"[{st.name}] skip: {step.reason} ({step.fingerprint})")
        return
    resuming = step.action == "resume"
    if dist.is_main:
        if not resuming and step.dir.exists():
            shutil.rmtree(step.dir)  # another fingerprint's output (or forced): never mix the two
        step.dir.mkdir(parents=True, exist_ok=True)
        for stale in (FAILED, MANIFEST, "failed.traceback.txt", *(p.name for p in step.dir.glob("failed.traceback.rank*.txt"))):
            (step.dir / stale).unlink(missing_ok=True)
        atomic_write_json(
            step.dir / INPROGRESS,
            {"fingerprint": step.fingerprint, "started": _now(), "pid": os.getpid(), "type": st.type},
        )
        say(f"[{st.name}] {step.action}: {step.reason} ({step.fingerprint})")
    dist.barrier()

    ctx = RunContext(
        stage_name=st.name,
        recipe_name=recipe.name,
        recipe_path=recipe.path,
        output_dir=step.dir,
        inputs=_artifacts(recipe, st),
        data=_data_card(recipe, st),
        seed=recipe.seed,
        resuming=resuming,
        rank=dist.rank,
        world_size=dist.world_size,
        local_rank=dist.local_rank,
    )
    t0 = time.time()
    outcome: dict = {}

    def attempt() -> None:
        try:
            seed_everything(recipe.seed)  # a stage's result depends on its fingerprint, not on what ran before it
            if st.sweep is not None:  # trials of the stage's own run, then the best one's outputs
                from pipelines import sweep

                outcome["result"] = sweep.run(st, ctx, step.fingerprint)
            else:
                outcome["result"] = st.stage_def.run(st.config, ctx)
        except (KeyboardInterrupt, SystemExit):
            raise  # an interrupt leaves a partial stage that the next run resumes
        except Exception as e:  # recorded, then re-raised as a clean StageFailed
            outcome["error"] = e
            # every rank keeps its own traceback (rank 0's is the stage's); a peer's may be the only one
            # left when a machine died
            where = step.dir / ("failed.traceback.txt" if dist.is_main else f"failed.traceback.rank{dist.rank}.txt")
            outcome["where"] = where
            try:
                atomic_write_text(where, traceback.format_exc())
                if dist.is_main:
                    atomic_write_json(
                        step.dir / FAILED,
                        {"fingerprint": step.fingerprint, "error": f"{type(e).__name__}: {e}", "at": _now()},
                    )
            except OSError:  # e.g. the disk is full: the message below still says what failed
                outcome["where"] = None

    if st.stage_def.distributed:
        attempt()
    else:
        dist.on_main(attempt)  # the other ranks wait, with rank 0's heartbeat
    result, error = outcome.get("result"), outcome.get("error")
    ok = dist.broadcast_ok(error is None) if not st.stage_def.distributed else error is None
    if not ok:
        if isinstance(error, PipelinesError):
            raise StageFailed(f"stage {st.name!r} ({st.type}) failed: {error}") from error
        if error is None:
            raise StageFailed(f"stage {st.name!r} ({st.type}) failed on rank 0")
        where = outcome.get("where")
        rank = f" on rank {dist.rank} of {dist.world_size}" if dist.world_size > 1 else ""
        full = _disk_full_hint(error, step.dir)
        raise StageFailed(
            f"stage {st.name!r} ({st.type}) failed{rank}{': disk full' if full else ''}: "
            f"{type(error).__name__}: {_one_line(error)}"
            + (f" (traceback: {where})" if where else "")
            + (full or _hint(error, dist))
        ) from error
    dist.barrier()
    seconds = round(time.time() - t0, 2)
    if dist.is_main:
        _write_manifest(recipe, step, ctx, result, seconds)
        (step.dir / INPROGRESS).unlink(missing_ok=True)
        metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in list(result.metrics.items())[:6])
        say(f"[{st.name}] done in {seconds:.1f}s" + (f": {metrics}" if metrics else ""))
    dist.barrier()


def _disk_full_hint(error: BaseException, folder: Path) -> str:
    """A write failed for want of space: say where, and what the next run starts from."""
    if not disk_full(error):
        return ""
    ckpt = latest_checkpoint(folder / "checkpoints")
    start = f"resumes from {ckpt.name}, the last complete checkpoint" if ckpt else "starts this stage again"
    return f". Free space under {folder} (or raise the quota / file-size limit) and run again: it {start}"


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "timed out", "timeout", "broken pipe",
              "socket closed", "connection refused", "no route to host")


def _hint(error: BaseException, dist: Dist) -> str:
    """What to do when a rank lost its peers (a machine died, froze or was cut off)."""
    if dist.world_size <= 1:
        return ""
    name = type(error).__name__
    text = str(error).lower()
    if name.startswith("Dist") or (isinstance(error, RuntimeError) and any(k in text for k in _PEER_LOST)):
        return (
            f". Another rank stopped answering (a machine died, froze or lost the network; collective timeout "
            f"{dist.timeout_s:.0f}s): start the same command again on every machine, and training resumes "
            "from the last complete checkpoint"
        )
    return ""


def seed_everything(seed: int) -> None:
    """python, numpy and torch (every device) from the recipe seed, before a stage builds anything: a stage
    run alone (--only) or after others gives the same numbers."""
    import random

    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_manifest(recipe: Recipe, step: Step, ctx: RunContext, result, seconds: float) -> None:
    st = step.stage
    for key, rel in result.outputs.items():
        if not (step.dir / rel).exists():
            raise StageFailed(f"stage {st.name!r} declared output {key!r} at {rel!r}, which does not exist")
    started = _read(step.dir / INPROGRESS) or {}
    # the config and recipe travel next to the artifact (as peft does with its adapter_config.json)
    atomic_write_text(step.dir / "recipe.yaml", yaml.safe_dump(recipe.raw, sort_keys=False))
    manifest = {
        "name": st.name,
        "type": st.type,
        "fingerprint": step.fingerprint,
        "stage_version": st.stage_def.version,
        "config": st.config.model_dump(mode="json"),
        "inputs": {role: {"stage": a.name, "fingerprint": a.fingerprint} for role, a in ctx.inputs.items()},
        "data": (
            {"card": str(ctx.data.path), "name": ctx.data.name, "fingerprint": ctx.data.fingerprint()}
            if ctx.data is not None
            else None
        ),
        "task": result.task,
        "metrics": result.metrics,
        "evaluations": [e.to_json() for e in result.evaluations],
        "main_metric": result.judged_on(),
        "outputs": result.outputs,
        "info": {**ctx.info, **result.info},
        "started": started.get("started"),
        "finished": _now(),
        "seconds": seconds,
        "resumed": ctx.resuming,
        "world_size": ctx.world_size,
        "host": socket.gethostname(),
        "versions": _versions(),
        "argv": sys.argv,
    }
    atomic_write_json(step.dir / MANIFEST, manifest)  # last: only now is the stage done


# ---------------------------------------------------------------- status


def status(recipe: Recipe) -> list[dict]:
    fps = fingerprints(recipe)
    rows = []
    for st in recipe.stages:
        folder = stage_dir(recipe, st.name)
        state, doc = stage_state(folder, fps[st.name])
        finished = state in ("done", "stale")
        rows.append(
            {
                "name": st.name,
                "type": st.type,
                "state": state,
                "task": (doc or {}).get("task") if finished else None,
                "metrics": (doc or {}).get("metrics", {}) if finished else {},
                "baselines": baseline_verdicts(doc) if finished else [],
                "output_dir": str(folder),
                "seconds": (doc or {}).get("seconds") if finished else None,
                "fingerprint": fps[st.name],
                "error": (doc or {}).get("error") if state == "failed" else None,
            }
        )
    return rows
