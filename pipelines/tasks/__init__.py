"""The task registry: one module per task, one line each here. Adding a task = one file + one line.

    from pipelines import tasks
    task = tasks.get("ner")                         # a name or an alias -> the Task (token-classification)
    task = tasks.of_folder("runs/x/finetune/model")  # THE detector: what a model folder holds

A Task (pipelines/tasks/base.py) owns everything task-specific; stages, serve, report and publish ask it
and never branch on a task name. Every task has one name, used in recipes, data cards, manifests, model
cards and endpoints; its aliases (the Hub's pipeline tags, older names) are accepted wherever a name is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pipelines.errors import PipelinesError
from pipelines.tasks import (
    causal_lm, chat, classification, image_classification, multi_label, summarization, token_classification, translation,
)
from pipelines.tasks.base import EvalOptions, RequestError, Scored, ServeLimits, Task

# order matters only for detection: the first task whose detect() accepts a config.json wins
TASKS: dict[str, Task] = {
    "classification": classification.TASK,
    "multi-label-classification": multi_label.TASK,
    "token-classification": token_classification.TASK,
    "image-classification": image_classification.TASK,
    "summarization": summarization.TASK,
    "translation": translation.TASK,
    "chat": chat.TASK,  # before causal-lm: a chat model is a causal LM whose config.json says "chat"
    "causal-lm": causal_lm.TASK,
}

__all__ = ["TaskName", "TASKS", "EvalOptions", "RequestError", "Scored", "ServeLimits", "Task", "get", "names", "of_config",
           "of_folder", "canonical"]


def _aliases() -> dict[str, str]:
    out = {}
    for name, task in TASKS.items():  # names and aliases first, then the Hub tags several tasks share
        for key in (name, *task.aliases):
            out.setdefault(key.lower(), name)
    for name, task in TASKS.items():
        out.setdefault(task.pipeline_tag.lower(), name)
    return out


def names() -> list[str]:
    """Every accepted spelling: task names first, then aliases."""
    return list(TASKS) + [a for a in _aliases() if a not in TASKS]


TaskName = Literal[tuple(names())]  # for typed configs: every task name and alias (normalised with canonical())


def canonical(name: str) -> str:
    """The task name for a name or an alias; PipelinesError listing the tasks otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    found = _aliases().get(key)
    if found is None:
        raise PipelinesError(f"unknown task {name!r}; tasks: {', '.join(TASKS)} (aliases: "
                             f"{', '.join(a for a in _aliases() if a not in TASKS)})")
    return found


def get(name: str) -> Task:
    return TASKS[canonical(name)]


def of_config(config: dict, where: str = "config.json") -> Task:
    """The task of a model from its config.json: the first registered task whose detect() accepts it."""
    for task in TASKS.values():
        if task.detect(config):
            return task
    archs = config.get("architectures") or []
    raise PipelinesError(
        f"{where}: cannot tell the task of a model with architectures {archs or 'none'}: expected a head of one of "
        f"the tasks {', '.join(TASKS)} (sequence / token / image classification, a seq2seq LM, a causal LM)"
    )


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PipelinesError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelinesError(f"cannot read {path}: {e}") from None


def of_folder(folder) -> Task:
    return of_config(read_config(folder), f"{folder}/config.json")
