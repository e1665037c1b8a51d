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
(:class:`~iq_transform.composition.plan.TransformPlan`): QFeM's spiky linears join
``ignore``.
"""

from __future__ import annotations

import re
from dataclasses import replace

from loguru import logger
from torch import nn

from iq_transform.baselines import PrefixQuantModifier
from iq_transform.composition.config import QuantConfig, StagesConfig, TransformConfig
from iq_transform.composition.plan import TransformPlan
from iq_transform.composition.schemes import activation_args, quantizer, weight_args
from iq_transform.models.arch import ArchSpec
from iq_transform.spikefree import SpikeFreeModifier

__all__ = [
    "ComposeError",
    "SPIKEFREE_OBSERVERS",
    "check_group_size",
    "compose_recipe",
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
        (:func:`iq_transform.composition.plan.plan_transform`)
    :return: modifiers in order, SpikeFree or the prefix first
    """
    _check_choices(transform, stages)
    plan = plan or TransformPlan()
    spikefree = transform.method == "spikefree"
    if transform.method == "qfem":
        quant = replace(quant, ignore=[*quant.ignore, *plan.unquantized])
    recipe = []
    if transform.method == "prefix" and plan.prefix_ids:
        recipe.append(PrefixQuantModifier(prefix_ids=list(plan.prefix_ids)))
    if spikefree:
        recipe.append(
            SpikeFreeModifier(
                ratio=transform.ratio,
                num_calibration_samples=transform.num_calibration_samples,
                min_fraction=transform.min_fraction,
                norm_templates=transform.norm_templates,
                exact_template_rows=transform.exact_template_rows,
                follow_carriers=transform.follow_carriers,
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
