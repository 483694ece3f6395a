"""Tiny fake stages for testing the runner: they count their calls and can sleep, fail or resume."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from pipelines.stage import StageConfig, StageDef, StageResult


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = 8


class ProduceConfig(StageConfig):
    value: int = 1
    steps: int = 0  # >0: write one "checkpoint" file per step, sleeping `sleep` each
    sleep: float = 0.0
    fail: bool = False
    inner: Inner = Inner()
    model_dir: str | None = None  # a local folder whose contents the fingerprint must follow

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        return {"model_dir": recipe_dir / self.model_dir} if self.model_dir else {}


def _count(ctx, name):
    path = ctx.output_dir.parent / f"calls_{name}.json"
    calls = json.loads(path.read_text()) if path.exists() else []
    calls.append({"resuming": ctx.resuming, "pid": os.getpid()})
    path.write_text(json.dumps(calls))


def produce(cfg: ProduceConfig, ctx):
    _count(ctx, ctx.stage_name)
    if cfg.fail:
        raise RuntimeError("asked to fail")
    done = sorted(int(p.stem.split("-")[1]) for p in ctx.output_dir.glob("step-*.txt"))
    start = (done[-1] + 1) if (ctx.resuming and done) else 0
    for step in range(start, cfg.steps):
        time.sleep(cfg.sleep)
        (ctx.output_dir / f"step-{step}.txt").write_text(str(step))
    (ctx.output_dir / "out.txt").write_text(str(cfg.value))
    return StageResult(metrics={"value": cfg.value, "started_at_step": start}, outputs={"out": "out.txt"})


class ConsumeConfig(StageConfig):
    add: int = 0


def consume(cfg: ConsumeConfig, ctx):
    _count(ctx, ctx.stage_name)
    src = int(ctx.inputs["source"].output("out").read_text())
    (ctx.output_dir / "sum.txt").write_text(str(src + cfg.add))
    return StageResult(metrics={"sum": src + cfg.add}, outputs={"sum": "sum.txt"})


FAKE_STAGES = {
    "fake_produce": StageDef("fake_produce", ProduceConfig, produce),
    "fake_consume": StageDef("fake_consume", ConsumeConfig, consume, inputs={"source": "required"}),
}


def register():
    from pipelines.stages import STAGES

    STAGES.update(FAKE_STAGES)
