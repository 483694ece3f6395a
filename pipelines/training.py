"""Shared Trainer / DeepSpeed / accelerate set-up for every training stage.

Stages keep their own data and model code; this module owns what must be identical across them:
typed training hyperparameters, TrainingArguments, the DeepSpeed JSON, resume from the latest
complete checkpoint (with a clear error when the launch changed), and a final save that yields a
plain HF folder whatever the ZeRO stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.checkpoints import atomic_write_json, complete_marker_callback, latest_checkpoint
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext

CHECKPOINTS = "checkpoints"


class DeepSpeedConfig(BaseModel):
    """ZeRO from the recipe. Leave `deepspeed` out of the recipe to take it from the
    `accelerate launch --config_file accelerate_configs/...` file instead."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = Field(False, description="ZeRO-Offload the optimizer state to CPU memory.")
    offload_params: bool = Field(False, description="ZeRO-3 only: offload parameters to CPU memory.")

    @model_validator(mode="after")
    def _check(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides epochs.")
    batch_size: int = Field(16, ge=1, description="Per device (per rank) micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.0, ge=0, description="< 1: fraction of total steps; >= 1: steps.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that has it, else fp32."
    )
    optim: str = Field("adamw_torch", description="A transformers optimizer name (adamw_torch_fused, ...).")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (None: once per epoch).")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps (None: once per epoch).")
    save_total_limit: int = Field(2, ge=1, description="Keep the last K checkpoints.")
    logging_steps: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    metric_for_best_model: str | None = Field(None, description="e.g. eval_loss, eval_accuracy.")
    greater_is_better: bool | None = None
    load_best_model_at_end: bool = False
    deepspeed: DeepSpeedConfig | None = None
    report_to: list[str] = Field(default_factory=list, description="tensorboard, wandb, mlflow...")
    torch_compile: bool = False
    dataloader_workers: int = Field(0, ge=0)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.early_stopping_patience and not self.metric_for_best_model:
            raise ValueError("early_stopping_patience needs metric_for_best_model (e.g. eval_loss)")
        return self


# ---------------------------------------------------------------- hardware


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_precision(precision: str) -> str:
    import torch

    if precision == "fp16" and not has_cuda():
        raise PipelinesError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
    if precision != "auto":
        return precision
    if has_cuda() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_dict(ds: DeepSpeedConfig, precision: str) -> dict:
    """A DeepSpeed JSON with 'auto' where the Trainer fills values in. train_batch_size is left out:
    the Trainer derives it, and on the CPU it miscounts the world size when it is set."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"overlap_comm": False, "contiguous_gradients": True})
    if ds.zero_stage == 3:
        # gathered weights on save: the final folder and checkpoints are loadable without zero_to_fp32
        zero.update({"stage3_gather_16bit_weights_on_model_save": True})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": has_cuda()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": has_cuda()}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def check_launch() -> None:
    """Refuse a launch that would silently train something else than it says."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not has_cuda():
        # the Trainer asks accelerate for a CPU state (use_cpu), whose MULTI_CPU type accelerate 1.15 never
        # combines with FSDP: the ranks would train as plain DDP over gloo, with nothing sharded
        raise PipelinesError(
            "FSDP (accelerate_configs/fsdp.yaml) needs GPUs: without CUDA accelerate does not apply it and the "
            "ranks would silently train as plain DDP. On the CPU use deepspeed_zero2.yaml / deepspeed_zero3.yaml "
            "(sharded) or ddp.yaml"
        )


def using_deepspeed(args) -> bool:
    return bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


# ---------------------------------------------------------------- TrainingArguments


def training_args(cfg: TrainConfig, ctx: RunContext, has_eval: bool = True, args_cls=None, **overrides):
    """TrainingArguments (or `args_cls`, e.g. Seq2SeqTrainingArguments) from the recipe's typed `train`
    section; checkpoints go to <stage>/checkpoints."""
    from transformers import TrainingArguments

    check_launch()
    precision = resolve_precision(cfg.precision)
    eval_strategy = "no" if not has_eval else ("steps" if cfg.eval_steps else "epoch")
    save_strategy = "steps" if cfg.save_steps else "epoch"
    kwargs = dict(
        output_dir=str(ctx.output_dir / CHECKPOINTS),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup,
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim=cfg.optim,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy=save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to=cfg.report_to or "none",
        seed=ctx.seed,
        data_seed=ctx.seed,
        torch_compile=cfg.torch_compile,
        dataloader_num_workers=cfg.dataloader_workers,
        gradient_checkpointing=cfg.gradient_checkpointing,
        load_best_model_at_end=cfg.load_best_model_at_end or bool(cfg.early_stopping_patience),
        metric_for_best_model=cfg.metric_for_best_model,
        greater_is_better=cfg.greater_is_better,
        disable_tqdm=True,
        use_cpu=not has_cuda(),
        ddp_find_unused_parameters=False,
    )
    if cfg.deepspeed is not None:
        kwargs["deepspeed"] = deepspeed_dict(cfg.deepspeed, precision)
    kwargs.update(overrides)
    if "tensorboard" in cfg.report_to:
        # transformers 5 dropped TrainingArguments.logging_dir; its TensorBoardCallback reads this instead
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.output_dir / "logs")
    return (args_cls or TrainingArguments)(**kwargs)


def callbacks(cfg: TrainConfig) -> list:
    from transformers import EarlyStoppingCallback

    out = [complete_marker_callback(), LaunchRecorder()]
    if cfg.early_stopping_patience:
        out.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    return out


def _launch_signature(args) -> dict:
    return {"world_size": args.world_size, "deepspeed": using_deepspeed(args)}


def LaunchRecorder():
    """Writes how the run was launched into each checkpoint, so a resume with another world size or
    without DeepSpeed fails with a clear message instead of a shape error deep in DeepSpeed."""
    from transformers import TrainerCallback

    class _LaunchRecorder(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    atomic_write_json(ckpt / "pipelines_launch.json", _launch_signature(args))
            return control

    return _LaunchRecorder()


# ---------------------------------------------------------------- train (with resume) and save


class _TrainingWasComplete(Exception):
    pass


def _stop_if_complete():
    """Raised from on_train_begin (the checkpoint, optimizer and DeepSpeed state are loaded by then) when
    the checkpoint already holds the last step: transformers 5.24 would train one step past max_steps
    (its epoch loop checks for the end only after a step; a run killed between its final checkpoint and
    its manifest came back with step 25 of 24)."""
    from transformers import TrainerCallback

    class StopIfComplete(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _TrainingWasComplete
            return control

    return StopIfComplete()


def train(trainer, ctx: RunContext):
    """trainer.train(), resuming from the latest complete checkpoint when the runner says this
    stage was interrupted, with the runner's callbacks for this run (`ctx.callbacks`: a sweep trial's
    reporter). Returns the TrainOutput."""
    for cb in ctx.callbacks:
        trainer.add_callback(cb)
    ckpt = latest_checkpoint(ctx.output_dir / CHECKPOINTS) if ctx.resuming else None
    if ckpt is not None:
        launch = ckpt / "pipelines_launch.json"
        if launch.exists():
            was = json.loads(launch.read_text())
            now = _launch_signature(trainer.args)
            if was != now:
                raise PipelinesError(
                    f"cannot resume {ckpt}: it was written with world_size={was['world_size']}, "
                    f"deepspeed={was['deepspeed']}, but this run has world_size={now['world_size']}, "
                    f"deepspeed={now['deepspeed']}. Relaunch the same way, or re-run the stage with --force."
                )
        ctx.log(f"resuming from {ckpt.name}")
    elif ctx.resuming:
        ctx.log("no complete checkpoint to resume from: starting this stage afresh")
    if ckpt is None:
        return trainer.train()
    from transformers.trainer_utils import TrainOutput

    trainer.add_callback(_stop_if_complete())
    try:
        return trainer.train(resume_from_checkpoint=str(ckpt))
    except _TrainingWasComplete:
        ctx.log(f"{ckpt.name} holds the last step ({trainer.state.global_step}): nothing left to train")
        trainer.is_in_train = False
        if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
            trainer._load_best_model()
        return TrainOutput(trainer.state.global_step, whole_run_loss(trainer, 0.0), {"train_runtime": 0.0})


def save_model(trainer, out_dir: Path, tokenizer=None) -> None:
    """Save a plain HF folder (safetensors + config [+ tokenizer]) loadable by from_pretrained in a
    plain process, whatever the ZeRO stage: under ZeRO-3 the partitioned weights are gathered
    first (all ranks must call this)."""
    out_dir = Path(out_dir)
    model = trainer.model
    if trainer.is_deepspeed_enabled and trainer.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if trainer.args.should_save:
                state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
                model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    elif getattr(trainer, "is_fsdp_enabled", False):
        # FSDP (GPU only, see check_launch; not exercised by the CPU test suite): every rank takes part in
        # gathering the full state dict (fsdp_state_dict_type FULL_STATE_DICT), rank 0 writes it
        trainer.save_model(str(out_dir))
    elif trainer.args.should_save:
        trainer.accelerator.unwrap_model(model).save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None and trainer.args.should_save:
        tokenizer.save_pretrained(out_dir)
    trainer.accelerator.wait_for_everyone()


def whole_run_loss(trainer, fallback: float | None = None) -> float | None:
    """The mean training loss over every optimizer step of the run, also after a resume (the Trainer's own
    `training_loss` averages only the steps of the last process). From the logged losses, each the mean
    since the previous log, weighted by its number of steps; the log history comes back with a checkpoint."""
    logged = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h and "step" in h]
    if not logged:
        return fallback
    total, prev = 0.0, 0
    for step, loss in logged:
        total += loss * (step - prev)
        prev = step
    return round(total / prev, 6) if prev else fallback


def log_history(trainer) -> list[dict]:
    return list(trainer.state.log_history)


def write_log_history(trainer, ctx: RunContext) -> Path:
    """Trainer logs as JSON next to the model: what reports plot (loss, lr, eval metrics)."""
    path = ctx.output_dir / "log_history.json"
    if ctx.is_main:
        atomic_write_json(path, log_history(trainer))
    return path
