"""Quantisation-aware training (torchao) in finetune and distill: the Linear layers really run fake-quantised
(the int8 grids the quantize stage converts to), come back as plain Linear layers with the trained weights, and
the saved folder goes through the quantize stage's int8 methods; invalid combinations fail at validation."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines import modelio, runner
from pipelines.errors import RecipeError
from pipelines.recipe import load_recipe
from pipelines.training import QatConfig, qat_convert, qat_prepare
from tests.conftest import ROOT
from tests.tiny_models import sst2_classifier, tiny_bert

CARD = str(ROOT / "data_cards/sst2_sample.yaml")
FAST = {"batch_size": 16, "logging_steps": 1, "lr": 1e-3}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 2-layer, 32-wide BERT encoder (no head) with the MiniLM tokenizer, random weights."""
    return tiny_bert(tmp_path_factory.mktemp("qat_bert"))


def _fake_int8(x, w, b):
    """What an int8 fake-quantised Linear computes: activations rounded per token (asymmetric), weights per output
    channel (symmetric), both to int8, then a float matmul."""
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    xq = (torch.clamp(torch.round(x * (1.0 / scale)) + zero, -128, 127) - zero) * scale
    ws = (w.abs().amax(-1, keepdim=True) / 127.5).clamp(min=torch.finfo(torch.float32).eps)
    wq = torch.clamp(torch.round(w * (1.0 / ws)), -128, 127) * ws
    return torch.nn.functional.linear(xq, wq, b)


def test_prepare_fake_quantises_linear_layers_and_convert_gives_them_back():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).eval()
    x = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        plain = model(input_ids=x).logits
    keys = set(model.state_dict())
    info = qat_prepare(model, QatConfig(keep=["classifier"]))
    assert info["fake_quantized_linear"] == 2 * 6 + 1 and info["kept"] == ["classifier"]  # q k v o, ffn x2; pooler
    assert model.classifier._get_name() == "Linear" and model.bert.pooler.dense._get_name() == "FakeQuantizedLinear"
    assert set(model.state_dict()) == keys  # checkpoints taken while training keep the plain layout
    layer = model.bert.encoder.layer[0].intermediate.dense
    h = torch.randn(2, 5, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(layer(h), _fake_int8(h, layer.weight, layer.bias), atol=2e-5, rtol=0)
        assert (layer(h) - torch.nn.functional.linear(h, layer.weight, layer.bias)).abs().max() > 1e-3
        fake = model(input_ids=x).logits
    assert not torch.equal(fake, plain)
    layer.weight.grad = None
    layer(h).sum().backward()  # straight-through: the float weights get gradients
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert qat_convert(model) == 13 and qat_convert(model) == 0
    assert not any(m._get_name() == "FakeQuantizedLinear" for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, plain, atol=0, rtol=0)  # the weights were not touched


def test_finetune_and_distill_with_qat_then_quantize(write_recipe, tmp_path, bert):
    """finetune (full, qat) -> quantize dynamic_int8 and torchao_int8; distill with a qat student. The saved folders
    are plain HF folders (nothing of the fake quantisers), the manifests say what was fake-quantised, and the
    quantized folders reload with load_quantized predicting what the quantize stage recorded."""
    teacher = sst2_classifier(tmp_path / "teacher", hidden=32, layers=2, intermediate=64, rows=64)
    ft = {"task": "classification", "base_model": str(bert), "method": "full", "max_train_rows": 64,
          "max_eval_rows": 32, "eval_splits": ["validation"], "max_length": 48, "qat": {"scheme": "int8"},
          "train": {**FAST, "max_steps": 3}}
    q = {"max_eval_samples": 32, "eval_splits": ["validation"], "latency_repeats": 1, "max_length": 48}
    kd = {"teacher_model": str(teacher), "student": {"from_teacher_layers": [0]}, "qat": {"scheme": "int8"},
          "max_train_samples": 64, "max_eval_samples": 32, "eval_splits": ["validation"], "max_length": 48,
          "latency_repeats": 1, "train": {**FAST, "max_steps": 2}}
    stages = [
        {"name": "ft", "type": "finetune", "data": "d", "config": ft},
        {"name": "q_torch", "type": "quantize", "data": "d", "inputs": {"model": "ft"}, "config": {**q, "method": "dynamic_int8"}},
        {"name": "q_torchao", "type": "quantize", "data": "d", "inputs": {"model": "ft"}, "config": {**q, "method": "torchao_int8"}},
        {"name": "kd", "type": "distill", "data": "d", "config": kd},
    ]
    path = write_recipe({"name": "qat", "output_dir": str(tmp_path / "run"), "seed": 1, "data": {"d": CARD}, "stages": stages})
    runner.run(load_recipe(path))
    run = tmp_path / "run"
    man = {s: json.loads((run / s / "manifest.json").read_text()) for s in ("ft", "q_torch", "q_torchao", "kd")}
    assert man["ft"]["info"]["qat"]["fake_quantized_linear"] == 2 * 6 + 2  # + pooler and classifier
    assert man["kd"]["info"]["qat"]["fake_quantized_linear"] == 6 + 2
    from safetensors import safe_open

    for folder in (run / "ft/model", run / "kd/model"):
        model, _ = modelio.load_model(folder)
        assert not any(m._get_name() == "FakeQuantizedLinear" for m in model.modules())
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "quantizer" in k or "scale" in k], folder
    for name, layer in (("q_torch", "DynamicQuantizedLinear"), ("q_torchao", "Linear")):
        met = man[name]["metrics"]
        assert "accuracy" in met and "fp32_accuracy" in met and abs(met["accuracy_delta"]) <= 0.1
        qmodel = modelio.load_quantized(run / name / "model")
        query = qmodel.bert.encoder.layer[0].attention.self.query
        assert query._get_name() == layer
        if name == "q_torchao":
            assert type(query.weight).__name__ == "Int8Tensor"
        assert qmodel.config.id2label == {0: "negative", 1: "positive"}


def test_qat_and_torchao_errors_at_validation(write_recipe, tmp_path, bert):
    ft = {"task": "classification", "base_model": str(bert), "method": "lora", "qat": {"scheme": "int8"}}
    stages = [{"name": "ft", "type": "finetune", "data": "d", "config": ft},
              {"name": "q", "type": "quantize", "data": "d", "inputs": {"model": "ft"},
               "config": {"method": "torchao_int8", "embeddings": "int8"}},
              {"name": "q2", "type": "quantize", "data": "d", "inputs": {"model": "ft"},
               "config": {"method": "dynamic_int8", "qat": {"scheme": "int8"}}},
              {"name": "kd", "type": "distill", "data": "d", "inputs": {"teacher": "ft"},
               "config": {"student": {"every_other": True}, "qat": {}, "train": {"deepspeed": {"zero_stage": 3}}}}]
    path = write_recipe({"name": "bad", "output_dir": str(tmp_path / "run"), "data": {"d": CARD}, "stages": stages})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert "stages[0].config" in msg and "qat trains every weight" in msg and "use method full" in msg
    assert "stages[1].config" in msg and "torchao_int8 quantizes nn.Linear layers only" in msg
    assert "stages[2].config.qat" in msg  # the quantize stage has no qat (it converts what QAT trained)
    assert "stages[3].config" in msg and "ZeRO-3 partitions them" in msg
    stages[0]["config"] = {**ft, "method": "full", "qat": {"scheme": "int4"}}
    path = write_recipe({"name": "bad2", "output_dir": str(tmp_path / "run"), "data": {"d": CARD}, "stages": stages[:1]})
    with pytest.raises(RecipeError, match=r"stages\[0\]\.config\.qat\.scheme"):
        load_recipe(path)


def test_without_torchao_installed_both_say_how_to_get_it(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    from pipelines.stages.quantize import QuantizeConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    for make in (lambda: QuantizeConfig(method="torchao_int8"), lambda: QatConfig()):
        with pytest.raises(ValidationError, match=r"needs torchao .*pip install 'pipelines\[torchao\]'"):
            make()
    QuantizeConfig(method="dynamic_int8")  # the default needs no torchao


def test_a_killed_qat_finetune_resumes_to_the_uninterrupted_result(write_recipe, tmp_path, bert):
    """Checkpoints written under fake quantisation load back into a fake-quantised model: the resumed run continues at
    step 3 and ends with the weights of the run that was never stopped."""
    import shutil

    from safetensors.torch import load_file

    ft = {"task": "classification", "base_model": str(bert), "method": "full", "max_train_rows": 64, "max_eval_rows": 16,
          "eval_splits": ["validation"], "max_length": 48, "qat": {"scheme": "int8"},
          "train": {**FAST, "max_steps": 4, "save_steps": 2}}
    path = write_recipe({"name": "r", "output_dir": str(tmp_path / "run"), "seed": 1, "data": {"d": CARD},
                         "stages": [{"name": "ft", "type": "finetune", "data": "d", "config": ft}]})
    runner.run(load_recipe(path))
    stage = tmp_path / "run/ft"
    fingerprint = json.loads((stage / "manifest.json").read_text())["fingerprint"]
    losses = [h["loss"] for h in json.loads((stage / "log_history.json").read_text()) if "loss" in h]
    weights = load_file(stage / "model/model.safetensors")
    (stage / "manifest.json").unlink()  # as if killed after checkpoint-2
    shutil.rmtree(stage / "checkpoints/checkpoint-4")
    # a marker in the checkpoint's trainer state: a resumed run carries it on, a restarted one would not
    state_file = stage / "checkpoints/checkpoint-2/trainer_state.json"
    state = json.loads(state_file.read_text())
    next(h for h in state["log_history"] if "loss" in h)["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    (stage / ".inprogress.json").write_text(json.dumps({"fingerprint": fingerprint}))
    assert runner.run(load_recipe(path))[0].action == "resume"
    assert [h["loss"] for h in json.loads((stage / "log_history.json").read_text()) if "loss" in h] == [123.0, *losses[1:]]
    resumed = load_file(stage / "model/model.safetensors")
    assert max((weights[k] - resumed[k]).abs().max().item() for k in weights) == 0.0
