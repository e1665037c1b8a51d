"""Triton kernels behind :mod:`iq_transform.kernels.fused_norm` (CUDA only).

One program per row: a row (K <= 16384 channels) is read once, reduced, and written
once as FP8 e4m3 or INT8 codes. Every decision (template row or not, zeroed row or
not) is read from or written to device tensors, so nothing waits on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from iq_transform.spikefree.norm_rows import (
    ELEMENTS_PER_THREAD,
    NORM_ROWS,
    loaded_norm_rows,
    rms_normalized,
    with_template_rows,
)

# NORM_ROWS and ELEMENTS_PER_THREAD are the norm kernel's launch shape, the fused
# norms' own: kernels.fused_norm reads them from here at each launch, so that
# benchmarks/speed_gpu.py can sweep them by setting them on this module
__all__ = [
    "ELEMENTS_PER_THREAD",
    "NORM_ROWS",
    "norm_templates_quant_kernel",
    "quant_kernel",
    "replace_rows_kernel",
    "silu_mul_quant_kernel",
]

FP8_MAX = tl.constexpr(448.0)
INT8_MIN = tl.constexpr(-128.0)
INT8_MAX = tl.constexpr(127.0)
# vLLM's floor for a dynamic per-token scale (an all-zero row still divides safely)
MIN_DYNAMIC_SCALE = tl.constexpr(1.0 / (448.0 * 512.0))


@triton.jit
def _round_half_even(v):
    floor = tl.floor(v)
    fraction = v - floor
    odd = floor - 2.0 * tl.floor(floor * 0.5)
    up = (fraction > 0.5) | ((fraction == 0.5) & (odd != 0.0))
    return tl.where(up, floor + 1.0, floor)


@triton.jit
def _quantize_row(y, scale, IS_FP8: tl.constexpr):
    scaled = y / scale
    if IS_FP8:
        codes = tl.clamp(scaled, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
    else:
        codes = _round_half_even(tl.clamp(scaled, INT8_MIN, INT8_MAX)).to(tl.int8)
    return codes


@triton.jit
def _row_scale(y, mask, scale_ptr, DYNAMIC: tl.constexpr, QMAX: tl.constexpr):
    if DYNAMIC:
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
        scale = tl.maximum(amax / QMAX, MIN_DYNAMIC_SCALE)
    else:
        scale = tl.load(scale_ptr)
    return scale


@triton.jit
def norm_templates_quant_kernel(
    x_ptr,
    weight_ptr,
    templates_ptr,
    kinds_ptr,
    rows_in_ptr,
    threshold_ptr,
    scale_ptr,
    codes_ptr,
    row_scales_ptr,
    rows_out_ptr,
    M,
    K,
    stride_x,
    stride_codes,
    eps,
    weight_offset,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_TEMPLATES: tl.constexpr,
    HAS_ROWS_IN: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    DYNAMIC: tl.constexpr,
    IS_FP8: tl.constexpr,
    QMAX: tl.constexpr,
):
    # ROWS rows per program: the weight is loaded once for all of them
    rows, row_mask, cols, mask, x, w = loaded_norm_rows(
        x_ptr, weight_ptr, M, K, stride_x, weight_offset, ROWS, BLOCK
    )
    y = rms_normalized(x, K, eps) * w
    if HAS_TEMPLATES:
        flag = tl.zeros([ROWS], dtype=tl.int32)
        if HAS_ROWS_IN:
            flag = tl.load(rows_in_ptr + rows, mask=row_mask, other=0).to(tl.int32)
        if HAS_THRESHOLD:
            amax = tl.max(tl.abs(x), axis=1)
            flag = flag | (amax > tl.load(threshold_ptr)).to(tl.int32)
        y, templated = with_template_rows(
            y, w, templates_ptr, kinds_ptr, rows, row_mask, cols, mask, flag, K
        )
        tl.store(rows_out_ptr + rows, templated.to(tl.int8), mask=row_mask)
    if DYNAMIC:
        amax_y = tl.max(tl.abs(y), axis=1)
        scale = tl.maximum(amax_y / QMAX, MIN_DYNAMIC_SCALE)
    else:
        scale = tl.load(scale_ptr) + tl.zeros([ROWS], dtype=tl.float32)
    codes = _quantize_row(y, scale[:, None], IS_FP8)
    tl.store(codes_ptr + rows[:, None] * stride_codes + cols[None, :], codes, mask=mask)
    tl.store(row_scales_ptr + rows, scale, mask=row_mask)


@triton.jit
def silu_mul_quant_kernel(
    gate_up_ptr,
    exact_ptr,
    kinds_ptr,
    rows_in_ptr,
    threshold_ptr,
    scale_ptr,
    codes_ptr,
    row_scales_ptr,
    rows_out_ptr,
    N,
    stride_gate_up,
    stride_codes,
    BLOCK: tl.constexpr,
    HAS_ROWS_IN: tl.constexpr,
    HAS_EXACT: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr,
    DYNAMIC: tl.constexpr,
    IS_FP8: tl.constexpr,
    QMAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    base = gate_up_ptr + row * stride_gate_up
    flag = 0
    if HAS_ROWS_IN:
        flag = tl.load(rows_in_ptr + row).to(tl.int32)
    if HAS_EXACT:
        # carriers read their kind's precomputed unquantized-input gate/up row
        # instead: one row pointer chosen per program, so no second row is held
        # in registers (that doubled this kernel's time at 8B widths)
        kind = tl.load(kinds_ptr + row).to(tl.int64)
        base = tl.where(flag != 0, exact_ptr + kind * 2 * N, base)
    gate = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + N + cols, mask=mask, other=0.0).to(tl.float32)
    hidden = gate / (1.0 + tl.exp(-gate)) * up
    if HAS_THRESHOLD:
        # a down_proj site: detected and carried rows are zeroed (their output
        # becomes the layer's down template)
        amax = tl.max(tl.where(mask, tl.abs(hidden), 0.0), axis=0)
        zeroed = (flag | (amax > tl.load(threshold_ptr)).to(tl.int32)) != 0
        hidden = tl.where(zeroed, 0.0, hidden)
        tl.store(rows_out_ptr + row, zeroed.to(tl.int8))
    scale = _row_scale(hidden, mask, scale_ptr, DYNAMIC, QMAX)
    codes = _quantize_row(hidden, scale, IS_FP8)
    tl.store(codes_ptr + row * stride_codes + cols, codes, mask=mask)
    tl.store(row_scales_ptr + row, scale)


@triton.jit
def quant_kernel(
    x_ptr,
    scale_ptr,
    codes_ptr,
    row_scales_ptr,
    K,
    stride_x,
    stride_codes,
    BLOCK: tl.constexpr,
    DYNAMIC: tl.constexpr,
    IS_FP8: tl.constexpr,
    QMAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = _row_scale(x, mask, scale_ptr, DYNAMIC, QMAX)
    codes = _quantize_row(x, scale, IS_FP8)
    tl.store(codes_ptr + row * stride_codes + cols, codes, mask=mask)
    tl.store(row_scales_ptr + row, scale)


@triton.jit
def replace_rows_kernel(
    out_ptr,
    flags_ptr,
    kinds_ptr,
    constants_ptr,
    N,
    stride_out,
    BLOCK: tl.constexpr,
):
    # one program per row; a row not flagged moves no data (masked)
    row = tl.program_id(0).to(tl.int64)
    flagged = tl.load(flags_ptr + row) != 0
    kind = tl.load(kinds_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (cols < N) & flagged
    values = tl.load(constants_ptr + kind * N + cols, mask=mask)
    tl.store(
        out_ptr + row * stride_out + cols,
        values.to(out_ptr.dtype.element_ty),
        mask=mask,
    )
