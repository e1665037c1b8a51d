"""The SpikeFree runtime's state as two files beside a saved model.

- ``spikefree.safetensors``: every template and threshold
  (:meth:`~iq_transform.spikefree.templates.SpikeTemplates.state_dict`);
- ``spikefree.json``: the format version, the runtime's settings (``ratio``, exact
  template rows), which layers carry spikes and have ``down_proj`` sites, the
  linears that compute template rows exactly, what the state was made for
  (architecture, hidden size, layer count) and the tensors' SHA-256.

No pickle. :func:`read_state` checks everything against the model before anything
is installed, so a bad checkpoint leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from iq_transform.models.arch import ArchSpec, base_model_type, get_arch_spec
from iq_transform.spikefree.runtime import SpikeFreeRuntime, get_runtime
from iq_transform.spikefree.templates import KINDS, SpikeTemplates

__all__ = [
    "FORMAT_VERSION",
    "STATE_FILE",
    "TENSORS_FILE",
    "CheckpointError",
    "SpikeFreeState",
    "read_state",
    "write_state",
]

FORMAT_VERSION = 1
STATE_FILE = "spikefree.json"
TENSORS_FILE = "spikefree.safetensors"
_RESAVE = "save the model again from the process that quantized it"


class CheckpointError(ValueError):
    """A SpikeFree checkpoint that cannot be installed into this model."""


@dataclass
class SpikeFreeState:
    """What a saved runtime needs: settings and templates.

    :param ratio: the runtime's spike-token ratio
    :param exact_template_rows: template rows skip activation quantization
    :param templates: every layer's templates and thresholds
    :param follow_carriers: carriers follow from the previous layer at inference
        (absent from checkpoints written before it: ``False``)
    """

    ratio: float
    exact_template_rows: bool
    templates: SpikeTemplates
    follow_carriers: bool = False

    @classmethod
    def of(cls, runtime: SpikeFreeRuntime) -> SpikeFreeState:
        return cls(
            runtime.ratio,
            runtime.exact_template_rows,
            runtime.templates,
            runtime.follow_carriers,
        )

    def install(self, model: nn.Module) -> SpikeFreeRuntime:
        """Install the runtime into ``model`` (replacing one already there)."""
        if (existing := get_runtime(model)) is not None:
            existing.remove()
        runtime = SpikeFreeRuntime(
            model,
            get_arch_spec(model),
            ratio=self.ratio,
            exact_template_rows=self.exact_template_rows,
            follow_carriers=self.follow_carriers,
        )
        runtime.load_templates(self.templates)
        return runtime


def write_state(folder: Path, model: nn.Module, state: SpikeFreeState) -> None:
    """Write ``spikefree.safetensors`` and ``spikefree.json`` into ``folder``.

    :param folder: the checkpoint folder (the model is saved there too)
    :param model: the model the state belongs to
    :param state: the runtime's state
    """
    arch = get_arch_spec(model)
    tensors = {
        key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in state.templates.state_dict().items()
    }
    save_file(tensors, str(folder / TENSORS_FILE))
    layers = {
        str(index): {
            "norm_templates": sorted(t.norm_templates),
            "down_template": t.down_template is not None,
        }
        for index, t in sorted(state.templates.layers.items())
    }
    exact_rows = {
        str(index): _exact_row_linears(arch, t)
        for index, t in sorted(state.templates.layers.items())
        if state.exact_template_rows and t.norm_templates
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": arch.name,
        "model_type": base_model_type(model.config),
        "hidden_size": _hidden_size(model),
        "num_hidden_layers": len(arch.decoder_layers(model)),
        "kinds": list(KINDS),
        "ratio": state.ratio,
        "exact_template_rows": state.exact_template_rows,
        "follow_carriers": state.follow_carriers,
        "carrier_layers": state.templates.carrier_layers,
        "down_proj_layers": state.templates.down_proj_layers,
        "layers": layers,
        "exact_rows": exact_rows,
        "tensors_sha256": _sha256(folder / TENSORS_FILE),
    }
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def read_state(
    state_file: Path, tensors_file: Path, model: nn.Module
) -> SpikeFreeState:
    """Read and check a saved state against ``model``.

    :param state_file: ``spikefree.json``
    :param tensors_file: ``spikefree.safetensors``
    :param model: the model it is to be installed into
    :raises CheckpointError: unreadable, edited or truncated files, a newer format,
        or a state made for another model
    """
    meta = _read_meta(state_file)
    if _sha256(tensors_file) != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"{tensors_file} does not match {state_file} (its SHA-256 differs: the "
            f"file was edited, truncated or swapped); {_RESAVE}."
        )
    try:
        tensors = load_file(str(tensors_file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{tensors_file} is unreadable ({error}); {_RESAVE}."
        ) from None
    _check_model(meta, state_file, model)
    try:
        templates = SpikeTemplates.from_state_dict(tensors)
    except KeyError as error:
        raise CheckpointError(f"{tensors_file}: {error.args[0]}; {_RESAVE}.") from None
    _check_tensors(meta, templates, state_file, get_arch_spec(model))
    return SpikeFreeState(
        float(meta["ratio"]),
        bool(meta["exact_template_rows"]),
        templates,
        bool(meta.get("follow_carriers", False)),
    )


def _read_meta(state_file: Path) -> dict:
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{state_file} is not readable JSON ({error}): it was edited or "
            f"truncated; {_RESAVE}."
        ) from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(
            f"{state_file} has no valid format_version ({version!r}); {_RESAVE}."
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{state_file} is SpikeFree checkpoint format {version}, written by a "
            f"newer iq_transform; this one reads format {FORMAT_VERSION}: upgrade "
            "iq-transform (pip install -U iq-transform)."
        )
    missing = [
        key
        for key in ("ratio", "exact_template_rows", "layers", "hidden_size")
        if key not in meta
    ]
    if missing:
        raise CheckpointError(f"{state_file} lacks {missing}; {_RESAVE}.")
    return meta


def _check_model(meta: dict, state_file: Path, model: nn.Module) -> None:
    arch = get_arch_spec(model)
    found = {
        "architecture": arch.name,
        "hidden_size": _hidden_size(model),
        "num_hidden_layers": len(arch.decoder_layers(model)),
    }
    wrong = [
        f"{key} {meta.get(key)!r} (this model: {value!r})"
        for key, value in found.items()
        if meta.get(key) != value
    ]
    if wrong:
        raise CheckpointError(
            f"{state_file} was made for another model: {', '.join(wrong)}. Load it "
            "into the model it was saved with (the folder's own weights), or "
            "quantize this model with SpikeFree."
        )


def _check_tensors(
    meta: dict, templates: SpikeTemplates, state_file: Path, arch: ArchSpec
) -> None:
    hidden = meta["hidden_size"]
    declared = {
        int(index): (set(layer["norm_templates"]), bool(layer["down_template"]))
        for index, layer in meta["layers"].items()
    }
    stored = {
        index: (set(t.norm_templates), t.down_template is not None)
        for index, t in templates.layers.items()
    }
    if declared != stored:
        raise CheckpointError(
            f"{state_file} lists other templates than {TENSORS_FILE} holds (the "
            f"files do not belong together); {_RESAVE}."
        )
    for index, t in templates.layers.items():
        for name in t.norm_templates:
            if name not in arch.norm_linears:
                raise CheckpointError(
                    f"{state_file}: layer {index} has a template for {name!r}, "
                    f"which a {arch.name} layer does not have; {_RESAVE}."
                )
        vectors = [*t.norm_templates.values()]
        vectors += [t.down_template] if t.down_template is not None else []
        if any(v.shape != (len(KINDS), hidden) for v in vectors):
            raise CheckpointError(
                f"{TENSORS_FILE}: layer {index}'s templates are not "
                f"({len(KINDS)}, {hidden}); {_RESAVE}."
            )


def _exact_row_linears(arch: ArchSpec, templates) -> list[str]:
    """The linears that compute a layer's template rows from the unquantized
    template: those its templated norms feed, but not the MLP's inputs where the
    ``down_proj`` output is a template anyway (the runtime zeroes those rows)."""
    mlp = arch.down_proj.rsplit(".", 1)[0] + "."
    return sorted(
        linear
        for norm in templates.norm_templates
        for linear in arch.norm_linears.get(norm, ())
        if not (linear.startswith(mlp) and templates.down_template is not None)
    )


def _hidden_size(model: nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
