"""The distill stage: the KD loss against a hand computation, gradient accumulation equivalence,
student-from-teacher-layers weight copies, the stage through the real runner (classification with
hidden/attention terms and resume; causal LM), and a distilled student beating the same student
trained without its teacher on real SST-2 rows (slow)."""

import json
import math

import pytest
import torch

from pipelines import modelio, runner, tasks
from pipelines.recipe import load_recipe
from pipelines.stages.distill import (
    KDLossConfig,
    StudentSpec,
    build_student,
    layer_pairs,
    make_trainer,
)
from tests.conftest import ROOT
from tests.launch import accelerate_launch
from tests.tiny_models import byte_bpe, shakespeare_gpt2, sst2_classifier

# ---------------------------------------------------------------- fixtures: tiny teachers saved as HF folders


@pytest.fixture(scope="module")
def bert_teacher(tmp_path_factory):
    """A 4-layer, 32-wide BERT sentiment classifier with the MiniLM tokenizer, trained a few steps on SST-2 rows."""
    return sst2_classifier(tmp_path_factory.mktemp("bert_teacher"), hidden=32, layers=4, intermediate=64, rows=256)


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory):
    """A 2-layer GPT-2 with a 400-token byte-level BPE trained on the Tiny Shakespeare sample."""
    return shakespeare_gpt2(tmp_path_factory.mktemp("lm_teacher"), n_embd=32)


def stage_recipe(write_recipe, tmp_path, card, config, name="distill"):
    return write_recipe(
        {
            "name": "kd",
            "output_dir": str(tmp_path / "run"),
            "data": {"d": str(ROOT / "data_cards" / card)},
            "stages": [{"name": name, "type": "distill", "data": "d", "config": config}],
        }
    )


def manifest(tmp_path, name="distill"):
    return json.loads((tmp_path / "run" / name / "manifest.json").read_text())


# ---------------------------------------------------------------- the loss


def test_kd_loss_matches_hand_computation_classification():
    s = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    t = torch.tensor([[1.0, 0.0, -1.0], [3.0, -2.0, 0.0]])
    y = torch.tensor([0, 2])
    alpha, T = 0.3, 2.0

    def softmax(row, temp=1.0):
        e = [math.exp(v / temp) for v in row]
        return [x / sum(e) for x in e]

    want = 0.0
    for i in range(2):
        ce = -math.log(softmax(s[i].tolist())[y[i]])
        ps, pt = softmax(s[i].tolist(), T), softmax(t[i].tolist(), T)
        kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        want += alpha * ce + (1 - alpha) * T * T * kl
    got, mask = tasks.get("classification").kd_loss_sum(s, t, y, alpha, T)
    assert mask.tolist() == [True, True]
    assert got.item() == pytest.approx(want, rel=1e-5)
    # alpha = 1: plain cross-entropy, no teacher needed
    ce_only, _ = tasks.get("classification").kd_loss_sum(s, None, y, 1.0, T)
    assert ce_only.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y, reduction="sum").item(), rel=1e-6)


def test_kd_loss_causal_shift_and_ignored_labels():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, -100, 3], [4, 0, 1, -100]])
    alpha, T = 0.5, 3.0
    got, mask = tasks.get("causal-lm").kd_loss_sum(s, t, labels, alpha, T)  # shifts: logits at t, label t+1
    want, n = 0.0, 0
    for b in range(2):
        for pos in range(3):  # logits at pos predict labels[pos + 1]
            y = labels[b, pos + 1].item()
            if y == -100:
                continue
            n += 1
            ls, lt = s[b, pos], t[b, pos]
            ce = -torch.log_softmax(ls, -1)[y].item()
            ps, pt = torch.softmax(ls / T, -1), torch.softmax(lt / T, -1)
            kl = (pt * (pt.log() - ps.log())).sum().item()
            want += alpha * ce + (1 - alpha) * T * T * kl
    assert int(mask.sum()) == n == 4
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_layer_pairs():
    assert layer_pairs(3, 6) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    assert layer_pairs(2, 6) == [(0, 0), (1, 3), (2, 6)]
    assert layer_pairs(4, 6) == [(0, 0), (1, 2), (2, 3), (3, 4), (4, 6)]


# ---------------------------------------------------------------- gradient accumulation


def _ga_run(tmp_path, teacher, student, kd, bs, ga, data, task):
    from transformers import TrainingArguments

    def collate(rows):
        L = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        am = torch.zeros(len(rows), L, dtype=torch.long)
        if task == "classification":
            labels = torch.tensor([r["labels"] for r in rows])
        else:
            labels = torch.full((len(rows), L), -100)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            am[i, :n] = 1
            if task != "classification":
                labels[i, :n] = torch.tensor(r["input_ids"])
        return {"input_ids": ids, "attention_mask": am, "labels": labels}

    args = TrainingArguments(str(tmp_path / f"ga{bs}x{ga}"), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                             max_steps=2, learning_rate=0.5, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                             logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                             train_sampling_strategy="sequential", seed=0)
    trainer = make_trainer(student, teacher, args, kd, tasks.get(task), layer_pairs(1, 2), train_dataset=data, data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in student.state_dict().items()}


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_grad_accumulation_matches_full_batch(tmp_path, lm_teacher, bert_teacher, task):
    """bs=8 and bs=4 x grad_accum=2 give the same losses and weights (SGD, no dropout), although the
    micro-batches hold different numbers of target tokens (long rows first, short rows last)."""
    from datasets import Dataset

    folder = lm_teacher if task == "causal-lm" else bert_teacher
    teacher, _ = modelio.load_model(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if task == "classification" else modelio.load_model(folder, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    lengths = [20, 18, 19, 17, 3, 4, 2, 5] * 2
    g = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size
    rows = {"input_ids": [torch.randint(5, min(vocab, 300), (n,), generator=g).tolist() for n in lengths]}
    if task == "classification":
        rows["labels"] = [i % 2 for i in range(len(lengths))]
    data = Dataset.from_dict(rows)
    kd = KDLossConfig(alpha=0.5, temperature=2.0, hidden_weight=0.5)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        student, _, _ = build_student(teacher, StudentSpec(from_teacher_layers=[1]), tasks.get(task), seed=0)
        results.append(_ga_run(tmp_path, teacher, student, kd, bs, ga, data, task))
    (l8, w8), (l4, w4) = results
    assert len(l8) == len(l4) == 2
    assert l8 == pytest.approx(l4, rel=1e-4)
    for k in w8:
        torch.testing.assert_close(w8[k], w4[k], rtol=1e-4, atol=1e-6)
    # the weights moved: the comparison is not between two untouched models
    fresh, _, _ = build_student(teacher, StudentSpec(from_teacher_layers=[1]), tasks.get(task), seed=0)
    assert any(not torch.allclose(fresh.state_dict()[k], w8[k]) for k in w8)


# ---------------------------------------------------------------- students from teacher layers


def test_student_from_teacher_layers_copies_the_right_weights(bert_teacher, lm_teacher):
    from pipelines.errors import PipelinesError

    teacher, task = modelio.load_model(bert_teacher)
    student, pairs, layers = build_student(teacher, StudentSpec(from_teacher_layers=[0, 3]), task, seed=0)
    assert student.config.num_hidden_layers == 2 and layers == [0, 3]
    assert student.config.id2label == {0: "negative", 1: "positive"}
    ts, ss = teacher.state_dict(), student.state_dict()
    for k in ss:
        src = k.replace("encoder.layer.1.", "encoder.layer.3.")
        torch.testing.assert_close(ss[k], ts[src], rtol=0, atol=0)
    # a student layer is not its untouched neighbour
    assert not torch.equal(ss["bert.encoder.layer.1.attention.self.query.weight"], ts["bert.encoder.layer.1.attention.self.query.weight"])
    assert pairs == [(0, 0), (1, 2), (2, 4)]

    every, _, layers = build_student(teacher, StudentSpec(every_other=True), task, seed=0)
    assert layers == [0, 2]
    torch.testing.assert_close(every.state_dict()["bert.encoder.layer.1.output.dense.weight"], ts["bert.encoder.layer.2.output.dense.weight"])

    lm, lm_task = modelio.load_model(lm_teacher)
    gpt, _, _ = build_student(lm, StudentSpec(from_teacher_layers=[1]), lm_task, seed=0)
    torch.testing.assert_close(gpt.state_dict()["transformer.h.0.attn.c_attn.weight"], lm.state_dict()["transformer.h.1.attn.c_attn.weight"])
    assert gpt.lm_head.weight.data_ptr() == gpt.transformer.wte.weight.data_ptr()  # still tied

    with pytest.raises(PipelinesError, match="teacher has layers 0..3"):
        build_student(teacher, StudentSpec(from_teacher_layers=[0, 4]), task, seed=0)
    with pytest.raises(PipelinesError, match="needs the teacher's widths"):
        build_student(teacher, StudentSpec(from_teacher_layers=[0], config={"intermediate_size": 16}), task, seed=0)
    with pytest.raises(PipelinesError, match="not a field"):
        build_student(teacher, StudentSpec(config={"n_hidden_layerz": 1}), task, seed=0)


def test_trim_vocab_keeps_the_tokenization_of_the_train_texts(bert_teacher):
    from transformers import AutoTokenizer

    from pipelines.data import load_card
    from pipelines.stages.distill import shrink_embeddings, trim_vocab

    tok = AutoTokenizer.from_pretrained(bert_teacher)
    dsd = load_card(ROOT / "data_cards/sst2_sample.yaml").load(seed=42)
    texts = list(dsd["train"]["text"][:500])
    small, kept = trim_vocab(tok, texts)
    assert 1000 < len(small) == len(kept) < len(tok) / 4
    for text in texts[:200]:
        ids = tok(text)["input_ids"]
        assert [kept[i] for i in small(text)["input_ids"]] == ids  # same pieces, renumbered
    # an unseen word splits into kept pieces (single characters stay), never [UNK]
    unseen = "zyzzogeton quixotically"
    assert small.unk_token_id not in small(unseen)["input_ids"]
    assert small.decode(small(unseen)["input_ids"], skip_special_tokens=True) == unseen
    assert small.cls_token_id == kept.index(tok.cls_token_id) and small.pad_token_id == kept.index(tok.pad_token_id)

    teacher, task = modelio.load_model(bert_teacher)
    student, _, _ = build_student(teacher, StudentSpec(every_other=True, trim_vocab=True), task, seed=0)
    shrink_embeddings(student, kept, small.pad_token_id)
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight[kept])
    b_small, b_full = small(texts[:8], padding=True, return_tensors="pt"), tok(texts[:8], padding=True, return_tensors="pt")
    full = build_student(teacher, StudentSpec(every_other=True), task, seed=0)[0].eval()
    torch.testing.assert_close(student.eval()(**b_small).logits, full(**b_full).logits)  # same function of the text


# ---------------------------------------------------------------- the stage through the runner


def test_stage_classification_with_hidden_and_attention_terms_and_resume(write_recipe, tmp_path, bert_teacher):
    """A narrower random-init student with a trimmed vocabulary (projection for the hidden MSE, teacher
    ids mapped from the student's), eager attention maps, a kill after the first checkpoint, and a
    resumed run that continues the global step."""
    config = {
        "teacher_model": str(bert_teacher),
        "student": {"config": {"hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 32}, "trim_vocab": True},
        "loss": {"alpha": 0.5, "temperature": 2.0, "hidden_weight": 1.0, "attention_weight": 1.0},
        "max_train_samples": 128, "max_eval_samples": 48, "max_length": 48, "latency_repeats": 2,
        "train": {"max_steps": 6, "batch_size": 16, "save_steps": 3, "logging_steps": 1, "lr": 1e-3},
    }
    path = stage_recipe(write_recipe, tmp_path, "sst2_sample.yaml", config)
    runner.run(load_recipe(path))
    m = manifest(tmp_path)
    met = m["metrics"]
    for k in ("student_accuracy", "teacher_accuracy", "student_f1", "retained", "test_student_accuracy",
              "student_params", "teacher_params", "params_ratio", "student_mb", "teacher_mb", "student_ms", "teacher_ms", "speedup"):
        assert k in met, k
    assert met["train_steps"] == 6
    assert met["student_params"] < met["teacher_params"] and met["params_ratio"] < 1
    assert 0 <= met["student_accuracy"] <= 1 and met["retained"] == pytest.approx(met["student_accuracy"] / met["teacher_accuracy"], rel=1e-4)
    assert m["info"]["latency"]["batch_size"] == 32
    out = tmp_path / "run/distill/model"
    student, task = modelio.load_model(out)
    assert task.name == "classification" and student.config.hidden_size == 16
    assert student.config.id2label == {0: "negative", 1: "positive"}
    vocab = m["info"]["vocab"]
    assert vocab["student"] < vocab["teacher"] / 4 and student.config.vocab_size == vocab["student"]
    assert len(modelio.load_processor(task, out)) == vocab["student"]  # the student ships its own tokenizer
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "kd_projection" in k]  # the projection is not part of the student
    history = json.loads((tmp_path / "run/distill/log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h][:3] == [1, 2, 3]

    # kill after checkpoint-3: the next run resumes from it and continues at step 4
    stage_dir = tmp_path / "run/distill"
    (stage_dir / "manifest.json").unlink()
    import shutil

    shutil.rmtree(stage_dir / "checkpoints/checkpoint-6")
    # a marker in the checkpoint's trainer state: a resumed run carries it on, a restarted one would not
    state_file = stage_dir / "checkpoints/checkpoint-3/trainer_state.json"
    state = json.loads(state_file.read_text())
    next(h for h in state["log_history"] if "loss" in h)["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    (stage_dir / ".inprogress.json").write_text(json.dumps({"fingerprint": m["fingerprint"]}))
    steps = runner.run(load_recipe(path))
    assert steps[0].action == "resume"
    history = [h for h in json.loads((stage_dir / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]  # restored steps 1..3, trained 4..6
    assert history[0]["loss"] == 123.0
    assert manifest(tmp_path)["resumed"] is True


def test_stage_causal_lm(write_recipe, tmp_path, lm_teacher):
    config = {
        "teacher_model": str(lm_teacher),
        "student": {"config": {"n_layer": 1}},
        "loss": {"alpha": 0.2, "temperature": 1.5},
        "max_train_samples": 200, "max_eval_samples": 40, "max_length": 64, "latency_repeats": 2,
        "train": {"max_steps": 10, "batch_size": 8, "logging_steps": 1, "lr": 3e-3},
    }
    path = stage_recipe(write_recipe, tmp_path, "tinyshakespeare_sample.yaml", config)
    runner.run(load_recipe(path))
    met = manifest(tmp_path)["metrics"]
    assert math.isfinite(met["student_perplexity"]) and math.isfinite(met["teacher_perplexity"])
    assert met["student_params"] < met["teacher_params"]
    assert met["retained"] == pytest.approx(met["teacher_perplexity"] / met["student_perplexity"], rel=1e-4)
    history = json.loads((tmp_path / "run/distill/log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns from the teacher
    student, task = modelio.load_model(tmp_path / "run/distill/model")
    assert task.name == "causal-lm" and student.config.n_layer == 1


@pytest.fixture
def one_thread():
    """Quality tests that train in-process: one torch thread (on a shared 2-core runner, two threads wait on
    each other at every op and ran this test 3-5x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_distilled_student_beats_the_same_student_without_teacher(write_recipe, tmp_path, one_thread):
    """Real text, the shipped Tiny Shakespeare sample. A 2-layer GPT-2 teacher is trained on all of train
    (1,577 speeches); two identical 1-layer, 48-wide students (same seed, data, steps, lr) learn from 200
    speeches: one from the labels alone (alpha=1), one from the teacher's next-token distributions
    (alpha=0). Validation perplexity over ~10k tokens; measured 198.7 vs 160.2 (seed 42) with the
    teacher at 133.4, so the 10 % margin asserted below is well outside run-to-run noise."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipelines.data import load_card

    train = list(load_card(ROOT / "data_cards/tinyshakespeare_sample.yaml").load(seed=42)["train"]["text"])
    tok = byte_bpe(train, vocab_size=1000, model_max_length=128)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=96, n_layer=2, n_head=4, n_positions=128,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    ids = [i for doc in tok(train)["input_ids"] for i in doc + [tok.eos_token_id]]
    blocks = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=200, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        b = blocks[torch.randint(0, len(blocks), (16,), generator=g)]
        teacher(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")

    ppl = {}
    for name, alpha in (("labels_only", 1.0), ("distilled", 0.0)):
        config = {
            "teacher_model": str(tmp_path / "teacher"),
            "student": {"config": {"n_layer": 1, "n_embd": 48, "n_head": 2}},
            "loss": {"alpha": alpha, "temperature": 1.0},
            "max_train_samples": 200, "max_length": 128, "latency_repeats": 1,
            "train": {"max_steps": 100, "batch_size": 16, "lr": 3e-3, "logging_steps": 50},
        }
        path = stage_recipe(write_recipe, tmp_path / name, "tinyshakespeare_sample.yaml", config)
        runner.run(load_recipe(path))
        ppl[name] = manifest(tmp_path / name)["metrics"]
    assert ppl["distilled"]["student_perplexity"] < 0.9 * ppl["labels_only"]["student_perplexity"], ppl
    assert ppl["distilled"]["teacher_perplexity"] < ppl["distilled"]["student_perplexity"]


@pytest.mark.slow
def test_deepspeed_zero3_two_ranks(write_recipe, tmp_path, bert_teacher):
    """Two ranks under `accelerate launch` with ZeRO-3: the teacher stays whole on each rank, the partitioned
    student (with its hidden-state projection) is gathered on save, and rank 0 evaluates a plain reload."""
    config = {
        "teacher_model": str(bert_teacher),
        "student": {"config": {"hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 32}},
        "loss": {"alpha": 0.5, "hidden_weight": 1.0},
        "max_train_samples": 64, "max_eval_samples": 32, "max_length": 32, "latency_repeats": 2, "eval_splits": ["validation"],
        "train": {"max_steps": 3, "batch_size": 8, "logging_steps": 1, "lr": 1e-3},
    }
    path = stage_recipe(write_recipe, tmp_path, "sst2_sample.yaml", config)
    # a fresh extension folder holding the lock a killed build of DeepSpeed's CPU comm op leaves behind:
    # torch waits on such a lock forever (this test hung CI for 10 minutes before the runner cleared them)
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    r = accelerate_launch("deepspeed_zero3.yaml", path, env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "removed a stale torch extension build lock" in r.stdout
    assert (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists()  # built for real this time
    m = manifest(tmp_path)
    assert m["world_size"] == 2 and m["metrics"]["train_steps"] == 3
    student, _ = modelio.load_model(tmp_path / "run/distill/model")
    assert student.config.hidden_size == 16
    assert all(p.numel() > 0 for p in student.parameters())  # gathered, not ZeRO-3 placeholders
    assert 0 <= m["metrics"]["student_accuracy"] <= 1


def test_teacher_errors(write_recipe, tmp_path, bert_teacher):
    from pipelines.errors import RecipeError

    path = stage_recipe(write_recipe, tmp_path, "sst2_sample.yaml", {"student": {"every_other": True}})
    with pytest.raises(RecipeError, match=r"give exactly one model: an input stage `inputs: \{teacher: <stage>\}`"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"teacher_model 'nowhere': folder not found"):
        load_recipe(stage_recipe(write_recipe, tmp_path, "sst2_sample.yaml", {"teacher_model": "nowhere", "student": {"every_other": True}}))
    with pytest.raises(RecipeError, match="from_teacher_layers or every_other, not both"):
        load_recipe(stage_recipe(write_recipe, tmp_path, "sst2_sample.yaml",
                                 {"teacher_model": str(bert_teacher), "student": {"every_other": True, "from_teacher_layers": [0]}}))
    with pytest.raises(RecipeError, match="say how to make the student"):
        load_recipe(stage_recipe(write_recipe, tmp_path, "sst2_sample.yaml", {"teacher_model": str(bert_teacher), "student": {}}))
    path = stage_recipe(write_recipe, tmp_path, "multi30k_sample.yaml",
                        {"teacher_model": str(bert_teacher), "student": {"every_other": True}})
    with pytest.raises(RecipeError, match=r"task classification needs the roles \['label', 'text'\]"):
        load_recipe(path)  # the teacher folder's task against the card, before any work


def test_a_pruned_teacher_is_the_student(write_recipe, tmp_path, bert_teacher, lm_teacher):
    """prune -> distill with `inputs: {student: prune}`: the pruned copy of the teacher is trained on the teacher's
    logits as it is (its shape kept, its weights changed), scored beside the teacher; validate refuses a student
    given twice or of another task."""
    from safetensors.torch import load_file

    from pipelines.errors import RecipeError

    small = {"max_eval_samples": 32, "eval_splits": ["validation"], "latency_repeats": 1}
    prune = {"name": "prune", "type": "prune", "data": "d",
             "config": {"model_path": str(bert_teacher), "sparsity": 0.3, "importance": "magnitude", **small}}
    distill = {"name": "distill", "type": "distill", "data": "d", "inputs": {"student": "prune"},
               "config": {"teacher_model": str(bert_teacher), "max_train_samples": 64, "loss": {"alpha": 0.0},
                          "train": {"max_steps": 4, "batch_size": 16, "lr": 1e-3}, **small}}
    doc = {"name": "kd", "output_dir": str(tmp_path / "run"), "data": {"d": str(ROOT / "data_cards/sst2_sample.yaml")},
           "stages": [prune, distill]}
    runner.run(load_recipe(write_recipe(doc)))
    p, kd = manifest(tmp_path, "prune"), manifest(tmp_path)
    pruned = tmp_path / "run/prune" / p["outputs"]["model"]
    assert kd["info"]["given_student"] == str(pruned) and kd["info"]["copied_teacher_layers"] is None
    assert kd["metrics"]["student_params"] == p["metrics"]["params"] < kd["metrics"]["teacher_params"]
    before, after = load_file(pruned / "model.safetensors"), load_file(tmp_path / "run/distill/model/model.safetensors")
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}  # the pruned shape
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained
    evs = {(e["model"], e["role"]) for e in kd["evaluations"]}
    assert {("teacher", "reference"), ("student", "output")} <= evs

    for student, inputs, message in (
        ({"every_other": True}, {"student": "prune"}, r"the student is `inputs: \{student: <stage>\}`'s model: drop"),
        ({"model_path": str(lm_teacher)}, {}, "the student is a causal-lm model and the teacher a classification model"),
        ({"model_path": str(lm_teacher), "every_other": True}, {}, "student.model_path is the student as it is"),
    ):
        bad = {**distill, "inputs": inputs, "config": {**distill["config"], "student": student}}
        with pytest.raises(RecipeError, match=message):
            load_recipe(write_recipe({**doc, "stages": [prune, bad]}))


def test_a_given_student_must_read_the_teachers_vocabulary(tmp_path, lm_teacher):
    from pipelines import tasks
    from pipelines.errors import PipelinesError
    from pipelines.stages.distill import load_given_student
    from tests.tiny_models import chat_llama

    teacher, task = modelio.load_model(lm_teacher)
    tok = modelio.load_processor(task, lm_teacher)
    with pytest.raises(PipelinesError, match=r"another vocabulary than the teacher .*a pruned copy of the teacher has it"):
        load_given_student(chat_llama(tmp_path / "chat"), tasks.get("causal-lm"), teacher, tok)
    assert load_given_student(lm_teacher, task, teacher, tok).training  # the teacher's own vocabulary: accepted


KILL_AT = """
import os, signal, sys
from transformers import TrainerCallback
from pipelines import cli
from pipelines.stages import distill

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)   # kill -9: no cleanup

original = distill.callbacks
distill.callbacks = lambda cfg: original(cfg) + [KillAt()]
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_distill_resumes_to_the_uninterrupted_result(write_recipe, tmp_path, bert_teacher):
    """kill -9 at step 7 (checkpoint at 5), then `pipelines run` again: every step's loss, the student's weights
    and its metrics equal those of an uninterrupted run, and train_loss is the mean over all 16 steps (the
    Trainer's own averages only the steps after the resume)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    cfg = {"teacher_model": str(bert_teacher), "student": {"from_teacher_layers": [0, 2]}, "max_train_samples": 256,
           "max_eval_samples": 64, "eval_splits": ["validation"], "latency_repeats": 1,
           "train": {"max_steps": 16, "save_steps": 5, "eval_steps": 8, "logging_steps": 1, "batch_size": 8, "lr": 1e-3}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KILL_AT_STEP": "7"}
    paths = {}
    for name in ("ref", "res"):
        paths[name] = stage_recipe(write_recipe, tmp_path / name, "sst2_sample.yaml", cfg)
        (tmp_path / name).mkdir(exist_ok=True)
        paths[name] = paths[name].rename(tmp_path / name / "recipe.yaml")
    run = [sys.executable, "-m", "pipelines", "run"]
    assert subprocess.run(run + [str(paths["ref"])], env=env, capture_output=True, timeout=600).returncode == 0
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "run", str(paths["res"])], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -9 and sorted(p.name for p in (tmp_path / "res/run/distill/checkpoints").iterdir()) == ["checkpoint-5"]
    again = subprocess.run(run + [str(paths["res"])], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resuming from checkpoint-5" in again.stdout, again.stderr[-2000:]

    def losses(name):
        return {h["step"]: h["loss"] for h in json.loads((tmp_path / name / "run/distill/log_history.json").read_text()) if "loss" in h}

    a, b = losses("ref"), losses("res")
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a), (a, b)
    wa = load_file(tmp_path / "ref/run/distill/model/model.safetensors")
    wb = load_file(tmp_path / "res/run/distill/model/model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    ma, mb = manifest(tmp_path / "ref"), manifest(tmp_path / "res")
    assert mb["resumed"] and ma["metrics"]["student_accuracy"] == mb["metrics"]["student_accuracy"]
    assert mb["metrics"]["train_loss"] == pytest.approx(ma["metrics"]["train_loss"], rel=1e-5)
    assert ma["metrics"]["train_loss"] == pytest.approx(sum(a.values()) / 16, rel=1e-5)  # every step counts once


def test_quality_gate_stops_the_chain_and_keeps_the_outputs(write_recipe, tmp_path):
    """max_metric_drop: a student worse than its teacher by more than that fails the stage with both numbers;
    its folder stays for inspection and publish, downstream, never runs."""
    from pipelines.errors import StageFailed

    teacher = sst2_classifier(tmp_path / "teacher", hidden=64, layers=2, intermediate=128, rows=2000)  # ~0.7 accuracy
    cfg = {"teacher_model": str(teacher), "student": {"config": {"num_hidden_layers": 1, "hidden_size": 8,
           "intermediate_size": 8, "num_attention_heads": 1}}, "max_train_samples": 16, "max_eval_samples": 400,
           "eval_splits": ["validation"], "latency_repeats": 1, "max_metric_drop": 0.0,
           "train": {"max_steps": 1, "batch_size": 8}}
    doc = {"name": "kd", "output_dir": str(tmp_path / "run"), "data": {"d": str(ROOT / "data_cards/sst2_sample.yaml")},
           "stages": [{"name": "distill", "type": "distill", "data": "d", "config": cfg},
                      {"name": "publish", "type": "publish", "inputs": {"model": "distill"}, "config": {"dry_run": True}}]}
    with pytest.raises(StageFailed, match=r"quality gate: validation accuracy [0-9.]+ \(student\) against [0-9.]+ "
                                          r"\(teacher\): a drop of [0-9.]+, over max_metric_drop 0"):
        runner.run(load_recipe(write_recipe(doc)))
    assert (tmp_path / "run/distill/model/model.safetensors").exists()  # kept for inspection
    assert not (tmp_path / "run/distill/manifest.json").exists() and not (tmp_path / "run/publish").exists()
    cfg["max_metric_drop"] = 1.0
    runner.run(load_recipe(write_recipe(doc)))
    gate = manifest(tmp_path)["info"]["quality_gate"]
    assert gate["passed"] and gate["metric"] == "accuracy" and gate["drop"] == pytest.approx(gate["reference"] - gate["compressed"])
