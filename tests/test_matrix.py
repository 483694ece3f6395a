"""Every task through every stage (the README's task x stage matrix): for each task a recipe of finetune
(LoRA) -> finetune (full) -> distill -> quantize -> publish -> prune on the task's shipped
sample and a tiny model, then `pipelines serve` answering the task's endpoint from the quantized folder, and `pipelines report`.
The validate-time refusals of combinations that make no sense are tested at the end."""

from __future__ import annotations

import base64
import io
import json

import pytest

from pipelines import runner, tasks
from pipelines.errors import RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests import tiny_models

CARDS = ROOT / "data_cards"
TRAIN = {"max_steps": 2, "batch_size": 8, "logging_steps": 1, "lr": 1e-3}


def png_bytes(side: int = 28, mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (side, side), 128 if mode == "L" else (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


# task -> (card, base model builder, finetune extras, a request to serve, the key its answer must hold)
CASES = {
    "classification": ("sst2_sample", lambda d: tiny_models.tiny_bert(d), {},
                       {"text": ["a fine film", "dull"]}, "predictions"),
    "multi-label-classification": ("wnut17_entity_types_sample", lambda d: tiny_models.tiny_bert(d),
                                   {"tune_thresholds": True}, {"text": ["Paris and Jane"]}, "predictions"),
    "token-classification": ("wnut17_sample", lambda d: tiny_models.tiny_bert(d), {},
                             {"text": "Jane Doe flew to Paris"}, "predictions"),
    "translation": ("multi30k_sample", lambda d: tiny_models.tiny_marian(d, _texts("multi30k_sample")),
                    {"generation": {"num_beams": 1, "max_new_tokens": 8}},
                    {"text": ["a man rides a bike"], "max_new_tokens": 4}, "translations"),
    "summarization": ("aclsum_sample", lambda d: tiny_models.tiny_marian(d, _texts("aclsum_sample")),
                      {"generation": {"num_beams": 1, "max_new_tokens": 8}, "max_length": 96, "max_target_length": 32},
                      {"text": "We propose a new method. It works well.", "max_new_tokens": 4}, "summaries"),
    "causal-lm": ("tinyshakespeare_sample", lambda d: tiny_models.shakespeare_gpt2(d, n_embd=32), {"max_length": 64},
                  {"prompt": "To be", "max_new_tokens": 4}, "completion"),
    "chat": ("sst2_chat_sample", lambda d: tiny_models.chat_llama(d), {"max_length": 160,
             "generation": {"num_beams": 1, "max_new_tokens": 4}},
             {"prompt": "Review: a fine film\nPositive or negative?", "max_new_tokens": 4}, "completion"),
    "image-classification": ("fashion_mnist_sample", lambda d: tiny_models.tiny_vit(d), {},
                             {"image": [base64.b64encode(png_bytes()).decode()]}, "predictions"),
}


def _texts(card: str) -> list[str]:
    from pipelines.data import load_card

    train = load_card(CARDS / f"{card}.yaml").load(seed=0)["train"]
    return list(train["source"]) + list(train["target"])


def chain(task: str, card: str, base: str, extra: dict) -> dict:
    common = {"max_eval_rows": 16, "eval_splits": ["validation"], "train": TRAIN, **extra}
    ft = {"task": task, "base_model": base, "max_train_rows": 32, **common}
    small = {"max_eval_samples": 16, "eval_splits": ["validation"], "latency_repeats": 1}
    return {
        "name": f"matrix-{task}",
        "output_dir": "run",
        "seed": 3,
        "data": {"d": str(CARDS / f"{card}.yaml")},
        "stages": [
            {"name": "lora", "type": "finetune", "data": "d", "config": {**ft, "method": "lora", "lora": {"r": 4, "alpha": 8}}},
            {"name": "full", "type": "finetune", "data": "d", "config": {**ft, "method": "full"}},
            {"name": "distill", "type": "distill", "data": "d", "inputs": {"teacher": "full"},
             "config": {"student": {"from_teacher_layers": [0]}, "max_train_samples": 32, "train": TRAIN,
                        "max_length": extra.get("max_length", 128), **small}},
            {"name": "quantize", "type": "quantize", "data": "d", "inputs": {"model": "full"},
             "config": {"max_length": extra.get("max_length", 128), **small}},
            {"name": "publish", "type": "publish", "inputs": {"model": "distill"}, "config": {"dry_run": True}},
            {"name": "prune", "type": "prune", "data": "d", "inputs": {"model": "full"},
             "config": {"sparsity": 0.3, "importance": "taylor", "importance_batches": 2, "importance_batch_size": 8,
                        "max_length": extra.get("max_length", 128), **small}},
        ],
    }


@pytest.mark.parametrize("name", list(CASES))
def test_task_through_every_stage(name, tmp_path, write_recipe):
    from fastapi.testclient import TestClient

    from pipelines.report import write_report
    from pipelines.serve import ServedModel, ServeSettings, create_app

    card, build, extra, request, answer = CASES[name]
    task = tasks.get(name)
    base = build(tmp_path / "base")
    recipe = load_recipe(write_recipe(chain(name, card, str(base), extra)))
    runner.run(recipe)
    run = tmp_path / "run"
    compressed = (("distill", "teacher", "student"), ("quantize", "fp32", "quantized"), ("prune", "unpruned", "pruned"))
    m = {s: json.loads((run / s / "manifest.json").read_text())
         for s in ("lora", "full", "publish", *(c[0] for c in compressed))}
    assert {x["task"] for x in m.values()} == {name}

    # finetune (LoRA and full): the task's main metric on validation, beside its baselines on the same rows
    for s in ("lora", "full"):
        assert f"validation_{task.main_metric}" in m[s]["metrics"], m[s]["metrics"]
        roles = [(e["role"], e["split"]) for e in m[s]["evaluations"]]
        assert ("output", "validation") in roles and ("baseline", "validation") in roles
    assert m["lora"]["outputs"] == {"adapter": "adapter", "model": "model"} and m["lora"]["metrics"]["trainable_share"] < 1
    # distill, quantize (and prune): the compressed model against the model it came from (+ baselines), sizes, latency
    for s, ref, out in compressed:
        evs = {(e["model"], e["role"]) for e in m[s]["evaluations"]}
        assert {(ref, "reference"), (out, "output")} <= evs and any(r == "baseline" for _, r in evs), evs
        assert all(e.get("latency_ms") and e.get("size_mb") for e in m[s]["evaluations"] if e["role"] != "baseline")
        assert task.main_metric in next(e for e in m[s]["evaluations"] if e["role"] == "output")["metrics"]
    assert m["distill"]["metrics"]["student_params"] < m["distill"]["metrics"]["teacher_params"]
    # prune: FFN neurons removed; stock from_pretrained reloads the folder with the in-memory logits
    assert m["prune"]["metrics"]["params"] < m["prune"]["metrics"]["unpruned_params"]
    assert m["prune"]["info"]["curve"]["levels"][0]["reload_max_abs_logit_diff"] == 0.0
    # publish: a card with the task's pipeline tag, usage and baselines
    readme = (run / "publish/repo/README.md").read_text()
    assert f"pipeline_tag: {task.pipeline_tag}" in readme and task.usage("x")[0] in readme
    assert "| distill | validation |" in readme and "| baseline |" in readme

    # serve: the task's endpoint from the quantized folder (and from the published repo)
    for folder in (run / "quantize/model", run / "publish/repo"):
        client = TestClient(create_app(ServedModel(folder), ServeSettings(batching=False)))
        got = client.post(task.endpoint, json=request)
        assert got.status_code == 200, got.text
        assert answer in got.json(), got.json()
        assert client.get("/health").json()["task"] == name
        assert client.get("/docs").status_code == 200
    if task.upload_field:
        up = client.post(task.endpoint, files=[(task.upload_field, ("a.png", png_bytes(40, "RGBA"), "image/png"))])
        assert up.status_code == 200 and up.json()["predictions"][0]["label"] in task_label_names(run)
        bad = client.post(task.endpoint, json={task.upload_field: base64.b64encode(b"not an image").decode()})
        assert bad.status_code == 422 and "not an image" in bad.json()["error"]

    # report: the charts (recipe graph, training curves, model vs baseline, the compression trade-off, per-class
    # charts for a labelled task), predictions worth reading, model vs baseline and the compression table
    write_report(recipe)
    md = (run / "report/report.md").read_text()
    assert "## Model vs baseline" in md and "## Compression" in md and "| quantize | quantized | validation |" in md
    plots = {p.name for p in (run / "report/plots").glob("*.png")}
    assert {"recipe_graph.png", "baselines.png", "tradeoff.png", "lora_loss.png", "full_loss.png",
            "distill_loss.png"} <= plots, plots
    if task.labelled:
        assert {"lora_validation_classes.png", "full_validation_classes.png"} <= plots, plots
    assert "Predictions worth reading (validation" in md


def task_label_names(run) -> set[str]:
    return set(json.loads((run / "full/model/config.json").read_text())["id2label"].values())


# ---------------------------------------------------------------- refused at validate time


@pytest.mark.parametrize("config, message", [
    ({"task": "translation", "class_weights": "balanced"}, "class_weights is for tasks"),
    ({"task": "classification", "tune_thresholds": True}, "tune_thresholds is for tasks ['multi-label-classification']"),
    ({"task": "image-classification", "group_by_length": True}, "task image-classification has no text inputs"),
    ({"task": "regression"}, "Input should be 'classification'"),
])
def test_combinations_that_make_no_sense_are_refused_by_validate(config, message, write_recipe):
    doc = {"name": "bad", "output_dir": "run", "data": {"d": str(CARDS / "sst2_sample.yaml")},
           "stages": [{"name": "ft", "type": "finetune", "data": "d", "config": {"base_model": "x", **config}}]}
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_recipe(write_recipe(doc))


@pytest.mark.parametrize("task, student, loss, message", [
    ("causal-lm", {"every_other": True, "trim_vocab": True}, {}, "the output layer of a causal-lm model is its vocabulary"),
    ("image-classification", {"every_other": True, "trim_vocab": True}, {}, "image-classification model does not read text"),
    ("translation", {"every_other": True}, {"hidden_weight": 1.0}, "use logit KD for translation"),
])
def test_distill_refuses_what_the_teachers_task_cannot_do_at_validate(task, student, loss, message, write_recipe, tmp_path):
    """The teacher is an upstream finetune stage: its task is known from its config before anything runs."""
    from pipelines.cli import main

    doc = {"name": "bad", "output_dir": "run", "data": {"d": str(CARDS / "sst2_sample.yaml")},
           "stages": [{"name": "ft", "type": "finetune", "data": "d", "config": {"task": task, "base_model": "x"}},
                      {"name": "kd", "type": "distill", "data": "d", "inputs": {"teacher": "ft"},
                       "config": {"student": student, "loss": loss}}]}
    path = write_recipe(doc)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.config: .*" + message):
        load_recipe(path)
    assert main(["validate", str(path)]) == 2
    assert not (tmp_path / "run").exists()  # nothing ran


def test_a_bf16_image_model_is_scored_and_served(tmp_path, write_recipe):
    """bf16 weights take bf16 pixels (the image processor gives float32): quantize scores it, serve answers."""
    from fastapi.testclient import TestClient
    from transformers import AutoModelForImageClassification

    from pipelines.serve import ServedModel, ServeSettings, create_app

    base = tiny_models.tiny_vit(tmp_path / "vit")
    from pipelines.data import load_card

    names = load_card(CARDS / "fashion_mnist_sample.yaml").label_names
    model = AutoModelForImageClassification.from_pretrained(base, num_labels=10, id2label=dict(enumerate(names)),
                                                            label2id={n: i for i, n in enumerate(names)})
    model.save_pretrained(tmp_path / "clf")
    (tmp_path / "clf" / "preprocessor_config.json").write_bytes((base / "preprocessor_config.json").read_bytes())
    doc = {"name": "bf16", "output_dir": "run", "data": {"d": str(CARDS / "fashion_mnist_sample.yaml")},
           "stages": [{"name": "q", "type": "quantize", "data": "d",
                       "config": {"model_path": str(tmp_path / "clf"), "method": "bf16", "max_eval_samples": 20,
                                  "eval_splits": ["validation"], "latency_repeats": 1}}]}
    runner.run(load_recipe(write_recipe(doc)))
    m = json.loads((tmp_path / "run/q/manifest.json").read_text())
    assert abs(m["metrics"]["accuracy_delta"]) <= 0.1 and m["metrics"]["size_ratio"] > 1.8
    client = TestClient(create_app(ServedModel(tmp_path / "run/q/model"), ServeSettings(batching=False)))
    got = client.post("/predict", json={"image": base64.b64encode(png_bytes()).decode()})
    assert got.status_code == 200 and got.json()["predictions"][0]["label"] in names
