"""From config groups to a measured run: typed configs -> recipe -> oneshot -> results.

- :mod:`~iq_transform.composition.config`: the typed configs ``conf/`` fills;
- :mod:`~iq_transform.composition.schemes`: llm-compressor quantization arguments
  and quantizer modifiers;
- :mod:`~iq_transform.composition.plan`: what a baseline measures before composing;
- :mod:`~iq_transform.composition.recipe`: quant x transform x stages -> recipe;
- :mod:`~iq_transform.composition.pipeline`: recipe names, oneshot, evaluation;
- :mod:`~iq_transform.composition.job`: the whole ``iq-quantize`` job.
"""

from iq_transform.composition.config import (
    AnalyzeConfig,
    ModelConfig,
    QuantConfig,
    QuantizeConfig,
    StagesConfig,
    TextConfig,
    TransformConfig,
)
from iq_transform.composition.job import run_quantize
from iq_transform.composition.pipeline import apply_recipe, evaluate, resolve_recipe
from iq_transform.composition.plan import TransformPlan, plan_transform
from iq_transform.composition.recipe import ComposeError, compose_recipe

__all__ = [
    "AnalyzeConfig",
    "ComposeError",
    "ModelConfig",
    "QuantConfig",
    "QuantizeConfig",
    "StagesConfig",
    "TextConfig",
    "TransformConfig",
    "TransformPlan",
    "apply_recipe",
    "compose_recipe",
    "evaluate",
    "plan_transform",
    "resolve_recipe",
    "run_quantize",
]
