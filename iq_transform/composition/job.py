"""The ``iq-quantize`` job: load a model, oneshot it with a recipe, measure perplexity.

The recipe is composed from the config groups ``quant``, ``transform`` and
``stages`` (:func:`iq_transform.composition.recipe.compose_recipe`) unless
``recipe=`` names a YAML. :func:`run_quantize` writes ``results.json`` (model,
recipe and its groups, every parameter, perplexity, oneshot / SpikeFree /
evaluation wall time, spike tokens detected during evaluation, the per-layer spike
ratio of the quantized linears' inputs before and after oneshot, the baselines'
prefix / unquantized linears, ``status``; with ``eval=csr`` also lm-eval zero-shot
accuracy and the greedy-generation check against the model before oneshot) and the
recipe as ``recipe.yaml`` into the run directory; :func:`write_failure` writes the
``results.json`` of a failed run.
The Hydra app around it is :mod:`iq_transform.cli.quantize`.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from pathlib import Path

import torch
from loguru import logger
from omegaconf import OmegaConf

from iq_transform.baselines import with_prefix
from iq_transform.composition.config import QuantizeConfig
from iq_transform.composition.pipeline import (
    apply_recipe,
    evaluate,
    recipe_yaml,
    resolve_recipe,
)
from iq_transform.composition.plan import TransformPlan, plan_transform
from iq_transform.composition.recipe import (
    ComposeError,
    check_group_size,
    compose_recipe,
)
from iq_transform.evaluation.features import feature_quality, image_features
from iq_transform.evaluation.generation import compare_generations, greedy_generate
from iq_transform.evaluation.spike_ratios import linear_input_ratios
from iq_transform.evaluation.zero_shot import check_tasks, zero_shot
from iq_transform.export.save import save_checkpoint
from iq_transform.kernels import check_executor, execute
from iq_transform.models.arch import get_arch_spec
from iq_transform.spikefree import get_runtime

__all__ = [
    "compose_from_config",
    "oneshot_from_config",
    "run_info",
    "run_quantize",
    "write_failure",
    "write_results",
]

# Evaluation windows on which the quantized linears' input spike ratio is measured
# before and after oneshot (results.json: spike_ratio_before / _after).
RATIO_WINDOWS = 2
# results.json's recipe of a model evaluated as it was saved
SAVED = "saved"


def run_info(config: QuantizeConfig) -> dict:
    """What identifies a run in ``results.json`` (the same for failed runs).

    :param config: the run's configuration
    """
    composed = config.recipe is None
    return {
        "model": config.model.spec,
        "recipe": config.recipe_label(),
        "quant": config.quant.name if composed else None,
        "transform": config.transform.name if composed else None,
        "stages": config.stages.name if composed else None,
        "config": OmegaConf.to_container(OmegaConf.structured(config)),
    }


def compose_from_config(
    config: QuantizeConfig, model, tokenizer, calibration: torch.Tensor
) -> tuple[list, TransformPlan]:
    """The recipe composed from ``config``'s quant / transform / stages groups, and
    what a baseline measured on the full-precision model for it.

    :param calibration: (samples, seqlen) calibration windows (the baselines scan
        them)
    """
    check_group_size(model, config.quant)
    plan = plan_transform(
        config.transform, model, tokenizer, calibration, config.progress
    )
    recipe = compose_recipe(
        config.quant, config.transform, config.stages, get_arch_spec(model), plan
    )
    return recipe, plan


def oneshot_from_config(
    config: QuantizeConfig,
    model,
    tokenizer,
    recipe,
    calibration: torch.Tensor,
    plan: TransformPlan,
) -> tuple[float, float | None]:
    """``oneshot`` as ``iq-quantize`` runs it: the baseline's prefix in front of the
    calibration windows, ``config.pipeline``, torch seeded with ``data.seed``.

    :return: oneshot wall seconds, and SpikeFree's own calibration seconds
    """
    return apply_recipe(
        model,
        tokenizer,
        recipe,
        with_prefix(calibration, plan.prefix_ids),
        pipeline=config.pipeline,
        seed=config.data.seed,
    )


def run_quantize(config: QuantizeConfig, output_dir: Path) -> dict:
    """The whole job; returns what it writes to ``results.json``.

    A model loaded already quantized (``model.spec=<a saved folder>``) is evaluated
    as saved, its SpikeFree runtime included. With ``save_dir`` the quantized model
    and its tokenizer are saved there after the evaluation.

    :param config: the run's configuration
    :param output_dir: where ``results.json`` and ``recipe.yaml`` go
    """
    composed = config.recipe is None
    recipe_path = None if composed else resolve_recipe(config.recipe)
    if config.execute is not None:
        # before the minutes of oneshot
        check_executor(config.execute, composed and config.stages.rotation is not None)
    if config.eval.tasks:  # a task that cannot be found stops before any work
        check_tasks(config.eval.tasks, config.eval.offline, config.eval.include_path)
    model, tokenizer = config.model.load()
    if get_arch_spec(model).inputs == "pixel_values":
        return run_quantize_images(config, output_dir, model, tokenizer, recipe_path)
    as_saved = _is_quantized(model)
    if as_saved:
        _check_evaluated_as_saved(config, recipe_path)
        composed = False
    recipe, plan = recipe_path, TransformPlan()
    if composed or recipe_path is not None:
        calibration = config.data.calibration_windows(tokenizer)
    if composed:
        recipe, plan = compose_from_config(config, model, tokenizer, calibration)
    windows = config.eval.evaluation_windows(tokenizer)
    oneshot_seconds = spikefree_seconds = ratios_before = ratios_after = None
    reference_tokens = None
    if recipe is not None:
        ratios_before = linear_input_ratios(model, windows[:RATIO_WINDOWS])
        reference_tokens = _generate(config, model, tokenizer)
        oneshot_seconds, spikefree_seconds = oneshot_from_config(
            config, model, tokenizer, recipe, calibration, plan
        )
    if recipe is not None or as_saved:
        ratios_after = linear_input_ratios(
            model, windows[:RATIO_WINDOWS], plan.prefix_ids, plan.unquantized
        )
    fake_quantized = fake_quantized_spikes = None
    if config.execute is not None:
        if config.eval.perplexity:
            fake_quantized, _, fake_quantized_spikes = evaluate(
                model, windows, progress=config.progress, prefix=plan.prefix_ids
            )
        if config.save_dir is not None:  # the checkpoint holds the float weights
            save_checkpoint(model, tokenizer, Path(config.save_dir).expanduser())
        execute(model, config.execute)
    result = eval_seconds = spikes = None
    if config.eval.perplexity:
        result, eval_seconds, spikes = evaluate(
            model, windows, progress=config.progress, prefix=plan.prefix_ids
        )
    accuracy = None
    if config.eval.tasks:
        accuracy = zero_shot(
            model,
            tokenizer,
            config.eval.tasks,
            limit=config.eval.lm_eval_limit(),
            batch_size=config.eval.batch_size,
            offline=config.eval.offline,
            include_path=config.eval.include_path,
            prefix=plan.prefix_ids,
        )
    generation = _generation_check(
        config, model, tokenizer, reference_tokens, plan.prefix_ids
    )
    info = run_info(config)
    if as_saved:
        info.update(recipe=SAVED, quant=None, transform=None, stages=None)
    if config.save_dir is not None and config.execute is None:
        save_checkpoint(model, tokenizer, Path(config.save_dir).expanduser())
    results = {
        **info,
        "status": "ok",
        "recipe_path": str(recipe_path) if recipe_path else None,
        "evaluated_as_saved": as_saved,
        "save_dir": config.save_dir,
        "ppl": result.ppl if result else None,
        "eval": result.to_dict() if result else None,
        "zero_shot": accuracy.to_dict() if accuracy else None,
        "zero_shot_average": accuracy.average if accuracy else None,
        "zero_shot_average_stderr": accuracy.average_stderr if accuracy else None,
        "generation": generation,
        "execute": config.execute,
        "ppl_fake_quantized": None if fake_quantized is None else fake_quantized.ppl,
        "eval_fake_quantized": None
        if fake_quantized is None
        else fake_quantized.to_dict(),
        "oneshot_seconds": oneshot_seconds,
        "spikefree_calibration_seconds": spikefree_seconds,
        "eval_seconds": eval_seconds,
        "spike_tokens_in_eval": spikes,
        # where the executed model's perplexity departs from the fake-quantized
        # one's, a different count says detection decided differently
        "spike_tokens_in_eval_fake_quantized": fake_quantized_spikes,
        "prefix_ids": plan.prefix_ids,
        "unquantized": plan.unquantized,
        "spike_ratio_before": ratios_before,
        "spike_ratio_after": ratios_after,
    }
    write_results(output_dir, results)
    if recipe is not None:
        (output_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    elif (
        as_saved and (saved_recipe := Path(config.model.spec) / "recipe.yaml").is_file()
    ):
        shutil.copy(saved_recipe, output_dir / "recipe.yaml")
    print(
        _summary(
            config.model.spec,
            info["recipe"],
            result,
            accuracy,
            generation,
            config.execute,
            fake_quantized,
        )
    )
    return results


def run_quantize_images(
    config: QuantizeConfig, output_dir: Path, model, processor, recipe_path
) -> dict:
    """``iq-quantize`` for a vision encoder: oneshot on calibration images, then
    the features of the evaluation images against the FP32 model's (cosine of CLS
    and pooled features, nearest-neighbour agreement)."""
    for group, data in (("data", config.data), ("eval", config.eval)):
        if not data.images:
            raise ValueError(
                f"{config.model.spec} is a vision encoder: give it images, e.g. "
                f"{group}=imagenet_sample (a folder of images, {group}.images=true)."
            )
    if _is_quantized(model):
        raise ValueError(
            "Evaluating a saved quantized vision encoder is not supported yet: "
            "quantize the FP model (iq-quantize model.spec=<FP model>)."
        )
    calibration = config.data.calibration_windows(processor)
    images = config.eval.evaluation_windows(processor)
    reference = image_features(model, images)
    recipe = recipe_path
    if config.recipe is None:
        recipe, _ = compose_from_config(config, model, processor, calibration)
    oneshot_seconds = spikefree_seconds = None
    if recipe is not None:
        oneshot_seconds, spikefree_seconds = apply_recipe(
            model,
            processor,
            recipe,
            calibration,
            pipeline=config.pipeline,
            seed=config.data.seed,
        )
    start = time.perf_counter()
    quality = feature_quality(image_features(model, images), reference)
    eval_seconds = time.perf_counter() - start
    if config.save_dir is not None:
        save_checkpoint(model, processor, Path(config.save_dir).expanduser())
    runtime = get_runtime(model)
    results = {
        **run_info(config),
        "status": "ok",
        "recipe_path": str(recipe_path) if recipe_path else None,
        "save_dir": config.save_dir,
        "features": quality.to_dict(),
        "oneshot_seconds": oneshot_seconds,
        "spikefree_calibration_seconds": spikefree_seconds,
        "spikefree_carrier_layers": (
            None if runtime is None else runtime.templates.carrier_layers
        ),
        "eval_seconds": eval_seconds,
    }
    write_results(output_dir, results)
    if recipe is not None:
        (output_dir / "recipe.yaml").write_text(recipe_yaml(recipe))
    print(
        f"{config.model.spec} | {results['recipe']} | CLS cosine to FP32 "
        f"{quality.cls_cosine:.5f}, pooled {quality.pooled_cosine:.5f}, "
        f"NN agreement {quality.nn_agreement:.3f} ({quality.num_images} images)"
    )
    return results


def _generate(config: QuantizeConfig, model, tokenizer, prefix=None):
    """Greedy tokens of the generation check's prompts (``None`` without any)."""
    if not config.eval.generation_prompts:
        return None
    return greedy_generate(
        model,
        tokenizer,
        list(config.eval.generation_prompts),
        config.eval.generation_tokens,
        prefix=prefix,
    )


def _generation_check(
    config: QuantizeConfig, model, tokenizer, reference, prefix
) -> dict | None:
    """The generation check against the full-precision tokens generated before
    oneshot; without them (no recipe: nothing to compare) the tokens alone."""
    tokens = _generate(config, model, tokenizer, prefix)
    if tokens is None:
        return None
    prompts = list(config.eval.generation_prompts)
    if reference is None:
        return {
            "prompts": prompts,
            "new_tokens": config.eval.generation_tokens,
            "agreement": None,
            "text": [tokenizer.decode(row) for row in tokens],
        }
    check = compare_generations(prompts, reference, tokens, tokenizer)
    logger.info(
        f"greedy generation vs full precision: {check.agreement:.1%} of tokens "
        f"agree, first divergence {check.first_divergence}"
    )
    return check.to_dict()


def _summary(
    spec: str, recipe: str, ppl, accuracy, generation, executed, fake_quantized
) -> str:
    parts = [spec, recipe]
    if ppl is not None:
        how = "" if executed is None else f" executed {executed}"
        reference = ""
        if fake_quantized is not None:
            reference = f" (fake-quantized {fake_quantized.ppl:.3f})"
        parts.append(
            f"WikiText-2 PPL{how} {ppl.ppl:.3f}{reference} "
            f"({ppl.num_windows}x{ppl.seqlen})"
        )
    if accuracy is not None:
        parts.append(
            f"lm-eval average {100 * accuracy.average:.2f} ± "
            f"{100 * accuracy.average_stderr:.2f} ({len(accuracy.tasks)} tasks)"
        )
    if generation is not None and generation["agreement"] is not None:
        parts.append(f"greedy agreement {generation['agreement']:.1%}")
    return " | ".join(parts)


def _is_quantized(model) -> bool:
    """Whether the model was loaded already quantized (a saved checkpoint)."""
    return getattr(model.config, "quantization_config", None) is not None


def _check_evaluated_as_saved(config: QuantizeConfig, recipe_path) -> None:
    if recipe_path is not None:
        raise ComposeError(
            f"model.spec={config.model.spec} is already quantized, so iq-quantize "
            f"evaluates it as saved: leave recipe unset (recipe={config.recipe} "
            "would quantize it again), or give the unquantized model."
        )


def write_failure(output_dir: Path, config: QuantizeConfig, error: Exception) -> dict:
    """``results.json`` of a failed run: ``status``, error and traceback.

    :param output_dir: the run directory
    :param config: the run's configuration
    :param error: what the run raised
    """
    results = {
        **run_info(config),
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc(),
    }
    write_results(output_dir, results)
    logger.error(f"{config.recipe_label()} failed: {results['error']}")
    return results


def write_results(output_dir: Path, results: dict) -> None:
    """Write ``results.json`` into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    logger.info(f"wrote {output_dir / 'results.json'}")
