"""Baselines that SpikeFree is measured against, in the same harness.

- :mod:`~iq_transform.baselines.prefixquant`: a prefix of outlier tokens whose KV
  cache is computed in full precision (PrefixQuant, Chen et al. 2024);
- :mod:`~iq_transform.baselines.qfem`: linear layers with activation spikes left
  unquantized (QFeM, Yang et al. 2024).

Both are deliberately small: they exist to be compared with, like with like.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iq_transform.baselines.prefixquant import (
    PrefixQuantModifier,
    find_prefix,
    with_prefix,
)
from iq_transform.baselines.qfem import spiky_linears
from iq_transform.compose import TransformConfig, TransformPlan

__all__ = [
    "PrefixQuantModifier",
    "find_prefix",
    "with_prefix",
    "spiky_linears",
    "plan_transform",
]


def plan_transform(
    transform: TransformConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    calibration: torch.Tensor,
    progress: bool = True,
) -> TransformPlan:
    """Measure what a baseline needs on the full-precision model, before oneshot.

    :param transform: the transform choice (``prefix`` and ``qfem`` measure)
    :param model: the full-precision model
    :param tokenizer: its tokenizer
    :param calibration: (samples, seqlen) calibration windows; the first
        ``transform.num_calibration_samples`` are scanned
    :param progress: show a progress bar
    """
    windows = calibration[: max(transform.num_calibration_samples, 1)]
    if transform.method == "prefix":
        prefix = find_prefix(
            model,
            tokenizer,
            windows,
            ratio=transform.ratio,
            max_tokens=transform.max_prefix_tokens,
            progress=progress,
        )
        return TransformPlan(prefix_ids=prefix)
    if transform.method == "qfem":
        unquantized = spiky_linears(
            model, tokenizer, windows, ratio=transform.ratio, progress=progress
        )
        return TransformPlan(unquantized=unquantized)
    return TransformPlan()
