"""pipelines.quiet: only the named messages are filtered, and a load report is ours to replace only when the
task's head is all that is new. (A real run on a terminal: tests/stages/test_finetune.py.)"""

from __future__ import annotations

import contextlib
import logging
import warnings

from pipelines import quiet


@contextlib.contextmanager
def records_of(name: str):
    """The messages logger `name` hands to its handlers (transformers and deepspeed do not propagate theirs)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, keep, level = logging.getLogger(name), Keep(), logging.getLogger(name).level
    logger.addHandler(keep)
    logger.setLevel(logging.WARNING)
    try:
        yield seen
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)


def test_only_the_named_warnings_and_log_lines_are_filtered():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        msg = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
        warnings.warn_explicit(msg, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="mine")                # another module
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "modeling_utils.py", 2,
                               module="transformers.modeling_utils")                          # another message
    assert [(str(w.message), w.filename) for w in seen] == [(msg, "mine.py"), ("`x` is deprecated", "modeling_utils.py")]

    logger = logging.getLogger("DeepSpeed")
    with records_of("DeepSpeed") as seen:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("Setting ds_accelerator to cuda (auto detect)")
    assert seen == ["Setting ds_accelerator to cuda (auto detect)"]
    quiet.install()
    assert sum(isinstance(f, quiet._DropPrefixes) for f in logger.filters) == 1  # idempotent


def test_a_load_report_is_replaced_only_when_just_the_head_is_new():
    heads = ["classifier"]
    fresh = {"missing_keys": {"classifier.weight", "classifier.bias"}, "unexpected_keys": {"pooler.dense.weight",
             "pooler.dense.bias"}, "mismatched_keys": set(), "error_msgs": []}
    assert quiet.new_weights(fresh, heads) == (["classifier"], ["pooler.dense"])
    resized = {"missing_keys": set(), "unexpected_keys": set(), "error_msgs": [],
               "mismatched_keys": {("classifier.weight", (10, 64), (2, 64))}}  # another head's labels
    assert quiet.new_weights(resized, heads) == (["classifier"], [])
    broken = {**fresh, "missing_keys": {"classifier.weight", "encoder.layer.0.attention.self.query.weight"}}
    assert quiet.new_weights(broken, heads) is None          # a body weight is new: transformers' report is seen
    assert quiet.new_weights({**fresh, "missing_keys": set()}, heads) is None   # nothing new: not our case
    assert quiet.new_weights(None, heads) is None


def test_a_held_load_report_is_released_as_it_was():
    logger = logging.getLogger(quiet.LOAD_REPORT_LOGGER)
    with records_of(quiet.LOAD_REPORT_LOGGER) as seen:
        with quiet.held_load_report() as held:
            logger.warning("BertForTokenClassification LOAD REPORT from: x\nclassifier.weight | MISSING")
            logger.warning("something else")
        assert seen == ["something else"] and len(held) == 1
        quiet.release(held)
    assert [m.split("\n")[0] for m in seen] == ["something else", "BertForTokenClassification LOAD REPORT from: x"]
