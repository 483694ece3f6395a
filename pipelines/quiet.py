"""What `pipelines run` keeps off the terminal: messages a user cannot act on, each filtered narrowly (by its
text, category and the module that emits it; never all warnings of a kind), and transformers' load report for
a head that is new on purpose, replaced by one line in our words (see `held_load_report` and `new_weights`).

Filtered by `install()` (called by the CLI):
  - FutureWarning "`is_gradient_checkpointing` is deprecated" from transformers.modeling_utils: peft reads the
    old property name when it wraps a model for LoRA;
  - DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."
    (logged when deepspeed is imported on a machine without a GPU: transformers and accelerate import it to
    check it is there);
  - torchao's "Failed to load .../_C_cutlass_90a.abi3.so" (its CUDA-only kernels, on a CPU machine) and torch's
    "<enum 'KernelPreference'> is an Enum subclass ..." pytree notices (logged when torchao is imported: transformers
    imports it with every model class once it is installed).
Everything else transformers, datasets, peft or torch say still reaches the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

UNACTIONABLE_WARNINGS = (
    # (message regex, category, module regex)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils"),
)
UNACTIONABLE_LOGS = {
    # logger name -> message prefixes dropped
    "DeepSpeed": ("Setting accelerator to CPU.",),
    # torchao 0.18's CPU wheel at import (transformers imports it with every model class once it is installed):
    # one line per CUDA-only kernel library it cannot load, and torch 2.13's deprecation of the pytree
    # registrations it makes for its enums (KernelPreference, ScaleCalculationMode, ...)
    "torchao": ("Failed to load ", "Skipping import of cpp extensions"),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "torch.utils._pytree": ("<enum '",),
}
LOAD_REPORT_LOGGER = "transformers.modeling_utils"


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record):
        return not record.getMessage().startswith(self.prefixes)


def install() -> None:
    """Filter the messages above in this process (idempotent)."""
    for message, category, module in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in UNACTIONABLE_LOGS.items():
        logger = logging.getLogger(name)  # the object deepspeed configures later: the filter stays on it
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


@contextlib.contextmanager
def held_load_report():
    """Hold back the LOAD REPORT that transformers logs from a from_pretrained inside the block; yields the list
    of held records. `release(held)` logs them as they were (when the report says more than we do)."""
    held: list[logging.LogRecord] = []

    class Hold(logging.Filter):
        def filter(self, record):
            if "LOAD REPORT" in record.getMessage():
                held.append(record)
                return False
            return True

    logger, hold = logging.getLogger(LOAD_REPORT_LOGGER), Hold()
    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def release(held: list[logging.LogRecord]) -> None:
    for record in held:
        logging.getLogger(record.name).handle(record)


def _module(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def new_weights(info: dict | None, heads: list[str]) -> tuple[list[str], list[str]] | None:
    """From from_pretrained's loading info: (the head modules whose weights are new, the checkpoint modules left
    unused), or None when a weight outside `heads` is new too (then transformers' own report should be seen)."""
    if info is None or info.get("error_msgs"):
        return None
    new = set(info.get("missing_keys") or ()) | {m[0] for m in info.get("mismatched_keys") or ()}

    def head_of(key):
        return next((h for h in heads if key == h or key.startswith(h + ".")), None)

    if not new or any(head_of(k) is None for k in new):
        return None
    return sorted({head_of(k) for k in new}), sorted({_module(k) for k in info.get("unexpected_keys") or ()})


def import_torchao():
    """`import torchao` with its import-time lines filtered (see UNACTIONABLE_LOGS; also outside the CLI)."""
    install()
    import torchao

    return torchao
