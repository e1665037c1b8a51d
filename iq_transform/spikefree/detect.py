"""Which tokens are spike tokens.

A token is a spike token at a site when its largest |activation| exceeds ``ratio``
times the median, over the valid tokens of its sequence, of that per-token maximum
(Sun et al. 2024; PrefixQuant; INSERTQUANT use 64). One token alone has no median
(decode with a KV cache), so a calibrated absolute threshold can stand in for it.
"""

from __future__ import annotations

import torch

__all__ = ["MIN_TOKENS_FOR_MEDIAN", "token_max", "token_max_abs", "spike_token_mask"]

# A median over a handful of tokens (decode steps, tiny prompts) says nothing.
MIN_TOKENS_FOR_MEDIAN = 8
# below this many elements the CPU's ``abs().amax()`` copy costs less than the
# two reductions' extra ops (equal at 512 x 576 float32)
_CPU_ABS_COPY_MAX = 2**16


def token_max(hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
    """Per-token max |x| over channels, of shape (..., tokens).

    :param hidden: activations of shape (..., tokens, channels)
    :param float32: return float32 (else ``hidden``'s dtype, exact all the same)
    """
    hidden = hidden.detach()
    if hidden.device.type == "cpu" and hidden.numel() >= _CPU_ABS_COPY_MAX:
        # two reductions, no |x| temporary: torch's CPU ``vector_norm(inf)`` is
        # ~10x slower and ``abs().amax()`` writes and reads a copy of ``hidden``
        # (8 x 2048 x 1536 float32: 32 ms, this 4.8 ms)
        values = torch.maximum(hidden.amax(dim=-1), hidden.amin(dim=-1).neg_())
    elif hidden.device.type == "cpu":
        # a decode step's rows: two ops instead of four (2-3 us against 5-6)
        values = hidden.abs().amax(dim=-1)
    else:  # one pass, no |x| temporary
        values = torch.linalg.vector_norm(hidden, ord=float("inf"), dim=-1)
    return values.float() if float32 else values


def token_max_abs(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max |x| over channels and the channel where it sits.

    :param hidden: activations of shape (..., tokens, channels)
    :return: ``(values, channels)``, each of shape (..., tokens)
    """
    values, channels = hidden.detach().abs().max(dim=-1)
    return values.float(), channels


def spike_token_mask(
    token_max: torch.Tensor,
    ratio: float,
    attention_mask: torch.Tensor | None = None,
    threshold: torch.Tensor | float | None = None,
    threshold_without_median_only: bool = False,
    carried: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask of spike tokens.

    :param token_max: per-token max |x|, shape (batch, tokens)
    :param ratio: a token is a spike when its max exceeds ``ratio`` x the median of
        the per-token maxima of the valid tokens of its sequence
    :param attention_mask: (batch, tokens), 1 for real tokens; padding is never a
        spike and never enters the median
    :param threshold: absolute max |x| above which a token is a spike whatever the
        median; the only test for sequences with fewer than
        ``MIN_TOKENS_FOR_MEDIAN`` valid tokens
    :param threshold_without_median_only: apply ``threshold`` only to those
        sequences (where the ratio test decides, it alone finds new spikes)
    :param carried: bool (batch, tokens) rows that are spikes regardless (e.g. the
        previous layer's carriers that kept their share), padding excepted
    :return: bool tensor (batch, tokens)
    """
    if token_max.dim() == 1:
        token_max = token_max.unsqueeze(0)
    valid = (
        None
        if attention_mask is None
        else attention_mask.to(torch.bool).reshape(token_max.shape)
    )
    spikes, n_valid = None, None
    # decided from shapes alone, so no call waits on the device: fewer tokens than
    # MIN_TOKENS_FOR_MEDIAN (a decode step) never pass the ratio test, and without a
    # mask every token is valid
    long_enough = token_max.shape[-1] >= MIN_TOKENS_FOR_MEDIAN
    if long_enough:
        if valid is None:
            median = token_max.nanmedian(dim=-1, keepdim=True).values
            spikes = token_max > ratio * median
        else:
            masked = token_max.masked_fill(~valid, float("nan"))
            median = masked.nanmedian(dim=-1, keepdim=True).values
            n_valid = valid.sum(dim=-1, keepdim=True)
            spikes = (token_max > ratio * median) & (n_valid >= MIN_TOKENS_FOR_MEDIAN)
    if threshold is not None:
        over = token_max > threshold
        if threshold_without_median_only and long_enough:
            over = None if n_valid is None else over & (n_valid < MIN_TOKENS_FOR_MEDIAN)
        if over is not None:
            spikes = over if spikes is None else spikes | over
    if carried is not None:
        spikes = carried if spikes is None else spikes | carried
    if spikes is None:
        spikes = torch.zeros_like(token_max, dtype=torch.bool)
    return spikes if valid is None else spikes & valid
