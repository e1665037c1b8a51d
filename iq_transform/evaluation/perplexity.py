"""Perplexity over token windows: the sum of token NLLs over all predictions."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["PerplexityResult", "perplexity", "prefix_cache"]


@dataclass
class PerplexityResult:
    """:param ppl: exp(nll_sum / num_predictions)
    :param window_nll: each window's own NLL sum, in order (where two models'
        perplexities part, it says which windows did it)
    :param window_spike_tokens: the spike tokens a SpikeFree runtime handled in
        each window (set by :func:`iq_transform.composition.pipeline.evaluate`)
    """

    ppl: float
    nll_sum: float
    num_predictions: int
    num_windows: int
    seqlen: int
    window_nll: list[float] = field(default_factory=list)
    window_spike_tokens: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    description: str = "perplexity",
    prefix: list[int] | None = None,
    after_batch: Callable[[], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (windows, seqlen), each scored alone.

    :param prefix: token ids served as a full-precision KV cache in front of every
        window (PrefixQuant-style): computed with quantization disabled, then the
        window runs on top of it; only the windows' own tokens are scored
    :param after_batch: called after each batch's forward (e.g. to read what the
        SpikeFree runtime saw in it)
    :raises FloatingPointError: when the model produces NaN or inf logits
    """
    device = next(model.parameters()).device
    window_nll: list[float] = []
    count = 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc=description, disable=not progress, leave=False):
        batch = batch.to(device)
        past = prefix_cache(model, prefix, batch) if prefix else None
        logits = (
            model(input_ids=batch, past_key_values=past, use_cache=past is not None)
            .logits[:, :-1]
            .float()
        )
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                "The model produced NaN/inf logits; check the quantization settings "
                "(e.g. a scale of zero) or the model weights."
            )
        targets = batch[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            reduction="none",
        )
        window_nll += nll.view(targets.shape).sum(dim=1).tolist()
        count += targets.numel()
        if after_batch is not None:
            after_batch()
    nll_sum = math.fsum(window_nll)
    return PerplexityResult(
        ppl=math.exp(nll_sum / count),
        nll_sum=nll_sum,
        window_nll=window_nll,
        num_predictions=count,
        num_windows=windows.shape[0],
        seqlen=windows.shape[1],
    )


def prefix_cache(model: nn.Module, prefix: list[int], batch: torch.Tensor):
    """The KV cache of ``prefix`` for every row of ``batch``, computed with
    quantization disabled (a full-precision prefix)."""
    from llmcompressor.utils.helpers import DisableQuantization

    ids = torch.tensor(prefix, device=batch.device).expand(batch.shape[0], -1)
    with DisableQuantization(model):
        return model(input_ids=ids, use_cache=True).past_key_values
