"""publish stage: turn a finished model into a Hub repository folder with a model card, and upload it.

model artifact -> lineage (every upstream manifest) -> files (safetensors only; an export stage's folder: its
ONNX / OpenVINO graph, no torch weights) -> model card
(ModelCard / ModelCardData, checked offline) -> <stage>/repo/ (files whose content is unchanged are
left alone, so a retry never rewrites the folder) -> upload (create_repo, create_branch,
upload_folder) or a dry run.

The token comes from HF_TOKEN or the user's saved login (`hf auth login`) through
huggingface_hub.get_token(). It is handed to HfApi and nowhere else: never to a log, the manifest,
the card, the saved recipe or an error message. With no token (or no repo_id) and `dry_run` unset,
the stage stops after writing the folder and says what it would upload.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import Field, field_validator, model_validator

from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult

REPO = "repo"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SKIP_FILES = {"manifest.json", "failed.json", "failed.traceback.txt"}
# peft's Auto class for an adapter of each peft task type (AutoPeftModel reads the type from the adapter)
PEFT_AUTO = {"SEQ_CLS": "AutoPeftModelForSequenceClassification", "TOKEN_CLS": "AutoPeftModelForTokenClassification",
             "CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM"}
LIBRARY = {"onnxruntime": "onnx", "openvino": "openvino"}  # the Hub's library of an exported folder, by its runtime
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
LANG = re.compile(r"^([a-z]{2,3}(-[A-Za-z0-9]+)?|code|multilingual)$")
HUB_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


class PublishConfig(StageConfig):
    repo_id: str | None = Field(None, description="namespace/name on the Hub (needed to upload).")
    private: bool = Field(True, description="Create the repo private (ignored if it already exists).")
    revision: str | None = Field(None, description="Branch to push to; created when missing. Default: main.")
    commit_message: str | None = Field(None, description="Default: names the recipe, stage and fingerprint.")
    dry_run: bool | None = Field(
        None, description="true: write the folder only. Unset: upload when a token and repo_id are found."
    )
    license: str | None = Field(None, description="Hub license id of the model (apache-2.0, mit, cc-by-4.0, other).")
    base_model: str | None = Field(None, description="Hub id of the model this one derives from, if any.")
    datasets: list[str] | None = Field(None, description="Hub dataset ids; default: the data cards' names.")
    language: str | list[str] | None = Field(None, description="ISO 639 code(s); default: the data cards'.")
    tags: list[str] = Field(default_factory=list)
    model_name: str | None = Field(None, description="Name in the card and model-index; default: the repo name.")
    intended_use: str | None = Field(None, description="Replaces the generated 'Intended use' paragraph.")
    limitations: str | None = Field(None, description="Replaces the generated 'Limitations' paragraph.")
    include_adapter: bool = Field(True, description="Also publish a LoRA adapter (adapter/) when the stage made one.")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v):
        if v is not None and not REPO_ID.match(v):
            raise ValueError(f"repo_id {v!r}: expected namespace/name (letters, digits, - _ .)")
        return v

    @field_validator("license")
    @classmethod
    def _license(cls, v):
        if v is not None and not HUB_LICENSE.match(v):
            raise ValueError(f"license {v!r}: expected a Hub license id such as apache-2.0, mit or other")
        return v

    @field_validator("language")
    @classmethod
    def _language(cls, v):
        for lang in [v] if isinstance(v, str) else (v or []):
            if not LANG.match(lang):
                raise ValueError(f"language {lang!r}: expected an ISO 639-1/2/3 code such as en or de")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.dry_run is False and self.repo_id is None:
            raise ValueError("dry_run: false needs a repo_id to upload to")
        return self


# ---------------------------------------------------------------- lineage: what made the model


def lineage(ctx: RunContext) -> list[dict]:
    """Manifests of the model stage and everything upstream of it, upstream first. Read from the
    runner's manifests in sibling folders (never from other stages' code)."""
    art = ctx.inputs["model"]
    run_dir = art.path.parent
    order: list[dict] = []
    seen: set[str] = set()

    def visit(name: str, manifest: dict | None):
        if name in seen:
            return
        seen.add(name)
        if manifest is None:
            path = run_dir / name / "manifest.json"
            if not path.exists():
                return
            manifest = json.loads(path.read_text(encoding="utf-8"))
        for inp in (manifest.get("inputs") or {}).values():
            visit(inp["stage"], None)
        order.append(manifest)

    visit(art.name, art.manifest)
    return order


def other_stages(ctx: RunContext, skip: set[str]) -> list[dict]:
    """The run's other finished stages (siblings with a manifest), in the order they finished."""
    out = []
    for path in ctx.inputs["model"].path.parent.glob("*/manifest.json"):
        if path.parent.name in skip or path.parent.name == ctx.stage_name:
            continue
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda m: (m.get("finished") or "", m.get("name", "")))


def data_cards(stages: list[dict]) -> list[dict]:
    """The data cards the lineage trained or evaluated on: name, source, license, language."""
    out: dict[str, dict] = {}
    for m in stages:
        d = m.get("data")
        if not d or d["name"] in out:
            continue
        entry = {"name": d["name"], "source": None, "license": None, "language": None, "used_by": []}
        try:
            from pipelines.data import load_card

            card = load_card(d["card"])
            entry.update(source=card.source, license=card.license, language=card.language, task=card.task)
        except Exception:  # the card moved since: the name is still worth listing
            entry["license"] = "unknown (card not found at publish time)"
        out[d["name"]] = entry
    for m in stages:
        if m.get("data"):
            out[m["data"]["name"]]["used_by"].append(m["name"])
    return list(out.values())


# ---------------------------------------------------------------- files of the repo


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def collect_files(model_dir: Path, adapter_dir: Path | None, graph: str | list[str] | None = None) -> dict[str, Path]:
    """repo path -> source file: the model folder (and adapter/), safetensors weights only; or, for an exported
    folder, its graph files (model.onnx, or openvino_model.xml whose weights are the .bin of the same name: raw
    tensors, not a pickle; a generative export has one per generation step)."""
    files: dict[str, Path] = {}
    graphs = [graph] if isinstance(graph, str) else list(graph or [])
    for prefix, folder in (("", model_dir), ("adapter/", adapter_dir)):
        if folder is None:
            continue
        weights = {(folder / g).with_suffix(".bin") for g in graphs if g.endswith(".xml")}
        pickles = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES and p not in weights)
        if pickles and (folder / "quantization.json").exists():
            raise PipelinesError(
                f"{folder} is a torch.ao dynamic-int8 folder ({pickles} is a torch pickle, and from_pretrained cannot "
                "load it anyway): publish only ships safetensors. Publish the model it was quantized from "
                "(inputs.model: the quantize stage's input), or quantize with method bf16 / fp16."
            )
        if pickles:
            raise PipelinesError(
                f"{folder} holds pickle files {pickles}: publish only ships safetensors (a pickle runs code when "
                "loaded). Save the model with save_pretrained(safe_serialization=True) and remove them."
            )
        missing = [g for g in graphs if not (folder / g).is_file()] + [w.name for w in weights if not w.is_file()]
        if missing:
            raise PipelinesError(f"{folder}: its export.json names {missing}, which the folder does not hold")
        if not graphs and not any(folder.glob("*.safetensors")):
            raise PipelinesError(f"{folder}: no *.safetensors weights to publish")
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts) and rel not in SKIP_FILES:
                files[prefix + rel] = p
    return files


def sync_file(dst: Path, content: bytes | None = None, src: Path | None = None) -> bool:
    """Write dst only when its content differs (compared by sha256): True if written."""
    if dst.exists():
        if content is not None and dst.read_bytes() == content:
            return False
        if src is not None and dst.stat().st_size == src.stat().st_size and _sha256(dst) == _sha256(src):
            return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    if content is not None:
        tmp.write_bytes(content)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


# ---------------------------------------------------------------- model card

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ summary }}

- **Task:** {{ task }} (`pipeline_tag: {{ pipeline_tag }}`)
- **Architecture:** {{ architecture }} ({{ params }} parameters)
- **Base model:** {{ base_model_text }}
- **License:** {{ license_text }}
- **Made by:** the `pipelines` recipe `{{ recipe_name }}` (saved as `recipe.yaml` in this repository), stages {{ stage_chain }}

## How to use it

```python
{{ snippet }}
```

## Intended use

{{ intended_use }}

## Limitations

{{ limitations }}

## Training data

| data card | used by | license | source |
|---|---|---|---|
{% for d in datasets_table -%}
| {{ d.name }} | {{ d.used_by | join(", ") }} | {{ d.license }} | {{ d.source }} |
{% endfor %}
## Compared with trivial baselines

Each model of this lineage beside the task's baselines (what a model that learned nothing useful scores)
and the model it started from, on the same split, by the task's main metric:

| stage | split | model | role | metric | value |
|---|---|---|---|---|---|
{% for r in comparison -%}
| {{ r.stage }} | {{ r.split }} | {{ r.model }} | {{ r.role }} | {{ r.metric }} | {{ r.value }} |
{% endfor %}
## Evaluation: the metrics of every stage

| stage | type | made this model | metric | value |
|---|---|---|---|---|
{% for r in metric_rows -%}
| {{ r.stage }} | {{ r.type }} | {{ r.lineage }} | {{ r.key }} | {{ r.value }} |
{% endfor %}
Stages that did not make this model (e.g. a quantized or distilled variant of it) are listed for
comparison. The `model-index` in this card's metadata holds the evaluation metrics of the stages that
made it, in the Hub's format.

## Training procedure

Each stage's typed configuration, as it ran (fingerprints identify the exact inputs):

{% for s in stage_configs -%}
### {{ s.name }} ({{ s.type }}, fingerprint `{{ s.fingerprint }}`, {{ s.seconds }} s)

```yaml
{{ s.config }}```

{% endfor -%}
Framework versions: {{ versions }}
"""


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def eval_results(stages: list[dict]):
    """model-index entries: every numeric metric of the model each lineage stage wrote (its `output`
    evaluations, as the stage declared them), on the data card it was evaluated on."""
    from huggingface_hub import EvalResult

    from pipelines import tasks

    results = []
    data_name = None
    for m in stages:
        data_name = (m.get("data") or {}).get("name") or data_name  # a stage without data: the last card upstream
        if not m.get("task") or data_name is None:
            continue
        tag = tasks.get(m["task"]).pipeline_tag
        outputs = m.get("outputs") or {}
        for ev in m.get("evaluations") or []:
            if ev["role"] != "output" or outputs.get(ev["model"], outputs.get("model")) != outputs.get("model"):
                continue  # a stage's other outputs (an export stage's other formats) are not the published model
            for metric, value in ev["metrics"].items():
                if _numeric(value):
                    results.append(EvalResult(task_type=tag, dataset_type=data_name, dataset_name=data_name,
                                              dataset_split=ev["split"], metric_type=metric, metric_value=value,
                                              metric_name=f"{metric} ({m['name']})"))
    return results


def comparison_rows(stages: list[dict]) -> list[dict]:
    """Per lineage stage and split: its model's main metric beside the task's baselines and its reference."""
    from pipelines import tasks

    rows = []
    for m in stages:
        if not m.get("task"):
            continue
        main = tasks.get(m["task"]).main_metric
        for ev in m.get("evaluations") or []:
            value = ev["metrics"].get(main)
            if _numeric(value):
                rows.append({"stage": m["name"], "split": ev["split"], "model": ev["model"], "role": ev["role"],
                             "metric": main, "value": _fmt(value)})
    return rows


def snippet(task, repo: str, has_adapter: bool, adapter_only: bool, quantized: bool, export: dict | None = None) -> str:
    if export and export.get("graph") in ("decode", "encoder-decoder"):
        files = ", ".join(graph_files(export))
        runner = ("" if export["runtime"] == "onnxruntime" else
                  f', device="cpu", config={{"INFERENCE_PRECISION_HINT": "{export.get("inference_precision", "f32")}"}}')
        return "\n".join([
            "from huggingface_hub import snapshot_download",
            "from transformers import AutoTokenizer",
            "",
            f'folder = snapshot_download("{repo}")  # {files} (+ weights), export.json (transformers.exporters), tokenizer',
            "# the graphs alone, in transformers' own runners (graph.runners: one per generation step, over a KV cache):",
            "from transformers.exporters import ExportedModel",
            f"graph = ExportedModel.from_pretrained(folder{runner})",
            "",
            "# or behind generate(), as the transformers model it was exported from (with this toolkit installed):",
            "from pipelines import runtimes",
            "model, tok = runtimes.load(folder), AutoTokenizer.from_pretrained(folder)",
            'inputs = tok(["To be, or not to be"], return_tensors="pt", return_token_type_ids=False)',
            "out = model.generate(**inputs, max_new_tokens=40)",
            "print(tok.batch_decode(out, skip_special_tokens=True))",
        ])
    if export:
        call = {"onnxruntime": ['import onnxruntime', f'session = onnxruntime.InferenceSession(f"{{folder}}/{export["file"]}")'],
                "openvino": ['import openvino', f'model = openvino.Core().compile_model(f"{{folder}}/{export["file"]}", "CPU", '
                             f'{{"INFERENCE_PRECISION_HINT": "{export.get("inference_precision", "f32")}"}})']}
        return "\n".join([
            "from huggingface_hub import snapshot_download",
            "",
            f'folder = snapshot_download("{repo}")  # config.json, the processor\'s files, the graph, export.json',
            f"# {export['runtime']} alone (graph inputs: {', '.join(export.get('inputs') or ['see export.json'])}):",
            *call[export["runtime"]],
            "",
            "# or called like the transformers model it was exported from (with this toolkit installed):",
            "from pipelines import runtimes",
            "model = runtimes.load(folder)  # model(**processor_outputs).logits is a torch tensor",
            "",
            "# or serve it over HTTP: pipelines serve <local copy of this repo>",
        ])
    if adapter_only:
        cls = PEFT_AUTO.get(task.peft_task_type or "", "AutoPeftModel")
        return "\n".join([
            f"from peft import {cls}",
            "from transformers import AutoTokenizer",
            "",
            "# a LoRA adapter: PEFT loads its base model (adapter_config.json) and applies it",
            f'model = {cls}.from_pretrained("{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ])
    lines = task.usage(repo)
    if has_adapter:
        lines += [
            "",
            "# the LoRA adapter alone (adapter/), on top of its base model:",
            "from peft import AutoPeftModel",
            f'adapted = AutoPeftModel.from_pretrained("{repo}", subfolder="adapter")',
        ]
    if quantized:
        lines += ["", "# this folder came from the quantize stage: see its notes in recipe.yaml for how it was quantized"]
    lines += ["", "# or serve it over HTTP: pipelines serve <local copy of this repo>"]
    return "\n".join(lines)


@dataclass
class What:
    """What is being published: a full model folder (+ optional adapter/) or a LoRA adapter alone."""

    folder: Path  # the folder that becomes the repo root
    task: object  # a pipelines.tasks Task
    architecture: str
    model_type: str
    labels: list[str]
    adapter: Path | None  # adapter/ beside a full model
    adapter_only: bool
    base_model_hint: str | None  # what the lineage says it started from (a Hub id or a local spec)
    export: dict | None = None  # an export stage's folder: its export.json (runtime, graph file, inputs)
    params: int | None = None  # when the folder has no safetensors headers to count them from


def what_to_publish(cfg: PublishConfig, ctx: RunContext) -> What:
    from pipelines import tasks

    art = ctx.inputs["model"]
    outputs = art.manifest.get("outputs", {})
    info = art.manifest.get("info") or {}
    adapter = art.output("adapter") if "adapter" in outputs and cfg.include_adapter else None
    hint = info.get("base_model")
    if "model" in outputs:
        from pipelines import runtimes

        folder = art.output("model")
        config = tasks.read_config(folder)
        labels = config.get("id2label") or {}
        task = tasks.get(art.manifest["task"]) if art.manifest.get("task") else tasks.of_config(config)
        export = runtimes.read_export(folder)
        architecture = ", ".join(config.get("architectures") or ["?"])
        if export:
            architecture += f" as {', '.join(graph_files(export))} ({export['format']}, {export['runtime']})"
        return What(folder, task, architecture, config.get("model_type", "?"), [labels[k] for k in sorted(labels, key=int)],
                    adapter, False, hint, export, export.get("params") if export else None)
    if "adapter" not in outputs:
        raise PipelinesError(f"stage {art.name!r} ({art.type}) has neither a 'model' nor an 'adapter' output to publish")
    # a LoRA adapter alone (finetune with merge: false): published the way PEFT lays it out on the Hub
    folder = art.output("adapter")
    acfg = json.loads((folder / "adapter_config.json").read_text()) if (folder / "adapter_config.json").exists() else {}
    if not art.manifest.get("task"):
        raise PipelinesError(f"stage {art.name!r}: cannot tell the adapter's task (its manifest names none)")
    return What(folder, tasks.get(art.manifest["task"]), f"LoRA adapter ({acfg.get('peft_type', 'LORA')}, r={acfg.get('r', '?')})",
                acfg.get("peft_type", "lora").lower(), list(info.get("label_names") or []), None, True, hint)


def _hub_base(hint: str | None, ctx: RunContext) -> str | None:
    """The lineage's base model if it was a Hub name (not a local folder or a scratch architecture)."""
    if not hint or not REPO_ID.match(hint) or hint.startswith(("package:", "scratch:", "stage:")):
        return None
    return None if (Path(ctx.recipe_path).parent / hint).exists() else hint


def build_card(cfg: PublishConfig, ctx: RunContext, stages: list[dict], what: What) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    tag = what.task.pipeline_tag
    cards = data_cards(stages)
    model_name = cfg.model_name or (cfg.repo_id.split("/")[1] if cfg.repo_id else f"{ctx.recipe_name}-{ctx.inputs['model'].name}")
    repo = cfg.repo_id or f"<namespace>/{model_name}"
    types = [m["type"] for m in stages]
    base_model = cfg.base_model or _hub_base(what.base_model_hint, ctx)
    if what.adapter_only and base_model is None:
        ctx.log("note: an adapter repo should name its base model on the Hub: set publish.config.base_model")
    languages = cfg.language
    if languages is None:
        found: list[str] = []
        for c in cards:
            for lang in [c["language"]] if isinstance(c["language"], str) else (c["language"] or []):
                if lang not in found and LANG.match(lang):
                    found.append(lang)
        languages = found or None
    int8 = "int8" in (what.export or {}).get("format", "")
    runtime = LIBRARY[what.export["runtime"]] if what.export else None  # an exported graph: its library, also a tag
    auto_tags = ["pipelines", tag, "distillation" if "distill" in types else None,
                 "quantized" if "quantize" in types or int8 else None, "lora" if what.adapter or what.adapter_only else None,
                 runtime, "int8" if int8 else None]
    results = eval_results(stages)
    data = ModelCardData(
        base_model=base_model,
        datasets=cfg.datasets or [c["name"] for c in cards] or None,
        language=languages,
        license=cfg.license,
        library_name="peft" if what.adapter_only else runtime or "transformers",
        pipeline_tag=tag,
        tags=[t for t in auto_tags if t] + list(cfg.tags),
        model_name=model_name,
        eval_results=results or None,
    )

    params = what.params or _count_params(what.folder)
    lineage_names = {m["name"] for m in stages}
    rows = [
        {"stage": m["name"], "type": m["type"], "key": k, "value": _fmt(v),
         "lineage": "yes" if m["name"] in lineage_names else "no"}
        for m in stages + other_stages(ctx, lineage_names)
        for k, v in (m.get("metrics") or {}).items()
        if _numeric(v)
    ]
    label_text = f" Labels: {', '.join(what.labels)}." if what.labels else ""
    intended = cfg.intended_use or (
        f"A {what.task.name} model trained by the `{ctx.recipe_name}` recipe on the data listed below.{label_text} "
        "It is meant for research and for checking the pipeline end to end; evaluate it on your own data "
        "before relying on it."
    )
    limits = cfg.limitations or (
        "Trained on small data sets with short runs: expect errors on text unlike the training data "
        "(other domains, languages, lengths). It inherits the biases of its training data and of any base "
        "model. Check the data licenses below before any commercial use."
        + (" The weights were quantized: accuracy may differ slightly from the full-precision model." if "quantize" in types or int8 else "")
    )
    if base_model:
        base_text = f"[{base_model}](https://huggingface.co/{base_model})"
    elif what.base_model_hint and not what.base_model_hint.startswith("stage:"):
        base_text = f"`{what.base_model_hint}` (a local model; set publish.config.base_model to its Hub id)"
    else:
        base_text = "none (trained by this recipe)"
    versions = ", ".join(f"{k} {v}" for k, v in (stages[-1].get("versions") or {}).items())
    card = ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=model_name,
        summary=f"A {what.task.name} model ({what.model_type}) made by the stages {' → '.join(m['name'] for m in stages)}.",
        task=what.task.name,
        pipeline_tag=tag,
        architecture=what.architecture,
        params=f"{params:,}" if params else "unknown",
        base_model_text=base_text,
        license_text=cfg.license or "not set (publish.config.license); see the training data's licenses below",
        recipe_name=ctx.recipe_name,
        stage_chain=" → ".join(f"`{m['name']}` ({m['type']})" for m in stages),
        snippet=snippet(what.task, repo, what.adapter is not None, what.adapter_only, "quantize" in types, what.export),
        intended_use=intended,
        limitations=limits,
        datasets_table=cards,
        metric_rows=rows,
        comparison=comparison_rows(stages),
        stage_configs=[
            {
                "name": m["name"],
                "type": m["type"],
                "fingerprint": m.get("fingerprint"),
                "seconds": m.get("seconds"),
                "config": yaml.safe_dump(m.get("config") or {}, sort_keys=False),
            }
            for m in stages
        ],
        versions=versions or "unknown",
    )
    text = str(card)
    validate_card(text, len(results))
    return text


def graph_files(export: dict) -> list[str]:
    """The graph files an exported folder's export.json names (a generative export: one per generation step)."""
    return export.get("files") or [export["file"]]


def _public_export(export: dict) -> bytes:
    """An exported folder's export.json as published: the local folder it was exported from left out (for a
    transformers.exporters folder, from the "pipelines" entry of its manifest, the rest of which it keeps)."""
    public = {k: v for k, v in export.items() if k not in ("source", "manifest")}
    if "manifest" in export:
        public = {**export["manifest"], "pipelines": public}
    return (json.dumps(public, indent=2) + "\n").encode()


def _count_params(model_dir: Path) -> int:
    """From the safetensors headers: no weights are loaded."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def validate_card(text: str, n_results: int) -> None:
    """The offline part of the Hub's card check (ModelCard.validate needs the network): the YAML
    header parses, round-trips through ModelCardData, and its model-index is the structure the Hub
    reads (huggingface_hub's own model_index_to_eval_results)."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not m:
        raise PipelinesError("model card: no YAML metadata header")
    header = yaml.safe_load(m.group(1))
    problems = []
    try:
        card = ModelCard(text)
        again = ModelCardData(**header)
    except (ValueError, TypeError) as e:
        raise PipelinesError(f"model card: metadata does not parse: {e}") from None
    if card.data.to_dict() != again.to_dict():
        problems.append("metadata does not round-trip through ModelCardData")
    if n_results:
        name, results = model_index_to_eval_results(header.get("model-index") or [])
        if len(results) != n_results:
            problems.append(f"model-index holds {len(results)} results, expected {n_results}")
        for r in results:
            if not _numeric(r.metric_value):
                problems.append(f"model-index: {r.metric_type} has a non-numeric value {r.metric_value!r}")
    for key in ("tags", "datasets"):
        if key in header and not all(isinstance(x, str) for x in header[key]):
            problems.append(f"{key}: every entry must be a string")
    base = header.get("base_model")
    if base is not None and (base.startswith((".", "/")) or not REPO_ID.match(base)):
        problems.append(f"base_model {base!r}: must be a Hub model id (namespace/name), not a local path")
    if problems:
        raise PipelinesError("model card is not valid: " + "; ".join(problems))


# ---------------------------------------------------------------- upload


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _endpoint() -> str:
    from huggingface_hub import constants

    url = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    parts = urlsplit(url)
    if parts.username or parts.password:  # never keep credentials written into the URL
        url = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def upload(cfg: PublishConfig, ctx: RunContext, repo_dir: Path, token: str, message: str) -> dict:
    """create_repo (exist_ok) -> create_branch (when a revision is given) -> upload_folder.
    Files the repo already has with the same content are skipped by huggingface_hub itself."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        raise PipelinesError(
            "upload asked for, but HF_HUB_OFFLINE is set: unset it to upload, or set publish.config.dry_run: true"
        )
    endpoint = _endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    step = "create_repo"
    try:
        url = api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
        if cfg.revision and cfg.revision != "main":
            step = "create_branch"
            api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True)
        step = "upload_folder"
        info = api.upload_folder(
            repo_id=cfg.repo_id, folder_path=repo_dir, revision=cfg.revision, commit_message=message
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        server = (e.server_message or str(e)).strip().splitlines()[0][:300]
        raise PipelinesError(
            _redact(
                f"upload to {endpoint}/{cfg.repo_id} failed at {step}: HTTP {status}: {server}. "
                f"The folder {repo_dir} is complete; run again to retry the upload (it is not rewritten).",
                token,
            )
        ) from None
    except Exception as e:  # connection refused, timeouts, malformed answers: all are "the upload failed"
        raise PipelinesError(
            _redact(f"upload to {endpoint}/{cfg.repo_id} failed at {step}: {type(e).__name__}: {e}. Run again to retry.", token)
        ) from None
    return {"repo_url": str(url), "commit_url": info.commit_url, "commit_oid": info.oid}


# ---------------------------------------------------------------- the stage


def run(cfg: PublishConfig, ctx: RunContext) -> StageResult:
    from huggingface_hub import get_token

    from pipelines import runtimes

    art = ctx.inputs["model"]
    stages = lineage(ctx)

    # ---- files: the model (+ adapter/) or the adapter alone, safetensors only
    what = what_to_publish(cfg, ctx)
    files = collect_files(what.folder, what.adapter, graph_files(what.export) if what.export else None)
    files.pop(runtimes.EXPORT_RECIPE, None)  # written below, without the local path it was exported from

    # ---- generated files: the recipe that made the model, its lineage, the card
    saved_recipe = art.path / "recipe.yaml"
    recipe_text = saved_recipe.read_text(encoding="utf-8") if saved_recipe.exists() else ctx.recipe_path.read_text(encoding="utf-8")
    provenance = [
        {k: m.get(k) for k in ("name", "type", "fingerprint", "stage_version", "config", "metrics", "seconds", "data", "versions")}
        for m in stages
    ]
    for p in provenance:
        if p.get("data"):
            p["data"] = {"name": p["data"]["name"], "fingerprint": p["data"]["fingerprint"]}  # no local paths
    generated = {
        "README.md": build_card(cfg, ctx, stages, what).encode(),
        **({runtimes.EXPORT_RECIPE: _public_export(what.export)} if what.export else {}),
        "recipe.yaml": recipe_text.encode(),
        "pipelines_lineage.json": (json.dumps(provenance, indent=2, default=str) + "\n").encode(),
    }

    # ---- write <stage>/repo, touching only files whose content changed (a retry rewrites nothing)
    repo_dir = ctx.output_dir / REPO
    wanted = set(files) | set(generated)
    written = []
    for rel, src in files.items():
        if sync_file(repo_dir / rel, src=src):
            written.append(rel)
    for rel, content in generated.items():
        if sync_file(repo_dir / rel, content=content):
            written.append(rel)
    for p in sorted(repo_dir.rglob("*"), reverse=True):
        rel = p.relative_to(repo_dir).as_posix()
        if p.is_file() and rel not in wanted:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    listing = [
        {"path": rel, "bytes": (repo_dir / rel).stat().st_size} for rel in sorted(wanted)
    ]
    total = sum(f["bytes"] for f in listing)
    ctx.log(
        f"{repo_dir}: {len(listing)} files, {total / 1e6:.2f} MB"
        + (f" ({len(written)} written)" if written else " (unchanged: nothing rewritten)")
    )

    # ---- upload, or say what would be uploaded
    token = get_token()
    target = f"{cfg.repo_id or '<repo_id not set>'}@{cfg.revision or 'main'}"
    if cfg.dry_run:
        reason = "dry_run: true"
    elif cfg.repo_id is None:
        reason = "no repo_id in publish.config"
    elif token is None:
        if cfg.dry_run is False:
            raise PipelinesError(
                "dry_run: false, but no Hub token was found: set HF_TOKEN or log in with `hf auth login`"
            )
        reason = "no Hub token found (HF_TOKEN unset and no saved login)"
    else:
        reason = None
    info = {
        "repo_id": cfg.repo_id,
        "revision": cfg.revision or "main",
        "private": cfg.private,
        "endpoint": _endpoint(),
        "files": listing,
        "written": written,
    }
    metrics = {"files": len(listing), "size_mb": round(total / 1e6, 3)}
    if reason is not None:
        ctx.log(f"dry run ({reason}): would upload {len(listing)} files ({total / 1e6:.2f} MB) to {target}:")
        for f in listing:
            ctx.log(f"  {f['bytes']:>12,}  {f['path']}")
        if reason.startswith(("no Hub token", "no repo_id")):
            ctx.log("to upload: set repo_id and HF_TOKEN (or `hf auth login`), then `pipelines run RECIPE --only "
                    f"{ctx.stage_name} --force`")
        info.update(dry_run=True, reason=reason)
        return StageResult(metrics={**metrics, "uploaded": 0}, outputs={"model": REPO, "repo": REPO}, info=info,
                           task=what.task.name)

    message = cfg.commit_message or (
        f"Upload {art.name} from pipelines recipe {ctx.recipe_name} (fingerprint {art.fingerprint})"
    )
    ctx.log(f"uploading {len(listing)} files ({total / 1e6:.2f} MB) to {info['endpoint']}/{target}")
    info.update(upload(cfg, ctx, repo_dir, token, message), dry_run=False, commit_message=message)
    ctx.log(f"uploaded: {info['commit_url']}")
    return StageResult(metrics={**metrics, "uploaded": 1}, outputs={"model": REPO, "repo": REPO}, info=info,
                       task=what.task.name)


STAGE = StageDef(
    name="publish",
    Config=PublishConfig,
    run=run,
    version="2",
    inputs={"model": "required"},
    data="none",
    distributed=False,
    plan=lambda cfg, inputs, recipe_dir, card: (inputs.get("model"), []),
    description="Hub-ready folder (safetensors or an exported ONNX / OpenVINO graph, tokenizer, adapter, recipe, model "
    "card) and its upload.",
)
