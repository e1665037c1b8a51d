"""Online rotations of a compressed-tensors checkpoint, which transformers skips.

transformers 5.17 applies a checkpoint's ``quantization_config`` but not its
``transform_config``: a model saved after QuIP loads with the inverse rotations
fused into its weights but without the online input rotations. They are attached
here, and their matrices loaded from the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger
from safetensors.torch import load_file
from torch import nn
from transformers.utils import cached_file

__all__ = ["attach_online_transforms", "checkpoint_file"]

_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def checkpoint_file(source, name: str, **hub_kwargs) -> Path | None:
    """``name`` inside the checkpoint ``source`` (a folder or hub id), or None.

    :param source: the checkpoint
    :param name: a file name
    :param hub_kwargs: ``cache_dir``, ``revision``, ``token`` ... for hub ids
    """
    path = cached_file(
        str(source),
        name,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )
    return Path(path) if path else None


def attach_online_transforms(model: nn.Module, source, **hub_kwargs) -> bool:
    """Attach the checkpoint's online rotations (once) and load their matrices.

    The rotations whose inverse is fused into the saved weights are left out.

    :param model: the model loaded from ``source``
    :param source: the checkpoint folder or hub id
    :return: whether rotations were attached
    :raises ValueError: the config names online rotations the weights do not hold
    """
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase

    config_file = checkpoint_file(source, "config.json", **hub_kwargs)
    if config_file is None:
        return False
    quantization = json.loads(config_file.read_text()).get("quantization_config")
    groups = ((quantization or {}).get("transform_config") or {}).get("config_groups")
    if not groups or any(isinstance(m, TransformBase) for m in model.modules()):
        return False
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
        raise ValueError(
            f"{source}: its transform_config names online rotations, but its "
            "weights hold no rotation matrices; save the model again."
        )
    model.load_state_dict(saved, strict=False)
    # transformers has already reported these keys as UNEXPECTED ("not ok if you
    # expect identical arch"): say that they are in place now
    logger.info(
        f"Online rotations attached from {source}: {len(saved)} rotation "
        f"matrices loaded into {len(transform_keys)} transforms (the keys "
        "transformers' load report calls UNEXPECTED)"
    )
    return True


def _fused(location) -> bool:
    return str(getattr(location, "value", location)).startswith("weight")


def _weight_files(source, hub_kwargs: dict) -> list[Path]:
    single = checkpoint_file(source, _WEIGHTS, **hub_kwargs)
    if single is not None:
        return [single]
    index = checkpoint_file(source, _WEIGHTS_INDEX, **hub_kwargs)
    if index is None:
        return []
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [p for p in (checkpoint_file(source, s, **hub_kwargs) for s in shards) if p]
