"""publish stage: the repo folder and its model card (offline), and uploads to a stand-in Hub on loopback."""

from __future__ import annotations

import json
import re
import secrets
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.errors import RecipeError, StageFailed
from pipelines.stage import Evaluation, StageConfig, StageDef, StageResult
from tests.hub_stub import running_stub
from tests.test_serve import TEXTS, direct_classify, tiny_classifier

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT / "data_cards" / "sst2_sample.yaml"
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


# ---------------------------------------------------------------- fake upstream stages (real model folders)


class TrainedConfig(StageConfig):
    src: str
    adapter: str | None = None
    merged: bool = True  # False: adapter only, as finetune with merge: false
    metrics: dict = {}
    info: dict = {}
    task: str = "classification"
    evaluations: list[dict] = []


def trained(cfg: TrainedConfig, ctx):
    outputs = {}
    if cfg.merged:
        shutil.copytree(cfg.src, ctx.output_dir / "model")
        outputs["model"] = "model"
    if cfg.adapter:
        shutil.copytree(cfg.adapter, ctx.output_dir / "adapter")
        outputs["adapter"] = "adapter"
    return StageResult(metrics=cfg.metrics, outputs=outputs, info=cfg.info, task=cfg.task,
                       evaluations=[Evaluation(**e) for e in cfg.evaluations])


class VocabConfig(StageConfig):
    pass


def vocab(cfg, ctx):
    (ctx.output_dir / "tok").mkdir()
    return StageResult(metrics={"fertility": 1.31, "vocab_size": 30522}, outputs={"tokenizer": "tok"})


@pytest.fixture
def stages():
    from pipelines.stages import STAGES

    fakes = {
        "fake_trained": StageDef("fake_trained", TrainedConfig, trained, inputs={"tokenizer": "optional"}, data="required"),
        "fake_vocab": StageDef("fake_vocab", VocabConfig, vocab, data="required"),
    }
    STAGES.update(fakes)
    yield
    for k in fakes:
        STAGES.pop(k, None)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no saved login (whatever the machine running the tests has)."""
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))


@pytest.fixture
def hub(monkeypatch, no_token, tmp_path):
    """A stand-in Hub on 127.0.0.1 with a fresh token; every Hub request of the process goes to it."""
    from huggingface_hub import constants

    token = "hf_" + secrets.token_hex(16)
    with running_stub() as stub:
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; loopback is fine
        monkeypatch.setattr(constants, "ENDPOINT", stub.url)  # huggingface_hub's own side requests too
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        stub.token = token
        yield stub
    assert all(r.url.startswith(stub.url) for r in stub.requests)


def recipe(tmp_path, model_dir, publish: dict | None = None, **trained_cfg) -> Path:
    doc = {
        "name": "demo",
        "output_dir": "run",
        "data": {"sst2": str(SST2)},
        "stages": [
            {"name": "vocab", "type": "fake_vocab", "data": "sst2"},
            {
                "name": "finetune",
                "type": "fake_trained",
                "data": "sst2",
                "inputs": {"tokenizer": "vocab"},
                "config": {
                    "src": str(model_dir),
                    "metrics": {"validation_accuracy": 0.875, "validation_f1_macro": 0.87, "test_accuracy": 0.86,
                                "total_params": 997090, "train_minutes": 0.2},
                    "info": {"task": "classification", "base_model": "sentence-transformers/all-MiniLM-L6-v2",
                             "label_names": ["negative", "positive"]},
                    "evaluations": [
                        {"model": "fine-tuned", "role": "output", "split": "validation",
                         "metrics": {"accuracy": 0.875, "f1_macro": 0.87}},
                        {"model": "fine-tuned", "role": "output", "split": "test", "metrics": {"accuracy": 0.86}},
                        {"model": "majority", "role": "baseline", "split": "validation", "metrics": {"accuracy": 0.51}},
                    ],
                    **trained_cfg,
                },
            },
            {"name": "sibling", "type": "fake_vocab", "data": "sst2"},
            {"name": "publish", "type": "publish", "inputs": {"model": "finetune"}, "config": publish or {}},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run(path: Path, echo=print):
    from pipelines import runner
    from pipelines.recipe import load_recipe

    r = load_recipe(path)
    runner.run(r, echo=echo)
    return r.output_dir


def header(readme: Path) -> dict:
    return yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", readme.read_text(), re.S).group(1))


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- offline: folder, card, dry run


def test_dry_run_writes_a_loadable_repo_with_a_valid_card(tmp_path, stages, no_token, capsys):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    model = tiny_classifier(tmp_path / "src")
    out = run(recipe(tmp_path, model, {"repo_id": "me/tiny-sst2", "license": "apache-2.0", "tags": ["demo"]}))
    repo = out / "publish" / "repo"
    assert {p.name for p in repo.iterdir()} == MODEL_FILES | {"README.md", "recipe.yaml", "pipelines_lineage.json"}
    assert (repo / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    assert yaml.safe_load((repo / "recipe.yaml").read_text())["name"] == "demo"

    # the card: metadata the Hub reads, checked with huggingface_hub's own parsers
    meta = header(repo / "README.md")
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"] and meta["datasets"] == ["sst2_sample"]
    assert meta["pipeline_tag"] == "text-classification" and {"pipelines", "demo"} <= set(meta["tags"])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"  # a Hub id in the lineage
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-sst2"
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in results}
    assert got == {("validation", "accuracy"): 0.875, ("validation", "f1_macro"): 0.87, ("test", "accuracy"): 0.86}
    card = ModelCard.load(repo / "README.md")
    text = card.text
    assert "| vocab | fake_vocab | yes | fertility | 1.31 |" in text  # every stage's metrics, not only the model's
    assert "| finetune | fake_trained | yes | total_params | 997090 |" in text
    assert "| sibling | fake_vocab | no | fertility | 1.31 |" in text  # a stage that did not make the model
    assert "research/evaluation use only" in text  # the data card's license
    assert 'pipeline("text-classification", model="me/tiny-sst2")' in text
    assert "Labels: negative, positive" in text and "## Limitations" in text
    # beside the task's baselines (declared by the stage; not in model-index: they are not this model)
    assert "| finetune | validation | majority | baseline | accuracy | 0.51 |" in text
    assert "| finetune | validation | fine-tuned | output | accuracy | 0.875 |" in text

    # the folder is what from_pretrained loads: same labels, same predictions
    assert [l for l, _ in direct_classify(repo, TEXTS)] == [l for l, _ in direct_classify(model, TEXTS)]

    manifest = json.loads((out / "publish" / "manifest.json").read_text())
    assert manifest["metrics"]["uploaded"] == 0 and manifest["info"]["dry_run"] is True
    assert "no Hub token" in manifest["info"]["reason"]
    assert {f["path"] for f in manifest["info"]["files"]} == {p.name for p in repo.iterdir()}
    log = capsys.readouterr().out
    assert "would upload 7 files" in log and "me/tiny-sst2@main" in log and "model.safetensors" in log


def test_adapter_is_published_beside_the_model_and_alone(tmp_path, stages, no_token):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = tiny_classifier(tmp_path / "src")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForSequenceClassification.from_pretrained(model),
                          LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    peft.save_pretrained(tmp_path / "adapter")

    both = run(recipe(tmp_path, model, {"dry_run": True}, adapter=str(tmp_path / "adapter"))) / "publish" / "repo"
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(snapshot(both))
    assert "lora" in header(both / "README.md")["tags"]

    alone_dir = tmp_path / "alone"
    alone_dir.mkdir()
    alone = run(recipe(alone_dir, model, {"dry_run": True}, adapter=str(tmp_path / "adapter"), merged=False))
    files = set(snapshot(alone / "publish" / "repo"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files and "config.json" not in files
    meta = header(alone / "publish" / "repo" / "README.md")
    assert meta["library_name"] == "peft" and meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "AutoPeftModelForSequenceClassification" in (alone / "publish" / "repo" / "README.md").read_text()


def test_pickle_weights_are_refused(tmp_path, stages, no_token):
    model = tiny_classifier(tmp_path / "src")
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(StageFailed, match=r"pickle files \['pytorch_model.bin'\].*safetensors"):
        run(recipe(tmp_path, model, {"dry_run": True}))

    # the quantize stage's dynamic-int8 folder (a torch state dict beside quantization.json): same rule, clear advice
    quantized = shutil.copytree(model, tmp_path / "quantized")
    (quantized / "pytorch_model.bin").rename(quantized / "quantized_state_dict.pt")
    (quantized / "quantization.json").write_text('{"method": "dynamic_int8"}')
    with pytest.raises(StageFailed, match=r"dynamic-int8 folder .*Publish the model it was quantized from"):
        run(recipe(tmp_path, quantized, {"dry_run": True}))


def test_config_errors_are_caught_before_work(tmp_path, stages):
    from pipelines.recipe import load_recipe

    model = tmp_path / "unused"
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe(tmp_path, model, {"dry_run": False, "license": "Apache 2.0", "repo_id": "no-namespace"}))
    msg = str(e.value)
    assert "repo_id 'no-namespace'" in msg and "license 'Apache 2.0'" in msg
    with pytest.raises(RecipeError, match="dry_run: false needs a repo_id"):
        load_recipe(recipe(tmp_path, model, {"dry_run": False}))


def test_upload_refused_without_token_or_when_offline(tmp_path, stages, no_token, monkeypatch):
    model = tiny_classifier(tmp_path / "src")
    with pytest.raises(StageFailed, match="no Hub token was found"):
        run(recipe(tmp_path, model, {"repo_id": "me/x", "dry_run": False}))
    monkeypatch.setenv("HF_TOKEN", "hf_" + secrets.token_hex(8))  # HF_HUB_OFFLINE=1 in the test suite
    with pytest.raises(StageFailed, match="HF_HUB_OFFLINE is set"):
        run(recipe(tmp_path, model, {"repo_id": "me/x"}))


def test_unreachable_hub_is_a_clear_error(tmp_path, stages, no_token, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", dead)
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    token = "hf_" + secrets.token_hex(8)
    monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(StageFailed, match=rf"upload to {dead}/me/x failed at create_repo: .*Run again to retry") as e:
        run(recipe(tmp_path, tiny_classifier(tmp_path / "src"), {"repo_id": "me/x"}))
    assert token not in str(e.value)


# ---------------------------------------------------------------- uploads to the stand-in Hub


def _assert_token_only_in_auth_header(hub, run_dir: Path, output: str):
    token = hub.token
    assert hub.requests
    for r in hub.requests:
        assert token not in r.url and token.encode() not in r.body, (r.route, r.url)
        leaked = [k for k, v in r.headers.items() if token in v and k != "authorization"]
        assert not leaked, leaked
        if r.route != "unhandled":  # huggingface_hub's anonymous side request (agent registry) carries none
            assert r.headers["authorization"] == f"Bearer {token}", r.route
    for f in run_dir.parent.rglob("*"):  # every file the run wrote: manifests, card, recipe, logs, tracebacks
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    assert token not in output


def test_upload_sends_the_folder_with_the_token_only_in_the_auth_header(tmp_path, stages, hub, capfd):
    model = tiny_classifier(tmp_path / "src")
    cfg = {"repo_id": "me/tiny-sst2", "revision": "exp-1", "private": True, "commit_message": "first upload"}
    out = run(recipe(tmp_path, model, cfg))
    repo = out / "publish" / "repo"
    assert [r.route for r in hub.requests if r.route != "unhandled"] == [
        "create_repo", "create_branch", "validate_yaml", "preupload", "commit"]
    assert json.loads(hub.calls("create_repo")[0].body) == {"name": "tiny-sst2", "organization": "me", "visibility": "private"}
    assert hub.repos["me/tiny-sst2"]["private"] is True
    sent = hub.files("me/tiny-sst2", "exp-1")
    assert sent == {rel: (repo / rel).read_bytes() for rel in snapshot(repo)}  # every file, byte for byte
    assert hub.files("me/tiny-sst2", "main") == {}  # the branch, not main
    assert hub.repos["me/tiny-sst2"]["commits"][0]["summary"] == "first upload"
    manifest = json.loads((out / "publish" / "manifest.json").read_text())
    assert manifest["metrics"]["uploaded"] == 1 and manifest["info"]["commit_oid"] == hub.repos["me/tiny-sst2"]["commits"][0]["oid"]
    _assert_token_only_in_auth_header(hub, out, "".join(capfd.readouterr()))


def test_failed_upload_is_clear_and_the_retry_does_not_rewrite_the_folder(tmp_path, stages, hub, capfd):
    model = tiny_classifier(tmp_path / "src")
    path = recipe(tmp_path, model, {"repo_id": "me/tiny-sst2"})
    hub.fail("create_repo", 500)  # not retried by huggingface_hub: the stage must report it
    with pytest.raises(StageFailed) as e:
        run(path)
    msg = str(e.value)
    assert "upload to http://127.0.0.1" in msg and "me/tiny-sst2 failed at create_repo: HTTP 500" in msg
    assert "run again to retry" in msg and hub.token not in msg
    repo = tmp_path / "run" / "publish" / "repo"
    before = snapshot(repo)
    assert "README.md" in before and "model.safetensors" in before

    hub.fail("commit", 503)  # a transient error inside the upload: huggingface_hub's retry absorbs it
    run(path)
    assert snapshot(repo) == before  # resumed: same inodes and mtimes, nothing rewritten
    assert set(hub.files("me/tiny-sst2")) == set(before)
    assert len(hub.calls("commit")) == 2 and len(hub.repos["me/tiny-sst2"]["commits"]) == 1
    manifest = json.loads((tmp_path / "run" / "publish" / "manifest.json").read_text())
    assert manifest["resumed"] is True and manifest["info"]["written"] == []

    # publishing again (forced) skips files the Hub already has with the same content
    from pipelines import runner
    from pipelines.recipe import load_recipe

    runner.run(load_recipe(path), only="publish", force=True)
    assert len(hub.repos["me/tiny-sst2"]["commits"]) == 1
    _assert_token_only_in_auth_header(hub, tmp_path / "run", "".join(capfd.readouterr()))
