"""The task registry: one name per task with its aliases, the one detector of a model folder's task,
and the rule that nothing outside pipelines/tasks/ branches on a task name."""

from __future__ import annotations

import re

import pytest

from pipelines import tasks
from pipelines.errors import PipelinesError
from tests.conftest import ROOT


def test_names_and_aliases_resolve_to_one_task():
    assert tasks.get("ner") is tasks.get("token-classification") is tasks.TASKS["token-classification"]
    assert tasks.canonical("seq2seq") == tasks.canonical("translation") == "translation"
    assert tasks.canonical("language-modeling") == tasks.canonical("text-generation") == "causal-lm"
    assert tasks.canonical("Text-Classification") == "classification"
    assert tasks.canonical("summarisation") == "summarization"
    for name, task in tasks.TASKS.items():
        # a Hub pipeline tag names a task (multi-label shares text-classification with classification)
        assert task.name == name and tasks.get(task.pipeline_tag).pipeline_tag == task.pipeline_tag
        assert task.endpoint.startswith("/") and task.main_metric and task.roles
    with pytest.raises(PipelinesError, match="unknown task 'regression'; tasks: classification"):
        tasks.get("regression")


@pytest.mark.parametrize("config, expected", [
    ({"architectures": ["BertForSequenceClassification"]}, "classification"),
    ({"architectures": ["BertForTokenClassification"]}, "token-classification"),
    ({"architectures": ["GPT2LMHeadModel"]}, "causal-lm"),
    ({"architectures": ["LlamaForCausalLM"]}, "causal-lm"),
    ({"architectures": ["MarianMTModel"], "is_encoder_decoder": True}, "translation"),
    ({"architectures": ["T5ForConditionalGeneration"]}, "translation"),
    ({"architectures": ["BartForConditionalGeneration"], "is_encoder_decoder": True,
      "task_specific_params": {"summarization": {"num_beams": 4}}}, "summarization"),
    # T5 lists summarization and translation: a translator
    ({"architectures": ["T5ForConditionalGeneration"],
      "task_specific_params": {"summarization": {}, "translation_en_to_de": {}}}, "translation"),
])
def test_one_detector_reads_config_json(config, expected):
    assert tasks.of_config(config).name == expected


def test_detector_refuses_a_headless_model():
    with pytest.raises(PipelinesError, match=r"cannot tell the task of a model with architectures \['BertModel'\]"):
        tasks.of_config({"architectures": ["BertModel"]})


def test_no_task_name_branches_outside_the_tasks_package():
    """`task == "classification"`, `task in ("seq2seq", ...)`: a stage, serve, report or publish that
    compares with a task name (or alias) would have to change with every new task. None may."""
    spellings = "|".join(re.escape(n) for n in sorted(tasks.names(), key=len, reverse=True))
    literal = rf"""["']({spellings})["']"""
    patterns = [re.compile(rf"(==|!=)\s*{literal}"), re.compile(rf"{literal}\s*(==|!=)"),
                re.compile(rf"\bin\s*[\(\[{{][^)\]}}]*{literal}"), re.compile(rf"\.get\(\s*{literal}")]
    found = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        if "tasks" in path.relative_to(ROOT / "pipelines").parts[:1]:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in patterns):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "task-name branches outside pipelines/tasks/:\n" + "\n".join(found)


def test_encoded_splits_are_read_back_from_disk_and_follow_the_tokenizer(tmp_path, monkeypatch):
    """The finetune stage's train / eval encoding is cached on disk under the rows' content fingerprint: a
    second run (a fresh card load, a fresh tokenizer) reads it back; another max_length or tokenizer is a
    miss. A tokenizer that already ran with truncation keys the same (the backend keeps the last call's
    truncation, which once made every run after the first a miss)."""
    from transformers import AutoTokenizer

    from pipelines.data import load_card
    from pipelines.packing import tokenizer_fingerprint
    from pipelines.tasks.base import EvalOptions
    from tests.tiny_models import minilm_dir

    monkeypatch.setenv("PIPELINES_CACHE", str(tmp_path))
    task = tasks.get("classification")

    def encoded(tok, max_length=64):
        rows = load_card(ROOT / "data_cards" / "sst2_sample.yaml").load(seed=42)["train"]
        return task.encode(rows, tok, EvalOptions(max_length=max_length))

    fresh = AutoTokenizer.from_pretrained(minilm_dir())
    first = encoded(fresh)
    assert tokenizer_fingerprint(fresh) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(minilm_dir()))
    written = first.cache_files[0]["filename"]
    assert written.startswith(str(tmp_path / "tokenized"))
    again = encoded(AutoTokenizer.from_pretrained(minilm_dir()))
    assert again.cache_files[0]["filename"] == written
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    assert len(list((tmp_path / "tokenized").glob("map-*.arrow"))) == 1

    shorter = encoded(fresh, max_length=8)
    assert shorter.cache_files[0]["filename"] != written and max(map(len, shorter["input_ids"])) == 8
    other = AutoTokenizer.from_pretrained(minilm_dir())
    other.add_tokens(["sst2-new-word"])
    assert encoded(other).cache_files[0]["filename"] != written
