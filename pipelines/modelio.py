"""Model folders as the compression stages see them: load one with its task, score reference and
compressed models side by side on the same splits (`side_by_side`), measure them (parameters, size on
disk, CPU latency), and reload a quantized folder with one call.

    from pipelines.modelio import load_quantized
    model = load_quantized("runs/compress_sst2/quantize/model")   # any folder the quantize stage wrote
    tok = AutoTokenizer.from_pretrained("runs/compress_sst2/quantize/model")

The task of a folder is `pipelines.tasks.of_folder` (config.json): the one detector.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import PipelinesError

QUANT_RECIPE = "quantization.json"  # beside config.json in every folder the quantize stage writes
QUANT_STATE = "quantized_state_dict.pt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx_data")  # .bin: also OpenVINO's weights


# ---------------------------------------------------------------- loading


def input_model_dir(ctx, model_path: str | None, stage: str) -> Path:
    """The model a compressing stage (quantize, prune, export) works on: its `model` input stage's output, or
    `config.model_path` (a local folder, relative to the recipe); exactly one of the two."""
    if ("model" in ctx.inputs) == (model_path is not None):
        raise PipelinesError(f"{stage} needs exactly one model: an input stage `inputs: {{model: <stage>}}` or "
                             "`config.model_path: <folder>`")
    if "model" in ctx.inputs:
        return ctx.inputs["model"].output("model")
    return check_model_dir((Path(ctx.recipe_path).parent / model_path).resolve(), "model_path")


def check_model_dir(folder: Path, what: str = "model") -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PipelinesError(f"{what} folder {folder} has no config.json (expected a Hugging Face model folder)")
    return folder


def planned_task(inputs: dict, role: str, spec: str | None, key: str, recipe_dir: Path) -> tuple[str | None, list[str]]:
    """For `validate`: (the task, problems) of the model a stage takes from an input stage (`inputs[role]`: its
    planned task, None when unknown) or from a local folder (`config.<key>`, which must hold a config.json)."""
    from pipelines import tasks

    if (role in inputs) == (spec is not None):
        return None, [f"give exactly one model: an input stage `inputs: {{{role}: <stage>}}` or `config.{key}: <folder>`"]
    if role in inputs:
        return inputs[role], []
    folder = (Path(recipe_dir) / spec).expanduser().resolve()
    if not (folder / "config.json").is_file():
        return None, [f"{key} {spec!r}: " + (f"no config.json in {folder}" if folder.is_dir() else f"folder not found: {folder}")]
    return tasks.of_folder(folder).name, []


def load_model(folder, **kwargs):
    """(model in eval mode, task) from a plain HF folder; kwargs go to from_pretrained."""
    from pipelines import tasks

    folder = check_model_dir(folder)
    task = tasks.of_folder(folder)
    model = task.auto_class().from_pretrained(folder, **kwargs)
    return model.eval(), task


def load_processor(task, *folders):
    """The processor (tokenizer, image processor) of the first folder that has one (model folders carry theirs)."""
    errors = []
    for f in folders:
        if f is None:
            continue
        try:
            return task.load_processor(f)
        except PipelinesError as e:
            errors.append(str(e))
    raise PipelinesError("; ".join(errors) or "no folder to load a tokenizer from")


# ---------------------------------------------------------------- reference vs compressed, side by side


@dataclass
class Entry:
    """A model to score: its label in metric names and reports, its role, what it runs with."""

    label: str  # teacher, student, fp32, quantized, ...
    role: str  # output (what the stage writes) | reference (its input)
    model: Any
    processor: Any
    folder: Path
    prefix: str  # of its flat metric names: "student_", "fp32_", "" ...


def side_by_side(task, entries: list[Entry], splits: dict, opts, train_raw=None, latency_batch_size: int = 32,
                 latency_repeats: int = 20, scored: dict | None = None, latency: dict | None = None):
    """Score every entry on every split (task.evaluate), the task's baselines on the same splits, and time
    the entries on one batch of the first split (`time_models`). Returns (flat metrics, per-split detail,
    evaluations, latency, first-split Scored per label). Flat names: `<prefix><metric>` for the first split,
    `<split>_<prefix><metric>` for the others, plus `retained` / `<main>_delta` of the output vs the
    reference.

    What the caller already measured is used, not measured again: `scored` ({split: {label: Scored}}, e.g. a sweep
    that scored these models among others on the first split) and `latency` ({label: a `latency_ms` row} for every
    entry, from one pass that timed them in turns, so their ratios come from one clock)."""
    from pipelines.stage import Evaluation

    ref = next(e for e in entries if e.role == "reference")
    out = next(e for e in entries if e.role == "output")
    main = task.main_metric
    metrics: dict[str, Any] = {}
    per_split: dict[str, dict] = {}
    evaluations: list[Evaluation] = []
    first: dict[str, Any] = {}
    for i, (split, raw) in enumerate(splits.items()):
        pre = "" if i == 0 else f"{split}_"
        given = (scored or {}).get(split, {})
        if unknown := set(given) - {e.label for e in entries}:
            raise ValueError(f"side_by_side: scores given for {sorted(unknown)}, not among the entries")
        got = {e.label: given[e.label] if e.label in given else task.evaluate(e.model, e.processor, raw, opts)
               for e in entries}
        if i == 0:
            first = got
        detail = {label: s.metrics for label, s in got.items()}
        detail["retained"] = retained(task, got[out.label].metrics, got[ref.label].metrics)
        detail["delta"] = {k: round(v - got[ref.label].metrics[k], 6) for k, v in got[out.label].metrics.items()
                           if isinstance(v, float) and isinstance(got[ref.label].metrics.get(k), float)}
        per_split[split] = detail
        for e in sorted(entries, key=lambda e: e.role != "output"):  # the output's numbers first (status shows those)
            for k, v in got[e.label].metrics.items():
                metrics[f"{pre}{e.prefix}{k}"] = v
            evaluations.append(Evaluation(e.label, e.role, split, got[e.label].metrics, folder=str(e.folder)))
        metrics[f"{pre}retained"] = detail["retained"]
        metrics[f"{pre}{main}_delta"] = detail["delta"].get(main)
        if train_raw is not None:
            for name, m in task.baselines(train_raw, raw, opts, ref.processor).items():
                evaluations.append(Evaluation(name, "baseline", split, m))
    if latency is None:
        lat = time_models(task, {e.label: (e.model, e.processor) for e in entries}, next(iter(splits.values())), opts,
                          latency_batch_size, latency_repeats)
    elif missing := [e.label for e in entries if e.label not in latency]:
        raise ValueError(f"side_by_side: latency given without {missing} (give every entry's, from one pass, or none)")
    else:
        lat = {e.label: latency[e.label] for e in entries}
    for ev in evaluations:
        if ev.role != "baseline":
            e = next(x for x in entries if x.label == ev.model)
            ev.params, ev.size_mb, ev.latency_ms = num_parameters(e.model), size_on_disk_mb(e.folder), lat[e.label]["median_ms"]
    return metrics, per_split, evaluations, lat, first


def quality_gate(task, per_split: dict, labels: tuple[str, str], max_drop: float | None, stage: str) -> dict | None:
    """The compressed model's main metric against its reference's on the first scored split (validation where
    there is one): how much it lost, in the metric's own units (accuracy 0.01 = one point; perplexity: how much
    it rose). Over `max_drop`: a PipelinesError naming both numbers (the stage's outputs stay for inspection,
    nothing downstream runs). Returns what was checked, for the manifest."""
    if max_drop is None:
        return None
    split = "validation" if "validation" in per_split else next(iter(per_split))
    ref, out = (per_split[split][label][task.main_metric] for label in labels)
    drop = (ref - out) if task.greater_is_better else (out - ref)
    gate = {"metric": task.main_metric, "split": split, "reference": ref, "compressed": out,
            "drop": round(drop, 6), "max_metric_drop": max_drop, "passed": drop <= max_drop}
    if drop > max_drop:
        raise PipelinesError(
            f"quality gate: {split} {task.main_metric} {out:.4g} ({labels[1]}) against {ref:.4g} ({labels[0]}): a drop of "
            f"{drop:.4g}, over max_metric_drop {max_drop:g}. The {stage} stage's outputs are kept in its folder for "
            "inspection; nothing downstream runs. Raise max_metric_drop, or compress less")
    return gate


def retained(task, new: dict, ref: dict) -> float:
    """Share of the reference's main metric kept (lower-is-better metrics: ref / new, so 1.0 = as good)."""
    name = task.main_metric
    if not ref.get(name) or not new.get(name):
        return float("nan")
    return round(new[name] / ref[name] if task.greater_is_better else ref[name] / new[name], 6)


# ---------------------------------------------------------------- measurements


def num_parameters(model) -> int:
    """Unique parameters (tied weights counted once), the int8 weights of torch.ao dynamic-quantized Linear /
    Embedding modules included (they hold packed tensors, not nn.Parameters); an exported model
    (pipelines.runtimes) counts those of the model it was exported from."""
    if callable(getattr(model, "parameter_count", None)):
        return model.parameter_count()
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for m in model.modules():
        if type(m).__module__.startswith("torch.ao.nn.quantized") and callable(getattr(m, "weight", None)):
            n += m.weight().numel()
            bias = m.bias() if callable(getattr(m, "bias", None)) else None
            n += bias.numel() if bias is not None else 0
    return n


def size_on_disk_mb(folder) -> float:
    """MB (10^6 bytes) of the weight files in a folder (safetensors / bin / pt, ONNX graphs and their external data),
    tokenizer and config excluded."""
    folder = Path(folder)
    total = sum(f.stat().st_size for f in folder.rglob("*")
                if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".onnx.data")))
    return round(total / 1e6, 3)


def latency_ms(runs: dict[str, tuple[Any, dict]], repeats: int = 20, warmup: int = 3) -> dict[str, dict]:
    """{name: (model, batch)} -> median (and min, p90) ms of one forward pass, in this process and its threads.
    The models take turns in every round, so a busy neighbour on a shared machine slows all of them alike."""
    import torch

    from pipelines.tasks.base import on_device

    runs = {k: (m, on_device(b, m)) for k, (m, b) in runs.items()}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(warmup):
            for m, b in runs.values():
                m(**b)
        for _ in range(repeats):
            for k, (m, b) in runs.items():
                sync()
                t0 = time.perf_counter()
                m(**b)
                sync()
                times[k].append((time.perf_counter() - t0) * 1000)
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {
            "median_ms": round(statistics.median(ts), 3),
            "min_ms": round(ts[0], 3),
            "p90_ms": round(ts[min(len(ts) - 1, int(0.9 * len(ts)))], 3),
            "batch_shape": list(next(v for v in runs[k][1].values() if hasattr(v, "shape")).shape),
        }
    return out


def time_models(task, models: dict[str, tuple[Any, Any]], raw, opts, batch_size: int = 32, repeats: int = 20) -> dict:
    """{label: (model, processor)} -> {label: latency_ms row}: each model on the first `batch_size` rows of the raw
    split (encoded by its own processor: the same batch where they share one), all timed in turns in one pass."""
    return latency_ms({k: (m, latency_batch(task, p, m, raw, opts, batch_size)) for k, (m, p) in models.items()},
                      repeats=repeats)


def latency_batch(task, processor, model, raw, opts, batch_size: int = 32) -> dict:
    """The first `batch_size` rows of a raw split, encoded and collated for the task, without labels
    (a seq2seq batch keeps the decoder_input_ids the collator made from them: one teacher-forced pass)."""
    rows = raw.select(range(min(batch_size, len(raw))))
    data = task.encode(rows, processor, opts)
    batch = task.collator(processor, model)([data[i] for i in range(len(data))])
    batch.pop("labels", None)
    return batch


def threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- quantized folders


def dynamic_qconfig_spec(model, recipe: dict) -> dict:
    """module name -> qconfig for torch.ao `quantize_dynamic`, from a quantization recipe: every nn.Linear
    (qint8, per-channel or per-tensor) and, unless recipe["embeddings"] == "keep", every nn.Embedding
    (weight-only, per-row quint8), except modules whose name ends with one of recipe["keep"]."""
    import torch
    from torch.ao import quantization as q

    linear = q.per_channel_dynamic_qconfig if recipe.get("per_channel", True) else q.default_dynamic_qconfig
    # (4-bit rows, quint4x2, are not offered: torch's embedding_4bit returned wrong shapes here, torch 2.13)
    emb = q.float_qparams_weight_only_qconfig if recipe.get("embeddings", "keep") == "int8" else None
    kept = set(kept_modules(model, recipe.get("keep", [])))
    spec = {}
    for name, m in model.named_modules():
        if name in kept:
            continue
        if isinstance(m, torch.nn.Linear):
            spec[name] = linear
        elif emb is not None and isinstance(m, torch.nn.Embedding):
            spec[name] = emb
    return spec


def quant_engine() -> str:
    """The torch quantized-kernel backend: x86 / fbgemm on Intel and AMD, qnnpack on Arm."""
    import platform

    import torch

    if platform.machine().lower() in ("arm64", "aarch64") and "qnnpack" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "qnnpack"
    return torch.backends.quantized.engine


def apply_dynamic(model, recipe: dict):
    """The model with torch.ao dynamic int8 modules in place of its Linear (and Embedding) layers."""
    import torch
    from torch.ao.nn.quantized import Embedding as QEmbedding
    from torch.ao.quantization import quantize_dynamic

    quant_engine()
    with warnings.catch_warnings():  # torch.ao deprecation notices, once per call
        for cat in (DeprecationWarning, UserWarning, FutureWarning):
            warnings.simplefilter("ignore", cat)
        q = quantize_dynamic(model.eval(), dynamic_qconfig_spec(model, recipe), dtype=torch.qint8, inplace=False)
    for m in q.modules():
        if isinstance(m, QEmbedding):
            # the quantized lookup needs contiguous ids; BERT passes expanded (strided) token_type_ids
            m.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(), *args[1:]))
    return q


def kept_modules(model, keep) -> list[str]:
    """Full names of the modules a quantization recipe's `keep` names (a module name, or a suffix after a dot)."""
    keep = tuple(keep)
    return [n for n, _ in model.named_modules() if keep and any(n == k or n.endswith("." + k) for k in keep)]


def torchao_missing() -> str | None:
    """What stops torchao's methods here (None: nothing)."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        return "needs torchao (0.18 or later with torch 2.13): pip install 'pipelines[torchao]'"
    return None


def torchao_config(recipe: dict, model):
    """transformers' TorchAoConfig for method torchao_int8: torchao's Int8DynamicActivationInt8WeightConfig on every
    nn.Linear of `model` (int8 weights per output channel, or per tensor; activations quantized per token on the fly,
    symmetric), except the modules recipe["keep"] names; embeddings stay fp32."""
    from pipelines import quiet

    quiet.import_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from torchao.quantization.granularity import PerRow, PerTensor
    from transformers import TorchAoConfig

    granularity = PerRow() if recipe.get("per_channel", True) else PerTensor()
    return TorchAoConfig(Int8DynamicActivationInt8WeightConfig(granularity=granularity),
                         modules_to_not_convert=kept_modules(model, recipe.get("keep", [])) or None)


def read_recipe(folder) -> dict | None:
    p = Path(folder) / QUANT_RECIPE
    return json.loads(p.read_text()) if p.is_file() else None


def load_quantized(folder):
    """THE way to reload what the quantize stage wrote (in any process), in eval mode:

    dynamic_int8: config.json -> a fresh skeleton -> the same `quantize_dynamic` recipe -> the saved
        int8 state dict (torch.load(weights_only=True): tensors only, no pickled code);
    torchao_int8: from_pretrained (the torchao quantization_config travels in config.json, the int8 weights in
        model.safetensors);
    bf16 / fp16: from_pretrained in the recipe's compute dtype;
    bnb_*: from_pretrained (the bitsandbytes quantization_config travels in config.json; needs a GPU).
    A folder without quantization.json loads as a plain model folder."""
    import torch
    from transformers import AutoConfig

    from pipelines import tasks

    folder = check_model_dir(folder)
    recipe = read_recipe(folder)
    if recipe is None:
        return load_model(folder)[0]
    method = recipe["method"]
    config = AutoConfig.from_pretrained(folder)
    cls = tasks.of_folder(folder).auto_class()
    if method == "dynamic_int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage notice inside torch.load
            state = torch.load(folder / QUANT_STATE, map_location="cpu", weights_only=True)
        skeleton = cls.from_config(config, dtype=torch.float32)
        if (folder / "generation_config.json").is_file():  # from_config makes one from config.json alone
            from transformers import GenerationConfig

            skeleton.generation_config = GenerationConfig.from_pretrained(folder)
        model = apply_dynamic(skeleton, recipe)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PipelinesError(f"{folder}: quantized weights do not fit the recipe (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()
    if method == "torchao_int8":
        from pipelines import quiet

        quiet.import_torchao()
        return cls.from_pretrained(folder).eval()
    if method in ("bf16", "fp16"):
        return cls.from_pretrained(folder, dtype=getattr(torch, recipe.get("compute_dtype", "float32"))).eval()
    if method.startswith("bnb_"):
        if not torch.cuda.is_available():
            raise PipelinesError(f"{folder} holds a bitsandbytes ({method}) model, which needs a CUDA GPU to load")
        return cls.from_pretrained(folder, device_map="auto").eval()
    raise PipelinesError(f"{folder}/{QUANT_RECIPE}: unknown method {method!r}")
