"""What a baseline measures on the full-precision model before its recipe is composed.

The PrefixQuant-style prefix and the QFeM-style unquantized linears are found on
calibration windows first; :func:`~iq_transform.composition.recipe.compose_recipe`
then builds the recipe around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from iq_transform.baselines import find_prefix, spiky_linears
from iq_transform.composition.config import TransformConfig

__all__ = ["TransformPlan", "plan_transform"]


@dataclass
class TransformPlan:
    """What a baseline measured on the full-precision model before composing.

    :param prefix_ids: PrefixQuant-style prefix token ids (empty: no prefix)
    :param unquantized: QFeM-style linears left unquantized
    """

    prefix_ids: list[int] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)


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
