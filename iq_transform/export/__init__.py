"""Checkpoints that keep the SpikeFree runtime.

- :mod:`~iq_transform.export.format`: the runtime's state as ``spikefree.json`` +
  ``spikefree.safetensors``, checked against the model before it is installed;
- :mod:`~iq_transform.export.save`: the standard ``save_pretrained`` writes it,
  atomically;
- :mod:`~iq_transform.export.classes`: the ``<base>_spikefree`` transformers
  classes (registered at import, and shipped as the checkpoint's remote code);
- :mod:`~iq_transform.export.load`: :func:`load_pretrained` and the install step
  their ``from_pretrained`` runs.
"""

from iq_transform.export.classes import register_classes
from iq_transform.export.format import CheckpointError
from iq_transform.export.load import install_from_checkpoint, load_pretrained
from iq_transform.export.save import keep_runtime_on_save
from iq_transform.spikefree.runtime import on_runtime_installed

register_classes()
on_runtime_installed(keep_runtime_on_save)

__all__ = ["CheckpointError", "install_from_checkpoint", "load_pretrained"]
