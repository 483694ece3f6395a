"""The shipped chat recipes, run as a user runs them (shortened by key=value overrides to fit CI): the whole chain
tokenizer -> pretrain -> chat SFT -> DPO -> int8 -> publish, then served with the OpenAI client; and chat SFT + DPO
on a user's own model folder."""

from __future__ import annotations

import json

import pytest

from pipelines import runner
from pipelines.recipe import load_recipe
from tests.conftest import ROOT


def manifests(recipe, run) -> dict:
    rows = runner.status(recipe)
    assert [r["state"] for r in rows] == ["done"] * len(rows), rows
    return {r["name"]: json.loads((run / r["name"] / "manifest.json").read_text()) for r in rows}


@pytest.mark.slow
def test_chat_chain_recipe_shortened(tmp_path):
    run = tmp_path / "run"
    short = [f"output_dir={run}", "stages.pretrain.config.train.max_steps=20", "stages.pretrain.config.train.eval_steps=20",
             "stages.pretrain.config.train.save_steps=20", "stages.sft.config.max_train_rows=160",
             "stages.sft.config.max_eval_rows=24", "stages.sft.config.train.epochs=1", "stages.dpo.config.max_train_rows=48",
             "stages.dpo.config.max_eval_rows=24", "stages.dpo.config.train.epochs=1",
             "stages.quantize.config.max_eval_samples=24"]
    recipe = load_recipe(ROOT / "recipes/chat_sst2_dpo.yaml", short)
    runner.run(recipe)
    m = manifests(recipe, run)
    assert {m[s]["task"] for s in ("sft", "dpo", "quantize")} == {"chat"}
    assert m["sft"]["metrics"]["validation_perplexity"] < m["sft"]["metrics"]["validation_perplexity_base"]
    assert m["dpo"]["metrics"]["validation_reward_accuracy_sft"] == 0.5 and "validation_logp_accuracy" in m["dpo"]["metrics"]
    assert (run / "publish/repo/chat_template.jinja").is_file()

    # served: the OpenAI client against /v1/chat/completions, with the template saved by the tokenizer stage
    from openai import OpenAI

    from pipelines.serve import ServedModel, ServeSettings, create_app, start_in_thread

    served = ServedModel(run / "dpo/model")
    assert served.task.name == "chat"
    server, thread, port = start_in_thread(create_app(served, ServeSettings()))
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        got = client.chat.completions.create(model=served.name, max_tokens=8, messages=[
            {"role": "user", "content": "Review: a gorgeous, witty film\nPositive or negative?"}])
        assert got.choices[0].message.role == "assistant" and got.choices[0].finish_reason in ("stop", "length")
    finally:
        server.should_exit = True
        thread.join()


@pytest.mark.slow
def test_own_model_recipe_on_a_local_folder(tmp_path):
    from tests.tiny_models import chat_llama

    run, base = tmp_path / "run", chat_llama(tmp_path / "my-model")
    short = [f"output_dir={run}", f"stages.sft.config.base_model={base}", "stages.sft.config.max_train_rows=48",
             "stages.sft.config.max_eval_rows=8", "stages.sft.config.max_length=160", "stages.sft.config.train.max_steps=4",
             "stages.dpo.config.max_train_rows=16", "stages.dpo.config.max_eval_rows=8", "stages.dpo.config.max_length=160",
             "stages.dpo.config.train.max_steps=4", "stages.sft.config.generation.max_new_tokens=4"]
    recipe = load_recipe(ROOT / "recipes/chat_own_model.yaml", short)
    runner.run(recipe)
    m = manifests(recipe, run)
    assert m["sft"]["info"]["method"] == "lora" and set(m["sft"]["outputs"]) == {"adapter", "model"}
    assert m["dpo"]["info"]["reference"] == "the SFT weights with the adapter disabled"
    assert m["dpo"]["info"]["first_logged_loss"] == pytest.approx(0.6931, abs=1e-3)
