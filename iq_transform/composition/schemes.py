"""llm-compressor quantization stages for the schemes this project compares."""

from __future__ import annotations

__all__ = ["activation_args", "weight_args", "quantizer", "w8a8_quantizer"]


def activation_args(
    kind: str,
    dynamic: bool,
    observer: str | None = None,
    num_bits: int = 8,
    observer_kwargs: dict | None = None,
) -> dict:
    """Activation quantization arguments (symmetric).

    :param kind: ``int`` or ``float`` (FP8 e4m3 at 8 bits)
    :param dynamic: per-token scales computed at run time; else static per-tensor
    :param observer: the observer of static scales (e.g. ``spikefree_mse``)
    :param num_bits: activation bits (8 or 4)
    :param observer_kwargs: the static observer's options (e.g. the ``mse``
        search's ``maxshrink``)
    """
    args = {
        "num_bits": num_bits,
        "type": kind,
        "symmetric": True,
        "dynamic": dynamic,
        "strategy": "token" if dynamic else "tensor",
    }
    if observer and not dynamic:
        args["observer"] = observer
        if observer_kwargs:
            args["observer_kwargs"] = dict(observer_kwargs)
    return args


def weight_args(
    kind: str = "int",
    num_bits: int = 8,
    strategy: str = "channel",
    group_size: int | None = None,
) -> dict:
    """Symmetric weight quantization arguments.

    :param kind: ``int`` or ``float``
    :param num_bits: weight bits (8 or 4)
    :param strategy: ``channel`` (one scale per output row) or ``group``
    :param group_size: input columns per scale, for ``strategy="group"``
    """
    args = {"num_bits": num_bits, "type": kind, "strategy": strategy, "symmetric": True}
    if strategy == "group":
        if not group_size:
            raise ValueError("Weight strategy 'group' needs a group_size (e.g. 128).")
        args["group_size"] = group_size
    return args


def quantizer(
    weights: dict,
    input_activations: dict | None,
    gptq: bool = False,
    ignore: list[str] | tuple[str, ...] = ("lm_head",),
    **gptq_kwargs,
):
    """A ``QuantizationModifier`` (RTN) or ``GPTQModifier`` on every decoder
    Linear (``ignore`` excluded).

    :param weights: weight arguments (:func:`weight_args`)
    :param input_activations: activation arguments (:func:`activation_args`), or
        ``None`` for weight-only quantization
    :param gptq: GPTQ weights instead of round-to-nearest
    :param ignore: module names or patterns left unquantized
    :param gptq_kwargs: further ``GPTQModifier`` fields (``block_size``,
        ``dampening_frac``)
    """
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    group = {"targets": ["Linear"], "weights": weights}
    if input_activations is not None:
        group["input_activations"] = input_activations
    kwargs = {"ignore": list(ignore), "config_groups": {"group_0": group}}
    if gptq:
        return GPTQModifier(**kwargs, **gptq_kwargs)
    return QuantizationModifier(**kwargs)


def w8a8_quantizer(
    kind: str = "int",
    dynamic: bool = False,
    observer: str | None = None,
    gptq: bool = False,
):
    """A ``QuantizationModifier`` (RTN) or ``GPTQModifier`` for W8A8 on every
    decoder Linear (``lm_head`` excluded), weights per output channel."""
    return quantizer(
        weight_args(kind), activation_args(kind, dynamic, observer), gptq=gptq
    )
