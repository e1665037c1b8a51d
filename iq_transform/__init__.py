"""iq_transform: spike-free activations for static per-tensor quantization.

Importing the package registers ``SpikeFreeModifier`` and the baselines'
``PrefixQuantModifier`` (for YAML recipes) and the ``spikefree_*`` observers with
llm-compressor.
"""

from iq_transform.baselines import PrefixQuantModifier
from iq_transform.modifier import SpikeFreeModifier, SpikeFreeOrderError
from iq_transform.observers import (
    SpikeFreeMinMaxObserver,
    SpikeFreeMSEObserver,
    SpikeFreeStaticMinMaxObserver,
)
from iq_transform.runtime import SpikeFreeRuntime, get_runtime, insert_templates

__version__ = "0.1.0"

__all__ = [
    "SpikeFreeModifier",
    "PrefixQuantModifier",
    "SpikeFreeOrderError",
    "SpikeFreeMinMaxObserver",
    "SpikeFreeMSEObserver",
    "SpikeFreeStaticMinMaxObserver",
    "SpikeFreeRuntime",
    "get_runtime",
    "insert_templates",
]
