"""Model folders as the compression stages see them: load one for its task, prepare a data card for
that task, evaluate it, measure it (parameters, size on disk, CPU latency), and reload a quantized
folder with one call.

    from pipelines.modelio import load_quantized
    model = load_quantized("runs/compress_sst2/quantize/model")   # any folder the quantize stage wrote
    tok = AutoTokenizer.from_pretrained("runs/compress_sst2/quantize/model")

The task of a folder comes from its config.json `architectures` (what `save_pretrained` writes):
classification (…ForSequenceClassification), token-classification (…ForTokenClassification), causal-lm
(…ForCausalLM / LMHeadModel) or seq2seq (…ForConditionalGeneration and other seq2seq LM heads). quantize
handles all four; distill refuses token-classification folders up front (`refuse_unsupported`).
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from pipelines.errors import PipelinesError

TASKS = ("classification", "token-classification", "causal-lm", "seq2seq")
QUANT_RECIPE = "quantization.json"  # beside config.json in every folder the quantize stage writes
QUANT_STATE = "quantized_state_dict.pt"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# ---------------------------------------------------------------- task and loading


def task_of(config) -> str:
    """classification | causal-lm | seq2seq, from `config.architectures` (a PretrainedConfig)."""
    from transformers.models.auto import modeling_auto as ma

    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
            return "classification"
        if arch in ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values():
            return "token-classification"
        if arch in ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values():
            return "seq2seq"
        if arch in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return "causal-lm"
    raise PipelinesError(
        f"cannot tell the task of a model with architectures {archs or 'none'}: expected a sequence-"
        "classification, causal-LM or seq2seq-LM head (config.json `architectures`)"
    )


def auto_class(task: str):
    from pipelines import tasks

    return tasks.auto_class(task)


def check_model_dir(folder: Path, what: str = "model") -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PipelinesError(f"{what} folder {folder} has no config.json (expected a Hugging Face model folder)")
    return folder


def refuse_unsupported(folder, stage: str) -> None:
    """Fail before any work when `folder` holds a model of a task the compression stages cannot handle yet."""
    from transformers import AutoConfig

    folder = check_model_dir(folder)
    if task_of(AutoConfig.from_pretrained(folder)) == "token-classification":
        raise PipelinesError(
            f"{stage}: {folder} is a token-classification (NER) model; token classification is not supported by "
            f"the {stage} stage yet (supported: classification, causal-lm, seq2seq). Use the finetune stage's "
            "model/ folder as it is"
        )


def load_model(folder, **kwargs):
    """(model in eval mode, task) from a plain HF folder; kwargs go to from_pretrained."""
    from transformers import AutoConfig

    folder = check_model_dir(folder)
    config = AutoConfig.from_pretrained(folder)
    task = task_of(config)
    model = auto_class(task).from_pretrained(folder, **kwargs)
    return model.eval(), task


def load_tokenizer(*folders):
    """The tokenizer of the first folder that has one (model folders carry theirs)."""
    from transformers import AutoTokenizer

    for f in folders:
        if f is not None and (Path(f) / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(f)
    raise PipelinesError(f"no tokenizer (tokenizer_config.json) in {[str(f) for f in folders if f is not None]}")


# ---------------------------------------------------------------- data for a task


def encode_splits(dsd, tokenizer, task: str, max_length: int = 128, max_target_length: int = 128) -> dict:
    """Every split of a card's DatasetDict tokenized for the task, exactly as the finetune stage does
    (pipelines.tasks.encode: classification text/label, seq2seq source/target, causal-LM text + EOS)."""
    from pipelines import tasks

    first = next(iter(dsd.values()))
    cols = set(first.column_names)
    need = set(tasks.TASK_ROLES[task]) if task != "causal-lm" else ({"text"} if "text" in cols else {"source", "target"})
    if not need <= cols:
        raise PipelinesError(f"a {task} model needs data columns {sorted(need)}; the data card has {sorted(cols)}")
    return {
        split: tasks.encode(task, ds, tokenizer, max_length=max_length, max_target_length=max_target_length,
                            prompt_template="{source}\n")
        for split, ds in dsd.items()
    }


def collator(task: str, tokenizer, model=None):
    """Dynamic padding, labels padded with -100 (pipelines.tasks.collator)."""
    from pipelines import tasks

    return tasks.collator(task, tokenizer, model)


def batches(ds, collate, batch_size: int):
    for i in range(0, len(ds), batch_size):
        yield collate([ds[j] for j in range(i, min(i + batch_size, len(ds)))])


def on_device(batch: dict, model) -> dict:
    """The batch's tensors on the model's device (a bitsandbytes model lives on the GPU)."""
    device = getattr(model, "device", None)
    return {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in batch.items()}


# ---------------------------------------------------------------- evaluation


def evaluate(model, ds, collate, task: str, label_names=None, batch_size: int = 64) -> tuple[dict, list]:
    """(metrics, per-example outputs) of `model` on a tokenized split, in inference mode.
    classification: accuracy, f1 (binary for 2 labels, else macro), f1_macro; outputs = predicted ids.
    token-classification: entity_f1 / precision / recall (seqeval), token_accuracy; outputs = ids per word.
    causal-lm / seq2seq: perplexity over the label tokens (teacher forced), loss; outputs = NLL sums."""
    import torch

    from pipelines import metrics

    model.eval()
    preds, refs, nll_sums = [], [], []
    total_nll, total_tok = 0.0, 0
    with torch.inference_mode():
        for batch in batches(ds, collate, batch_size):
            batch = on_device(batch, model)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task in ("classification", "token-classification"):
                preds += logits.argmax(-1).tolist()  # token-classification: one id per token, rows padded
                refs += labels.tolist()
                continue
            if task == "causal-lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
            ).view(labels.shape)
            per_ex = nll.sum(-1)
            nll_sums += per_ex.tolist()
            total_nll += per_ex.sum().item()
            total_tok += int(labels.ne(-100).sum())
    if task == "token-classification":
        # seqeval entity scores over each word's first sub-token (labels -100 elsewhere, padding included)
        from pipelines.tasks import ENTITY_SCORES

        rep = metrics.token_classification_report(preds, refs, label_names)
        out = {k: rep[k] for k in ENTITY_SCORES}
        words = [[p for p, r in zip(pr, rr) if r != -100] for pr, rr in zip(preds, refs)]  # predicted id per word
        return {k: round(v, 6) for k, v in out.items()}, words
    if task == "classification":
        names = list(label_names) if label_names else [str(i) for i in range(max(refs + preds) + 1)]
        rep = metrics.classification_report(preds, refs, names)
        out = {"accuracy": rep["accuracy"], "f1": rep.get("f1", rep["f1_macro"]), "f1_macro": rep["f1_macro"]}
        return {k: round(v, 6) for k, v in out.items()}, preds
    ppl = metrics.perplexity(total_nll, total_tok)
    return {"perplexity": round(ppl, 6), "loss": round(total_nll / max(total_tok, 1), 6), "eval_tokens": total_tok}, nll_sums


def main_metric(task: str) -> tuple[str, bool]:
    """(name, greater_is_better) of the figure compression is judged on."""
    return {"classification": ("accuracy", True), "token-classification": ("entity_f1", True)}.get(task, ("perplexity", False))


def retained(task: str, new: dict, ref: dict) -> float:
    """Share of the reference's main metric kept (for perplexity: ref / new, so 1.0 = as good)."""
    name, up = main_metric(task)
    if not ref.get(name) or not new.get(name):
        return float("nan")
    return round(new[name] / ref[name] if up else ref[name] / new[name], 6)


# ---------------------------------------------------------------- measurements


def num_parameters(model) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def size_on_disk_mb(folder) -> float:
    """MB (10^6 bytes) of the weight files in a folder (safetensors / bin / pt), tokenizer and config excluded."""
    folder = Path(folder)
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return round(total / 1e6, 3)


def latency_ms(runs: dict[str, tuple[Any, dict]], repeats: int = 20, warmup: int = 3) -> dict[str, dict]:
    """{name: (model, batch)} -> median (and min, p90) ms of one forward pass, in this process and its threads.
    The models take turns in every round, so a busy neighbour on a shared machine slows all of them alike."""
    import torch

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
            "batch_shape": list(runs[k][1]["input_ids"].shape),
        }
    return out


def latency_batch(ds, collate, batch_size: int = 32) -> dict:
    """The first `batch_size` examples of a tokenized split, collated, without labels."""
    n = min(batch_size, len(ds))
    batch = collate([ds[i] for i in range(n)])
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
    keep = tuple(recipe.get("keep", []))
    spec = {}
    for name, m in model.named_modules():
        if keep and any(name == k or name.endswith("." + k) for k in keep):
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


def read_recipe(folder) -> dict | None:
    p = Path(folder) / QUANT_RECIPE
    return json.loads(p.read_text()) if p.is_file() else None


def load_quantized(folder):
    """THE way to reload what the quantize stage wrote (in any process), in eval mode:

    dynamic_int8: config.json -> a fresh skeleton -> the same `quantize_dynamic` recipe -> the saved
        int8 state dict (torch.load(weights_only=True): tensors only, no pickled code);
    bf16 / fp16: from_pretrained in the recipe's compute dtype;
    bnb_*: from_pretrained (the bitsandbytes quantization_config travels in config.json; needs a GPU).
    A folder without quantization.json loads as a plain model folder."""
    import torch
    from transformers import AutoConfig

    folder = check_model_dir(folder)
    recipe = read_recipe(folder)
    if recipe is None:
        return load_model(folder)[0]
    method = recipe["method"]
    config = AutoConfig.from_pretrained(folder)
    cls = auto_class(task_of(config))
    if method == "dynamic_int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage notice inside torch.load
            state = torch.load(folder / QUANT_STATE, map_location="cpu", weights_only=True)
        skeleton = cls.from_config(config, dtype=torch.float32)
        model = apply_dynamic(skeleton, recipe)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PipelinesError(f"{folder}: quantized weights do not fit the recipe (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return model.eval()
    if method in ("bf16", "fp16"):
        return cls.from_pretrained(folder, dtype=getattr(torch, recipe.get("compute_dtype", "float32"))).eval()
    if method.startswith("bnb_"):
        if not torch.cuda.is_available():
            raise PipelinesError(f"{folder} holds a bitsandbytes ({method}) model, which needs a CUDA GPU to load")
        return cls.from_pretrained(folder, device_map="auto").eval()
    raise PipelinesError(f"{folder}/{QUANT_RECIPE}: unknown method {method!r}")
