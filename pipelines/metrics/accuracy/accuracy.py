"""Accuracy: the fraction of predictions equal to their reference (an `evaluate` metric module).

Loaded offline with `pipelines.metrics.load("accuracy")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrapper
`pipelines.metrics.accuracy`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among the examples processed:
Accuracy = (TP + TN) / (TP + TN + FP + FN). Computed with scikit-learn's `accuracy_score`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int` or `str`): predicted labels.
    references (`list` of `int` or `str`): ground-truth labels, one per prediction.
    normalize (`bool`, default True): False returns the number of correct predictions instead of the fraction.
    sample_weight (`list` of `float`, optional): per-example weights.
Returns:
    accuracy (`float`): in [0, 1] (or a count when normalize=False).
Examples:
    >>> from pipelines.metrics import load
    >>> load("accuracy").compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
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
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "accuracy")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return _impl.accuracy_compute(predictions, references, normalize=normalize, sample_weight=sample_weight)
