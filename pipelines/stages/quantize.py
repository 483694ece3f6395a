"""quantize stage: make a trained model smaller (and, on the CPU, faster), then re-evaluate it.

input model -> quantize -> save (a format that rebuilds it) -> reload as a fresh process would -> evaluate
fp32 vs quantized side by side (metric, size on disk, latency in the same process and threads).

Methods (`method:`):
  dynamic_int8   torch.ao `quantize_dynamic`: nn.Linear -> int8 weights, activations quantized on the fly
                 (per-channel by default); `embeddings: int8` (default) also stores nn.Embedding rows in 8 bits
                 (weight-only, per row): small models are mostly embeddings, so this is what shrinks the file.
                 Saved as config.json + quantization.json (the recipe) + quantized_state_dict.pt
                 (int8 tensors; reloaded with torch.load(weights_only=True) into a freshly quantized skeleton,
                 because dynamic-quantized modules do not round-trip through save_pretrained).
  torchao_int8   torchao's `Int8DynamicActivationInt8WeightConfig` through transformers' TorchAoConfig: nn.Linear ->
                 int8 weights (per output channel by default) with activations quantized per token on the fly;
                 embeddings stay fp32. Saved by save_pretrained (model.safetensors with torchao's int8 tensors,
                 quantization_config in config.json) and reloaded by from_pretrained. The same numerics as
                 `qat: {scheme: int8}` in finetune / distill fake-quantises (weights exactly; activations there
                 asymmetric per token). On MiniLM / SST-2 it kept the accuracy where torch.ao lost 0.3-1.7
                 points, but in eager mode it is no faster than fp32 on this CPU (bench/README.md, "CPU int8"):
                 dynamic_int8 stays the default.
  bf16           weights stored and run in bfloat16 (half the disk; bf16 matmuls where the CPU has them).
  fp16           weights stored in float16, upcast to float32 on load (half the disk, fp32 speed).
  bnb_8bit / bnb_4bit   bitsandbytes LLM.int8 / NF4 through transformers (needs a CUDA GPU + bitsandbytes).

Reload anywhere with one call: `pipelines.modelio.load_quantized(folder)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines import basemodel, modelio, tasks
from pipelines.checkpoints import atomic_write_json
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult

METHODS = ("dynamic_int8", "torchao_int8", "bf16", "fp16", "bnb_8bit", "bnb_4bit")
INT8_METHODS = ("dynamic_int8", "torchao_int8")  # those that read per_channel and keep


class QuantizeConfig(StageConfig):
    method: Literal["dynamic_int8", "torchao_int8", "bf16", "fp16", "bnb_8bit", "bnb_4bit"] = "dynamic_int8"
    model_path: str | None = Field(None, description="A local HF model folder (relative to the recipe), instead of a `model` input.")
    per_channel: bool = Field(True, description="dynamic_int8 / torchao_int8: one weight scale per output channel "
                              "(else per tensor).")
    embeddings: Literal["keep", "int8"] = Field(
        "int8", description="dynamic_int8: also quantize nn.Embedding weights (per row), or keep them fp32 "
        "(torchao_int8 keeps them: leave this out or say keep)."
    )
    keep: list[str] = Field(
        default_factory=list, description="dynamic_int8 / torchao_int8: module names (or name suffixes) left in fp32, "
        "e.g. [classifier]."
    )
    max_length: int = Field(128, ge=8, description="Tokens per eval input (truncation), as in the finetune stage.")
    max_target_length: int = Field(128, ge=4, description="seq2seq target tokens.")
    max_eval_samples: int | None = Field(None, ge=1)
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"], description="Those the card has.")
    latency_batch_size: int = Field(32, ge=1)
    latency_repeats: int = Field(20, ge=1)
    max_metric_drop: float | None = Field(
        None, ge=0, description="Quality gate: fail when the quantized model's main metric on validation is worse "
        "than the fp32 model's by more than this, in the metric's units (accuracy 0.01 = one point).")

    @model_validator(mode="after")
    def _check(self):
        if self.method == "torchao_int8" and (problem := modelio.torchao_missing()) is not None:
            raise ValueError(f"method torchao_int8 {problem}")
        if self.method == "torchao_int8" and "embeddings" in self.model_fields_set and self.embeddings == "int8":
            raise ValueError("method torchao_int8 quantizes nn.Linear layers only and keeps the embeddings in fp32: drop "
                             "`embeddings: int8`, or use method dynamic_int8 (int8 embedding rows)")
        return self

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = basemodel.local_folder(self.model_path, recipe_dir)
        return {"model_path": folder} if folder else {}


# ---------------------------------------------------------------- methods


def _need_gpu(method: str) -> None:
    import importlib.util

    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (this machine has none; torch reports cuda unavailable)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise PipelinesError(
            f"method {method} needs " + " and ".join(missing) + "; on a CPU use method dynamic_int8 (or bf16 / fp16)"
        )


def quantize_and_save(cfg: QuantizeConfig, src: Path, out: Path, task) -> dict:
    """Write the quantized folder `out` from the fp32 folder `src`; returns the recipe written to quantization.json."""
    import torch
    from transformers import AutoConfig

    recipe: dict[str, Any] = {"method": cfg.method, "source": str(src), "torch": torch.__version__}
    cls = task.auto_class()
    if cfg.method == "dynamic_int8":
        recipe.update(per_channel=cfg.per_channel, embeddings=cfg.embeddings, keep=cfg.keep,
                      engine=modelio.quant_engine(),
                      format=f"{modelio.QUANT_STATE}: torch.ao dynamic-int8 state dict (torch.save; load with weights_only=True)")
        model, _ = modelio.load_model(src, dtype=torch.float32)
        qmodel = modelio.apply_dynamic(model, recipe)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(qmodel.state_dict(), out / modelio.QUANT_STATE)
        AutoConfig.from_pretrained(src).save_pretrained(out)  # id2label / label2id travel here
        if getattr(model, "generation_config", None) is not None and (Path(src) / "generation_config.json").is_file():
            model.generation_config.save_pretrained(out)  # how the model generates (stop tokens, reply length)
    elif cfg.method == "torchao_int8":
        from pipelines import quiet

        torchao = quiet.import_torchao()
        recipe.update(per_channel=cfg.per_channel, embeddings="keep", keep=cfg.keep, torchao=torchao.__version__,
                      config="Int8DynamicActivationInt8WeightConfig",
                      format="model.safetensors with torchao int8 tensors (quantization_config in config.json)")
        with torch.device("meta"):  # no weights: only the module names that `keep` selects
            skeleton = cls.from_config(AutoConfig.from_pretrained(src))
        model = cls.from_pretrained(src, dtype=torch.float32, quantization_config=modelio.torchao_config(recipe, skeleton))
        model.save_pretrained(out, safe_serialization=True)
    elif cfg.method in ("bf16", "fp16"):
        dtype = torch.bfloat16 if cfg.method == "bf16" else torch.float16
        recipe.update(compute_dtype="bfloat16" if cfg.method == "bf16" else "float32",
                      format=f"model.safetensors in {dtype}")
        model = cls.from_pretrained(src, dtype=dtype)
        model.save_pretrained(out, safe_serialization=True)
    else:
        _need_gpu(cfg.method)
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_8bit=True) if cfg.method == "bnb_8bit" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        recipe.update(format="model.safetensors with bitsandbytes weights (quantization_config in config.json)")
        model = cls.from_pretrained(src, quantization_config=bnb, device_map="auto")
        model.save_pretrained(out, safe_serialization=True)
    atomic_write_json(out / modelio.QUANT_RECIPE, recipe)
    return recipe


# ---------------------------------------------------------------- the stage


def run(cfg: QuantizeConfig, ctx: RunContext) -> StageResult:
    import torch

    if cfg.method.startswith("bnb_"):
        _need_gpu(cfg.method)  # before any work

    # ---- input model and data
    src = modelio.input_model_dir(ctx, cfg.model_path, "quantize")
    if modelio.read_recipe(src) is not None:
        raise PipelinesError(f"{src} is already quantized; quantize a full-precision model")
    model, task = modelio.load_model(src, dtype=torch.float32)
    processor = modelio.load_processor(task, src)
    task.prepare_processor(processor)
    dsd = ctx.data.load(seed=ctx.seed)
    label_names = task.check_data(ctx.data, dsd)
    splits = {s: dsd[s] for s in cfg.eval_splits if s in dsd}
    if not splits:
        raise PipelinesError(f"the data card has none of the eval splits {cfg.eval_splits} (has {list(dsd)})")
    if cfg.max_eval_samples:
        splits = {s: d.select(range(min(len(d), cfg.max_eval_samples))) for s, d in splits.items()}
    opts = tasks.EvalOptions(max_length=cfg.max_length, max_target_length=cfg.max_target_length, generation={},
                             label_names=label_names)

    # ---- quantize, save, and reload the way any later process will
    out = ctx.output_dir / "model"
    recipe = quantize_and_save(cfg, src, out, task)
    processor.save_pretrained(out)
    qmodel = modelio.load_quantized(out)
    ctx.log(f"{cfg.method}: {modelio.size_on_disk_mb(src)} MB -> {modelio.size_on_disk_mb(out)} MB")

    # ---- evaluate fp32 vs quantized, beside the task's baselines
    metrics, per_split, evaluations, lat, first = modelio.side_by_side(
        task,
        [modelio.Entry("fp32", "reference", model, processor, src, "fp32_"),
         modelio.Entry("quantized", "output", qmodel, processor, out, "")],
        splits, opts, train_raw=dsd.get("train"), latency_batch_size=cfg.latency_batch_size,
        latency_repeats=cfg.latency_repeats,
    )
    gate = modelio.quality_gate(task, per_split, ("fp32", "quantized"), cfg.max_metric_drop, "quantize")
    split0 = next(iter(splits))
    # what the saved folder predicts, for checking a reload in another process
    atomic_write_json(ctx.output_dir / "predictions.json", {"split": split0, "task": task.name,
                                                            "outputs": first["quantized"].outputs})
    fp32_mb, q_mb = modelio.size_on_disk_mb(src), modelio.size_on_disk_mb(out)
    metrics.update(
        fp32_mb=fp32_mb, quantized_mb=q_mb, size_ratio=round(fp32_mb / q_mb, 3),
        fp32_ms=lat["fp32"]["median_ms"], quantized_ms=lat["quantized"]["median_ms"],
        speedup=round(lat["fp32"]["median_ms"] / lat["quantized"]["median_ms"], 3),
        params=modelio.num_parameters(model),
    )
    return StageResult(
        metrics=metrics,
        outputs={"model": "model"},
        task=task.name,
        evaluations=evaluations,
        info={
            "task": task.name,
            "source": str(src),
            "method": cfg.method,
            "recipe": recipe,
            "format": {"fp32": "safetensors (as given)", "quantized": recipe["format"]},
            "reload": "pipelines.modelio.load_quantized(folder)",
            "eval": per_split,
            "latency": {
                **lat, "batch_size": cfg.latency_batch_size, "split": split0, "threads": modelio.threads(),
                "repeats": cfg.latency_repeats,
                "what": "median ms of one forward pass, fp32 and quantized timed in turns in one process",
            },
            "baselines": task.baseline_notes(),
            "quality_gate": gate,
        },
    )


def plan(cfg: QuantizeConfig, inputs: dict, recipe_dir: Path, card):
    """The input model's task (an earlier stage's, or the local folder's config.json, which must exist), and
    the card checked against it."""
    name, problems = modelio.planned_task(inputs, "model", cfg.model_path, "model_path", recipe_dir)
    if name and card is not None:
        problems += tasks.get(name).data_problems(card.roles, card.label_names, card.path)
    return name, problems


STAGE = StageDef(
    name="quantize",
    Config=QuantizeConfig,
    run=run,
    version="2",
    inputs={"model": "optional"},
    data="required",
    distributed=False,
    plan=plan,
    description="Quantize a model (torch.ao dynamic int8 with int8 embeddings, torchao int8, bf16, fp16, bitsandbytes) "
    "and re-evaluate it.",
)
