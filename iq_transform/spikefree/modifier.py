"""``SpikeFreeModifier``: spike-free activations inside llm-compressor recipes."""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier, ModifierFactory
from loguru import logger
from pydantic import PrivateAttr, field_validator
from torch import nn
from tqdm.auto import tqdm

from iq_transform.models.arch import get_arch_spec
from iq_transform.spikefree.runtime import SpikeFreeRuntime, get_runtime
from iq_transform.spikefree.templates import SpikeTemplates

__all__ = ["SpikeFreeModifier", "SpikeFreeOrderError"]

# Stages that quantize or rewrite the activations' basis: SpikeFree must come first.
_DOWNSTREAM_STAGES = (
    "QuantizationModifier",
    "GPTQModifier",
    "AWQModifier",
    "SmoothQuantModifier",
    "QuIPModifier",
    "SpinQuantModifier",
)
# Stages that move the residual stream into another basis after SpikeFree calibrated.
_BASIS_CHANGING_STAGES = ("SpinQuantModifier",)

_NO_DATA = (
    "SpikeFreeModifier needs calibration data to find spike tokens and compute "
    "templates: pass dataset=... with at least one sample (num_calibration_samples "
    "> 0) to oneshot."
)


class SpikeFreeOrderError(ValueError):
    """SpikeFreeModifier was placed after a stage it must precede."""


class SpikeFreeModifier(Modifier):
    """
    Makes activations spike-free so that later stages can use static per-tensor
    activation scales (INSERTQUANT, Chen et al., arXiv 2606.02288).

    Massive activations sit on a few tokens (the first one, some delimiters) and act
    as fixed biases. This modifier calibrates, per decoder layer, where they are
    carried and where an MLP ``down_proj`` creates or removes them, and installs a
    runtime that, on every forward (calibration passes of later modifiers included):
    detects the spike tokens (ratio to the median token max, or a calibrated absolute
    threshold for one-token decode steps), writes pre-computed templates into the
    norm outputs they would have produced, zeroes their rows at creating/removing
    ``down_proj`` inputs and writes the ``down_proj`` output template instead. No
    quantized linear sees a spike, and the residual stream keeps its function.
    Pair it with the ``spikefree_*`` observers so static scales ignore spike rows.

    Place it **first** in a recipe, ahead of SmoothQuant, rotations and quantizers.

    example yaml::

        spikefree_stage:
          spikefree_modifiers:
            SpikeFreeModifier:
              ratio: 32.0
        quant_stage:
          quant_modifiers:
            QuantizationModifier:
              ignore: ["lm_head"]
              config_groups:
                group_0:
                  targets: ["Linear"]
                  weights: {num_bits: 8, type: int, strategy: channel,
                            symmetric: true, dynamic: false}
                  input_activations: {num_bits: 8, type: int, strategy: tensor,
                                      symmetric: true, dynamic: false,
                                      observer: spikefree_minmax}

    :param ratio: a token is a spike token when its max |x| exceeds ``ratio`` x the
        median token max of its sequence (64 in PrefixQuant and INSERTQUANT's
        prototype). The recipes and ``conf/transform/spikefree.yaml`` use 32, which
        also takes the sub-threshold precursors at the ``down_proj`` sites
        (SmolLM2-135M, W4A4 static: 76.7 -> 64.4 perplexity); 16 templates
        ordinary tokens from layer 3 on (135.7)
    :param num_calibration_samples: how many calibration batches SpikeFree runs
        through the model itself at calibration start (spikes are consistent, a few
        samples suffice; this keeps its cost a small part of oneshot)
    :param min_fraction: a layer is treated as carrying spikes (or its
        ``down_proj`` as creating/removing them) when at least this fraction of
        calibration sequences showed spike tokens there
    :param down_proj_layers: decoder layers whose ``down_proj`` gets output
        templates; ``None`` finds them from calibration data
    :param norm_templates: insert norm-output templates at layers that carry spikes
        (INSERTQUANT); with ``False`` only the ``down_proj`` sites are handled
    :param exact_template_rows: the linears fed by a templated norm compute the
        template rows from the unquantized template (constants a kernel
        precomputes); ``False`` quantizes them with the ordinary tokens' static
        scale, as INSERTQUANT's prototype does
    :param follow_carriers: at inference, a carrier stays one while its max |x|
        keeps a quarter of the previous layer's, as in calibration, and the
        calibrated absolute thresholds decide only where no median exists (decode
        steps). Late layers' thresholds can sit in a narrow gap (Gemma-3-270M's
        last layer: the first token at 2.5x the median, ordinary tokens at up to
        1.5x), where a last-bit difference flips them; this rule does not rest on
        that gap. ``False`` keeps the thresholds everywhere
    """

    ratio: float = 64.0
    num_calibration_samples: int = 4
    min_fraction: float = 0.25
    down_proj_layers: list[int] | None = None
    norm_templates: bool = True
    exact_template_rows: bool = True
    follow_carriers: bool = False

    calibration_seconds_: float | None = None
    _templates: SpikeTemplates | None = PrivateAttr(default=None)
    _runtime: SpikeFreeRuntime | None = PrivateAttr(default=None)

    @property
    def templates(self) -> SpikeTemplates | None:
        """The calibrated templates and thresholds (after calibration)."""
        return self._templates

    @field_validator("ratio")
    @classmethod
    def _ratio_above_one(cls, value: float) -> float:
        if value <= 1.0:
            raise ValueError(f"ratio must be > 1, got {value}")
        return value

    @field_validator("min_fraction")
    @classmethod
    def _fraction_in_unit_interval(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {value}")
        return value

    # -- lifecycle --------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs) -> bool:
        self._check_recipe_order()
        model = state.model
        _check_not_quantized(model)
        calib = getattr(state.data, "calib", None)
        if calib is None or len(calib) == 0:
            raise ValueError(_NO_DATA)
        arch = get_arch_spec(model)
        if (runtime := get_runtime(model)) is not None:
            logger.info("SpikeFree: replacing the runtime already in the model")
            runtime.remove()
        self._runtime = SpikeFreeRuntime(
            model,
            arch,
            ratio=self.ratio,
            exact_template_rows=self.exact_template_rows,
            follow_carriers=self.follow_carriers,
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs) -> None:
        """Calibrate with plain forwards of a few batches, so the templates exist
        before any later stage (in this pass or the next) sees activations."""
        runtime = self._runtime
        runtime.start_collecting()
        batches = self._calibration_batches(state)
        start = time.perf_counter()
        run_calibration_forwards(runtime, state.model, batches)
        for layer in runtime.layers:
            if layer.statistics.sequences == 0:
                raise ValueError(
                    f"SpikeFree: decoder layer {layer.index} saw no calibration "
                    "tokens; the calibration set is empty."
                )
        runtime.finish_collecting(self.min_fraction, self.down_proj_layers)
        if not self.norm_templates:
            for layer in runtime.layers:
                layer.templates = dataclasses.replace(
                    layer.templates, norm_templates={}
                )
        self._templates = runtime.templates
        self.calibration_seconds_ = time.perf_counter() - start
        if not self._templates.has_spikes:
            logger.warning(
                f"SpikeFree: no spike tokens at ratio {self.ratio:g} in "
                f"{len(batches)} calibration batches; the model passes through "
                "unchanged and later stages quantize it as they would without "
                "SpikeFree."
            )
            runtime.remove()
            self._runtime = None
            return
        logger.info(
            f"SpikeFree: spikes carried in layers {self._templates.carrier_layers}; "
            f"down_proj templates at layers {self._templates.down_proj_layers} "
            f"({len(batches)} batches, {self.calibration_seconds_:.1f} s)"
        )

    def on_finalize(self, state: State, **kwargs) -> bool:
        # The runtime stays installed: evaluation and generation need it.
        return True

    # -- helpers ----------------------------------------------------------------
    def _calibration_batches(self, state: State) -> list[dict]:
        calib = getattr(state.data, "calib", None)
        batches = (
            []
            if calib is None
            else list(itertools.islice(calib, max(self.num_calibration_samples, 0)))
        )
        if not batches:
            raise ValueError(_NO_DATA)
        return batches

    def _check_recipe_order(self) -> None:
        modifiers = list(active_session().lifecycle.recipe.modifiers)
        if self not in modifiers:
            return
        after = modifiers[modifiers.index(self) + 1 :]
        if any(type(m).__name__ in _BASIS_CHANGING_STAGES for m in after):
            raise SpikeFreeOrderError(
                "SpinQuantModifier after SpikeFreeModifier is not supported: it "
                "centers the embeddings, fuses norm weights into the linears and "
                "rotates the residual stream, so spike tokens and their templates "
                "move to another basis after SpikeFree calibrated them. Use "
                "QuIPModifier for the rotation (online input rotations; the "
                "templates stay valid, see tests/test_stages.py)."
            )
        before = modifiers[: modifiers.index(self)]
        offenders = [type(m).__name__ for m in before]
        offenders = [name for name in offenders if name in _DOWNSTREAM_STAGES]
        if offenders:
            raise SpikeFreeOrderError(
                f"SpikeFreeModifier is placed after {', '.join(offenders)}. It must "
                "come first: later stages calibrate scales, smoothing factors and "
                "rotations on the activations it makes spike-free. Move it to the "
                "top of the recipe."
            )


def _check_not_quantized(model: nn.Module) -> None:
    quantized = [
        name
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    ]
    if quantized:
        raise SpikeFreeOrderError(
            f"The model is already prepared for quantization ({quantized[0]} has a "
            "quantization scheme): SpikeFreeModifier must run before any "
            "quantization stage. Apply it to the unquantized model."
        )


ModifierFactory.register("SpikeFreeModifier", SpikeFreeModifier)


def run_calibration_forwards(
    runtime: SpikeFreeRuntime, model: nn.Module, batches: list[dict]
) -> None:
    """Forward ``batches`` (dicts with ``input_ids``, maybe ``attention_mask``; or
    ``pixel_values`` for a vision transformer) through the decoder; what the
    runtime collects on the way is the point."""
    device = next(model.parameters()).device
    name = runtime.arch.inputs
    # one sample's dimensions: token ids (tokens,), an image (channels, h, w)
    sample_dims = 3 if name == "pixel_values" else 1
    dtype = next(model.parameters()).dtype
    for batch in tqdm(batches, desc="SpikeFree calibration", leave=False):
        if name not in batch:
            raise ValueError(
                f"SpikeFree: a calibration batch has no {name!r} (it has "
                f"{sorted(batch)}); {runtime.arch.name} models take {name}."
            )
        inputs = {
            key: torch.as_tensor(batch[key]).to(device)
            for key in (name, "attention_mask")
            if key in batch
        }
        if name == "pixel_values":
            inputs[name] = inputs[name].to(dtype)
        if inputs[name].dim() == sample_dims:
            inputs = {key: value.unsqueeze(0) for key, value in inputs.items()}
        runtime.calibration_forward(
            inputs[name], attention_mask=inputs.get("attention_mask")
        )
