"""The preference stage (DPO, IPO, ORPO, SimPO, KTO through TRL) on a tiny Llama with a ChatML tokenizer, on
pairs cut from the committed SST-2 preference sample: the DPO loss starts at ln 2 and moves, every loss raises
the preference accuracy on its training pairs, LoRA's reference is the SFT model with the adapter disabled, the
stage resumes after kill -9, and what can be checked without training is refused by validate."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch
import yaml

from pipelines import chat, runner
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.launch import run_killed_after_checkpoint

PAIRS = ROOT / "data/sst2_chat/pairs_train.jsonl"


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny Llama (random weights: the 'SFT model') with a byte-level BPE + ChatML, as the tokenizer stage makes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.stages.test_finetune import bpe_tokenizer

    root = tmp_path_factory.mktemp("pref")
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    tok = bpe_tokenizer([t["content"] for r in rows for t in r["prompt"] + r["chosen"] + r["rejected"]], 400)
    chat.set_template(tok, "chatml")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    # the same 32 pairs as train and as validation: does the loss raise the preference on what it trained on?
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(PAIRS.read_text().splitlines()[:32]) + "\n")
    shutil.copy(data / "train.jsonl", data / "validation.jsonl")
    card = root / "pairs.yaml"
    card.write_text(yaml.safe_dump({"source": "tests: the first 32 pairs of data/sst2_chat/pairs_train.jsonl",
                                    "license": "see data/README.md", "format": "jsonl",
                                    "files": {"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl")},
                                    "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}))
    return {"model": root / "sft", "card": card}


def recipe(tmp_path, sft, config, name="pref"):
    path = tmp_path / f"{name}.yaml"
    cfg = {"base_model": str(sft["model"]), "method": "full", "max_length": 128, "eval_splits": ["validation"],
           "train": {"batch_size": 8, "lr": 1e-2, "max_steps": 16, "logging_steps": 1, "save_steps": 8}, **config}
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp_path / "run"), "seed": 1,
                                    "data": {"pairs": str(sft["card"])},
                                    "stages": [{"name": "pref", "type": "preference", "data": "pairs", "config": cfg}]}))
    return path


def manifest(tmp_path) -> dict:
    return json.loads((tmp_path / "run/pref/manifest.json").read_text())


def losses(tmp_path) -> list[float]:
    return [h["loss"] for h in json.loads((tmp_path / "run/pref/log_history.json").read_text()) if "loss" in h]


@pytest.mark.parametrize("loss,lr", [("dpo", 1e-2), ("ipo", 1e-2), ("orpo", 5e-3), ("simpo", 5e-3), ("kto", 3e-3)])
def test_each_loss_raises_preference_accuracy_on_its_training_pairs(tmp_path, sft, loss, lr):
    train = {"batch_size": 8, "lr": lr, "max_steps": 16, "logging_steps": 1}
    runner.run(load_recipe(recipe(tmp_path, sft, {"loss": loss, "train": train})))
    m = manifest(tmp_path)["metrics"]
    assert m["validation_pairs"] >= 30  # (a pair longer than max_length is left out)
    assert m["validation_reward_accuracy_sft"] == 0.5 and m["validation_reward_margin_sft"] == 0  # by definition
    assert m["validation_reward_accuracy"] > 0.55, m  # from 0.5 (ties: the policy starts as its reference)
    assert m["validation_reward_margin"] > 0.01, m
    assert m["validation_logp_accuracy"] > m["validation_logp_accuracy_sft"], m
    if loss == "dpo":
        assert abs(losses(tmp_path)[0] - math.log(2)) < 1e-3  # policy == reference at step 1
        assert losses(tmp_path)[-1] < 0.6


def test_lora_reference_is_the_sft_model_and_the_adapter_is_merged(tmp_path, sft):
    """With LoRA the reference is the SFT weights with the adapter disabled: the loss starts at ln 2, moves, and
    model/ (adapter merged) reloads as a plain causal LM that scores like the tuned policy."""
    runner.run(load_recipe(recipe(tmp_path, sft, {"loss": "dpo", "method": "lora", "lora": {"r": 8, "target_modules": "all-linear"},
                                                  "max_train_rows": 8,  # one batch, seen 12 times: the loss must fall
                                                  "train": {"batch_size": 8, "lr": 2e-2, "max_steps": 12, "logging_steps": 1}})))
    man = manifest(tmp_path)
    first, last = losses(tmp_path)[0], losses(tmp_path)[-4:]
    # a reference sharing the trainable weights would keep the loss at exactly ln 2; this one moves away from it
    assert abs(first - math.log(2)) < 1e-3 and sum(last) / 4 < math.log(2) - 0.05, losses(tmp_path)
    assert man["info"]["reference"] == "the SFT weights with the adapter disabled"
    assert set(man["outputs"]) == {"model", "adapter"}
    assert (tmp_path / "run/pref/adapter/adapter_config.json").is_file()
    assert 0 <= man["metrics"]["validation_reward_accuracy"] <= 1  # (scored on all 32 pairs, trained on 8)
    tpl = (tmp_path / "run/pref/model/chat_template.jinja").read_text()
    assert "<|im_start|>" in tpl  # the tokenizer's template travels with the model


def test_resume_after_kill_continues(tmp_path, sft):
    """kill -9 after a complete checkpoint; `run` again resumes from it and only trains the remaining steps."""
    steps = 30
    path = recipe(tmp_path, sft, {"loss": "dpo", "train": {"batch_size": 4, "lr": 5e-3, "max_steps": steps,
                                                             "logging_steps": 1, "save_steps": 5}})
    cmd = run_killed_after_checkpoint(path, tmp_path / "run/pref/checkpoints")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert not (tmp_path / "run/pref/manifest.json").exists()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming from checkpoint-" in r.stdout
    m = manifest(tmp_path)
    assert m["resumed"] and m["info"]["global_step"] == steps
    assert losses(tmp_path)[0] == pytest.approx(math.log(2), abs=1e-3)  # the log history came back with the checkpoint


def test_validate_refuses_what_cannot_work(tmp_path, sft):
    from pipelines.errors import RecipeError
    from pipelines.stages.preference import PreferenceConfig

    with pytest.raises(ValueError, match="chat_template"):
        PreferenceConfig(chat_template="not a template")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "output_dir": str(tmp_path / "run"),
                                    "data": {"sst2": str(ROOT / "data_cards/sst2_sample.yaml")},
                                    "stages": [{"name": "p", "type": "preference", "data": "sst2",
                                                "config": {"base_model": str(sft["model"])}}]}))
    with pytest.raises(RecipeError, match=r"roles \['prompt', 'chosen', 'rejected'\]"):
        load_recipe(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_qlora_without_gpu_says_what_is_missing(tmp_path, sft):
    with pytest.raises(Exception, match="qlora .* needs a CUDA GPU"):
        runner.run(load_recipe(recipe(tmp_path, sft, {"method": "qlora"})))


@pytest.mark.slow
def test_dpo_lora_under_deepspeed_two_ranks(tmp_path, sft):
    """Two ranks under `accelerate launch` with ZeRO-3 (parameters partitioned): the adapter is gathered on save,
    merged on rank 0 into a plain copy of the SFT model, and scored there. (ZeRO-2 is the finetune stage's path,
    tested there; one launch here keeps the suite's time.)"""
    zero = 3
    from tests.launch import accelerate_launch

    path = recipe(tmp_path, sft, {"loss": "dpo", "method": "lora", "lora": {"r": 8, "target_modules": "all-linear"},
                                  "train": {"batch_size": 4, "lr": 2e-2, "max_steps": 4, "logging_steps": 1}})
    r = accelerate_launch(f"deepspeed_zero{zero}.yaml", path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    man = manifest(tmp_path)
    assert man["world_size"] == 2 and man["info"]["global_step"] == 4
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run/pref/adapter/adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # trained and gathered, not empty
    assert abs(losses(tmp_path)[0] - math.log(2)) < 1e-3
    assert 0 <= man["metrics"]["validation_reward_accuracy"] <= 1
