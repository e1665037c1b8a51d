"""Spike-free static calibration: observers that drop the current spike rows.

Registered with llm-compressor, so unchanged ``QuantizationModifier`` /
``GPTQModifier`` recipes use them by name::

    input_activations: {num_bits: 8, type: int, strategy: tensor, dynamic: false,
                        symmetric: true, observer: spikefree_minmax}

Each observer removes the rows flagged for the forward in flight
(:func:`iq_transform.spikefree.rows.excluded_rows`: SpikeFree's spike tokens, or the
PrefixQuant-style baseline's prefix) before its parent computes statistics; with
nothing flagged they behave exactly like their parent.
"""

from __future__ import annotations

import torch
from llmcompressor.observers import Observer
from llmcompressor.observers.min_max import MinMaxObserver, StaticMinMaxObserver
from llmcompressor.observers.mse import MovingAverageMSEObserver

from iq_transform.spikefree.rows import excluded_rows

__all__ = [
    "SpikeFreeMinMaxObserver",
    "SpikeFreeStaticMinMaxObserver",
    "SpikeFreeMSEObserver",
    "drop_spike_rows",
]


def drop_spike_rows(observed: torch.Tensor) -> torch.Tensor:
    """``observed`` (batch, tokens, hidden) without the rows flagged for the forward
    in flight, as (rows, hidden); unchanged when none are flagged or shapes do not
    match."""
    rows = excluded_rows()
    if rows is None or observed.dim() < 3 or rows.shape != observed.shape[:-1]:
        return observed
    if not bool(rows.any()):
        return observed
    return observed[~rows.to(observed.device)]


class _DropsSpikeRows:
    def forward(self, observed: torch.Tensor):
        return super().forward(drop_spike_rows(observed))


@Observer.register("spikefree_minmax")
class SpikeFreeMinMaxObserver(_DropsSpikeRows, MinMaxObserver):
    """``minmax`` (moving average) over non-spike rows."""


@Observer.register("spikefree_static_minmax")
class SpikeFreeStaticMinMaxObserver(_DropsSpikeRows, StaticMinMaxObserver):
    """``static_minmax`` (running global min/max) over non-spike rows."""


@Observer.register("spikefree_mse")
class SpikeFreeMSEObserver(_DropsSpikeRows, MovingAverageMSEObserver):
    """MSE-optimal clipping range of each batch's non-spike rows, averaged evenly
    over batches.

    llm-compressor's ``mse`` smooths with a 0.01 moving average that starts from the
    first batch, so with 16 shuffled batches the first one carries ~85 % of the
    weight and scales change from run to run; an even mean does not.
    """

    def update_statistics_from_observed(self, observed: torch.Tensor) -> None:
        if not hasattr(self, "min_vals"):
            self.batches_seen = 0
        previous = (self.min_vals, self.max_vals) if self.batches_seen else None
        self.avg_constant = 1.0  # the parent then stores this batch's range alone
        super().update_statistics_from_observed(observed)
        self.batches_seen += 1
        if previous is not None:
            weight = 1.0 / self.batches_seen
            self.min_vals = torch.lerp(previous[0], self.min_vals, weight)
            self.max_vals = torch.lerp(previous[1], self.max_vals, weight)
