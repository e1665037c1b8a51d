"""Compose an llm-compressor recipe from three small choices.

``quant`` (weight and activation formats), ``transform`` (SpikeFree, the
PrefixQuant-style or QFeM-style baseline, or none) and ``stages`` (RTN or GPTQ
weights, optionally behind SmoothQuant or a QuIP rotation) mirror the Hydra config
groups ``conf/quant``, ``conf/transform`` and ``conf/stages``. The chain is always::

    SpikeFreeModifier | PrefixQuantModifier -> SmoothQuantModifier -> QuIPModifier
        -> quantizer

with the stages that are not chosen left out. With SpikeFree or a prefix and static
activation scales, the static observer becomes its ``spikefree_*`` counterpart
(which drops the rows they flag). The baselines measure the model first
(:class:`TransformPlan`): QFeM's spiky linears join ``ignore``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from loguru import logger
from torch import nn

from iq_transform.arch import ArchSpec
from iq_transform.schemes import activation_args, quantizer, weight_args

__all__ = [
    "ComposeError",
    "QuantConfig",
    "TransformConfig",
    "StagesConfig",
    "TransformPlan",
    "SPIKEFREE_OBSERVERS",
    "check_group_size",
    "compose_recipe",
    "recipe_label",
    "smoothquant_mappings",
    "static_observer",
]

# Static observers of llm-compressor -> the spike-free ones of iq_transform.
SPIKEFREE_OBSERVERS = {
    "minmax": "spikefree_minmax",
    "static_minmax": "spikefree_static_minmax",
    "mse": "spikefree_mse",
}
TRANSFORM_METHODS = ("none", "spikefree", "prefix", "qfem")
# Transforms whose flagged rows the spikefree_* observers drop.
ROW_EXCLUDING_METHODS = ("spikefree", "prefix")
ROTATIONS = (None, "quip")
WEIGHT_ALGORITHMS = ("rtn", "gptq")


class ComposeError(ValueError):
    """A quant/transform/stages choice that does not make a recipe."""


@dataclass
class QuantConfig:
    """Weight and activation formats (``conf/quant/*.yaml``).

    :param name: the option's name, recorded in results and reports
    :param weight_bits: weight bits (8 or 4)
    :param weight_type: ``int`` or ``float`` (FP8 e4m3)
    :param weight_strategy: ``channel`` or ``group``
    :param group_size: input columns per weight scale for ``group``
    :param activation_bits: activation bits (8 or 4)
    :param activation_type: ``int`` or ``float``
    :param dynamic: per-token scales at run time; else static per-tensor scales
    :param observer: llm-compressor observer of static activation scales
        (``minmax``, ``static_minmax``, ``mse``); with SpikeFree its ``spikefree_``
        counterpart is used
    :param observer_kwargs: options of the static observer (``mse``:
        ``maxshrink``, the deepest clip searched as a share of the range, and
        ``patience``, steps without improvement before the search stops)
    :param ignore: modules left unquantized
    """

    name: str = "w8a8_static"
    weight_bits: int = 8
    weight_type: str = "int"
    weight_strategy: str = "channel"
    group_size: int | None = None
    activation_bits: int = 8
    activation_type: str = "int"
    dynamic: bool = False
    observer: str = "mse"
    observer_kwargs: dict[str, Any] = field(default_factory=dict)
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])


@dataclass
class TransformConfig:
    """What makes activations quantizable first (``conf/transform/*.yaml``).

    :param name: the option's name, recorded in results and reports
    :param method: ``none``, ``spikefree`` (:class:`SpikeFreeModifier`),
        ``prefix`` (PrefixQuant-style full-precision prefix) or ``qfem`` (QFeM-style
        unquantized spiky linears)
    :param ratio: spike-token ratio to the median token max (SpikeFree's spike
        tokens, the prefix's outlier tokens, QFeM's threshold)
    :param num_calibration_samples: calibration windows SpikeFree calibrates on,
        or the baselines scan
    :param min_fraction: fraction of sequences that must show a spike at a layer
    :param norm_templates: insert norm-output templates (else ``down_proj`` only)
    :param exact_template_rows: template rows skip activation quantization in the
        linears the templated norms feed (else they are quantized)
    :param max_prefix_tokens: the longest PrefixQuant-style prefix
    """

    name: str = "spikefree"
    method: str = "spikefree"
    ratio: float = 32.0
    num_calibration_samples: int = 4
    min_fraction: float = 0.25
    norm_templates: bool = True
    exact_template_rows: bool = True
    max_prefix_tokens: int = 4


@dataclass
class TransformPlan:
    """What a baseline measured on the full-precision model before composing.

    :param prefix_ids: PrefixQuant-style prefix token ids (empty: no prefix)
    :param unquantized: QFeM-style linears left unquantized
    """

    prefix_ids: list[int] = field(default_factory=list)
    unquantized: list[str] = field(default_factory=list)


@dataclass
class StagesConfig:
    """The llm-compressor stages around the quantizer (``conf/stages/*.yaml``).

    :param name: the option's name, recorded in results and reports
    :param smoothquant: a ``SmoothQuantModifier`` before the quantizer
    :param smoothing_strength: SmoothQuant's alpha
    :param rotation: ``null`` or ``quip`` (``QuIPModifier``, online input rotation)
    :param rotation_type: QuIP's ``transform_type`` (``random-hadamard``,
        ``hadamard``, ``random-matrix``)
    :param weights: ``rtn`` (``QuantizationModifier``) or ``gptq``
        (``GPTQModifier``)
    :param gptq_block_size: GPTQ's column block size
    :param gptq_dampening_frac: GPTQ's Hessian dampening
    """

    name: str = "rtn"
    smoothquant: bool = False
    smoothing_strength: float = 0.8
    rotation: str | None = None
    rotation_type: str = "random-hadamard"
    weights: str = "rtn"
    gptq_block_size: int = 128
    gptq_dampening_frac: float = 0.01


def compose_recipe(
    quant: QuantConfig,
    transform: TransformConfig,
    stages: StagesConfig,
    arch: ArchSpec,
    plan: TransformPlan | None = None,
) -> list:
    """The recipe (a list of llm-compressor modifiers) for one combination.

    :param quant: weight and activation formats
    :param transform: SpikeFree, a baseline or none
    :param stages: SmoothQuant / QuIP / RTN / GPTQ choice
    :param arch: the model's layout (SmoothQuant mappings come from its
        ``norm_linears``)
    :param plan: what the ``prefix`` / ``qfem`` baselines measured
        (:func:`iq_transform.baselines.plan_transform`)
    :return: modifiers in order, SpikeFree or the prefix first
    """
    _check_choices(transform, stages)
    plan = plan or TransformPlan()
    spikefree = transform.method == "spikefree"
    if transform.method == "qfem":
        quant = replace(quant, ignore=[*quant.ignore, *plan.unquantized])
    recipe = []
    if transform.method == "prefix" and plan.prefix_ids:
        from iq_transform.baselines import PrefixQuantModifier

        recipe.append(PrefixQuantModifier(prefix_ids=list(plan.prefix_ids)))
    if spikefree:
        from iq_transform.modifier import SpikeFreeModifier

        recipe.append(
            SpikeFreeModifier(
                ratio=transform.ratio,
                num_calibration_samples=transform.num_calibration_samples,
                min_fraction=transform.min_fraction,
                norm_templates=transform.norm_templates,
                exact_template_rows=transform.exact_template_rows,
            )
        )
    if stages.smoothquant:
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        recipe.append(
            SmoothQuantModifier(
                smoothing_strength=stages.smoothing_strength,
                mappings=smoothquant_mappings(arch),
            )
        )
    if stages.rotation == "quip":
        from llmcompressor.modifiers.transform import QuIPModifier

        recipe.append(
            QuIPModifier(transform_type=stages.rotation_type, ignore=list(quant.ignore))
        )
    excludes_rows = transform.method in ROW_EXCLUDING_METHODS
    recipe.append(_quantizer(quant, stages, excludes_rows))
    logger.debug(f"composed {[type(m).__name__ for m in recipe]}")
    return recipe


def check_group_size(model: nn.Module, quant: QuantConfig) -> None:
    """Fail early, naming the layer, when group-quantized weights do not split into
    whole groups (compressed-tensors would fail deep inside oneshot).

    :param model: the model about to be quantized
    :param quant: weight and activation formats
    :raises ComposeError: a quantized Linear's input size is not a multiple of
        ``quant.group_size``
    """
    if quant.weight_strategy != "group" or not quant.group_size:
        return
    from compressed_tensors.utils import match_named_modules

    for name, module in match_named_modules(model, ["Linear"], quant.ignore):
        if module.in_features % quant.group_size:
            raise ComposeError(
                f"{name} has {module.in_features} input columns, not a multiple of "
                f"quant.group_size={quant.group_size}: set quant.group_size to a "
                "divisor (e.g. 64 or 32) or quant.weight_strategy=channel."
            )


def static_observer(observer: str, spikefree: bool) -> str:
    """The observer of static activation scales, made spike-free with SpikeFree
    (or the prefix baseline, whose prefix rows it drops the same way).

    :param observer: an llm-compressor observer name (``minmax``, ``mse`` ...)
    :param spikefree: whether flagged rows are to be dropped
    :raises ComposeError: unknown observer, or one without a spike-free counterpart
    """
    from llmcompressor.observers import Observer

    import iq_transform  # noqa: F401  (registers the spikefree_* observers)

    name = observer
    if spikefree and observer not in SPIKEFREE_OBSERVERS.values():
        if observer not in SPIKEFREE_OBSERVERS:
            raise ComposeError(
                f"Observer {observer!r} has no spike-free counterpart: with "
                f"transform=spikefree use one of {sorted(SPIKEFREE_OBSERVERS)} "
                "(quant.observer=...)."
            )
        name = SPIKEFREE_OBSERVERS[observer]
    try:
        Observer.get_value_from_registry(name)
    except KeyError:
        raise ComposeError(
            f"Unknown observer {name!r}: llm-compressor knows "
            f"{Observer.registered_names()} (quant.observer=...)."
        ) from None
    return name


def smoothquant_mappings(arch: ArchSpec) -> list[list]:
    """SmoothQuant mappings ``[[balance linears], smooth norm]`` from
    ``arch.norm_linears`` (Gemma-3's ``pre_feedforward_layernorm`` included)."""
    return [
        [[_suffix_pattern(linear) for linear in linears], _suffix_pattern(norm)]
        for norm, linears in arch.norm_linears.items()
    ]


def recipe_label(
    recipe: str | None,
    quant: str | None = None,
    stages: str | None = None,
    transform: str | None = None,
) -> str:
    """A short name of a run's recipe: the recipe given, else
    ``<quant>+<stages>+<transform>``."""
    if recipe is not None:
        return str(recipe)
    return f"{quant}+{stages}+{transform}"


def _quantizer(quant: QuantConfig, stages: StagesConfig, spikefree: bool):
    observer = None if quant.dynamic else static_observer(quant.observer, spikefree)
    weights = weight_args(
        quant.weight_type, quant.weight_bits, quant.weight_strategy, quant.group_size
    )
    activations = activation_args(
        quant.activation_type,
        quant.dynamic,
        observer,
        quant.activation_bits,
        quant.observer_kwargs,
    )
    gptq = stages.weights == "gptq"
    extra = (
        {
            "block_size": stages.gptq_block_size,
            "dampening_frac": stages.gptq_dampening_frac,
        }
        if gptq
        else {}
    )
    return quantizer(weights, activations, gptq=gptq, ignore=quant.ignore, **extra)


def _check_choices(transform: TransformConfig, stages: StagesConfig) -> None:
    for value, allowed, key in (
        (transform.method, TRANSFORM_METHODS, "transform.method"),
        (stages.rotation, ROTATIONS, "stages.rotation"),
        (stages.weights, WEIGHT_ALGORITHMS, "stages.weights"),
    ):
        if value not in allowed:
            raise ComposeError(f"{key}={value!r}: choose one of {list(allowed)}.")


def _suffix_pattern(name: str) -> str:
    return "re:.*" + re.escape(name) + "$"
