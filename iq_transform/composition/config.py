"""Typed Hydra configs shared by the command-line apps.

The YAML files under ``conf/`` fill these dataclasses; Hydra rejects unknown keys and
wrong types with a message that names them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from iq_transform.compose import (
    QuantConfig,
    StagesConfig,
    TransformConfig,
    recipe_label,
)
from iq_transform.data import (
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.models import load_model

__all__ = [
    "ModelConfig",
    "TextConfig",
    "AnalyzeConfig",
    "QuantizeConfig",
    "register_configs",
]


@dataclass
class ModelConfig:
    """:param spec: an offline model name, a local folder, or a hub id
    :param dtype: torch dtype name the model is loaded in
    :param cache_dir: where converted offline models are cached (default:
        ``$IQ_TRANSFORM_CACHE`` or ``~/.cache/iq_transform``)
    :param device_map: where the weights go (see
        :func:`iq_transform.models.load_model`): ``null`` loads into CPU memory
        and the sequential / independent pipelines onload one decoder layer at a
        time to the GPU (models larger than one GPU); ``auto`` fills all GPUs, then
        CPU, then disk (whole-model forwards over all GPUs with
        ``pipeline=basic``); ``auto_offload`` keeps the weights in CPU memory, then
        on disk (models larger than CPU memory); or a device such as ``cuda:0``
    :param max_memory: a mapping of per-device limits for ``auto`` /
        ``auto_offload``, e.g. ``{0: 70GiB, cpu: 200GiB}`` (default: what the
        devices have)
    :param offload_folder: where the weights that fit in no memory are written
    """

    spec: str = "smollm2-135m"
    dtype: str = "float32"
    cache_dir: str | None = None
    device_map: str | None = None
    max_memory: Any = None
    offload_folder: str | None = None

    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"model.dtype={self.dtype!r} is not a torch dtype name")
        return dtype

    def load(self):
        """``(model, tokenizer)`` as configured."""
        return load_model(
            self.spec,
            cache_dir=self.cache_dir,
            dtype=self.torch_dtype(),
            device_map=self.device_map,
            max_memory=self.max_memory,
            offload_folder=self.offload_folder,
        )


@dataclass
class TextConfig:
    """A text source (see :class:`iq_transform.data.TextSource`) and its windows.

    :param num_samples: how many windows
    :param seqlen: tokens per window
    :param seed: shuffles calibration documents; ``iq-quantize`` also seeds torch
        with it before oneshot (calibration order, random rotations)
    """

    path: str | None = None
    hub_dataset: str | None = None
    hub_config: str | None = None
    split: str = "test"
    text_field: str = "text"
    num_samples: int = 8
    seqlen: int = 512
    seed: int = 0

    def calibration_windows(self, tokenizer) -> torch.Tensor:
        """``num_samples`` windows starting at documents (calibration)."""
        documents = load_documents(self.source())
        return calibration_windows(
            tokenizer, documents, self.num_samples, self.seqlen, seed=self.seed
        )

    def evaluation_windows(self, tokenizer) -> torch.Tensor:
        """The first ``num_samples`` non-overlapping windows (evaluation)."""
        return evaluation_windows(
            tokenizer, load_text(self.source()), self.seqlen, self.num_samples
        )

    def source(self) -> TextSource:
        return TextSource(
            path=self.path,
            hub_dataset=self.hub_dataset,
            hub_config=self.hub_config,
            split=self.split,
            text_field=self.text_field,
        )


@dataclass
class AnalyzeConfig:
    """``iq-analyze``: where massive activations sit in a model.

    :param ratio: spike token when its max |x| exceeds ratio x the median token max
    :param top_k: largest activations kept per site
    :param output_dir: where spikes.json and spikes.png go (default: the run dir)
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TextConfig = field(default_factory=TextConfig)
    ratio: float = 64.0
    top_k: int = 3
    output_dir: str | None = None
    progress: bool = True


@dataclass
class QuantizeConfig:
    """``iq-quantize``: oneshot with a recipe, then WikiText-2 perplexity.

    :param quant: weight/activation formats (``conf/quant``)
    :param transform: SpikeFree or none (``conf/transform``)
    :param stages: SmoothQuant / QuIP / RTN / GPTQ (``conf/stages``)
    :param recipe: ``null`` composes the recipe from quant, transform and stages;
        else a name in ``recipes/`` (e.g. ``w8a8_static_spikefree``), a YAML path,
        or ``none`` for the unquantized model (the groups are then ignored)
    :param pipeline: llm-compressor pipeline (``independent``, ``sequential``,
        ``basic``)
    :param output_dir: where results.json and recipe.yaml go (default: run dir)
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TextConfig = field(default_factory=TextConfig)
    eval: TextConfig = field(default_factory=TextConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    recipe: str | None = None
    pipeline: str = "independent"
    output_dir: str | None = None
    progress: bool = True

    def recipe_label(self) -> str:
        """The recipe given, else ``<quant>+<stages>+<transform>``."""
        return recipe_label(
            self.recipe, self.quant.name, self.stages.name, self.transform.name
        )


def register_configs() -> None:
    """Make the schemas known to Hydra (called at import of each app module, so
    launcher workers that re-import it see them too)."""
    store = ConfigStore.instance()
    store.store(name="analyze_schema", node=AnalyzeConfig)
    store.store(name="quantize_schema", node=QuantizeConfig)
    # ${iq_recipe_label:${recipe},${quant.name},${stages.name},${transform.name}}
    OmegaConf.register_new_resolver("iq_recipe_label", recipe_label, replace=True)
