"""pretrain stage: train a language model from scratch with the tokenizer stage's vocabulary.

    pipelines run recipes/pretrain_tinyshakespeare.yaml                       # one process
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml \\
        -m pipelines run recipes/pretrain_tinyshakespeare.yaml                 # 2+ ranks, ZeRO-2

Objectives: `causal_lm` (GPT-2 or Llama), `masked_lm` (BERT or RoBERTa), `seq2seq` (a BART-style
encoder-decoder on a card's source -> target pairs, e.g. the translation model the finetune stage
starts from). The model is built from a config (never downloaded); its vocabulary is len(tokenizer).

seed -> data (tokenise, pack) -> model -> trainer -> train (resuming) -> save -> evaluate.

Data for the LM objectives: every row of the card's `text` column is one document (a speech for a
`paragraph` card, a line for a `line` card); an EOS (SEP for WordPiece vocabularies) follows each
document and the stream is cut into full blocks of `context_length` tokens: no padding, no dropped
tokens but the split's final remainder (pipelines/packing.py). Validation is packed the same way.

Metrics: final validation loss and perplexity (token-weighted over all validation tokens), the
perplexity of an add-one unigram model of the train tokens on the very same validation tokens (what a
model that learned nothing but word frequencies gets), train tokens, tokens/s and MFU (6 * params *
tokens / step time, against a matmul peak measured once per machine and cached, or `peak_flops`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines import packing, training
from pipelines.checkpoints import atomic_write_json
from pipelines.errors import PipelinesError
from pipelines.stage import Evaluation, RunContext, StageConfig, StageDef, StageResult
from pipelines.training import TrainConfig



@dataclass(frozen=True)
class Objective:
    """A pretraining objective: what it trains and the model (and pipelines task) it makes."""

    architectures: tuple[str, ...]  # the first is the default
    auto: str  # the transformers Auto class of the model
    task: str | None  # the task (pipelines.tasks) of the model it makes; masked LM: none (an encoder to fine-tune)
    next_token: bool = False  # labels are the next tokens (the model shifts them)
    masked: bool = False  # labels are masked-out tokens
    pairs: bool = False  # trained on source -> target pairs


OBJECTIVES = {
    "causal_lm": Objective(("gpt2", "llama"), "AutoModelForCausalLM", "causal-lm", next_token=True),
    "masked_lm": Objective(("bert", "roberta"), "AutoModelForMaskedLM", None, masked=True),
    "seq2seq": Objective(("bart",), "AutoModelForSeq2SeqLM", "translation", pairs=True),
}
ARCHITECTURES = {name: o.architectures for name, o in OBJECTIVES.items()}


class ModelShape(BaseModel):
    """The model's size. Built from a transformers config; nothing is downloaded."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["gpt2", "llama", "bert", "roberta", "bart"] | None = Field(
        None, description="Default: gpt2 (causal_lm), roberta (masked_lm), bart (seq2seq)."
    )
    layers: int = Field(6, ge=1, description="Transformer blocks (seq2seq: in the encoder and in the decoder).")
    heads: int = Field(8, ge=1)
    kv_heads: int | None = Field(None, ge=1, description="llama only: grouped-query attention heads.")
    hidden: int = Field(256, ge=8)
    intermediate: int | None = Field(None, ge=8, description="MLP width; default 4 * hidden.")
    context_length: int = Field(256, ge=8, description="Block size of packed training data and position count.")
    dropout: float = Field(0.0, ge=0, lt=1)
    attn_implementation: Literal["eager", "sdpa"] = Field(
        "sdpa", description="sdpa: torch's fused scaled-dot-product attention (2x eager on this CPU)."
    )
    tie_embeddings: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


class Seq2SeqOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval_samples: int = Field(200, ge=1, description="BLEU/chrF from generate() on the first N validation pairs.")
    num_beams: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    generation_batch_size: int = Field(32, ge=1)


class PretrainConfig(StageConfig):
    objective: Literal["causal_lm", "masked_lm", "seq2seq"] = "causal_lm"
    model: ModelShape = Field(default_factory=ModelShape)
    column: Literal["text", "source", "target"] = Field("text", description="LM objectives: the text column.")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    eval_max_blocks: int | None = Field(None, ge=1, description="Evaluate on at most N validation blocks/pairs.")
    num_proc: int | None = Field(
        None, ge=1, description="Tokenise with N processes (the fast tokenizer is already multi-threaded)."
    )
    peak_flops: float | None = Field(None, gt=0, description="FLOP/s for MFU; default: measured once and cached.")
    seq2seq: Seq2SeqOptions = Field(default_factory=Seq2SeqOptions)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-4, warmup=0.05, scheduler="cosine"))

    @model_validator(mode="after")
    def _check(self):
        arch = self.model.architecture
        if arch is not None and arch not in ARCHITECTURES[self.objective]:
            raise ValueError(
                f"model.architecture {arch!r} does not fit objective {self.objective!r}; "
                f"use one of {list(ARCHITECTURES[self.objective])}"
            )
        if self.model.kv_heads is not None and (arch or ARCHITECTURES[self.objective][0]) != "llama":
            raise ValueError("model.kv_heads is for architecture llama only")
        return self

    @property
    def architecture(self) -> str:
        return self.model.architecture or ARCHITECTURES[self.objective][0]

    @property
    def spec(self) -> Objective:
        return OBJECTIVES[self.objective]


# ---------------------------------------------------------------- helpers


def _main_first(ctx: RunContext):
    """Rank 0 tokenises and fills the cache while the other ranks wait, then they read it."""
    if ctx.world_size > 1:
        from accelerate import PartialState

        return PartialState().main_process_first()
    return contextlib.nullcontext()


def build_model(cfg: PretrainConfig, tokenizer):
    """A freshly initialised model of `cfg.model`'s shape, vocabulary len(tokenizer) (never
    tokenizer.vocab_size, which leaves out added special tokens)."""
    from transformers import (
        BartConfig,
        BertConfig,
        GPT2Config,
        LlamaConfig,
        RobertaConfig,
    )

    m, arch, vocab = cfg.model, cfg.architecture, len(tokenizer)
    inner = m.intermediate or 4 * m.hidden
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
    ids["eos_token_id"] = packing.separator_id(tokenizer)
    common = {"vocab_size": vocab, "tie_word_embeddings": m.tie_embeddings, **ids}
    if arch == "gpt2":
        conf = GPT2Config(
            n_positions=m.context_length, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=inner,
            resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, **common,
        )  # fmt: skip
    elif arch == "llama":
        conf = LlamaConfig(
            hidden_size=m.hidden, intermediate_size=inner, num_hidden_layers=m.layers, num_attention_heads=m.heads,
            num_key_value_heads=m.kv_heads or m.heads, max_position_embeddings=m.context_length,
            attention_dropout=m.dropout, **common,
        )  # fmt: skip
    elif arch in ("bert", "roberta"):
        if tokenizer.mask_token_id is None:
            raise PipelinesError("masked_lm needs a tokenizer with a mask token (<mask> / [MASK])")
        cls = BertConfig if arch == "bert" else RobertaConfig
        # RoBERTa numbers positions from pad_token_id + 1: it needs 2 more position slots
        positions = m.context_length + (2 if arch == "roberta" else 0)
        conf = cls(
            hidden_size=m.hidden, num_hidden_layers=m.layers, num_attention_heads=m.heads, intermediate_size=inner,
            max_position_embeddings=positions, hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
            type_vocab_size=1, **common,
        )  # fmt: skip
    else:  # bart
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
        conf = BartConfig(
            d_model=m.hidden, encoder_layers=m.layers, decoder_layers=m.layers, encoder_attention_heads=m.heads,
            decoder_attention_heads=m.heads, encoder_ffn_dim=inner, decoder_ffn_dim=inner,
            max_position_embeddings=m.context_length, dropout=m.dropout, attention_dropout=m.dropout,
            decoder_start_token_id=start, forced_eos_token_id=ids["eos_token_id"], scale_embedding=True, **common,
        )  # fmt: skip
    import transformers

    model = getattr(transformers, cfg.spec.auto).from_config(conf, attn_implementation=m.attn_implementation)
    if cfg.spec.next_token:
        # GPT2LMHeadModel's class name does not say "ForCausalLM", so transformers leaves loss_type None
        # and the Trainer then counts labels[:, 0] as a target: every loss / gradient scaled by (T-1)/T
        model.loss_type = "ForCausalLM"
    if tokenizer.pad_token_id is None and cfg.spec.pairs:
        raise PipelinesError(f"objective {cfg.objective} needs a tokenizer with a pad token")
    return model


def count_params(model) -> int:
    """Parameter count, also under ZeRO-3 (where a partitioned parameter's numel() is 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


class PackedCollator:
    """Batches of packed blocks. Causal LM: labels = input_ids (the model shifts them; there is no
    padding to mask, so an EOS is always a target). Masked LM: DataCollatorForLanguageModeling's
    masking, never masking special tokens. Rows that already carry labels (the pre-masked validation
    set) pass through unchanged."""

    def __init__(self, tokenizer, mlm: bool, mlm_probability: float = 0.15):
        import torch

        self.mlm = mlm
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        if mlm:
            from transformers import DataCollatorForLanguageModeling

            self.masker = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability)

    def mask(self, ids):
        import torch

        return self.masker.torch_mask_tokens(ids.clone(), special_tokens_mask=torch.isin(ids, self.special))

    def __call__(self, features):
        import torch

        ids = torch.stack([torch.as_tensor(f["input_ids"]) for f in features]).long()
        if "labels" in features[0]:
            return {"input_ids": ids, "labels": torch.stack([torch.as_tensor(f["labels"]) for f in features]).long()}
        if self.mlm:
            ids, labels = self.mask(ids)
            return {"input_ids": ids, "labels": labels}
        return {"input_ids": ids, "labels": ids.clone()}


def premask(blocks, collator: PackedCollator, seed: int):
    """The validation blocks masked once, with a fixed seed: every evaluation scores the same masked
    tokens, so MLM validation loss is comparable across evaluations, runs and resumes."""
    import datasets
    import torch

    ids = torch.as_tensor(blocks.with_format("numpy")["input_ids"]).long()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        masked, labels = collator.mask(ids)
    finally:
        torch.random.set_rng_state(state)
    return datasets.Dataset.from_dict({"input_ids": masked.numpy(), "labels": labels.numpy()})


def nll_per_example(shift: bool):
    """preprocess_logits_for_metrics: reduce each example's logits to (summed NLL, target count) right
    away, so evaluation never holds every logit in memory (PITFALLS: eval OOM)."""

    def reduce(logits, labels):
        import torch
        import torch.nn.functional as F

        if isinstance(logits, tuple):
            logits = logits[0]
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        return torch.stack([nll.sum(-1), (labels != -100).sum(-1).float()], dim=-1)

    return reduce


def perplexity_metrics(pred) -> dict:
    """compute_metrics: token-weighted perplexity over the whole validation set."""
    from pipelines import metrics

    arr = pred.predictions
    total, n = float(arr[:, 0].sum()), int(arr[:, 1].sum())
    return {"perplexity": metrics.perplexity(total, n), "tokens": n}


def throughput_callback():
    """Times the training steps of this session (forward, backward, optimizer; not evaluation,
    checkpointing or the wait for data) and remembers the token count they started from."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def __init__(self):
            self.seconds, self.steps, self.tokens_at_start, self._t = 0.0, 0, None, None
            self.first_step = None  # includes torch.compile's one-off compilation when it is on

        def on_step_begin(self, args, state, control, **kw):
            if self.tokens_at_start is None:
                self.tokens_at_start = state.num_input_tokens_seen
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if self._t is not None:
                dt = time.perf_counter() - self._t
                self.seconds += dt
                self.steps += 1
                if self.first_step is None:
                    self.first_step = dt

    return Throughput()


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def matmul_peak_flops(precision: str) -> float:
    """Dense matmul FLOP/s of this device at `precision` (best of several square matmuls), measured once per
    (device, precision, thread count) and cached in $PIPELINES_CACHE/peak_flops.json with the load average it was
    measured under. A CPU figure measured on a busy machine (load >= half the cores) is measured again the next
    time the machine is quieter, keeping the higher: once cached under load, a peak 8x too low (seen on this
    2-core box) made every later run report an MFU over 100 %."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    cuda = torch.cuda.is_available()
    key = f"{_device_name()}|{dtype}|threads={torch.get_num_threads()}"
    path = Path(os.environ.get("PIPELINES_CACHE", Path.home() / ".cache" / "pipelines")) / "peak_flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, (int, float)):  # written before the load was recorded
        entry = {"flops": float(entry), "load": math.inf}
    load = 0.0 if cuda else os.getloadavg()[0]
    busy = (os.cpu_count() or 1) / 2
    if entry is not None and (cuda or entry["load"] < busy or load >= entry["load"]):
        return float(entry["flops"])
    flops = _measure_matmul(torch, dtype, cuda)
    if entry is not None and entry["flops"] > flops:
        flops, load = entry["flops"], min(load, entry["load"])
    cache[key] = {"flops": flops, "load": round(load, 2)}
    atomic_write_json(path, cache)
    return flops


def _measure_matmul(torch, dtype, cuda: bool) -> float:
    n = 8192 if cuda else 2048
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)  # never the global RNG: a cold cache must not change results
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=g)
    best, start, reps = math.inf, time.perf_counter(), 0
    # best of many: on a shared machine other processes steal some runs, rarely all of them
    while reps < 5 or (time.perf_counter() - start < 2.0 and reps < 50):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        if reps >= 2:  # the first runs warm up caches and kernels
            best = min(best, time.perf_counter() - t)
        reps += 1
    return 2 * n**3 / best


# ---------------------------------------------------------------- the stage


def run(cfg: PretrainConfig, ctx: RunContext) -> StageResult:
    import numpy as np
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, GenerationConfig, Trainer, set_seed

    set_seed(ctx.seed)
    seq2seq = cfg.spec.pairs
    block = cfg.model.context_length

    # ---- tokenizer (the tokenizer stage's output)
    tokenizer = AutoTokenizer.from_pretrained(ctx.inputs["tokenizer"].output("tokenizer"))
    tokenizer.model_max_length = block  # saved with the model: no "huge" default max length

    # ---- data: tokenise (cached, keyed by the tokenizer's content) and pack into full blocks
    dsd = ctx.data.load(seed=ctx.seed)
    for split in ("train", "validation"):
        if split not in dsd:
            raise PipelinesError(f"data card {ctx.data.path} has no {split} split")
    info: dict = {"split_notes": ctx.data.split_notes}
    with _main_first(ctx):
        if seq2seq:
            train_tok = packing.tokenize_pairs(dsd["train"], tokenizer, block, block, num_proc=cfg.num_proc)
            val_tok = packing.tokenize_pairs(dsd["validation"], tokenizer, block, block, num_proc=cfg.num_proc)
            train_ds, val_ds = train_tok, val_tok
            if cfg.eval_max_blocks and len(val_ds) > cfg.eval_max_blocks:
                val_ds = val_ds.select(range(cfg.eval_max_blocks))
            info["data"] = {"train_pairs": len(train_ds), "validation_pairs": len(val_ds)}
        else:
            train_tok = packing.tokenize_documents(dsd["train"], tokenizer, cfg.column, num_proc=cfg.num_proc)
            val_tok = packing.tokenize_documents(dsd["validation"], tokenizer, cfg.column, num_proc=cfg.num_proc)
            train_pack, val_pack = packing.pack(train_tok, block), packing.pack(val_tok, block)
            train_ds, val_ds = train_pack.dataset, val_pack.dataset
            if cfg.eval_max_blocks and len(val_ds) > cfg.eval_max_blocks:
                val_ds = val_ds.select(range(cfg.eval_max_blocks))
            info["data"] = {
                "documents": "one per row of the card (text_sample_by: "
                f"{getattr(ctx.data.model, 'text_sample_by', '?')}), each followed by "
                f"{tokenizer.convert_ids_to_tokens(packing.separator_id(tokenizer))!r}",
                "train_tokens_in_split": train_pack.n_tokens,
                "train_blocks": train_pack.n_blocks,
                "train_remainder_dropped": train_pack.remainder,
                "validation_blocks": len(val_ds),
                "block_size": block,
            }
    ctx.log(f"data: {info['data']}")
    collator = (
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)
        if seq2seq
        else PackedCollator(tokenizer, mlm=cfg.spec.masked, mlm_probability=cfg.mlm_probability)
    )
    if cfg.spec.masked:
        val_ds = premask(val_ds, collator, ctx.seed)

    # ---- baseline: an add-one unigram model of the train tokens, scored on the validation targets
    vocab = len(tokenizer)
    lm_tokens = train_tok.select_columns(["labels"]).rename_column("labels", "input_ids") if seq2seq else train_tok
    counts = packing.token_counts(lm_tokens, vocab)
    if cfg.spec.next_token:
        targets = np.asarray(val_ds.with_format("numpy")["input_ids"])[:, 1:].ravel()
    else:
        labels = val_ds.with_format("arrow")["labels"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        targets = labels[labels != -100]
    base_nll, base_n = packing.unigram_nll(counts, targets)
    from pipelines import metrics

    unigram_ppl = metrics.perplexity(base_nll, base_n)

    # ---- trainer (args first: under ZeRO-3 the model is then built partitioned)
    args = training.training_args(
        cfg.train,
        ctx,
        has_eval=True,
        include_num_input_tokens_seen="non_padding" if seq2seq else "all",
        remove_unused_columns=False,
    )
    precision = training.resolve_precision(cfg.train.precision)
    set_seed(ctx.seed)
    model = build_model(cfg, tokenizer)
    model.config.use_cache = False  # no KV cache while training (memory); restored for the saved model
    if seq2seq:
        model.generation_config = GenerationConfig(
            decoder_start_token_id=model.config.decoder_start_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            forced_eos_token_id=model.config.eos_token_id, num_beams=cfg.seq2seq.num_beams,
            max_new_tokens=cfg.seq2seq.max_new_tokens,
        )  # fmt: skip
        collator.model = model  # builds decoder_input_ids from labels (shifted right)
    n_params = count_params(model)
    ctx.log(f"model: {cfg.architecture} {cfg.objective}, {n_params:,} parameters, vocab {vocab}, precision {precision}")
    speed = throughput_callback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=perplexity_metrics,
        preprocess_logits_for_metrics=nll_per_example(shift=cfg.spec.next_token),
        callbacks=training.callbacks(cfg.train) + [speed],
    )

    # ---- train (resumes from the latest complete checkpoint when the runner says so)
    out = training.train(trainer, ctx)

    # ---- evaluate (the best model if load_best_model_at_end) and save a plain HF folder
    final = trainer.evaluate()
    model_dir = ctx.output_dir / "model"
    trainer.model.config.use_cache = True
    training.save_model(trainer, model_dir, tokenizer)
    training.write_log_history(trainer, ctx)

    tokens_total = int(trainer.state.num_input_tokens_seen)
    tokens_session = tokens_total - int(speed.tokens_at_start or 0)
    if seq2seq:  # the count above is source tokens: add the targets in the train set's proportion
        n_src = int(packing.token_counts(train_tok, vocab).sum())
        ratio = 1 + int(counts.sum()) / max(n_src, 1)
        tokens_total, tokens_session = int(tokens_total * ratio), int(tokens_session * ratio)
    tok_per_s = tokens_session / speed.seconds if speed.seconds else None
    peak = cfg.peak_flops
    if peak is None:
        with _main_first(ctx):
            peak = matmul_peak_flops(precision)
        # one rank's peak times the ranks: GPUs, or CPU ranks that split the cores (torchrun gives
        # each OMP_NUM_THREADS=1, and the peak is measured with the threads a rank has)
        peak *= ctx.world_size
    mfu = 6 * n_params * tok_per_s / peak if tok_per_s else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "val_loss": round(final["eval_loss"], 4),
        "val_perplexity": round(final["eval_perplexity"], 3),
        "unigram_perplexity": round(unigram_ppl, 3),
        "val_tokens": int(final["eval_tokens"]),
        "train_loss": round(losses[-1], 4) if losses else None,
        "train_tokens": tokens_total,
        "tokens_per_s": round(tok_per_s, 1) if tok_per_s else None,
        "mfu": round(mfu, 4) if mfu else None,
        "params": n_params,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
    }

    # ---- seq2seq: BLEU / chrF from generate() on the saved model, loaded as the next stage will
    if seq2seq:
        if ctx.is_main:
            gen = generate_and_score(model_dir, dsd["validation"], cfg.seq2seq)
            info["sample_translation"] = gen.pop("sample_translation")
            result.update(gen)

    info.update(
        {
            "objective": cfg.objective,
            "architecture": cfg.architecture,
            "precision": precision,
            "attn_implementation": cfg.model.attn_implementation,
            "world_size": ctx.world_size,
            "deepspeed": training.using_deepspeed(trainer.args),
            "zero_stage": (trainer.accelerator.deepspeed_config or {}).get("zero_optimization", {}).get("stage")
            if trainer.is_deepspeed_enabled
            else None,
            "peak_flops": peak,
            "train_seconds_this_session": round(speed.seconds, 2),
            "first_step_seconds": round(speed.first_step or 0.0, 2),
            "steps_this_session": speed.steps,
            "train_runtime": round(out.metrics.get("train_runtime", 0.0), 2),
            "baseline": "add-one unigram model of the train tokens, on the same validation targets",
        }
    )
    ctx.log(
        f"val ppl {result['val_perplexity']} (unigram baseline {result['unigram_perplexity']}), "
        f"{result['tokens_per_s']} tokens/s, MFU {result['mfu']}"
    )
    scores = {"perplexity": result["val_perplexity"], "loss": result["val_loss"],
              **{k: result[k] for k in ("bleu", "chrf") if k in result}}
    evaluations = [Evaluation("pretrained", "output", "validation", scores, folder=str(model_dir), params=n_params),
                   Evaluation("unigram", "baseline", "validation", {"perplexity": result["unigram_perplexity"]})]
    return StageResult(metrics=result, outputs={"model": "model", "tokenizer": "model"}, info=info,
                       task=cfg.spec.task, evaluations=evaluations, main_metric=("perplexity", False))


def generate_and_score(model_dir: Path, val, opts: Seq2SeqOptions) -> dict:
    """Translate the first `eval_samples` validation sources with generate() (beam search) and score
    the decoded text against the untokenised references (PITFALLS: metrics on generated text)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pipelines import metrics

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    n = min(opts.eval_samples, len(val))
    sources, refs = val["source"][:n], val["target"][:n]
    eos = packing.separator_id(tok)
    preds: list[str] = []
    with torch.no_grad():
        for i in range(0, n, opts.generation_batch_size):
            ids = [x + [eos] for x in tok(sources[i : i + opts.generation_batch_size], add_special_tokens=False)["input_ids"]]
            batch = tok.pad({"input_ids": ids}, return_tensors="pt")
            outs = model.generate(**batch)
            preds.extend(t.strip() for t in tok.batch_decode(outs, skip_special_tokens=True))
    return {
        "bleu": round(metrics.bleu(preds, refs)["score"], 2),
        "chrf": round(metrics.chrf(preds, refs)["score"], 2),
        "generation_samples": n,
        "sample_translation": {"source": sources[0], "reference": refs[0], "prediction": preds[0]},
    }


STAGE = StageDef(
    name="pretrain",
    Config=PretrainConfig,
    run=run,
    version="1",
    inputs={"tokenizer": "required"},
    data="required",
    distributed=True,
    plan=lambda cfg, inputs, recipe_dir, card: (cfg.spec.task, []),
    description="Train a causal LM, masked LM or seq2seq model from scratch on packed blocks (Trainer, DeepSpeed).",
)
