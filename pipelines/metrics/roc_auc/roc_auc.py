"""ROC-AUC and PR-AUC (average precision) of classification scores (an `evaluate` metric module).

Loaded offline with `pipelines.metrics.load("roc_auc")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrapper
`pipelines.metrics.roc_auc`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
The area under the receiver operating characteristic curve (ROC-AUC) and under the precision-recall curve
(PR-AUC, as scikit-learn's average precision) of per-class scores: how well the scores rank the examples of
a class above the others, whatever the decision threshold. Binary: of the positive class; multi-class: the
macro average of one-vs-rest AUCs; multi-label: the macro average of per-label AUCs. Computed with
scikit-learn's `roc_auc_score` and `average_precision_score`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: binary: the positive class's score per example (`float`); multi-class and multi-label:
        a list of class (label) scores per example.
    references: class ids (`int`); multi-label: a list of 0/1 per example.
    label_names (`list` of `str`, optional): names of the score columns, for the per-class results.
    multi_label (`bool`, default False): references are rows of 0/1 labels.
Returns:
    roc_auc, pr_auc (`float`, or None when no class has both positive and negative references),
    roc_auc_per_class, pr_auc_per_class (`dict`), undefined (classes left out), average ("binary" | "macro").
Examples:
    >>> from pipelines.metrics import load
    >>> load("roc_auc").compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])["roc_auc"]
    0.75
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
class RocAuc(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                   "references": datasets.Value("int64")}),
                datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                   "references": datasets.Sequence(datasets.Value("int64"))}),
            ],
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html",
                            "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.average_precision_score.html"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "roc_auc")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, label_names=None, multi_label=False):
        return _impl.roc_auc_compute(predictions, references, label_names=label_names, multi_label=multi_label)
