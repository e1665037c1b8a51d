"""Greedy generation with the KV cache, and how far a quantized model's tokens
follow the full-precision model's.

Decoding runs one token per forward on the cache, so the SpikeFree runtime's decode
path (absolute thresholds, cache offsets) is what is checked, not only the prefill
that perplexity and lm-eval score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from iq_transform.evaluation.perplexity import prefix_cache

__all__ = ["GenerationCheck", "compare_generations", "greedy_generate"]


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    new_tokens: int = 64,
    prefix: list[int] | None = None,
) -> list[list[int]]:
    """``new_tokens`` greedy tokens after each prompt (no early stop at EOS, so
    every run decodes the same number of steps).

    :param prefix: token ids served as a full-precision KV cache in front of each
        prompt (PrefixQuant-style baseline)
    """
    device = next(model.parameters()).device
    generations = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        past = prefix_cache(model, prefix, ids) if prefix else None
        output = model(input_ids=ids, past_key_values=past, use_cache=True)
        tokens = []
        for _ in range(new_tokens):
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
            output = model(
                input_ids=token, past_key_values=output.past_key_values, use_cache=True
            )
        generations.append(tokens)
    return generations


@dataclass
class GenerationCheck:
    """Quantized vs full-precision greedy tokens on the same prompts.

    :param agreement: share of positions where the tokens are equal, over all
        prompts
    :param first_divergence: per prompt, the first position whose token differs
        (``None``: all equal)
    :param exact: prompts whose tokens are all equal
    """

    prompts: list[str]
    new_tokens: int
    agreement: float
    first_divergence: list[int | None]
    exact: int
    reference_text: list[str]
    text: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def compare_generations(
    prompts: list[str],
    reference: list[list[int]],
    generated: list[list[int]],
    tokenizer,
) -> GenerationCheck:
    """Token agreement and first divergence of ``generated`` against
    ``reference`` (the full-precision model's tokens)."""
    equal = [
        [a == b for a, b in zip(ref, gen, strict=True)]
        for ref, gen in zip(reference, generated, strict=True)
    ]
    first = [row.index(False) if False in row else None for row in equal]
    total = sum(len(row) for row in equal)
    return GenerationCheck(
        prompts=list(prompts),
        new_tokens=len(reference[0]) if reference else 0,
        agreement=sum(map(sum, equal)) / total if total else 1.0,
        first_divergence=first,
        exact=sum(position is None for position in first),
        reference_text=[tokenizer.decode(tokens) for tokens in reference],
        text=[tokenizer.decode(tokens) for tokens in generated],
    )
