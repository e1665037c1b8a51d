"""Models: specs and loading, offline GGUF conversion, the planted toy, the
per-architecture mapping, offloading.

The lowest layer of the package: it imports nothing else of ``iq_transform``.
"""

from iq_transform.models.arch import ArchSpec, UnknownArchitectureError, get_arch_spec
from iq_transform.models.cache import default_cache_dir, offline_model_dir
from iq_transform.models.loading import AUTO_OFFLOAD, load_model, resolve_model_dir
from iq_transform.models.registry import (
    OFFLINE_MODELS,
    TOY_FAMILIES,
    TOY_MODEL,
    ModelSpecError,
    OfflineModel,
)
from iq_transform.models.toy import build_planted_spike_model

__all__ = [
    "AUTO_OFFLOAD",
    "OFFLINE_MODELS",
    "TOY_FAMILIES",
    "TOY_MODEL",
    "ArchSpec",
    "ModelSpecError",
    "OfflineModel",
    "UnknownArchitectureError",
    "build_planted_spike_model",
    "default_cache_dir",
    "get_arch_spec",
    "load_model",
    "offline_model_dir",
    "resolve_model_dir",
]
