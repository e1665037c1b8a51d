"""lm-eval's ``HFLM`` around a model in memory, padding- and prefix-aware.

lm-eval right-pads a batch of requests with token id 0 and calls the model without
an attention mask. Causally that changes no real token's logits, but the SpikeFree
runtime detects spikes against the median token of each *sequence*, and padding
would count in that median. :class:`InMemoryLM` therefore passes the padding mask
(the trailing run of id 0, when id 0 is a special token that text never contains),
and serves the PrefixQuant-style baseline's full-precision prefix as a KV cache in
front of every request, as the perplexity evaluation does.
"""

from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM
from loguru import logger
from torch import nn

from iq_transform.evaluation.perplexity import prefix_cache

__all__ = ["InMemoryLM", "right_padding_mask"]

# the id lm-eval pads loglikelihood batches with (lm_eval.models.utils.pad_and_concat)
LM_EVAL_PAD_ID = 0


def right_padding_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor | None:
    """(batch, tokens) mask, 0 on each row's trailing run of ``pad_id``; ``None``
    when no row ends in it."""
    is_pad = input_ids == pad_id
    if not is_pad[:, -1].any():
        return None
    # a position is padding when it and everything after it is pad_id
    trailing = is_pad.flip(-1).long().cumprod(-1).flip(-1).bool()
    return (~trailing).long()


class InMemoryLM(HFLM):
    """``HFLM(pretrained=model, tokenizer=tokenizer)`` for an in-memory model,
    hooks (SpikeFree runtime, quantization, rotations) included.

    :param prefix: token ids served as a full-precision KV cache in front of every
        request (PrefixQuant-style baseline); they are not scored
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        batch_size: int = 8,
        prefix: list[int] | None = None,
    ):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        self.prefix = list(prefix) if prefix else None
        self.mask_padding = _is_special(tokenizer, LM_EVAL_PAD_ID)
        if batch_size > 1 and not self.mask_padding:
            logger.warning(
                f"Token id {LM_EVAL_PAD_ID}, lm-eval's padding, is an ordinary token "
                "of this tokenizer: padded batches are scored unmasked (as lm-eval "
                "does), so the SpikeFree runtime counts padding in its per-sequence "
                "median. eval.batch_size=1 avoids padding."
            )

    def _model_call(self, inps, attn_mask=None, labels=None):
        if attn_mask is not None or labels is not None:  # seq2seq: lm-eval's own
            return super()._model_call(inps, attn_mask, labels)
        mask = right_padding_mask(inps, LM_EVAL_PAD_ID) if self.mask_padding else None
        past = None
        if self.prefix:
            past = prefix_cache(self.model, self.prefix, inps)
            if mask is not None:
                ones = mask.new_ones(mask.shape[0], len(self.prefix))
                mask = torch.cat([ones, mask], dim=1)
        with torch.no_grad():
            return self.model(
                input_ids=inps,
                attention_mask=mask,
                past_key_values=past,
                use_cache=past is not None,
            ).logits


def _is_special(tokenizer, token_id: int) -> bool:
    return token_id in set(getattr(tokenizer, "all_special_ids", []))
