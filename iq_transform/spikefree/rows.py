"""The token rows that static observers leave out of the forward in flight.

One slot shared by whatever decides it: the SpikeFree runtime flags spike tokens,
the PrefixQuant-style baseline flags the prefix (its KV cache is computed in full
precision, so those rows are never quantized). Decoder layers never run nested, so
one slot is enough; the owner sets it before a layer's forward and clears it after.
"""

from __future__ import annotations

import torch

__all__ = ["excluded_rows", "set_excluded_rows"]

_EXCLUDED_ROWS: torch.Tensor | None = None


def excluded_rows() -> torch.Tensor | None:
    """(batch, tokens) bool rows of the decoder layer in flight that observers
    drop, or ``None``."""
    return _EXCLUDED_ROWS


def set_excluded_rows(rows: torch.Tensor | None) -> None:
    """Flag ``rows`` (batch, tokens) for the layer about to run; ``None`` clears."""
    global _EXCLUDED_ROWS
    _EXCLUDED_ROWS = rows
