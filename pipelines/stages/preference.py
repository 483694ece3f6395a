"""preference stage: align a (chat) model with preference pairs, by DPO, IPO, ORPO, SimPO or KTO, through TRL's
trainers.

SFT model -> pairs (prompt, chosen, rejected) -> tokenizer (chat template) -> TRL arguments -> policy (+ LoRA) ->
the SFT model scored on the held-out pairs -> TRL trainer -> train (resumable) -> save (LoRA merged into the
SFT weights) -> the tuned model scored on the same pairs, beside the SFT model and a trivial baseline.

Losses (`loss:`):
    dpo     TRL DPOTrainer, loss_type sigmoid (Rafailov et al. 2023); the reference is the SFT model
    ipo     DPOTrainer, loss_type ipo (Azar et al. 2023)
    orpo    TRL ORPOTrainer: SFT loss + an odds-ratio term (Hong et al. 2024), no reference model
    simpo   TRL CPOTrainer, loss_type simpo, cpo_alpha 0: length-normalised reward with a margin (Meng et al. 2024),
            no reference model
    kto     TRL KTOTrainer (Ethayarajh et al. 2024): each pair becomes two unpaired rows, chosen desirable and
            rejected undesirable

The reference (dpo, ipo, kto): with `method: lora` the SFT weights with the adapter disabled (TRL does this; one
copy of the weights in memory); with `method: full` a frozen copy of the SFT model that TRL loads beside the
policy. Either way the policy starts equal to its reference, so the DPO loss starts at ln 2 = 0.693 and moves from
there: a loss that stays at 0.693 is a policy that does not train (the classic mistake of chaining SFT and DPO
by hand, with the reference and the policy sharing one set of trainable weights).

Metrics on the held-out pairs of each split in eval_splits, for the tuned model and for the SFT model:
    reward_accuracy    share of pairs whose chosen reply has the higher implicit reward, the log-probability
                       ratio log pi(y|x) - log pi_sft(y|x) (ties count half: the SFT model scores 0.5 by definition)
    reward_margin      mean of beta * (reward(chosen) - reward(rejected))
    logp_accuracy      share of pairs where the model itself gives the chosen reply the higher log-probability
    chosen_perplexity  perplexity of the chosen replies' tokens (did alignment cost the model its fluency?)
Baseline: `longer reply` (always prefer the longer reply) for logp_accuracy.

Runs single-process or on every rank under `accelerate launch` (ZeRO through the recipe's `train.deepspeed`
or the accelerate config), like finetune; scoring and merging run on rank 0 on the saved files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipelines import basemodel, chat, modelio, tasks
from pipelines.errors import PipelinesError
from pipelines.stage import Evaluation, RunContext, StageConfig, StageDef, StageResult
from pipelines.training import (
    LoraConfig, TrainConfig, callbacks, plain_loading, qlora_missing, save_model, train, train_and_eval_rows,
    training_args, whole_run_loss, write_log_history,
)

PAIR_ROLES = ("prompt", "chosen", "rejected")


class PreferenceConfig(StageConfig):
    loss: Literal["dpo", "ipo", "orpo", "simpo", "kto"] = "dpo"
    base_model: str | None = Field(None, description="A local HF causal-LM folder (relative to the recipe), instead "
                                   "of `inputs: {model: <SFT stage>}`.")
    method: Literal["lora", "full", "qlora"] = Field("lora", description="LoRA adapter on the SFT weights (merged "
                                                      "into model/), full weights, or QLoRA (a CUDA GPU).")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    beta: float = Field(0.1, gt=0, description="Strength of the tie to the reference (dpo / ipo / kto), the reward "
                        "scale (simpo), the odds-ratio weight (orpo).")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=5e-5))
    max_length: int = Field(512, ge=8, description="Tokens of prompt + reply (the prompt is cut from its start).")
    max_train_rows: int | None = Field(None, ge=1, description="Seeded subsample of train (None: all).")
    max_eval_rows: int | None = Field(None, ge=1, description="First N pairs of each evaluated split.")
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"])
    eval_batch_size: int = Field(16, ge=1)
    chat_template: str | None = Field(None, description="For a tokenizer without one (conversational pairs): a named "
                                      "template (chatml) or a Jinja string; saved with the model.")
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.chat_template is not None and (problem := chat.template_problem(self.chat_template)):
            raise ValueError(f"chat_template: {problem}")
        if self.loss in ("orpo", "simpo") and self.train.deepspeed is not None and self.train.deepspeed.zero_stage == 3:
            raise ValueError(f"loss {self.loss}: TRL's experimental {self.loss} trainer is not tested here under ZeRO-3")
        return self

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folder = basemodel.local_folder(self.base_model, recipe_dir)
        return {"base_model": folder} if folder else {}


# ---------------------------------------------------------------- TRL's trainers, one line per loss


def _trl(loss: str):
    """(Trainer class, its config class, what the config sets for this loss)."""
    import warnings

    if loss in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig, {"loss_type": ["sigmoid" if loss == "dpo" else "ipo"]}
    if loss == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig, {}
    with warnings.catch_warnings():  # their import says "experimental"; the recipe chose them knowingly
        warnings.simplefilter("ignore")
        if loss == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOTrainer, ORPOConfig, {}
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer, CPOConfig, {"loss_type": "simpo", "cpo_alpha": 0.0}


def trl_arguments(cfg: PreferenceConfig, ctx: RunContext, has_eval: bool):
    _, Config, extra = _trl(cfg.loss)
    extra = dict(extra, beta=cfg.beta, max_length=cfg.max_length)
    if cfg.loss == "simpo":
        extra["simpo_gamma"] = cfg.simpo_gamma
    return training_args(cfg.train, ctx, has_eval=has_eval, args_cls=Config, **extra)


# ---------------------------------------------------------------- data, tokenizer, model


@dataclass
class Pairs:
    train: object
    evals: dict  # split -> pairs

    @property
    def validation(self) -> str | None:
        return "validation" if "validation" in self.evals else next(iter(self.evals), None)


def load_pairs(cfg: PreferenceConfig, ctx: RunContext) -> Pairs:
    if ctx.data is None:
        raise PipelinesError("preference needs a data card of pairs (prompt, chosen, rejected): add `data: <card key>`")
    dsd = ctx.data.load(seed=ctx.seed)
    if "train" not in dsd:
        raise PipelinesError(f"preference needs a train split; data card {ctx.data.path} has {list(dsd)}")
    return Pairs(*train_and_eval_rows(dsd, ctx.seed, cfg.max_train_rows, cfg.eval_splits, cfg.max_eval_rows))


def fitting(pairs: Pairs, tokenizer, max_length: int) -> tuple[Pairs, list[str]]:
    """The pairs whose prompt + each reply fit max_length whole (a reply cut short, or a prompt cut into, would
    score the wrong text; TRL's ORPO / CPO trainers turn an emptied reply into NaN losses), and notes on the rest."""
    def keep(rows):
        ok = [i for i, r in enumerate(rows) if all(encode_reply(tokenizer, r["prompt"], r[side], max_length) is not None
                                                   for side in ("chosen", "rejected"))]
        return rows.select(ok) if len(ok) < len(rows) else rows

    train, evals = keep(pairs.train), {s: keep(d) for s, d in pairs.evals.items()}
    notes = [f"{split}: {n - len(d)} of {n} pairs are longer than max_length {max_length} and are left out"
             for split, d, n in [("train", train, len(pairs.train))] + [(s, evals[s], len(d)) for s, d in pairs.evals.items()]
             if len(d) < n]
    if not len(train):
        raise PipelinesError(f"no train pair fits max_length {max_length} with its whole reply; raise max_length")
    return Pairs(train, evals), notes


def conversational(rows) -> bool:
    return isinstance(rows[0]["prompt"], list)


def load_tokenizer(cfg: PreferenceConfig, base, pairs: Pairs) -> tuple[object, list[str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base.name, trust_remote_code=cfg.trust_remote_code)
    notes = chat.set_template(tok, cfg.chat_template) if cfg.chat_template else []
    if conversational(pairs.train):
        chat.check_template(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        notes.append("tokenizer has no pad token: EOS is used for padding")
    return tok, notes


def load_policy(cfg: PreferenceConfig, base, tokenizer):
    """The SFT model the policy starts from (its embeddings sized for the tokenizer)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.method == "qlora":
        import torch
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = basemodel.from_pretrained(AutoModelForCausalLM.from_pretrained, base, **kwargs)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def peft_config(cfg: PreferenceConfig, model):
    if cfg.method == "full":
        return None
    from peft import LoraConfig as PeftLora

    return PeftLora(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
                    target_modules=cfg.lora.target_modules or basemodel.lora_targets(model),
                    modules_to_save=list(cfg.lora.modules_to_save) if cfg.lora.modules_to_save else None)


def preflight(cfg: PreferenceConfig) -> None:
    if problem := trl_problem():
        raise PipelinesError(problem)
    if cfg.method == "qlora" and (missing := qlora_missing()):
        raise PipelinesError("method qlora loads the SFT model in 4 bits and needs " + " and ".join(missing)
                             + "; use method: lora (the same adapter on full-precision weights) on this machine")


def make_trainer(cfg: PreferenceConfig, args, model, tokenizer, pairs: Pairs):
    Trainer, _, _ = _trl(cfg.loss)
    train_ds, eval_ds = pairs.train, pairs.evals.get(pairs.validation) if pairs.validation else None
    if cfg.loss == "kto":
        from trl.data_utils import unpair_preference_dataset

        train_ds = unpair_preference_dataset(train_ds)
        eval_ds = unpair_preference_dataset(eval_ds) if eval_ds is not None else None
    return Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                   peft_config=peft_config(cfg, model), callbacks=callbacks(cfg.train))


# ---------------------------------------------------------------- scoring pairs


def encode_reply(tokenizer, prompt, reply, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of prompt + reply, labels on the reply's tokens only (its end-of-turn / EOS included)."""
    if isinstance(prompt, list) or isinstance(reply, list):
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        answer = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
        return chat.encode(tokenizer, turns + answer, max_length, learn_from=len(turns))
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(reply, add_special_tokens=False)["input_ids"][: max_length - 1] + [tokenizer.eos_token_id]
    p = p[-(max_length - len(r)):] if len(r) < max_length else []
    return p + r, [-100] * len(p) + r


def reply_logps(model, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[tuple[float, int]]:
    """(summed log-probability, tokens) of each encoded reply (labels != -100) given its prompt."""
    import torch
    import torch.nn.functional as F

    out: list[tuple[float, int]] = []
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i : i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in chunk])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in chunk])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            lp = -F.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
            keep = target.ne(-100)
            out.extend(zip((lp * keep).sum(1).tolist(), keep.sum(1).tolist()))
    return out


def score_pairs(model, tokenizer, rows, cfg: PreferenceConfig, reference: dict | None = None) -> tuple[dict, dict]:
    """(metrics, the log-probabilities scored) of a model on pairs; `reference`: the SFT model's log-probabilities
    (None: this is the SFT model, whose implicit rewards are 0)."""
    encoded = encode_pairs(tokenizer, rows, cfg.max_length)
    lp = {side: reply_logps(model, encoded[side], tokenizer.pad_token_id, cfg.eval_batch_size) for side in encoded}
    ref = reference or lp
    reward = {s: [a[0] - b[0] for a, b in zip(lp[s], ref[s])] for s in lp}
    n = len(lp["chosen"])
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(reward["chosen"], reward["rejected"]))
    tokens = sum(t for _, t in lp["chosen"])
    metrics = {
        "reward_accuracy": round(wins / n, 4),
        "reward_margin": round(cfg.beta * sum(c - r for c, r in zip(reward["chosen"], reward["rejected"])) / n, 6),
        "logp_accuracy": round(sum(c[0] > r[0] for c, r in zip(lp["chosen"], lp["rejected"])) / n, 4),
        "chosen_perplexity": round(math.exp(-sum(x for x, _ in lp["chosen"]) / max(tokens, 1)), 4),
        "pairs": n,
    }
    return metrics, lp


def encode_pairs(tokenizer, rows, max_length: int) -> dict[str, list]:
    """{chosen: [(input_ids, labels)], rejected: [...]} of the pairs whose both sides fit max_length (whole replies)."""
    rows = [dict(zip(rows.column_names, vals)) for vals in zip(*(rows[c] for c in rows.column_names))]
    both = [(encode_reply(tokenizer, r["prompt"], r["chosen"], max_length),
             encode_reply(tokenizer, r["prompt"], r["rejected"], max_length)) for r in rows]
    both = [(c, r) for c, r in both if c is not None and r is not None]
    if not both:
        raise PipelinesError(f"no preference pair fits max_length {max_length} with a whole reply; raise max_length")
    return {"chosen": [c for c, _ in both], "rejected": [r for _, r in both]}


def longer_reply_baseline(rows) -> dict:
    length = lambda v: len(v) if isinstance(v, str) else sum(len(t["content"]) for t in v)  # noqa: E731
    wins = sum(1.0 if length(c) > length(r) else 0.5 if length(c) == length(r) else 0.0
               for c, r in zip(rows["chosen"], rows["rejected"]))
    return {"logp_accuracy": round(wins / len(rows), 4)}


# ---------------------------------------------------------------- run


def score_sft(cfg, ctx, base, tokenizer, pairs: Pairs) -> dict:
    """{split: (metrics, log-probabilities)} of the SFT model, before any training (rank 0)."""
    if not ctx.is_main:
        return {}
    with plain_loading():  # not partitioned by ZeRO-3's zero.Init: a plain copy on rank 0
        model = load_policy(cfg.model_copy(update={"method": "full"}), base, tokenizer)
    return {s: score_pairs(model, tokenizer, rows, cfg) for s, rows in pairs.evals.items()}


def save_policy(cfg, ctx, trainer, base, tokenizer) -> Path:
    """model/: the tuned weights as a plain HF folder (a LoRA adapter merged into the SFT weights on rank 0)."""
    model_dir = ctx.output_dir / "model"
    if cfg.method == "full":
        save_model(trainer, model_dir, tokenizer)
        return model_dir
    adapter_dir = ctx.output_dir / "adapter"
    save_model(trainer, adapter_dir, tokenizer)
    if ctx.is_main:
        from peft import PeftModel

        with plain_loading():
            sft = load_policy(cfg.model_copy(update={"method": "full"}), base, tokenizer)
            merged = PeftModel.from_pretrained(sft, str(adapter_dir)).merge_and_unload()
        merged.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    trainer.accelerator.wait_for_everyone()
    return model_dir


def run(cfg: PreferenceConfig, ctx: RunContext) -> StageResult:
    preflight(cfg)
    base = basemodel.resolve_base(cfg.base_model, ctx)
    pairs = load_pairs(cfg, ctx)
    args = trl_arguments(cfg, ctx, has_eval=pairs.validation is not None)  # before any model (ZeRO-3 init)
    tokenizer, notes = load_tokenizer(cfg, base, pairs)
    pairs, dropped = fitting(pairs, tokenizer, cfg.max_length)
    notes += dropped
    for note in notes:
        ctx.log(f"note: {note}")
    before = score_sft(cfg, ctx, base, tokenizer, pairs)
    trainer = make_trainer(cfg, args, load_policy(cfg, base, tokenizer), tokenizer, pairs)
    result = train(trainer, ctx)
    write_log_history(trainer, ctx)
    model_dir = save_policy(cfg, ctx, trainer, base, tokenizer)
    info = {"loss": cfg.loss, "method": cfg.method, "beta": cfg.beta, "base_model": base.spec, "notes": notes,
            "train_pairs": len(pairs.train), "eval_pairs": {s: len(d) for s, d in pairs.evals.items()},
            "global_step": trainer.state.global_step, "train_loss": whole_run_loss(trainer, result.training_loss),
            "first_logged_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None),
            "reference": "none (reference-free loss)" if cfg.loss in ("orpo", "simpo") else
                         "the SFT weights with the adapter disabled" if cfg.method != "full" else "a frozen copy of the SFT model"}
    metrics, evaluations = {}, []
    if ctx.is_main:
        with plain_loading():
            metrics, evaluations = evaluate(cfg, model_dir, tokenizer, pairs, before)
    outputs = {"model": "model", **({"adapter": "adapter"} if cfg.method != "full" else {})}
    task = ctx.inputs["model"].manifest.get("task") if "model" in ctx.inputs else tasks.of_folder(base.name).name
    return StageResult(metrics=metrics, outputs=outputs, info=info, task=task, evaluations=evaluations)


def evaluate(cfg, model_dir: Path, tokenizer, pairs: Pairs, before: dict) -> tuple[dict, list]:
    """The tuned model (reloaded from model/) on every held-out split, beside the SFT model and the baseline."""
    model, _ = modelio.load_model(model_dir)
    metrics, evaluations = {}, []
    for split, rows in pairs.evals.items():
        sft_metrics, sft_lp = before[split]
        tuned, _ = score_pairs(model, tokenizer, rows, cfg, reference=sft_lp)
        metrics.update({f"{split}_{k}": v for k, v in tuned.items()})
        metrics.update({f"{split}_{k}_sft": v for k, v in sft_metrics.items()})
        evaluations += [Evaluation("preference-tuned", "output", split, tuned, folder=str(model_dir)),
                        Evaluation("SFT model", "reference", split, sft_metrics),
                        Evaluation("longer reply", "baseline", split, longer_reply_baseline(rows))]
    return metrics, evaluations


def trl_problem() -> str | None:
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "the preference stage trains with TRL, which is not installed: pip install 'pipelines[preference]'"
    return None


def plan(cfg: PreferenceConfig, inputs: dict, recipe_dir: Path, card):
    task, problems = modelio.planned_task(inputs, "model", cfg.base_model, "base_model", recipe_dir)
    problems += [p for p in [trl_problem()] if p]
    if task is not None and tasks.get(task).family != "decoder":
        problems.append(f"preference tuning is for causal LMs (tasks {[n for n, t in tasks.TASKS.items() if t.family == 'decoder']}); "
                        f"its model is a {task} model")
    if card is not None and not set(PAIR_ROLES) <= set(card.roles):
        problems.append(f"preference needs a data card of pairs with the roles {list(PAIR_ROLES)}; data card "
                        f"{card.path} gives {card.roles}")
    return task, problems


STAGE = StageDef(
    name="preference",
    Config=PreferenceConfig,
    run=run,
    version="1",
    inputs={"model": "optional"},
    data="required",
    distributed=True,
    plan=plan,
    description="DPO / IPO / ORPO / SimPO / KTO on preference pairs (TRL), scored beside the SFT model it started from.",
)
