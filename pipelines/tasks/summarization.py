"""Summarisation: a document -> a short summary of it (a sequence-to-sequence model).

Data roles `source` (the document) + `target` (its reference summary). The model, encoding, generation
and serving are those of translation; what differs: ROUGE-1 / 2 / L / Lsum (rouge-score, 0..100) from
generate() text against the raw references, the lead-N baseline (the document's first N sentences, N=3 as
for CNN/DailyMail, or fewer when the references are shorter: see `lead_n`), the Hub tag, the endpoint
`/summarize`, and `task_specific_params: {summarization: ...}` in the saved config.json, which is how a
folder says it holds a summariser (as facebook/bart-large-cnn's does).
"""

from __future__ import annotations

from pipelines import metrics as M
from pipelines.tasks.translation import Translation, is_seq2seq, summariser


class Summarization(Translation):
    name = "summarization"
    aliases = ("summarisation", "summarize", "summarise")
    pipeline_tag = "summarization"
    endpoint = "/summarize"
    description = "a document -> its summary"
    main_metric = "rougeL"
    response_key = "summaries"
    task_params_key = "summarization"

    def detect(self, config: dict) -> bool:
        return is_seq2seq(config) and summariser(config)

    def text_scores(self, predictions: list[str], references: list[str]) -> dict:
        return {k: round(v, 3) for k, v in M.rouge(predictions, references).items()}

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        n = lead_n(list(train_raw["target"]))
        leads = [" ".join(M.split_sentences(doc)[:n]) for doc in raw["source"]]
        return {f"lead_{n}": self.text_scores(leads, list(raw["target"]))}

    def baseline_notes(self):
        return {"lead_N": "the document's first N sentences as its summary (N = 3, or the median number of "
                          "sentences of the train split's summaries when that is smaller)"}

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'summarize = pipeline("summarization", model="{repo}")',
            'print(summarize("<a long document>", max_new_tokens=64)[0]["summary_text"])',
        ]


def lead_n(train_summaries: list[str]) -> int:
    """N of the lead-N baseline: 3 (the classic lead-3), or the median sentence count of the train
    summaries when that is smaller (one-sentence summaries: lead-1)."""
    import statistics

    counts = [len(M.split_sentences(s)) for s in train_summaries] or [3]
    return max(1, min(3, int(statistics.median(counts))))


TASK = Summarization()
