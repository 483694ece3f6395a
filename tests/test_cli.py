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


def test_status_watch_refreshes_while_a_run_holds_the_folder_and_stops_after(tmp_path, capsys):
    import subprocess
    import sys

    import yaml

    from pipelines.cli import main
    from tests.conftest import ROOT

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "w", "output_dir": "run", "data": {"s": str(ROOT / "data_cards/sst2_sample.yaml")},
                                      "stages": [{"name": "tok", "type": "tokenizer", "data": "s", "config": {}}]}))
    assert main(["status", str(recipe), "--watch", "0.1"]) == 0   # nothing running: one table, then it says so
    out = capsys.readouterr().out
    assert out.count("w  (") == 1 and "no run in progress" in out and not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, json, filelock, sys; l = filelock.FileLock(sys.argv[1]); l.acquire(); "
        "open(sys.argv[2], 'w').write(json.dumps({'pid': 1, 'host': 'h', 'since': 'now'})); "
        "print('held', flush=True); time.sleep(2)"), str(tmp_path / "run/.pipelines.lock"),
        str(tmp_path / "run/.pipelines.lock.json")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert main(["status", str(recipe), "--watch", "0.3"]) == 0
    holder.wait(timeout=30)
    out = capsys.readouterr().out
    assert out.count("running: pid 1 on h since now") >= 2 and out.rstrip().endswith("no run in progress")
