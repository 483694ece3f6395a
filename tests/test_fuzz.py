"""Property-based: broken recipes and data cards, made by mutating valid ones (Hypothesis), never end in a
traceback: `pipelines validate` either accepts them (exit 0) or exits 2 with one message that names the file
and the key (or the data file / row) it is about."""

from __future__ import annotations

import copy


import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.cli import main
from tests.conftest import ROOT

RECIPE = yaml.safe_load((ROOT / "recipes/quickstart.yaml").read_text())
CARD = yaml.safe_load((ROOT / "data_cards/sst2_sample.yaml").read_text())
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["", "classification", "scratch:gpt2", "package:nope/x", "../nowhere", "a/b/c",
                                     "lora", "-1", "1e-3", "nan"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))


def paths(node, prefix=()):
    """Every key path of a YAML document (mappings and lists)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def mutate(doc, data):
    """Delete a key, replace a value with one of another type, or add an unknown key, somewhere."""
    doc = copy.deepcopy(doc)
    where = data.draw(st.sampled_from([p for p in paths(doc) if p]))
    parent = doc
    for k in where[:-1]:
        parent = parent[k]
    action = data.draw(st.sampled_from(["delete", "replace", "add"]))
    if action == "delete" and isinstance(parent, dict):
        del parent[where[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(VALUES)
    else:
        parent[where[-1]] = data.draw(VALUES)
    return doc, where


def validate(tmp_path, capsys, recipe: dict, card: dict) -> tuple[int, str]:
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    recipe = {**recipe, "data": {k: str(tmp_path / "card.yaml") for k in (recipe.get("data") or {})}
              if isinstance(recipe.get("data"), dict) else recipe.get("data")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    capsys.readouterr()
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.err + out.out


def fixed_card() -> dict:
    card = copy.deepcopy(CARD)
    card["files"] = {s: str(ROOT / "data_cards" / p) for s, p in card["files"].items()}
    return card


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_recipe_is_accepted_or_refused_with_one_clear_message(tmp_path, capsys, data):
    recipe, where = mutate(RECIPE, data)
    code, text = validate(tmp_path, capsys, recipe, fixed_card())
    assert code in (0, 2), text
    assert "Traceback" not in text
    if code == 2:
        assert text.startswith("error: ") and str(tmp_path / "recipe.yaml") in text, text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_data_card_is_accepted_or_refused_with_one_clear_message(tmp_path, capsys, data):
    card, where = mutate(fixed_card(), data)
    code, text = validate(tmp_path, capsys, RECIPE, card)
    assert code in (0, 2), text
    assert "Traceback" not in text
    if code == 2:
        assert text.startswith("error: ") and "card.yaml" in text, text
        named = [str(k) for k in where if isinstance(k, str)]
        assert any(k in text for k in named) or "data." in text, (where, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300))
def test_any_text_as_a_recipe_file(tmp_path, capsys, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    capsys.readouterr()
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 2 and "Traceback" not in out.err and str(path) in out.err, (text, out.err)
