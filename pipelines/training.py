"""Shared Trainer / DeepSpeed / accelerate set-up for every training stage.

Stages keep their own data and model code; this module owns what must be identical across them:
typed training hyperparameters, TrainingArguments, the DeepSpeed JSON, resume from the latest
complete checkpoint (with a clear error when the launch changed), and a final save that yields a
plain HF folder whatever the ZeRO stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class LoraConfig(BaseModel):
    """LoRA adapters (peft), as every training stage that adapts a model takes them."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="None: per architecture (bert: query,value; gpt2: c_attn; llama/marian/bart: "
        "q_proj,v_proj; other: all-linear)."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained and saved in full; None: the classifier head for (token) classification."
    )


class QatConfig(BaseModel):
    """Quantisation-aware training (torchao's QAT): the stage trains with its nn.Linear layers fake-quantised (the
    forward pass rounds weights and activations to the int8 grid, gradients pass straight through), then swaps them
    back to plain Linear layers before saving, so model/ is an ordinary full-precision folder whose weights were
    trained for that rounding. The quantize stage then converts it for real (method dynamic_int8 or torchao_int8)."""

    model_config = ConfigDict(extra="forbid")

    scheme: Literal["int8"] = Field(
        "int8", description="int8: weights symmetric int8 per output channel (the grid of both int8 methods of the "
        "quantize stage), activations asymmetric int8 per token (torchao's dynamic fake quantiser; it has no symmetric "
        "or per-tensor one). int4 weight schemes are not offered: this CPU has no torchao int4 kernel to run them.")
    keep: list[str] = Field(default_factory=list, description="Linear modules (names or name suffixes) trained without "
                            "fake quantisation: give the quantize stage the same `keep`.")

    @model_validator(mode="after")
    def _check(self):
        from pipelines.modelio import torchao_missing

        if (problem := torchao_missing()) is not None:
            raise ValueError(problem)
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides epochs.")
    batch_size: int = Field(16, ge=1, description="Per device (per rank) micro-batch.")
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: Union[float, Literal["auto"]] = Field(
        5e-4, description="> 0, or auto: a learning-rate range test on the train data picks it (see lr_range_test).")
    weight_decay: float = Field(0.01, ge=0)
    warmup: float = Field(0.0, ge=0, description="< 1: fraction of total steps; >= 1: steps.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0)
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the training loss (the Trainer's label_smoothing_factor), "
        "e.g. 0.1 for translation; 0: the model's own loss.")
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
    compile_loss: bool = Field(
        False, description="torch.compile the model's loss function only (transformers' `model.loss_function`: the "
        "upcast, log-softmax and its gradient over the vocabulary fused): a 6-layer, 256-wide GPT-2 with 8,000 tokens "
        "spends about a fifth of its forward + backward in its head and loss on a CPU (bench/fused_ce.py: 482 of "
        "2,735 ms). Compiles in seconds, where torch_compile compiles the whole model.")
    dataloader_workers: int = Field(0, ge=0)
    gradient_checkpointing: bool = False

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, v):
        if v == "auto":
            return v
        try:
            value = float(v)
        except (TypeError, ValueError):
            raise ValueError("expected a number > 0 or auto") from None
        if isinstance(v, bool) or not value > 0:
            raise ValueError("expected a number > 0 or auto")
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.early_stopping_patience and not self.metric_for_best_model:
            raise ValueError("early_stopping_patience needs metric_for_best_model (e.g. eval_loss)")
        if self.lr == "auto" and self.deepspeed is not None:
            raise ValueError("lr: auto runs its range test in one process; give a number with deepspeed")
        if self.lr == "auto":
            import importlib.util

            if importlib.util.find_spec("torch_lr_finder") is None:
                raise ValueError("lr: auto needs torch-lr-finder: pip install 'pipelines[sweep]'")
        return self


# ---------------------------------------------------------------- quantisation-aware training (torchao)


def qat_prepare(model, qat: QatConfig | None, skip: tuple[str, ...] = ()) -> dict:
    """Put torchao fake quantisers on the model's nn.Linear layers in place (those not kept, nor under `skip`:
    training-only modules such as distillation projections); returns what the manifest records (empty: no QAT)."""
    if qat is None:
        return {}
    import torch

    from pipelines import quiet

    torchao = quiet.import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    from pipelines.modelio import kept_modules

    kept = set(kept_modules(model, qat.keep))
    chosen = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in kept
              and not any(n == s or n.startswith(s + ".") for s in skip)]
    if not chosen:
        raise PipelinesError("qat: the model has no nn.Linear layer to fake-quantise"
                             + (f" outside keep {qat.keep}" if qat.keep else ""))
    activations = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
    names = set(chosen)
    quantize_(model, QATConfig(activation_config=activations, weight_config=weights, step="prepare"),
              filter_fn=lambda m, fqn: fqn in names)
    return {"scheme": qat.scheme, "torchao": torchao.__version__, "fake_quantized_linear": len(chosen),
            "kept": sorted(kept), "activations": "int8 per token, asymmetric (dynamic)",
            "weights": "int8 per output channel, symmetric",
            "convert": "model/ holds the trained full-precision weights; quantize it with the quantize stage "
                       "(method dynamic_int8, or torchao_int8), with the same keep"}


def qat_convert(model) -> int:
    """Swap torchao's fake-quantised Linear layers back to plain nn.Linear in place (torchao's QAT `convert` step
    without a base config: the weights unchanged, nothing left that a plain from_pretrained could not load); returns
    how many were swapped."""
    from pipelines import quiet

    quiet.import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    n = sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    if n:
        quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return n


# ---------------------------------------------------------------- rows


def train_and_eval_rows(dsd, seed: int, max_train_rows: int | None, eval_splits: list[str], max_eval_rows: int | None):
    """(the train split, a seeded subsample of max_train_rows when it has more; {split: its first max_eval_rows
    rows} for the eval_splits the card has): how every training stage limits its rows."""
    train_rows = dsd["train"]
    if max_train_rows and len(train_rows) > max_train_rows:
        train_rows = train_rows.shuffle(seed=seed).select(range(max_train_rows))
    evals = {s: dsd[s] for s in eval_splits if s in dsd}
    if max_eval_rows:
        evals = {s: d.select(range(min(len(d), max_eval_rows))) for s, d in evals.items()}
    return train_rows, evals


# ---------------------------------------------------------------- hardware


def qlora_missing() -> list[str]:
    """What method qlora (a 4-bit base through bitsandbytes) lacks on this machine; empty when it can run."""
    import importlib.util

    import torch

    return ([] if torch.cuda.is_available() else ["a CUDA GPU (none visible)"]) + (
        [] if importlib.util.find_spec("bitsandbytes") else ["the bitsandbytes package (pip install bitsandbytes)"])


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
        learning_rate=LR_AUTO_PLACEHOLDER if cfg.lr == "auto" else cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup,
        lr_scheduler_type=cfg.scheduler,
        max_grad_norm=cfg.max_grad_norm,
        label_smoothing_factor=cfg.label_smoothing,
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
        load_best_model_at_end=cfg.load_best_model_at_end or bool(cfg.early_stopping_patience),
        metric_for_best_model=cfg.metric_for_best_model,
        greater_is_better=cfg.greater_is_better,
        disable_tqdm=not sys.stderr.isatty(),  # on a terminal the Trainer's progress bar (ETA); in a log its lines
        use_cpu=not has_cuda(),
        ddp_find_unused_parameters=False,
    )
    # transformers 5.24 renamed gradient_checkpointing (the old name warns on every TrainingArguments)
    names = {f.name for f in dataclasses.fields(args_cls or TrainingArguments)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = (
        cfg.gradient_checkpointing)
    if cfg.deepspeed is not None:
        kwargs["deepspeed"] = deepspeed_dict(cfg.deepspeed, precision)
    kwargs.update(overrides)
    if cfg.lr == "auto" and (ctx.world_size > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"):
        raise PipelinesError("lr: auto runs its range test in one process; give train.lr a number under accelerate "
                             "launch / DeepSpeed")
    if "tensorboard" in cfg.report_to:
        # transformers 5 dropped TrainingArguments.logging_dir; its TensorBoardCallback reads this instead
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ctx.output_dir / "logs")
    args = (args_cls or TrainingArguments)(**kwargs)
    args.pipelines_lr_auto = cfg.lr == "auto"  # read by train(): the range test runs on the Trainer it builds
    args.pipelines_compile_loss = cfg.compile_loss  # read by train(): compiled on the Trainer's model
    return args


# ---------------------------------------------------------------- lr: auto (learning-rate range test)

LR_AUTO_PLACEHOLDER = 1e-3  # in TrainingArguments until the range test replaces it (before any optimizer exists)
LR_RANGE = "lr_range_test.json"
LR_RANGE_STEPS, LR_RANGE_START, LR_RANGE_END = 100, 1e-7, 1.0


@contextlib.contextmanager
def _rng_kept():
    """python, numpy and torch RNG states put back afterwards: the range test draws batches and dropout masks, and
    the training after it must draw what it would have drawn without it (also when a resumed run skips it)."""
    import random

    import numpy as np
    import torch

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def lr_range_test(trainer, ctx: RunContext) -> dict:
    """Leslie Smith's learning-rate range test with torch-lr-finder: LR_RANGE_STEPS optimizer steps (AdamW, the
    run's weight decay) on the train batches with the lr rising exponentially from 1e-7 to 1 (stopping when the
    smoothed loss passes 5x its best), then the model and optimizer are put back as they were. The lr picked is a
    tenth of the lr where the smoothed loss was lowest (fastai's `lr_min / 10`); torch-lr-finder's own suggestion,
    the steepest descent (first 10 and last 5 points left out), is recorded beside it (on the SST-2 sample it
    pointed at 7.6e-3, where sweep trials at 9.5e-3 did not learn). The RNG states are put back after it, so training then draws the same batches and dropout as a run given
    that lr as a number. Kept in <stage>/lr_range_test.json, so a resumed run trains with the same lr."""
    import numpy as np
    import torch
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    cached = ctx.output_dir / LR_RANGE
    if cached.is_file():
        return json.loads(cached.read_text())

    class Batches(TrainDataLoaderIter):
        def inputs_labels_from_batch(self, batch):
            return batch, None

    class OwnLoss(torch.nn.Module):  # the model's own loss on a collated batch (labels inside)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return self.model(**batch).loss

    model = trainer.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR_RANGE_START,
                                  weight_decay=trainer.args.weight_decay)
    finder = LRFinder(OwnLoss(model), optimizer, criterion=lambda loss, _labels: loss)
    with _rng_kept(), contextlib.redirect_stdout(io.StringIO()):  # its progress bar and prints
        finder.range_test(Batches(trainer.get_train_dataloader()), start_lr=LR_RANGE_START, end_lr=LR_RANGE_END,
                          num_iter=LR_RANGE_STEPS, step_mode="exp", smooth_f=0.05, diverge_th=5,
                          accumulation_steps=trainer.args.gradient_accumulation_steps)
    finder.reset()
    model.zero_grad(set_to_none=True)
    lrs, losses = finder.history["lr"], finder.history["loss"]
    skip_start, skip_end = 10, 5
    if len(lrs) < skip_start + skip_end + 2:
        raise PipelinesError(f"lr: auto: the loss diverged after {len(lrs)} steps of the range test, too few to read "
                             "an lr from; give train.lr a number")
    steepest = skip_start + int(np.gradient(np.array(losses[skip_start:-skip_end])).argmin())
    lowest = float(lrs[int(np.argmin(losses))])
    found = {"lr": lowest / 10, "rule": "a tenth of the lr at the lowest smoothed loss (fastai's lr_min / 10)",
             "min_loss_lr": lowest, "steepest_lr": float(lrs[steepest]), "steps": len(lrs),
             "diverged": len(lrs) < LR_RANGE_STEPS, "lrs": [float(x) for x in lrs], "losses": [float(x) for x in losses]}
    if not found["diverged"]:
        # the rule reads the lowest loss as the edge of stability; a curve that never turned up has no such edge
        # (WNUT-17 LoRA: lowest at lr 0.44 on its way down to the tag-everything-O loss; 0.044 trained to F1 0)
        found["warning"] = (
            f"the range test's loss never diverged in {len(lrs)} steps (lr up to {lrs[-1]:.3g}): its lowest point "
            "may be a plateau (such as predicting the majority label), not the edge of stability, so the lr read "
            f"from it ({lowest / 10:.3g}) may be far off; check the curve (pipelines report) or give train.lr a number")
    if ctx.is_main:
        atomic_write_json(cached, found)
    return found


def compile_loss(model, ctx: RunContext) -> None:
    """train.compile_loss: the model's loss function (transformers' `loss_function`, set through its own setter)
    under torch.compile; the forward and its head stay eager, so DDP and DeepSpeed wrap the model as before."""
    import torch

    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model: the model inside
    if not hasattr(type(model), "loss_function"):
        raise PipelinesError(f"train.compile_loss: {type(model).__name__} has no transformers loss_function to compile")
    model.loss_function = torch.compile(model.loss_function)
    ctx.log("compile_loss: the model's loss function runs under torch.compile (the first steps compile it)")


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
    if getattr(trainer.args, "pipelines_compile_loss", False):
        compile_loss(trainer.model, ctx)
    if getattr(trainer.args, "pipelines_lr_auto", False):
        found = lr_range_test(trainer, ctx)
        trainer.args.learning_rate = found["lr"]
        ctx.info["lr_range_test"] = found
        ctx.log(f"lr: auto -> {found['lr']:.3g} (range test of {found['steps']} steps: {found['rule']}; steepest "
                f"descent at {found['steepest_lr']:.3g})")
        if found.get("warning"):
            ctx.log(f"warning: lr: auto: {found['warning']}")
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


@contextlib.contextmanager
def plain_loading():
    """Load models unpartitioned: transformers partitions every from_pretrained (zero.Init) in a process
    whose TrainingArguments enabled ZeRO-3; rank-0-only merging and checks need a plain copy."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref


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
