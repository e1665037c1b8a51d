"""Feature fidelity of a (quantized) image encoder against its FP32 features.

Vision encoders are used for their features (retrieval, linear probes), so quality
is measured there: the cosine of each image's CLS feature and of its mean-pooled
patch features to the FP32 model's, and nearest-neighbour agreement, the fraction
of images whose nearest other image (cosine of CLS features) is the same one as
under FP32.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from iq_transform.evaluation.data import DataError, resolve_data_path

__all__ = [
    "FeatureQuality",
    "ImageFeatures",
    "feature_quality",
    "image_features",
    "load_image_folder",
]

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass
class ImageFeatures:
    """Per image: the CLS token's and the mean patch token's final features."""

    cls: torch.Tensor
    pooled: torch.Tensor


@dataclass
class FeatureQuality:
    """:param cls_cosine: mean over images of the CLS features' cosine to FP32
    :param cls_cosine_min: the worst image's
    :param pooled_cosine: the same for mean-pooled patch features
    :param nn_agreement: fraction of images with the same nearest neighbour
    """

    num_images: int
    cls_cosine: float
    cls_cosine_min: float
    pooled_cosine: float
    nn_agreement: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_image_folder(
    path: str, processor, num_images: int | None = None
) -> torch.Tensor:
    """``pixel_values`` (images, 3, h, w) of the images in a folder, sorted by name.

    :param path: a folder; ``shared/...`` is looked up in the offline data folder
    :param processor: the model's image processor
    :param num_images: the first this many (all when ``None``)
    """
    from PIL import Image

    folder = resolve_data_path(path)
    files = sorted(
        p for p in Path(folder).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise DataError(
            f"No images (.jpeg/.jpg/.png) in {folder}: give data.path=<folder of "
            "images>, e.g. shared/imagenet-sample"
        )
    if num_images is not None:
        if num_images > len(files):
            raise DataError(
                f"{folder} holds {len(files)} images, fewer than the {num_images} "
                "asked for"
            )
        files = files[:num_images]
    images = [Image.open(p).convert("RGB") for p in files]
    return processor(images, return_tensors="pt").pixel_values


@torch.no_grad()
def image_features(
    model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 8
) -> ImageFeatures:
    """The final features of every image, in batches."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cls, pooled = [], []
    for start in range(0, len(pixel_values), batch_size):
        batch = pixel_values[start : start + batch_size].to(device, dtype)
        hidden = model(pixel_values=batch).last_hidden_state.float()
        cls.append(hidden[:, 0].cpu())
        pooled.append(hidden[:, 1:].mean(dim=1).cpu())
    return ImageFeatures(torch.cat(cls), torch.cat(pooled))


def _nearest_neighbours(features: torch.Tensor) -> torch.Tensor:
    normalized = nn.functional.normalize(features, dim=-1)
    similarity = normalized @ normalized.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=-1)


def feature_quality(
    features: ImageFeatures, reference: ImageFeatures
) -> FeatureQuality:
    """How close ``features`` are to the FP32 ``reference`` of the same images."""
    cls = nn.functional.cosine_similarity(features.cls, reference.cls, dim=-1)
    pooled = nn.functional.cosine_similarity(features.pooled, reference.pooled, dim=-1)
    agreement = _nearest_neighbours(features.cls) == _nearest_neighbours(reference.cls)
    return FeatureQuality(
        num_images=len(cls),
        cls_cosine=float(cls.mean()),
        cls_cosine_min=float(cls.min()),
        pooled_cosine=float(pooled.mean()),
        nn_agreement=float(agreement.float().mean()),
    )
