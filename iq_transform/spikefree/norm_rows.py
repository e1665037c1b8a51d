"""A norm that writes its own template rows: RMSNorm and the spike rows' templates
in one pass over the activations, output in their dtype.

The runtime's fake-quantized path hooks the norms that feed templated linears:
the model's own RMSNorm is eight small ops (eight launches on a GPU) and the
insertion after it one more. :func:`fused_norm_templates` is all of it in one
Triton kernel where Triton runs (CUDA; CPU tensors under ``TRITON_INTERPRET=1``)
and, elsewhere, its torch reference with transformers' own arithmetic for the
two norm forms (Llama's: the weight times the normalized rows cast to the dtype;
Gemma's: float32 throughout, times ``1 + w``, cast once). A decode step's
detection of the layer input's spike rows runs in the same pass (the first norm
reads the layer input itself). Nothing is read on the host, so nothing waits and
a CUDA graph can capture it.

The Triton helpers :func:`loaded_norm_rows`, :func:`rms_normalized` and
:func:`with_template_rows` are the loads, the norm and the insertion of every fused
norm kernel, and :func:`launch_config` and :func:`check_templates` their launch
shape and argument checks: the FP8 execution path's norm + quantization kernel
(:mod:`iq_transform.kernels.fused_norm`) uses them too (the method may not import
the execution paths, so the shared pieces live here).
"""

from __future__ import annotations

import functools

import torch

from iq_transform.spikefree.row_writes import int8_bytes, triton_runs_on
from iq_transform.spikefree.triton_launch import FastLaunch

__all__ = [
    "check_templates",
    "fused_norm_templates",
    "fused_norm_templates_reference",
    "launch_config",
    "loaded_norm_rows",
    "rms_normalized",
    "with_template_rows",
]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# rows per program of the norm kernels: the weight is loaded once for all of them
NORM_ROWS = 4
# elements per thread per row: measured on the H200 (benchmarks/speed_gpu.py)
ELEMENTS_PER_THREAD = 16


@functools.cache  # asked at every launch, for a few widths
def launch_config(
    width: int, rows: int = 1, per_thread: int = ELEMENTS_PER_THREAD
) -> tuple[int, int]:
    """(BLOCK, num_warps) for programs of ``rows`` rows of ``width`` elements: the
    launch shape of every row kernel, the fused norms' and the FP8 path's.

    :param width: elements in a row (one block holds the whole row)
    :param rows: rows per program
    :param per_thread: elements of a row per thread
    :return: the power of two block and the warps (1 to 16) that cover it
        (only where Triton is installed)
    """
    block = triton.next_power_of_2(width)
    return block, max(1, min(16, rows * block // (32 * per_thread)))


if triton is not None:

    @triton.jit
    def rms_normalized(x, K, eps):
        """(ROWS, BLOCK) float32 rows over their root mean square (masked
        columns loaded as 0 count for nothing)."""
        mean_square = tl.sum(x * x, axis=1) / K
        return x * tl.rsqrt(mean_square + eps)[:, None]

    @triton.jit
    def loaded_norm_rows(x_ptr, weight_ptr, M, K, stride_x, weight_offset,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """This program's ``ROWS`` rows of ``x`` in float32 and the norm's weight
        plus its offset, (1, BLOCK) float32, loaded once for all of them: the
        loads of every fused norm kernel. Returns ``rows, row_mask, cols, mask,
        x, w``; masked elements load as 0."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_mask = rows < M
        cols = tl.arange(0, BLOCK)
        col_mask = cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0
        ).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        return rows, row_mask, cols, mask, x, (w + weight_offset)[None, :]

    @triton.jit
    def with_template_rows(y, w, templates_ptr, kinds_ptr, rows, row_mask, cols, mask,
                           flag, K):  # fmt: skip
        """``y`` with the rows whose ``flag`` is set replaced by their kind's
        template times ``w``: the one insertion of the fused norm kernels. A
        row not flagged loads no template."""
        templated = flag != 0
        kind = tl.load(kinds_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        template = tl.load(
            templates_ptr + kind[:, None] * K + cols[None, :],
            mask=mask & templated[:, None],
            other=0.0,
        )
        return tl.where(templated[:, None], template.to(tl.float32) * w, y), templated

    @triton.jit
    def _norm_rows_kernel(
        x_ptr,
        weight_ptr,
        templates_ptr,
        kinds_ptr,
        rows_in_ptr,
        threshold_ptr,
        valid_ptr,
        record_ptr,
        out_ptr,
        rows_out_ptr,
        M,
        K,
        eps,
        weight_offset,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_TEMPLATES: tl.constexpr,
        HAS_ROWS_IN: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr,
        HAS_VALID: tl.constexpr,
        RECORD: tl.constexpr,
        CAST_BEFORE_WEIGHT: tl.constexpr,
    ):
        # x is contiguous: its row stride is K
        rows, row_mask, cols, mask, x, w = loaded_norm_rows(
            x_ptr, weight_ptr, M, K, K, weight_offset, ROWS, BLOCK
        )
        normalized = rms_normalized(x, K, eps)
        if CAST_BEFORE_WEIGHT:  # Llama's norm: normalized rows in the dtype first
            normalized = normalized.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = normalized * w
        if HAS_TEMPLATES:
            flag = tl.zeros([ROWS], dtype=tl.int32)
            if HAS_ROWS_IN:
                flag = tl.load(rows_in_ptr + rows, mask=row_mask, other=0)
                flag = flag.to(tl.int32)
            if HAS_THRESHOLD:
                over = tl.max(tl.abs(x), axis=1) > tl.load(threshold_ptr)
                if HAS_VALID:  # padding is never a spike row
                    valid = tl.load(valid_ptr + rows, mask=row_mask, other=0) != 0
                    over = over & valid
                flag = flag | over.to(tl.int32)
            y, templated = with_template_rows(
                y, w, templates_ptr, kinds_ptr, rows, row_mask, cols, mask, flag, K
            )
            if HAS_THRESHOLD:
                tl.store(rows_out_ptr + rows, templated.to(tl.int8), mask=row_mask)
            if RECORD:  # the rows handled in this forward, or-ed in place
                seen = tl.load(record_ptr + rows, mask=row_mask, other=0) != 0
                handled = (seen | templated).to(tl.int8)
                tl.store(record_ptr + rows, handled, mask=row_mask)
        at = rows[:, None] * K + cols[None, :]
        tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=mask)

    _NORM_ROWS = FastLaunch(_norm_rows_kernel)


@functools.cache  # a few combinations per model: bound once each
def _norm_rows_launch(
    width: int,
    has_templates: bool,
    has_rows: bool,
    has_threshold: bool,
    has_valid: bool,
    record: bool,
    cast_before_weight: bool,
):
    """The norm kernel's launch for rows of ``width`` and these arguments."""
    block, warps = launch_config(width, NORM_ROWS)
    constants = {
        "ROWS": NORM_ROWS,
        "BLOCK": block,
        "HAS_TEMPLATES": has_templates,
        "HAS_ROWS_IN": has_rows,
        "HAS_THRESHOLD": has_threshold,
        "HAS_VALID": has_valid,
        "RECORD": record,
        "CAST_BEFORE_WEIGHT": cast_before_weight,
    }
    return _NORM_ROWS.bind(constants, num_warps=warps)


def check_templates(
    templates: torch.Tensor | None,
    kinds: torch.Tensor | None,
    rows: torch.Tensor | None,
    threshold: torch.Tensor | None,
    width: int,
) -> None:
    """Raise ``ValueError`` unless the template arguments of a fused norm agree:
    ``rows``/``threshold`` select rows only with ``templates``, which need
    ``kinds`` and a selection and must be (kinds, ``width``). Reads no device data.

    :param templates: (kinds, width) templates, or ``None``
    :param kinds: the spike kind of each row, or ``None``
    :param rows: bool rows to template, or ``None``
    :param threshold: device scalar threshold, or ``None``
    :param width: the rows' width (the activations' last dimension)
    """
    if templates is None:
        if rows is not None or threshold is not None:
            raise ValueError("rows/threshold select template rows: pass templates too")
        return
    if kinds is None or (rows is None and threshold is None):
        raise ValueError(
            "templates need kinds (one per row) and rows and/or a threshold that "
            "select the rows to overwrite"
        )
    if templates.dim() != 2 or templates.shape[1] != width:
        raise ValueError(
            f"templates must be (kinds, {width}), got {tuple(templates.shape)}"
        )


def _check(
    x, weight, weight_offset, templates, kinds, rows, threshold, cast_before_weight
):
    check_templates(templates, kinds, rows, threshold, x.shape[-1])
    if cast_before_weight and weight_offset:
        raise ValueError(
            "cast_before_weight is Llama's norm (weight times the normalized rows in "
            "the output dtype): it has no weight offset"
        )
    if cast_before_weight and weight.dtype != x.dtype:
        raise ValueError(
            f"Llama's norm with a {weight.dtype} weight on {x.dtype} activations "
            "returns the promoted dtype: cast the norm to the activations' dtype"
        )


def fused_norm_templates_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    weight_offset: float = 0.0,
    templates: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    record: torch.Tensor | None = None,
    cast_before_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager reference of :func:`fused_norm_templates`: the transformers norms'
    own arithmetic, then the runtime's template rows."""
    _check(x, weight, weight_offset, templates, kinds, rows, threshold,
           cast_before_weight)  # fmt: skip
    hidden = x.float()
    normalized = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        y = weight * normalized.to(x.dtype)
    else:
        y = (normalized * (weight.float() + weight_offset)).to(x.dtype)
    if templates is None:
        return y, None
    templated = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    if threshold is not None:
        over = hidden.abs().amax(-1) > threshold.float()
        templated = over if valid is None else over & valid
    if rows is not None:
        templated = templated | rows
    if record is not None:
        record |= templated
    values = (templates.float() * (weight.float() + weight_offset)).to(x.dtype)
    y = torch.where(templated.unsqueeze(-1), values[kinds], y)
    return y, templated if threshold is not None else None


def fused_norm_templates(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    weight_offset: float = 0.0,
    templates: torch.Tensor | None = None,
    kinds: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    record: torch.Tensor | None = None,
    cast_before_weight: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm with the template rows of spike tokens, in ``x``'s dtype, one pass.

    Row ``i`` is the norm of ``x_i``, or ``templates[kinds[i]] * (weight +
    weight_offset)`` where ``rows[i]`` is set or (a decode step's detection, in
    the same pass) ``max|x_i| > threshold`` on a ``valid`` row. The kernel's rows
    equal the reference's up to the last bits of the norm (reduction order,
    ``rsqrt``); template rows are exact.

    :param x: (..., K) activations, contiguous
    :param weight: (K,) the norm's weight
    :param eps: the norm's epsilon
    :param weight_offset: 1.0 for Gemma's ``(1 + w)`` norms
    :param templates: (kinds, K) float32 pre-weight templates, or ``None``
    :param kinds: (...,) integer spike kind of each row (with ``templates``)
    :param rows: (...,) bool rows to template
    :param threshold: device scalar: rows whose max |x| exceeds it are templated
    :param valid: (...,) bool real tokens (with ``threshold``): padding never is
    :param record: (...,) bool the templated rows are or-ed into, in place
    :param cast_before_weight: Llama's form: the normalized rows are cast to
        ``x``'s dtype before the weight multiplies them (Gemma's multiplies in
        float32 and casts once)
    :return: the output, and with ``threshold`` the templated rows (else ``None``)
    """
    if not triton_runs_on(x):
        return fused_norm_templates_reference(
            x, weight, eps, weight_offset=weight_offset, templates=templates,
            kinds=kinds, rows=rows, threshold=threshold, valid=valid, record=record,
            cast_before_weight=cast_before_weight,
        )  # fmt: skip
    # the hot path of every norm of every layer: checks that read no device data
    _check(x, weight, weight_offset, templates, kinds, rows, threshold,
           cast_before_weight)  # fmt: skip
    width = x.shape[-1]
    count = x.numel() // width
    x = x if x.is_contiguous() else x.contiguous()
    output = torch.empty_like(x)
    detected = None
    if threshold is not None:  # (kinds has the rows' shape: the faster allocation)
        detected = torch.empty_like(
            kinds, dtype=torch.int8, memory_format=torch.contiguous_format
        )
    has_templates = templates is not None
    launch = _norm_rows_launch(
        width,
        has_templates,
        rows is not None,
        threshold is not None,
        valid is not None,
        record is not None,
        cast_before_weight,
    )
    launch(
        (-(-count // NORM_ROWS),),
        (
            x,
            weight,
            templates.contiguous() if has_templates else x,
            kinds.contiguous() if has_templates else x,
            x if rows is None else int8_bytes(rows),
            x if threshold is None else threshold,
            x if valid is None else int8_bytes(valid),
            x if record is None else int8_bytes(record),
            output,
            x if detected is None else detected,
            count,
            width,
            eps,
            float(weight_offset),
        ),
    )
    return output, None if detected is None else detected.view(torch.bool)
