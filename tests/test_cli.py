"""The CLI as a user types it: `python -m pipelines ...`, exit codes, messages without tracebacks."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def pipelines(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_validate_quickstart_from_another_directory(tmp_path):
    r = pipelines("validate", str(ROOT / "recipes/quickstart.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout and "tokenizer" in r.stdout


def test_bad_recipe_exits_2_with_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\noutput_dir: out\nstages:\n  - name: t\n    type: tokenizer\n    config: {vocab_size: lots}\n"
    )
    r = pipelines("validate", str(bad))
    assert r.returncode == 2
    assert f"{bad}" in r.stderr
    assert "stages[0].config.vocab_size: Input should be a valid integer" in r.stderr
    assert "stages[0].data: stage type 'tokenizer' needs a data card" in r.stderr
    assert "Traceback" not in r.stderr


def test_data_check_prints_rows_per_split():
    r = pipelines("data", "check", "data_cards/sst2_sample.yaml")
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout and "2000 rows" in r.stdout and "negative=1000" in r.stdout


def test_bad_data_card_exits_2(tmp_path):
    card = tmp_path / "c.yaml"
    card.write_text("name: c\nsource: me\nlicense: mine\nformat: csv\nfiles: {train: nothere.csv}\ncolumns: {text: text}\n")
    r = pipelines("data", "check", str(card))
    assert r.returncode == 2
    assert "nothere.csv" in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr


def test_schema_is_json():
    r = pipelines("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert "stages" in schema["properties"]
