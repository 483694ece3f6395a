"""The stage registry: one module per stage type, one line each here. Adding a stage = one file + one line."""

from pipelines.stages import prepare
from pipelines.stages import tokenizer
from pipelines.stages import pretrain
from pipelines.stages import finetune
from pipelines.stages import preference
from pipelines.stages import distill, quantize
from pipelines.stages import prune
from pipelines.stages import export
from pipelines.stages import publish

STAGES = {
    "prepare": prepare.STAGE,
    "tokenizer": tokenizer.STAGE,
    "pretrain": pretrain.STAGE,
    "finetune": finetune.STAGE,
    "preference": preference.STAGE,
    "distill": distill.STAGE,
    "quantize": quantize.STAGE,
    "prune": prune.STAGE,
    "export": export.STAGE,
    "publish": publish.STAGE,
}
