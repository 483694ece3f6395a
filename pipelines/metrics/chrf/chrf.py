"""sacreBLEU chrF / chrF++ as an `evaluate` metric module.

Loaded offline with `pipelines.metrics.load("chrf")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrapper
`pipelines.metrics.chrf`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
chrF (Popovic, 2015) is the F-score (beta = 2 by default: recall weighted twice as much as precision) of
character n-grams (n = 1..6), averaged over n, computed over the whole corpus. chrF++ (Popovic, 2017) adds
word n-grams (n = 1..2): pass word_order=2. Computed with sacreBLEU; scores are 0-100. Robust to morphology,
so better suited than BLEU to languages such as German.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): system outputs.
    references (`list` of `str`, or `list` of `list` of `str`): one reference per prediction, or one or more
        references per prediction (the number may differ between predictions).
    char_order (`int`, default 6): maximum character n-gram order.
    word_order (`int`, default 0): maximum word n-gram order; 2 gives chrF++.
    beta (`int`, default 2): recall weight of the F-score.
    lowercase (`bool`, default False): case-insensitive matching.
    whitespace (`bool`, default False): include whitespace in character n-grams.
    eps_smoothing (`bool`, default False): the smoothing of chrF++.py / NLTK / Moses instead of sacreBLEU's.
Returns:
    score (`float`): chrF (or chrF++), 0-100; char_order, word_order, beta: the settings used.
Examples:
    >>> from pipelines.metrics import load
    >>> load("chrf").compute(predictions=["Der Hund bellt."], references=[["Der Hund bellt."]])["score"]
    100.0
"""

_CITATION = """\
@inproceedings{popovic-2015-chrf,
    title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
    year = "2015",
    pages = "392--395",
}
@inproceedings{popovic-2017-chrf,
    title = "chr{F}++: words helping character n-grams",
    author = "Popovi{\\'c}, Maja",
    booktitle = "Proceedings of the Second Conference on Machine Translation",
    year = "2017",
    pages = "612--618",
}
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Sequence(datasets.Value("string", id="sequence"), id="references"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Value("string", id="sequence"),
                        "references": datasets.Value("string", id="sequence"),
                    }
                ),
            ],
            codebase_urls=["https://github.com/mjpost/sacreBLEU#chrf--chrf"],
            reference_urls=["https://aclanthology.org/W15-3049/", "https://aclanthology.org/W17-4770/"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "chrf")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions,
        references,
        char_order=6,
        word_order=0,
        beta=2,
        lowercase=False,
        whitespace=False,
        eps_smoothing=False,
    ):
        return _impl.chrf_compute(
            predictions,
            references,
            char_order=char_order,
            word_order=word_order,
            beta=beta,
            lowercase=lowercase,
            whitespace=whitespace,
            eps_smoothing=eps_smoothing,
        )
