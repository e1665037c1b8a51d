"""``iq-quantize``: load a model, oneshot it with a recipe, measure perplexity.

Writes ``results.json`` (model, recipe, every parameter, perplexity, oneshot /
SpikeFree / evaluation wall time, spike tokens detected during evaluation) and the
recipe as ``recipe.yaml`` into the run directory.

Example::

    iq-quantize recipe=w8a8_static_spikefree model=gemma3-270m
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import OmegaConf

from iq_transform.cli.config import QuantizeConfig, register_configs
from iq_transform.pipeline import apply_recipe, evaluate, recipe_yaml, resolve_recipe

register_configs()


def run_quantize(config: QuantizeConfig, output_dir: Path) -> dict:
    """The whole job; returns what it writes to ``results.json``."""
    recipe = resolve_recipe(config.recipe)
    model, tokenizer = config.model.load()
    windows = config.eval.evaluation_windows(tokenizer)
    oneshot_seconds = spikefree_seconds = None
    if recipe is not None:
        calibration = config.data.calibration_windows(tokenizer)
        oneshot_seconds, spikefree_seconds = apply_recipe(
            model, tokenizer, recipe, calibration, pipeline=config.pipeline
        )
    result, eval_seconds, spikes = evaluate(model, windows, progress=config.progress)
    results = {
        "model": config.model.spec,
        "recipe": config.recipe,
        "recipe_path": str(recipe) if recipe else None,
        "config": OmegaConf.to_container(OmegaConf.structured(config)),
        "ppl": result.ppl,
        "eval": result.to_dict(),
        "oneshot_seconds": oneshot_seconds,
        "spikefree_calibration_seconds": spikefree_seconds,
        "eval_seconds": eval_seconds,
        "spike_tokens_in_eval": spikes,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    if recipe is not None:
        (output_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    print(
        f"{config.model.spec} | {config.recipe} | WikiText-2 PPL {result.ppl:.3f} "
        f"({result.num_windows}x{result.seqlen})"
    )
    logger.info(f"wrote {output_dir / 'results.json'}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="quantize")
def main(config) -> None:
    typed: QuantizeConfig = OmegaConf.to_object(config)
    output_dir = Path(typed.output_dir or HydraConfig.get().runtime.output_dir)
    run_quantize(typed, output_dir)
