"""distill stage: train a smaller student to imitate a teacher (knowledge distillation).

teacher (+ its task) -> data -> student -> DistillTrainer (KD loss) -> train (resumable) -> save ->
evaluate the saved student vs the teacher and the task's baselines, on the same splits.

The student is either a fresh model from the teacher's config with overrides (`student.config`), or a
DistilBERT-style copy of the teacher: embeddings, heads and a subset of its layers
(`student.from_teacher_layers: [0, 2, 4]` or `student.every_other: true`). Embeddings are most of a
small BERT (MiniLM: 12 of 22.7 M parameters), so fewer layers alone cannot halve it: for a task whose
output layer is not the vocabulary (classification, token classification), with a WordPiece tokenizer,
`student.trim_vocab: true` keeps only the vocabulary the train split uses and gives the student its own
tokenizer (the teacher reads the same pieces through an id map).

Or the student is given, trained as it is: an earlier stage's model (`inputs: {student: prune}`, a pruned copy of
the teacher: pruning then KD recovers what pruning cost, as Minitron and Sheared-LLaMA do) or a local folder
(`student.model_path`). It must have the teacher's task, labels and tokenizer vocabulary (the teacher reads the
student's input ids); `trim_vocab` applies to it as to a made student.

Loss per item, as the task defines items and loss (`Task.kd_loss_sum`): an example for classification,
each word's first sub-token for token classification, a target token (labels != -100) for causal and
seq2seq LMs:

    alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + hidden_weight * MSE(proj(h_student), h_teacher) + attention_weight * KL(A_teacher || A_student)

summed over the items of the whole accumulated batch and divided by their count (the Trainer's
`num_items_in_batch`), so grad_accum=2 x batch 4 gives the loss and gradients of batch 8. The teacher
runs on the fly in eval mode under torch.no_grad(). alpha=1 trains the student on labels alone (the
no-teacher baseline, through the same code).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines import basemodel, modelio, tasks
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult
from pipelines.training import (
    QatConfig, TrainConfig, callbacks, qat_convert, qat_prepare, save_model, train, training_args, whole_run_loss,
    write_log_history,
)


class StudentSpec(BaseModel):
    """How the student is made from the teacher, or which model it is."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_path: str | None = Field(
        None, description="A local HF model folder (relative to the recipe) trained as the student as it is (e.g. a "
        "pruned copy of the teacher), instead of one made from the teacher; or `inputs: {student: <stage>}`.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides on the teacher's config (e.g. num_hidden_layers: 3, hidden_size: 256); "
        "alone: a randomly initialised student.",
    )
    from_teacher_layers: list[int] | None = Field(
        None, description="Copy embeddings, heads and these teacher layers (0-based, in this order)."
    )
    every_other: bool = Field(False, description="Copy layers 0, 2, 4, ... of the teacher (DistilBERT).")
    trim_vocab: bool = Field(
        False,
        description="Classification with a WordPiece (BERT-family) tokenizer: keep only the vocabulary rows the "
        "card's whole train split uses (+ special tokens and single characters, so unseen words still split, never [UNK]). "
        "Embeddings dominate small models; this is what halves their size. The student gets its own tokenizer.",
    )

    def made(self) -> bool:
        """Whether the student is made from the teacher (rather than given)."""
        return bool(self.config) or self.from_teacher_layers is not None or self.every_other

    @model_validator(mode="after")
    def _check(self):
        if self.from_teacher_layers is not None and self.every_other:
            raise ValueError("give from_teacher_layers or every_other, not both")
        layers = self.from_teacher_layers
        if layers is not None:
            if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
                raise ValueError("from_teacher_layers: a non-empty list of distinct layer indices >= 0")
        copying = layers is not None or self.every_other
        if self.model_path is not None and self.made():
            raise ValueError("student.model_path is the student as it is: drop config / from_teacher_layers / every_other")
        if copying and ({"num_hidden_layers", "n_layer", "num_layers"} & set(self.config)):
            raise ValueError("the number of layers comes from from_teacher_layers / every_other; drop it from config")
        return self


class KDLossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the hard-label CE; 1 - alpha weights the KL term.")
    temperature: float = Field(2.0, gt=0, description="Softens both distributions; the KL term is scaled by T^2.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the hidden-state MSE (projected when widths differ).")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the attention-map KL (eager attention).")


class DistillConfig(StageConfig):
    teacher_model: str | None = Field(
        None, description="A local HF model folder (relative to the recipe), instead of a `teacher` input stage."
    )
    student: StudentSpec = Field(default_factory=StudentSpec)
    loss: KDLossConfig = Field(default_factory=KDLossConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-4, epochs=3))
    qat: QatConfig | None = Field(None, description="Quantisation-aware training of the student (torchao): trained "
                                  "with fake-quantised Linear layers, saved plain; then a quantize stage converts.")
    max_length: int = Field(128, ge=8, description="Tokens per input (truncation), as in the finetune stage.")
    max_target_length: int = Field(128, ge=4, description="seq2seq target tokens.")
    max_train_samples: int | None = Field(None, ge=1, description="Seeded subsample of train (None: all).")
    group_by_length: bool = Field(False, description="Batch similar lengths together (less padding, faster on CPU).")
    max_eval_samples: int | None = Field(None, ge=1)
    eval_splits: list[str] = Field(default_factory=lambda: ["validation", "test"], description="Those the card has.")
    latency_batch_size: int = Field(32, ge=1)
    latency_repeats: int = Field(20, ge=1)
    max_metric_drop: float | None = Field(
        None, ge=0, description="Quality gate: fail when the student's main metric on validation is worse than the "
        "teacher's by more than this, in the metric's units (accuracy 0.01 = one point; perplexity: a rise).")

    @model_validator(mode="after")
    def _check_qat(self):
        if self.qat is not None and self.train.deepspeed is not None and self.train.deepspeed.zero_stage == 3:
            raise ValueError("qat fake-quantises whole weight matrices; ZeRO-3 partitions them: use zero_stage 2 or less")
        return self

    def local_paths(self, recipe_dir: Path) -> dict[str, Path]:
        folders = {"teacher_model": basemodel.local_folder(self.teacher_model, recipe_dir),
                   "student.model_path": basemodel.local_folder(self.student.model_path, recipe_dir)}
        return {k: v for k, v in folders.items() if v}

    def eval_options(self, label_names) -> tasks.EvalOptions:
        """Generation (translation, summarisation) as the teacher's saved generation_config says."""
        return tasks.EvalOptions(max_length=self.max_length, max_target_length=self.max_target_length,
                                 generation={}, batch_size=self.train.eval_batch_size or 32, label_names=label_names)


# ---------------------------------------------------------------- the loss (pure functions of tensors)


def _reduce(per_pos, pos_mask, per_example: bool):
    """Sum over items of a (B, L) per-position loss: per example (mean over its positions) or per position.
    pos_mask None: every position counts (image patches)."""
    import torch

    m = pos_mask.to(per_pos.dtype) if pos_mask is not None else torch.ones_like(per_pos)
    if per_example:
        return ((per_pos * m).sum(1) / m.sum(1).clamp(min=1)).sum()
    return (per_pos * m).sum()


def hidden_loss_sum(s_hidden, t_hidden, pairs, projections, pos_mask, per_example: bool):
    """Mean over layer pairs of the MSE between (projected) student and teacher hidden states, summed over items.
    pairs index hidden_states tuples (0 = embedding output)."""
    total = 0.0
    for k, (js, jt) in enumerate(pairs):
        hs = s_hidden[js]
        if projections is not None:
            hs = projections[k](hs)
        total = total + _reduce((hs.float() - t_hidden[jt].float()).pow(2).mean(-1), pos_mask, per_example)
    return total / len(pairs)


def attention_loss_sum(s_attn, t_attn, pairs, pos_mask, per_example: bool, eps: float = 1e-9):
    """Mean over layer pairs of KL(teacher || student) between attention rows (per head, or of the
    head-averaged maps when head counts differ), summed over items. pairs index attentions tuples."""
    total = 0.0
    for js, jt in pairs:
        a_s, a_t = s_attn[js].float(), t_attn[jt].float()
        if a_s.size(1) != a_t.size(1):
            a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        kl = (a_t * ((a_t + eps).log() - (a_s + eps).log())).sum(-1).mean(1)  # (B, L): per query row
        total = total + _reduce(kl, pos_mask, per_example)
    return total / len(pairs)


# ---------------------------------------------------------------- the trainer


def make_trainer(student, teacher, args, kd: KDLossConfig, task, pairs=(), teacher_ids=None, **trainer_kwargs):
    """A transformers Trainer whose compute_loss is the task's KD loss (see the module docstring) plus the
    hidden-state / attention terms above.
    teacher_ids: student token id -> teacher token id, when the student has a trimmed vocabulary."""
    import torch
    from transformers import Trainer

    class DistillTrainer(Trainer):
        # compute_loss already divides by the item count of the whole accumulated batch
        loss_is_scaled_for_ga = True

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            # makes the Trainer count num_items_in_batch (labels != -100, shifted for causal LMs) over
            # all micro-batches of an optimizer step, as it does for models that take loss kwargs
            self.model_accepts_loss_kwargs = True
            self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
            self.teacher_ids = teacher_ids.to(self.args.device) if teacher_ids is not None else None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            feats = {k: v for k, v in inputs.items() if k != "labels"}
            want_h, want_a = kd.hidden_weight > 0, kd.attention_weight > 0
            extra = {}
            if want_h:
                extra["output_hidden_states"] = True
            if want_a:
                extra["output_attentions"] = True
            out = model(**feats, **extra)
            needs_teacher = kd.alpha < 1 or want_h or want_a
            t_out = None
            if needs_teacher:
                t_feats = feats
                if self.teacher_ids is not None:
                    t_feats = {**feats, "input_ids": self.teacher_ids[feats["input_ids"]]}
                with torch.no_grad():
                    t_out = self.teacher(**t_feats, **extra)
            total, mask = task.kd_loss_sum(
                out.logits, t_out.logits if t_out is not None else None, labels, kd.alpha, kd.temperature
            )
            if want_h or want_a:
                pos = task.kd_positions(feats, labels)
                per_ex = task.per_example
                if want_h:
                    proj = getattr(self.accelerator.unwrap_model(model), "kd_projection", None)
                    total = total + kd.hidden_weight * hidden_loss_sum(out.hidden_states, t_out.hidden_states, pairs, proj, pos, per_ex)
                if want_a:
                    attn_pairs = [(js - 1, jt - 1) for js, jt in pairs if js > 0]
                    total = total + kd.attention_weight * attention_loss_sum(out.attentions, t_out.attentions, attn_pairs, pos, per_ex)
            n = num_items_in_batch if num_items_in_batch is not None else mask.sum()
            loss = total / n
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # n counts every rank's items; DDP averages grads
            return (loss, {"logits": out.logits}) if return_outputs else loss

    return DistillTrainer(model=student, args=args, **trainer_kwargs)


# ---------------------------------------------------------------- the student


def _num_layers(config) -> int:
    """Transformer blocks (a CNN's stages)."""
    n = getattr(config, "num_hidden_layers", None) or (len(getattr(config, "depths", None) or []) or None)
    if n is None:
        raise PipelinesError(f"cannot tell how many layers a {type(config).__name__} has (no num_hidden_layers)")
    return int(n)


def layer_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into hidden_states tuples (0 = embeddings, j = output of layer j), spread
    uniformly: student layer j -> teacher layer round(j * T / S), so the last layers meet (PKD / TinyBERT).
    A DistilBERT-style student made of layers 0, 2, 4 of 6 is matched at 2, 4, 6: each of its layers stands
    for two of the teacher's."""
    return [(0, 0)] + [(j, round(j * n_teacher / n_student)) for j in range(1, n_student + 1)]


def copy_teacher_layers(teacher, student, layers: list[int]) -> dict[str, list[int]]:
    """Load the student with the teacher's weights: every module list that is shorter in the student
    (the transformer layers) takes the teacher's `layers`, everything else is copied as is.
    Returns {module list name: teacher layer indices}."""
    import torch.nn as nn

    t_lists = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.ModuleList)}
    remap = {}
    for n, m in student.named_modules():
        if isinstance(m, nn.ModuleList) and n in t_lists and len(m) != len(t_lists[n]):
            remap[n] = layers
    if not remap:
        raise PipelinesError("found no layer list to copy a subset of teacher layers into")
    t_state, s_state = teacher.state_dict(), student.state_dict()
    params = {n for n, _ in student.named_parameters()} | {n for n, _ in student.named_parameters(remove_duplicate=False)}
    new = {}
    for key, value in s_state.items():
        src = key
        for n, idx in remap.items():
            if key.startswith(n + "."):
                i, rest = key[len(n) + 1 :].split(".", 1)
                src = f"{n}.{idx[int(i)]}.{rest}"
        if src not in t_state:
            if key in params:
                raise PipelinesError(f"student weight {key} has no teacher counterpart {src}")
            new[key] = value  # a buffer the teacher does not save
            continue
        if t_state[src].shape != value.shape:
            raise PipelinesError(
                f"student weight {key} {tuple(value.shape)} != teacher {src} {tuple(t_state[src].shape)}: "
                "copying teacher layers needs the teacher's widths (drop width overrides from student.config)"
            )
        new[key] = t_state[src].clone()
    student.load_state_dict(new, strict=True)
    return remap


def _remap_ids(node, new: dict[int, int]):
    """Post-processor JSON with token ids replaced (TemplateProcessing `ids` lists, Bert/Roberta (token, id) pairs)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [new[i] for i in v]
            elif k in ("cls", "sep") and isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                out[k] = [v[0], new[v[1]]]
            else:
                out[k] = _remap_ids(v, new)
        return out
    if isinstance(node, list):
        return [_remap_ids(v, new) for v in node]
    return node


def trim_vocab(tokenizer, texts) -> tuple[Any, list[int]]:
    """(a WordPiece tokenizer holding only the pieces `texts` use + special tokens + single characters,
    the kept teacher ids in new-id order). WordPiece is greedy longest-match, so dropping pieces that
    never matched leaves the tokenization of `texts` unchanged (only the ids are renumbered)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    if tj["model"]["type"] != "WordPiece":
        raise PipelinesError(f"student.trim_vocab needs a WordPiece (BERT-family) tokenizer; this one is {tj['model']['type']}")
    vocab, prefix = tj["model"]["vocab"], tj["model"].get("continuing_subword_prefix") or "##"
    used = set(tokenizer.all_special_ids) | {t["id"] for t in tj.get("added_tokens", [])}
    for i in range(0, len(texts), 1000):
        for ids in tokenizer(texts[i : i + 1000], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    used.update(i for t, i in vocab.items() if len(t) == 1 or (t.startswith(prefix) and len(t) == len(prefix) + 1))
    kept = sorted(used)
    new = {old: i for i, old in enumerate(kept)}
    tj["model"]["vocab"] = {t: new[i] for t, i in vocab.items() if i in new}
    for t in tj.get("added_tokens", []):
        t["id"] = new[t["id"]]
    tj["post_processor"] = _remap_ids(tj.get("post_processor"), new)
    tj["padding"], tj["truncation"] = None, None  # the transformers wrapper pads and truncates per call
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(tj)),
        model_max_length=tokenizer.model_max_length,
        **tokenizer.special_tokens_map,
    )
    return fast, kept


def shrink_embeddings(student, kept: list[int], pad_token_id: int | None) -> None:
    """Keep only the `kept` rows of the student's input embeddings (classification: no tied output head)."""
    import torch.nn as nn

    old = student.get_input_embeddings()
    emb = nn.Embedding(len(kept), old.embedding_dim, padding_idx=pad_token_id)
    emb.weight.data = old.weight.data[kept].clone()
    student.set_input_embeddings(emb)
    student.config.vocab_size = len(kept)
    student.config.pad_token_id = pad_token_id


def build_student(teacher, spec: StudentSpec, task, seed: int):
    """(student, layer pairs, copied layers or None)."""
    from transformers import set_seed

    cfg = copy.deepcopy(teacher.config)
    n_t = _num_layers(cfg)
    layers = list(range(0, n_t, 2)) if spec.every_other else spec.from_teacher_layers
    if layers is not None and max(layers) >= n_t:
        raise PipelinesError(f"student.from_teacher_layers {layers}: the teacher has layers 0..{n_t - 1}")
    known = set(cfg.to_dict()) | set(getattr(cfg, "attribute_map", {}))
    for k, v in spec.config.items():
        if k not in known:
            raise PipelinesError(f"student.config.{k}: not a field of {type(cfg).__name__}")
        setattr(cfg, k, v)
    if layers is not None:
        cfg.num_hidden_layers = len(layers)
    set_seed(seed)
    student = task.auto_class().from_config(cfg)
    if layers is not None:
        copy_teacher_layers(teacher, student, layers)
    return student, layer_pairs(_num_layers(student.config), n_t), layers


# ---------------------------------------------------------------- the stage


def _teacher_dir(cfg: DistillConfig, ctx: RunContext) -> Path:
    if ("teacher" in ctx.inputs) == (cfg.teacher_model is not None):
        raise PipelinesError("distill needs exactly one teacher: an input stage `inputs: {teacher: <stage>}` or `config.teacher_model: <folder>`")
    if "teacher" in ctx.inputs:
        return ctx.inputs["teacher"].output("model")
    path = (Path(ctx.recipe_path).parent / cfg.teacher_model).resolve()
    return modelio.check_model_dir(path, "teacher_model")


def student_source_problem(spec: StudentSpec, from_input: bool) -> str | None:
    """Why the recipe does not say which student (made from the teacher, a folder, or an input stage's model)."""
    if from_input and (spec.made() or spec.model_path):
        return ("the student is `inputs: {student: <stage>}`'s model: drop student.model_path / config / "
                "from_teacher_layers / every_other")
    if not (spec.made() or spec.model_path or from_input):
        return ("say how to make the student: config overrides, from_teacher_layers or every_other; or give it: "
                "`inputs: {student: <stage>}` (e.g. a prune stage) or student.model_path")
    return None


def _student_dir(cfg: DistillConfig, ctx: RunContext) -> Path | None:
    """The given student's folder, or None when the student is made from the teacher."""
    if problem := student_source_problem(cfg.student, "student" in ctx.inputs):
        raise PipelinesError(problem)
    if "student" in ctx.inputs:
        return ctx.inputs["student"].output("model")
    if cfg.student.model_path:
        return modelio.check_model_dir((Path(ctx.recipe_path).parent / cfg.student.model_path).resolve(), "student.model_path")
    return None


def student_problems(cfg: DistillConfig, task) -> list[str]:
    """What this config asks that the teacher's task cannot do (checked by validate and again at run)."""
    problems = []
    if cfg.student.trim_vocab and (task.vocab_output or task.inputs != "text"):
        why = "is its vocabulary" if task.vocab_output else "does not read text"
        problems.append(f"student.trim_vocab: the output layer of a {task.name} model {why}; trim_vocab is for "
                        "text models with a label head (classification, token classification)")
    if task.family == "encoder-decoder" and (cfg.loss.hidden_weight or cfg.loss.attention_weight):
        problems.append(f"loss.hidden_weight / attention_weight: hidden-state and attention terms are for encoder-only "
                        f"and decoder-only models; use logit KD for {task.name}")
    return problems


def plan(cfg: DistillConfig, inputs: dict, recipe_dir: Path, card):
    """The teacher's task: the input stage's, or the local teacher folder's config.json (which must exist);
    what the student asks of it and what the card gives it are checked."""
    name, problems = modelio.planned_task(inputs, "teacher", cfg.teacher_model, "teacher_model", recipe_dir)
    if problem := student_source_problem(cfg.student, "student" in inputs):
        problems.append(problem)
    elif "student" in inputs or cfg.student.model_path:
        s_name, s_problems = modelio.planned_task(inputs, "student", cfg.student.model_path, "student.model_path", recipe_dir)
        problems += s_problems
        if name and s_name and s_name != name:
            problems.append(f"the student is a {s_name} model and the teacher a {name} model: KD needs the same task")
    if name:
        problems += student_problems(cfg, tasks.get(name))
        if card is not None:
            problems += tasks.get(name).data_problems(card.roles, card.label_names, card.path)
    return name, problems


def load_teacher(cfg: DistillConfig, ctx: RunContext):
    """(teacher in eval mode, its task, its folder, its tokenizer), before TrainingArguments: under ZeRO-3
    it must not be partitioned."""
    folder = _teacher_dir(cfg, ctx)
    task = tasks.of_folder(folder)
    problems = student_problems(cfg, task)
    if problems:
        raise PipelinesError("; ".join(problems))
    kw = {"attn_implementation": "eager"} if cfg.loss.attention_weight > 0 else {}
    teacher, _ = modelio.load_model(folder, **kw)
    tok_dir = ctx.inputs["tokenizer"].output("tokenizer") if "tokenizer" in ctx.inputs else None
    tokenizer = modelio.load_processor(task, folder, tok_dir)
    task.prepare_processor(tokenizer)
    return teacher, task, folder, tokenizer


def load_splits(cfg: DistillConfig, ctx: RunContext, task, teacher):
    """(the card's splits: train subsampled, eval splits cut, checked against the task and the teacher's labels;
    the whole train split, for vocabulary trimming)."""
    dsd = ctx.data.load(seed=ctx.seed)
    if "train" not in dsd:
        raise PipelinesError(f"data card {ctx.data.path} has no train split to distill on")
    names = task.check_data(ctx.data, dsd)
    if names is not None and teacher.config.num_labels != len(names):
        raise PipelinesError(f"the teacher has {teacher.config.num_labels} labels; the data card has {len(names)} ({names})")
    full_train = dsd["train"]
    if cfg.max_train_samples and len(dsd["train"]) > cfg.max_train_samples:
        dsd["train"] = dsd["train"].shuffle(seed=ctx.seed).select(range(cfg.max_train_samples))
    evals = {s: dsd[s] for s in cfg.eval_splits if s in dsd and s != "train"}
    if cfg.max_eval_samples:
        evals = {s: d.select(range(min(len(d), cfg.max_eval_samples))) for s, d in evals.items()}
    return dsd["train"], evals or {"train": dsd["train"]}, full_train, names


def load_given_student(folder: Path, task, teacher, tokenizer):
    """The student folder's model (fp32, train mode), checked to speak the teacher's language: the same task, the
    same tokenizer vocabulary (the teacher reads the student's input ids) and the same labels."""
    import torch

    student, s_task = modelio.load_model(folder, dtype=torch.float32)
    if s_task.name != task.name:
        raise PipelinesError(f"the student {folder} is a {s_task.name} model and the teacher a {task.name} model: "
                             "KD needs the same task")
    if task.inputs == "text":
        s_tok = modelio.load_processor(task, folder)
        if s_tok.get_vocab() != tokenizer.get_vocab():
            raise PipelinesError(f"the student {folder} has another vocabulary than the teacher ({len(s_tok):,} vs "
                                 f"{len(tokenizer):,} tokens): both read the same input ids; give a student with the "
                                 "teacher's tokenizer (a pruned copy of the teacher has it)")
    if not task.vocab_output and student.config.id2label != teacher.config.id2label:
        raise PipelinesError(f"the student {folder} has the labels {student.config.id2label}, the teacher "
                             f"{teacher.config.id2label}")
    return student.train()


def make_student(cfg: DistillConfig, ctx: RunContext, task, teacher, tokenizer, full_train, given: Path | None):
    """(student, its tokenizer, layer pairs, copied teacher layers, teacher ids of the student's vocabulary); `given`:
    the given student's folder, None to make one from the teacher."""
    import torch
    import torch.nn as nn

    if given is None:
        student, pairs, layers = build_student(teacher, cfg.student, task, ctx.seed)
    else:
        student, layers = load_given_student(given, task, teacher, tokenizer), None
        pairs = layer_pairs(_num_layers(student.config), _num_layers(teacher.config))
    s_tokenizer, teacher_ids = tokenizer, None
    if cfg.student.trim_vocab:
        s_tokenizer, kept = trim_vocab(tokenizer, task.vocab_texts(full_train))  # the whole train split
        shrink_embeddings(student, kept, s_tokenizer.pad_token_id)
        teacher_ids = torch.tensor(kept)  # the teacher reads the same pieces under its own ids
        ctx.log(f"vocabulary trimmed to the {len(kept):,} pieces the train split uses (of {len(tokenizer):,})")
    if cfg.loss.attention_weight > 0:
        student.set_attn_implementation("eager")
    s_width, t_width = getattr(student.config, "hidden_size", None), getattr(teacher.config, "hidden_size", None)
    if cfg.loss.hidden_weight > 0 and s_width != t_width:
        # learned, trained with the student, dropped before saving
        student.kd_projection = nn.ModuleList(nn.Linear(s_width, t_width) for _ in pairs)
    ctx.log(
        f"{task.name}: teacher {modelio.num_parameters(teacher):,} params, {_num_layers(teacher.config)} layers -> student "
        f"{modelio.num_parameters(student):,} params, {_num_layers(student.config)} layers"
        + (f" (copied teacher layers {layers})" if layers else f" (given: {given})" if given else " (random init)")
    )
    return student, s_tokenizer, pairs, layers, teacher_ids


def run(cfg: DistillConfig, ctx: RunContext) -> StageResult:
    teacher, task, teacher_dir, tokenizer = load_teacher(cfg, ctx)
    train_raw, evals, full_train, label_names = load_splits(cfg, ctx, task, teacher)
    opts = cfg.eval_options(label_names)
    given = _student_dir(cfg, ctx)
    student, s_tokenizer, pairs, layers, teacher_ids = make_student(cfg, ctx, task, teacher, tokenizer, full_train, given)
    qat_info = qat_prepare(student, cfg.qat, skip=("kd_projection",))  # the projections are dropped before saving
    if qat_info:
        ctx.log(f"qat {qat_info['scheme']}: {qat_info['fake_quantized_linear']} student Linear layers fake-quantised")

    # ---- trainer: the KD loss, evaluated on the first eval split during training
    overrides = dict(task.trainer_args)
    if cfg.group_by_length:
        overrides["train_sampling_strategy"] = "group_by_length"
    args = training_args(cfg.train, ctx, has_eval=True, **overrides)
    val = next(iter(evals))
    extra = {} if task.generative else dict(compute_metrics=task.compute_metrics(s_tokenizer, opts),
                                            preprocess_logits_for_metrics=task.preprocess_logits)
    trainer = make_trainer(
        student, teacher, args, cfg.loss, task, pairs, teacher_ids,
        train_dataset=task.encode(train_raw, s_tokenizer, opts), eval_dataset=task.encode(evals[val], s_tokenizer, opts),
        data_collator=task.collator(s_tokenizer, student), processing_class=s_tokenizer,
        callbacks=callbacks(cfg.train), **extra,
    )

    # ---- train (resumes from the latest complete checkpoint) and save
    result = train(trainer, ctx)
    write_log_history(trainer, ctx)
    train_loss = whole_run_loss(trainer, round(result.training_loss, 6))
    if hasattr(trainer.model, "kd_projection"):
        del trainer.model.kd_projection
    if qat_info:
        qat_convert(trainer.model)  # plain Linear layers again (the trained weights), before saving
    out = ctx.output_dir / "model"
    save_model(trainer, out, s_tokenizer)
    if not ctx.is_main:
        return StageResult(task=task.name)

    # ---- evaluate the saved student (its own tokenizer) against the teacher (its own), on rank 0
    del trainer
    from transformers.integrations import deepspeed as hf_ds

    hf_ds.unset_hf_deepspeed_config()  # after ZeRO-3 training, load plainly (no zero.Init partitioning)
    student, _ = modelio.load_model(out)
    s_tokenizer = modelio.load_processor(task, out)
    task.prepare_processor(s_tokenizer)
    metrics, per_split, evaluations, lat, _ = modelio.side_by_side(
        task,
        [modelio.Entry("teacher", "reference", teacher.eval(), tokenizer, teacher_dir, "teacher_"),
         modelio.Entry("student", "output", student, s_tokenizer, out, "student_")],
        evals, opts, train_raw=train_raw, latency_batch_size=cfg.latency_batch_size, latency_repeats=cfg.latency_repeats,
    )
    gate = modelio.quality_gate(task, per_split, ("teacher", "student"), cfg.max_metric_drop, "distill")
    metrics = {"train_loss": train_loss, "train_steps": result.global_step, **metrics}
    s_p, t_p = modelio.num_parameters(student), modelio.num_parameters(teacher)
    metrics.update(
        student_params=s_p, teacher_params=t_p, params_ratio=round(s_p / t_p, 4),
        student_mb=modelio.size_on_disk_mb(out), teacher_mb=modelio.size_on_disk_mb(teacher_dir),
        student_ms=lat["student"]["median_ms"], teacher_ms=lat["teacher"]["median_ms"],
        speedup=round(lat["teacher"]["median_ms"] / lat["student"]["median_ms"], 3),
    )
    info = {
        "task": task.name,
        "teacher": str(teacher_dir),
        "student_layers": _num_layers(student.config),
        "copied_teacher_layers": layers,
        "given_student": str(given) if given else None,
        "qat": qat_info or None,
        "vocab": {"teacher": len(tokenizer), "student": len(s_tokenizer)} if task.inputs == "text" else None,
        "layer_pairs": pairs,
        "eval": per_split,
        "latency": {
            **lat, "batch_size": cfg.latency_batch_size, "split": val, "threads": modelio.threads(),
            "repeats": cfg.latency_repeats, "device": "cpu",
            "what": "median ms of one forward pass (fp32) on the split's first rows, models timed in turns",
        },
        "size_format": "safetensors fp32",
        "split_notes": ctx.data.split_notes,
        "baselines": task.baseline_notes(),
        "quality_gate": gate,
    }
    return StageResult(metrics=metrics, outputs={"model": "model"}, info=info, task=task.name, evaluations=evaluations)


STAGE = StageDef(
    name="distill",
    Config=DistillConfig,
    run=run,
    version="2",
    inputs={"teacher": "optional", "student": "optional", "tokenizer": "optional"},
    data="required",
    distributed=True,
    plan=plan,
    description="Knowledge distillation of a teacher model into a smaller student, for any task of pipelines.tasks.",
)
