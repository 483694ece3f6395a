"""Chat data and chat SFT: conversation / instruction / preference cards load (OpenAI and ShareGPT turns) and their
broken rows are named by file and row; the chat template masks every token but the assistant's content and
end-of-turn token; truncation never leaves an assistant turn without its end; a template set in the recipe is
saved into the tokenizer and travels with the model; a tiny chat SFT learns, stops, and beats its baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines import chat, runner
from pipelines.data import load_card
from pipelines.errors import DataError, RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT

CARDS = ROOT / "data_cards"
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "and you"},
        {"role": "assistant", "content": "how are you"}]


def jsonl_card(folder: Path, rows: list[dict], columns: dict, name="card") -> Path:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = folder / f"{name}.yaml"
    card.write_text(yaml.safe_dump({"source": "tests", "license": "tests", "format": "jsonl",
                                    "files": {"train": data.name}, "columns": columns,
                                    "validation_split": {"fraction": 0.5}}))
    return card


@pytest.fixture(scope="module")
def tok():
    from tests.stages.test_finetune import bpe_tokenizer

    t = bpe_tokenizer(["hello world how are you today", "fine thanks and you", "Be brief."], 300)
    chat.set_template(t, "chatml")
    return t


# ---------------------------------------------------------------- data cards


def test_shipped_chat_and_preference_cards_load():
    conv = load_card(CARDS / "sst2_chat_sample.yaml").load(seed=0)
    assert {s: len(d) for s, d in conv.items()} == {"train": 600, "validation": 100, "test": 100}
    turns = conv["train"][0]["messages"]
    assert [t["role"] for t in turns] == ["system", "user", "assistant"]
    pairs = load_card(CARDS / "sst2_preferences_sample.yaml").load(seed=0)
    row = pairs["validation"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["chosen"] != row["rejected"]
    assert row["prompt"][-1]["role"] == "user"


def test_sharegpt_turns_are_mapped_and_text_pairs_stay_text(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                               {"from": "gpt", "value": "hello"}]}] * 2
    ds = load_card(jsonl_card(tmp_path, rows, {"messages": "conversations"})).load(seed=0)["train"]
    assert ds[0]["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]
    pairs = [{"q": "2+2?", "good": "4", "bad": "5"}, {"q": "3+3?", "good": "6", "bad": "7"}]
    ds = load_card(jsonl_card(tmp_path, pairs, {"prompt": "q", "chosen": "good", "rejected": "bad"}, "p")).load(seed=0)
    assert ds["train"][0]["chosen"] in ("4", "6")  # strings stay strings (TRL's standard format)


@pytest.mark.parametrize("bad,expect", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], r"messages\[1\]: unknown role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], r"messages\[1\] \(assistant\): empty turn"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "x"}], "2 system turns"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "a"}, {"role": "assistant", "content": "x"}],
     "the system turn must come first"),
    ("just a text", "a text where the other rows hold lists of turns"),
])
def test_broken_conversations_are_named_by_file_and_row(tmp_path, bad, expect):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    card = jsonl_card(tmp_path, [good, good, {"messages": bad}], {"messages": "messages"})
    with pytest.raises(DataError, match=expect) as e:
        load_card(card).load(seed=0)
    assert "card.jsonl: row 3 (line 3)" in str(e.value) and "(messages)" in str(e.value)


def test_a_pair_that_prefers_nothing_is_refused(tmp_path):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "3+3?", "chosen": " 6", "rejected": "6"}]
    with pytest.raises(DataError, match=r"p.jsonl: row 2 \(line 2\): chosen == rejected"):
        load_card(jsonl_card(tmp_path, rows, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}, "p")).load(seed=0)


@pytest.mark.parametrize("columns,expect", [
    ({"chosen": "c", "rejected": "r"}, "needs its `prompt`"),
    ({"prompt": "p"}, "`prompt` goes with `completion`"),
    ({"prompt": "p", "chosen": "c"}, "`chosen` and `rejected` go together"),
    ({"messages": "m", "text": "t"}, r"do not go with \['text'\]"),
])
def test_card_role_sets_are_checked_before_any_row_is_read(tmp_path, columns, expect):
    with pytest.raises(DataError, match=expect):
        load_card(jsonl_card(tmp_path, [{"x": 1}], columns))


# ---------------------------------------------------------------- template and masking


def test_labels_are_the_assistant_content_and_its_end_of_turn_token_only(tok):
    ids, labels = chat.encode(tok, CONV, 512)
    learned = [tok.decode([i]) for i, lab in zip(ids, labels) if lab != -100]
    assert "".join(learned) == "fine thanks<|im_end|>how are you<|im_end|>"
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    # token by token: each labelled token lies inside an assistant turn's content or is its <|im_end|>
    text = tok.decode(ids)
    assert text == chat.render(tok, CONV)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for k, (i, lab) in enumerate(zip(ids, labels)):
        if lab != -100 and i != eot:
            assert tok.decode(ids[: k + 1]).split("<|im_start|>")[-1].startswith("assistant\n"), k


def test_truncation_keeps_whole_assistant_turns(tok):
    full, _ = chat.encode(tok, CONV, 512)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i + 1 for i, t in enumerate(full) if t == eot]
    first_end = ends[2]  # system, user, then reply 1's <|im_end|>
    assert tok.decode(full[:first_end]).endswith("fine thanks<|im_end|>")
    ids, labels = chat.encode(tok, CONV, ends[-1] - 1)  # reply 2 does not fit whole: the conversation ends after reply 1
    assert ids == full[:first_end] and labels[-1] == eot
    assert chat.encode(tok, CONV, first_end - 1) is None  # not even the first reply fits: left out


def test_templates_named_or_jinja_and_refused_early(tok):
    assert chat.end_of_turn(tok) == "<|im_end|>" and chat.end_of_turn_id(tok) is not None
    assert chat.template_problem("chatml") is None
    assert "neither a named template" in chat.template_problem("chat-ml")
    assert "does not render" in chat.template_problem("{% for m in messages %}{{ m.content }")
    from tests.stages.test_finetune import bpe_tokenizer

    plain = bpe_tokenizer(["a b c"], 270)
    with pytest.raises(Exception, match="ends an assistant turn with nothing"):
        chat.set_template(plain, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    chat.set_template(plain, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
                             "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, labels = chat.encode(plain, CONV[1:3], 64)
    assert plain.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "fine thanks</s>"


def test_validate_refuses_a_bad_template_and_a_template_for_other_tasks(write_recipe, tmp_path):
    def rec(cfg):
        return write_recipe({"name": "c", "output_dir": str(tmp_path / "run"),
                             "data": {"chat": str(CARDS / "sst2_chat_sample.yaml"), "sst2": str(CARDS / "sst2_sample.yaml")},
                             "stages": [{"name": "ft", "type": "finetune", "data": cfg.pop("data", "chat"),
                                         "config": {"base_model": "scratch:gpt2", "method": "full", **cfg}}]})

    with pytest.raises(RecipeError, match=r"chat_template: 'chatmel' is neither a named template"):
        load_recipe(rec({"task": "chat", "chat_template": "chatmel"}))
    with pytest.raises(RecipeError, match=r"chat_template is for tasks \['chat'\]"):
        load_recipe(rec({"task": "classification", "chat_template": "chatml", "data": "sst2"}))
    with pytest.raises(RecipeError, match=r"task chat needs the roles \['messages'\]"):
        load_recipe(rec({"task": "chat", "data": "sst2"}))


# ---------------------------------------------------------------- chat SFT end to end


def test_tokenizer_stage_to_chat_sft_learns_the_assistant_turns_and_stops(write_recipe, tmp_path):
    """tokenizer (ChatML saved into it) -> full chat SFT of a tiny Llama: the template is in model/, the loss is on
    assistant tokens, the model beats the unigram baseline and its replies end with <|im_end|>."""
    path = write_recipe({
        "name": "c", "output_dir": str(tmp_path / "run"), "seed": 1,
        "data": {"chat": str(CARDS / "sst2_chat_sample.yaml")},
        "stages": [
            {"name": "tok", "type": "tokenizer", "data": "chat",
             "config": {"vocab_size": 400, "chat_template": "chatml", "model_max_length": 256}},
            {"name": "sft", "type": "finetune", "data": "chat", "inputs": {"tokenizer": "tok"},
             "config": {"task": "chat", "base_model": "scratch:llama", "method": "full", "max_length": 160,
                        "max_train_rows": 320, "max_eval_rows": 24, "eval_splits": ["validation"],
                        "scratch_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "num_key_value_heads": 2},
                        "generation": {"num_beams": 1, "max_new_tokens": 12},
                        "train": {"batch_size": 16, "lr": 5e-3, "epochs": 2, "logging_steps": 5}}}]})
    runner.run(load_recipe(path))
    man = json.loads((tmp_path / "run/sft/manifest.json").read_text())
    m = man["metrics"]
    unigram = next(e for e in man["evaluations"] if e["model"] == "unigram")["metrics"]["perplexity"]
    assert m["validation_perplexity"] < unigram / 3, (m, unigram)
    assert m["validation_stopped"] >= 0.9, m
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "run/sft/model")
    assert saved.chat_template == chat.CHATML and "<|im_end|>" in saved.get_vocab()
    gen = json.loads((tmp_path / "run/sft/model/generation_config.json").read_text())
    assert saved.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]  # generation stops at the end of a turn
    rows = [json.loads(x) for x in (tmp_path / "run/sft/predictions_validation.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n") and "reference" in rows[0]


def test_packed_examples_do_not_attend_to_each_other(tmp_path):
    """finetune's `packing`: with the KV cache off (as the stage trains), each packed example's logits are those it
    has alone; with the cache on (transformers' default) they are not, which is why the stage turns it off."""
    from transformers import AutoModelForCausalLM

    from pipelines.stages.finetune import packed_collator
    from tests.tiny_models import chat_llama

    model = AutoModelForCausalLM.from_pretrained(chat_llama(tmp_path / "m")).train()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    batch = packed_collator()([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}])
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, 9, -100, 11, 12]]
    import torch

    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        model.config.use_cache = False
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, len(a):]
        model.config.use_cache = True
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, len(a):]
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # if this starts to pass, transformers fixed it


def test_chat_sft_with_packing_saves_a_model_that_caches(write_recipe, tmp_path):
    from tests.tiny_models import chat_llama

    base = chat_llama(tmp_path / "base")
    path = write_recipe({"name": "p", "output_dir": str(tmp_path / "run"), "seed": 1,
                         "data": {"chat": str(CARDS / "sst2_chat_sample.yaml")},
                         "stages": [{"name": "sft", "type": "finetune", "data": "chat",
                                     "config": {"task": "chat", "base_model": str(base), "method": "full", "packing": True,
                                                "max_length": 160, "max_train_rows": 64, "max_eval_rows": 8,
                                                "eval_splits": ["validation"], "generation": {"num_beams": 1, "max_new_tokens": 4},
                                                "train": {"batch_size": 8, "lr": 5e-3, "max_steps": 4, "logging_steps": 1}}}]})
    runner.run(load_recipe(path))
    m = json.loads((tmp_path / "run/sft/manifest.json").read_text())["metrics"]
    assert m["validation_perplexity"] < m["validation_perplexity_base"]
    assert json.loads((tmp_path / "run/sft/model/config.json").read_text())["use_cache"] is True
    with pytest.raises(RecipeError, match=r"packing is for tasks \['chat', 'causal-lm'\]"):
        load_recipe(write_recipe({"name": "q", "output_dir": str(tmp_path / "r2"),
                                  "data": {"s": str(CARDS / "sst2_sample.yaml")},
                                  "stages": [{"name": "ft", "type": "finetune", "data": "s",
                                              "config": {"task": "classification", "base_model": str(base),
                                                         "packing": True}}]}, "q.yaml"))


def test_prepare_refuses_chat_cards_at_validate(write_recipe, tmp_path):
    with pytest.raises(RecipeError, match="prepare does not clean chat or preference rows yet"):
        load_recipe(write_recipe({"name": "p", "output_dir": str(tmp_path / "run"),
                                  "data": {"chat": str(CARDS / "sst2_chat_sample.yaml")},
                                  "stages": [{"name": "prepare", "type": "prepare", "data": "chat"}]}))
