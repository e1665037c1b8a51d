"""iq_transform: spike-free activations for static per-tensor quantization.

Importing the package registers ``SpikeFreeModifier`` and the baselines'
``PrefixQuantModifier`` (for YAML recipes) and the ``spikefree_*`` observers with
llm-compressor.

Subpackages, from the bottom up (each imports only those below it):
``models`` (specs, loading, the architecture mapping), ``spikefree`` (the method),
``evaluation`` (text, perplexity, spike measurements), ``baselines``,
``composition`` (config groups -> recipe -> oneshot -> results), ``reports``,
``cli`` (the Hydra apps).
"""

from iq_transform.baselines import PrefixQuantModifier
from iq_transform.spikefree import (
    SpikeFreeMinMaxObserver,
    SpikeFreeModifier,
    SpikeFreeMSEObserver,
    SpikeFreeOrderError,
    SpikeFreeRuntime,
    SpikeFreeStaticMinMaxObserver,
    get_runtime,
    insert_templates,
)

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
