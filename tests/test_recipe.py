"""Recipe validation: every problem named with the recipe file, the key path and what was expected."""

import json

import pytest

from pipelines.errors import RecipeError
from pipelines.recipe import load_recipe, recipe_json_schema
from tests.conftest import ROOT


def base(**over):
    doc = {
        "name": "t",
        "output_dir": "out",
        "stages": [
            {"name": "a", "type": "fake_produce", "config": {"value": 1}},
            {"name": "b", "type": "fake_consume", "inputs": {"source": "a"}},
        ],
    }
    doc.update(over)
    return doc


def problems(path, overrides=()):
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    assert str(path.resolve()) in str(e.value)
    return e.value.problems


BAD = [
    # (change to the recipe, expected problem text)
    (lambda d: d.update(epochs=3), "epochs: unknown key"),
    (lambda d: d["stages"][0]["config"].update(value="many"), "stages[0].config.value: Input should be a valid integer"),
    (lambda d: d["stages"][0]["config"].update(inner={"r": "x"}), "stages[0].config.inner.r: Input should be a valid integer"),
    (lambda d: d["stages"][0]["config"].update(valeu=1), "stages[0].config.valeu: unknown key"),
    (lambda d: d["stages"][1].update(type="fake_consumer"), "stages[1].type: unknown stage type 'fake_consumer'; expected one of"),
    (lambda d: d["stages"][1].update(inputs={"source": "zz"}), "stages[1].inputs.source: no stage named 'zz'; earlier stages: ['a']"),
    (lambda d: d["stages"].reverse(), "stages[0].inputs.source: stage 'a' comes later"),
    (lambda d: d["stages"][1].update(inputs={}), "stages[1].inputs.source: required by stage type 'fake_consume'"),
    (lambda d: d["stages"][1]["inputs"].update(teacher="a"), "stages[1].inputs.teacher: unknown input role"),
    (lambda d: d["stages"][1].update(name="a"), "stages[1].name: duplicate stage name 'a'"),
    (lambda d: d["stages"][1].update(data="sst2"), "stages[1].data: no data card named 'sst2'"),
    (lambda d: d.update(data={"sst2": "nope/missing.yaml"}), "data.sst2: "),
    (lambda d: d.pop("output_dir"), "output_dir: Field required"),
    (lambda d: d.update(stages=[]), "stages: List should have at least 1 item"),
    (lambda d: d.update(name="has space"), "name: String should match pattern"),
]


@pytest.mark.parametrize("change,expected", BAD)
def test_bad_recipe_messages(fake_stages, write_recipe, change, expected):
    doc = base()
    change(doc)
    found = problems(write_recipe(doc))
    assert any(expected in p for p in found), found


def test_all_problems_reported_at_once(fake_stages, write_recipe):
    doc = base()
    doc["stages"][0]["config"]["value"] = "x"
    doc["stages"][1]["type"] = "nope"
    doc["seed"] = "s"
    assert len(problems(write_recipe(doc))) == 3


def test_yaml_and_file_errors(write_recipe, tmp_path):
    assert "not valid YAML" in problems(write_recipe("name: [unclosed"))[0]
    assert "file not found" in problems(tmp_path / "missing.yaml")[0]
    assert "expected a mapping" in problems(write_recipe("- just\n- a list\n"))[0]


def test_overrides_are_typed_and_validated(fake_stages, write_recipe):
    path = write_recipe(base())
    r = load_recipe(path, ["stages.a.config.value=7", "stages.a.config.inner.r=4", "seed=3"])
    assert r.stage("a").config.value == 7 and r.stage("a").config.inner.r == 4 and r.seed == 3
    assert "stages[0].config.value: Input should be a valid integer" in problems(path, ["stages.a.config.value=abc"])[0]
    assert "no stage named 'zz'" in problems(path, ["stages.zz.config.value=1"])[0]
    assert "expected KEY.PATH=VALUE" in problems(path, ["stages.a.config.value"])[0]
    assert r.output_dir == (path.parent / "out").resolve()  # relative to the recipe file


def test_schema_lists_stage_types_and_their_configs(fake_stages):
    schema = recipe_json_schema()
    stage = schema["$defs"]["StageSpec"]
    assert "tokenizer" in stage["properties"]["type"]["enum"]
    tok = [v for v in stage["allOf"] if v["if"]["properties"]["type"]["const"] == "tokenizer"][0]
    assert "vocab_size" in tok["then"]["properties"]["config"]["properties"]
    json.dumps(schema)


def test_every_shipped_recipe_validates():
    """Like torchtune / litgpt: every YAML we ship parses and validates, without training.
    Recipes for full data sets in ../shared or data/full/ (made by data/make_task_samples.py --full) are
    checked for structure only when those are absent; a recipe for the user's own model folder (`../models/...`,
    absent here) must fail only on that folder (tests/test_chat_recipes.py runs it on a tiny model)."""
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "pipelines" in first, f"{path.name}: first line must be the command that runs it"
        try:
            load_recipe(path)
        except RecipeError as e:
            if all("model folder not found" in p and "/models/" in p for p in e.problems):
                continue
            if all("not found" in p and ("shared" in p or "data/full/" in p) for p in e.problems):
                load_recipe(path, check_data=False)
            else:
                raise


# ---------------------------------------------------------------- the file itself


def test_recipe_not_utf8_is_one_clear_error(tmp_path, fake_stages):
    from pipelines.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: t\noutput_dir: out\n# caf\xe9\nstages: []\n")
    assert problems(path) == ["not valid UTF-8 at byte offset 29 (line 3); save the file as UTF-8"]
    assert main(["validate", str(path)]) == 2


def test_a_key_given_twice_is_refused_with_both_lines(write_recipe, fake_stages):
    text = ("name: t\noutput_dir: out\nseed: 1\nseed: 2\nstages:\n"
            "  - name: a\n    type: fake_produce\n    config:\n      value: 1\n      value: 2\n")
    assert problems(write_recipe(text)) == ["seed: key given twice (lines 3 and 4)",
                                            "stages[0].config.value: key given twice (lines 9 and 10)"]


def test_output_dir_that_is_a_file_is_refused(write_recipe, fake_stages, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    assert problems(write_recipe(base())) == [f"output_dir: {tmp_path / 'out'} cannot be a folder: {tmp_path / 'out'} is a file"]
    (tmp_path / "out").unlink()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("x")
    assert problems(write_recipe(base())) == [f"stages[0].name: {tmp_path / 'out' / 'a'} (the stage's folder) is a file"]


def test_an_override_that_is_not_yaml_is_refused(write_recipe, fake_stages):
    (msg,) = problems(write_recipe(base()), ["stages.a.config.inner={r:"])
    assert msg.startswith("override 'stages.a.config.inner={r:': the value is not valid YAML") and "quote" in msg
