"""TrainConfig keys that reach the Trainer (fast: a tiny BART, one batch, no training loop)."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pipelines import training
from pipelines.stage import RunContext


def ctx(tmp_path: Path) -> RunContext:
    return RunContext("s", "r", tmp_path / "r.yaml", tmp_path / "out", {}, None, 0, False)


def test_label_smoothing_smooths_the_training_loss(tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration, Trainer

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32))
    model.eval()  # no dropout: the two losses come from the same logits
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])
    # decoder inputs given, as DataCollatorForSeq2Seq gives them: the smoothed loss pops the labels off the batch
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    decoder = torch.cat([start, labels[:, :-1].clamp(min=1)], 1)
    batch = {"input_ids": torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]]), "decoder_input_ids": decoder, "labels": labels}

    def loss(eps: float) -> float:
        args = training.training_args(training.TrainConfig(label_smoothing=eps), ctx(tmp_path), has_eval=False)
        assert args.label_smoothing_factor == eps
        with torch.no_grad():
            return float(Trainer(model=model, args=args).compute_loss(model, dict(batch)))

    with torch.no_grad():
        logp = model(**batch).logits.log_softmax(-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].mean()
    uniform = -logp.mean(-1)[mask].mean()  # cross-entropy against the uniform distribution
    assert loss(0.0) == pytest.approx(float(nll), rel=1e-5)
    assert loss(0.1) == pytest.approx(float(0.9 * nll + 0.1 * uniform), rel=1e-5)


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_rejected(eps):
    with pytest.raises(ValidationError, match="label_smoothing"):
        training.TrainConfig(label_smoothing=eps)
