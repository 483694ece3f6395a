"""Entity-level precision / recall / F1 of BIO-tagged sentences (seqeval) as an `evaluate` metric module.

Loaded offline with `pipelines.metrics.load("seqeval")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrappers
`pipelines.metrics.seqeval` and `pipelines.metrics.token_classification_report`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
Entity-level scores for sequence labelling (named-entity recognition) with BIO tags, computed with seqeval:
an entity counts as found only when its type and its span both match. entity_precision / entity_recall /
entity_f1 are micro-averaged over entities; per_type holds each entity type's scores; token_accuracy is the
share of tags that are right (O included). Undefined scores (no entity predicted or present) are 0.0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `str`): predicted tags, one list per sentence.
    references (`list` of `list` of `str`): reference tags, one list per sentence, as long as its prediction.
    mode (`str`, optional): None (conlleval's lenient chunking, the default) or "strict".
    scheme (`str`, optional): with mode="strict": "IOB2", "IOE2", "IOBES", "BILOU", ...
Returns:
    entity_precision, entity_recall, entity_f1, token_accuracy (`float`), per_type ({type: {precision,
    recall, f1, number}}), f1_per_type ({type: f1}), num_sentences, num_entities.
Examples:
    >>> from pipelines.metrics import load
    >>> load("seqeval").compute(predictions=[["B-per", "I-per", "O"]], references=[["B-per", "I-per", "O"]])["entity_f1"]
    1.0
"""

_CITATION = """\
@misc{seqeval,
  title={{seqeval}: A Python framework for sequence labeling evaluation},
  url={https://github.com/chakki-works/seqeval},
  author={Hiroki Nakayama},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "seqeval")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, mode=None, scheme=None):
        return _impl.seqeval_compute(predictions, references, mode=mode, scheme=scheme)
