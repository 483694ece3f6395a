"""ROUGE-1 / 2 / L / Lsum of generated summaries against references (an `evaluate` metric module).

Loaded offline with `pipelines.metrics.load("rouge")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrapper
`pipelines.metrics.rouge`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
ROUGE (Lin, 2004) counts the n-grams (rouge1, rouge2) and the longest common subsequence (rougeL; rougeLsum
over the sentences of the summary) that a generated text shares with its reference. Scores are F-measures in
0..100, averaged over the examples, computed with Google's `rouge-score` (a reimplementation of ROUGE-1.5.5),
Porter stemming on by default. For rougeLsum both texts are split into sentences after . ! ? and at newlines.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`, or of `list` of `str`): one reference (or several) per prediction.
    rouge_types (`list` of `str`, default all): some of rouge1, rouge2, rougeL, rougeLsum.
    use_stemmer (`bool`, default True): Porter-stem words before matching.
Returns:
    rouge1, rouge2, rougeL, rougeLsum (`float`): mean F-measure in 0..100.
Examples:
    >>> from pipelines.metrics import load
    >>> load("rouge").compute(predictions=["the cat sat"], references=["the cat sat"])["rouge1"]
    100.0
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "rouge")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, rouge_types=_impl.ROUGE_TYPES, use_stemmer=True):
        return _impl.rouge_compute(predictions, references, rouge_types=rouge_types, use_stemmer=use_stemmer)
