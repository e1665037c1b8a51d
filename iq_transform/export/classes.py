"""The transformers classes of a SpikeFree checkpoint.

A checkpoint saved with SpikeFree names its model type ``<base>_spikefree`` (e.g.
``llama_spikefree``): the base model's config and model classes under that name
(the causal LM; for a vision encoder the class it was saved from: the backbone,
``AutoModel``, or an image classifier), whose ``from_pretrained`` also installs the
saved runtime. ``import iq_transform`` registers them with ``AutoConfig`` and the
Auto classes of :data:`AUTO_CLASSES`; the
checkpoint also carries them as remote code (``auto_map``), so
``trust_remote_code=True`` loads it in a process that never imported iq_transform.
A process with neither refuses the folder instead of silently loading the plain
model, whose static scales were calibrated without spikes.
"""

from __future__ import annotations

import functools

from torch import nn
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    MODEL_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

from iq_transform.models.arch import ARCHITECTURES, SPIKEFREE_SUFFIX

__all__ = [
    "AUTO_CLASSES",
    "REMOTE_CODE_FILE",
    "auto_class_of",
    "auto_class_for",
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


# Auto class -> (its config-to-model mapping, the model class's name in the remote
# code), in the order a saved model's class is looked up
AUTO_CLASSES = {
    AutoModelForCausalLM: (MODEL_FOR_CAUSAL_LM_MAPPING, "SpikeFreeForCausalLM"),
    AutoModelForImageClassification: (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
        "SpikeFreeForImageClassification",
    ),
    AutoModel: (MODEL_MAPPING, "SpikeFreeModel"),
}


def auto_class_of(model: nn.Module, base_model_type: str) -> type:
    """The Auto class that builds ``model``'s class (a causal LM, an image
    classifier, a backbone).

    :raises ValueError: a model class no Auto class of :data:`AUTO_CLASSES` builds
    """
    config_base = CONFIG_MAPPING[base_model_type]
    for auto_class, (mapping, _) in AUTO_CLASSES.items():
        if config_base in mapping and isinstance(model, mapping[config_base]):
            return auto_class
    autos = ", ".join(auto_class.__name__ for auto_class in AUTO_CLASSES)
    raise ValueError(
        f"{type(model).__name__} is not what {autos} build for {base_model_type!r}: "
        "save the model as one of those classes."
    )


def auto_class_for(config_dict: dict) -> type:
    """The Auto class that loads a saved ``config.json``: the one its SpikeFree
    ``auto_map`` names, else the one its ``architectures`` name implies."""
    named = set(config_dict.get("auto_map") or {})
    for auto_class in AUTO_CLASSES:
        if auto_class.__name__ in named:
            return auto_class
    architectures = config_dict.get("architectures") or [""]
    if architectures[0].endswith("ForImageClassification"):
        return AutoModelForImageClassification
    if architectures[0].endswith("Model"):
        return AutoModel
    return AutoModelForCausalLM


@functools.cache
def _config_class(base_model_type: str) -> type:
    config_base = CONFIG_MAPPING[base_model_type]
    return type(
        f"SpikeFree{config_base.__name__}",
        (config_base,),
        {"model_type": base_model_type + SPIKEFREE_SUFFIX, "__module__": __name__},
    )


@functools.cache
def spikefree_classes(
    base_model_type: str, auto_class: type = AutoModelForCausalLM
) -> tuple[type, type]:
    """``(config class, model class)`` of ``<base_model_type>_spikefree``.

    :param base_model_type: a model type transformers knows, e.g. ``llama``
    :param auto_class: the Auto class whose model class is extended (a key of
        :data:`AUTO_CLASSES`)
    """
    config_base = CONFIG_MAPPING[base_model_type]
    model_base = AUTO_CLASSES[auto_class][0][config_base]
    config_class = _config_class(base_model_type)

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
    _keep_weight_renamings(model_base.__name__, model_class.__name__)
    _keep_weight_renamings(base_model_type, config_class.model_type)
    return config_class, model_class


def _keep_weight_renamings(base: str, spikefree: str) -> None:
    """transformers renames some checkpoints' weights on load by class name or
    model type (``ViTModel``: ``encoder.layer.N.attention.attention.query`` ->
    ``layers.N.attention.q_proj``); the SpikeFree class and model type get the
    same renamings, or a saved ViT would load with its weights missing."""
    mapping = get_checkpoint_conversion_mapping(base)
    if mapping is not None:
        register_checkpoint_conversion_mapping(spikefree, mapping, overwrite=True)


def register_classes() -> None:
    """Register every architecture's SpikeFree classes with the Auto classes."""
    for spec in ARCHITECTURES:
        for model_type in spec.model_types:
            if model_type not in CONFIG_MAPPING:
                continue
            config_base = CONFIG_MAPPING[model_type]
            config_class = _config_class(model_type)
            AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
            for auto_class, (mapping, _) in AUTO_CLASSES.items():
                if config_base in mapping:
                    _, model_class = spikefree_classes(model_type, auto_class)
                    auto_class.register(config_class, model_class, exist_ok=True)


def remote_code(base_model_type: str, auto_class: type = AutoModelForCausalLM) -> str:
    """The checkpoint's ``spikefree_checkpoint.py`` (``auto_map`` points here)."""
    name = AUTO_CLASSES[auto_class][1]
    return f'''"""This checkpoint was quantized with SpikeFree (iq_transform): its
static activation scales assume the SpikeFree runtime, saved in spikefree.json and
spikefree.safetensors. Load it after `import iq_transform` (pip install
iq-transform), or with trust_remote_code=True, which runs this file."""

import transformers

from iq_transform.export.classes import spikefree_classes

SpikeFreeConfig, {name} = spikefree_classes(
    {base_model_type!r}, transformers.{auto_class.__name__}
)
'''


def auto_map(auto_class: type = AutoModelForCausalLM) -> dict[str, str]:
    """config.json's ``auto_map`` for the remote-code classes."""
    module = REMOTE_CODE_FILE.removesuffix(".py")
    return {
        "AutoConfig": f"{module}.SpikeFreeConfig",
        auto_class.__name__: f"{module}.{AUTO_CLASSES[auto_class][1]}",
    }
