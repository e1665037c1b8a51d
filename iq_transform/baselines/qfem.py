"""QFeM-style baseline: leave the linear layers whose inputs spike unquantized.

QFeM (Yang et al. 2024, "Mitigating quantization errors due to activation spikes in
GLU-based LLMs") measures, per linear layer, the ratio of the largest token max |x|
to the median token max over calibration data, and keeps the layers above a
threshold in full precision. The harness adds them to the quantizer's ``ignore``
list, so the composed ``recipe.yaml`` names them.
"""

from __future__ import annotations

import torch
from loguru import logger
from torch import nn
from transformers import PreTrainedTokenizerBase

from iq_transform.evaluation.spike_analysis import LINEAR_INPUT, analyze_spikes

__all__ = ["spiky_linears"]


def spiky_linears(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    windows: torch.Tensor,
    ratio: float = 64.0,
    progress: bool = True,
) -> list[str]:
    """Decoder linears whose input's peak token ratio exceeds ``ratio``, largest
    ratio first.

    :param model: the full-precision model
    :param tokenizer: its tokenizer
    :param windows: (samples, seqlen) calibration token windows
    :param ratio: QFeM's threshold on max token max / median token max
    :return: module names, e.g. ``model.layers.11.mlp.down_proj``
    """
    report = analyze_spikes(model, tokenizer, windows, ratio=ratio, progress=progress)
    sites = sorted(
        (s for s in report.sites if s.kind == LINEAR_INPUT),
        key=lambda site: site.peak_token_ratio,
        reverse=True,
    )
    spiky = [s.name for s in sites if s.peak_token_ratio > ratio]
    shown = ", ".join(f"{s.name} ({s.peak_token_ratio:.0f}x)" for s in sites[:5])
    if spiky:
        logger.info(f"QFeM: {len(spiky)} linears stay unquantized; top ratios {shown}")
    else:
        logger.warning(
            f"QFeM: no linear input exceeds {ratio:g}x its median token max (top: "
            f"{shown}); nothing is left unquantized, so this equals plain static."
        )
    return spiky
