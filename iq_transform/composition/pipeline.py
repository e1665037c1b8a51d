"""Load, oneshot with a recipe, perplexity: the steps apps and benchmarks share."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch
from datasets import Dataset
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

import iq_transform.baselines  # noqa: F401  (registers PrefixQuantModifier)
from iq_transform.evaluation.perplexity import PerplexityResult, perplexity
from iq_transform.models.offload import onload_once_per_forward
from iq_transform.spikefree import SpikeFreeModifier, get_runtime

__all__ = [
    "RECIPES_DIR",
    "RecipeError",
    "resolve_recipe",
    "recipe_yaml",
    "apply_recipe",
    "evaluate",
]

# the repository's recipes/ (a checkout); installed, iq_transform.recipes
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
NO_RECIPE = ("none", "fp32", "")


class RecipeError(ValueError):
    """A recipe name or file that does not exist."""


def available_recipes() -> list[str]:
    return sorted(p.stem for p in _recipe_dirs()[0].glob("*.yaml"))


def _recipe_dirs() -> list[Path]:
    from importlib import resources

    packaged = Path(str(resources.files("iq_transform").joinpath("recipes")))
    return [d for d in (RECIPES_DIR, packaged) if d.is_dir()] or [RECIPES_DIR]


def resolve_recipe(recipe: str | None) -> Path | None:
    """A recipe name (``recipes/<name>.yaml``) or a YAML path; ``None``/``none``/
    ``fp32`` mean no quantization."""
    if recipe is None or recipe.lower() in NO_RECIPE:
        return None
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in _recipe_dirs():
        candidate = folder / f"{recipe}.yaml"
        if candidate.is_file():
            return candidate
    raise RecipeError(
        f"Unknown recipe {recipe!r}: not a YAML file and not one of "
        f"{available_recipes()} in recipes/. Give recipe=<name> or a path."
    )


def recipe_yaml(recipe: str | Path | list | None) -> str:
    """The recipe as YAML text, for results (a list of modifiers is serialized)."""
    if recipe is None:
        return ""
    if isinstance(recipe, (str, Path)):
        return Path(recipe).read_text()
    from llmcompressor.recipe import Recipe

    return Recipe.from_modifiers(recipe).yaml()


def apply_recipe(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    recipe: str | Path | list,
    calibration: torch.Tensor,
    pipeline: str = "independent",
    seed: int | None = 0,
) -> tuple[float, float | None]:
    """Run llm-compressor's ``oneshot`` on ``calibration``: token ids (samples,
    seqlen), or for a vision transformer ``pixel_values`` (samples, 3, h, w).

    :param seed: seeds torch before oneshot, which draws each pass's calibration
        order (order-dependent observers, GPTQ) and random rotations (QuIP) from
        torch's global generator: the same seed gives the same model, so runs of
        different transforms differ by the transform alone; ``None`` leaves the
        generator as it is
    :return: oneshot wall seconds, and SpikeFree's own calibration seconds (or None)
    """
    from llmcompressor import oneshot

    if calibration.numel() == 0:
        raise ValueError(
            "The calibration set is empty: give at least one calibration sample "
            "(data.num_samples > 0 with a long enough text)."
        )

    images = calibration.is_floating_point() and calibration.dim() == 4
    if images:  # oneshot takes a DataLoader as it is (its datasets are text)
        dataset = DataLoader(
            [{"pixel_values": image} for image in calibration], batch_size=1
        )
    else:
        dataset = Dataset.from_dict({"input_ids": calibration.tolist()})
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=str(recipe) if isinstance(recipe, Path) else recipe,
        processor=tokenizer,
        num_calibration_samples=calibration.shape[0],
        max_seq_length=calibration.shape[-1] if images else calibration.shape[1],
        pipeline=pipeline,
    )
    seconds = time.perf_counter() - start
    # offloaded modules (big models, or any model loaded into CPU memory and
    # calibrated on a GPU) must onload once per forward to use quantized weights
    onload_once_per_forward(model)
    spikefree_seconds = _spikefree_seconds()
    logger.info(f"oneshot took {seconds:.1f} s")
    return seconds, spikefree_seconds


def _spikefree_seconds() -> float | None:
    from llmcompressor.core import active_session

    modifiers = active_session().lifecycle.recipe.modifiers
    seconds = [
        m.calibration_seconds_ for m in modifiers if isinstance(m, SpikeFreeModifier)
    ]
    return seconds[0] if seconds else None


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    progress: bool = True,
    prefix: list[int] | None = None,
) -> tuple[PerplexityResult, float, int | None]:
    """Perplexity, wall seconds, and the spike tokens the runtime handled.

    :param prefix: a full-precision KV-cache prefix (PrefixQuant-style baseline)
    :return: ``(result, seconds, spikes)``; ``spikes`` is None without a SpikeFree
        runtime, and the windows' own counts are ``result.window_spike_tokens``
    """
    runtime = get_runtime(model)
    seen = [runtime.spike_tokens_seen] if runtime else []

    def count_spikes() -> None:
        seen.append(runtime.spike_tokens_seen)

    start = time.perf_counter()
    result = perplexity(
        model,
        windows,
        progress=progress,
        prefix=prefix,
        after_batch=count_spikes if runtime else None,
    )
    seconds = time.perf_counter() - start
    if not runtime:
        return result, seconds, None
    result.window_spike_tokens = [b - a for a, b in itertools.pairwise(seen)]
    return result, seconds, seen[-1] - seen[0]
