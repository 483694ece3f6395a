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

    def implied_defaults(self) -> dict:
        """Values the stage will use that neither this config nor its inputs show (the sizes a scratch: model
        is built with): hashed into the fingerprint, so changing them in the code re-runs the stages they
        reach and no other."""
        return {}


@dataclass(frozen=True)
class StageDef:
    """A stage type.

    inputs: role -> what it must be. Roles name earlier stages in a recipe's `inputs:` mapping
        (e.g. {"tokenizer": "required", "model": "optional"}).
    data: whether the stage takes a data card ("required" | "optional" | "none").
    distributed: True if every rank runs `run` (training stages under `accelerate launch`);
        False if only rank 0 runs it while the others wait at a barrier.
    provides_data: True if the stage writes a data card (output "card") that later stages take as their
        `data:` by naming this stage, exactly like a card of the recipe's `data` mapping.
    version: bump when the stage's behaviour changes, so old outputs become stale: also when a config default
        changes what it does (fingerprints hash only the settings that differ from the defaults, so that a new
        setting whose default keeps the old behaviour leaves finished runs done).
    plan: (config, {input role: the task of that input stage's model, or None}, recipe folder, the stage's
        data card or None) -> (the task of the model this stage will output, or None; problems found without
        doing any work: a missing model folder, a card without the roles the task reads, ...).
        Called by `validate` (and before `run` starts any stage), so that a combination a task cannot do
        is refused before hours of upstream work.
    """

    name: str
    Config: type[StageConfig]
    run: Callable[[Any, "RunContext"], "StageResult"]
    version: str = "1"
    inputs: dict[str, str] = field(default_factory=dict)
    data: str = "none"
    distributed: bool = False
    provides_data: bool = False
    description: str = ""
    plan: Callable[[Any, dict, Path, Any], tuple[str | None, list[str]]] | None = None


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
    fingerprint (`resuming` is then True): training stages resume from its checkpoints. `callbacks` are
    TrainerCallbacks the runner adds to the stage's Trainer (pipelines.training.train adds them)."""

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
    callbacks: list = field(default_factory=list)  # extra TrainerCallbacks (a sweep trial's pruning reporter)
    info: dict = field(default_factory=dict)  # what shared helpers record for the manifest's info (lr_range_test)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[{self.stage_name}] {msg}", flush=True)


@dataclass
class Evaluation:
    """One model scored on one split, as the stage that scored it declares it: what report, status and
    publish compare (never guessed from metric-name prefixes).

    role: output (the model this stage writes) | reference (the model it started from: a teacher, the
    fp32 input of a quantization) | baseline (a trivial model on the same split: majority class, ...) |
    candidate (another model the stage made and scored but does not output: a level of a pruning sweep)."""

    model: str
    role: str
    split: str
    metrics: dict[str, Any]
    folder: str | None = None
    params: int | None = None
    size_mb: float | None = None
    latency_ms: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def baseline_verdicts(manifest: dict) -> list[dict]:
    """Per split: the stage's output model against the best of the task's baselines, by the task's main
    metric (from the evaluations the stage declared). Each: split, metric, value, baseline, baseline_value,
    beats (strictly better than every baseline), and where the stage scored its input model on that split
    (the teacher of a distill, the SFT model of a preference stage, the fp32 model of a quantize) reference and
    reference_value."""
    judged, evs = manifest.get("main_metric"), manifest.get("evaluations") or []
    if not judged or not evs:
        return []
    main, up = judged["name"], judged["greater_is_better"]
    better = (lambda a, b: a > b) if up else (lambda a, b: a < b)
    out = []
    for ev in evs:
        value = ev["metrics"].get(main)
        if ev["role"] != "output" or not isinstance(value, (int, float)):
            continue
        base = [(b["model"], b["metrics"][main]) for b in evs
                if b["role"] == "baseline" and b["split"] == ev["split"] and isinstance(b["metrics"].get(main), (int, float))]
        if not base:
            continue
        best = max(base, key=lambda x: x[1]) if up else min(base, key=lambda x: x[1])
        out.append({"split": ev["split"], "metric": main, "value": value, "baseline": best[0],
                    "baseline_value": best[1], "beats": better(value, best[1])})
        ref = next((r for r in evs if r["role"] == "reference" and r["split"] == ev["split"]
                    and isinstance(r["metrics"].get(main), (int, float))), None)
        if ref is not None:
            out[-1].update(reference=ref["model"], reference_value=ref["metrics"][main])
    return out


@dataclass
class StageResult:
    """metrics: flat-ish JSON-able numbers for `status` and reports.
    outputs: name -> path relative to output_dir (e.g. {"model": "model", "tokenizer": "model"}).
    info: anything else worth keeping in the manifest (sizes, timings, confusion matrix...).
    task: the task (pipelines.tasks name) of the model this stage outputs, if it outputs one.
    evaluations: the models this stage scored (its output, its reference, baselines), per split.
    main_metric: (name, greater_is_better) the evaluations are judged on; default: the task's."""

    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    evaluations: list[Evaluation] = field(default_factory=list)
    main_metric: tuple[str, bool] | None = None

    def judged_on(self) -> dict | None:
        if self.main_metric is None and self.task is not None:
            from pipelines import tasks

            t = tasks.get(self.task)
            return {"name": t.main_metric, "greater_is_better": t.greater_is_better}
        return {"name": self.main_metric[0], "greater_is_better": self.main_metric[1]} if self.main_metric else None


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
