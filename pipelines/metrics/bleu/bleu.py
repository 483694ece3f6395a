"""sacreBLEU corpus BLEU as an `evaluate` metric module.

Loaded offline with `pipelines.metrics.load("bleu")`. The computation lives in `pipelines.metrics._impl`
(absolute import: `evaluate` runs this script from a copy in its module cache), shared with the wrapper
`pipelines.metrics.bleu`.
"""

import datasets
import evaluate

from pipelines.metrics import _impl

_DESCRIPTION = """\
BLEU (Papineni et al., 2002) as computed by sacreBLEU (Post, 2018): the geometric mean of modified n-gram
precisions (n = 1..4) times a brevity penalty, over the whole corpus, on sacreBLEU's standard tokenization
(13a by default), so scores are comparable with published ones. Scores are 0-100.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): system outputs, untokenized.
    references (`list` of `str`, or `list` of `list` of `str`): one reference per prediction, or one or more
        references per prediction (the number may differ between predictions).
    tokenize (`str`, default "13a"): sacreBLEU tokenizer: "13a", "intl", "zh", "ja-mecab", "char", "none", ...
    lowercase (`bool`, default False): lowercase hypotheses and references.
    smooth_method (`str`, default "exp"): "none", "floor", "add-k" or "exp".
    smooth_value (`float`, optional): the value for "floor" / "add-k".
    use_effective_order (`bool`, default False): ignore n-gram orders with no matches (for sentence BLEU).
    force (`bool`, default False): do not complain about already-tokenized input.
Returns:
    score (`float`): BLEU, 0-100.
    counts, totals (`list` of `int`): matching / total n-grams per order.
    precisions (`list` of `float`): n-gram precisions per order, 0-100.
    bp (`float`): brevity penalty.
    sys_len, ref_len (`int`): hypothesis / effective reference length in tokens.
Examples:
    >>> from pipelines.metrics import load
    >>> load("bleu").compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["score"]
    100.00000000000004
"""

_CITATION = """\
@inproceedings{papineni-etal-2002-bleu,
    title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
    author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
    booktitle = "Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics",
    year = "2002",
    pages = "311--318",
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
class Bleu(evaluate.Metric):
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
            codebase_urls=["https://github.com/mjpost/sacreBLEU"],
            reference_urls=["https://aclanthology.org/P02-1040/", "https://aclanthology.org/W18-6319/"],
        )

    def compute(self, *, predictions=None, references=None, **kwargs):
        """`evaluate.EvaluationModule.compute`, but empty input raises a clear MetricInputError."""
        _impl.reject_empty_call(predictions, references, "bleu")
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(
        self,
        predictions,
        references,
        tokenize="13a",
        lowercase=False,
        smooth_method="exp",
        smooth_value=None,
        use_effective_order=False,
        force=False,
    ):
        return _impl.bleu_compute(
            predictions,
            references,
            tokenize=tokenize,
            lowercase=lowercase,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            use_effective_order=use_effective_order,
            force=force,
        )
