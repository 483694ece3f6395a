"""Hyperparameter sweeps: a stage's `sweep:` block, run through Optuna.

    - name: finetune
      type: finetune
      config: {task: classification, train: {epochs: 1, eval_steps: 50}}
      sweep:
        trials: 12
        params:
          train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # float range (log-uniform)
          lora.r: [4, 8, 16]                                 # a list: categorical
          train.epochs: {low: 1, high: 3}                    # two ints: an int range

Any stage whose config has a `train:` section (pipelines.training.TrainConfig) can be swept; the runner hands
it here instead of calling its `run` once. Each trial is the stage's own `run` on the stage's config with the
trial's values at their dotted key paths, in `<stage>/trials/<n>/` (checkpoints, model, log history), seeded
like the stage. The objective is the task's main metric on the validation split (`metric` / `direction`
override it), read from the evaluation the stage declares for its output model; the Trainer's evaluations
(`eval_<metric>`) feed a median / Hyperband pruner through a TrainerCallback (as transformers'
`hyperparameter_search` does with its optuna backend). A trial that fails (NaN loss, out of memory, any
error that is not a user error) is recorded as failed and the sweep goes on.

The study lives in an Optuna RDB storage: `sqlite:///<stage>/sweep.db` by default, so a killed sweep resumes
with its finished trials kept (the trial it was in resumes from its own last checkpoint); `storage:` a real
database URL shares one study between machines. When the sweep is over, the best trial's folder is promoted
to the stage folder (hard links): the model downstream stages get is the one that scored the best value,
not a retrained copy. Only when the best trial ran on another machine (shared study) is it retrained here
with its config. The manifest's `info.sweep` holds every trial, the best trial's config and value.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import socket
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator

from pipelines.errors import PipelinesError

TRIALS = "trials"
DB = "sweep.db"
RESULT = "result.json"
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr, None]


# ---------------------------------------------------------------- the typed `sweep:` block


class Param(BaseModel):
    """One searched config key: `choices` (categorical), or a `low`..`high` range: int when both are
    integers, else float; `log: true` samples log-uniformly."""

    model_config = ConfigDict(extra="forbid")

    choices: list[Scalar] | None = Field(None, min_length=1, description="Categorical: one of these values.")
    low: StrictInt | StrictFloat | None = None
    high: StrictInt | StrictFloat | None = None
    log: bool = False
    step: StrictInt | StrictFloat | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or give choices: [...])")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "categorical"
        return "int" if isinstance(self.low, int) and isinstance(self.high, int) else "float"

    def candidates(self) -> list:
        """Values that must each make a valid config: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def grid(self) -> list | None:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(self.low, self.high + 1, int(self.step or 1)))
        return None

    def suggest(self, trial, name: str):
        if self.kind == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trials: int = Field(ge=1, description="Finished trials (complete, pruned or failed) the study needs, over "
                        "every machine that shares it.")
    params: dict[str, Param] = Field(min_length=1, description="Dotted key path into the stage's config "
                                     "(train.lr, lora.r) -> its search space.")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="grid: every combination of the "
                                                      "choices / int ranges once.")
    pruner: Literal["median", "hyperband", "none"] = Field("median", description="Stops a trial whose validation "
                                                           "metric at an evaluation step is worse than the median "
                                                           "of earlier trials at that step (or Hyperband's rungs).")
    startup_trials: int = Field(2, ge=0, description="median: trials finished before any is pruned.")
    warmup_steps: int = Field(0, ge=0, description="median: training steps of a trial before it may be pruned.")
    metric: str | None = Field(None, description="Objective, a metric the stage scores on the validation split; "
                               "default: the task's main metric.")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="With metric.")
    storage: str | None = Field(None, description="An Optuna storage URL (postgresql://, mysql://, sqlite:///...) "
                                "that machines share; default: sqlite:///<stage folder>/sweep.db.")
    study: str | None = Field(None, description="Study name in the storage; default: recipe.stage.fingerprint.")

    @field_validator("params", mode="before")
    @classmethod
    def _lists_are_choices(cls, v):
        if isinstance(v, dict):
            return {k: {"choices": p} if isinstance(p, list) else p for k, p in v.items()}
        return v

    @model_validator(mode="after")
    def _check(self):
        if (self.metric is None) != (self.direction is None):
            raise ValueError("give metric and direction together (or neither: the task's main metric)")
        if self.sampler == "grid":
            sizes = {k: p.grid() for k, p in self.params.items()}
            floats = [k for k, g in sizes.items() if g is None]
            if floats:
                raise ValueError(f"sampler grid needs choices or int ranges; {floats} are float / log ranges")
            points = math.prod(len(g) for g in sizes.values())
            if self.trials > points:
                raise ValueError(f"sampler grid: the grid has {points} points; trials {self.trials} would repeat "
                                 f"them (set trials <= {points})")
        return self

    def grid_space(self) -> dict[str, list]:
        return {k: p.grid() for k, p in self.params.items()}


# ---------------------------------------------------------------- validation (pipelines validate)


def trains(Config) -> bool:
    """Whether a stage config has a `train:` section: what makes a stage sweepable."""
    from pipelines.training import TrainConfig

    return any(_model_in(f.annotation) is not None and issubclass(_model_in(f.annotation), TrainConfig)
               for f in Config.model_fields.values())


def _model_in(annotation):
    """The pydantic model class inside an annotation (Optional[X], X | None), or None."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _free_form(annotation) -> bool:
    import typing

    return annotation is dict or typing.get_origin(annotation) is dict or any(_free_form(a) for a in typing.get_args(annotation))


def _path_problem(Config, path: str) -> str | None:
    """Why `path` names no key of the config (None when it does)."""
    parts, cls = path.split("."), Config
    for i, part in enumerate(parts):
        if part not in cls.model_fields:
            where = ".".join(parts[:i]) or "the stage's config"
            return f"no key {part!r} in {where} (keys: {', '.join(cls.model_fields)})"
        ann = cls.model_fields[part].annotation
        if i == len(parts) - 1:
            return None
        sub = _model_in(ann)
        if sub is None:
            return None if _free_form(ann) else f"{'.'.join(parts[:i + 1])} is a value, not a section with keys"
        cls = sub
    return None


def set_path(config: dict, path: str, value) -> dict:
    node = config
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return config


def check(sweep: SweepConfig, stage_type: str, sdef, raw_config: dict, index: int) -> list[str]:
    """Problems of a stage's sweep block, found before any trial: the stage trains, every key path names a
    config key, and every choice / both ends of every range make a valid typed config."""
    from pydantic import ValidationError

    from pipelines.recipe import _pydantic_problems

    where = f"stages[{index}].sweep"
    if not trains(sdef.Config):
        return [f"{where}: stage type {stage_type!r} does not train; sweeps are for stages with a `train:` section"]
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        return [f"{where}: sweeps need optuna: pip install 'pipelines[sweep]'"]
    problems = []
    for path, param in sweep.params.items():
        loc = f"{where}.params.{path}"
        bad = _path_problem(sdef.Config, path)
        if bad:
            problems.append(f"{loc}: {bad}")
            continue
        for value in param.candidates():
            try:
                sdef.Config.model_validate(set_path(copy.deepcopy(raw_config), path, value))
            except ValidationError as e:
                problems.append(f"{loc}: value {value!r} makes an invalid config: {'; '.join(_pydantic_problems(e))}")
                break
    return problems


def objective_of(sweep: SweepConfig, task: str | None) -> tuple[str, bool] | None:
    """(metric, greater_is_better) of the sweep: its own, else the task's main metric; None if neither."""
    if sweep.metric is not None:
        return sweep.metric, sweep.direction == "maximize"
    if task is None:
        return None
    from pipelines import tasks

    t = tasks.get(task)
    return t.main_metric, t.greater_is_better


# ---------------------------------------------------------------- a trial's TrainerCallback


def trial_reporter(trial, metric: str):
    """Reports the Trainer's eval_<metric> at each evaluation to the Optuna trial and prunes it when the
    pruner says so (transformers' optuna backend: trial.report + should_prune -> TrialPruned); a NaN / inf
    training loss fails the trial at once instead of training on garbage."""
    import optuna
    from transformers import TrainerCallback

    class TrialReporter(TrainerCallback):
        training = False  # set at the first step: errors before it are the user's (data, config), after it the trial's

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if isinstance(loss, float) and not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {state.global_step}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get(f"eval_{metric}")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return
            trial.report(float(value), state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval_{metric} {value:.4g} at step {state.global_step}")

    return TrialReporter()


# ---------------------------------------------------------------- a trial's result on disk


def save_result(result, folder: Path) -> None:
    from pipelines.checkpoints import atomic_write_json

    atomic_write_json(folder / RESULT, {
        "metrics": result.metrics, "outputs": result.outputs, "info": result.info, "task": result.task,
        "evaluations": [e.to_json() for e in result.evaluations],
        "main_metric": list(result.main_metric) if result.main_metric else None})


def load_result(folder: Path):
    from pipelines.stage import Evaluation, StageResult, read_json

    d = read_json(folder / RESULT)
    return StageResult(metrics=d["metrics"], outputs=d["outputs"], info=d["info"], task=d["task"],
                       evaluations=[Evaluation(**e) for e in d["evaluations"]],
                       main_metric=tuple(d["main_metric"]) if d["main_metric"] else None)


def objective_value(result, metric: str) -> float:
    """The metric of the stage's output model on the validation split, as the stage declared it."""
    for ev in result.evaluations:
        if ev.role == "output" and ev.split == "validation" and isinstance(ev.metrics.get(metric), (int, float)):
            return float(ev.metrics[metric])
    value = result.metrics.get(f"validation_{metric}")
    if isinstance(value, (int, float)):
        return float(value)
    raise PipelinesError(f"the sweep's objective is {metric!r} on the validation split, which this stage did not "
                         "score: give the stage a validation split to evaluate (eval_splits), or set sweep.metric")


# ---------------------------------------------------------------- the study


def _storage(sweep: SweepConfig, folder: Path):
    import optuna
    from optuna.storages import RDBStorage

    url = sweep.storage or f"sqlite:///{folder / DB}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat, retry callback
    try:
        return url, RDBStorage(url, engine_kwargs=engine, heartbeat_interval=30, grace_period=120,
                               heartbeat_stale_trial_callback=_retry_interrupted)
    except Exception as e:  # an unreachable database, a missing driver
        raise PipelinesError(f"sweep.storage {shown_url(url)!r}: cannot open it: {type(e).__name__}: {e}") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial is logged here, failures with a traceback file


def shown_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _retry_interrupted(study, trial) -> None:
    """A trial that stopped without finishing (its process was killed): mark it and enqueue it again with
    the same parameters (Optuna's RetryHeartbeatStaleTrialCallback), so it does not count as a finished trial and the
    retry resumes from its folder where that is here."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=5)(study, copy.deepcopy(trial))


def _sampler(sweep: SweepConfig, seed: int):
    import optuna

    if sweep.sampler == "grid":  # its grid ids index a seeded shuffle: the seed must not change between trials
        return optuna.samplers.GridSampler(sweep.grid_space(), seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(sweep: SweepConfig):
    import optuna

    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials, n_warmup_steps=sweep.warmup_steps)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def _retried(trials) -> set[int]:
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _interrupted(t, retried: set[int]) -> bool:
    """A trial that stopped without finishing: marked so here (Ctrl-C, kill -9 found by _reclaim), or failed by
    Optuna's heartbeat check on another machine and retried."""
    from optuna.trial import TrialState as S

    return t.state == S.FAIL and (bool(t.user_attrs.get("interrupted")) or t.number in retried)


def _tally(study) -> dict:
    """finished: complete + pruned + failed, not counting trials that were interrupted (they are retried)."""
    from optuna.trial import TrialState as S

    out = {"complete": 0, "pruned": 0, "failed": 0, "interrupted": 0, "running": 0, "waiting": 0}
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    for t in trials:
        if t.state == S.FAIL:
            out["interrupted" if _interrupted(t, retried) else "failed"] += 1
        else:
            out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    out["finished"] = out["complete"] + out["pruned"] + out["failed"]
    return out


def _reclaim(study, worker: str, ctx, local: bool) -> None:
    """Trials this stage folder left unfinished (a kill -9 leaves them RUNNING, Ctrl-C FAIL + interrupted): the
    run lock says no other run uses this folder, so they are dead; enqueue each again (once)."""
    from optuna.trial import TrialState as S

    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    for t in trials:
        # a Ctrl-C between Optuna's ask and the worker attribute leaves a RUNNING trial without one: in the stage's own
        # SQLite file (no other machine uses it) it is ours too
        mine = t.user_attrs.get("worker") == worker or (local and "worker" not in t.user_attrs)
        if not mine or t.number in retried:
            continue
        if t.state == S.RUNNING:
            study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(t._trial_id, state=S.FAIL)
            t = study._storage.get_trial(t._trial_id)
        elif not (t.state == S.FAIL and t.user_attrs.get("interrupted")):
            continue
        ctx.log(f"trial {t.number} was interrupted: it runs again" + (" from its last checkpoint"
                if (ctx.output_dir / TRIALS / str(t.number) / "checkpoints").is_dir() else ""))
        _retry_interrupted(study, t)


# ---------------------------------------------------------------- running a sweep


def trial_config(stage, params: dict):
    cfg = copy.deepcopy(stage.spec.config)
    for path, value in params.items():
        set_path(cfg, path, value)
    return stage.stage_def.Config.model_validate(cfg)


def _value_text(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_value_text(v)}" for k, v in params.items())


def _run_one(stage, ctx, folder: Path, params: dict, callbacks: list):
    """The stage's own run on the trial's config in the trial's folder (resuming a partial one), seeded like
    the stage; its result is kept in the folder."""
    from pipelines.runner import seed_everything

    cfg = trial_config(stage, params)
    resuming = folder.is_dir() and (folder / "checkpoints").is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tctx = replace(ctx, stage_name=f"{ctx.stage_name}/trial {folder.name}", output_dir=folder, resuming=resuming,
                   callbacks=list(callbacks), info={})
    seed_everything(ctx.seed)
    result = stage.stage_def.run(cfg, tctx)
    result.info = {**tctx.info, **result.info}
    save_result(result, folder)
    return result


def _drop_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def run(stage, ctx, fingerprint: str):
    """Every trial (resuming the study), then the best trial's outputs as the stage's own. Returns its
    StageResult with `info.sweep`."""
    import optuna

    sweep: SweepConfig = stage.sweep
    if ctx.world_size > 1:
        raise PipelinesError("a sweep runs its trials in one process; run `pipelines run` without accelerate launch "
                             "(to use several machines, point sweep.storage at one database from each)")
    metric, greater = objective_of(sweep, stage.task)
    url, storage = _storage(sweep, ctx.output_dir)
    name = sweep.study or f"{ctx.recipe_name}.{stage.name}.{fingerprint}"
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                direction="maximize" if greater else "minimize", pruner=_pruner(sweep))
    made_for = study.user_attrs.get("fingerprint")
    if made_for is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif made_for != fingerprint:
        raise PipelinesError(
            f"study {name!r} in {shown_url(url)} was made for another version of stage {stage.name!r} (fingerprint "
            f"{made_for}, now {fingerprint}: its config, data, inputs or sweep block changed), so their trials would "
            f"mix: set sweep.study to a new name, or delete that study (optuna delete-study --study-name {name} "
            "--storage URL)")
    worker = f"{socket.gethostname()}:{ctx.output_dir}"
    _reclaim(study, worker, ctx, local=sweep.storage is None)
    trials_dir = ctx.output_dir / TRIALS
    kept = _tally(study)
    ctx.log(f"sweep: {sweep.trials} trials of {', '.join(sweep.params)} on validation {metric} "
            f"({'max' if greater else 'min'}imize), study {name!r} in {shown_url(url)}"
            + (f"; {kept['finished']} finished trial(s) kept" if kept["finished"] else ""))
    aborted: list[Exception] = []

    def objective(trial):
        params = {path: p.suggest(trial, path) for path, p in sweep.params.items()}
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("interrupted", False)  # a retry inherits its predecessor's attributes
        folder = trials_dir / str(trial.number)
        history = optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(study._storage.get_trial(trial._trial_id))
        if history and (trials_dir / str(history[-1])).is_dir() and not folder.exists():
            (trials_dir / str(history[-1])).rename(folder)  # resume the interrupted trial's checkpoints
        ctx.log(f"trial {trial.number}: {_params_text(params)}")
        reporter = trial_reporter(trial, metric)
        try:
            result = _run_one(stage, ctx, folder, params, [reporter])
        except optuna.TrialPruned as e:
            ctx.log(f"trial {trial.number} pruned: {e}")
            _drop_checkpoints(folder)
            raise
        except (KeyboardInterrupt, SystemExit):
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as e:
            if isinstance(e, PipelinesError) and not reporter.training:
                # a user error before the first step (data, config, environment): every trial would hit it
                trial.set_user_attr("interrupted", True)
                aborted.append(e)
                raise
            trial.set_user_attr("error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "failed.traceback.txt").write_text(traceback.format_exc())
            ctx.log(f"trial {trial.number} failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                    "the sweep goes on")
            _drop_checkpoints(folder)
            _free_memory()
            raise
        try:
            value = objective_value(result, metric)
        except PipelinesError as e:  # the stage scores no validation split: no trial can have a value
            trial.set_user_attr("interrupted", True)
            aborted.append(e)
            raise
        _drop_checkpoints(folder)
        best = _best(study)
        ctx.log(f"trial {trial.number}: validation {metric} {value:.4g}"
                + (f" (best so far {best.value:.4g}, trial {best.number})" if best is not None else ""))
        return value

    while not aborted:
        t = _tally(study)
        if t["waiting"] == 0 and t["finished"] + t["running"] >= sweep.trials:
            break
        # TPE / random: not the same draws again after a resume (the grid sampler reads what it visited)
        study.sampler = _sampler(sweep, ctx.seed if sweep.sampler == "grid" else (ctx.seed + len(study.trials)) % 2**32)
        if sweep.sampler == "grid" and t["waiting"] == 0 and study.sampler.is_exhausted(study):
            break
        study.optimize(objective, n_trials=1, catch=(Exception,))
    if aborted:
        raise aborted[0]
    _wait_for_others(study, ctx)
    return _finish(stage, ctx, study, url, metric, greater, worker)


def _best(study):
    try:
        return study.best_trial
    except ValueError:
        return None


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _wait_for_others(study, ctx, poll_s: float = 1.0) -> None:
    """Trials other machines still run count: wait for them (a dead machine's trial fails after Optuna's
    heartbeat grace period), so every machine ends on the same best trial."""
    import optuna

    announced = False
    while _tally(study)["running"]:
        if not announced:
            ctx.log(f"waiting for {_tally(study)['running']} trial(s) running elsewhere")
            announced = True
        time.sleep(poll_s)
        optuna.storages.fail_stale_trials(study)


def _finish(stage, ctx, study, url: str, metric: str, greater: bool, worker: str):
    from optuna.trial import TrialState as S

    best = _best(study)
    tally = _tally(study)
    if best is None:
        errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
        raise PipelinesError(f"no trial of the sweep completed ({tally['failed']} failed, {tally['pruned']} pruned)"
                             + (f"; first error: {errors[0]}" if errors else ""))
    folder = ctx.output_dir / TRIALS / str(best.number)
    if (folder / RESULT).is_file():
        how = "kept: the best trial's own outputs (the model that scored the best value)"
    else:
        ctx.log(f"best trial {best.number} ran on {best.user_attrs.get('worker', 'another machine')}: "
                "retraining it here with its config")
        _run_one(stage, ctx, folder, best.params, [])
        _drop_checkpoints(folder)
        how = f"retrained here with the best trial's config (it ran on {best.user_attrs.get('worker', 'another machine')})"
    result = load_result(folder)
    promote(folder, ctx.output_dir)
    state = {S.COMPLETE: "complete", S.PRUNED: "pruned", S.FAIL: "failed"}
    trials = [{"number": t.number, "state": state.get(t.state, t.state.name.lower()), "params": t.params,
               "value": t.value if t.state == S.COMPLETE else None,
               "steps": max(t.intermediate_values, default=None), "worker": t.user_attrs.get("worker"),
               "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
               **({"error": t.user_attrs["error"]} if t.user_attrs.get("error") else {})}
              for t in study.trials if not _interrupted(t, _retried(study.trials))]
    result.info["sweep"] = {
        "study": study.study_name, "storage": DB if url == f"sqlite:///{ctx.output_dir / DB}" else shown_url(url),
        "metric": metric, "direction": "maximize" if greater else "minimize",
        "best": {"trial": best.number, "value": best.value, "params": best.params,
                 "config": trial_config(stage, best.params).model_dump(mode="json")},
        "final_model": how, "counts": {k: tally[k] for k in ("complete", "pruned", "failed")}, "trials": trials,
        "sweep": stage.sweep.model_dump(mode="json"),
    }
    result.metrics.update({"sweep_best_value": best.value, "sweep_best_trial": best.number,
                           "sweep_complete": tally["complete"], "sweep_pruned": tally["pruned"],
                           "sweep_failed": tally["failed"]})
    ctx.log(f"sweep done: best validation {metric} {best.value:.4g} (trial {best.number}: "
            f"{_params_text(best.params)}); {tally['complete']} complete, {tally['pruned']} pruned, "
            f"{tally['failed']} failed")
    return result


def promote(trial_dir: Path, stage_dir: Path) -> None:
    """The trial's files (all but checkpoints) into the stage folder, hard-linked where the file system allows
    (no copy of the weights), so the stage folder reads like one of a stage run without a sweep."""
    def link(src, dst):
        if os.path.lexists(dst):
            os.unlink(dst)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in trial_dir.iterdir():
        if entry.name in ("checkpoints", RESULT, "failed.traceback.txt"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, stage_dir / entry.name, copy_function=link, dirs_exist_ok=True)
        else:
            link(entry, stage_dir / entry.name)


# ---------------------------------------------------------------- report


def plot(manifest: dict, folder: Path, out_dir: Path, stage: str) -> list[tuple[str, Path]]:
    """Optuna's own matplotlib plots of a finished sweep: optimization history, parameter importances and
    slices (the latter two once two trials completed). [(title, path)]"""
    info = (manifest.get("info") or {}).get("sweep")
    if not info:
        return []
    import optuna
    from optuna.visualization import matplotlib as ovm

    url = f"sqlite:///{folder / DB}" if info["storage"] == DB else info["storage"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=info["study"], storage=url)
    except Exception:  # a shared database that is gone or needs a password: the manifest's table still shows it
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    plots = []
    todo = [("history", "sweep: optimization history", ovm.plot_optimization_history)]
    if len(complete) >= 2:
        if len(info["best"]["params"]) > 1:
            todo.append(("importances", "sweep: parameter importances", ovm.plot_param_importances))
        todo.append(("slice", "sweep: objective against each parameter", ovm.plot_slice))
    for key, title, fn in todo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            drawn = fn(study)
        axes = drawn if hasattr(drawn, "figure") else drawn.flat[0]
        fig = axes.figure
        path = out_dir / f"{stage}_sweep_{key}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        plots.append((title, path))
    return plots


def table(manifest: dict) -> tuple[list[str], list[list]] | None:
    """(columns, rows) of the sweep's trials for the report."""
    info = (manifest.get("info") or {}).get("sweep")
    if not info:
        return None
    keys = list(info["sweep"]["params"])
    rows = [[t["number"], t["state"] + (" (best)" if t["number"] == info["best"]["trial"] else ""),
             *[_value_text(t["params"].get(k, "-")) for k in keys], "-" if t["value"] is None else f"{t['value']:.4g}",
             t.get("steps") or "-", t.get("error", "")] for t in info["trials"]]
    return ["trial", "state", *keys, f"validation {info['metric']}", "last eval step", "error"], rows


def describe(manifest: dict) -> str | None:
    info = (manifest.get("info") or {}).get("sweep")
    if not info:
        return None
    b, c = info["best"], info["counts"]
    return (f"Sweep: {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed trials ({info['direction']} "
            f"validation {info['metric']}); best trial {b['trial']}: {b['value']:.4g} with "
            f"{_params_text(b['params'])}. Final model: {info['final_model']}. Study {info['study']!r} in "
            f"{info['storage']}.")

