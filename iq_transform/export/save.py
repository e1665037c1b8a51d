"""The standard ``model.save_pretrained(out, save_compressed=True)`` keeps SpikeFree.

Every installed runtime wraps its model's ``save_pretrained`` (llm-compressor's
compressing wrapper inside oneshot, transformers' own after a load). The wrapped
call writes the whole checkpoint into a staging folder beside ``out``: the model as
the wrapped call saves it, then the runtime's state (:mod:`~iq_transform.export.
format`), the SpikeFree model type and its remote code in ``config.json``. Only a
finished folder is renamed into place, so an interrupted save leaves ``out``
absent or as it was; files already in ``out`` that the save does not write (a
tokenizer saved first) are kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import types
import uuid
from pathlib import Path

from loguru import logger
from torch import nn

from iq_transform.export.classes import (
    REMOTE_CODE_FILE,
    auto_class_of,
    auto_map,
    remote_code,
    spikefree_classes,
)
from iq_transform.export.format import SpikeFreeState, write_state
from iq_transform.models.arch import SPIKEFREE_SUFFIX, base_model_type
from iq_transform.spikefree.runtime import SpikeFreeRuntime, get_runtime

__all__ = [
    "keep_runtime_on_save",
    "publish_folder",
    "save_checkpoint",
    "write_spikefree_files",
]

# weights of an earlier save in the target folder are replaced, not kept
_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model")
_WRAPPED = "_keeps_spikefree"


def keep_runtime_on_save(runtime: SpikeFreeRuntime) -> None:
    """Wrap ``runtime.model.save_pretrained`` (once) so that it saves the runtime.

    :param runtime: a runtime just installed
    """
    model = runtime.model
    inner = model.save_pretrained
    if getattr(inner, _WRAPPED, False):
        return

    def save_pretrained(self, save_directory, *args, **kwargs):
        if get_runtime(self) is None:  # removed since: a plain save
            return inner(save_directory, *args, **kwargs)

        def write(staging: Path):
            result = inner(str(staging), *args, **kwargs)
            write_spikefree_files(staging, self)
            return result

        result = _staged(Path(save_directory).expanduser(), write)
        logger.info(f"saved {save_directory} with its SpikeFree runtime")
        return result

    # a bound method, as llm-compressor's own wrapper expects to find
    wrapped = types.MethodType(save_pretrained, model)
    for key, value in getattr(inner, "__dict__", {}).items():
        setattr(save_pretrained, key, value)
    setattr(save_pretrained, _WRAPPED, True)
    model.save_pretrained = wrapped


def save_checkpoint(model: nn.Module, tokenizer, folder: Path) -> None:
    """Save ``model`` (compressed, with its runtime when it has one) and its
    tokenizer into ``folder`` as one atomic step.

    :param model: a model after oneshot, or loaded from a checkpoint
    :param tokenizer: its tokenizer
    :param folder: the checkpoint folder
    """

    def write(staging: Path) -> None:
        model.save_pretrained(str(staging), save_compressed=True)
        tokenizer.save_pretrained(str(staging))

    _staged(folder, write)
    logger.info(f"saved the quantized model and its tokenizer into {folder}")


def _staged(target: Path, write):
    """``write(staging)`` into a folder beside ``target``, then published there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(
        dir=target.parent, prefix=f".{target.name}.saving-"
    ) as tmp:
        staging = Path(tmp) / target.name
        staging.mkdir()
        result = write(staging)
        publish_folder(staging, target)
    return result


def write_spikefree_files(folder: Path, model: nn.Module) -> None:
    """The runtime's state, the SpikeFree model type and its remote code, written
    into a folder that already holds the saved model.

    :param folder: the saved model's folder
    :param model: the model, with its runtime installed
    """
    write_state(folder, model, SpikeFreeState.of(get_runtime(model)))
    base = base_model_type(model.config)
    auto_class = auto_class_of(model, base)
    config_class, model_class = spikefree_classes(base, auto_class)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = base + SPIKEFREE_SUFFIX
    config["architectures"] = [model_class.__name__]
    config["auto_map"] = auto_map(auto_class)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / REMOTE_CODE_FILE).write_text(remote_code(base, auto_class))


def publish_folder(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` folder to ``target``, keeping what ``target``
    held that the new save did not write (weights of an earlier save excepted)."""
    if not target.exists():
        staging.rename(target)
        return
    for old in target.iterdir():
        if (staging / old.name).exists() or old.name.startswith(_WEIGHT_PREFIXES):
            continue
        if old.is_dir():
            shutil.copytree(old, staging / old.name)
        else:
            shutil.copy2(old, staging / old.name)
    retired = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired)
