"""The export stage on a tiny BERT sentiment classifier: ONNX, ONNX Runtime int8 (dynamic, static), OpenVINO fp32 /
int8 through the real runner, every folder re-scored in a fresh process beside the torch model, reloaded here by
`pipelines.runtimes.load` predicting what the stage recorded, and served by `pipelines serve`; the quality gate;
generative models (causal LM, chat, translation, summarisation; six architecture families) as graphs over a KV
cache (transformers.exporters) that generate() drives; formats they are not written as refused at validate."""

import json
import os

import pytest
import torch

from pipelines import runner, runtimes, tasks
from pipelines.errors import RecipeError, StageFailed
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.tiny_models import sst2_classifier

CARD = str(ROOT / "data_cards/sst2_sample.yaml")
FORMATS = ["onnx", "onnx_int8_dynamic", "onnx_int8_static", "openvino", "openvino_int8", "openvino_int8_static"]
SMALL = {"max_eval_samples": 64, "eval_splits": ["validation"], "latency_repeats": 1, "latency_batch_size": 8}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 2-layer, 64-wide BERT sentiment classifier (MiniLM tokenizer), trained a few steps on SST-2 rows (so few that
    it says `positive` to nearly everything: its logits, not its labels, are what the fp32 graphs are checked on)."""
    return sst2_classifier(tmp_path_factory.mktemp("classifier"), hidden=64, layers=2, intermediate=128, rows=320)


def recipe(write_recipe, tmp_path, stages: list[dict]):
    return write_recipe({"name": "x", "output_dir": str(tmp_path / "run"), "data": {"d": CARD}, "stages": stages})


def export_stage(model_path, **config):
    return {"name": "export", "type": "export", "data": "d", "config": {"model_path": str(model_path), **SMALL, **config}}


def test_classifier_exports_rescored_in_a_fresh_process_reloaded_and_served(write_recipe, tmp_path, classifier):
    from fastapi.testclient import TestClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.data import load_card
    from pipelines.serve import ServedModel, ServeSettings, create_app

    runner.run(load_recipe(recipe(write_recipe, tmp_path, [export_stage(classifier, formats=FORMATS, calibration_samples=32,
                                                                        max_metric_drop=0.25)])))
    stage = tmp_path / "run/export"
    m = json.loads((stage / "manifest.json").read_text())
    met, info = m["metrics"], m["info"]
    assert m["outputs"] == {"model": "onnx", **{f: f for f in FORMATS}} and m["task"] == "classification"
    # scored in another interpreter, each folder with its own runtime
    assert info["rescore_pid"] != os.getpid()
    assert info["runtimes"] == {"onnx": "onnxruntime", "onnx_int8_dynamic": "onnxruntime", "onnx_int8_static": "onnxruntime",
                                "openvino": "openvino", "openvino_int8": "openvino", "openvino_int8_static": "openvino",
                                "torch": "torch"}
    # side by side with the torch model: the same metrics, size on disk, latency; beside the task's baselines
    evs = {e["model"]: e for e in m["evaluations"] if e["split"] == "validation"}
    assert evs["torch"]["role"] == "reference" and all(evs[f]["role"] == "output" for f in FORMATS)
    assert {"majority", "tfidf_logreg"} <= set(evs)
    for f in FORMATS + ["torch"]:
        assert evs[f]["size_mb"] > 0 and evs[f]["latency_ms"] > 0 and evs[f]["params"] == met["params"], f
        assert set(evs[f]["metrics"]) == set(evs["torch"]["metrics"]), f
    # fp32 graphs predict what torch predicts; int8 ones lose little and are ~4x smaller (static ONNX Runtime int8
    # quantizes the matrix products only: this model is mostly its fp32 embedding matrix)
    predictions = json.loads((stage / "predictions.json").read_text())["outputs"]
    assert predictions["onnx"] == predictions["openvino"] == predictions["torch"]
    assert met["accuracy"] == met["torch_accuracy"] and met["openvino_accuracy"] == met["torch_accuracy"]
    for f in ("onnx_int8_dynamic", "onnx_int8_static", "openvino_int8", "openvino_int8_static"):
        assert abs(met[f"{f}_accuracy_delta"]) <= 0.25 and met[f"{f}_size_ratio"] > (1.0 if f == "onnx_int8_static" else 3), f
        assert met[f"{f}_accuracy_delta"] == pytest.approx(met[f"{f}_accuracy"] - met["torch_accuracy"], abs=1e-6)
    gate = info["quality_gate"]
    assert gate["passed"] and set(gate["per_format"]) == set(FORMATS)
    assert info["formats"]["onnx_int8_static"]["calibration_rows"] == info["formats"]["openvino_int8_static"]["calibration_rows"] == 32

    # reloaded in this process by the one documented call: the fp32 graphs give the torch logits (another batch size
    # and length than the export's sample), every folder predicts what the stage measured in its fresh process
    task = tasks.get("classification")
    tok = AutoTokenizer.from_pretrained(classifier)
    torch_model = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    rows = load_card(CARD).load(seed=42)["validation"].select(range(64))
    batch = dict(tok(rows["text"][:7], padding=True, return_tensors="pt"))
    with torch.inference_mode():
        ref_logits = torch_model(**batch).logits
    for f in FORMATS:
        model = runtimes.load(stage / f)
        if f in ("onnx", "openvino"):
            torch.testing.assert_close(model(**batch).logits, ref_logits, atol=1e-5, rtol=1e-4)
        scored = task.evaluate(model, AutoTokenizer.from_pretrained(stage / f), rows,
                               tasks.EvalOptions(label_names=["negative", "positive"]))
        assert scored.outputs == predictions[f], f
        assert model.config.id2label == {0: "negative", 1: "positive"}

    # served with its runtime: the stage folder (its `model` output, ONNX) and the OpenVINO int8 folder
    texts = ["a gorgeous, witty film", "dull and far too long"]
    with torch.inference_mode():
        ref = torch_model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    from pipelines.serve import resolve_model_dir

    for folder in (resolve_model_dir(stage)[0], stage / "openvino_int8"):
        served = ServedModel(folder)
        client = TestClient(create_app(served, ServeSettings(batching=False)))
        got = client.post("/predict", json={"text": texts})
        assert got.status_code == 200, got.text
        answers = got.json()["predictions"]
        assert all(a["label"] in ("negative", "positive") and set(a["scores"]) == {"negative", "positive"} for a in answers)
        if folder.name == "onnx":  # fp32 ONNX Runtime: the torch model's labels and probabilities
            assert [a["label"] for a in answers] == [["negative", "positive"][i] for i in ref.argmax(-1).tolist()]
            assert [a["scores"]["positive"] for a in answers] == pytest.approx(ref[:, 1].tolist(), abs=1e-5)
        assert client.get("/health").json()["quantize"] == folder.name


def test_quality_gate_fails_the_stage_keeps_its_outputs_and_stops_the_chain(write_recipe, tmp_path, classifier):
    """A classifier made fragile to per-tensor int8 weights, with fp32 predictions unchanged: one pooler feature is
    always 0 (tanh(0)) and carries a classifier weight of 1e4, so the int8 scale (1e4 / 127) rounds every other
    classifier weight to 0; int8 logits are then the bias alone, which says `negative` to every text, while fp32
    says what the classifier says (`positive` to most texts, as most of these validation rows are)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    with torch.no_grad():
        model.bert.pooler.dense.weight[0] = 0
        model.bert.pooler.dense.bias[0] = 0
        model.classifier.weight[0, 0] = 1e4
        model.classifier.bias[:] = torch.tensor([1e-3, 0.0])
    model.save_pretrained(tmp_path / "fragile")
    AutoTokenizer.from_pretrained(classifier).save_pretrained(tmp_path / "fragile")
    stages = [export_stage(tmp_path / "fragile", formats=["onnx_int8_dynamic"], per_channel=False, max_metric_drop=0.0),
              {"name": "publish", "type": "publish", "inputs": {"model": "export"}, "config": {"dry_run": True}}]
    with pytest.raises(StageFailed, match=r"quality gate: validation accuracy [0-9.]+ \(onnx_int8_dynamic\) against "
                                          r"[0-9.]+ \(torch\): a drop of [0-9.]+, over max_metric_drop 0"):
        runner.run(load_recipe(recipe(write_recipe, tmp_path, stages)))
    assert (tmp_path / "run/export/onnx_int8_dynamic/model.onnx").exists()  # kept for inspection
    assert not (tmp_path / "run/export/manifest.json").exists() and not (tmp_path / "run/publish").exists()


def test_causal_lm_exports_a_decode_graph_that_generate_drives_scored_served_and_published(write_recipe, tmp_path):
    """A tiny GQA Llama: one ONNX graph (fp32 and ONNX Runtime int8) over a DynamicCache, re-scored in a fresh process
    (perplexity the torch model's to the digit; int8 within 1 %); reloaded here it is a model transformers' generate()
    drives, giving the torch model's tokens for left-padded prompts of three lengths: greedy, beam search and seeded
    sampling; served with the OpenAI routes (the openai client, streamed and batched), refused for continuous
    batching; published with transformers' manifest, and the repo folder generates the same text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.continuous import check_supported
    from pipelines.errors import PipelinesError
    from pipelines.runtimes_lm import RuntimeCausalLM
    from pipelines.serve import ServedModel
    from tests.test_serve import Served
    from tests.tiny_models import shakespeare_llama

    src = shakespeare_llama(tmp_path / "llama", hidden=64, layers=2)
    stages = [{"name": "export", "type": "export", "data": "lm", "config": {
                  "model_path": str(src), "formats": ["onnx", "onnx_int8_dynamic", "openvino", "openvino_int8"],
                  "max_length": 64, **SMALL,
                  "max_eval_samples": 16, "max_metric_drop": 5.0}},
              {"name": "publish", "type": "publish", "inputs": {"model": "export"},
               "config": {"dry_run": True, "repo_id": "someone/llama-onnx", "license": "apache-2.0"}}]
    runner.run(load_recipe(write_recipe({"name": "x", "output_dir": str(tmp_path / "run"), "stages": stages,
                                         "data": {"lm": str(ROOT / "data_cards/tinyshakespeare_sample.yaml")}})))
    stage = tmp_path / "run/export"
    m = json.loads((stage / "manifest.json").read_text())
    met, info = m["metrics"], m["info"]
    assert m["task"] == "causal-lm" and info["runtimes"] == {
        "onnx": "onnxruntime", "onnx_int8_dynamic": "onnxruntime", "openvino": "openvino", "openvino_int8": "openvino",
        "torch": "torch"}
    assert met["perplexity"] == met["torch_perplexity"] and met["eval_tokens"] == met["torch_eval_tokens"] > 0
    assert met["openvino_perplexity"] == pytest.approx(met["torch_perplexity"], rel=1e-5)  # f32 inference precision
    for f in ("onnx_int8_dynamic", "openvino_int8"):
        assert abs(met[f"{f}_perplexity"] / met["torch_perplexity"] - 1) < 0.01 and met[f"{f}_mb"] < met["mb"], f
    assert info["quality_gate"]["passed"]
    recorded = runtimes.read_export(stage / "onnx")
    assert recorded["graph"] == "decode" and recorded["inputs"] == {"model": ["input_ids", "attention_mask", "position_ids", "cache"]}
    assert {"model.onnx", "model.onnx.data", "export.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in (stage / "onnx_int8_dynamic").iterdir()}

    tok = AutoTokenizer.from_pretrained(src, padding_side="left")
    torch_model = AutoModelForCausalLM.from_pretrained(src).eval()
    prompts = ["Now is the winter", "To be, or not to be, that is the", "O"]
    enc = tok(prompts, padding=True, return_tensors="pt")
    onnx = runtimes.load(stage / "onnx")
    assert isinstance(onnx, RuntimeCausalLM) and onnx.parameter_count() == met["params"]
    for how in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}, {"do_sample": True, "top_p": 0.9}):
        torch.manual_seed(3)
        want = torch_model.generate(**enc, max_new_tokens=10, min_new_tokens=10, pad_token_id=tok.pad_token_id, **how)
        torch.manual_seed(3)
        got = onnx.generate(**enc, max_new_tokens=10, min_new_tokens=10, pad_token_id=tok.pad_token_id, **how)
        assert torch.equal(got, want), how
    openvino = runtimes.load(stage / "openvino")  # stateful: the cache stays inside the compiled model
    assert openvino.stateful and runtimes.read_export(stage / "openvino")["stateful"]
    for how in ({"do_sample": False, "num_beams": 2}, {"do_sample": False}, {"do_sample": True, "top_p": 0.9}):
        torch.manual_seed(3)  # one model, generation after generation: each starts from a reset state
        want = torch_model.generate(**enc, max_new_tokens=10, min_new_tokens=10, pad_token_id=tok.pad_token_id, **how)
        torch.manual_seed(3)
        got = openvino.generate(**enc, max_new_tokens=10, min_new_tokens=10, pad_token_id=tok.pad_token_id, **how)
        assert torch.equal(got, want), how
    first = openvino(**tok(prompts[:1], return_tensors="pt"))  # a cache the request holds, then another sequence's
    openvino(**tok(prompts[1:2], return_tensors="pt"))
    with pytest.raises(RuntimeError, match="has run another sequence since this cache was made"):
        openvino(input_ids=torch.tensor([[5]]), cache=first.cache)
    for f in ("onnx_int8_dynamic", "openvino_int8"):
        int8 = runtimes.load(stage / f).generate(**enc, max_new_tokens=10, pad_token_id=tok.pad_token_id)
        assert int8.shape[0] == 3 and int8.shape[1] > enc["input_ids"].shape[1], f

    # served: the OpenAI routes through the openai client; continuous batching needs a torch model
    openai = pytest.importorskip("openai")
    s = Served(stage / "onnx", max_wait_ms=20)
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        greedy = torch_model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        want = [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in greedy]
        model_id = c.models.list().data[0].id
        batch = c.completions.create(model=model_id, prompt=prompts, max_tokens=6, temperature=0)
        assert [ch.text for ch in batch.choices] == want
        streamed = c.completions.create(model=model_id, prompt=prompts[1], max_tokens=6, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in streamed) == want[1]
    finally:
        s.close()
    with pytest.raises(PipelinesError, match="not a transformers model"):
        check_supported(ServedModel(stage / "onnx"))

    # published: transformers' manifest kept, no local path in it; the repo folder loads and generates the same
    repo = tmp_path / "run/publish/repo"
    published = json.loads((repo / "export.json").read_text())
    assert "components" in published and published["pipelines"]["graph"] == "decode" and "source" not in published["pipelines"]
    assert {"model.onnx", "model.onnx.data"} <= {p.name for p in repo.iterdir()}
    assert "ExportedModel.from_pretrained(folder)" in (repo / "README.md").read_text()
    assert torch.equal(runtimes.load(repo).generate(**enc, max_new_tokens=6, do_sample=False,
                                                    pad_token_id=tok.pad_token_id), greedy)


def test_formats_a_generative_model_is_not_written_as_are_refused_at_validate(write_recipe, tmp_path, classifier):
    from pipelines.cli import main

    # graphs over a KV cache: ONNX Runtime's formats without calibration
    for task in ("causal-lm", "chat", "translation", "summarization"):
        stages = [{"name": "ft", "type": "finetune", "data": "d", "config": {"task": task, "base_model": "x"}},
                  {"name": "export", "type": "export", "data": "d", "inputs": {"model": "ft"},
                   "config": {"formats": ["onnx", "openvino_int8_static", "onnx_int8_static"]}}]
        with pytest.raises(RecipeError, match=rf"formats \['openvino_int8_static', 'onnx_int8_static'\]: a {task} model is "
                                              r"exported as graphs over a KV cache, written as \['onnx', 'onnx_int8_dynamic', "
                                              r"'openvino', 'openvino_int8'\] only"):
            load_recipe(recipe(write_recipe, tmp_path, stages))
        assert main(["validate", str(recipe(write_recipe, tmp_path, stages))]) == 2
    assert not (tmp_path / "run").exists()  # nothing ran
    with pytest.raises(RecipeError, match=r"serve: 'openvino' is not one of formats \['onnx'\]"):
        load_recipe(recipe(write_recipe, tmp_path, [export_stage(classifier, serve="openvino")]))


# a tiny randomly initialised model of the task with its processor, saved to a folder
def _tiny_image_classifier(out, names):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=len(names),
                                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
                              ).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


def _tiny_bert(kind):
    """A 1-layer, 32-wide BERT with the MiniLM WordPiece tokenizer and a head of `kind` for the card's labels."""
    def make(out, names):
        import transformers

        from tests.tiny_models import minilm_dir

        torch.manual_seed(0)
        extra = {"problem_type": "multi_label_classification"} if kind == "multi" else {}
        cls = transformers.BertForTokenClassification if kind == "tokens" else transformers.BertForSequenceClassification
        cls(transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=128, num_labels=len(names),
                                    id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, **extra)
            ).save_pretrained(out)
        transformers.AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
        return out
    return make


@pytest.mark.parametrize("card_file, make", [
    ("fashion_mnist_sample.yaml", _tiny_image_classifier),   # pixels in
    ("wnut17_sample.yaml", _tiny_bert("tokens")),            # ids with a dynamic sequence in, per-token logits out
    ("wnut17_entity_types_sample.yaml", _tiny_bert("multi")),  # one sigmoid per label
], ids=["image-classification", "token-classification", "multi-label-classification"])
def test_other_tasks_round_trip_through_onnx_runtime_and_openvino(tmp_path, card_file, make):
    """The graph a task's own batches export to, reloaded by `pipelines.runtimes.load`: the torch model's logits
    on another batch (another batch size, another sequence length), so the task's evaluate scores them the same."""
    from pipelines import modelio
    from pipelines.data import load_card
    from pipelines.stages.export import GRAPH, export_onnx, to_openvino, write_folder

    card = load_card(ROOT / "data_cards" / card_file)
    src = make(tmp_path / "src", card.label_names)
    model, task = modelio.load_model(src)
    processor = modelio.load_processor(task, src)
    dsd = card.load(seed=0)
    opts = tasks.EvalOptions(label_names=list(model.config.id2label.values()))
    rows = dsd["validation"].select(range(12))
    inputs = export_onnx(model, task, dict(modelio.latency_batch(task, processor, model, rows, opts, 2)),
                         tmp_path / "onnx" / GRAPH["onnxruntime"], opset=18)
    write_folder(tmp_path / "onnx", "onnx", src, processor, inputs, ["logits"], modelio.num_parameters(model), {})
    to_openvino(tmp_path / "onnx/model.onnx", tmp_path / "openvino" / GRAPH["openvino"], None)
    write_folder(tmp_path / "openvino", "openvino", src, processor, inputs, ["logits"], modelio.num_parameters(model), {})
    batch = dict(modelio.latency_batch(task, processor, model, rows.select(range(2, 12)), opts, 10))
    with torch.inference_mode():
        ref = model(**batch).logits
    want = task.evaluate(model, processor, rows, opts)
    for f in ("onnx", "openvino"):
        exported = runtimes.load(tmp_path / f)
        torch.testing.assert_close(exported(**batch).logits, ref, atol=1e-4, rtol=1e-4)
        got = task.evaluate(exported, processor, rows, opts)
        assert got.outputs == want.outputs and got.metrics == pytest.approx(want.metrics, abs=1e-6), f


def test_an_exported_folder_is_published_with_its_graph_and_its_own_scores(write_recipe, tmp_path, classifier):
    """publish after export: the served format's folder (here OpenVINO int8: the .xml graph and its .bin weights,
    which are not a pickle) with a card naming its runtime; the model-index holds that format's scores only, not
    the other format's (ONNX, written by the same stage); the repo folder reloads and predicts what the stage did."""
    from transformers import AutoTokenizer

    from pipelines.data import load_card
    from tests.stages.test_publish import header

    stages = [export_stage(classifier, formats=["onnx", "openvino_int8"], serve="openvino_int8"),
              {"name": "publish", "type": "publish", "inputs": {"model": "export"},
               "config": {"dry_run": True, "repo_id": "someone/sst2-ov-int8", "license": "apache-2.0"}}]
    runner.run(load_recipe(recipe(write_recipe, tmp_path, stages)))
    repo = tmp_path / "run/publish/repo"
    files = {p.name for p in repo.iterdir()}
    assert {"openvino_model.xml", "openvino_model.bin", "export.json", "config.json", "tokenizer.json", "README.md",
            "recipe.yaml", "pipelines_lineage.json"} <= files
    assert not files & {"model.onnx", "model.safetensors"}
    published = json.loads((repo / "export.json").read_text())
    assert published["file"] == "openvino_model.xml" and "source" not in published  # no local path on the Hub
    meta = header(repo / "README.md")
    assert meta["library_name"] == "openvino" and {"openvino", "int8", "quantized"} <= set(meta["tags"])
    export_manifest = json.loads((tmp_path / "run/export/manifest.json").read_text())
    scored = [e for e in export_manifest["evaluations"] if e["role"] == "output"]
    assert {e["model"] for e in scored} == {"onnx", "openvino_int8"}
    results = meta["model-index"][0]["results"]
    want = next(e for e in scored if e["model"] == "openvino_int8")["metrics"]
    assert sorted((m["type"], m["value"]) for r in results for m in r["metrics"]) == sorted(want.items())
    text = (repo / "README.md").read_text()
    assert 'compile_model(f"{folder}/openvino_model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"})' in text and "runtimes.load(folder)" in text
    assert f"{export_manifest['metrics']['params']:,}" in text
    # the repo as downloaded: loads with its runtime and predicts what the stage measured
    rows = load_card(CARD).load(seed=42)["validation"].select(range(64))
    scored_here = tasks.get("classification").evaluate(runtimes.load(repo), AutoTokenizer.from_pretrained(repo), rows,
                                                       tasks.EvalOptions(label_names=["negative", "positive"]))
    predicted = json.loads((tmp_path / "run/export/predictions.json").read_text())["outputs"]["openvino_int8"]
    assert scored_here.outputs == predicted


def test_a_chat_model_exports_as_the_causal_lm_decode_graph(write_recipe, tmp_path):
    """The chat task shares the causal-LM graph: scored in a fresh process (its perplexity over the assistant turns is
    the torch model's), and a conversation through the chat template generates the torch model's tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_models import chat_llama

    src = chat_llama(tmp_path / "chat")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "pipelines_task": "chat"}))  # as finetune marks a chat model
    stage = {"name": "export", "type": "export", "data": "c", "config": {
        "model_path": str(src), "formats": ["onnx"], "max_length": 256, **SMALL, "max_eval_samples": 8}}
    runner.run(load_recipe(write_recipe({"name": "x", "output_dir": str(tmp_path / "run"), "stages": [stage],
                                         "data": {"c": str(ROOT / "data_cards/sst2_chat_sample.yaml")}})))
    m = json.loads((tmp_path / "run/export/manifest.json").read_text())
    assert m["task"] == "chat" and m["metrics"]["perplexity"] == m["metrics"]["torch_perplexity"]
    tok = AutoTokenizer.from_pretrained(src)
    enc = tok.apply_chat_template([{"role": "user", "content": "a gorgeous, witty film"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    want = AutoModelForCausalLM.from_pretrained(src).eval().generate(**enc, max_new_tokens=8, do_sample=False,
                                                                     pad_token_id=tok.pad_token_id)
    got = runtimes.load(tmp_path / "run/export/onnx").generate(**enc, max_new_tokens=8, do_sample=False,
                                                               pad_token_id=tok.pad_token_id)
    assert torch.equal(got, want)


@pytest.mark.parametrize("task, card", [("translation", "multi30k_sample"), ("summarization", "aclsum_sample")])
def test_an_encoder_decoder_exports_encoder_prefill_and_decode_graphs_that_generate_drives(write_recipe, tmp_path,
                                                                                            task, card):
    """A tiny Marian as three graphs (encoder; decoder prefill, which fills the cross-attention cache; decoder step),
    fp32 and int8, re-scored in a fresh process with the task's metrics (fp32: the torch model's to the digit);
    reloaded, a teacher-forced pass gives the torch logits and generate() the torch tokens for a right-padded batch
    (greedy, beam search, seeded sampling); served, the task's endpoint answers what the torch model says."""
    from fastapi.testclient import TestClient
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pipelines.data import load_card
    from pipelines.runtimes_lm import RuntimeSeq2SeqLM
    from pipelines.serve import ServedModel, ServeSettings, create_app
    from tests.tiny_models import tiny_marian

    train = load_card(ROOT / f"data_cards/{card}.yaml").load(seed=0)["train"]
    src = tiny_marian(tmp_path / "marian", list(train["source"]) + list(train["target"]))
    config = json.loads((src / "config.json").read_text())  # the task's mark, as its finetune saves it
    (src / "config.json").write_text(json.dumps({**config, "task_specific_params": {tasks.get(task).task_params_key: {}}}))
    from transformers import GenerationConfig

    generation = GenerationConfig.from_pretrained(src)  # beam search, as the task's finetune saves it: the steps
    generation.num_beams = 4  # are still captured greedily (at batch x beams they would not match the prompts)
    generation.save_pretrained(src)
    stage = {"name": "export", "type": "export", "data": "d", "config": {
        "model_path": str(src), "formats": ["onnx", "onnx_int8_dynamic"] + (["openvino", "openvino_int8"]
                                                                            if task == "translation" else []),
        **SMALL, "max_eval_samples": 8}}
    runner.run(load_recipe(write_recipe({"name": "x", "output_dir": str(tmp_path / "run"), "stages": [stage],
                                         "data": {"d": str(ROOT / f"data_cards/{card}.yaml")}})))
    out = tmp_path / "run/export"
    m = json.loads((out / "manifest.json").read_text())
    main = tasks.get(task).main_metric
    assert m["task"] == task and m["metrics"][main] == m["metrics"][f"torch_{main}"]
    assert f"onnx_int8_dynamic_{main}" in m["metrics"] and m["metrics"]["onnx_int8_dynamic_mb"] < m["metrics"]["mb"]
    recorded = runtimes.read_export(out / "onnx")
    assert recorded["graph"] == "encoder-decoder" and list(recorded["inputs"]) == ["encoder", "prefill", "decode"]
    assert {"encoder.onnx", "prefill.onnx.data", "decode.onnx"} <= {p.name for p in (out / "onnx_int8_dynamic").iterdir()}

    tok = AutoTokenizer.from_pretrained(src)
    torch_model = AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    texts = [t[: 20 + 40 * i] for i, t in enumerate(train["source"][:3])]  # three lengths
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert not bool(enc["attention_mask"].all())  # a padded batch
    onnx = runtimes.load(out / "onnx")
    assert isinstance(onnx, RuntimeSeq2SeqLM) and onnx.parameter_count() == m["metrics"]["params"]
    decoder_ids = enc["input_ids"][:, :5]
    with torch.inference_mode():
        torch.testing.assert_close(onnx(**enc, decoder_input_ids=decoder_ids).logits,
                                   torch_model(**enc, decoder_input_ids=decoder_ids).logits, atol=1e-5, rtol=1e-4)
    for how in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}, {"do_sample": True, "top_p": 0.9}):
        torch.manual_seed(5)
        want = torch_model.generate(**enc, max_new_tokens=10, min_new_tokens=10, **how)
        torch.manual_seed(5)
        assert torch.equal(onnx.generate(**enc, max_new_tokens=10, min_new_tokens=10, **how), want), how
    without_mask = {"input_ids": enc["input_ids"][:1, :6]}  # generate() then makes no attention mask
    assert torch.equal(onnx.generate(**without_mask, max_new_tokens=6), torch_model.generate(**without_mask, max_new_tokens=6))
    if task == "translation":  # the same three graphs in OpenVINO (f32), and with int8 weights
        assert m["metrics"][f"openvino_{main}"] == m["metrics"][f"torch_{main}"]
        assert torch.equal(runtimes.load(out / "openvino").generate(**enc, max_new_tokens=10, num_beams=3),
                           torch_model.generate(**enc, max_new_tokens=10, num_beams=3))
        int8 = runtimes.load(out / "openvino_int8").generate(**enc, max_new_tokens=10, min_new_tokens=10)
        assert int8.shape == (3, 11) and m["metrics"]["openvino_int8_mb"] < m["metrics"]["openvino_mb"]

    answers = []
    for folder in (out / "onnx", src):  # the graphs, and the torch model they came from, served the same way
        client = TestClient(create_app(ServedModel(folder), ServeSettings(batching=False)))
        got = client.post(tasks.get(task).endpoint, json={"text": texts, "max_new_tokens": 6})
        assert got.status_code == 200, got.text
        answers.append(got.json()[tasks.get(task).response_key])
    assert answers[0] == answers[1] and len(answers[0]) == 3


def _generative(name):
    """A tiny randomly initialised model of an architecture family the generative export takes."""
    import transformers as T

    torch.manual_seed(0)
    ids = {"pad_token_id": 0, "eos_token_id": 2}
    seq2seq = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=0, **ids)
    decoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, **ids)
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64, **ids))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=300, **decoder))
    if name == "gemma2":  # sliding-window and global layers, soft-capped logits
        # a window shorter than prompt + new tokens: the sliding layers' cache is cropped while generating
        return T.Gemma2ForCausalLM(T.Gemma2Config(vocab_size=300, head_dim=8, sliding_window=6, **decoder))
    if name == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(vocab_size=300, forced_eos_token_id=None, **seq2seq))
    if name == "t5":  # relative position buckets
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=300, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                       num_heads=2, decoder_start_token_id=0, **ids))
    # BERT2BERT: the warm-started EncoderDecoderModel the translation task makes from an encoder-only folder
    bert = T.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    model = T.EncoderDecoderModel(T.EncoderDecoderConfig.from_encoder_decoder_configs(bert, bert))
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    return model


@pytest.mark.slow  # 2 min: six families, two runtimes
@pytest.mark.parametrize("name", ["gpt2", "qwen2", "gemma2", "bart", "t5", "bert2bert"])
def test_generative_architectures_export_to_graphs_that_generate_the_torch_tokens(tmp_path, name):
    """Each family exported as the stage does (export_generative + write_generative_folder), to ONNX and to OpenVINO,
    reloaded by pipelines.runtimes.load: greedy and beam-search generate() give the torch model's tokens for a
    padded batch."""
    from pipelines import modelio
    from pipelines.stages.export import export_generative, generation_steps, write_generative_folder
    from tests.tiny_models import byte_bpe

    model = _generative(name).eval()
    seq2seq = model.config.is_encoder_decoder
    ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(ids)
    pad = (1, slice(6, None)) if seq2seq else (1, slice(0, 3))  # right-padded sources, left-padded prompts
    mask[pad], ids[pad] = 0, 0
    steps = generation_steps(model, {"input_ids": ids, "attention_mask": mask})
    for backend in ("onnx", "openvino"):
        exported, graphs = export_generative(model, steps, backend)
        assert list(graphs) == (["encoder", "prefill", "decode"] if seq2seq else ["model"])
        exported.save_pretrained(tmp_path / backend)
        write_generative_folder(tmp_path / backend, backend, tmp_path, byte_bpe(["a b c"], 300, 64),
                                "encoder-decoder" if seq2seq else "decode", graphs, ["logits"],
                                modelio.num_parameters(model), {})
        reloaded = runtimes.load(tmp_path / backend)
        # OpenVINO keeps a decoder's cache inside the compiled model
        assert getattr(reloaded, "stateful", False) == (backend == "openvino" and not seq2seq)
        for how in ({"do_sample": False}, {"do_sample": False, "num_beams": 2}):
            args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, **how)
            assert torch.equal(reloaded.generate(**args), model.generate(**args)), (backend, how)


def test_a_one_row_capture_and_a_static_cache_config_still_give_dynamic_graphs(tmp_path):
    """A sample of one 2-token row (a split of one row), and a generation config asking for a static cache (as Gemma
    checkpoints ship "hybrid"): the graph still takes any batch and length and a DynamicCache, and generates the
    torch model's tokens for a padded batch of three."""
    from pipelines import modelio
    from pipelines.stages.export import export_generative, generation_steps, write_generative_folder
    from tests.tiny_models import byte_bpe

    model = _generative("qwen2").eval()
    model.generation_config.cache_implementation = "static"
    one_row = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    exported, graphs = export_generative(model, generation_steps(model, one_row), "onnx")
    exported.save_pretrained(tmp_path / "onnx")
    write_generative_folder(tmp_path / "onnx", "onnx", tmp_path, byte_bpe(["a b c"], 300, 64), "decode", graphs,
                            ["logits"], modelio.num_parameters(model), {})
    ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :3], ids[1, :3] = 0, 0
    model.generation_config.cache_implementation = None
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, do_sample=False)
    assert torch.equal(runtimes.load(tmp_path / "onnx").generate(**args), model.generate(**args))
