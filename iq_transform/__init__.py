"""iq_transform: spike-free activations for static per-tensor quantization.

Importing the package registers ``SpikeFreeModifier`` and the baselines'
``PrefixQuantModifier`` (for YAML recipes) and the ``spikefree_*`` observers with
llm-compressor, and the SpikeFree checkpoint classes with transformers
(``AutoModelForCausalLM.from_pretrained`` of a folder saved with SpikeFree installs
its runtime; :func:`load_pretrained` does the same).

Subpackages, from the bottom up (each imports only those below it):
``models`` (specs, loading, the architecture mapping), ``spikefree`` (the method),
``export`` (checkpoints that keep the runtime),
``evaluation`` (text, perplexity, spike measurements), ``baselines``,
``composition`` (config groups -> recipe -> oneshot -> results), ``reports``,
``cli`` (the Hydra apps).
"""

from iq_transform.baselines import PrefixQuantModifier
from iq_transform.export import CheckpointError, load_pretrained
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
    "CheckpointError",
    "load_pretrained",
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
