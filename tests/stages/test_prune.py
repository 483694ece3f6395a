"""The prune stage on a tiny BERT classifier and the shipped SST-2 sample: FFN neurons really removed (fewer
parameters, smaller files, intermediate_size in config.json), the saved folder reloaded by stock transformers
with the logits the stage measured, magnitude and Taylor importance both run (and keep different neurons), a
sweep of levels recorded as a curve, recovery through the Trainer, the quality gate, and validate refusals."""

import json

import pytest
import torch

from pipelines import runner
from pipelines.errors import RecipeError, StageFailed
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.tiny_models import sst2_classifier

CARD = str(ROOT / "data_cards/sst2_sample.yaml")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """2 layers, 64 wide, FFN 256 (BERT's 4x), trained on 2,000 SST-2 rows (0.61 accuracy: pruning can hurt it)."""
    return sst2_classifier(tmp_path_factory.mktemp("classifier"), hidden=64, layers=2, intermediate=256, rows=2000)


def doc(tmp_path, stages: dict, extra_stages=()) -> dict:
    return {"name": "p", "output_dir": str(tmp_path / "run"), "data": {"d": CARD},
            "stages": [{"name": n, "type": "prune", "data": "d", "config": {"latency_repeats": 2, **c}}
                       for n, c in stages.items()] + list(extra_stages)}


def manifest(tmp_path, stage):
    return json.loads((tmp_path / "run" / stage / "manifest.json").read_text())


def counting_evaluate(monkeypatch) -> list:
    """Every task.evaluate call of the classification task from now on, as (model, raw rows) (kept alive: ids stay
    unique)."""
    from pipelines import tasks

    cls, calls = type(tasks.get("classification")), []
    evaluate = cls.evaluate

    def counted(self, model, processor, raw, opts):
        calls.append((model, raw))
        return evaluate(self, model, processor, raw, opts)

    monkeypatch.setattr(cls, "evaluate", counted)
    return calls


def test_magnitude_and_taylor_sweeps_shrink_the_model_and_reload_with_stock_transformers(write_recipe, tmp_path, classifier,
                                                                                          monkeypatch):
    from collections import Counter

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines import modelio, tasks
    from pipelines.data import load_card

    common = {"model_path": str(classifier), "max_eval_samples": 64, "eval_splits": ["validation"]}
    stages = {"magnitude": {**common, "importance": "magnitude", "levels": [0.2, 0.4], "sparsity": 0.4,
                            "eval_splits": ["validation", "test"]},
              "taylor": {**common, "importance": "taylor", "sparsity": 0.4, "importance_batches": 2,
                         "recover": {"max_train_samples": 32, "train": {"max_steps": 2, "batch_size": 16}}}}
    calls = counting_evaluate(monkeypatch)
    runner.run(load_recipe(write_recipe(doc(tmp_path, stages))))
    # each model scored once per split: magnitude: the input model on validation and test, both levels on validation
    # (the sweep: what the curve, the choice and the gate read), the output level on test; taylor: the input model,
    # the level before recovery (in memory) and after (the reloaded folder), on validation
    per_model = Counter((id(model), raw._fingerprint) for model, raw in calls)
    assert len(calls) == 8 and set(per_model.values()) == {1}
    assert sorted(Counter(id(model) for model, _ in calls).values()) == [1, 1, 1, 1, 2, 2]
    unpruned = AutoModelForSequenceClassification.from_pretrained(classifier)
    n0 = modelio.num_parameters(unpruned)
    enc0 = modelio.num_parameters(unpruned.bert.encoder)
    kept = {}
    for stage in stages:
        m = manifest(tmp_path, stage)
        folder = tmp_path / "run" / stage / m["outputs"]["model"]
        assert m["outputs"]["model"] == "levels/sparsity_0.40/model"
        config = json.loads((folder / "config.json").read_text())
        # 40 % of the encoder's parameters = 52 neurons of 2*64+1 parameters in each of 2 layers... of 256
        removed = round(0.4 * enc0 / (2 * 129))
        assert config["intermediate_size"] == 256 - removed and config["id2label"] == {"0": "negative", "1": "positive"}
        weights = load_file(folder / "model.safetensors")
        assert weights["bert.encoder.layer.0.intermediate.dense.weight"].shape == (256 - removed, 64)  # sliced, not masked
        assert weights["bert.encoder.layer.1.output.dense.weight"].shape == (64, 256 - removed)
        stock = AutoModelForSequenceClassification.from_pretrained(folder).eval()  # no pipelines code
        assert m["metrics"]["params"] == modelio.num_parameters(stock) == n0 - removed * 2 * 129
        assert abs(m["metrics"]["encoder_sparsity"] - 0.4) < 0.01 and m["metrics"]["params_ratio"] < 1
        assert m["metrics"]["pruned_mb"] < m["metrics"]["unpruned_mb"]
        for level in m["info"]["curve"]["levels"]:
            assert level["reload_max_abs_logit_diff"] == 0.0  # in-memory pruned model == stock reload
        # the stock reload predicts what the stage recorded
        tok = AutoTokenizer.from_pretrained(folder)
        rows = load_card(CARD).load(seed=42)["validation"].select(range(64))
        scored = tasks.get("classification").evaluate(stock, tok, rows, tasks.EvalOptions(label_names=["negative", "positive"]))
        assert scored.outputs == json.loads((tmp_path / "run" / stage / "predictions.json").read_text())["outputs"]
        evs = {(e["model"], e["role"]) for e in m["evaluations"]}
        assert {("unpruned", "reference"), ("pruned", "output")} <= evs and any(r == "baseline" for _, r in evs)
        kept[stage] = json.loads((folder / "pruning.json").read_text())["kept_neurons"]

    # magnitude keeps each layer's neurons of the largest weight norm (data-free)
    w = unpruned.bert.encoder.layer[0]
    norm = (w.intermediate.dense.weight.pow(2).sum(1) + w.intermediate.dense.bias.pow(2) + w.output.dense.weight.pow(2).sum(0))
    assert kept["magnitude"][0] == sorted(torch.topk(norm, len(kept["magnitude"][0])).indices.tolist())
    assert kept["taylor"] != kept["magnitude"]  # gradients on train rows choose otherwise

    # the sweep: one point per level, fewer parameters at the larger level, a candidate evaluation for the other
    m = manifest(tmp_path, "magnitude")
    curve = m["info"]["curve"]
    assert [c["sparsity"] for c in curve["levels"]] == [0.2, 0.4]
    assert curve["unpruned"]["params"] > curve["levels"][0]["params"] > curve["levels"][1]["params"]
    assert "curve_sparsity_0.20_accuracy" in m["metrics"] and "curve_sparsity_0.40_speedup" in m["metrics"]
    assert [e["model"] for e in m["evaluations"] if e["role"] == "candidate"] == ["pruned 20%"]
    # one timing pass: the input model and every level timed in turns; the candidates', the output's and the input
    # model's latencies (evaluations, metrics, curve) all come from it
    lat = {(e["model"], e["split"]): e["latency_ms"] for e in m["evaluations"] if e["role"] != "baseline"}
    assert lat[("pruned 20%", "validation")] == curve["levels"][0]["ms"]
    assert lat[("pruned", "validation")] == lat[("pruned", "test")] == curve["levels"][1]["ms"] == m["metrics"]["pruned_ms"]
    assert lat[("unpruned", "validation")] == curve["unpruned"]["ms"] == m["metrics"]["unpruned_ms"]
    assert m["metrics"]["speedup"] == curve["levels"][1]["speedup"] and "test_accuracy" in m["metrics"]
    # recovery: trained through the Trainer, the accuracy before it kept
    t = manifest(tmp_path, "taylor")["info"]["curve"]["levels"][0]
    assert t["recovery"]["steps"] == 2 and "accuracy_before_recovery" in t


def test_quality_gate_fails_the_stage_keeps_the_outputs_and_stops_publish(write_recipe, tmp_path, classifier):
    """Over max_metric_drop the stage fails with both numbers, its folders stay, publish never runs; levels without
    sparsity output the largest level passing the gate. (400 rows, magnitude: 60 % loses a few rows, 30 % fewer;
    the exact accuracies differ between CPUs, so the gate's figures are read from its message and checked
    against each other and against the curve of the run that passes.)"""
    import re

    cfg = {"model_path": str(classifier), "importance": "magnitude", "levels": [0.3, 0.6], "sparsity": 0.6,
           "max_metric_drop": 0.0, "max_eval_samples": 400, "eval_splits": ["validation"]}
    publish = {"name": "publish", "type": "publish", "inputs": {"model": "prune"}, "config": {"dry_run": True}}
    with pytest.raises(StageFailed, match=r"quality gate: validation accuracy [\d.]+ \(pruned\) against [\d.]+ "
                                          r"\(unpruned\): a drop of [\d.]+, over max_metric_drop 0") as failed:
        runner.run(load_recipe(write_recipe(doc(tmp_path, {"prune": cfg}, [publish]))))
    pruned, unpruned, drop = map(float, re.search(r"accuracy ([\d.]+) \(pruned\) against ([\d.]+) \(unpruned\): "
                                                  r"a drop of ([\d.]+)", str(failed.value)).groups())
    assert drop == pytest.approx(unpruned - pruned) and drop > 0
    assert (tmp_path / "run/prune/levels/sparsity_0.60/model/model.safetensors").exists()  # kept for inspection
    assert not (tmp_path / "run/prune/manifest.json").exists() and not (tmp_path / "run/publish").exists()
    # a gate just under the 60 % level's drop: that level fails it, the 30 % one (which drops less) is the output
    cfg.update(sparsity=None, max_metric_drop=round(drop - 0.001, 4))
    runner.run(load_recipe(write_recipe(doc(tmp_path, {"prune": cfg}, [publish]))))
    m = manifest(tmp_path, "prune")
    curve = {r["sparsity"]: r for r in m["info"]["curve"]["levels"]}
    assert curve[0.6]["drop"] == pytest.approx(drop) and curve[0.6]["accuracy"] == pytest.approx(pruned)
    assert m["info"]["curve"]["unpruned"]["accuracy"] == pytest.approx(unpruned)
    assert curve[0.3]["drop"] < drop, "30 % of the FFN neurons by magnitude should cost fewer rows than 60 %"
    assert m["info"]["chosen"] == 0.3 and m["info"]["quality_gate"]["passed"]
    assert m["outputs"]["model"] == "levels/sparsity_0.30/model"
    assert m["metrics"]["accuracy_delta"] == pytest.approx(-curve[0.3]["drop"])
    assert (tmp_path / "run/publish/repo/model.safetensors").exists()


def test_validate_refuses_what_cannot_be_pruned(write_recipe, tmp_path, classifier):
    from transformers import DistilBertConfig

    from pipelines.cli import main

    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=2,
                     architectures=["DistilBertForSequenceClassification"]).save_pretrained(tmp_path / "distilbert")
    from transformers import MarianConfig

    MarianConfig(d_model=32, encoder_layers=1, decoder_layers=1, vocab_size=100, architectures=["MarianMTModel"]
                 ).save_pretrained(tmp_path / "marian")
    cases = [
        ([{"name": "p", "type": "prune", "data": "d", "config": {"sparsity": 0.3, "drop_layers": 1,
                                                                  "model_path": str(tmp_path / "marian")}}],
         r"drop_layers: model_path .* is a 'marian' encoder-decoder \(two stacks of layers\)"),
        ([{"name": "p", "type": "prune", "data": "d", "config": {"sparsity": 0.3, "model_path": str(tmp_path / "distilbert")}}],
         r"is a 'distilbert' model; this stage prunes the FFN neurons of transformer layers laid out as bert, "),
        ([{"name": "p", "type": "prune", "data": "d", "config": {"sparsity": 0.3, "drop_heads": 1,
                                                                  "model_path": str(classifier)}}],
         r"drop_heads: .* is a 'bert' model; attention heads are pruned in llama, mistral, qwen2, .*head_dim"),
        ([{"name": "p", "type": "prune", "data": "d", "config": {"levels": [0.1, 0.3], "model_path": str(classifier)}}],
         r"levels without sparsity: .* give max_metric_drop"),
        ([{"name": "p", "type": "prune", "data": "d", "config": {"levels": [0.1, 0.3], "sparsity": 0.2,
                                                                  "model_path": str(classifier)}}],
         r"sparsity 0.2 .* is not one of levels \[0.1, 0.3\]"),
        ([{"name": "p", "type": "prune", "data": "d", "config": {"levels": [0.1, 0.3], "sparsity": 0.3,
                                                                  "target_speedup": 1.5, "model_path": str(classifier)}}],
         r"give sparsity .* or target_speedup .*, not both"),
        ([{"name": "p", "type": "prune", "data": "d", "config": {"sparsity": 0.3, "target_speedup": 1.5,
                                                                  "model_path": str(classifier)}}],
         r"target_speedup picks one of several levels: give levels"),
    ]
    for stages, message in cases:
        path = write_recipe({"name": "bad", "output_dir": str(tmp_path / "run"), "data": {"d": CARD}, "stages": stages})
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)
        assert main(["validate", str(path)]) == 2
    assert not (tmp_path / "run").exists()
    # a level FFN neurons alone cannot reach: refused before any data work
    path = write_recipe(doc(tmp_path, {"p": {"model_path": str(classifier), "sparsity": 0.9}}))
    with pytest.raises(StageFailed, match=r"sparsity 0.9 needs 349 of the 256 FFN neurons .* at most 0.66 of this model's"):
        runner.run(load_recipe(path))


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "camembert", "electra", "vit", "llama", "mistral",
                                        "qwen2", "qwen3", "gemma", "gemma2", "granite", "gpt2", "marian", "bart"])
def test_every_supported_architecture_prunes_and_reloads_with_stock_transformers(model_type, tmp_path):
    """Each architecture validate accepts (prune.ARCHITECTURES), as transformers 5.24 lays it out (ViT: layers[i].mlp;
    Llama-style: mlp.gate_proj / up_proj / down_proj; GPT-2: Conv1D mlp.c_fc / c_proj): FFN neurons, and where the
    config has head_dim whole key/value groups of heads, removed; the folder reloads with the in-memory logits, and a
    decoder generates (its layers' KV-cache slots renumbered after a layer is dropped). Marian / BART: FFN neurons of
    both stacks (no layer dropped: drop_layers is refused for two stacks)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification,
                              AutoModelForSeq2SeqLM, AutoModelForSequenceClassification)

    from pipelines import modelio
    from pipelines.errors import PipelinesError
    from pipelines.stages import prune

    image, decoder = model_type == "vit", model_type in (*prune.HEAD_ARCHITECTURES, "gpt2", "marian", "bart")
    seq2seq = model_type in ("marian", "bart")
    if seq2seq:
        cfg = AutoConfig.for_model(model_type, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                                   max_position_embeddings=64, pad_token_id=0, decoder_start_token_id=0)
    elif model_type == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=3, n_head=2, vocab_size=100, n_positions=64)
    else:
        extra = dict(image_size=32, patch_size=8) if image else dict(vocab_size=100, max_position_embeddings=64)
        extra.update(num_key_value_heads=2, head_dim=8) if decoder else extra.update(num_labels=2)
        cfg = AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=64, **extra)
    cls = (AutoModelForImageClassification if image else AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
           if decoder else AutoModelForSequenceClassification)
    torch.manual_seed(0)
    model = cls.from_config(cfg).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)} if image else {"input_ids": torch.randint(5, 100, (2, 12))}
    if seq2seq:
        x["decoder_input_ids"] = torch.randint(5, 100, (2, 7))
    heads = 2 if model_type in prune.HEAD_ARCHITECTURES else 0  # one of the two key/value groups (2 query heads each)
    before = modelio.num_parameters(model)
    per_neuron, per_group = prune.neuron_parameters(model), prune.group_parameters(model) if heads else 0
    drop = [] if seq2seq else [1]
    if seq2seq:
        with pytest.raises(PipelinesError, match=r"drop_layers: .* has 2 stacks of layers"):
            prune.neurons_to_remove(model, 0.6, 1)
    per_layer = 0 if seq2seq else prune.layer_parameters(model) // 3
    removed = prune.neurons_to_remove(model, 0.3 if seq2seq else 0.6, len(drop), heads)
    batch = ({"input_ids": x["input_ids"], "labels": x["decoder_input_ids"]} if seq2seq else
             dict(x, labels=x["input_ids"]) if decoder else dict(x, labels=torch.tensor([0, 1])))
    scores = prune.importance(model, "taylor", [batch], heads=bool(heads))
    prune.remove_layers(model, drop)
    if heads:
        prune.prune_heads(model, [scores.heads[0], scores.heads[2]], heads)
    prune.prune_ffn(model, [s for i, s in enumerate(scores.ffn) if i not in drop], removed)
    model.save_pretrained(tmp_path)
    stock = cls.from_pretrained(tmp_path).eval()
    saved = json.loads((tmp_path / "config.json").read_text())
    if seq2seq:
        assert saved["encoder_ffn_dim"] == saved["decoder_ffn_dim"] == 64 - removed
    else:
        width = saved["n_inner" if model_type == "gpt2" else "intermediate_size"]
        assert width == (128 if model_type == "gpt2" else 64) - removed and stock.config.num_hidden_layers == 2
    layers_left = 3 if seq2seq else 2  # 2 encoder + 1 decoder layers; or 2 of 3 layers
    assert modelio.num_parameters(stock) == before - per_layer - layers_left * (removed * per_neuron + per_group)
    if heads:
        assert (stock.config.num_attention_heads, stock.config.num_key_value_heads, stock.config.head_dim) == (2, 1, 8)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, stock(**x).logits)
        if decoder:
            assert torch.equal(model.generate(input_ids=x["input_ids"], max_new_tokens=3, do_sample=False),
                               stock.generate(input_ids=x["input_ids"], max_new_tokens=3, do_sample=False))


@pytest.fixture(scope="module")
def shakespeare_llama(tmp_path_factory):
    """An untrained 3-layer Llama, 64 wide, 4 query heads in 2 key/value groups, FFN 128."""
    from tests.tiny_models import shakespeare_llama

    return shakespeare_llama(tmp_path_factory.mktemp("llama"))


def test_a_llama_decoder_loses_heads_neurons_and_a_layer_reloads_and_generates(write_recipe, tmp_path, shakespeare_llama):
    """causal-lm: a key/value group of heads, FFN neurons and the layer whose skipping costs least go (Taylor
    importance, a sweep of two levels, recovery); the saved folder is a stock Llama (config.json: 2 query heads,
    1 key/value head, head_dim 16) with the in-memory logits, scored by perplexity beside the input model and the
    unigram baseline, and it generates."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines import modelio
    from pipelines.stages import prune

    card = str(ROOT / "data_cards/tinyshakespeare_sample.yaml")
    config = {"model_path": str(shakespeare_llama), "levels": [0.5, 0.6], "sparsity": 0.5, "drop_heads": 2, "drop_layers": 1,
              "importance": "taylor", "importance_batches": 2, "importance_batch_size": 8, "max_length": 64,
              "max_eval_samples": 16, "eval_splits": ["validation"], "latency_batch_size": 4, "latency_repeats": 1,
              "recover": {"max_train_samples": 16, "train": {"max_steps": 1, "batch_size": 8, "precision": "bf16"}}}
    runner.run(load_recipe(write_recipe({"name": "p", "output_dir": str(tmp_path / "run"), "data": {"d": card},
                                         "stages": [{"name": "p", "type": "prune", "data": "d", "config": config}]})))
    m = manifest(tmp_path, "p")
    folder = tmp_path / "run/p" / m["outputs"]["model"]
    assert m["task"] == "causal-lm" and m["outputs"]["model"] == "levels/sparsity_0.50/model"
    unpruned = AutoModelForCausalLM.from_pretrained(shakespeare_llama)
    removed = prune.neurons_to_remove(unpruned, 0.5, 1, 2)
    saved = json.loads((folder / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"],
            saved["intermediate_size"]) == (2, 2, 1, 16, 128 - removed)
    weights = load_file(folder / "model.safetensors")  # sliced, not masked
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (32, 64)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (16, 64)
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (64, 32)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (64, 128 - removed)
    record = json.loads((folder / "pruning.json").read_text())
    assert record["method"] == "ffn_neurons + heads + layers" and len(record["kept_kv_groups"]) == 2
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()  # no pipelines code
    assert m["metrics"]["params"] == modelio.num_parameters(stock) < modelio.num_parameters(unpruned)
    assert abs(m["metrics"]["encoder_sparsity"] - 0.5) < 0.02
    assert [c["reload_max_abs_logit_diff"] for c in m["info"]["curve"]["levels"]] == [0.0, 0.0]
    assert m["info"]["curve"]["levels"][0]["num_attention_heads"] == 2
    evs = {(e["model"], e["role"]): e["metrics"] for e in m["evaluations"]}
    assert {"perplexity" in evs[k] for k in (("unpruned", "reference"), ("pruned", "output"))} == {True}
    assert any(r == "baseline" for _, r in evs) and {"perplexity", "unpruned_perplexity"} <= set(m["metrics"])
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(["To be or not"], return_tensors="pt")
    with torch.no_grad():
        out = stock.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # heads cannot go where whole key/value groups do not: refused before any data work
    bad = {**config, "drop_heads": 1, "recover": None}
    with pytest.raises(StageFailed, match=r"drop_heads 1: .* 4 query heads in 2 key/value groups of 2; whole groups go"):
        runner.run(load_recipe(write_recipe({"name": "q", "output_dir": str(tmp_path / "run2"), "data": {"d": card},
                                             "stages": [{"name": "p", "type": "prune", "data": "d", "config": bad}]})))


def test_a_pruned_model_goes_on_to_distill_and_quantize(write_recipe, tmp_path, classifier):
    """prune -> distill (the pruned model as teacher, one of its layers copied into the student) and -> quantize:
    downstream stages read the stock folder, its intermediate_size included."""
    small = {"max_eval_samples": 32, "eval_splits": ["validation"], "latency_repeats": 1}
    d = doc(tmp_path, {"prune": {"model_path": str(classifier), "sparsity": 0.3, "importance": "magnitude", **small}}, [
        {"name": "distill", "type": "distill", "data": "d", "inputs": {"teacher": "prune"},
         "config": {"student": {"from_teacher_layers": [1]}, "max_train_samples": 16,
                    "train": {"max_steps": 1, "batch_size": 8}, **small}},
        {"name": "quantize", "type": "quantize", "data": "d", "inputs": {"model": "prune"}, "config": small}])
    runner.run(load_recipe(write_recipe(d)))
    pruned = manifest(tmp_path, "prune")["metrics"]["params"]
    kd, q = manifest(tmp_path, "distill"), manifest(tmp_path, "quantize")
    assert kd["metrics"]["teacher_params"] == pruned > kd["metrics"]["student_params"]
    student = json.loads((tmp_path / "run/distill/model/config.json").read_text())
    assert student["intermediate_size"] == json.loads((tmp_path / "run/prune/levels/sparsity_0.30/model/config.json").read_text())["intermediate_size"] < 256
    assert q["metrics"]["params"] == pruned and q["metrics"]["size_ratio"] > 1


def test_drop_layers_removes_the_layer_whose_skipping_costs_least(write_recipe, tmp_path, classifier):
    from transformers import AutoModelForSequenceClassification

    from pipelines import modelio

    cfg = {"model_path": str(classifier), "importance": "magnitude", "sparsity": 0.6, "drop_layers": 1,
           "importance_batches": 2, "max_eval_samples": 32, "eval_splits": ["validation"]}
    runner.run(load_recipe(write_recipe(doc(tmp_path, {"p": cfg}))))
    m = manifest(tmp_path, "p")
    rises, level = m["info"]["layer_importance"], m["info"]["curve"]["levels"][0]
    assert len(rises) == 2 and level["dropped_layers"] == [min(range(2), key=lambda i: rises[i])]
    folder = tmp_path / "run/p" / m["outputs"]["model"]
    stock = AutoModelForSequenceClassification.from_pretrained(folder)
    unpruned = AutoModelForSequenceClassification.from_pretrained(classifier)
    enc0 = modelio.num_parameters(unpruned.bert.encoder)
    # one of two layers (half the encoder) + 0.1 of it in FFN neurons of the layer left
    removed = round((0.6 * enc0 - enc0 / 2) / 129)
    assert stock.config.num_hidden_layers == 1 and stock.config.intermediate_size == 256 - removed
    assert abs(m["metrics"]["encoder_sparsity"] - 0.6) < 0.01 and level["reload_max_abs_logit_diff"] == 0.0
    kept = level["dropped_layers"][0] ^ 1  # the layer left is the teacher's other layer, its attention untouched
    assert torch.equal(stock.bert.encoder.layer[0].attention.self.query.weight,
                       unpruned.bert.encoder.layer[kept].attention.self.query.weight)
    cfg.update(sparsity=0.3)  # half the encoder in one layer: more than 0.3
    with pytest.raises(StageFailed, match=r"drop_layers 1 alone removes 0.50 of the layers' parameters, more than sparsity 0.3: drop fewer layers or prune more"):
        runner.run(load_recipe(write_recipe(doc(tmp_path, {"p": cfg}))))


def test_target_speedup_picks_the_smallest_level_fast_enough_and_fails_when_none_is(write_recipe, tmp_path, classifier):
    from pipelines import tasks
    from pipelines.errors import PipelinesError
    from pipelines.stages.prune import PruneConfig, choose

    levels = [{"sparsity": x, "metrics": {"accuracy": 0.6}} for x in (0.2, 0.4, 0.6)]
    curve = {"levels": [{"sparsity": 0.2, "speedup": 1.1}, {"sparsity": 0.4, "speedup": 1.6}, {"sparsity": 0.6, "speedup": 2.2}]}
    task = tasks.get("classification")
    pick = lambda target: choose(PruneConfig(levels=[0.2, 0.4, 0.6], target_speedup=target), task, levels,  # noqa: E731
                                 {"accuracy": 0.6}, "validation", curve)["sparsity"]
    assert pick(1.5) == 0.4 and pick(1.05) == 0.2 and pick(2.2) == 0.6
    with pytest.raises(PipelinesError, match=r"target_speedup 3.0x: no level reaches it .* 20%: 1.10x, 40%: 1.60x, 60%: 2.20x"):
        pick(3.0)
    # through the runner: the curve's own timing decides; a target no level reaches fails the stage, saying what was measured
    path = write_recipe(doc(tmp_path, {"p": {"model_path": str(classifier), "levels": [0.2, 0.5], "target_speedup": 100,
                                             "max_eval_samples": 32, "eval_splits": ["validation"]}}))
    with pytest.raises(StageFailed, match=r"target_speedup 100.0x: no level reaches it \(batch of 32, measured 20%: [\d.]+x, "
                                          r"50%: [\d.]+x\)"):
        runner.run(load_recipe(path))
    assert (tmp_path / "run/p").is_dir() and not (tmp_path / "run/p/manifest.json").exists()
