"""Per-architecture knowledge, in one declarative table.

Everything the rest of the package needs to know about a model family lives here:
where the decoder layers are, which norms feed which quantized linears, which linear
is the MLP's output projection (where spikes are born and removed) and how the norm
applies its weight. Adding an architecture means adding one ``ArchSpec`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ArchSpec",
    "ARCHITECTURES",
    "SPIKEFREE_SUFFIX",
    "UnknownArchitectureError",
    "base_model_type",
    "get_arch_spec",
]

# A checkpoint saved with SpikeFree names its model type ``<base>_spikefree`` (so a
# process without iq_transform cannot load it as the plain, broken model).
SPIKEFREE_SUFFIX = "_spikefree"


class UnknownArchitectureError(ValueError):
    """The model's ``config.model_type`` has no entry in ``ARCHITECTURES``."""


@dataclass(frozen=True)
class ArchSpec:
    """How one model family is laid out.

    :param name: family name used in logs
    :param model_types: ``config.model_type`` values that use this layout
    :param decoder: attribute path of the base model (embeddings, layers, final norm;
        no ``lm_head``)
    :param layers: attribute path from the top model to the decoder ``ModuleList``
    :param norm_linears: for each norm inside a decoder layer whose output feeds
        quantized linears, the names of those linears (relative to the layer)
    :param down_proj: the MLP output projection, relative to a decoder layer
    :param final_norm: attribute path of the final norm from the top model
    :param norm_weight_offset: the norm computes ``x_hat * (offset + weight)``;
        1.0 for Gemma's ``(1 + w)`` norms, 0.0 for Llama's ``w``
    :param norm_kind: ``"rms"`` (``x / rms(x)``) or ``"layer"`` (LayerNorm: the
        mean is subtracted first and a bias added after the weight)
    :param inputs: the forward argument that carries a sample: ``input_ids``
        for decoders, ``pixel_values`` for vision transformers
    :param paths_from_base: the paths above are relative to the bare encoder
        (``ViTModel``), so they also hold under a task head's prefix
        (``ViTForImageClassification``'s ``vit.``)
    """

    name: str
    model_types: tuple[str, ...]
    decoder: str = "model"
    layers: str = "model.layers"
    norm_linears: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "input_layernorm": (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
            ),
            "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        }
    )
    down_proj: str = "mlp.down_proj"
    final_norm: str = "model.norm"
    norm_weight_offset: float = 0.0
    norm_kind: Literal["rms", "layer"] = "rms"
    inputs: Literal["input_ids", "pixel_values"] = "input_ids"
    paths_from_base: bool = False

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def norm_names(self) -> tuple[str, ...]:
        return tuple(self.norm_linears)

    def effective_norm_weight(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel factor the norm multiplies its normalized input by."""
        return norm.weight.float() + self.norm_weight_offset


LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "granite"),
)
GEMMA3 = ArchSpec(
    name="gemma3",
    model_types=("gemma3_text", "gemma2", "gemma"),
    norm_linears={
        "input_layernorm": (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
        ),
        "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
    },
    norm_weight_offset=1.0,
)

# Phi-3's fused projections are plain linears fed by one norm each: the mapping
# needs no more than their names (down_proj is hooked, not the MLP's forward).
PHI3 = ArchSpec(
    name="phi3",
    model_types=("phi3",),
    norm_linears={
        "input_layernorm": ("self_attn.qkv_proj",),
        "post_attention_layernorm": ("mlp.gate_up_proj",),
    },
)
# Vision transformers: LayerNorm, fc1 -> fc2 MLPs, CLS (the first token) and
# register / high-norm patch tokens (mid-sequence kind), no mask, no cache.
VIT = ArchSpec(
    name="vit",
    model_types=("vit",),
    decoder="",
    layers="layers",
    norm_linears={
        "layernorm_before": (
            "attention.q_proj",
            "attention.k_proj",
            "attention.v_proj",
        ),
        "layernorm_after": ("mlp.fc1",),
    },
    down_proj="mlp.fc2",
    final_norm="layernorm",
    norm_kind="layer",
    inputs="pixel_values",
    paths_from_base=True,
)
DINOV2 = replace(
    VIT,
    name="dinov2",
    model_types=("dinov2", "dinov2_with_registers"),
    layers="encoder.layer",
    norm_linears={
        "norm1": (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
        ),
        "norm2": ("mlp.fc1",),
    },
)
CLIP_VISION = replace(
    VIT,
    name="clip_vision",
    model_types=("clip_vision_model",),
    layers="encoder.layers",
    norm_linears={
        "layer_norm1": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "layer_norm2": ("mlp.fc1",),
    },
    final_norm="post_layernorm",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (LLAMA, GEMMA3, PHI3, VIT, DINOV2, CLIP_VISION)


def base_model_type(config) -> str | None:
    """``config.model_type`` without the SpikeFree checkpoint suffix (Gemma-3's
    multimodal wrapper: its text model's type)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma" and hasattr(config, "text_config"):
        model_type = config.text_config.model_type
    if model_type is not None:
        model_type = model_type.removesuffix(SPIKEFREE_SUFFIX)
    return model_type


def get_arch_spec(model: nn.Module) -> ArchSpec:
    """Look up the layout of ``model`` from its ``config.model_type``."""
    model_type = base_model_type(getattr(model, "config", None))
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return _under_task_head(spec, model)
    known = sorted(t for spec in ARCHITECTURES for t in spec.model_types)
    raise UnknownArchitectureError(
        f"Unknown architecture: config.model_type={model_type!r}. iq_transform knows "
        f"{known}. Add an ArchSpec entry for {model_type!r} to ARCHITECTURES in "
        "iq_transform/models/arch.py: the decoder layers' path, each norm -> the "
        "linears it feeds, the MLP's output projection, the norm kind (RMSNorm or "
        "LayerNorm) and the input (input_ids or pixel_values)."
    )


def _under_task_head(spec: ArchSpec, model: nn.Module) -> ArchSpec:
    """``spec`` with its paths under the task head's base model prefix, if any."""
    base = getattr(model, "base_model", model)
    if not spec.paths_from_base or base is model:
        return spec
    prefix = model.base_model_prefix

    def under(path: str) -> str:
        return f"{prefix}.{path}" if path else prefix

    return replace(
        spec,
        decoder=under(spec.decoder),
        layers=under(spec.layers),
        final_norm=under(spec.final_norm),
        paths_from_base=False,
    )
