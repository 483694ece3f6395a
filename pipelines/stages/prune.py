"""prune stage: structured pruning that really removes weights (smaller matrices, not masked zeros), then
re-evaluation beside the input model, for one pruning level or a sweep of levels.

input model -> importance of every FFN neuron (train rows of the card) -> per level: slice the FFN Linear layers,
[recover: a short fine-tune through pipelines.training] -> save a plain HF folder -> reload it with stock
from_pretrained -> score the input model and every reloaded level on the first eval split, once, and time them all
in turns in one pass (curve: metric, params, MB, ms per batch) -> the chosen level beside the input model and the
task's baselines (modelio.side_by_side, given those scores and timings; other eval splits scored there), under the
`max_metric_drop` quality gate.

What is removed: FFN intermediate neurons of every transformer layer (the outputs of the FFN's input projections,
BERT's `intermediate.dense` / ViT's `mlp.fc1` / Llama's `mlp.gate_proj` and `mlp.up_proj` / GPT-2's Conv1D `mlp.c_fc`,
and the matching inputs of its output projection, `output.dense` / `mlp.fc2` / `mlp.down_proj` / `mlp.c_proj`;
`transformers.pytorch_utils.prune_linear_layer` slices a Linear, keep_rows / keep_columns a Conv1D). The same number
of neurons goes in every layer, each layer keeping its own most important ones, so the FFN width in the saved
config.json (`intermediate_size`, GPT-2's `n_inner`) describes the model and stock `AutoModelFor....from_pretrained`
loads it (a per-layer count is not representable in a stock config). An encoder-decoder (Marian, BART: `fc1` /
`fc2` of encoder.layers[i] and decoder.layers[i]) loses the same number of neurons in every layer of both stacks
(config.json's encoder_ffn_dim and decoder_ffn_dim follow); it is scored by what it generates (BLEU, ROUGE), and
`drop_layers` is for single-stack models.

`drop_heads: k` removes k query heads from every layer of a Llama-style decoder (llama, mistral, qwen2, qwen3, gemma,
gemma2, granite), as whole key/value groups (a key head, a value head and the query heads that read them under
GQA): their q / k / v rows and o_proj columns go, each layer keeping its most important groups; config.json's
num_attention_heads and num_key_value_heads follow and head_dim is written out, which those configs read. BERT-style and GPT-2 heads are not
pruned: their configs derive the head width from hidden_size / num_attention_heads, so a model with fewer heads than
its config says cannot be loaded by stock from_pretrained (transformers 5 removed `prune_heads` and `pruned_heads`).

`drop_layers: k` first removes k whole transformer layers: those whose skipping raises the loss on the importance
batches least (measured for either importance score); config.json's num_hidden_layers follows (a decoder's layers
are renumbered for the KV cache; Qwen2's layer_types follows).

`sparsity` is the share of the transformer layers' parameters (embeddings, final norm and head excluded) removed,
dropped layers and heads included; a neuron costs its input rows (and biases) and its output column (BERT:
2 * hidden_size + 1). Importance (`importance:`), of neurons and of key/value groups alike:
  magnitude   L2 norm of the unit's weights (its input rows and biases, its output columns); no data.
  taylor      first-order Taylor estimate of the loss change when the unit is removed (Molchanov et al. 2019):
              |sum over the unit's output-projection columns of w * dL/dw| per batch (= |sum over tokens of
              a * dL/da| for its activations a: a neuron's, or a group's attention outputs entering o_proj), summed
              over `importance_batches` train batches of the card, the model in eval mode (no dropout: the same rows
              give the same scores on a resumed run).

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

# config.json model_type of the models laid out as one of LAYOUTS (checked for validate and when the stage starts; the
# loaded model's modules are checked against LAYOUTS too)
ARCHITECTURES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "vit", "llama", "mistral", "qwen2", "qwen3",
                 "gemma", "gemma2", "granite", "gpt2", "marian", "bart")
TWO_STACKS = ("marian", "bart")  # encoder-decoders: FFN neurons in both stacks; no drop_layers
HEAD_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite")  # their configs carry head_dim: fewer heads reload with stock transformers
PRUNING = "pruning.json"  # beside config.json: what was removed (stock from_pretrained ignores it)


class RecoverConfig(BaseModel):
    """A short fine-tune of each pruned model on the card's train split (the Trainer of pipelines.training)."""

    model_config = ConfigDict(extra="forbid")

    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-5, epochs=1, batch_size=32, save_total_limit=1))
    max_train_samples: int | None = Field(2000, ge=1, description="Seeded subsample of train (None: all).")


class PruneConfig(StageConfig):
    model_path: str | None = Field(None, description="A local HF model folder (relative to the recipe), instead of a `model` input.")
    importance: Literal["magnitude", "taylor"] = "taylor"
    sparsity: float | None = Field(None, gt=0, lt=1, description="Share of the transformer layers' parameters to remove; "
                                   "with `levels`, the level the stage outputs.")
    levels: list[float] | None = Field(None, description="A sweep: every level pruned, scored and recorded; the output "
                                       "is `sparsity`, else the smallest level reaching target_speedup, else the "
                                       "largest level passing max_metric_drop.")
    target_speedup: float | None = Field(None, gt=1, description="A latency target, with levels: the output is the "
                                         "smallest level whose batch is this many times faster than the input model's "
                                         "(the curve's timing, latency_batch_size rows); none reaching it fails the stage.")
    drop_layers: int = Field(0, ge=0, description="Whole transformer layers removed first (those whose skipping raises "
                             "the train loss least), counted in sparsity; FFN neurons remove the rest.")
    drop_heads: int = Field(0, ge=0, description="Query heads removed from every layer (Llama-style decoders: whole "
                            "key/value groups, a multiple of the group size), chosen by `importance`, counted in "
                            "sparsity; FFN neurons remove the rest.")
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


def architecture_problem(model_type: str | None, where: str) -> str | None:
    if model_type in ARCHITECTURES:
        return None
    return (f"prune: {where} is a {model_type!r} model; this stage prunes the FFN neurons of transformer layers laid out "
            f"as {', '.join(ARCHITECTURES)} ({'; '.join(x.describe() for x in LAYOUTS)})")


def heads_problem(model_type: str | None, where: str) -> str | None:
    if model_type in HEAD_ARCHITECTURES:
        return None
    return (f"prune: drop_heads: {where} is a {model_type!r} model; attention heads are pruned in "
            f"{', '.join(HEAD_ARCHITECTURES)} (their config.json says head_dim), not in BERT-style or GPT-2 models, "
            "whose head width is hidden_size / num_attention_heads (a model with fewer heads than that cannot be "
            "loaded by stock from_pretrained; transformers 5 removed prune_heads)")


@dataclass(frozen=True)
class Layout:
    """Where a family of models keeps its transformer layers: per stack (an encoder-decoder has two), its ModuleList
    under model.base_model and the config key of its FFN width; in each layer, the FFN's Linear (or GPT-2 Conv1D)
    layers whose outputs are its neurons and the one that reads them; and, where heads can be pruned, the attention's
    q, k, v and o projections."""

    stacks: tuple[tuple[str, str], ...]
    ffn_in: tuple[str, ...]
    ffn_out: str
    attention: tuple[str, str, str, str] | None = None

    def describe(self) -> str:
        return " + ".join(f"{path}[i].{self.ffn_out}" for path, _ in self.stacks)


# as transformers 5.24 lays them out: BERT-family encoders, ViT (5.x renamed its modules), Llama-style decoders, GPT-2,
# BART / Marian encoder-decoders
LAYOUTS = (
    Layout((("encoder.layer", "intermediate_size"),), ("intermediate.dense",), "output.dense"),
    Layout((("layers", "intermediate_size"),), ("mlp.fc1",), "mlp.fc2"),
    Layout((("layers", "intermediate_size"),), ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),
    Layout((("h", "n_inner"),), ("mlp.c_fc",), "mlp.c_proj"),
    Layout((("encoder.layers", "encoder_ffn_dim"), ("decoder.layers", "decoder_ffn_dim")), ("fc1",), "fc2"),
)


def _projection(module) -> bool:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def out_view(tensor, module):
    """A projection's weight (or its grad) as [outputs, inputs] (GPT-2's Conv1D stores it as [inputs, outputs])."""
    import torch.nn as nn

    return tensor if isinstance(module, nn.Linear) else tensor.t()


def keep_rows(module, idx):
    """The projection with only the outputs `idx` (a new module, a copy of those weights)."""
    import torch.nn as nn
    from transformers.pytorch_utils import prune_linear_layer

    if isinstance(module, nn.Linear):
        return prune_linear_layer(module, idx, dim=0)
    return _conv1d(module.weight[:, idx], module.bias[idx])


def keep_columns(module, idx):
    """The projection reading only the inputs `idx`."""
    import torch.nn as nn
    from transformers.pytorch_utils import prune_linear_layer

    if isinstance(module, nn.Linear):
        return prune_linear_layer(module, idx, dim=1)
    return _conv1d(module.weight[idx, :], module.bias)


def _conv1d(weight, bias):
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    new = Conv1D(weight.shape[1], weight.shape[0]).to(weight.device, weight.dtype)
    new.weight, new.bias = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    return new


class Block:
    """A few named projections of one transformer layer, read and replaced by name."""

    def __init__(self, layer, names: tuple[str, ...]):
        self.layer, self.names = layer, names

    def __getitem__(self, name: str):
        return self.layer.get_submodule(name)

    def set(self, name: str, new) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.layer.get_submodule(parent), leaf, new)

    def modules(self):
        return [self[n] for n in self.names]


class FFN(Block):
    """One layer's feed-forward block: its input projections (one output per neuron; Llama: gate and up) and its
    output projection (one input per neuron)."""

    def __init__(self, layer, layout: Layout):
        super().__init__(layer, (*layout.ffn_in, layout.ffn_out))
        self.ins, self.out = layout.ffn_in, layout.ffn_out

    @property
    def width(self) -> int:
        return out_view(self[self.ins[0]].weight, self[self.ins[0]]).shape[0]

    def keep(self, idx) -> None:
        for name in self.ins:
            self.set(name, keep_rows(self[name], idx))
        self.set(self.out, keep_columns(self[self.out], idx))


def _stacks(model):
    """(its Layout, [(path, ModuleList, config key of its FFN width)] per stack) or (None, None)."""
    import torch.nn as nn

    for layout in LAYOUTS:
        names = (*layout.ffn_in, layout.ffn_out, *(layout.attention or ()))
        stacks = []
        for path, width in layout.stacks:
            layers = _sub(model.base_model, path)
            if not (isinstance(layers, nn.ModuleList) and len(layers)
                    and all(_projection(_sub(x, n)) for x in layers for n in names)):
                break
            stacks.append((path, layers, width))
        else:
            return layout, stacks
    return None, None


def _layer_list(model):
    """(every transformer layer, of all stacks in order; the Layout) or Nones."""
    layout, stacks = _stacks(model)
    if layout is None:
        return None, None
    return [x for _, layers, _ in stacks for x in layers], layout


def _one_stack(model, what: str):
    """The (path, ModuleList) of a single-stack model; PipelinesError for an encoder-decoder."""
    layout, stacks = _stacks(model)
    if len(stacks) != 1:
        raise PipelinesError(f"prune: {what}: {model.config.model_type} has {len(stacks)} stacks of layers "
                             f"({', '.join(p for p, _, _ in stacks)}); {what} is for single-stack models (FFN neurons "
                             "are pruned in both stacks)")
    return stacks[0][:2]


def set_layers(model, modules: list) -> None:
    """Replace the model's transformer layers by `modules` (in this order); config.num_hidden_layers and each
    layer's layer_idx (a decoder's KV-cache slot) follow."""
    import torch.nn as nn

    path, _ = _one_stack(model, "drop_layers")
    parent, _, leaf = path.rpartition(".")
    setattr(model.base_model.get_submodule(parent) if parent else model.base_model, leaf, nn.ModuleList(modules))
    for i, layer in enumerate(modules):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    model.config.num_hidden_layers = len(modules)


def remove_layers(model, dropped: list[int]) -> None:
    """Remove the layers `dropped` (indices); a per-layer config list (Qwen2's layer_types) follows."""
    if not dropped:
        return
    layers = list(_one_stack(model, "drop_layers")[1])
    set_layers(model, [x for i, x in enumerate(layers) if i not in dropped])
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in dropped]


def _sub(module, name):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def ffn_layers(model) -> list[FFN]:
    """The FFN block of every transformer layer; PipelinesError when the model has none this stage knows."""
    layers, layout = _layer_list(model)
    if layers is None:
        raise PipelinesError(architecture_problem(model.config.model_type, f"the input model ({type(model).__name__})")
                             or f"prune: {type(model).__name__} has none of the FFN layouts this stage slices "
                             f"({'; '.join(x.describe() for x in LAYOUTS)})")
    return [FFN(x, layout) for x in layers]


@dataclass(frozen=True)
class Heads:
    """A decoder's attention shape: query heads, key/value heads (GQA), query heads per key/value head, head width."""

    n: int
    kv: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.n // self.kv


def attention_heads(model) -> Heads | None:
    """The attention shape of a model whose heads this stage prunes (a Llama-style layout), else None."""
    layers, layout = _layer_list(model)
    if layers is None or layout.attention is None or model.config.model_type not in HEAD_ARCHITECTURES:
        return None
    c = model.config
    n = c.num_attention_heads
    return Heads(n, getattr(c, "num_key_value_heads", None) or n, getattr(c, "head_dim", None) or c.hidden_size // n)


def attention_blocks(model) -> list[Block]:
    layers, layout = _layer_list(model)
    return [Block(x, layout.attention) for x in layers]


def layer_parameters(model) -> int:
    """Parameters of the transformer layers (embeddings, final norm and head excluded): what `sparsity` is a share of."""
    return sum(modelio.num_parameters(layers) for _, layers, _ in _stacks(model)[1])


def stack_widths(model) -> dict[str, int]:
    """Config key of each stack's FFN width -> the width its layers have (every layer of a stack alike)."""
    layout, stacks = _stacks(model)
    return {key: FFN(layers[0], layout).width for _, layers, key in stacks}


def neuron_parameters(model) -> int:
    """Parameters one FFN neuron costs: a row (and bias) of each input projection, a column of the output one."""
    f = ffn_layers(model)[0]
    return sum(out_view(f[n].weight, f[n]).shape[1] + (f[n].bias is not None) for n in f.ins) + out_view(
        f[f.out].weight, f[f.out]).shape[0]


def group_parameters(model) -> int:
    """Parameters one key/value group costs (its key and value heads, its query heads, their o_proj columns)."""
    h, b = attention_heads(model), attention_blocks(model)[0]
    q, k, v, o = b.modules()
    rows = sum((m.in_features + (m.bias is not None)) * h.head_dim * count for m, count in ((q, h.group), (k, 1), (v, 1)))
    return rows + o.out_features * h.head_dim * h.group


# ---------------------------------------------------------------- importance


@dataclass
class Importance:
    """Per transformer layer, one score per FFN neuron, and (when heads are pruned) one per key/value group."""

    ffn: list
    heads: list | None = None


def importance(model, how: str, batches, heads: bool = False) -> Importance:
    """Higher = keep. magnitude: the L2 norm of a neuron's (a group's) weights; taylor: |sum of w * dL/dw| over its
    output projection's columns (a neuron's down / output column, a group's o_proj columns), summed per batch."""
    import torch

    ffns = ffn_layers(model)
    attn = attention_blocks(model) if heads else []
    h = attention_heads(model) if heads else None
    if how == "magnitude":
        with torch.no_grad():
            ffn = [_ffn_norms(f) for f in ffns]
            return Importance(ffn, [_group_norms(b, h) for b in attn] if heads else None)
    ffn = [torch.zeros(f.width) for f in ffns]
    groups = [torch.zeros(h.kv) for _ in attn]
    model.eval()  # no dropout: deterministic scores
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        with torch.no_grad():
            for s, f in zip(ffn, ffns):
                s += _wg(f[f.out]).sum(0).abs()
            for s, b in zip(groups, attn):
                s += _wg(b.modules()[3]).sum(0).view(h.kv, -1).sum(1).abs()
    model.zero_grad(set_to_none=True)
    return Importance(ffn, groups if heads else None)


def _wg(module):
    """w * dL/dw of a projection, as [outputs, inputs]."""
    return out_view(module.weight * module.weight.grad, module)


def _rows_sq(m, per: int = 1):
    """Squared L2 norm of each `per` consecutive outputs of a projection (their weight rows and biases)."""
    w = out_view(m.weight, m).pow(2).sum(1) + (m.bias.pow(2) if m.bias is not None else 0)
    return w.view(-1, per).sum(1)


def _columns_sq(m, per: int = 1):
    """Squared L2 norm of each `per` consecutive inputs of a projection (their weight columns)."""
    return out_view(m.weight, m).pow(2).sum(0).view(-1, per).sum(1)


def _ffn_norms(f: FFN):
    return (sum(_rows_sq(f[n]) for n in f.ins) + _columns_sq(f[f.out])).sqrt()


def _group_norms(block: Block, h: Heads):
    """Per key/value group: the L2 norm of its query, key and value rows and its o_proj columns."""
    q, k, v, o = block.modules()
    width = h.head_dim * h.group
    return (_rows_sq(q, width) + _rows_sq(k, h.head_dim) + _rows_sq(v, h.head_dim) + _columns_sq(o, width)).sqrt()


def layer_importance(model, batches) -> list[float]:
    """Per transformer layer: how much the mean loss on the batches rises when that layer is skipped (higher = keep).
    Measured the same way for both importance scores (a layer's weight norm says nothing about skipping it)."""
    import torch

    layers = list(_one_stack(model, "drop_layers")[1])

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


def neurons_to_remove(model, sparsity: float, drop_layers: int = 0, drop_heads: int = 0) -> int:
    """FFN neurons per remaining layer that, with `drop_layers` whole layers and `drop_heads` query heads per layer
    (whole key/value groups) removed first, remove `sparsity` of the (unpruned) model's layer parameters (every layer
    is the same size)."""
    check_heads(model, drop_heads)
    ffns = ffn_layers(model)
    if drop_layers:
        _one_stack(model, "drop_layers")
    n_layers, total = len(ffns), layer_parameters(model)
    widths = stack_widths(model)
    if len(set(widths.values())) > 1:
        raise PipelinesError(f"prune: the FFN widths of the model's stacks differ ({widths}); this stage removes the "
                             "same number of neurons from every layer")
    width, per_neuron = ffns[0].width, neuron_parameters(model)
    if drop_layers >= n_layers:
        raise PipelinesError(f"prune: drop_layers {drop_layers}: the model has {n_layers} layers; keep at least one")
    left = n_layers - drop_layers
    heads = drop_heads // attention_heads(model).group * group_parameters(model) * left if drop_heads else 0
    target = sparsity * total - drop_layers * total / n_layers - heads
    if target < 0:
        what = " and ".join(x for x in (f"drop_layers {drop_layers}" if drop_layers else "",
                                        f"drop_heads {drop_heads}" if drop_heads else "") if x)
        raise PipelinesError(f"prune: {what} alone remove{'s' if ' and ' not in what else ''} "
                             f"{(sparsity * total - target) / total:.2f} of the layers' parameters, more than sparsity "
                             f"{sparsity:g}: drop fewer "
                             f"{' or '.join(x for x, n in (('layers', drop_layers), ('heads', drop_heads)) if n)} or prune more")
    n = round(target / (left * per_neuron))
    if n >= width:
        most = (sparsity * total - target + (width - 1) * left * per_neuron) / total
        extra = " and ".join(x for x in (f"{drop_layers} dropped layers" if drop_layers else "",
                                         f"{drop_heads} heads per layer" if drop_heads else "") if x)
        raise PipelinesError(f"prune: sparsity {sparsity:g} needs {n} of the {width} FFN neurons of every layer; FFN "
                             f"neurons{f' and {extra}' if extra else ' alone'} reach at most {most:.2f} of this "
                             "model's layer parameters" + ("" if drop_layers else " (drop_layers removes whole layers)"))
    return n


def check_heads(model, drop_heads: int) -> None:
    """PipelinesError unless `drop_heads` query heads can go from every layer: whole key/value groups, one kept."""
    if not drop_heads:
        return
    h = attention_heads(model)
    if h is None:
        raise PipelinesError(heads_problem(model.config.model_type, f"the input model ({type(model).__name__})"))
    if drop_heads % h.group or drop_heads >= h.n:
        raise PipelinesError(f"prune: drop_heads {drop_heads}: the model's layers have {h.n} query heads in {h.kv} "
                             f"key/value groups of {h.group}; whole groups go (a multiple of {h.group}), and at least "
                             "one stays")


def prune_ffn(model, scores: list, remove: int) -> list[list[int]]:
    """Slice every layer's FFN in place down to its `width - remove` most important neurons (in their original
    order); the config's FFN width follows. Returns the kept neuron indices per layer."""
    import torch

    kept = []
    for f, s in zip(ffn_layers(model), scores):
        idx = torch.topk(s, f.width - remove).indices.sort().values
        f.keep(idx)
        kept.append(idx.tolist())
    for key, width in stack_widths(model).items():
        setattr(model.config, key, width)
    return kept


def prune_heads(model, scores: list, drop_heads: int) -> list[list[int]]:
    """Remove `drop_heads` query heads from every layer, as whole key/value groups (a key head, a value head and
    the query heads reading them), each layer keeping its most important groups; config.json's
    num_attention_heads / num_key_value_heads follow, head_dim written out. Returns the kept groups per layer."""
    import torch

    h = attention_heads(model)
    keep = h.kv - drop_heads // h.group
    kept = []
    for b, s in zip(attention_blocks(model), scores):
        groups = torch.topk(s, keep).indices.sort().values
        kv = torch.cat([torch.arange(g * h.head_dim, (g + 1) * h.head_dim) for g in groups.tolist()])
        q = torch.cat([torch.arange(g * h.group * h.head_dim, (g + 1) * h.group * h.head_dim) for g in groups.tolist()])
        qn, kn, vn, on = b.names
        b.set(qn, keep_rows(b[qn], q))
        b.set(kn, keep_rows(b[kn], kv))
        b.set(vn, keep_rows(b[vn], kv))
        b.set(on, keep_columns(b[on], q))
        kept.append(groups.tolist())
    c = model.config
    c.num_attention_heads, c.num_key_value_heads, c.head_dim = keep * h.group, keep, h.head_dim
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
    # accelerate leaves a mixed-precision run's autocast wrapper on model.forward: take it off, so the in-memory
    # model checked against the reloaded folder (reload_diff) runs in fp32 as the folder does
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
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
    enc_before, total_before = layer_parameters(model), modelio.num_parameters(model)
    remove = neurons_to_remove(model, level, cfg.drop_layers, cfg.drop_heads)
    dropped = sorted(sorted(range(len(layer_scores)), key=lambda i: layer_scores[i])[:cfg.drop_layers])
    remove_layers(model, dropped)
    kept_groups = prune_heads(model, [sc for i, sc in enumerate(scores.heads) if i not in dropped],
                              cfg.drop_heads) if cfg.drop_heads else None
    kept = prune_ffn(model, [sc for i, sc in enumerate(scores.ffn) if i not in dropped], remove)
    widths = stack_widths(model)
    folder = ctx.output_dir / "levels" / level_name(level)
    rec: dict = {"sparsity": level, "dropped_layers": dropped, "num_hidden_layers": model.config.num_hidden_layers,
                 "neurons_removed_per_layer": remove, "intermediate_size": next(iter(widths.values())),
                 **({"ffn_widths": widths} if len(widths) > 1 else {}),
                 **({"heads_removed_per_layer": cfg.drop_heads, "num_attention_heads": model.config.num_attention_heads,
                     "num_key_value_heads": model.config.num_key_value_heads} if cfg.drop_heads else {}),
                 "encoder_sparsity": round(1 - layer_parameters(model) / enc_before, 4),
                 "total_sparsity": round(1 - modelio.num_parameters(model) / total_before, 4)}
    if cfg.recover is not None:
        rec["before_recovery"] = task.evaluate(model.eval(), processor, gate_raw, inp.opts).metrics
        rec["recovery"] = recover(cfg, ctx, task, model, processor, inp.train, inp.label_names, folder)
    else:
        model.save_pretrained(folder / "model", safe_serialization=True)
        processor.save_pretrained(folder / "model")
    method = " + ".join(["ffn_neurons"] + (["heads"] if cfg.drop_heads else []) + (["layers"] if dropped else []))
    atomic_write_json(folder / "model" / PRUNING, {"method": method, "importance": cfg.importance, **rec,
                                                   "source": str(inp.src), "kept_neurons": kept,
                                                   **({"kept_kv_groups": kept_groups} if kept_groups else {})})
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
    if problem := architecture_problem(model.config.model_type, f"the input model {src}"):
        raise PipelinesError(problem)
    for level in cfg.all_levels():  # the architecture and every level checked before any data work
        neurons_to_remove(model, level, cfg.drop_layers, cfg.drop_heads)
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


def measure_importance(cfg: PruneConfig, ctx: RunContext, inp: Inputs) -> tuple[Importance, list[float]]:
    """(per layer, one score per FFN neuron [and key/value group]; per layer, the loss rise when it is skipped), once,
    on the input model."""
    needs_data = cfg.importance == "taylor" or cfg.drop_layers > 0
    batches = importance_batches(cfg, inp.task, inp.processor, inp.model, inp.train, ctx.seed, inp.label_names) if needs_data else []
    scores = importance(inp.model, cfg.importance, batches, heads=cfg.drop_heads > 0)
    layer_scores = layer_importance(inp.model, batches) if cfg.drop_layers else [0.0] * len(scores.ffn)
    ctx.log(f"{cfg.importance} importance of {sum(len(s) for s in scores.ffn):,} FFN neurons"
            + (f" and {sum(len(s) for s in scores.heads)} key/value groups" if scores.heads else "")
            + f" in {len(scores.ffn)} layers" + (f" ({len(batches)} train batches)" if batches else "")
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
        ctx.log(f"{level:.0%}: {rec['num_hidden_layers']} layers (dropped {rec['dropped_layers']}), "
                + (f"{rec['num_attention_heads']} heads, " if cfg.drop_heads else "")
                + f"FFN width {rec['intermediate_size']}, {modelio.num_parameters(rec['model']):,} params, "
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
            "what": "FFN intermediate neurons" + (f", {cfg.drop_heads} attention heads per layer" if cfg.drop_heads else "")
                    + (f" and {cfg.drop_layers} whole layers" if cfg.drop_layers else ""),
            "layer_importance": layer_scores if cfg.drop_layers else None,
            "chosen": chosen["sparsity"],
            "choice": "sparsity (given)" if cfg.sparsity is not None else
                      f"the smallest level reaching target_speedup {cfg.target_speedup}x" if cfg.target_speedup
                      else "the largest level passing max_metric_drop",
            "curve": curve, "eval": per_split,
            "latency": {**lat, "batch_size": cfg.latency_batch_size, "split": split0, "threads": modelio.threads(),
                        "repeats": cfg.latency_repeats,
                        "what": "median ms of one forward pass, the unpruned model and every level timed in turns "
                                "in one process (the curve's pass)"},
            "reload": "stock AutoModelFor...from_pretrained(folder) (config.json's FFN width, num_hidden_layers"
                      + (", num_attention_heads, num_key_value_heads, head_dim)" if cfg.drop_heads else ")"),
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
    """The input model's task (an earlier stage's, or the local folder's config.json); a local folder refused when
    the stage cannot prune it (another architecture; drop_heads without head_dim; drop_layers on an encoder-decoder);
    the card checked against the task."""
    name, problems = modelio.planned_task(inputs, "model", cfg.model_path, "model_path", recipe_dir)
    if name:
        task = tasks.get(name)
        if cfg.model_path is not None:
            folder = (Path(recipe_dir) / cfg.model_path).expanduser().resolve()
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
            if problem := architecture_problem(model_type, f"model_path {cfg.model_path!r}"):
                problems.append(problem)
            elif cfg.drop_heads and (problem := heads_problem(model_type, f"model_path {cfg.model_path!r}")):
                problems.append(problem)
            elif cfg.drop_layers and model_type in TWO_STACKS:
                problems.append(f"prune: drop_layers: model_path {cfg.model_path!r} is a {model_type!r} encoder-decoder "
                                "(two stacks of layers); drop_layers is for single-stack models (FFN neurons are pruned "
                                "in both stacks)")
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
    description="Structured pruning of FFN neurons, attention heads and layers (magnitude or Taylor importance), "
                "optional recovery, "
                "a sweep of levels, each re-evaluated.",
)
