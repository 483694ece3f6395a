"""The one YAML reader of recipes and data cards: UTF-8 (a BOM is fine), duplicate keys rejected with
their lines (PyYAML silently keeps the last one), errors as one-line problems, never a traceback."""

from __future__ import annotations

from typing import Any

import yaml


def decode(raw: bytes) -> tuple[str | None, str | None]:
    """(text, problem): UTF-8 text of a file's bytes (BOM stripped, CRLF -> LF), or where it is not UTF-8."""
    try:
        return raw.decode("utf-8-sig").replace("\r\n", "\n"), None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return None, f"not valid UTF-8 at byte offset {e.start} (line {line}); save the file as UTF-8"


def parse(text: str) -> tuple[Any, list[str]]:
    """(document, problems): problems are a YAML syntax error, or every key given twice in a mapping."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return None, [f"not valid YAML: {' '.join(str(e).split())}"]
    return doc, duplicate_keys(node)


def duplicate_keys(node, path: tuple = ()) -> list[str]:
    """Keys given twice in any mapping, with both lines."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            where = _where(path + (key,))
            if key in seen:
                if path == ("files",):
                    problems.append(
                        f"{where}: split given twice (lines {seen[key]} and {line}); give each split once, "
                        "with a list of paths if it has several files"
                    )
                else:
                    problems.append(f"{where}: key given twice (lines {seen[key]} and {line})")
            else:
                seen[key] = line
            problems.extend(duplicate_keys(value_node, path + (key,)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems.extend(duplicate_keys(item, path + (i,)))
    return problems


def _where(path: tuple) -> str:
    from pipelines.errors import format_loc

    return format_loc(path)
