"""llm-compressor quantization stages for the schemes this project compares."""

from __future__ import annotations

__all__ = ["activation_args", "w8a8_quantizer"]


def activation_args(kind: str, dynamic: bool, observer: str | None = None) -> dict:
    """8-bit activation quantization arguments.

    :param kind: ``int`` (INT8) or ``float`` (FP8 e4m3)
    :param dynamic: per-token scales computed at run time; else static per-tensor
    :param observer: the observer of static scales (e.g. ``spikefree_mse``)
    """
    args = {
        "num_bits": 8,
        "type": kind,
        "symmetric": True,
        "dynamic": dynamic,
        "strategy": "token" if dynamic else "tensor",
    }
    if observer and not dynamic:
        args["observer"] = observer
    return args


def w8a8_quantizer(
    kind: str = "int",
    dynamic: bool = False,
    observer: str | None = None,
    gptq: bool = False,
):
    """A ``QuantizationModifier`` (RTN) or ``GPTQModifier`` for W8A8 on every
    decoder Linear (``lm_head`` excluded), weights per output channel."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = {"num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True}
    stage = GPTQModifier if gptq else QuantizationModifier
    return stage(
        ignore=["lm_head"],
        config_groups={
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": activation_args(kind, dynamic, observer),
            }
        },
    )
