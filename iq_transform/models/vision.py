"""Vision transformers: which configs are image encoders, and their image processors.

transformers' ``AutoImageProcessor`` needs torchvision, which the CPU stack here
does not have (it pins torch); every processor used here has a PIL twin
(``<Name>ImageProcessorPil``) that computes the same ``pixel_values``.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

__all__ = [
    "VISION_MODEL_TYPES",
    "is_vision_config",
    "load_image_processor",
    "vision_model_class",
]

# model types whose checkpoints are image encoders (pixel_values in, tokens out)
VISION_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "clip_vision_model")


def is_vision_config(config) -> bool:
    model_type = getattr(config, "model_type", "")
    return model_type.removesuffix("_spikefree") in VISION_MODEL_TYPES or (
        model_type == "clip" and hasattr(config, "vision_config")
    )


def vision_model_class(config) -> type:
    """The class a vision checkpoint is loaded as: the one it was saved from
    (``Dinov2Model``, ``ViTForImageClassification``); a full CLIP checkpoint's
    vision tower (``CLIPVisionModel``)."""
    if getattr(config, "model_type", "") == "clip":
        return transformers.CLIPVisionModel
    for name in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class
    return transformers.AutoModel


def load_image_processor(source: str | Path, **hub_kwargs):
    """The image processor saved with a model (folder or hub id)."""
    try:
        return transformers.AutoImageProcessor.from_pretrained(source, **hub_kwargs)
    except ImportError:
        pass  # no torchvision: the PIL processor of the same name
    path = Path(source) / "preprocessor_config.json"
    if path.is_file():
        name = json.loads(path.read_text())["image_processor_type"]
    else:
        from transformers.image_processing_base import ImageProcessingMixin

        name = ImageProcessingMixin.get_image_processor_dict(source, **hub_kwargs)[0][
            "image_processor_type"
        ]
    processor_class = getattr(transformers, name.removesuffix("Fast") + "Pil", None)
    if processor_class is None:
        raise ImportError(
            f"{name} needs torchvision (pip install torchvision matching torch) and "
            "has no PIL implementation in this transformers version."
        )
    return processor_class.from_pretrained(source, **hub_kwargs)
