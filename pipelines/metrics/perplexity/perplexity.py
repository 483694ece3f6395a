"""Perplexity from negative log-likelihoods (NOT from a model) as an `evaluate` metric module.

Loaded offline with `pipelines.metrics.load("perplexity")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrappers
`pipelines.metrics.perplexity` and `pipelines.metrics.perplexity_from_loss`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
Corpus perplexity of a language model, from log-likelihoods you already computed (e.g. in an evaluation loop):
perplexity = exp(total NLL / total tokens), the exponential of the mean per-token negative log-likelihood
(natural log). Unlike the Hub's `perplexity` metric this runs no model. Each example contributes its summed
NLL (`predictions`) and its number of scored tokens (`references`); for per-token NLLs pass a count of 1 each.
Overflow gives `inf` instead of an error.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): per-example summed negative log-likelihood (nats, >= 0).
    references (`list` of `int`): per-example number of tokens those NLLs cover (>= 0, total > 0).
Returns:
    perplexity (`float`): exp(total_nll / n_tokens); inf when that overflows.
    mean_nll (`float`): total_nll / n_tokens (the mean cross-entropy loss).
    total_nll (`float`), n_tokens (`int`): the totals.
Examples:
    >>> from pipelines.metrics import load
    >>> load("perplexity").compute(predictions=[2.0, 4.0], references=[2, 4])["perplexity"]  # exp(1)
    2.718281828459045
"""

_CITATION = """\
@article{jelinek1977perplexity,
  title={Perplexity--a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America},
  volume={62},
  number={S1},
  pages={S63--S63},
  year={1977},
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "perplexity")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references):
        return _impl.perplexity_compute(predictions, references)
