"""The stage registry: one module per stage type, one line each here. Adding a stage = one file + one line."""

from pipelines.stages import tokenizer

STAGES = {
    "tokenizer": tokenizer.STAGE,
}
