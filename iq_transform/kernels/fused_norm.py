"""The row-wise ops that feed FP8 / INT8 matrix products, each in one pass.

- :func:`fused_norm_templates_quant`: RMSNorm (Llama's ``w`` and Gemma's ``1 + w``
  forms) + template rows for spike tokens + static per-tensor (or dynamic per-token)
  quantization of its output;
- :func:`silu_mul_quant`: the GLU product ``SiLU(gate) * up`` (where ``down_proj``
  spikes live) + exact template rows of the carriers + zeroed ``down_proj`` spike
  rows + quantization;
- :func:`quantize_rows`: quantization alone (the ``o_proj`` input).

Each runs a Triton kernel on CUDA tensors (:mod:`iq_transform.kernels._triton`)
and the eager reference (``*_reference``, same signature and same arithmetic in
float32) elsewhere: the reference is what CI tests on CPU and what the kernel is
checked against on a GPU. Which rows get templates is decided on the device (a row
mask and/or an absolute max |x| threshold), so no call waits on the host.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from iq_transform.spikefree.norm_rows import check_templates, launch_config

__all__ = [
    "FP8_MAX",
    "MIN_DYNAMIC_SCALE",
    "QuantizedRows",
    "uses_triton",
    "fused_norm_templates_quant",
    "fused_norm_templates_quant_reference",
    "silu_mul_quant",
    "silu_mul_quant_reference",
    "quantize_rows",
    "quantize_rows_reference",
    "replace_rows",
]

FP8_MAX = 448.0
MIN_DYNAMIC_SCALE = 1.0 / (448.0 * 512.0)
_CODE_DTYPES = (torch.float8_e4m3fn, torch.int8)


def triton_cdiv(count: int, step: int) -> int:
    return -(-count // step)


class QuantizedRows(NamedTuple):
    """Codes (M, K), the float32 scale of each row (M, 1) and, where the op decides
    rows, the rows it templated or zeroed (M,) bool (else ``None``)."""

    codes: torch.Tensor
    row_scales: torch.Tensor
    rows: torch.Tensor | None


def uses_triton(x: torch.Tensor) -> bool:
    """Triton runs CUDA tensors, and CPU ones under ``TRITON_INTERPRET=1`` (its
    interpreter: how the kernels themselves are tested without a GPU)."""
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _qmax(code_dtype: torch.dtype) -> float:
    if code_dtype not in _CODE_DTYPES:
        raise ValueError(
            f"code_dtype must be torch.float8_e4m3fn or torch.int8, got {code_dtype}"
        )
    return FP8_MAX if code_dtype == torch.float8_e4m3fn else 127.0


def _quantize_reference(
    y: torch.Tensor, scale: torch.Tensor | None, code_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = _qmax(code_dtype)
    if scale is None:
        row_scales = (y.abs().amax(-1, keepdim=True) / qmax).clamp_min(
            MIN_DYNAMIC_SCALE
        )
    else:
        row_scales = scale.float().reshape(1, 1).expand(y.shape[0], 1)
    scaled = y / row_scales
    if code_dtype == torch.float8_e4m3fn:
        codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(code_dtype)
    else:
        codes = scaled.clamp(-128.0, 127.0).round().to(code_dtype)
    return codes, row_scales.contiguous()


def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def fused_norm_templates_quant_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale: torch.Tensor | None = None,
    *,
    weight_offset: float = 0.0,
    templates: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    code_dtype: torch.dtype = torch.float8_e4m3fn,
) -> QuantizedRows:
    """Eager reference of :func:`fused_norm_templates_quant` (same arguments)."""
    check_templates(templates, kinds, rows, threshold, x.shape[-1])
    x = _rows_2d(x).float()
    w = weight.float() + weight_offset
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    templated = None
    if templates is not None:
        templated = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if rows is not None:
            templated = templated | rows.reshape(-1).bool()
        if threshold is not None:
            templated = templated | (x.abs().amax(-1) > threshold.float())
        values = templates.float()[kinds.reshape(-1)] * w
        y = torch.where(templated.unsqueeze(-1), values, y)
    codes, row_scales = _quantize_reference(y, scale, code_dtype)
    return QuantizedRows(codes, row_scales, templated)


def fused_norm_templates_quant(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    scale: torch.Tensor | None = None,
    *,
    weight_offset: float = 0.0,
    templates: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    code_dtype: torch.dtype = torch.float8_e4m3fn,
) -> QuantizedRows:
    """RMSNorm, template rows and quantization of the output, in one pass.

    Row ``i`` of the output is ``x_i / rms(x_i) * (weight + weight_offset)``, or
    ``templates[kinds[i]] * (weight + weight_offset)`` when ``rows[i]`` is set or
    ``max|x_i| > threshold``; then ``codes = q(output / scale)``.

    :param x: (..., K) activations, any float dtype
    :param weight: (K,) the norm's weight
    :param eps: the norm's epsilon
    :param scale: device scalar: the static per-tensor scale; ``None`` for dynamic
        per-token scales (``max|row| / qmax``)
    :param weight_offset: 1.0 for Gemma's ``(1 + w)`` norms
    :param templates: (kinds, K) pre-weight templates (``x / rms(x)`` of spike
        tokens), or ``None``
    :param kinds: (...,) integer spike kind of each row (with ``templates``)
    :param rows: (...,) bool rows to template (e.g. carriers found upstream)
    :param threshold: device scalar: rows whose max |x| exceeds it are templated
    :param code_dtype: ``torch.float8_e4m3fn`` or ``torch.int8``
    :return: codes (M, K), row scales (M, 1) float32, templated rows (M,) or None
    """
    if not uses_triton(x):
        return fused_norm_templates_quant_reference(
            x, weight, eps, scale, weight_offset=weight_offset, templates=templates,
            kinds=kinds, rows=rows, threshold=threshold, code_dtype=code_dtype,
        )  # fmt: skip
    from iq_transform.kernels import _triton

    check_templates(templates, kinds, rows, threshold, x.shape[-1])
    qmax = _qmax(code_dtype)
    x2 = _rows_2d(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    count, width = x2.shape
    codes = torch.empty(count, width, dtype=code_dtype, device=x.device)
    row_scales = torch.empty(count, 1, dtype=torch.float32, device=x.device)
    has_templates = templates is not None
    rows_out = (
        torch.empty(count, dtype=torch.int8, device=x.device) if has_templates else None
    )
    dummy = row_scales
    # read at each launch: benchmarks/speed_gpu.py sweeps them on _triton
    rows_per_program = _triton.NORM_ROWS
    block, warps = launch_config(width, rows_per_program, _triton.ELEMENTS_PER_THREAD)
    grid = (triton_cdiv(count, rows_per_program),)
    _triton.norm_templates_quant_kernel[grid](
        x2,
        weight,
        templates.contiguous() if has_templates else dummy,
        kinds.reshape(-1) if has_templates else dummy,
        rows.reshape(-1).view(torch.int8) if rows is not None else dummy,
        threshold if threshold is not None else dummy,
        scale if scale is not None else dummy,
        codes,
        row_scales,
        rows_out if has_templates else dummy,
        count,
        width,
        x2.stride(0),
        codes.stride(0),
        eps,
        weight_offset,
        ROWS=rows_per_program,
        BLOCK=block,
        HAS_TEMPLATES=has_templates,
        HAS_ROWS_IN=rows is not None,
        HAS_THRESHOLD=threshold is not None,
        DYNAMIC=scale is None,
        IS_FP8=code_dtype == torch.float8_e4m3fn,
        QMAX=qmax,
        num_warps=warps,
    )
    return QuantizedRows(
        codes, row_scales, rows_out.view(torch.bool) if has_templates else None
    )


def silu_mul_quant_reference(
    gate_up: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    exact_gate_up: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    code_dtype: torch.dtype = torch.float8_e4m3fn,
) -> QuantizedRows:
    """Eager reference of :func:`silu_mul_quant` (same arguments)."""
    _check_glu(gate_up, rows, exact_gate_up, kinds)
    dtype = gate_up.dtype
    gate_up = _rows_2d(gate_up).float()
    if exact_gate_up is not None:
        carriers = rows.reshape(-1).bool().unsqueeze(-1)
        # read in the activations' dtype, as the kernel reads them
        exact = exact_gate_up.to(dtype).float()[kinds.reshape(-1)]
        gate_up = torch.where(carriers, exact, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    zeroed = None
    if threshold is not None:
        zeroed = hidden.abs().amax(-1) > threshold.float()
        if rows is not None:
            zeroed = zeroed | rows.reshape(-1).bool()
        hidden = hidden.masked_fill(zeroed.unsqueeze(-1), 0.0)
    codes, row_scales = _quantize_reference(hidden, scale, code_dtype)
    return QuantizedRows(codes, row_scales, zeroed)


def _check_glu(gate_up, rows, exact_gate_up, kinds) -> None:
    if gate_up.shape[-1] % 2:
        raise ValueError("gate_up must hold gate then up: an even last dimension")
    if exact_gate_up is not None and (rows is None or kinds is None):
        raise ValueError("exact_gate_up needs rows (the carriers) and kinds")


def silu_mul_quant(
    gate_up: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    exact_gate_up: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    code_dtype: torch.dtype = torch.float8_e4m3fn,
) -> QuantizedRows:
    """``SiLU(gate) * up`` quantized for ``down_proj``, in one pass.

    :param gate_up: (..., 2N) the fused gate/up product, gate first
    :param scale: device scalar static scale; ``None`` for dynamic per-token
    :param rows: (...,) bool carrier rows (their norm output was a template)
    :param exact_gate_up: (kinds, 2N) gate/up rows of each kind's template through
        the unquantized-input linears; carriers take them instead of ``gate_up``,
        read in ``gate_up``'s dtype (store them so, or they are cast per call)
    :param kinds: (...,) integer spike kind of each row
    :param threshold: device scalar; when given this is a ``down_proj`` spike site:
        rows over it, and the carriers, are zeroed and returned as ``rows``
    :param code_dtype: ``torch.float8_e4m3fn`` or ``torch.int8``
    """
    if not uses_triton(gate_up):
        return silu_mul_quant_reference(
            gate_up, scale, rows=rows, exact_gate_up=exact_gate_up, kinds=kinds,
            threshold=threshold, code_dtype=code_dtype,
        )  # fmt: skip
    from iq_transform.kernels import _triton

    _check_glu(gate_up, rows, exact_gate_up, kinds)
    qmax = _qmax(code_dtype)
    g2 = _rows_2d(gate_up)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    count, width = g2.shape[0], g2.shape[1] // 2
    codes = torch.empty(count, width, dtype=code_dtype, device=g2.device)
    row_scales = torch.empty(count, 1, dtype=torch.float32, device=g2.device)
    zeroed = (
        torch.empty(count, dtype=torch.int8, device=g2.device)
        if threshold is not None
        else None
    )
    dummy = row_scales
    block, warps = launch_config(width)
    _triton.silu_mul_quant_kernel[(count,)](
        g2,
        # in the activations' dtype: the kernel picks one of the two row pointers
        exact_gate_up.to(g2.dtype).contiguous() if exact_gate_up is not None else dummy,
        kinds.reshape(-1) if kinds is not None else dummy,
        rows.reshape(-1).view(torch.int8) if rows is not None else dummy,
        threshold if threshold is not None else dummy,
        scale if scale is not None else dummy,
        codes,
        row_scales,
        zeroed if zeroed is not None else dummy,
        width,
        g2.stride(0),
        codes.stride(0),
        BLOCK=block,
        HAS_ROWS_IN=rows is not None,
        HAS_EXACT=exact_gate_up is not None,
        HAS_THRESHOLD=threshold is not None,
        DYNAMIC=scale is None,
        IS_FP8=code_dtype == torch.float8_e4m3fn,
        QMAX=qmax,
        num_warps=warps,
    )
    return QuantizedRows(
        codes, row_scales, zeroed.view(torch.bool) if zeroed is not None else None
    )


def quantize_rows_reference(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    code_dtype: torch.dtype = torch.float8_e4m3fn,
) -> QuantizedRows:
    """Eager reference of :func:`quantize_rows`."""
    codes, row_scales = _quantize_reference(_rows_2d(x).float(), scale, code_dtype)
    return QuantizedRows(codes, row_scales, None)


def quantize_rows(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    code_dtype: torch.dtype = torch.float8_e4m3fn,
) -> QuantizedRows:
    """Static per-tensor (``scale`` a device scalar) or dynamic per-token
    (``scale=None``) quantization of ``x`` (..., K), one pass."""
    if not uses_triton(x):
        return quantize_rows_reference(x, scale, code_dtype=code_dtype)
    from iq_transform.kernels import _triton

    qmax = _qmax(code_dtype)
    x2 = _rows_2d(x)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    count, width = x2.shape
    codes = torch.empty(count, width, dtype=code_dtype, device=x.device)
    row_scales = torch.empty(count, 1, dtype=torch.float32, device=x.device)
    block, warps = launch_config(width)
    _triton.quant_kernel[(count,)](
        x2,
        scale if scale is not None else row_scales,
        codes,
        row_scales,
        width,
        x2.stride(0),
        codes.stride(0),
        BLOCK=block,
        DYNAMIC=scale is None,
        IS_FP8=code_dtype == torch.float8_e4m3fn,
        QMAX=qmax,
        num_warps=warps,
    )
    return QuantizedRows(codes, row_scales, None)


def replace_rows(
    output: torch.Tensor,
    rows: torch.Tensor,
    kinds: torch.Tensor,
    constants: torch.Tensor,
) -> torch.Tensor:
    """``output[rows] = constants[kinds[rows]]`` in place, decided on the device.

    :param output: (M, N) a product's output
    :param rows: (M,) bool rows to overwrite
    :param kinds: (M,) integer kind of each row
    :param constants: (kinds, N) the rows' precomputed values
    """
    if not uses_triton(output):
        values = constants.to(output.dtype)[kinds.reshape(-1)]
        return output.copy_(torch.where(rows.reshape(-1, 1), values, output))
    from iq_transform.kernels import _triton

    if output.stride(-1) != 1 or not constants.is_contiguous():
        raise ValueError("replace_rows needs row-major output and constants")
    count, width = output.shape
    block, warps = launch_config(width)
    _triton.replace_rows_kernel[(count,)](
        output,
        rows.reshape(-1).view(torch.int8),
        kinds.reshape(-1),
        constants,
        width,
        output.stride(0),
        BLOCK=block,
        num_warps=warps,
    )
    return output
