"""Load a SpikeFree checkpoint: the quantized model with its runtime installed."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import cached_file

from iq_transform.export.format import (
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    read_state,
)
from iq_transform.spikefree.runtime import SpikeFreeRuntime, get_runtime

__all__ = ["install_from_checkpoint", "load_pretrained"]

_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def load_pretrained(source: str | Path, **kwargs) -> PreTrainedModel:
    """The model saved in ``source`` (a folder or hub id), in eval mode, with its
    SpikeFree runtime installed when it was saved with one.

    The same as ``AutoModelForCausalLM.from_pretrained(source, **kwargs)`` after
    ``import iq_transform``.

    :param source: what ``save_pretrained`` wrote, or its hub id
    :param kwargs: ``from_pretrained`` arguments (``dtype``, ``device_map`` ...)
    """
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if get_runtime(model) is None:
        logger.info(f"{source} has no SpikeFree runtime: loaded as saved")
    return model.eval()


def install_from_checkpoint(
    model: nn.Module, source: str | Path, **hub_kwargs
) -> SpikeFreeRuntime:
    """Install the runtime saved beside ``model``'s weights.

    Everything is read and checked against the model first; a checkpoint that
    does not fit raises and leaves the model as it was.

    :param model: the model loaded from ``source``
    :param source: the checkpoint folder or hub id
    :param hub_kwargs: ``cache_dir``, ``revision``, ``token`` ... for hub ids
    :raises CheckpointError: missing, unreadable, edited or foreign SpikeFree files
    """
    state_file = _checkpoint_file(source, STATE_FILE, hub_kwargs)
    tensors_file = _checkpoint_file(source, TENSORS_FILE, hub_kwargs)
    missing = [
        name
        for name, f in ((STATE_FILE, state_file), (TENSORS_FILE, tensors_file))
        if f is None
    ]
    if missing:
        raise CheckpointError(
            f"{source} is a SpikeFree checkpoint (model type "
            f"{model.config.model_type!r}) without {' and '.join(missing)}: it is "
            "incomplete; save the model again from the process that quantized it."
        )
    state = read_state(state_file, tensors_file, model)
    _apply_online_transforms(model, source, hub_kwargs)
    runtime = state.install(model)
    logger.info(
        f"SpikeFree runtime installed from {state_file}: carriers in layers "
        f"{state.templates.carrier_layers}, down_proj templates at "
        f"{state.templates.down_proj_layers}"
    )
    return runtime


def _checkpoint_file(source, name: str, hub_kwargs: dict) -> Path | None:
    path = cached_file(
        str(source),
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    return Path(path) if path else None


def _apply_online_transforms(model: nn.Module, source, hub_kwargs: dict) -> None:
    """QuIP's online input rotations: transformers 5.17 applies the checkpoint's
    ``quantization_config`` but not its ``transform_config``. The rotations whose
    inverse is fused into the saved weights are left out; the online ones are
    attached and their matrices loaded from the checkpoint."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase

    config_file = _checkpoint_file(source, "config.json", hub_kwargs)
    quantization = json.loads(config_file.read_text()).get("quantization_config", {})
    groups = (quantization.get("transform_config") or {}).get("config_groups")
    if not groups or any(isinstance(m, TransformBase) for m in model.modules()):
        return
    config = TransformConfig.model_validate({"config_groups": groups})
    for scheme in config.config_groups.values():
        scheme.apply = [a for a in scheme.apply if not _fused(a.location)]
    apply_transform_config(model, config)
    transform_keys = {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, TransformBase)
        for key, _ in module.named_parameters(recurse=False)
    }
    saved = {}
    for weights in _weight_files(source, hub_kwargs):
        tensors = load_file(str(weights))
        saved.update({k: v for k, v in tensors.items() if k in transform_keys})
    if not saved:
        raise CheckpointError(
            f"{source}: its transform_config names online rotations, but no "
            "rotation matrices are saved in its weights; save the model again."
        )
    model.load_state_dict(saved, strict=False)


def _fused(location) -> bool:
    return str(getattr(location, "value", location)).startswith("weight")


def _weight_files(source, hub_kwargs: dict) -> list[Path]:
    single = _checkpoint_file(source, _WEIGHTS, hub_kwargs)
    if single is not None:
        return [single]
    index = _checkpoint_file(source, _WEIGHTS_INDEX, hub_kwargs)
    if index is None:
        return []
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p for p in (_checkpoint_file(source, s, hub_kwargs) for s in shards) if p]
