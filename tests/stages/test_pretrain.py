"""The pretrain stage and its packing helpers, on the shipped Tiny Shakespeare / Multi30k samples with
tiny models: packed blocks keep every token and the document separators, the tokenised cache follows
the tokenizer, causal and masked LMs learn (validation perplexity well below the unigram baseline),
the runner chain tokenizer -> pretrain writes its metrics, kill -9 + re-run resumes at the same step
with the same losses, and (slow) two-rank ZeRO-2 / ZeRO-3 runs under `accelerate launch` give a
model folder that a plain process loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import packing, runner
from pipelines.errors import PipelinesError, RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT
from tests.launch import accelerate_launch

CARDS = ROOT / "data_cards"
TOKENIZER = {"name": "tok", "type": "tokenizer", "data": "d", "config": {"kind": "bpe", "vocab_size": 1000, "model_max_length": 64}}
TINY = {"layers": 2, "heads": 2, "hidden": 64, "context_length": 64}
TRAIN = {"batch_size": 16, "lr": 3e-3, "warmup": 10, "scheduler": "cosine", "weight_decay": 0.01, "logging_steps": 10, "precision": "fp32"}


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """Tokenised data and the measured matmul peak go to a throw-away cache (subprocesses inherit it)."""
    old = os.environ.get("PIPELINES_CACHE")
    os.environ["PIPELINES_CACHE"] = str(tmp_path_factory.mktemp("pipelines_cache"))
    yield
    if old is None:
        os.environ.pop("PIPELINES_CACHE", None)
    else:
        os.environ["PIPELINES_CACHE"] = old


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, oversubscribed 2-core machine
    OpenMP's spinning threads make each step ~10x slower; subprocesses get OMP_NUM_THREADS=1 (_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One output_dir for the module: its tokenizer stage runs once, later recipes skip it."""
    return tmp_path_factory.mktemp("pretrain_runs")


def pretrain(name, objective="causal_lm", model=None, train=None, **config):
    return {
        "name": name,
        "type": "pretrain",
        "data": "d",
        "inputs": {"tokenizer": "tok"},
        "config": {"objective": objective, "model": {**TINY, **(model or {})}, "train": {**TRAIN, **(train or {})}, **config},
    }


def write_recipe(out: Path, *stages, card="tinyshakespeare_sample.yaml", tokenizer=None, file="recipe.yaml") -> Path:
    doc = {
        "name": "pretrain-test",
        "output_dir": str(out),
        "seed": 42,
        "data": {"d": str(CARDS / card)},
        "stages": [tokenizer or TOKENIZER, *stages],
    }
    path = out / file
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def manifest(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


def loads_in_plain_process(folder: Path, auto: str = "AutoModelForCausalLM") -> dict:
    """from_pretrained in a fresh interpreter (no DeepSpeed, no Trainer): what the next stage does."""
    code = textwrap.dedent(
        f"""
        import json, torch, transformers
        m = transformers.{auto}.from_pretrained({str(folder)!r}).eval()
        t = transformers.AutoTokenizer.from_pretrained({str(folder)!r})
        ids = t("ROMEO: what light", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = m(input_ids=ids, labels=ids)
        print(json.dumps({{"params": sum(p.numel() for p in m.parameters()), "loss": out.loss.item(),
                           "nonzero": bool(all(p.abs().sum() > 0 for n, p in m.named_parameters() if "bias" not in n))}}))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def tokenizer(runs):
    """The tokenizer stage's output (run through the runner once for the module)."""
    from transformers import AutoTokenizer

    runner.run(load_recipe(write_recipe(runs, file="tok.yaml")))
    return AutoTokenizer.from_pretrained(runs / "tok" / "tokenizer")


@pytest.fixture(scope="module")
def sample_train():
    from pipelines.data import load_card

    return load_card(CARDS / "tinyshakespeare_sample.yaml").load(seed=42)["train"]


# ---------------------------------------------------------------- packing


def test_packed_blocks_hold_every_token_once_with_separators_and_no_padding(tokenizer, sample_train, tmp_path):
    docs = sample_train["text"]
    tok = packing.tokenize_documents(sample_train, tokenizer, "text", cache_dir=tmp_path)
    eos = tokenizer.eos_token_id
    expected = [i for d in docs for i in tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    # documents: one per row, each followed by EOS (and EOS nowhere else: the text holds no "</s>")
    assert len(tok) == len(docs) and all(row[-1] == eos for row in tok["input_ids"])
    assert expected.count(eos) == len(docs)

    block = 64
    # small Arrow batches force the carry-over path: leftovers join the next batch instead of being dropped
    packed = packing.pack(tok, block, cache_dir=tmp_path, batch_rows=7)
    blocks = np.asarray(packed.dataset.with_format("numpy")["input_ids"])
    assert blocks.shape == (len(expected) // block, block)
    assert tokenizer.pad_token_id not in blocks
    # the blocks, in order, are exactly the token stream; only the final < block remainder is left out
    assert blocks.ravel().tolist() == expected[: blocks.size]
    assert packed.remainder == len(expected) - blocks.size < block
    assert packed.n_tokens == len(expected) and packed.n_blocks == len(blocks)
    # documents cross block boundaries: separators land mid-block, and a block can start mid-document
    assert (blocks[:, 1:-1] == eos).any()

    # the same with one big batch (cached file reused for the same inputs)
    again = packing.pack(tok, block, cache_dir=tmp_path / "other")
    assert np.array_equal(np.asarray(again.dataset.with_format("numpy")["input_ids"]), blocks)


def test_pack_rejects_a_split_shorter_than_one_block(tokenizer, sample_train, tmp_path):
    tok = packing.tokenize_documents(sample_train.select(range(2)), tokenizer, "text", cache_dir=tmp_path)
    with pytest.raises(PipelinesError, match="fewer than one block of 4096"):
        packing.pack(tok, 4096, cache_dir=tmp_path)


def test_tokenised_cache_follows_the_tokenizer_not_its_path(tokenizer, sample_train, tmp_path):
    """PITFALLS 'stale preprocessing cache': retrain the tokenizer into the same folder, and the cached
    ids must be the new tokenizer's, not the old ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cache = tmp_path / "cache"
    rows = sample_train.select(range(50))
    first = packing.tokenize_documents(rows, tokenizer, "text", cache_dir=cache)
    again = packing.tokenize_documents(rows, tokenizer, "text", cache_dir=cache)
    assert again.cache_files[0]["filename"] == first.cache_files[0]["filename"]  # a hit for the same tokenizer

    folder = tmp_path / "tokenizer"
    tokenizer.save_pretrained(folder)
    old = AutoTokenizer.from_pretrained(folder)
    assert packing.tokenizer_fingerprint(old) == packing.tokenizer_fingerprint(tokenizer)
    # retrain a smaller BPE with the same special tokens, saved to the same folder
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(sample_train["text"][:300], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", mask_token="<mask>").save_pretrained(folder)
    new = AutoTokenizer.from_pretrained(folder)
    assert packing.tokenizer_fingerprint(new) != packing.tokenizer_fingerprint(old)

    second = packing.tokenize_documents(rows, new, "text", cache_dir=cache)
    assert second.cache_files[0]["filename"] != first.cache_files[0]["filename"]
    assert second[0]["input_ids"] == new(rows[0]["text"], add_special_tokens=False)["input_ids"] + [new.eos_token_id]
    assert second[0]["input_ids"] != first[0]["input_ids"]
    # the block size is part of the packed cache's key too
    a, b = packing.pack(second, 32, cache_dir=cache), packing.pack(second, 48, cache_dir=cache)
    assert len(a.dataset[0]["input_ids"]) == 32 and len(b.dataset[0]["input_ids"]) == 48


def test_unigram_baseline_is_the_smoothed_frequency_model():
    counts = np.array([3, 1, 0, 0])  # add-one: p = (4, 2, 1, 1) / 8
    nll, n = packing.unigram_nll(counts, [0, 1, 2])
    assert n == 3 and nll == pytest.approx(-np.log(4 / 8) - np.log(2 / 8) - np.log(1 / 8))


# ---------------------------------------------------------------- config checks


def test_bad_config_is_reported_before_any_work(tmp_path):
    bad = pretrain("p", objective="masked_lm", model={"architecture": "gpt2", "hidden": 65, "heads": 2})
    with pytest.raises(RecipeError) as e:
        load_recipe(write_recipe(tmp_path, bad))
    msg = str(e.value)
    assert "hidden (65) must be a multiple of heads (2)" in msg


def test_architecture_must_fit_the_objective(tmp_path):
    with pytest.raises(RecipeError, match="architecture 'gpt2' does not fit objective 'masked_lm'"):
        load_recipe(write_recipe(tmp_path, pretrain("p", objective="masked_lm", model={"architecture": "gpt2"})))


def test_shipped_recipes_and_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    for name in ("pretrain_tinyshakespeare_sample.yaml", "pretrain_tinyshakespeare.yaml"):
        path = ROOT / "recipes" / name
        assert path.read_text().startswith("# pipelines run recipes/" + name)
        recipe = load_recipe(path, check_data=False)
        assert [s.type for s in recipe.stages] == ["tokenizer", "pretrain"]
    configs = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {
        "single_process", "ddp", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3",
        "deepspeed_zero3_offload", "fsdp", "multinode_zero3",
    }
    for p in configs:
        cfg = load_config_from_file(str(p))
        assert cfg.use_cpu is False, p.name  # --cpu / use_cpu would make the Trainer skip DeepSpeed
        if "deepspeed" in p.stem or "zero" in p.stem:
            assert cfg.distributed_type == "DEEPSPEED"
    zero3 = load_config_from_file(str(ROOT / "accelerate_configs/deepspeed_zero3.yaml"))
    assert zero3.deepspeed_config["zero3_save_16bit_model"] is True


# ---------------------------------------------------------------- the stage through the runner


def test_causal_lm_through_the_runner_beats_the_unigram_baseline(runs, tokenizer):
    """tokenizer -> pretrain (GPT-2, bf16 autocast + fused AdamW + SDPA as in the shipped recipe)."""
    stage = pretrain(
        "clm",
        model={"attn_implementation": "sdpa"},
        train={"max_steps": 120, "eval_steps": 60, "save_steps": 60, "precision": "bf16", "optim": "adamw_torch_fused"},
    )
    steps = runner.run(load_recipe(write_recipe(runs, stage, file="clm.yaml")))
    assert {s.stage.name: s.action for s in steps} == {"tok": "skip", "clm": "run"}
    m = manifest(runs, "clm")
    metrics = m["metrics"]
    for key in ("val_loss", "val_perplexity", "unigram_perplexity", "train_tokens", "tokens_per_s", "mfu", "params", "steps"):
        assert metrics[key] is not None and metrics[key] > 0, key
    assert metrics["steps"] == 120
    assert metrics["train_tokens"] == 120 * 16 * 64  # packed: every token is real
    assert metrics["val_perplexity"] == pytest.approx(np.exp(metrics["val_loss"]), rel=1e-3)
    assert metrics["val_perplexity"] < 0.6 * metrics["unigram_perplexity"], metrics
    assert 0 < metrics["mfu"] < 1
    info = m["info"]
    assert info["precision"] == "bf16" and info["data"]["train_remainder_dropped"] < 64
    assert m["outputs"] == {"model": "model", "tokenizer": "model"}
    history = json.loads((runs / "clm" / "log_history.json").read_text())
    assert any("eval_perplexity" in h for h in history) and any("loss" in h for h in history)
    # the final folder: safetensors + config + tokenizer, loadable in a plain process, vocab = len(tokenizer)
    folder = runs / "clm" / "model"
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == len(tokenizer) and cfg["n_positions"] == 64
    loaded = loads_in_plain_process(folder)
    assert loaded["params"] == metrics["params"]
    assert loaded["loss"] < np.log(len(tokenizer))  # trained, not random (random ~ ln V)


def test_compile_loss_trains_the_same_model_through_a_compiled_loss(runs, tokenizer):
    """train.compile_loss: the model's loss_function runs under torch.compile (the Trainer's forward stays eager);
    the same seed gives the same losses as the eager run, to float tolerance."""
    train = {"max_steps": 6, "eval_steps": 6, "save_steps": 6, "logging_steps": 1}
    from torch._dynamo.utils import counters

    eager, compiled = pretrain("eager", train=train), pretrain("compiled_loss", train={**train, "compile_loss": True})
    counters.clear()
    runner.run(load_recipe(write_recipe(runs, eager, compiled, file="compile_loss.yaml")))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo compiled something: the loss (nothing else is compiled)
    assert manifest(runs, "compiled_loss")["config"]["train"]["compile_loss"] is True
    a, b = losses_by_step(runs / "eager"), losses_by_step(runs / "compiled_loss")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [b[k] for k in sorted(b)] == pytest.approx([a[k] for k in sorted(a)], rel=1e-3)
    assert manifest(runs, "compiled_loss")["metrics"]["val_loss"] == pytest.approx(manifest(runs, "eager")["metrics"]["val_loss"], rel=1e-3)


def test_masked_lm_beats_the_unigram_baseline(runs, tokenizer):
    """BERT-style MLM sits on the unigram plateau for a few hundred steps before context pays off; 40 %
    masking (Wettig et al. 2023: as good as 15 %) gives each step ~2.7x more targets to learn from."""
    stage = pretrain(
        "mlm",
        objective="masked_lm",
        model={"architecture": "bert"},
        mlm_probability=0.4,
        train={"max_steps": 500, "eval_steps": 250, "save_steps": 250, "warmup": 40},
    )
    runner.run(load_recipe(write_recipe(runs, stage, file="mlm.yaml")))
    metrics = manifest(runs, "mlm")["metrics"]
    # both perplexities are on the same pre-masked validation tokens (~4,000 of them)
    assert metrics["val_tokens"] > 3000
    assert metrics["val_perplexity"] < 0.75 * metrics["unigram_perplexity"], metrics
    loaded = loads_in_plain_process(runs / "mlm" / "model", "AutoModelForMaskedLM")
    assert loaded["params"] == metrics["params"]


KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import TrainerCallback
    from pipelines import training, cli

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)   # kill -9: no cleanup, no atexit, no finally

    original = training.callbacks
    training.callbacks = lambda cfg: original(cfg) + [KillAt()]
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def losses_by_step(folder: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h}


def test_resume_after_kill_9_continues_at_the_same_step_with_the_same_losses(runs, tokenizer):
    """Killed at step 17 (checkpoint at 10), the re-run resumes from checkpoint-10 with optimizer,
    scheduler, RNG and data position restored: steps 11..24 have the losses of an uninterrupted run.
    Same seed, same shapes, same thread count on the CPU make every step the same computation, so we
    allow only 1e-4 relative (float32 logging noise), far below the ~1e-2 step-to-step loss change
    that a wrong batch or a restarted schedule would cause."""
    train = {"max_steps": 24, "save_steps": 10, "eval_steps": 12, "logging_steps": 1}
    ref = pretrain("ref", train=train, model={"dropout": 0.1})
    res = pretrain("res", train=train, model={"dropout": 0.1})
    runner.run(load_recipe(write_recipe(runs, ref, file="ref.yaml")))
    recipe = write_recipe(runs, res, file="res.yaml")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, "run", str(recipe)], env={**_env(), "KILL_AT_STEP": "17"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (runs / "res" / "manifest.json").exists()
    assert sorted(p.name for p in (runs / "res" / "checkpoints").iterdir()) == ["checkpoint-10"]

    again = subprocess.run([sys.executable, "-m", "pipelines", "run", str(recipe)], env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from checkpoint-10" in again.stdout
    m_ref, m_res = manifest(runs, "ref"), manifest(runs, "res")
    assert m_res["resumed"] is True and m_res["metrics"]["steps"] == m_ref["metrics"]["steps"] == 24
    a, b = losses_by_step(runs / "ref"), losses_by_step(runs / "res")
    assert sorted(a) == sorted(b) == list(range(1, 25))  # one loss per step: no restart from zero
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])
    assert m_res["metrics"]["val_loss"] == pytest.approx(m_ref["metrics"]["val_loss"], rel=1e-4)
    assert m_res["metrics"]["train_tokens"] == m_ref["metrics"]["train_tokens"]


# ---------------------------------------------------------------- slow: seq2seq, DeepSpeed ranks


@pytest.mark.slow
def test_seq2seq_translation_model_from_scratch(tmp_path):
    tok = {"name": "tok", "type": "tokenizer", "data": "d", "config": {"kind": "bpe", "vocab_size": 1500, "model_max_length": 64}}
    stage = pretrain(
        "mt",
        objective="seq2seq",
        model={"hidden": 64, "heads": 4, "layers": 2, "context_length": 64},
        train={"max_steps": 150, "eval_steps": 150, "save_steps": 150, "lr": 3e-3, "batch_size": 32, "precision": "bf16"},
        seq2seq={"eval_samples": 48, "num_beams": 2, "max_new_tokens": 32},
    )
    runner.run(load_recipe(write_recipe(tmp_path, stage, card="multi30k_sample.yaml", tokenizer=tok)))
    m = manifest(tmp_path, "mt")
    metrics = m["metrics"]
    assert metrics["val_perplexity"] < 0.5 * metrics["unigram_perplexity"], metrics
    assert metrics["generation_samples"] == 48 and metrics["chrf"] > 5 and "bleu" in metrics
    assert m["info"]["sample_translation"]["prediction"]
    loads_in_plain_process(tmp_path / "mt" / "model", "AutoModelForSeq2SeqLM")


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_rank_deepspeed_run_gives_a_plain_loadable_folder(tmp_path, zero):
    stage = pretrain("p", train={"max_steps": 12, "eval_steps": 6, "save_steps": 6, "batch_size": 8})
    recipe = write_recipe(tmp_path, stage)
    res = accelerate_launch(f"deepspeed_zero{zero}.yaml", recipe)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    m = manifest(tmp_path, "p")
    assert m["world_size"] == 2 and m["info"]["deepspeed"] is True and m["info"]["zero_stage"] == zero
    assert m["metrics"]["train_tokens"] == 12 * 8 * 2 * 64  # both ranks' tokens
    ckpt = tmp_path / "p" / "checkpoints" / "checkpoint-12"
    assert (ckpt / "global_step12").is_dir()  # DeepSpeed's own (partitioned) checkpoint for resume
    loaded = loads_in_plain_process(tmp_path / "p" / "model")
    assert loaded["params"] == m["metrics"]["params"] and loaded["nonzero"]  # gathered, not empty shards
    assert abs(loaded["loss"] - m["metrics"]["val_loss"]) < 1.5  # the trained weights, not a fresh init


@pytest.mark.slow
def test_two_rank_zero2_resume_after_kill_9(tmp_path):
    """kill -9 of rank 0 under accelerate launch takes the whole launch down; re-launching the same way
    resumes from the last complete checkpoint with the same global step and losses as an
    uninterrupted two-rank run."""
    train = {"max_steps": 16, "save_steps": 8, "eval_steps": 8, "logging_steps": 1, "batch_size": 8}
    ref_recipe = write_recipe(tmp_path, pretrain("ref", train=train), file="ref.yaml")
    res_recipe = write_recipe(tmp_path, pretrain("res", train=train), file="res.yaml")
    assert accelerate_launch("deepspeed_zero2.yaml", ref_recipe).returncode == 0
    script = tmp_path / "kill_at.py"
    script.write_text(KILL_AT)
    killed = accelerate_launch("deepspeed_zero2.yaml", res_recipe, script=str(script), env={"KILL_AT_STEP": "11"})
    assert killed.returncode != 0 and not (tmp_path / "res" / "manifest.json").exists()
    again = accelerate_launch("deepspeed_zero2.yaml", res_recipe)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming from checkpoint-8" in again.stdout
    a, b = losses_by_step(tmp_path / "ref"), losses_by_step(tmp_path / "res")
    assert manifest(tmp_path, "res")["metrics"]["steps"] == 16 and sorted(b) == list(range(1, 17))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), (step, a[step], b[step])


@pytest.mark.slow
def test_fsdp_without_gpus_is_refused_not_silently_run_as_ddp(tmp_path):
    """accelerate 1.15 applies FSDP only to GPU-type launches: on the CPU, fsdp.yaml used to train plain DDP
    (same losses as ddp.yaml, no shards) while saying FSDP. Now the training stage refuses, naming what works."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("FSDP does run on GPUs")
    recipe = write_recipe(tmp_path, pretrain("p", train={"max_steps": 2, "batch_size": 8}))
    res = accelerate_launch("fsdp.yaml", recipe, timeout=300)
    assert res.returncode != 0 and not (tmp_path / "p" / "manifest.json").exists()
    line = next(x for x in res.stderr.splitlines() if x.startswith("error:"))
    assert "FSDP (accelerate_configs/fsdp.yaml) needs GPUs" in line and "deepspeed_zero2.yaml" in line, line


def test_peak_flops_measured_under_load_is_measured_again_when_quieter(tmp_path, monkeypatch):
    """A peak cached while other jobs held the CPU (8x too low on this box: MFU over 100 % ever after) is
    measured again once the load is lower, keeping the higher figure; a quiet measurement is kept."""
    from pipelines.stages import pretrain

    monkeypatch.setenv("PIPELINES_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain.os, "cpu_count", lambda: 2)
    measured = iter([50e9, 400e9, 300e9])
    monkeypatch.setattr(pretrain, "_measure_matmul", lambda *a: next(measured))
    load = {"now": 6.0}
    monkeypatch.setattr(pretrain.os, "getloadavg", lambda: (load["now"], 0.0, 0.0))

    assert pretrain.matmul_peak_flops("fp32") == 50e9  # busy: measured, cached with its load
    assert pretrain.matmul_peak_flops("fp32") == 50e9  # no quieter: the cache answers
    load["now"] = 0.3
    assert pretrain.matmul_peak_flops("fp32") == 400e9  # quieter: measured again
    assert pretrain.matmul_peak_flops("fp32") == 400e9  # quiet figure: kept, never measured again
    assert next(measured) == 300e9  # (the fourth call measured nothing)
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert [v["load"] for v in cached.values()] == [0.3]
