"""Makes data/sst2_chat/ (chat SFT conversations and preference pairs) from the committed SST-2 sample
(data/sst2/*.tsv, see data/README.md for its source and license). Deterministic: re-running reproduces the
files byte for byte. Run from the repository root:

    python data/make_chat_samples.py

No real chat / preference data set can be had offline here, so both are built from real SST-2 reviews:
  conversations (OpenAI `messages`): a system turn (one of 3 wordings), the user asks for the sentiment of a
    review (one of 4 wordings, seeded), the assistant answers with the true label ("positive." / "negative.";
    "The review is positive." / "... negative." after the second system wording); every 5th conversation has a second exchange (the user asks "Are you sure?", the
    assistant confirms the same label). train: the first 600 rows of data/sst2/train.tsv;
    validation / test: the first 100 rows of each.
  preference pairs (`prompt` as a message list, `chosen` / `rejected` as one assistant turn): the same
    question; chosen = the true label's answer, rejected = the other label's answer in the same wording.
    train: 400 of the first 800 train rows (every second), validation / test: the first 100 rows of each.
"""

import csv
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SYSTEMS = ["You label the sentiment of movie reviews.", "You are a helpful assistant that reads film reviews.",
           "Answer with the sentiment of the review: positive or negative."]
ASKS = ["Is this review positive or negative?\n\n{t}", "What is the sentiment of this review: {t}",
        "Review: {t}\nPositive or negative?", "Tell me if this movie review is positive or negative. {t}"]
ANSWERS = [("positive.", "negative."), ("The review is positive.", "The review is negative.")]


def rows(split):
    with open(ROOT / "sst2" / f"{split}.tsv", encoding="utf-8", newline="") as f:
        return [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def question(rng, text):
    """(system + user turns, the answers' wording: set by the system turn, so a reply can be exactly right)"""
    s = rng.randrange(len(SYSTEMS))
    turns = [{"role": "system", "content": SYSTEMS[s]}, {"role": "user", "content": rng.choice(ASKS).format(t=text)}]
    return turns, ANSWERS[s % len(ANSWERS)]


def write(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def main():
    out = ROOT / "sst2_chat"
    out.mkdir(exist_ok=True)
    for split, n_convs, n_pairs in (("train", 600, 400), ("validation", 100, 100), ("test", 100, 100)):
        rng = random.Random(f"sst2-chat-{split}")
        convs, pairs = [], []
        for i, (text, label) in enumerate(rows(split)[:max(n_convs, 2 * n_pairs if split == "train" else n_pairs)]):
            turns, words = question(rng, text)
            turns = turns + [{"role": "assistant", "content": words[1 - label]}]
            if i % 5 == 4:
                turns += [{"role": "user", "content": "Are you sure?"},
                          {"role": "assistant", "content": "Yes, " + words[1 - label]}]
            if i < n_convs:
                convs.append({"messages": turns})
            if len(pairs) < n_pairs and (split != "train" or i % 2 == 0):
                prompt, words = question(rng, text)
                pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": words[1 - label]}],
                              "rejected": [{"role": "assistant", "content": words[label]}]})
        write(out / f"{split}.jsonl", convs)
        write(out / f"pairs_{split}.jsonl", pairs)


if __name__ == "__main__":
    main()
