"""How spiky the inputs of the quantized linears are, per decoder layer.

For each decoder layer: the largest, over its ``nn.Linear`` inputs and the
sequences measured, ratio of a token's max |x| to the median token max of its
sequence (the spike criterion of :mod:`iq_transform.spikefree.detect`). Measured on
the model as it will run: before oneshot (the FP model), and after it, with
SpikeFree's runtime, a full-precision prefix cache or unquantized linears in place,
so a report can show what each transform leaves for static scales.
"""

from __future__ import annotations

import torch
from torch import nn

from iq_transform.evaluation.perplexity import prefix_cache
from iq_transform.models.arch import get_arch_spec
from iq_transform.spikefree.detect import token_max

__all__ = ["linear_input_ratios"]


@torch.no_grad()
def linear_input_ratios(
    model: nn.Module,
    windows: torch.Tensor,
    prefix: list[int] | None = None,
    skip: list[str] | tuple[str, ...] = (),
) -> list[float]:
    """Per decoder layer, the peak token ratio over its linears' inputs.

    :param model: the model (quantized or not; input quantization happens inside
        the linear's forward, after what is measured here)
    :param windows: (samples, seqlen) token windows
    :param prefix: token ids served as a full-precision KV cache first (the
        prefix's own tokens are not measured)
    :param skip: module names not measured (linears left unquantized)
    :return: one ratio per decoder layer (0 where every linear is skipped)
    """
    arch = get_arch_spec(model)
    layers = arch.decoder_layers(model)
    peaks = [0.0] * len(layers)
    measuring = {"on": False}
    handles = []

    def hook(index):
        def record(module, args):
            if not measuring["on"]:
                return
            maxima = token_max(args[0])
            median = maxima.median(dim=-1, keepdim=True).values.clamp_min(1e-12)
            peaks[index] = max(peaks[index], float((maxima / median).max()))

        return record

    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            full_name = f"{arch.layers}.{index}.{name}"
            if isinstance(module, nn.Linear) and full_name not in skip:
                handles.append(module.register_forward_pre_hook(hook(index)))
    device = next(model.parameters()).device
    try:
        for window in windows:
            ids = window.unsqueeze(0).to(device)
            past = prefix_cache(model, prefix, ids) if prefix else None
            measuring["on"] = True
            model(input_ids=ids, past_key_values=past, use_cache=past is not None)
            measuring["on"] = False
    finally:
        measuring["on"] = False
        for handle in handles:
            handle.remove()
    return peaks
