"""A tiny vision transformer with planted massive activations, for tests.

As the planted Llama (:mod:`iq_transform.models.toy`), for ViTs: two spike kinds,
on the CLS token (the first token) and on one patch position (mid-sequence, as the
high-norm patch and register tokens of DINOv2 and CLIP). Each is marked in its own
embedding channel (the CLS token's, and that patch's position embedding), a unit of
layer ``create_layer``'s MLP turns the marker into a spike in its own residual
channel and a unit of layer ``remove_layer``'s cancels it. The reserved channels are
written by nothing else; the planted ``fc1`` units carry a negative bias, so under
LayerNorm (which shifts every channel by the token's mean) they fire on marked
tokens only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, BitImageProcessorPil, PreTrainedModel

from iq_transform.models.arch import get_arch_spec
from iq_transform.models.cache import cached_build
from iq_transform.models.registry import TOY_MODEL
from iq_transform.models.toy import PlantedSpike

__all__ = [
    "VIT_TOY_FAMILIES",
    "build_planted_spike_vit",
    "random_images",
    "toy_image_processor",
]

VIT_TOY_FAMILIES = ("dinov2", "vit")
# Larger than the Llama toy's: under LayerNorm each token's spread sets the normalized
# marker, and a marker that dominates its token makes the spike the same in every
# image (so the removing unit cancels it exactly); 60 is still ~8x a token's max.
MARKER = 60.0
# fc1 weight and bias of a planted unit: fires on a normalized input of ~8 (a
# marker or spike dominating its token) far above every other fc2 input, silent
# (GELU(-60) = 0) elsewhere
UNIT_WEIGHT, UNIT_BIAS = 64.0, -64.0


def random_images(count: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    """``count`` random normalized images (count, 3, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


def toy_image_processor(image_size: int = 56) -> BitImageProcessorPil:
    """An image processor for the toy's input size (ImageNet statistics)."""
    return BitImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def build_planted_spike_vit(
    family: str = "dinov2",
    hidden_size: int = 64,
    num_layers: int = 6,
    create_layer: int = 1,
    remove_layer: int = 4,
    cls_spike: float = 3000.0,
    patch_spike: float = 1200.0,
    spike_patch: int = 5,
    image_size: int = 56,
    patch_size: int = 14,
    seed: int = 0,
) -> tuple[PreTrainedModel, tuple[PlantedSpike, ...]]:
    """A random tiny ViT encoder (fp32, eval) with spikes on CLS and one patch.

    :param family: ``dinov2`` (``Dinov2Model``) or ``vit`` (``ViTModel``)
    :param spike_patch: the patch (0-based, row-major) that carries the
        mid-sequence spike; its token index is ``spike_patch + 1``
    :return: the model (named after a cache folder with its config and image
        processor, which ``oneshot`` loads) and one ``PlantedSpike`` per kind (CLS
        first); their ``token_id`` is the token *position*
    """
    if family not in VIT_TOY_FAMILIES:
        raise ValueError(f"Unknown ViT toy family {family!r}: {VIT_TOY_FAMILIES}")
    if not 0 <= create_layer < remove_layer < num_layers:
        raise ValueError("need 0 <= create_layer < remove_layer < num_layers")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        family,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        mlp_ratio=2,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.1,
    )
    model = AutoModel.from_config(config).eval()
    spikes = (
        PlantedSpike(0, 3, 17, cls_spike, create_layer, remove_layer),
        PlantedSpike(spike_patch + 1, 5, 23, patch_spike, create_layer, remove_layer),
    )
    arch = get_arch_spec(model)
    layers = arch.decoder_layers(model)
    images = random_images(2, image_size, seed)
    with torch.no_grad():
        embeddings = model.embeddings
        if family == "vit":  # ViT initializes its CLS token to zeros
            embeddings.cls_token.normal_(0.0, 0.1)
        reserved = [c for p in spikes for c in (p.marker_channel, p.spike_channel)]
        _reserve_channels(model, arch, reserved)
        cls, patch = spikes
        embeddings.cls_token[0, 0, cls.marker_channel] = MARKER
        embeddings.position_embeddings[0, patch.token_id, patch.marker_channel] = MARKER
        for unit, planted in enumerate(spikes):
            _plant_unit(
                layers[create_layer],
                arch,
                unit,
                planted.marker_channel,
                planted.spike_channel,
            )
            _plant_unit(
                layers[remove_layer],
                arch,
                unit,
                planted.spike_channel,
                planted.spike_channel,
            )
        down = [layer.get_submodule(arch.down_proj) for layer in layers]
        for unit, planted in enumerate(spikes):
            channel, position = planted.spike_channel, planted.token_id
            reached = _residual(model, images, create_layer)[:, position, channel]
            down[create_layer].weight[channel, unit] *= planted.spike / reached.mean()
            before = _residual(model, images, remove_layer - 1)[:, position, channel]
            after = _residual(model, images, remove_layer)[:, position, channel]
            down[remove_layer].weight[channel, unit] *= (
                -before.mean() / (after - before).mean()
            )
    _name_after_its_config(model, image_size)
    return model, spikes


def _name_after_its_config(model: PreTrainedModel, image_size: int) -> None:
    digest = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    name = f"{TOY_MODEL}-{model.config.model_type}.config-{digest[:12]}"

    def write(staging: Path, work_dir: Path) -> None:
        model.config.save_pretrained(staging)
        toy_image_processor(image_size).save_pretrained(staging)

    folder = str(cached_build(name, None, write))
    model.config._name_or_path = folder
    model.name_or_path = folder


def _writers(layer, arch) -> list[torch.nn.Linear]:
    """The linears that write into the residual stream: those no norm feeds."""
    fed = {name for names in arch.norm_linears.values() for name in names}
    return [
        module
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear) and name not in fed
    ]


def _reserve_channels(model, arch, channels: list[int]) -> None:
    embeddings = model.embeddings
    embeddings.cls_token[..., channels] = 0.0
    embeddings.position_embeddings[..., channels] = 0.0
    projection = embeddings.patch_embeddings.projection
    projection.weight[channels] = 0.0
    projection.bias[channels] = 0.0
    for layer in arch.decoder_layers(model):
        for linear in _writers(layer, arch):
            linear.weight[channels] = 0.0
            if linear.bias is not None:
                linear.bias[channels] = 0.0


def _plant_unit(layer, arch, unit: int, read: int, write: int) -> None:
    (fc1,) = next(iter(reversed(arch.norm_linears.values())))
    fc1 = layer.get_submodule(fc1)
    fc1.weight[unit] = 0.0
    fc1.weight[unit, read] = UNIT_WEIGHT
    fc1.bias[unit] = UNIT_BIAS
    fc2 = layer.get_submodule(arch.down_proj)
    fc2.weight[:, unit] = 0.0
    fc2.weight[write, unit] = 1.0


def _residual(model, images: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream (images, tokens, channels) after layer ``layer``."""
    return model(pixel_values=images, output_hidden_states=True).hidden_states[
        layer + 1
    ]
