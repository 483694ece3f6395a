"""User-facing errors: the CLI prints these as one clear message, never a traceback."""


class PipelinesError(Exception):
    """Base class of errors caused by the user's recipe, data or environment (exit code 2)."""


class RecipeError(PipelinesError):
    """A recipe (or its overrides) is invalid. `problems` holds every problem found, not only the first."""

    def __init__(self, path, problems):
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n{lines}")


class DataError(PipelinesError):
    """A data card or the data it points at is invalid; the message names the file (and row where known)."""


class LockedError(PipelinesError):
    """Another `pipelines run` holds the output directory."""


class StageFailed(PipelinesError):
    """A stage raised; the runner has recorded it as failed."""


def format_loc(loc) -> str:
    """A key path as messages show it: ("stages", 2, "config", "lora", "r") -> stages[2].config.lora.r."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"
