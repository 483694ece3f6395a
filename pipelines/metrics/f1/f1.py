"""F1 score (binary, macro, micro, weighted, or per class) as an `evaluate` metric module.

Loaded offline with `pipelines.metrics.load("f1")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrappers
`pipelines.metrics.f1` and `pipelines.metrics.classification_report`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
The F1 score is the harmonic mean of precision and recall: F1 = 2 * (precision * recall) / (precision + recall).
Computed with scikit-learn's `f1_score`; classes with no true and no predicted samples score 0.0
(zero_division=0.0, without sklearn's warning).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int` or `str`): predicted labels.
    references (`list` of `int` or `str`): ground-truth labels, one per prediction.
    average (`str` or None, default "binary"):
        "binary": the F1 of `pos_label` only (two-class problems);
        "macro": unweighted mean of the per-class F1s;
        "micro": F1 of the global TP/FP/FN counts (equals accuracy for single-label multi-class);
        "weighted": per-class F1s weighted by support;
        None: the list of per-class F1s, in `labels` order (sorted labels seen, when `labels` is None).
    labels (`list`, optional): the labels to include (and their order when average=None).
    pos_label (`int` or `str`, default 1): the positive class for average="binary".
    sample_weight (`list` of `float`, optional): per-example weights.
    zero_division (`float`, default 0.0): the value for an F1 that is 0/0.
Returns:
    f1 (`float`, or `list` of `float` when average=None).
Examples:
    >>> from pipelines.metrics import load
    >>> load("f1").compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 2], average="macro")
    {'f1': 0.4444444444444444}
"""

_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "f1")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self, predictions, references, average="binary", labels=None, pos_label=1, sample_weight=None, zero_division=0.0
    ):
        return _impl.f1_compute(
            predictions,
            references,
            average=average,
            labels=labels,
            pos_label=pos_label,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
