"""Image classification: one label per image.

Data roles `image` (decoded with Pillow through datasets' Image feature) + `label`: a `format: imagefolder`
card (one sub-folder per class) or a CSV / JSON(L) / Parquet card with an image-path column. Every image is
checked when the card loads (pipelines.data.check_image); grayscale, palette, RGBA and CMYK images are
converted to RGB here, then the model's image processor resizes and normalises them, batch by batch as they
are read (datasets' with_transform), so no pixel arrays are cached on disk. Models: any transformers
AutoModelForImageClassification (ViT, DeiT, ResNet, ConvNeXt, ...) from a local folder, or from scratch
(`base_model: scratch:vit | scratch:resnet | scratch:convnext`, sized for small images). Metrics and
scoring are those of text classification (accuracy, F1, confusion matrix, ROC-AUC / PR-AUC). Baselines:
the majority class and a logistic regression on the images' 16 x 16 grayscale pixels. Served at /predict
with base64 images in JSON, or image files uploaded as multipart/form-data.
"""

from __future__ import annotations

import base64
import binascii
import io

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from pipelines.errors import PipelinesError
from pipelines.tasks.base import EvalOptions, RequestError, arch_in, heads_present, id2label, label_kwargs, on_device
from pipelines.tasks.classification import BASELINE_NOTES, Classification, answers, score_labels

BASELINE_PIXELS = 16  # side of the grayscale thumbnails the pixel baseline reads


class ImageAugment(BaseModel):
    """Train-time image augmentation (finetune `augment:`), applied to each train image as it is read (a new
    draw every epoch, from torch's RNG, which checkpoints restore); validation / test images never."""

    model_config = ConfigDict(extra="forbid")

    random_resized_crop: tuple[float, float] | None = Field(
        (0.8, 1.0), description="A random crop of this share of the image's area (aspect 3/4..4/3), resized back "
        "(torchvision's RandomResizedCrop); null: off.")
    horizontal_flip: float = Field(0.5, ge=0, le=1, description="Probability of a left-right mirror.")
    color_jitter: float = Field(0.0, ge=0, lt=1, description="Brightness, contrast and saturation each scaled by a "
                                "random factor in 1 -/+ this.")

    @model_validator(mode="after")
    def _crop(self):
        if self.random_resized_crop is not None:
            lo, hi = self.random_resized_crop
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"random_resized_crop: expected 0 < min <= max <= 1, got {list(self.random_resized_crop)}")
        return self

    def apply(self, im):
        """One random draw of the augmentation on a PIL image (same size out)."""
        import math

        import torch
        from PIL import Image, ImageEnhance, ImageOps

        def uniform(a, b):
            return a + (b - a) * torch.rand(()).item()

        w, h = im.size
        if self.random_resized_crop is not None:
            for _ in range(10):  # as torchvision: retry until the crop fits, else keep the whole image
                area = w * h * uniform(*self.random_resized_crop)
                ratio = math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
                if 0 < cw <= w and 0 < ch <= h:
                    x, y = int(torch.randint(0, w - cw + 1, ()).item()), int(torch.randint(0, h - ch + 1, ()).item())
                    im = im.resize((w, h), Image.BILINEAR, box=(x, y, x + cw, y + ch))
                    break
        if self.horizontal_flip and torch.rand(()).item() < self.horizontal_flip:
            im = ImageOps.mirror(im)
        if self.color_jitter:
            j = self.color_jitter
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                im = enhancer(im).enhance(uniform(1 - j, 1 + j))
        return im


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: StrictStr | list[StrictStr] = Field(
        description="One image or a list, each a base64-encoded image file (PNG, JPEG, ...). Or POST the files "
        "themselves as multipart/form-data (field `image`).")


class ImageClassification(Classification):
    name = "image-classification"
    aliases = ("image_classification",)
    pipeline_tag = "image-classification"
    peft_task_type = None  # peft has no TaskType for images: the LoRA config names the head to train instead
    description = "a label per image"
    roles = ("image", "label")
    family = "vision"
    inputs = "image"
    class_weighted = True
    Augment = ImageAugment
    trainer_args = {"remove_unused_columns": False}  # the transform reads the `image` column the model does not take
    Request = ImageRequest
    upload_field = "image"

    # ---- model

    def auto_class(self):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def detect(self, config: dict) -> bool:
        return arch_in(config, "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES") or any(
            a.endswith("ForImageClassification") for a in config.get("architectures") or [])

    def model_kwargs(self, label_names):
        return label_kwargs(label_names)

    def configure(self, model, processor) -> None:
        """Nothing to size: no vocabulary, no pad token."""

    def head_modules(self, model):
        return heads_present(model, ("classifier", "fc", "head"))

    def load_processor(self, folder):
        from pathlib import Path

        from transformers import AutoImageProcessor

        if not (Path(folder) / "preprocessor_config.json").is_file():
            raise PipelinesError(f"no image processor (preprocessor_config.json) in {folder}")
        return AutoImageProcessor.from_pretrained(folder)

    def base_processor(self, base, tokenizer_dir, scratch_overrides: dict, trust_remote_code: bool = False):
        """The base folder's image processor; for a scratch model, one sized for its image_size."""
        if base.kind == "scratch":
            from transformers import ViTImageProcessor

            side = int(scratch_overrides.get("image_size", 32))
            return ViTImageProcessor(do_resize=True, size={"height": side, "width": side}, do_normalize=True,
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return self.load_processor(base.name)

    def prepare_processor(self, processor):
        return []

    # ---- data

    def encode(self, ds, processor, opts: EvalOptions):
        """pixel_values + labels, computed when rows are read (no cache of pixel arrays)."""
        return self.encode_train(ds, processor, opts, None)

    def encode_train(self, ds, processor, opts: EvalOptions, augment=None):
        def transform(batch):
            images = [rgb(im) for im in batch["image"]]
            if augment is not None:
                images = [augment.apply(im) for im in images]
            out = processor(images=images, return_tensors="pt")
            return {"pixel_values": out["pixel_values"], "labels": batch["label"]}

        return ds.with_transform(transform)

    def collator(self, processor, model=None):
        from transformers import DefaultDataCollator

        return DefaultDataCollator()

    def vocab_texts(self, ds):
        raise PipelinesError("image classification has no vocabulary to trim (student.trim_vocab is for text models)")

    def kd_positions(self, inputs, labels):
        return None  # hidden states of every patch / position count

    # ---- evaluation

    def baselines(self, train_raw, raw, opts, tokenizer=None):
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        names = opts.label_names
        y_train, y = np.asarray(train_raw["label"]), np.asarray(raw["label"])
        prior = np.bincount(y_train, minlength=len(names)) / len(y_train)
        majority = np.tile(prior, (len(y), 1))
        out = {"majority": score_labels(majority.argmax(-1), majority, y, names).metrics}
        X_train, X = thumbnails(train_raw["image"]), thumbnails(raw["image"])
        clf = LogisticRegression(max_iter=2000, C=0.1).fit(X_train, y_train)
        probs = np.zeros((len(y), len(names)))
        probs[:, clf.classes_] = clf.predict_proba(X)
        out["pixel_logreg"] = score_labels(probs.argmax(-1), probs, y, names).metrics
        return out

    def baseline_notes(self):
        return {"majority": BASELINE_NOTES["majority"],
                "pixel_logreg": f"logistic regression on {BASELINE_PIXELS}x{BASELINE_PIXELS} grayscale pixels (scikit-learn), "
                                "fit on the train split"}

    def score(self, predictions, label_ids, raw, tokenizer, opts, references=None):
        scored = super().score(predictions, label_ids, None, tokenizer, opts)
        if raw is not None:
            names = opts.label_names
            paths = [im.get("path") for im in raw.cast_column("image", _undecoded()).with_format(None)["image"]]
            scored.rows = [{"image": p, "label": names[int(y)], "predicted": names[int(k)]}
                           for p, y, k in zip(paths, label_ids, scored.outputs)]
        return scored

    # ---- serving

    def serve_setup(self, served):
        pass

    def serve_items(self, req, limits):
        raw = [req.image] if isinstance(req.image, (str, bytes)) else list(req.image)
        if not raw:
            raise RequestError(422, "image: give at least one image")
        if len(raw) > limits.max_items:
            raise RequestError(413, f"image: {len(raw)} images in one request; the limit is {limits.max_items}")
        return (), [decode_image(x, i, len(raw), limits) for i, x in enumerate(raw)]

    def serve_batch(self, served, params, items):
        import torch

        enc = on_device(dict(served.processor(images=items, return_tensors="pt")), served.model)
        with torch.inference_mode():
            probs = served.model(pixel_values=enc["pixel_values"]).logits.float().softmax(-1)
        return answers(probs, id2label(served.config))

    # ---- publish

    def usage(self, repo):
        return [
            "from transformers import pipeline",
            "",
            f'classify = pipeline("image-classification", model="{repo}")',
            'print(classify("photo.png"))',
        ]


def rgb(image):
    """Any Pillow mode (L, P, RGBA, CMYK, I;16, ...) as RGB: transparent pixels over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        from PIL import Image

        rgba = image.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        import numpy as np
        from PIL import Image

        a = np.asarray(image, dtype=np.float64)
        a = (255 * (a - a.min()) / max(a.max() - a.min(), 1e-9)).astype("uint8")
        return Image.fromarray(a).convert("RGB")
    return image.convert("RGB")


def thumbnails(images):
    import numpy as np

    side = BASELINE_PIXELS
    return np.stack([np.asarray(rgb(im).convert("L").resize((side, side)), dtype=np.float32).ravel() / 255.0
                     for im in images])


def _undecoded():
    import datasets

    return datasets.Image(decode=False)


def decode_image(data, i: int, n: int, limits):
    """A request's image (base64 text, or the bytes of an uploaded file) -> an RGB Pillow image; 4xx if it is
    not an image, or one outside the data layer's size limits."""
    from PIL import Image, UnidentifiedImageError

    from pipelines.data import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE

    where = "image" if n == 1 else f"image[{i}]"
    if isinstance(data, str):
        try:
            data = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{where}: not base64 (send the image file's bytes base64-encoded)") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"{where}: {len(data):,} bytes; the limit is {limits.max_image_bytes:,} (serve --max-image-bytes)")
    try:
        im = Image.open(io.BytesIO(data))  # (DecompressionBombError above 2x the limit: a 413 below)
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS or min(w, h) < MIN_IMAGE_SIDE:
            raise RequestError(413 if w * h > MAX_IMAGE_PIXELS else 422,
                               f"{where}: {w}x{h} pixels is outside {MIN_IMAGE_SIDE} pixels a side .. {MAX_IMAGE_PIXELS:,} pixels")
        im.load()
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError(413, f"{where}: over {MAX_IMAGE_PIXELS:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RequestError(422, f"{where}: not an image Pillow can decode ({' '.join(str(e).split())[:120]})") from None
    return rgb(im)


TASK = ImageClassification()
