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
  bf16           weights stored and run in bfloat16 (half the disk; bf16 matmuls where the CPU has them).
  fp16           weights stored in float16, upcast to float32 on load (half the disk, fp32 speed).
  bnb_8bit / bnb_4bit   bitsandbytes LLM.int8 / NF4 through transformers (needs a CUDA GPU + bitsandbytes).

Reload anywhere with one call: `pipelines.modelio.load_quantized(folder)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines import modelio, tasks
from pipelines.checkpoints import atomic_write_json
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult

METHODS = ("dynamic_int8", "bf16", "fp16", "bnb_8bit", "bnb_4bit")


class QuantizeConfig(StageConfig):
    method: Literal["dynamic_int8", "bf16", "fp16", "bnb_8bit", "bnb_4bit"] = "dynamic_int8"
    model_path: str | None = Field(None, description="A local HF model folder (relative to the recipe), instead of a `model` input.")
    per_channel: bool = Field(True, description="dynamic_int8: one scale per output channel (else per tensor).")
    embeddings: Literal["keep", "int8"] = Field(
        "int8", description="dynamic_int8: also quantize nn.Embedding weights (per row), or keep them fp32."
    )
    keep: list[str] = Field(
        default_factory=list, description="dynamic_int8: module names (or name suffixes) left in fp32, e.g. [classifier]."
    )
    max_length: int = Field(128, ge=8, description="Tokens per eval input (truncation), as in the finetune stage.")
    max_target_length: int = Field(128, ge=4, description="seq2seq target tokens.")
    max_eval_samples: int | None = Field(None, ge=1)
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"], description="Those the card has.")
    latency_batch_size: int = Field(32, ge=1)
    latency_repeats: int = Field(20, ge=1)

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = tasks.local_folder(self.model_path, recipe_dir)
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


def quantize_and_save(cfg: QuantizeConfig, src: Path, out: Path, task: str) -> dict:
    """Write the quantized folder `out` from the fp32 folder `src`; returns the recipe written to quantization.json."""
    import torch
    from transformers import AutoConfig

    recipe: dict[str, Any] = {"method": cfg.method, "source": str(src), "torch": torch.__version__}
    cls = modelio.auto_class(task)
    if cfg.method == "dynamic_int8":
        recipe.update(per_channel=cfg.per_channel, embeddings=cfg.embeddings, keep=cfg.keep,
                      engine=modelio.quant_engine(),
                      format=f"{modelio.QUANT_STATE}: torch.ao dynamic-int8 state dict (torch.save; load with weights_only=True)")
        model, _ = modelio.load_model(src, dtype=torch.float32)
        qmodel = modelio.apply_dynamic(model, recipe)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(qmodel.state_dict(), out / modelio.QUANT_STATE)
        AutoConfig.from_pretrained(src).save_pretrained(out)  # id2label / label2id travel here
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


def _model_dir(cfg: QuantizeConfig, ctx: RunContext) -> Path:
    if ("model" in ctx.inputs) == (cfg.model_path is not None):
        raise PipelinesError("quantize needs exactly one model: an input stage `inputs: {model: <stage>}` or `config.model_path: <folder>`")
    if "model" in ctx.inputs:
        return ctx.inputs["model"].output("model")
    return modelio.check_model_dir((Path(ctx.recipe_path).parent / cfg.model_path).resolve(), "model_path")


def run(cfg: QuantizeConfig, ctx: RunContext) -> StageResult:
    import torch

    if cfg.method.startswith("bnb_"):
        _need_gpu(cfg.method)  # before any work

    # ---- input model and data
    src = _model_dir(cfg, ctx)
    if modelio.read_recipe(src) is not None:
        raise PipelinesError(f"{src} is already quantized; quantize a full-precision model")
    model, task = modelio.load_model(src, dtype=torch.float32)
    tokenizer = modelio.load_tokenizer(src)
    dsd = ctx.data.load(seed=ctx.seed)
    splits = [s for s in cfg.eval_splits if s in dsd]
    if not splits:
        raise PipelinesError(f"the data card has none of the eval splits {cfg.eval_splits} (has {list(dsd)})")
    for s in splits:
        if cfg.max_eval_samples and len(dsd[s]) > cfg.max_eval_samples:
            dsd[s] = dsd[s].select(range(cfg.max_eval_samples))
    tasks.prepare_tokenizer(tokenizer, task)
    data = modelio.encode_splits({s: dsd[s] for s in splits}, tokenizer, task, cfg.max_length, cfg.max_target_length)
    collate = modelio.collator(task, tokenizer, model)

    # ---- quantize, save, and reload the way any later process will
    out = ctx.output_dir / "model"
    recipe = quantize_and_save(cfg, src, out, task)
    tokenizer.save_pretrained(out)
    qmodel = modelio.load_quantized(out)
    ctx.log(f"{cfg.method}: {modelio.size_on_disk_mb(src)} MB -> {modelio.size_on_disk_mb(out)} MB")

    # ---- evaluate fp32 vs quantized
    label_names = ctx.data.label_names
    metrics: dict[str, Any] = {}
    per_split = {}
    name, up = modelio.main_metric(task)
    for i, split in enumerate(splits):
        ref_m, _ = modelio.evaluate(model, data[split], collate, task, label_names)
        q_m, q_out = modelio.evaluate(qmodel, data[split], collate, task, label_names)
        delta = {k: round(q_m[k] - ref_m[k], 6) for k in q_m if isinstance(q_m[k], float)}
        per_split[split] = {"fp32": ref_m, "quantized": q_m, "delta": delta, "retained": modelio.retained(task, q_m, ref_m)}
        if i == 0:
            # what the saved folder predicts, for checking a reload in another process
            atomic_write_json(ctx.output_dir / "predictions.json", {"split": split, "task": task, "outputs": q_out})
        prefix = "" if i == 0 else f"{split}_"
        for k, v in q_m.items():
            metrics[f"{prefix}{k}"] = v
        for k, v in ref_m.items():
            metrics[f"{prefix}fp32_{k}"] = v
        metrics[f"{prefix}{name}_delta"] = delta.get(name)
    fp32_mb, q_mb = modelio.size_on_disk_mb(src), modelio.size_on_disk_mb(out)
    batch = modelio.latency_batch(data[splits[0]], collate, cfg.latency_batch_size)
    lat = modelio.latency_ms({"fp32": (model, batch), "quantized": (qmodel, batch)}, repeats=cfg.latency_repeats)
    metrics.update(
        fp32_mb=fp32_mb, quantized_mb=q_mb, size_ratio=round(fp32_mb / q_mb, 3),
        fp32_ms=lat["fp32"]["median_ms"], quantized_ms=lat["quantized"]["median_ms"],
        speedup=round(lat["fp32"]["median_ms"] / lat["quantized"]["median_ms"], 3),
        params=modelio.num_parameters(model),
    )
    return StageResult(
        metrics=metrics,
        outputs={"model": "model"},
        info={
            "task": task,
            "source": str(src),
            "method": cfg.method,
            "recipe": recipe,
            "format": {"fp32": "safetensors (as given)", "quantized": recipe["format"]},
            "reload": "pipelines.modelio.load_quantized(folder)",
            "eval": per_split,
            "latency": {
                **lat, "batch_size": int(batch["input_ids"].shape[0]), "seq_len": int(batch["input_ids"].shape[1]),
                "split": splits[0], "threads": modelio.threads(), "repeats": cfg.latency_repeats,
                "what": "median ms of one forward pass, fp32 and quantized timed in turns in one process",
            },
        },
    )


STAGE = StageDef(
    name="quantize",
    Config=QuantizeConfig,
    run=run,
    version="1",
    inputs={"model": "optional"},
    data="required",
    distributed=False,
    description="Quantize a model (torch.ao dynamic int8 with int8 embeddings, bf16, fp16, bitsandbytes) and re-evaluate it.",
)
