"""The method a recipe stage runs: detect -> templates -> runtime <- modifier.

- :mod:`~iq_transform.spikefree.detect`: which tokens are spike tokens;
- :mod:`~iq_transform.spikefree.templates`: calibration statistics -> templates and
  thresholds;
- :mod:`~iq_transform.spikefree.runtime`: the spike-free forward installed into a
  model (:func:`~iq_transform.spikefree.runtime.insert_templates` is the one place
  templates enter activations);
- :mod:`~iq_transform.spikefree.exact_rows`: template rows computed from the
  unquantized template;
- :mod:`~iq_transform.spikefree.rows`: the rows the ``spikefree_*`` observers drop;
- :mod:`~iq_transform.spikefree.observers`: those observers;
- :mod:`~iq_transform.spikefree.distributed`: statistics all-reduced across ranks;
- :mod:`~iq_transform.spikefree.modifier`: ``SpikeFreeModifier``, the lifecycle.

Importing it registers ``SpikeFreeModifier`` and the ``spikefree_*`` observers with
llm-compressor. It imports nothing of ``iq_transform`` but the model mapping
(:mod:`iq_transform.models.arch`).
"""

from iq_transform.spikefree.modifier import SpikeFreeModifier, SpikeFreeOrderError
from iq_transform.spikefree.observers import (
    SpikeFreeMinMaxObserver,
    SpikeFreeMSEObserver,
    SpikeFreeStaticMinMaxObserver,
)
from iq_transform.spikefree.runtime import (
    SpikeFreeRuntime,
    get_runtime,
    insert_templates,
)
from iq_transform.spikefree.templates import SpikeTemplates

__all__ = [
    "SpikeFreeModifier",
    "SpikeFreeOrderError",
    "SpikeFreeMinMaxObserver",
    "SpikeFreeMSEObserver",
    "SpikeFreeStaticMinMaxObserver",
    "SpikeFreeRuntime",
    "SpikeTemplates",
    "get_runtime",
    "insert_templates",
]
