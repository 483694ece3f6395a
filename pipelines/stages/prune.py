"""prune stage: structured pruning that really removes weights (smaller matrices, not masked zeros), then
re-evaluation beside the input model, for one pruning level or a sweep of levels.

input model -> importance of every FFN neuron (train rows of the card) -> per level: slice the FFN Linear layers,
[recover: a short fine-tune through pipelines.training] -> save a plain HF folder -> reload it with stock
from_pretrained -> score the input model and every reloaded level on the first eval split, once, and time them all
in turns in one pass (curve: metric, params, MB, ms per batch) -> the chosen level beside the input model and the
task's baselines (modelio.side_by_side, given those scores and timings; other eval splits scored there), under the
`max_metric_drop` quality gate.

What is removed: FFN intermediate neurons of every encoder layer (the rows of the FFN's input Linear, BERT's
`intermediate.dense` / ViT's `mlp.fc1`, and the matching columns of its output Linear, `output.dense` / `mlp.fc2`;
`transformers.pytorch_utils.prune_linear_layer` does the slicing). The same number of
neurons goes in every layer, each layer keeping its own most important ones, so `intermediate_size` in the saved
config.json describes the model and stock `AutoModelFor....from_pretrained` loads it (a per-layer count is not
representable in a stock config). Attention heads are not pruned: transformers 5 removed `prune_heads` and the
config's `pruned_heads`, and a BERT config derives the head width from hidden_size / num_attention_heads, so a model
with fewer heads than its config says cannot be loaded by stock from_pretrained.

`drop_layers: k` first removes k whole transformer layers: those whose skipping raises the loss on the importance
batches least (measured for either importance score); config.json's num_hidden_layers follows.

`sparsity` is the share of the encoder's parameters (the transformer layers, embeddings and head excluded) removed,
dropped layers included; a neuron costs 2 * hidden_size + 1 parameters. Importance (`importance:`):
  magnitude   L2 norm of the neuron's weights (its input Linear row and bias, its output Linear column); no data.
  taylor      first-order Taylor estimate of the loss change when the neuron is removed (Molchanov et al. 2019):
              |sum over the neuron's output Linear column of w * dL/dw| per batch (= |sum over tokens of
              a * dL/da| for the neuron's activation a), summed over `importance_batches` train batches of the card,
              the model in eval mode (no dropout: the same rows give the same scores on a resumed run).

Levels: `sparsity: 0.3` prunes once. `levels: [0.1, 0.3, 0.5]` prunes (and recovers) each level from the input model,
scores each on the first eval split, and records the curve in the manifest (`info.curve`, `metrics.curve_*`) and,
as `candidate` evaluations, in the report's trade-off chart. The stage's `model` output is the `sparsity` level when
given (it must be one of the levels), else, with `target_speedup: 1.5`, the smallest level whose batch runs 1.5x
as fast as the input model's (the curve's timing; the quality gate then judges it like any output), else the
largest level whose main metric drop passes `max_metric_drop`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines import basemodel, modelio, tasks
from pipelines.checkpoints import atomic_write_json
from pipelines.errors import PipelinesError
from pipelines.stage import Evaluation, RunContext, StageConfig, StageDef, StageResult
from pipelines.training import TrainConfig, callbacks, save_model, train, training_args, whole_run_loss

# config.json model_type of the encoders laid out as one of LAYOUTS (checked for validate; the loaded model's modules
# are checked again at run time)
ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "vit")
PRUNING = "pruning.json"  # beside config.json: what was removed (stock from_pretrained ignores it)


class RecoverConfig(BaseModel):
    """A short fine-tune of each pruned model on the card's train split (the Trainer of pipelines.training)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=1, batch_size=32, save_total_limit=1))
    max_train_samples: int | None = Field(2000, ge=1, description="Seeded subsample of train (None: all).")


class PruneConfig(StageConfig):
    model_path: str | None = Field(None, description="A local HF model folder (relative to the recipe), instead of a `model` input.")
    importance: Literal["magnitude", "taylor"] = "taylor"
    sparsity: float | None = Field(None, gt=0, lt=1, description="Share of the encoder's parameters to remove; "
                                   "with `levels`, the level the stage outputs.")
    levels: list[float] | None = Field(None, description="A sweep: every level pruned, scored and recorded; the output "
                                       "is `sparsity`, else the smallest level reaching target_speedup, else the "
                                       "largest level passing max_metric_drop.")
    target_speedup: float | None = Field(None, gt=1, description="A latency target, with levels: the output is the "
                                         "smallest level whose batch is this many times faster than the input model's "
                                         "(the curve's timing, latency_batch_size rows); none reaching it fails the stage.")
    drop_layers: int = Field(0, ge=0, description="Whole transformer layers removed first (those whose skipping raises "
                             "the train loss least), counted in sparsity; FFN neurons remove the rest.")
    importance_batches: int = Field(8, ge=1, description="taylor (and drop_layers): train batches the importance is "
                                    "measured on.")
    importance_batch_size: int = Field(32, ge=1)
    recover: RecoverConfig | None = Field(None, description="Fine-tune each pruned model briefly (None: no recovery).")
    max_length: int = Field(128, ge=8, description="Tokens per input (truncation), as in the finetune stage.")
    max_eval_samples: int | None = Field(None, ge=1)
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"], description="Those the card has.")
    latency_batch_size: int = Field(32, ge=1)
    latency_repeats: int = Field(20, ge=1)
    max_metric_drop: float | None = Field(
        None, ge=0, description="Quality gate: fail when the pruned model's main metric on validation is worse than the "
        "input model's by more than this, in the metric's units (accuracy 0.01 = one point).")

    @model_validator(mode="after")
    def _check(self):
        if self.levels is not None:
            if not self.levels or any(not 0 < x < 1 for x in self.levels) or len(set(self.levels)) != len(self.levels):
                raise ValueError("levels: a non-empty list of distinct shares between 0 and 1 (e.g. [0.1, 0.3, 0.5])")
            self.levels = sorted(self.levels)
            if self.sparsity is not None and self.sparsity not in self.levels:
                raise ValueError(f"sparsity {self.sparsity} (the level the stage outputs) is not one of levels {self.levels}")
            if self.sparsity is not None and self.target_speedup is not None:
                raise ValueError("give sparsity (the level to output) or target_speedup (the level fast enough), not both")
            if self.sparsity is None and self.target_speedup is None and self.max_metric_drop is None:
                raise ValueError("levels without sparsity: the output is the largest level passing max_metric_drop; "
                                 "give max_metric_drop, target_speedup (a latency target) or sparsity (the level to output)")
        elif self.target_speedup is not None:
            raise ValueError("target_speedup picks one of several levels: give levels (e.g. [0.2, 0.4, 0.6])")
        elif self.sparsity is None:
            raise ValueError("give sparsity (e.g. 0.3: a share of the encoder's parameters) or levels")
        return self

    def all_levels(self) -> list[float]:
        return self.levels or [self.sparsity]

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = basemodel.local_folder(self.model_path, recipe_dir)
        return {"model_path": folder} if folder else {}


# ---------------------------------------------------------------- what can be pruned


def task_problem(task) -> str | None:
    """Why the task's models are not pruned here, or None."""
    if task.family in ("encoder", "vision"):
        return None
    article = "an" if task.family[0] in "aeiou" else "a"
    return (f"prune: task {task.name} is {article} {task.family} model scored on what it generates; this stage prunes the FFN "
            f"neurons of encoder layers ({', '.join(ARCHITECTURES)}): use distill or quantize for {task.name}")


def architecture_problem(model_type: str | None, where: str) -> str | None:
    if model_type in ARCHITECTURES:
        return None
    return (f"prune: {where} is a {model_type!r} model; this stage prunes the FFN neurons of encoder layers laid out "
            f"as BERT's encoder.layer[i].intermediate / .output or ViT's layers[i].mlp ({', '.join(ARCHITECTURES)})")


# (the layers' ModuleList under the base model, the FFN's input Linear, its output Linear), as transformers 5.24 lays
# them out: BERT-family encoders, and ViT (5.x renamed its modules)
LAYOUTS = (("encoder.layer", "intermediate.dense", "output.dense"), ("layers", "mlp.fc1", "mlp.fc2"))


class FFN:
    """One layer's feed-forward block: its input Linear (one row per neuron) and output Linear (one column each)."""

    def __init__(self, layer, fc_in: str, fc_out: str):
        self.layer, self.names = layer, (fc_in, fc_out)

    @property
    def fc_in(self):
        return self.layer.get_submodule(self.names[0])

    @property
    def fc_out(self):
        return self.layer.get_submodule(self.names[1])

    def replace(self, fc_in, fc_out) -> None:
        for name, new in zip(self.names, (fc_in, fc_out)):
            parent, _, leaf = name.rpartition(".")
            setattr(self.layer.get_submodule(parent), leaf, new)


def _layer_list(model, with_path: bool = False):
    """(the ModuleList of transformer layers, its FFN layout[, its path under the base model]) or Nones."""
    import torch.nn as nn

    for path, fc_in, fc_out in LAYOUTS:
        try:
            layers = model.base_model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
                isinstance(_sub(x, fc_in), nn.Linear) and isinstance(_sub(x, fc_out), nn.Linear) for x in layers):
            return (layers, (fc_in, fc_out), path) if with_path else (layers, (fc_in, fc_out))
    return (None, None, None) if with_path else (None, None)


def set_layers(model, modules: list) -> None:
    """Replace the model's transformer layers by `modules` (in this order); config.num_hidden_layers follows."""
    import torch.nn as nn

    _, _, path = _layer_list(model, with_path=True)
    parent, _, leaf = path.rpartition(".")
    setattr(model.base_model.get_submodule(parent) if parent else model.base_model, leaf, nn.ModuleList(modules))
    model.config.num_hidden_layers = len(modules)


def _sub(module, name):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def ffn_layers(model) -> list[FFN]:
    """The FFN block of every transformer layer; PipelinesError when the model has none this stage knows."""
    layers, names = _layer_list(model)
    if layers is None or not hasattr(model.config, "intermediate_size"):
        raise PipelinesError(architecture_problem(model.config.model_type, f"the input model ({type(model).__name__})")
                             or f"prune: {type(model).__name__} has none of the FFN layouts this stage slices "
                             f"({', '.join(f'{p}[i].{a} / .{b}' for p, a, b in LAYOUTS)})")
    return [FFN(x, *names) for x in layers]


def encoder_parameters(model) -> int:
    """Parameters of the transformer layers (embeddings, final norm and head excluded)."""
    return modelio.num_parameters(_layer_list(model)[0])


# ---------------------------------------------------------------- importance


def importance(model, how: str, batches) -> list:
    """Per encoder layer, a tensor of one score per FFN neuron (higher = keep)."""
    import torch

    pairs = ffn_layers(model)
    if how == "magnitude":
        with torch.no_grad():
            return [(f.fc_in.weight.pow(2).sum(1) + f.fc_in.bias.pow(2) + f.fc_out.weight.pow(2).sum(0)).sqrt() for f in pairs]
    scores = [torch.zeros(f.fc_in.out_features) for f in pairs]
    model.eval()  # no dropout: deterministic scores
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for s, f in zip(scores, pairs):
                s += (f.fc_out.weight * f.fc_out.weight.grad).sum(0).abs()
    model.zero_grad(set_to_none=True)
    return scores


def layer_importance(model, batches) -> list[float]:
    """Per transformer layer: how much the mean loss on the batches rises when that layer is skipped (higher = keep).
    Measured the same way for both importance scores (a layer's weight norm says nothing about skipping it)."""
    import torch

    layers = list(_layer_list(model)[0])

    def loss() -> float:
        with torch.inference_mode():
            return sum(float(model(**b).loss) for b in batches) / len(batches)

    full, rises = loss(), []
    for i in range(len(layers)):
        set_layers(model, layers[:i] + layers[i + 1:])
        rises.append(round(loss() - full, 6))
    set_layers(model, layers)
    return rises


def importance_batches(cfg: PruneConfig, task, processor, model, train_raw, seed: int, label_names) -> list[dict]:
    from pipelines.tasks.base import batches

    n = min(len(train_raw), cfg.importance_batches * cfg.importance_batch_size)
    rows = train_raw.shuffle(seed=seed).select(range(n))
    data = task.encode(rows, processor, tasks.EvalOptions(max_length=cfg.max_length, label_names=label_names))
    return list(batches(data, task.collator(processor, model), cfg.importance_batch_size))


# ---------------------------------------------------------------- pruning


def neurons_to_remove(model, sparsity: float, drop_layers: int = 0) -> int:
    """FFN neurons per remaining layer that, with `drop_layers` whole layers removed first, remove `sparsity` of the
    (unpruned) model's encoder parameters (every layer is the same size)."""
    n_layers, enc = len(ffn_layers(model)), encoder_parameters(model)
    width, per_neuron = model.config.intermediate_size, 2 * model.config.hidden_size + 1
    if drop_layers >= n_layers:
        raise PipelinesError(f"prune: drop_layers {drop_layers}: the model has {n_layers} layers; keep at least one")
    left = n_layers - drop_layers
    target = sparsity * enc - drop_layers * enc / n_layers
    if target < 0:
        raise PipelinesError(f"prune: drop_layers {drop_layers} alone removes {drop_layers / n_layers:.2f} of the "
                             f"encoder's parameters, more than sparsity {sparsity:g}: drop fewer layers or prune more")
    n = round(target / (left * per_neuron))
    if n >= width:
        most = (drop_layers / n_layers) + (width - 1) * left * per_neuron / enc
        raise PipelinesError(f"prune: sparsity {sparsity:g} needs {n} of the {width} FFN neurons of every layer; FFN "
                             f"neurons{f' and {drop_layers} dropped layers' if drop_layers else ' alone'} reach at most "
                             f"{most:.2f} of this encoder's parameters" + ("" if drop_layers else " (drop_layers removes whole layers)"))
    return n


def prune_ffn(model, scores: list, remove: int) -> list[list[int]]:
    """Slice every layer's FFN in place down to its `intermediate_size - remove` most important neurons (in their
    original order); config.intermediate_size follows. Returns the kept neuron indices per layer."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    keep = model.config.intermediate_size - remove
    kept = []
    for f, s in zip(ffn_layers(model), scores):
        idx = torch.topk(s, keep).indices.sort().values
        f.replace(prune_linear_layer(f.fc_in, idx, dim=0), prune_linear_layer(f.fc_out, idx, dim=1))
        kept.append(idx.tolist())
    model.config.intermediate_size = keep
    return kept


# ---------------------------------------------------------------- recovery


def recover(cfg: PruneConfig, ctx: RunContext, task, model, processor, train_raw, label_names, folder: Path) -> dict:
    """A short fine-tune of the pruned model (checkpoints under the level's folder, resumable); returns its numbers."""
    from transformers import Trainer

    rc = cfg.recover
    rows = train_raw
    if rc.max_train_samples and len(rows) > rc.max_train_samples:
        rows = rows.shuffle(seed=ctx.seed).select(range(rc.max_train_samples))
    lctx = replace(ctx, stage_name=f"{ctx.stage_name}/{folder.name}", output_dir=folder)
    opts = tasks.EvalOptions(max_length=cfg.max_length, label_names=label_names)
    model.train()
    trainer = Trainer(
        model=model, args=training_args(rc.train, lctx, has_eval=False, **task.trainer_args),
        train_dataset=task.encode_train(rows, processor, opts), data_collator=task.collator(processor, model),
        processing_class=processor, compute_loss_func=task.loss_function(rows, opts, None), callbacks=callbacks(rc.train),
    )
    result = train(trainer, lctx)
    save_model(trainer, folder / "model", processor)
    model.eval()
    return {"train_rows": len(rows), "steps": result.global_step, "train_loss": whole_run_loss(trainer, result.training_loss)}


# ---------------------------------------------------------------- the stage


def level_name(level: float) -> str:
    return f"sparsity_{level:.2f}"


def prune_level(cfg: PruneConfig, ctx: RunContext, inp: Inputs, scores, layer_scores, level: float) -> dict:
    """One level: prune a fresh copy of the input model, [score it, recover it], save it, reload it with stock
    from_pretrained and check its logits against the in-memory model. Returns the level's record (model included)."""
    import torch

    task, processor, gate_raw = inp.task, inp.processor, inp.splits[inp.split0]
    model, _ = modelio.load_model(inp.src, dtype=torch.float32)
    enc_before, total_before = encoder_parameters(model), modelio.num_parameters(model)
    remove = neurons_to_remove(model, level, cfg.drop_layers)
    dropped = sorted(sorted(range(len(layer_scores)), key=lambda i: layer_scores[i])[:cfg.drop_layers])
    layers = list(_layer_list(model)[0])
    set_layers(model, [x for i, x in enumerate(layers) if i not in dropped])
    kept = prune_ffn(model, [sc for i, sc in enumerate(scores) if i not in dropped], remove)
    folder = ctx.output_dir / "levels" / level_name(level)
    rec: dict = {"sparsity": level, "dropped_layers": dropped, "num_hidden_layers": model.config.num_hidden_layers,
                 "neurons_removed_per_layer": remove, "intermediate_size": model.config.intermediate_size,
                 "encoder_sparsity": round(1 - encoder_parameters(model) / enc_before, 4),
                 "total_sparsity": round(1 - modelio.num_parameters(model) / total_before, 4)}
    if cfg.recover is not None:
        rec["before_recovery"] = task.evaluate(model.eval(), processor, gate_raw, inp.opts).metrics
        rec["recovery"] = recover(cfg, ctx, task, model, processor, inp.train, inp.label_names, folder)
    else:
        model.save_pretrained(folder / "model", safe_serialization=True)
        processor.save_pretrained(folder / "model")
    atomic_write_json(folder / "model" / PRUNING, {"method": "ffn_neurons" + (" + layers" if dropped else ""),
                                                   "importance": cfg.importance, **rec, "source": str(inp.src),
                                                   "kept_neurons": kept})
    reloaded = task.auto_class().from_pretrained(folder / "model").eval()  # stock transformers, nothing of ours
    rec["reload_max_abs_logit_diff"] = reload_diff(task, processor, model.eval(), reloaded, gate_raw, inp.opts)
    rec.update(model=reloaded, folder=folder / "model", label=f"pruned {level:.0%}")
    return rec


def reload_diff(task, processor, a, b, raw, opts) -> float:
    import torch

    batch = modelio.latency_batch(task, processor, a, raw, opts, 8)
    with torch.inference_mode():
        return float((a(**batch).logits - b(**batch).logits).abs().max())


def choose(cfg: PruneConfig, task, levels: list[dict], ref_metrics: dict, split: str, curve: dict) -> dict:
    """The level the stage outputs: `sparsity`; else the smallest level reaching `target_speedup` on the curve's
    timing (the quality gate then judges it as any output); else the largest level passing the quality gate (the
    gate's own check, modelio.quality_gate), and when none passes, the smallest, whose gate then fails the stage."""
    if cfg.sparsity is not None:
        return next(r for r in levels if r["sparsity"] == cfg.sparsity)
    if cfg.target_speedup is not None:
        speedups = {row["sparsity"]: row["speedup"] for row in curve["levels"]}
        fast = [r for r in levels if speedups[r["sparsity"]] >= cfg.target_speedup]
        if not fast:
            measured = ", ".join(f"{level:.0%}: {x:.2f}x" for level, x in speedups.items())
            raise PipelinesError(f"target_speedup {cfg.target_speedup}x: no level reaches it (batch of "
                                 f"{cfg.latency_batch_size}, measured {measured}); add higher levels, lower the target "
                                 "or add drop_layers (whole layers speed up more than their share of neurons)")
        return fast[0]
    for r in reversed(levels):
        try:
            modelio.quality_gate(task, {split: {"unpruned": ref_metrics, "pruned": r["metrics"]}},
                                 ("unpruned", "pruned"), cfg.max_metric_drop, "prune")
            return r
        except PipelinesError:
            continue
    return levels[0]


@dataclass
class Inputs:
    """What every step reads: the input model (fp32, eval mode), its task and processor, the card's rows."""

    src: Path
    model: object
    task: object
    processor: object
    train: object  # the card's whole train split
    splits: dict  # eval split -> rows (first max_eval_samples)
    opts: tasks.EvalOptions
    label_names: list[str] | None

    @property
    def split0(self) -> str:
        return next(iter(self.splits))


def load_inputs(cfg: PruneConfig, ctx: RunContext) -> Inputs:
    """The input model (refused when quantized, of a task or architecture this stage cannot prune, or when a level
    cannot be reached), then the card's rows checked against its task."""
    import torch

    src = modelio.input_model_dir(ctx, cfg.model_path, "prune")
    if modelio.read_recipe(src) is not None:
        raise PipelinesError(f"{src} is quantized; prune a full-precision model (and quantize after pruning)")
    model, task = modelio.load_model(src, dtype=torch.float32)
    if problem := task_problem(task):
        raise PipelinesError(problem)
    for level in cfg.all_levels():  # the architecture and every level checked before any data work
        neurons_to_remove(model, level, cfg.drop_layers)
    processor = modelio.load_processor(task, src)
    task.prepare_processor(processor)
    dsd = ctx.data.load(seed=ctx.seed)
    label_names = task.check_data(ctx.data, dsd)
    if "train" not in dsd:
        raise PipelinesError(f"data card {ctx.data.path} has no train split (importance and recovery read it)")
    splits = {s: dsd[s] for s in cfg.eval_splits if s in dsd and s != "train"}
    if not splits:
        raise PipelinesError(f"the data card has none of the eval splits {cfg.eval_splits} (has {list(dsd)})")
    if cfg.max_eval_samples:
        splits = {s: d.select(range(min(len(d), cfg.max_eval_samples))) for s, d in splits.items()}
    return Inputs(src, model, task, processor, dsd["train"], splits,
                  tasks.EvalOptions(max_length=cfg.max_length, label_names=label_names), label_names)


def measure_importance(cfg: PruneConfig, ctx: RunContext, inp: Inputs) -> tuple[list, list[float]]:
    """(per layer, one score per FFN neuron; per layer, the loss rise when it is skipped), once, on the input model."""
    needs_data = cfg.importance == "taylor" or cfg.drop_layers > 0
    batches = importance_batches(cfg, inp.task, inp.processor, inp.model, inp.train, ctx.seed, inp.label_names) if needs_data else []
    scores = importance(inp.model, cfg.importance, batches)
    layer_scores = layer_importance(inp.model, batches) if cfg.drop_layers else [0.0] * len(scores)
    ctx.log(f"{cfg.importance} importance of {sum(len(s) for s in scores):,} FFN neurons in {len(scores)} layers"
            + (f" ({len(batches)} train batches)" if batches else "")
            + (f"; train loss rise when each layer is skipped: {layer_scores}" if cfg.drop_layers else ""))
    return scores, layer_scores


def sweep(cfg: PruneConfig, ctx: RunContext, inp: Inputs, scores, layer_scores) -> tuple:
    """(the input model scored on the first eval split; every level pruned, [recovered,] saved, reloaded and scored
    there: `scored`, its `metrics`). Each model is scored once: the curve, the choice, the gate and the stage's
    evaluations all read these (the reloaded folder's model is the one scored: what the stage outputs)."""
    main, split0 = inp.task.main_metric, inp.split0
    ref = inp.task.evaluate(inp.model, inp.processor, inp.splits[split0], inp.opts)
    ref_metrics = ref.metrics
    levels = []
    for level in cfg.all_levels():
        rec = prune_level(cfg, ctx, inp, scores, layer_scores, level)
        rec["scored"] = inp.task.evaluate(rec["model"], inp.processor, inp.splits[split0], inp.opts)
        rec["metrics"] = rec["scored"].metrics
        ctx.log(f"{level:.0%}: {rec['num_hidden_layers']} layers (dropped {rec['dropped_layers']}), intermediate_size "
                f"{rec['intermediate_size']}, {modelio.num_parameters(rec['model']):,} params, "
                f"{split0} {main} {rec['metrics'][main]:.4f} (unpruned {ref_metrics[main]:.4f})")
        levels.append(rec)
    return ref, levels


def run(cfg: PruneConfig, ctx: RunContext) -> StageResult:
    inp = load_inputs(cfg, ctx)
    scores, layer_scores = measure_importance(cfg, ctx, inp)
    ref, levels = sweep(cfg, ctx, inp, scores, layer_scores)
    curve, timed = measure_curve(cfg, inp, levels, ref.metrics)
    chosen = choose(cfg, inp.task, levels, ref.metrics, inp.split0, curve)
    return score_chosen(cfg, ctx, inp, ref, chosen, levels, curve, timed, layer_scores)


def score_chosen(cfg: PruneConfig, ctx: RunContext, inp: Inputs, ref, chosen: dict, levels: list[dict], curve: dict,
                 timed: dict, layer_scores) -> StageResult:
    """The chosen level beside the input model and the task's baselines on every eval split, under the quality gate,
    their first-split scores and latencies those of the sweep (not measured again); the other levels as candidate
    evaluations."""
    task, split0 = inp.task, inp.split0
    out = chosen["folder"]
    metrics, per_split, evaluations, lat, first = modelio.side_by_side(
        task,
        [modelio.Entry("unpruned", "reference", inp.model, inp.processor, inp.src, "unpruned_"),
         modelio.Entry("pruned", "output", chosen["model"], inp.processor, out, "")],
        inp.splits, inp.opts, train_raw=inp.train,
        scored={split0: {"unpruned": ref, "pruned": chosen["scored"]}},
        latency={"unpruned": timed["unpruned"], "pruned": timed[chosen["label"]]},
    )
    evaluations += [Evaluation(r["label"], "candidate", split0, r["metrics"], folder=str(r["folder"]), params=c["params"],
                               size_mb=c["size_mb"], latency_ms=c["ms"])
                    for r, c in zip(levels, curve["levels"]) if r is not chosen]
    gate = modelio.quality_gate(task, per_split, ("unpruned", "pruned"), cfg.max_metric_drop, "prune")
    atomic_write_json(ctx.output_dir / "predictions.json", {"split": split0, "task": task.name,
                                                            "outputs": first["pruned"].outputs})
    p, p_ref = modelio.num_parameters(chosen["model"]), modelio.num_parameters(inp.model)
    metrics.update(
        sparsity=chosen["sparsity"], encoder_sparsity=chosen["encoder_sparsity"], params=p, unpruned_params=p_ref,
        params_ratio=round(p / p_ref, 4), pruned_mb=modelio.size_on_disk_mb(out), unpruned_mb=modelio.size_on_disk_mb(inp.src),
        pruned_ms=lat["pruned"]["median_ms"], unpruned_ms=lat["unpruned"]["median_ms"],
        speedup=round(lat["unpruned"]["median_ms"] / lat["pruned"]["median_ms"], 3),
        **{f"curve_{level_name(c['sparsity'])}_{k}": c[k] for c in curve["levels"] for k in (task.main_metric, "speedup")},
    )
    return StageResult(
        metrics=metrics,
        outputs={"model": str(out.relative_to(ctx.output_dir))},
        task=task.name,
        evaluations=evaluations,
        info={
            "task": task.name, "source": str(inp.src), "importance": cfg.importance,
            "what": "FFN intermediate neurons" + (f" and {cfg.drop_layers} whole layers" if cfg.drop_layers else ""),
            "layer_importance": layer_scores if cfg.drop_layers else None,
            "chosen": chosen["sparsity"],
            "choice": "sparsity (given)" if cfg.sparsity is not None else "the largest level passing max_metric_drop",
            "curve": curve, "eval": per_split,
            "latency": {**lat, "batch_size": cfg.latency_batch_size, "split": split0, "threads": modelio.threads(),
                        "repeats": cfg.latency_repeats,
                        "what": "median ms of one forward pass, the unpruned model and every level timed in turns "
                                "in one process (the curve's pass)"},
            "reload": "stock AutoModelFor...from_pretrained(folder) (config.json's intermediate_size, num_hidden_layers)",
            "baselines": task.baseline_notes(), "quality_gate": gate,
        },
    )


def measure_curve(cfg: PruneConfig, inp: Inputs, levels: list[dict], ref_metrics: dict) -> tuple[dict, dict]:
    """(the accuracy / size / latency curve; the latency rows): the input model and every level timed in turns on
    the same batch, once (modelio.time_models, as side_by_side times)."""
    task, model = inp.task, inp.model
    models = {"unpruned": (model, inp.processor), **{r["label"]: (r["model"], inp.processor) for r in levels}}
    lat = modelio.time_models(task, models, inp.splits[inp.split0], inp.opts, cfg.latency_batch_size, cfg.latency_repeats)
    main, up = task.main_metric, task.greater_is_better
    rows = []
    for r in levels:
        drop = (ref_metrics[main] - r["metrics"][main]) * (1 if up else -1)
        row = {k: v for k, v in r.items() if k not in ("model", "folder", "label", "metrics", "scored")}
        row.update({main: r["metrics"][main], "drop": round(drop, 6), "params": modelio.num_parameters(r["model"]),
                    "size_mb": modelio.size_on_disk_mb(r["folder"]), "ms": lat[r["label"]]["median_ms"],
                    "speedup": round(lat["unpruned"]["median_ms"] / lat[r["label"]]["median_ms"], 3)})
        if "before_recovery" in r:
            row[f"{main}_before_recovery"] = r["before_recovery"][main]
        rows.append(row)
    return {"unpruned": {main: ref_metrics[main], "params": modelio.num_parameters(model),
                         "size_mb": modelio.size_on_disk_mb(inp.src), "ms": lat["unpruned"]["median_ms"]},
            "levels": rows, "batch_size": cfg.latency_batch_size, "metric": main}, lat


def plan(cfg: PruneConfig, inputs: dict, recipe_dir: Path, card):
    """The input model's task (an earlier stage's, or the local folder's config.json), refused when the stage cannot
    prune it (generative tasks; a local folder of another architecture); the card checked against it."""
    name, problems = modelio.planned_task(inputs, "model", cfg.model_path, "model_path", recipe_dir)
    if name:
        task = tasks.get(name)
        if problem := task_problem(task):
            problems.append(problem)
        elif cfg.model_path is not None:
            folder = (Path(recipe_dir) / cfg.model_path).expanduser().resolve()
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            if problem := architecture_problem(model_type, f"model_path {cfg.model_path!r}"):
                problems.append(problem)
        if card is not None:
            problems += task.data_problems(card.roles, card.label_names, card.path)
    return name, problems


STAGE = StageDef(
    name="prune",
    Config=PruneConfig,
    run=run,
    version="1",
    inputs={"model": "optional"},
    data="required",
    distributed=False,
    plan=plan,
    description="Structured pruning of encoder FFN neurons (magnitude or Taylor importance), optional recovery, "
                "a sweep of levels, each re-evaluated.",
)
