"""YAML recipe (+ key=value overrides) -> typed, validated Recipe.

Every problem is collected and reported together, each naming the recipe file, the key path
(`stages[2].config.lora.r`) and what was expected. Relative paths in a recipe (output_dir, data
cards) are relative to the recipe file, so a recipe means the same thing from any working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines import yamlio
from pipelines.errors import DataError, RecipeError, format_loc
from pipelines.sweep import SweepConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="Unique stage name; also its folder under output_dir.")
    type: str = Field(description="Stage type: one of pipelines.stages.STAGES.")
    data: str | None = Field(None, description="Key of a data card in the recipe's `data` mapping, or the name of "
                             "an earlier stage that writes one (a `prepare` stage).")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="role -> name of an earlier stage, e.g. {tokenizer: tok}."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="The stage type's typed config.")
    sweep: SweepConfig | None = Field(None, description="Training stages: a hyperparameter sweep over config keys "
                                      "(pipelines.sweep); the stage's output is the best trial's.")


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    output_dir: str = Field(description="Where stage folders and manifests go (relative to the recipe file).")
    seed: int = 42
    collective_timeout_s: float = Field(
        1800, ge=10,
        description="Under accelerate launch: how long a rank waits in a collective (all-reduce, barrier) for a "
        "peer that went silent (a frozen or cut-off machine) before the run stops with an error. "
        "PIPELINES_COLLECTIVE_TIMEOUT (seconds) overrides it for one launch. Not part of any fingerprint.",
    )
    data: dict[str, str] = Field(default_factory=dict, description="name -> data card path (relative to the recipe).")
    stages: list[StageSpec] = Field(min_length=1)


class Stage:
    """A validated stage of a recipe: its spec, its typed config and its stage definition."""

    def __init__(self, index: int, spec: StageSpec, config, stage_def):
        self.index = index
        self.spec = spec
        self.config = config
        self.stage_def = stage_def
        self.task: str | None = None  # the task of the model it outputs, as far as validation can tell
        self.data_stage: str | None = None  # `data:` names an earlier stage that writes a data card (prepare)

    @property
    def sweep(self) -> SweepConfig | None:
        return self.spec.sweep

    @property
    def upstream(self) -> list[str]:
        """The earlier stages this one reads: its inputs and the stage its data comes from."""
        return list(self.spec.inputs.values()) + ([self.data_stage] if self.data_stage else [])

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> str:
        return self.spec.type


class Recipe:
    def __init__(self, path: Path, model: RecipeModel, stages: list[Stage], cards: dict, raw: dict):
        self.path = path
        self.model = model
        self.stages = stages
        self.cards = cards  # data key -> pipelines.data.DataCard
        self.raw = raw  # the YAML after overrides, as saved next to every manifest

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def seed(self) -> int:
        return self.model.seed

    @property
    def output_dir(self) -> Path:
        return (self.path.parent / self.model.output_dir).resolve()

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def downstream(self, name: str) -> list[str]:
        """Stages that depend on `name`, directly or not (for --from and invalidation messages)."""
        out: set[str] = {name}
        for s in self.stages:
            if set(s.upstream) & out:
                out.add(s.name)
        out.discard(name)
        return [s.name for s in self.stages if s.name in out]


# ---------------------------------------------------------------- key paths & messages


def _pydantic_problems(err: ValidationError, prefix: tuple = ()) -> list[str]:
    problems = []
    for e in err.errors():
        loc = format_loc(prefix + tuple(e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a field here; check spelling)"
        elif "input" in e and e["type"] not in ("missing",):
            got = e["input"]
            if not isinstance(got, (dict, list)):
                msg += f" (got {got!r})"
        problems.append(f"{loc}: {msg}")
    return problems


# ---------------------------------------------------------------- overrides


def apply_override(raw: dict, override: str) -> None:
    """`stages.tokenizer.config.vocab_size=8000`: stages are addressed by name (or index);
    the value is parsed as YAML, so types are then checked like the file's own."""
    if "=" not in override:
        raise ValueError(f"override {override!r}: expected KEY.PATH=VALUE")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {override!r}: the value is not valid YAML ({' '.join(str(e).split())[:160]}); "
                         "quote the whole argument for the shell, e.g. 'stages.s.config.x={a: 1}'") from None
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            match = [s for s in node if isinstance(s, dict) and s.get("name") == part]
            if match:
                node = match[0]
            elif part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                names = [s.get("name") for s in node if isinstance(s, dict)]
                raise ValueError(f"override {override!r}: no stage named {part!r} (stages: {names})")
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        else:
            raise ValueError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a mapping")
    if not isinstance(node, dict):
        raise ValueError(f"override {override!r}: {'.'.join(parts[:-1])} is not a mapping")
    node[parts[-1]] = value


# ---------------------------------------------------------------- loading


def load_yaml(path: Path) -> Any:
    """A recipe file through the one YAML reader (pipelines.yamlio): UTF-8, duplicate keys refused."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(path, [f"file not found: {path}"]) from None
    except IsADirectoryError:
        raise RecipeError(path, ["is a folder; expected a recipe .yaml file"]) from None
    except OSError as e:
        raise RecipeError(path, [f"cannot read: {e.strerror or e}"]) from None
    text, problem = yamlio.decode(raw)
    if problem:
        raise RecipeError(path, [problem])
    doc, problems = yamlio.parse(text)
    if problems:
        raise RecipeError(path, problems)
    return doc


def load_recipe(path: str | Path, overrides: list[str] | tuple = (), check_data: bool = True) -> Recipe:
    """Parse and validate a recipe completely (config of every stage, data cards, stage graph)
    before any work starts. Raises RecipeError listing every problem."""
    from pipelines.stages import STAGES

    path = Path(path).resolve()
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(path, ["(top level): expected a mapping with name, output_dir, data and stages"])
    problems: list[str] = []
    for ov in overrides:
        try:
            apply_override(raw, ov)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise RecipeError(path, problems)

    model = None
    try:
        model = RecipeModel.model_validate(raw)
        data_map, specs = model.data, list(enumerate(model.stages))
    except ValidationError as e:
        # keep going stage by stage, so that every problem is reported in one go
        problems.extend(_pydantic_problems(e))
        data_map = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        data_map = {k: v for k, v in data_map.items() if isinstance(v, str)}
        specs = []
        for i, s in enumerate(raw.get("stages") if isinstance(raw.get("stages"), list) else []):
            try:
                specs.append((i, StageSpec.model_validate(s)))
            except ValidationError:
                pass  # already reported above

    # data cards
    cards = {}
    if check_data and data_map:
        from pipelines.data import load_card

        for key, card_path in data_map.items():
            full = (path.parent / card_path).resolve()
            try:
                cards[key] = load_card(full)
            except DataError as e:
                problems.append(f"data.{key}: {e}")

    # stages: types, names, the graph, and each typed config
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    types: dict[str, str] = {}
    all_names = [s.name for _, s in specs]
    for i, spec in specs:
        where = f"stages[{i}]"
        if spec.name in seen:
            problems.append(f"{where}.name: duplicate stage name {spec.name!r} (also stages[{seen[spec.name]}])")
        sdef = STAGES.get(spec.type)
        if sdef is None:
            problems.append(f"{where}.type: unknown stage type {spec.type!r}; expected one of {sorted(STAGES)}")
            seen[spec.name] = i
            types[spec.name] = spec.type
            continue
        # data: a card of the recipe's `data`, or an earlier stage that writes one
        data_stage = None
        if spec.data is not None and spec.data not in data_map:
            if spec.data in seen and getattr(STAGES.get(types[spec.data]), "provides_data", False):
                data_stage = spec.data
            elif spec.data in seen:
                problems.append(f"{where}.data: stage {spec.data!r} ({types[spec.data]}) writes no data card; name a "
                                f"card of the recipe's `data` or a stage of a type that writes one "
                                f"({sorted(k for k, v in STAGES.items() if v.provides_data)})")
            elif spec.data in all_names:
                problems.append(f"{where}.data: stage {spec.data!r} comes later; data must come from a card or an "
                                "earlier stage")
            else:
                problems.append(
                    f"{where}.data: no data card named {spec.data!r} in the recipe's `data` (has: "
                    f"{sorted(data_map) or 'none'}) and no earlier stage of that name"
                )
        elif spec.data is not None and spec.data in all_names:
            problems.append(f"{where}.data: {spec.data!r} is both a data card and a stage name; rename one")
        if sdef.data == "required" and spec.data is None:
            problems.append(f"{where}.data: stage type {spec.type!r} needs a data card (a key of `data`)")
        if sdef.data == "none" and spec.data is not None:
            problems.append(f"{where}.data: stage type {spec.type!r} takes no data card")
        # inputs
        for role, ref in spec.inputs.items():
            if role not in sdef.inputs:
                problems.append(
                    f"{where}.inputs.{role}: unknown input role for {spec.type!r}; expected one of {sorted(sdef.inputs) or 'none'}"
                )
            elif ref not in seen:
                if ref in all_names:
                    problems.append(f"{where}.inputs.{role}: stage {ref!r} comes later; inputs must name an earlier stage")
                else:
                    problems.append(
                        f"{where}.inputs.{role}: no stage named {ref!r}; earlier stages: {list(seen) or 'none'}"
                    )
        for role, need in sdef.inputs.items():
            if need == "required" and role not in spec.inputs:
                problems.append(f"{where}.inputs.{role}: required by stage type {spec.type!r} (name an earlier stage)")
        # typed config
        try:
            cfg = sdef.Config.model_validate(spec.config)
        except ValidationError as e:
            problems.extend(_pydantic_problems(e, ("stages", i, "config")))
            cfg = None
        if spec.sweep is not None and cfg is not None:
            from pipelines import sweep

            problems.extend(sweep.check(spec.sweep, spec.type, sdef, spec.config, i))
        seen[spec.name] = i
        types[spec.name] = spec.type
        stages.append(Stage(i, spec, cfg, sdef))
        stages[-1].data_stage = data_stage

    if model is not None:
        out = (path.parent / model.output_dir).resolve()
        clash = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if clash is not None:
            problems.append(f"output_dir: {out} cannot be a folder: {clash} is a file")
        for st in stages:
            if (out / st.name).exists() and not (out / st.name).is_dir():
                problems.append(f"stages[{st.index}].name: {out / st.name} (the stage's folder) is a file")
    if not problems:
        problems.extend(_plan_tasks(stages, path.parent, cards))
    if problems:
        raise RecipeError(path, problems)
    return Recipe(path, model, stages, cards, raw)


def _plan_tasks(stages: list[Stage], recipe_dir: Path, cards: dict) -> list[str]:
    """Each stage's plan hook in order, handed the tasks its input stages will output: what a stage cannot
    do with its input's task is found here, before any work."""
    from pipelines.errors import PipelinesError

    out_task: dict[str, str | None] = {}
    card_of: dict[str, object] = {}  # a prepared data card has its source card's roles and task
    problems = []
    for st in stages:
        inputs = {role: out_task.get(ref) for role, ref in st.spec.inputs.items()}
        card = card_of.get(st.data_stage) if st.data_stage else cards.get(st.spec.data)
        card_of[st.name] = card
        task, found = None, []
        if st.stage_def.plan is not None:
            try:
                task, found = st.stage_def.plan(st.config, inputs, recipe_dir, card)
            except PipelinesError as e:
                found = [str(e)]
        problems += [f"stages[{st.index}].config: {p}" for p in found]
        out_task[st.name] = task
        st.task = task
        if st.sweep is not None and st.sweep.metric is None and task is None:
            problems.append(f"stages[{st.index}].sweep: the stage outputs no task's model, so there is no main metric "
                            "to optimise: set sweep.metric and sweep.direction (e.g. perplexity, minimize)")
    return problems


def recipe_json_schema() -> dict:
    """JSON Schema of recipes, with each stage's config schema selected by its `type`."""
    from pipelines.stages import STAGES

    schema = RecipeModel.model_json_schema()
    stage_schema = schema["$defs"]["StageSpec"]
    variants = []
    for name, sdef in sorted(STAGES.items()):
        cfg_schema = sdef.Config.model_json_schema()
        for k, v in cfg_schema.pop("$defs", {}).items():
            schema["$defs"][k] = v
        variants.append(
            {
                "if": {"properties": {"type": {"const": name}}},
                "then": {"properties": {"config": cfg_schema}},
            }
        )
    stage_schema["properties"]["type"]["enum"] = sorted(STAGES)
    stage_schema["allOf"] = variants
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pipelines recipe"
    return schema
