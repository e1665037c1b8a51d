"""Linear outputs for rows whose input is not quantized.

Template rows are constants known before inference: the linears fed by a templated
norm can compute them at full precision (a kernel precomputes ``W @ template`` once)
instead of quantizing them with the ordinary tokens' static scale, which clips the
spike channels that make the sink token's key what it is (SmolLM2-135M, W4A4 static
with QuIP + GPTQ: 91.7 -> 76.7 WikiText-2 perplexity).
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.quantization.lifecycle import forward_quantize
from torch import nn

__all__ = [
    "frozen_weights",
    "leaves_inputs_alone",
    "linear_with_unquantized_input",
    "through_pre_hooks",
]


def leaves_inputs_alone(hook) -> bool:
    """Whether a module hook is marked as one that neither reads nor changes the
    module's input (the onload hooks of :mod:`iq_transform.models.offload`)."""
    return getattr(hook, "leaves_inputs_alone", False)


def through_pre_hooks(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs`` as ``module``'s forward receives them (e.g. QuIP-rotated).

    Hooks marked ``leaves_inputs_alone`` are skipped: they manage state with a
    paired forward hook (the onload hook of
    :func:`~iq_transform.models.offload.onload_once_per_forward`, which would
    otherwise leave offloading disabled for good).
    """
    for hook in module._forward_pre_hooks.values():
        if leaves_inputs_alone(hook):
            continue
        result = hook(module, (inputs,))
        if result is not None:
            inputs = result[0] if isinstance(result, tuple) else result
    return inputs


def frozen_weights(module: nn.Module) -> bool:
    """Whether ``module``'s weights and their quantization are final: after
    ``oneshot`` (compressed-tensors' FROZEN status), when no calibration hook is
    left among its pre-hooks and its fake-quantized weight no longer changes."""
    status = getattr(module, "quantization_status", None)
    return status == QuantizationStatus.FROZEN


def linear_with_unquantized_input(
    module: nn.Linear, inputs: torch.Tensor
) -> torch.Tensor:
    """``module``'s output for ``inputs`` with its input quantization skipped and
    its weight as its own forward uses it (fake-quantized by compressed-tensors
    until the model is compressed).

    :param module: a Linear, quantized by compressed-tensors or not
    :param inputs: (rows, in_features), already through the module's pre-hooks
        (e.g. QuIP's online input rotation)
    """
    weight = module.weight
    scheme = getattr(module, "quantization_scheme", None)
    status = getattr(module, "quantization_status", None)
    quantizes_weight = (
        getattr(module, "quantization_enabled", True)
        and scheme is not None
        and scheme.weights is not None
        and status is not None
        and status < QuantizationStatus.COMPRESSED
    )
    if quantizes_weight:
        weight = forward_quantize(module, weight.data, "weight", scheme.weights)
    return nn.functional.linear(inputs.to(weight.dtype), weight, module.bias)
