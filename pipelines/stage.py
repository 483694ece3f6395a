"""What a stage is and what it is handed: the whole contract between the runner and a stage.

A stage is a module in `pipelines/stages/` that exposes `STAGE = StageDef(...)`. It reads its inputs
only from the `RunContext` (never from another stage's module) and returns a `StageResult`; the
runner owns fingerprints, manifests, skipping, resuming, locks and barriers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base of every stage's typed config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        """Files or folders this config reads besides its data card and input stages (a user's own model
        folder), by config key. The runner hashes their contents into the stage's fingerprint, so
        weights replaced in place re-run the stage instead of being silently skipped."""
        return {}


@dataclass(frozen=True)
class StageDef:
    """A stage type.

    inputs: role -> what it must be. Roles name earlier stages in a recipe's `inputs:` mapping
        (e.g. {"tokenizer": "required", "model": "optional"}).
    data: whether the stage takes a data card ("required" | "optional" | "none").
    distributed: True if every rank runs `run` (training stages under `accelerate launch`);
        False if only rank 0 runs it while the others wait at a barrier.
    version: bump when the stage's behaviour changes, so old outputs become stale.
    """

    name: str
    Config: type[StageConfig]
    run: Callable[[Any, "RunContext"], "StageResult"]
    version: str = "1"
    inputs: dict[str, str] = field(default_factory=dict)
    data: str = "none"
    distributed: bool = False
    description: str = ""


@dataclass
class Artifact:
    """A finished upstream stage as seen by a downstream one: its folder and its manifest."""

    name: str
    type: str
    path: Path
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def output(self, key: str) -> Path:
        """Absolute path of a named output (e.g. "model", "tokenizer") the stage declared."""
        outputs = self.manifest.get("outputs", {})
        if key not in outputs:
            from pipelines.errors import PipelinesError

            raise PipelinesError(
                f"stage '{self.name}' ({self.type}) has no output '{key}'; it has: {sorted(outputs) or 'none'}"
            )
        return self.path / outputs[key]


@dataclass
class RunContext:
    """Everything a stage may use. `output_dir` may hold a previous partial run of the same
    fingerprint (`resuming` is then True): training stages resume from its checkpoints."""

    stage_name: str
    recipe_name: str
    recipe_path: Path
    output_dir: Path
    inputs: dict[str, Artifact]
    data: Any | None  # pipelines.data.DataCard (loaded lazily by the stage)
    seed: int
    resuming: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.stage_name}] {msg}", flush=True)


@dataclass
class StageResult:
    """metrics: flat-ish JSON-able numbers for `status` and reports.
    outputs: name -> path relative to output_dir (e.g. {"model": "model", "tokenizer": "model"}).
    info: anything else worth keeping in the manifest (sizes, timings, confusion matrix...)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
