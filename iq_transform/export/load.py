"""Load a SpikeFree checkpoint: the quantized model with its runtime installed."""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from iq_transform.export.classes import HUB_KWARGS, auto_class_for
from iq_transform.export.format import (
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    read_state,
)
from iq_transform.models.transforms import attach_online_transforms, checkpoint_file
from iq_transform.spikefree.runtime import SpikeFreeRuntime, get_runtime

__all__ = ["install_from_checkpoint", "load_pretrained"]


def load_pretrained(source: str | Path, **kwargs) -> PreTrainedModel:
    """The model saved in ``source`` (a folder or hub id), in eval mode, with its
    SpikeFree runtime installed when it was saved with one.

    The same as ``AutoModelForCausalLM.from_pretrained(source, **kwargs)`` after
    ``import iq_transform`` (for a vision encoder: ``AutoModel``, or
    ``AutoModelForImageClassification``, as it was saved).

    :param source: what ``save_pretrained`` wrote, or its hub id
    :param kwargs: ``from_pretrained`` arguments (``dtype``, ``device_map`` ...)
    """
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    config_dict, _ = PretrainedConfig.get_config_dict(str(source), **hub)
    model = auto_class_for(config_dict).from_pretrained(str(source), **kwargs)
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
    state_file = checkpoint_file(source, STATE_FILE, **hub_kwargs)
    tensors_file = checkpoint_file(source, TENSORS_FILE, **hub_kwargs)
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
    attach_online_transforms(model, source, **hub_kwargs)
    runtime = state.install(model)
    logger.info(
        f"SpikeFree runtime installed from {state_file}: carriers in layers "
        f"{state.templates.carrier_layers}, down_proj templates at "
        f"{state.templates.down_proj_layers}"
    )
    return runtime
