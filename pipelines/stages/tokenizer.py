"""tokenizer stage: train a byte-level BPE, WordPiece or Unigram tokenizer on a data card's text.

seed -> data -> tokenizer model -> train (streamed) -> save as a transformers fast tokenizer -> evaluate.
The corpus is streamed from the Arrow-backed `datasets` split in batches, never held as one list.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines import chat
from pipelines.errors import PipelinesError
from pipelines.stage import RunContext, StageConfig, StageDef, StageResult

DEFAULT_SPECIAL = {
    # GPT-2 / RoBERTa style: byte-level, never an unknown byte; <mask> lets the same vocab serve MLM
    "bpe": {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"},
    # BERT style
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
    # T5 / SentencePiece style
    "unigram": {"pad": "<pad>", "eos": "</s>", "unk": "<unk>", "bos": "<s>", "mask": "<mask>"},
}
ROLES = ("pad", "bos", "eos", "unk", "cls", "sep", "mask")


class TokenizerConfig(StageConfig):
    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    vocab_size: int = Field(8000, ge=64, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    special_tokens: dict[str, str] | None = Field(
        None, description=f"role -> token for roles {ROLES}; defaults depend on `kind`."
    )
    extra_special_tokens: list[str] = Field(default_factory=list)
    lowercase: bool = False
    normalization: Literal["none", "nfc", "nfkc", "nfd", "nfkd"] = "nfc"
    strip_accents: bool = False
    model_max_length: int = Field(512, ge=8, description="Saved into the tokenizer (no 'huge' default).")
    columns: list[Literal["text", "source", "target", "messages", "prompt", "completion", "chosen", "rejected"]] | None = Field(
        None, description="Which text roles of the data card to train on (a list of turns: their contents); "
        "default: all present."
    )
    chat_template: str | None = Field(
        None, description="A chat template saved into the tokenizer (so the models trained on it chat and serve "
        "with it): a named one (chatml: adds <|im_start|> / <|im_end|>) or a Jinja string.")
    batch_size: int = Field(1000, ge=1)
    max_rows: int | None = Field(None, ge=1, description="Train on at most this many rows (None = all).")
    eval_split: str = "validation"

    @model_validator(mode="after")
    def _check_special(self):
        if self.special_tokens is not None:
            unknown = set(self.special_tokens) - set(ROLES)
            if unknown:
                raise ValueError(f"special_tokens: unknown role(s) {sorted(unknown)}; expected roles {ROLES}")
            if "unk" not in self.special_tokens and self.kind != "bpe":
                raise ValueError(f"special_tokens: a {self.kind} tokenizer needs an 'unk' token")
        if self.chat_template is not None and (problem := chat.template_problem(self.chat_template)):
            raise ValueError(f"chat_template: {problem}")
        return self

    def specials(self) -> dict[str, str]:
        return dict(self.special_tokens) if self.special_tokens is not None else dict(DEFAULT_SPECIAL[self.kind])


def _normalizer(cfg: TokenizerConfig):
    from tokenizers import normalizers

    parts = []
    if cfg.normalization != "none":
        parts.append(getattr(normalizers, cfg.normalization.upper())())
    if cfg.lowercase:
        parts.append(normalizers.Lowercase())
    if cfg.strip_accents:
        if cfg.normalization not in ("nfd", "nfkd"):
            parts.append(normalizers.NFD())
        parts.append(normalizers.StripAccents())
    return normalizers.Sequence(parts) if parts else None


def build_tokenizer(cfg: TokenizerConfig):
    """The untrained `tokenizers` pipeline and its trainer for `cfg.kind`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = cfg.specials()
    special_list = list(dict.fromkeys(list(specials.values()) + cfg.extra_special_tokens))
    if cfg.kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=special_list,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif cfg.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=specials["unk"]))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=special_list, show_progress=False
        )
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size, special_tokens=special_list, unk_token=specials["unk"], show_progress=False
        )
    norm = _normalizer(cfg)
    if norm is not None:
        tok.normalizer = norm
    return tok, trainer


def _post_processor(cfg: TokenizerConfig, tok):
    """BERT-style [CLS] x [SEP] for WordPiece; BPE / Unigram add nothing (the LM stages place EOS)."""
    from tokenizers import processors

    specials = cfg.specials()
    if cfg.kind == "wordpiece" and "cls" in specials and "sep" in specials:
        cls, sep = specials["cls"], specials["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    elif cfg.kind == "bpe":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)


TEXT_COLUMNS = ("text", "source", "target", "messages", "prompt", "completion", "chosen", "rejected")


def text_columns(ds, wanted) -> list[str]:
    present = [c for c in TEXT_COLUMNS if c in ds.column_names]
    cols = [c for c in (wanted or present) if c in present]
    if not cols:
        raise PipelinesError(f"no text columns {wanted or list(TEXT_COLUMNS)} in data (has {ds.column_names})")
    return cols


def _texts(values) -> list[str]:
    """A batch of a text column, or of a column of turn lists (chat rows): their contents."""
    return [t for v in values if v for t in ([v] if isinstance(v, str) else [turn["content"] for turn in v])]


def iter_text(ds, columns, batch_size):
    """Stream batches of strings from an Arrow-backed dataset (memory stays flat)."""
    for batch in ds.select_columns(columns).iter(batch_size=batch_size):
        for col in columns:
            yield _texts(batch[col])


def evaluate_tokenizer(tokenizer, texts: list[str]) -> dict:
    """tokens per word, bytes per token, unknown-token rate, and exact decode round-trips."""
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    n_tok = sum(len(ids) for ids in enc)
    n_words = sum(len(t.split()) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    unk = tokenizer.unk_token_id
    n_unk = sum(ids.count(unk) for ids in enc) if unk is not None else 0
    sample = list(zip(texts, enc))[:500]
    roundtrip = sum(tokenizer.decode(ids, clean_up_tokenization_spaces=False) == t for t, ids in sample)
    return {
        "tokens_per_word": round(n_tok / max(n_words, 1), 4),
        "bytes_per_token": round(n_bytes / max(n_tok, 1), 4),
        "unk_rate": round(n_unk / max(n_tok, 1), 6),
        "roundtrip_exact": round(roundtrip / max(len(sample), 1), 4),
        "eval_tokens": n_tok,
    }


def run(cfg: TokenizerConfig, ctx: RunContext) -> StageResult:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # ---- data
    dsd = ctx.data.load(seed=ctx.seed)
    if "train" not in dsd:
        raise PipelinesError(f"data card {ctx.data.path} has no train split to train a tokenizer on")
    train = dsd["train"]
    if cfg.max_rows is not None and len(train) > cfg.max_rows:
        train = train.shuffle(seed=ctx.seed).select(range(cfg.max_rows))
    cols = text_columns(train, cfg.columns)
    ctx.log(f"training a {cfg.kind} tokenizer (vocab {cfg.vocab_size}) on {len(train)} rows, columns {cols}")

    # ---- train (streamed)
    tok, trainer = build_tokenizer(cfg)
    tok.train_from_iterator(iter_text(train, cols, cfg.batch_size), trainer=trainer, length=len(train) * len(cols))
    _post_processor(cfg, tok)

    # ---- save as a transformers fast tokenizer
    specials = cfg.specials()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=cfg.model_max_length,
        **{f"{role}_token": token for role, token in specials.items()},
        additional_special_tokens=cfg.extra_special_tokens or None,
    )
    notes = chat.set_template(fast, cfg.chat_template) if cfg.chat_template else []
    for note in notes:
        ctx.log(f"note: {note}")
    out = ctx.output_dir / "tokenizer"
    fast.save_pretrained(out)

    # ---- evaluate the saved tokenizer as the next stage will load it
    loaded = AutoTokenizer.from_pretrained(out)
    split = cfg.eval_split if cfg.eval_split in dsd else "train"
    eval_ds = dsd[split]
    texts = [t for col in text_columns(eval_ds, cfg.columns) for t in _texts(eval_ds[col])]
    metrics = evaluate_tokenizer(loaded, texts)
    metrics["vocab_size"] = len(loaded)
    if len(loaded) < cfg.vocab_size:
        ctx.log(f"the corpus only supports {len(loaded)} tokens (asked for {cfg.vocab_size}; min_frequency {cfg.min_frequency})")
    return StageResult(
        metrics=metrics,
        outputs={"tokenizer": "tokenizer"},
        info={"eval_split": split, "train_rows": len(train), "columns": cols, "split_notes": ctx.data.split_notes,
              "chat_template": cfg.chat_template, "notes": notes},
    )


STAGE = StageDef(
    name="tokenizer",
    Config=TokenizerConfig,
    run=run,
    version="1",
    data="required",
    description="Train a BPE / WordPiece / Unigram tokenizer; saves a transformers fast tokenizer.",
)
