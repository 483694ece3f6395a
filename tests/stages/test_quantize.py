"""The quantize stage: every CPU method through the real runner, its metrics recorded, and the saved
folder reloaded in a fresh process by `pipelines.modelio.load_quantized` predicting exactly what the
stage recorded; causal LMs (tied embeddings); clear errors for GPU-only methods and bad inputs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pipelines import modelio, runner
from pipelines.errors import RecipeError, StageFailed
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.tiny_models import shakespeare_gpt2, sst2_classifier


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 2-layer, 64-wide BERT sentiment classifier (MiniLM tokenizer), trained a few steps on SST-2 rows."""
    return sst2_classifier(tmp_path_factory.mktemp("classifier"), hidden=64, layers=2, intermediate=128, rows=320)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A 2-layer GPT-2 (tied input / output embeddings) with a byte-level BPE of 400 tokens."""
    return shakespeare_gpt2(tmp_path_factory.mktemp("gpt2"), n_embd=64)


def recipe(write_recipe, tmp_path, model_path, card="sst2_sample.yaml", stages=None, **config):
    """One quantize stage (config) or several ({name: config})."""
    stages = stages or {"quantize": config}
    return write_recipe(
        {
            "name": "q",
            "output_dir": str(tmp_path / "run"),
            "data": {"d": str(ROOT / "data_cards" / card)},
            "stages": [{"name": name, "type": "quantize", "data": "d",
                        "config": {"model_path": str(model_path), "latency_repeats": 2, **c}} for name, c in stages.items()],
        }
    )


# A fresh interpreter: the one documented call, then the same evaluation the stage ran, for each folder.
RELOAD = """
import json, sys
from pipelines import modelio, tasks
from pipelines.data import load_card
from transformers import AutoTokenizer
results = []
for job in json.loads(sys.argv[1]):
    model = modelio.load_quantized(job["folder"])
    tok = AutoTokenizer.from_pretrained(job["folder"])
    task = tasks.of_folder(job["folder"])
    task.prepare_processor(tok)
    ds = load_card(job["card"]).load(seed=42)[job["split"]].select(range(job["n"]))
    scored = task.evaluate(model, tok, ds, tasks.EvalOptions(max_length=job["max_length"], label_names=["negative", "positive"]))
    results.append({"outputs": scored.outputs, "metrics": scored.metrics, "type": type(model).__name__,
                    "id2label": {str(k): v for k, v in model.config.id2label.items()},
                    "module": model.get_submodule(job["module"])._get_name()})
print(json.dumps(results))
"""


def reload_in_fresh_process(jobs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(jobs)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# name: (config, size ratio range, class of a reloaded attention Linear)
CPU_METHODS = {
    # int8 Linear + int8 embedding rows (64-wide rows: the per-row scale and offset cost 12 %)
    "int8": ({"method": "dynamic_int8"}, (3.3, 4.0), "DynamicQuantizedLinear"),
    "int8_linear_only": ({"method": "dynamic_int8", "embeddings": "keep", "per_channel": False, "keep": ["classifier"]},
                         (1.0, 1.6), "DynamicQuantizedLinear"),
    # torchao int8 Linear layers (Int8Tensor weights), embeddings fp32: most of this tiny model
    "torchao_int8": ({"method": "torchao_int8", "keep": ["classifier"]}, (1.0, 1.6), "Linear"),
    "bf16": ({"method": "bf16"}, (1.9, 2.1), "Linear"),
    "fp16": ({"method": "fp16"}, (1.9, 2.1), "Linear"),
}


def test_cpu_methods_record_metrics_and_reload_in_a_fresh_process(write_recipe, tmp_path, classifier):
    stages = {name: {**c, "max_eval_samples": 96} for name, (c, _, _) in CPU_METHODS.items()}
    runner.run(load_recipe(recipe(write_recipe, tmp_path, classifier, stages=stages)))
    jobs, recorded = [], {}
    for name, (config, (lo, hi), _) in CPU_METHODS.items():
        stage = tmp_path / "run" / name
        m = json.loads((stage / "manifest.json").read_text())
        met = m["metrics"]
        for k in ("accuracy", "f1", "fp32_accuracy", "accuracy_delta", "test_accuracy", "test_accuracy_delta",
                  "fp32_mb", "quantized_mb", "size_ratio", "fp32_ms", "quantized_ms", "speedup"):
            assert k in met, (name, k)
        assert met["accuracy_delta"] == pytest.approx(met["accuracy"] - met["fp32_accuracy"], abs=1e-6)
        assert abs(met["accuracy_delta"]) <= 0.05, name  # 96 rows: at most a few flip
        assert lo <= met["size_ratio"] <= hi, (name, met["size_ratio"])
        assert m["info"]["reload"] == "pipelines.modelio.load_quantized(folder)"
        evs = {e["model"]: e for e in m["evaluations"] if e["split"] == "validation"}
        assert evs["quantized"]["params"] == evs["fp32"]["params"] == met["params"], name  # int8 weights counted
        recorded[name] = (json.loads((stage / "predictions.json").read_text()), met)
        jobs.append({"folder": str(stage / "model"), "card": str(ROOT / "data_cards/sst2_sample.yaml"),
                     "split": recorded[name][0]["split"], "n": 96, "max_length": 128,
                     "module": "bert.encoder.layer.0.attention.self.query"})
    for (name, (_, _, linear)), got in zip(CPU_METHODS.items(), reload_in_fresh_process(jobs)):
        predictions, met = recorded[name]
        assert got["outputs"] == predictions["outputs"], name  # what the stage measured is what reloads
        assert got["metrics"]["accuracy"] == met["accuracy"]
        assert got["id2label"] == {"0": "negative", "1": "positive"}  # label names survive quantization
        assert got["type"] == "BertForSequenceClassification" and got["module"] == linear, (name, got["module"])
    assert modelio.load_quantized(tmp_path / "run/int8_linear_only/model").classifier._get_name() == "Linear"  # kept
    assert modelio.load_quantized(tmp_path / "run/int8/model").bert.embeddings.word_embeddings._get_name() == "QuantizedEmbedding"
    torchao = modelio.load_quantized(tmp_path / "run/torchao_int8/model")
    assert type(torchao.bert.encoder.layer[0].attention.self.query.weight).__name__ == "Int8Tensor"
    assert type(torchao.classifier.weight).__name__ == "Parameter"  # kept


def test_dynamic_int8_causal_lm_with_tied_embeddings(write_recipe, tmp_path, gpt2):
    path = recipe(write_recipe, tmp_path, gpt2, card="tinyshakespeare_sample.yaml", max_eval_samples=24, max_length=64)
    runner.run(load_recipe(path))
    stage = tmp_path / "run/quantize"
    met = json.loads((stage / "manifest.json").read_text())["metrics"]
    assert met["perplexity"] > 1 and met["fp32_perplexity"] > 1
    assert met["perplexity_delta"] == pytest.approx(met["perplexity"] - met["fp32_perplexity"], abs=1e-4)
    assert "test_perplexity" not in met  # the card has no test split: validation only
    recorded = json.loads((stage / "predictions.json").read_text())
    [got] = reload_in_fresh_process([{"folder": str(stage / "model"), "card": str(ROOT / "data_cards/tinyshakespeare_sample.yaml"),
                                      "split": "validation", "n": 24, "max_length": 64, "module": "lm_head"}])
    assert got["outputs"] == recorded["outputs"]  # per-example NLL sums, bit for bit
    assert got["module"] == "DynamicQuantizedLinear"


def test_gpu_only_methods_fail_clearly_on_this_machine(write_recipe, tmp_path, classifier):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for method in ("bnb_8bit", "bnb_4bit"):
        path = recipe(write_recipe, tmp_path, classifier, method=method)
        with pytest.raises(StageFailed, match=rf"method {method} needs a CUDA GPU .*dynamic_int8"):
            runner.run(load_recipe(path))
    assert not (tmp_path / "run/quantize/model").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes methods need a CUDA GPU")
@pytest.mark.parametrize("method", ["bnb_8bit", "bnb_4bit"])
def test_bnb_methods_reload_in_a_fresh_process_on_gpu(tmp_path, method):
    """GPU machines only (CI has none): what quantize_and_save writes with bitsandbytes reloads through
    load_quantized in a fresh process with the same logits and label names."""
    pytest.importorskip("bitsandbytes")
    from transformers import BertConfig, BertForSequenceClassification

    from pipelines.stages.quantize import QuantizeConfig, quantize_and_save

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=2000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                     num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    fp32 = BertForSequenceClassification(cfg).eval()
    fp32.save_pretrained(tmp_path / "fp32")
    x = torch.randint(0, 2000, (8, 16), generator=torch.Generator().manual_seed(1))
    recipe = quantize_and_save(QuantizeConfig(method=method, model_path="unused"), tmp_path / "fp32", tmp_path / method, "classification")
    assert recipe["method"] == method and modelio.size_on_disk_mb(tmp_path / method) < modelio.size_on_disk_mb(tmp_path / "fp32") / 2
    q = modelio.load_quantized(tmp_path / method)
    with torch.inference_mode():
        here = q(input_ids=x.to(q.device)).logits.float().cpu()
        ref = fp32(input_ids=x).logits
    code = ("import sys, json, torch; from pipelines import modelio; m = modelio.load_quantized(sys.argv[1]); x = torch.tensor(json.loads(sys.argv[2])); "
            "print(json.dumps({'logits': m(input_ids=x.to(m.device)).logits.float().cpu().tolist(), 'id2label': m.config.id2label}))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / method), json.dumps(x.tolist())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fresh = json.loads(r.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(fresh["logits"]), here, atol=1e-5, rtol=0)
    assert fresh["id2label"] == {"0": "negative", "1": "positive"}
    assert (here.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_input_errors(write_recipe, tmp_path, classifier):
    # no model at all
    path = write_recipe({"name": "q", "output_dir": str(tmp_path / "run"), "data": {"d": str(ROOT / "data_cards/sst2_sample.yaml")},
                         "stages": [{"name": "quantize", "type": "quantize", "data": "d", "config": {}}]})
    with pytest.raises(RecipeError, match="give exactly one model"):
        load_recipe(path)
    # a folder that is not a model: refused by validate
    with pytest.raises(RecipeError, match="model_path .*: no config.json in"):
        load_recipe(recipe(write_recipe, tmp_path, tmp_path))
    # quantizing twice
    path = recipe(write_recipe, tmp_path, classifier, max_eval_samples=16)
    runner.run(load_recipe(path))
    with pytest.raises(StageFailed, match="already quantized"):
        runner.run(load_recipe(recipe(write_recipe, tmp_path / "again", tmp_path / "run/quantize/model", max_eval_samples=16)))
