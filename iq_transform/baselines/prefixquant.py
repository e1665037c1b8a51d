"""PrefixQuant-style baseline: outlier tokens as a full-precision KV-cache prefix.

PrefixQuant (Chen et al. 2024) finds the tokens that become outliers (``down_proj``
input max above 64x the median token max), prepends the most frequent ones (with
BOS) to every sequence, and serves their KV cache computed in full precision: the
prefix tokens then absorb the attention-sink role, later occurrences stop spiking,
and static per-tensor scales are calibrated with the prefix in place.

Here: :func:`find_prefix` picks the prefix from calibration windows,
:func:`with_prefix` puts it in front of the calibration windows, and
:class:`PrefixQuantModifier` (first in the recipe) flags the prefix rows so the
static observers leave them out (in serving they come from the cache, never from a
quantized linear). Evaluation computes the prefix cache with quantization off
(:func:`iq_transform.evaluation.perplexity.perplexity` with ``prefix=``).
"""

from __future__ import annotations

from collections import Counter

import torch
from llmcompressor.core import State
from llmcompressor.modifiers import Modifier, ModifierFactory
from loguru import logger
from pydantic import PrivateAttr, field_validator
from torch import nn
from transformers import PreTrainedTokenizerBase

from iq_transform.evaluation.spike_analysis import analyze_spikes
from iq_transform.models.arch import get_arch_spec
from iq_transform.spikefree.rows import set_excluded_rows

__all__ = ["PrefixQuantModifier", "find_prefix", "with_prefix"]


def find_prefix(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    windows: torch.Tensor,
    ratio: float = 64.0,
    max_tokens: int = 4,
    progress: bool = True,
) -> list[int]:
    """The prefix token ids: BOS when first tokens spike, then the most frequent
    mid-sequence outlier tokens, at most ``max_tokens`` in all.

    :param model: the full-precision model
    :param tokenizer: its tokenizer (BOS, else EOS, stands for the first token)
    :param windows: (samples, seqlen) calibration token windows
    :param ratio: outlier threshold on a ``down_proj`` input's token max over the
        median token max
    :param max_tokens: the longest prefix
    :return: token ids; empty when no token is an outlier
    """
    arch = get_arch_spec(model)
    report = analyze_spikes(model, tokenizer, windows, ratio=ratio, progress=progress)
    positions = {
        position
        for site in report.sites
        if site.name.endswith(arch.down_proj)
        for position in site.spike_tokens
    }
    first = any(index == 0 for _, index in positions)
    middle = Counter(
        int(windows[sample, index]) for sample, index in positions if index > 0
    )
    prefix = []
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id
    if first and start is not None:
        prefix.append(int(start))
    for token, _ in middle.most_common():
        if len(prefix) >= max_tokens:
            break
        if token not in prefix:
            prefix.append(token)
    if prefix:
        logger.info(
            f"PrefixQuant: prefix {prefix} = {[tokenizer.decode([t]) for t in prefix]}"
            f" ({len(positions)} outlier tokens in {len(windows)} windows)"
        )
    else:
        logger.warning(
            f"PrefixQuant: no down_proj input token exceeds {ratio:g}x its median "
            "token max; the prefix is empty, so this equals plain static."
        )
    return prefix


def with_prefix(windows: torch.Tensor, prefix: list[int]) -> torch.Tensor:
    """``prefix`` in front of every window, windows cut to keep their length.

    :param windows: (samples, seqlen) token windows
    :param prefix: token ids
    :raises ValueError: the prefix leaves no room for text
    """
    if not prefix:
        return windows
    if len(prefix) >= windows.shape[1]:
        raise ValueError(
            f"A prefix of {len(prefix)} tokens leaves nothing of {windows.shape[1]}-"
            "token windows: use longer windows (data.seqlen) or a shorter prefix "
            "(transform.max_prefix_tokens)."
        )
    head = torch.tensor(prefix, dtype=windows.dtype).expand(windows.shape[0], -1)
    return torch.cat([head, windows[:, : windows.shape[1] - len(prefix)]], dim=1)


class PrefixQuantModifier(Modifier):
    """
    Calibration with a full-precision prefix (PrefixQuant-style baseline): the
    first ``len(prefix_ids)`` tokens of every calibration sequence are the prefix,
    whose KV cache is served in full precision, so the ``spikefree_*`` static
    observers leave those rows out. The calibration data must start with the prefix
    (:func:`with_prefix`); place this modifier first.

    :param prefix_ids: the prefix token ids (:func:`find_prefix`)
    """

    prefix_ids: list[int]

    _handles: list = PrivateAttr(default_factory=list)

    @field_validator("prefix_ids")
    @classmethod
    def _not_empty(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError(
                "prefix_ids is empty: with no outlier tokens there is no prefix; "
                "leave PrefixQuantModifier out of the recipe."
            )
        return value

    def on_initialize(self, state: State, **kwargs) -> bool:
        length = len(self.prefix_ids)
        layers = get_arch_spec(state.model).decoder_layers(state.model)

        def before_layer(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor) or hidden.is_meta:
                return
            if hidden.dim() != 3 or hidden.shape[1] <= length:
                return
            rows = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            rows[:, :length] = True
            set_excluded_rows(rows)

        def after_layer(module, args, output):
            set_excluded_rows(None)

        for layer in layers:
            self._handles.append(
                layer.register_forward_pre_hook(before_layer, with_kwargs=True)
            )
            self._handles.append(layer.register_forward_hook(after_layer))
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        set_excluded_rows(None)
        return True


ModifierFactory.register("PrefixQuantModifier", PrefixQuantModifier)
