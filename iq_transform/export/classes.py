"""The transformers classes of a SpikeFree checkpoint.

A checkpoint saved with SpikeFree names its model type ``<base>_spikefree`` (e.g.
``llama_spikefree``): the base model's config and causal-LM classes under that
name, whose ``from_pretrained`` also installs the saved runtime. ``import
iq_transform`` registers them with ``AutoConfig`` / ``AutoModelForCausalLM``; the
checkpoint also carries them as remote code (``auto_map``), so
``trust_remote_code=True`` loads it in a process that never imported iq_transform.
A process with neither refuses the folder instead of silently loading the plain
model, whose static scales were calibrated without spikes.
"""

from __future__ import annotations

import functools

from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
)

from iq_transform.models.arch import ARCHITECTURES, SPIKEFREE_SUFFIX

__all__ = [
    "REMOTE_CODE_FILE",
    "register_classes",
    "remote_code",
    "spikefree_classes",
]

REMOTE_CODE_FILE = "spikefree_checkpoint.py"
# hub arguments of from_pretrained that also locate the SpikeFree files
HUB_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
)


@functools.cache
def spikefree_classes(base_model_type: str) -> tuple[type, type]:
    """``(config class, causal-LM class)`` of ``<base_model_type>_spikefree``.

    :param base_model_type: a model type transformers knows, e.g. ``llama``
    """
    config_base = CONFIG_MAPPING[base_model_type]
    model_base = MODEL_FOR_CAUSAL_LM_MAPPING[config_base]
    config_class = type(
        f"SpikeFree{config_base.__name__}",
        (config_base,),
        {"model_type": base_model_type + SPIKEFREE_SUFFIX, "__module__": __name__},
    )

    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        from iq_transform.export.load import install_from_checkpoint

        model = super(model_class, cls).from_pretrained(
            pretrained_model_name_or_path, *args, **kwargs
        )
        hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        install_from_checkpoint(model, pretrained_model_name_or_path, **hub)
        return model

    model_class = type(
        f"SpikeFree{model_base.__name__}",
        (model_base,),
        {
            "config_class": config_class,
            "from_pretrained": classmethod(from_pretrained),
            "__module__": __name__,
        },
    )
    return config_class, model_class


def register_classes() -> None:
    """Register every architecture's SpikeFree classes with the Auto classes."""
    for spec in ARCHITECTURES:
        for model_type in spec.model_types:
            if model_type not in CONFIG_MAPPING:
                continue
            if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
                continue  # vision encoders: no SpikeFree checkpoint class yet
            config_class, model_class = spikefree_classes(model_type)
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def remote_code(base_model_type: str) -> str:
    """The checkpoint's ``spikefree_checkpoint.py`` (``auto_map`` points here)."""
    return f'''"""This checkpoint was quantized with SpikeFree (iq_transform): its
static activation scales assume the SpikeFree runtime, saved in spikefree.json and
spikefree.safetensors. Load it after `import iq_transform` (pip install
iq-transform), or with trust_remote_code=True, which runs this file."""

from iq_transform.export.classes import spikefree_classes

SpikeFreeConfig, SpikeFreeForCausalLM = spikefree_classes({base_model_type!r})
'''


def auto_map() -> dict[str, str]:
    """config.json's ``auto_map`` for the remote-code classes."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {
        "AutoConfig": f"{module}.SpikeFreeConfig",
        "AutoModelForCausalLM": f"{module}.SpikeFreeForCausalLM",
    }
