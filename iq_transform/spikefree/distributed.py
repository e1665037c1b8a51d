"""Data-parallel calibration: one set of statistics across ``torchrun`` ranks.

llm-compressor's ``oneshot`` under ``torchrun`` gives every rank its own share of
the calibration data. SpikeFree's decisions (which layers carry spikes, where
``down_proj`` templates go) and its templates and thresholds must then come from
all ranks' tokens together, or ranks would install different sites. Before the
statistics become templates they are all-reduced: sums and counts add up, the
largest ordinary token max is a maximum, the smallest spike token max a minimum.
Every rank then finalizes identical statistics into identical templates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from compressed_tensors.distributed import is_distributed
from loguru import logger

from iq_transform.spikefree.templates import LayerStatistics

__all__ = ["reduce_statistics"]


def reduce_statistics(statistics: Sequence[LayerStatistics]) -> None:
    """All-reduce every layer's calibration statistics in place across the ranks
    of the default process group; nothing happens without one.

    :param statistics: one :class:`LayerStatistics` per decoder layer, in layer
        order, the same layers and norms on every rank
    """
    if not is_distributed():
        return
    sums: list[torch.Tensor] = []
    for stats in statistics:
        for name in stats.norm_sums:
            sums += [stats.norm_sums[name], stats.norm_counts[name]]
        sums += [stats.down_sums, stats.down_counts]
    counters = torch.tensor(
        [
            [s.sequences, s.sequences_with_carriers, s.sequences_with_down_spikes]
            for s in statistics
        ],
        dtype=torch.float64,
    )
    gaps = [(s.residual_gap, s.down_gap) for s in statistics]
    max_ordinary = torch.tensor(
        [[gap.max_ordinary for gap in pair] for pair in gaps], dtype=torch.float64
    )
    min_spike = torch.tensor(
        [[gap.min_spike for gap in pair] for pair in gaps], dtype=torch.float64
    )
    _all_reduce_(sums + [counters], dist.ReduceOp.SUM)
    _all_reduce_([max_ordinary], dist.ReduceOp.MAX)
    _all_reduce_([min_spike], dist.ReduceOp.MIN)
    for stats, count, largest, smallest in zip(
        statistics,
        counters.tolist(),
        max_ordinary.tolist(),
        min_spike.tolist(),
        strict=True,
    ):
        stats.sequences, stats.sequences_with_carriers = int(count[0]), int(count[1])
        stats.sequences_with_down_spikes = int(count[2])
        stats.residual_gap.max_ordinary, stats.down_gap.max_ordinary = largest
        stats.residual_gap.min_spike, stats.down_gap.min_spike = smallest
    sequences = int(counters[0, 0]) if len(statistics) else 0
    logger.info(
        f"SpikeFree: calibration statistics reduced over {dist.get_world_size()} "
        f"ranks ({sequences} sequences in all)"
    )


def _all_reduce_(tensors: list[torch.Tensor], op: dist.ReduceOp) -> None:
    """One ``all_reduce`` of ``tensors`` packed flat, written back in place."""
    device = _collective_device()
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device)
    dist.all_reduce(flat, op=op)
    for tensor, reduced in zip(
        tensors, flat.split([t.numel() for t in tensors]), strict=True
    ):
        tensor.copy_(reduced.view_as(tensor))


def _collective_device() -> torch.device:
    """CPU where the default group's backend takes CPU tensors (gloo, also in a
    ``cpu:gloo,cuda:nccl`` group); the rank's accelerator otherwise (NCCL, XCCL)."""
    backend = str(dist.get_backend()).lower()
    accelerator = torch.accelerator.current_accelerator()
    if "gloo" in backend or accelerator is None:
        return torch.device("cpu")
    return torch.device(accelerator.type, torch.accelerator.current_device_index())
