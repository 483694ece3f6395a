"""The tokenizer stage on the shipped Tiny Shakespeare sample, through the real runner."""

import pytest
from transformers import AutoTokenizer

from pipelines import runner
from pipelines.recipe import load_recipe
from tests.conftest import ROOT


def recipe(write_recipe, tmp_path, **config):
    return write_recipe(
        {
            "name": "tok",
            "output_dir": str(tmp_path / "run"),
            "data": {"shakespeare": str(ROOT / "data_cards/tinyshakespeare_sample.yaml")},
            "stages": [{"name": "tok", "type": "tokenizer", "data": "shakespeare", "config": config}],
        }
    )


@pytest.mark.parametrize(
    "kind,specials",
    [("bpe", ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]), ("wordpiece", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]), ("unigram", ["<pad>", "</s>", "<unk>"])],
)
def test_each_kind_trains_saves_reloads_and_evaluates(write_recipe, tmp_path, kind, specials):
    path = recipe(write_recipe, tmp_path, kind=kind, vocab_size=1500, model_max_length=128)
    runner.run(load_recipe(path))
    manifest = runner.status(load_recipe(path))[0]
    assert manifest["state"] == "done"
    m = manifest["metrics"]
    assert 1.0 <= m["tokens_per_word"] < 3.0
    assert m["bytes_per_token"] > 1.5
    assert m["unk_rate"] < 0.01
    assert 500 < m["vocab_size"] <= 1500
    tok = AutoTokenizer.from_pretrained(tmp_path / "run/tok/tokenizer")
    assert tok.model_max_length == 128  # no "huge" default
    assert set(specials) <= set(tok.all_special_tokens)
    ids = tok("To be, or not to be")["input_ids"]
    if kind == "wordpiece":
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    if kind == "bpe":
        assert m["roundtrip_exact"] == 1.0  # byte-level: lossless
        assert tok.decode(ids) == "To be, or not to be"


def test_skip_then_rerun_on_vocab_change(write_recipe, tmp_path):
    path = recipe(write_recipe, tmp_path, vocab_size=1000)
    runner.run(load_recipe(path))
    steps = runner.run(load_recipe(path))
    assert [s.action for s in steps] == ["skip"]
    steps = runner.run(load_recipe(path, ["stages.tok.config.vocab_size=1200"]))
    assert [s.action for s in steps] == ["run"]
    assert runner.status(load_recipe(path, ["stages.tok.config.vocab_size=1200"]))[0]["metrics"]["vocab_size"] > 1000


def test_config_errors(write_recipe, tmp_path):
    from pipelines.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        load_recipe(recipe(write_recipe, tmp_path, kind="sentencepiece", vocab_size=10, special_tokens={"foo": "x"}))
    text = str(e.value)
    assert "stages[0].config.kind: Input should be 'bpe', 'wordpiece' or 'unigram'" in text
    assert "stages[0].config.vocab_size: Input should be greater than or equal to 64" in text
    with pytest.raises(RecipeError, match=r"stages\[0\].config: Value error, special_tokens: unknown role\(s\) \['foo'\]"):
        load_recipe(recipe(write_recipe, tmp_path, special_tokens={"foo": "x"}))
