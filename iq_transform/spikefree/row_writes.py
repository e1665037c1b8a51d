"""In-place writes of the spike rows of a large GPU tensor, decided on the device.

``torch.where`` over a (tokens, features) output reads and writes every row to
change a handful; this Triton kernel runs one program per row, and a row that is
not flagged has every load and store masked off, so only the spike rows move data.
The host never reads the mask, so nothing waits and a CUDA graph can capture the
launch. Where Triton is
missing (or the tensor is not on CUDA, unless ``TRITON_INTERPRET=1``),
:func:`row_writer` says so and the runtime keeps ``torch.where``.
"""

from __future__ import annotations

import functools
import os

import torch

from iq_transform.spikefree.triton_launch import FastLaunch

__all__ = ["int8_bytes", "row_block", "row_writer", "triton_runs_on", "write_rows"]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# widest row one program writes in one block (wider rows loop)
MAX_BLOCK = 16384

if triton is not None:

    @triton.jit
    def _write_rows_kernel(
        out_ptr,
        flags_ptr,
        kinds_ptr,
        values_ptr,
        stride_out,
        N: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # a row not flagged moves no data: every load and store is masked off
        row = tl.program_id(0).to(tl.int64)
        flagged = tl.load(flags_ptr + row) != 0
        kind = tl.load(kinds_ptr + row).to(tl.int64)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = (cols < N) & flagged
            values = tl.load(values_ptr + kind * N + cols, mask=mask)
            tl.store(
                out_ptr + row * stride_out + cols,
                values.to(out_ptr.dtype.element_ty),
                mask=mask,
            )

    _WRITE_ROWS = FastLaunch(_write_rows_kernel)


def write_rows(
    output: torch.Tensor,
    rows: torch.Tensor,
    kinds: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """``output[rows] = values[kinds[rows]]`` in place.

    :param output: (..., features) a contiguous tensor
    :param rows: bool, ``output.shape[:-1]`` (made contiguous where it is not)
    :param kinds: integer, ``output.shape[:-1]``
    :param values: (kinds, features), on ``output``'s device
    """
    width = output.shape[-1]
    if values.dtype != output.dtype or not values.is_contiguous():
        values = values.to(output.dtype).contiguous()
    block, warps = row_block(width)
    # each dispatch costs host time on the hot path: views only where needed
    _WRITE_ROWS(
        (rows.numel(),),
        (
            output,
            int8_bytes(rows),
            kinds if kinds.is_contiguous() else kinds.contiguous(),
            values,
            width,  # ``output`` is contiguous: a row starts every ``width`` elements
        ),
        {"N": width, "BLOCK": block},  # constants: one compilation per width
        num_warps=warps,
    )
    return output


@functools.cache  # asked at every launch, for a few widths
def row_block(width: int) -> tuple[int, int]:
    """Block size and warps of a program that handles one row of ``width``: the
    whole row in one block where it fits, so its loads are all in flight at once
    (a decode step waits on these kernels' latency, not their bandwidth)."""
    block = min(triton.next_power_of_2(width), MAX_BLOCK)
    return block, 4 if block <= 4096 else (8 if block <= 8192 else 16)


def int8_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as the bytes Triton reads (no copy where it is contiguous)."""
    return (mask if mask.is_contiguous() else mask.contiguous()).view(torch.int8)


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether Triton is installed and runs kernels on ``tensor``: CUDA tensors,
    and CPU ones in its interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    return tensor.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def row_writer(output: torch.Tensor):
    """:func:`write_rows` where it can run on ``output``, else ``None``."""
    return write_rows if triton_runs_on(output) else None
