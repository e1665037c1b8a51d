"""Which rows are spike rows, decided in one launch on the device.

:func:`iq_transform.spikefree.detect.spike_token_mask` followed by ``| also`` and the
runtime's running "rows handled in this forward" is seven to ten small torch ops
per site (median, products, comparisons, ors); on a GPU each costs a launch and
its host dispatch, which is what the runtime's overhead is made of. This Triton
kernel runs one program per sequence over the per-token max |x| (computed by one
``vector_norm`` before it): the median of the valid tokens (sorted in registers),
the ratio and threshold tests, the padding mask, the extra rows and the running
record, in one launch, with the same float32 arithmetic as the torch reference.
The host never reads a result, so nothing waits and a CUDA graph can capture it.
Sequences too short for a median (a decode step) skip the ``vector_norm``:
:func:`detect_rows` reads the activations themselves, one program per row, and
zeroes the spike rows of a ``down_proj`` input in the same pass. Where Triton is
missing (or the tensor is not on CUDA, unless
``TRITON_INTERPRET=1``), :func:`row_decider` says so and the runtime keeps the torch
ops.
"""

from __future__ import annotations

import functools

import torch

from iq_transform.spikefree.detect import MIN_TOKENS_FOR_MEDIAN
from iq_transform.spikefree.row_writes import int8_bytes, row_block, triton_runs_on
from iq_transform.spikefree.triton_launch import FastLaunch

__all__ = ["MAX_TOKENS", "decide_rows", "detect_rows", "row_decider", "row_detector"]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# one program sorts its sequence in registers: longer sequences take the torch ops
MAX_TOKENS = 16384

if triton is not None:

    @triton.jit
    def _decide_rows_kernel(
        token_max_ptr,
        valid_ptr,
        threshold_ptr,
        also_ptr,
        previous_max_ptr,
        previous_rows_ptr,
        rows_ptr,
        record_ptr,
        tokens,
        ratio,
        keep_share,
        HAS_VALID: tl.constexpr,
        MEDIAN: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr,
        THRESHOLD_WITHOUT_MEDIAN_ONLY: tl.constexpr,
        HAS_PREVIOUS: tl.constexpr,
        HAS_ALSO: tl.constexpr,
        RECORD: tl.constexpr,
        MIN_TOKENS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        sequence = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < tokens
        at = sequence * tokens + offsets
        values = tl.load(token_max_ptr + at, mask=inside, other=0.0).to(tl.float32)
        valid = inside
        if HAS_VALID:
            valid = valid & (tl.load(valid_ptr + at, mask=inside, other=0) != 0)
        spikes = offsets < 0  # all False
        count = tl.sum(valid.to(tl.int32), axis=0)
        if MEDIAN:
            # torch's median of an even count is the lower middle value
            ordered = tl.sort(tl.where(valid, values, float("inf")))
            middle = (count - 1) // 2
            median = tl.sum(tl.where(offsets == middle, ordered, 0.0), axis=0)
            spikes = (values > ratio * median) & (count >= MIN_TOKENS)
        if HAS_THRESHOLD:
            over = values > tl.load(threshold_ptr)
            if THRESHOLD_WITHOUT_MEDIAN_ONLY and MEDIAN:
                over = over & (count < MIN_TOKENS)
            spikes = spikes | over
        if HAS_PREVIOUS:
            carried = tl.load(previous_rows_ptr + at, mask=inside, other=0) != 0
            previous = tl.load(previous_max_ptr + at, mask=inside, other=0.0)
            spikes = spikes | (
                carried & (values >= keep_share * previous.to(tl.float32))
            )
        spikes = spikes & valid
        if HAS_ALSO:
            spikes = spikes | (tl.load(also_ptr + at, mask=inside, other=0) != 0)
        tl.store(rows_ptr + at, spikes.to(tl.int8), mask=inside)
        if RECORD:
            seen = tl.load(record_ptr + at, mask=inside, other=0) != 0
            tl.store(record_ptr + at, (seen | spikes).to(tl.int8), mask=inside)

    @triton.jit
    def _detect_rows_kernel(
        x_ptr,
        valid_ptr,
        threshold_ptr,
        also_ptr,
        rows_ptr,
        record_ptr,
        out_ptr,
        kinds_ptr,
        values_ptr,
        N: tl.constexpr,
        OUT_N: tl.constexpr,
        HAS_VALID: tl.constexpr,
        HAS_ALSO: tl.constexpr,
        RECORD: tl.constexpr,
        ZERO: tl.constexpr,
        WRITE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # one program per row: max |x|, the threshold test, and the row zeroed
        # in place where it is a spike row (the down_proj input), or its kind's
        # values written into the same row of another tensor (the norm's output,
        # or down_proj's, OUT_N wide)
        row = tl.program_id(0).to(tl.int64)
        peak = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * N + cols, mask=cols < N, other=0.0)
            peak = tl.maximum(peak, tl.abs(x.to(tl.float32)))
        flagged = tl.max(peak, axis=0) > tl.load(threshold_ptr)
        if HAS_VALID:
            flagged = flagged & (tl.load(valid_ptr + row) != 0)
        if HAS_ALSO:
            flagged = flagged | (tl.load(also_ptr + row) != 0)
        tl.store(rows_ptr + row, flagged.to(tl.int8))
        if RECORD:
            seen = tl.load(record_ptr + row) != 0
            tl.store(record_ptr + row, (seen | flagged).to(tl.int8))
        if ZERO:
            zeros = tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty)
            spread = (tl.zeros([BLOCK], dtype=tl.int32) + flagged.to(tl.int32)) != 0
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(x_ptr + row * N + cols, zeros, mask=(cols < N) & spread)
        if WRITE:
            kind = tl.load(kinds_ptr + row).to(tl.int64)
            spread = (tl.zeros([BLOCK], dtype=tl.int32) + flagged.to(tl.int32)) != 0
            for start in range(0, OUT_N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                keep = (cols < OUT_N) & spread
                values = tl.load(values_ptr + kind * OUT_N + cols, mask=keep)
                tl.store(
                    out_ptr + row * OUT_N + cols,
                    values.to(out_ptr.dtype.element_ty),
                    mask=keep,
                )

    _DECIDE_ROWS = FastLaunch(_decide_rows_kernel)
    _DETECT_ROWS = FastLaunch(_detect_rows_kernel)


def decide_rows(
    token_max: torch.Tensor,
    ratio: float,
    valid: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    also: torch.Tensor | None = None,
    record: torch.Tensor | None = None,
    threshold_without_median_only: bool = False,
    previous: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``spike_token_mask(token_max, ratio, valid, threshold,
    threshold_without_median_only, carried) | also``, in one launch, where
    ``carried`` is ``previous_rows & (token_max >= keep_share * previous_max)``.

    :param token_max: (batch, tokens) per-token max |x|, any float dtype, contiguous
    :param ratio: spike ratio to the median token max of a sequence
    :param valid: optional bool (batch, tokens) real-token mask
    :param threshold: optional float32 scalar tensor on the same device
    :param also: optional bool (batch, tokens) rows that are spike rows regardless
    :param record: optional bool (batch, tokens) that the result is or-ed into, in
        place (the runtime's rows handled in this forward)
    :param threshold_without_median_only: ``threshold`` decides only sequences with
        too few valid tokens for a median
    :param previous: ``(previous_max, previous_rows, keep_share)``: the previous
        layer's per-token max (batch, tokens) and spike rows; those rows stay spike
        rows while their max keeps ``keep_share`` of the previous one
    :return: bool (batch, tokens)
    """
    batch, tokens = token_max.shape
    previous_max, previous_rows, keep_share = previous or (None, None, 0.0)
    rows = torch.empty(batch, tokens, dtype=torch.bool, device=token_max.device)
    dummy = rows  # never read where its flag is off
    _DECIDE_ROWS(
        (batch,),
        (
            token_max,
            dummy if valid is None else int8_bytes(valid),
            dummy if threshold is None else threshold,
            dummy if also is None else int8_bytes(also),
            dummy if previous is None else previous_max,
            dummy if previous is None else int8_bytes(previous_rows),
            int8_bytes(rows),
            dummy if record is None else int8_bytes(record),
            tokens,
            float(ratio),
            float(keep_share),
        ),
        {
            "HAS_VALID": valid is not None,
            "MEDIAN": tokens >= MIN_TOKENS_FOR_MEDIAN,
            "HAS_THRESHOLD": threshold is not None,
            "THRESHOLD_WITHOUT_MEDIAN_ONLY": threshold_without_median_only,
            "HAS_PREVIOUS": previous is not None,
            "HAS_ALSO": also is not None,
            "RECORD": record is not None,
            "MIN_TOKENS": MIN_TOKENS_FOR_MEDIAN,
            "BLOCK": triton.next_power_of_2(tokens),
        },
        num_warps=4 if tokens <= 2048 else 8,
    )
    return rows


def detect_rows(
    hidden: torch.Tensor,
    threshold: torch.Tensor,
    valid: torch.Tensor | None = None,
    also: torch.Tensor | None = None,
    record: torch.Tensor | None = None,
    zero: bool = False,
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """For sequences too short for a median (decode steps): ``(max |x| >
    threshold) & valid | also`` straight from the activations, in one launch, the
    spike rows zeroed in place where ``zero``, or ``write``'s values written into
    them.

    :param hidden: (batch, tokens, features) contiguous activations
    :param threshold: float32 scalar tensor on the same device
    :param valid: optional bool (batch, tokens) real-token mask
    :param also: optional bool (batch, tokens) rows that are spike rows regardless
    :param record: optional bool (batch, tokens) or-ed with the result in place
    :param zero: set the spike rows of ``hidden`` to zero
    :param write: ``(output, kinds, values)``: ``output[rows] =
        values[kinds[rows]]`` in place, where ``output`` is contiguous (batch,
        tokens, any width: a norm's output, or ``down_proj``'s from the
        ``down_proj`` input), ``kinds`` long (batch, tokens) and ``values`` (kinds,
        output width) in ``output``'s dtype
    :return: bool (batch, tokens)
    """
    batch, tokens, width = hidden.shape
    rows = torch.empty(batch, tokens, dtype=torch.bool, device=hidden.device)
    dummy = rows  # never read where its flag is off
    launch = _detect_rows_launch(
        width,
        width if write is None else write[0].shape[-1],
        valid is not None,
        also is not None,
        record is not None,
        zero,
        write is not None,
    )
    launch(
        (batch * tokens,),
        (
            hidden,
            dummy if valid is None else int8_bytes(valid),
            threshold,
            dummy if also is None else int8_bytes(also),
            int8_bytes(rows),
            dummy if record is None else int8_bytes(record),
            *((hidden, dummy, dummy) if write is None else write),
        ),
    )
    return rows


@functools.cache  # a few combinations per model: bound once each
def _detect_rows_launch(
    width: int,
    out_width: int,
    has_valid: bool,
    has_also: bool,
    record: bool,
    zero: bool,
    write: bool,
):
    """The detection kernel's launch for rows of ``width`` and these arguments."""
    block, warps = row_block(width)
    constants = {
        "N": width,
        "OUT_N": out_width,
        "HAS_VALID": has_valid,
        "HAS_ALSO": has_also,
        "RECORD": record,
        "ZERO": zero,
        "WRITE": write,
        "BLOCK": block,
    }
    return _DETECT_ROWS.bind(constants, num_warps=warps)


def row_detector(hidden: torch.Tensor):
    """:func:`detect_rows` where it can run on ``hidden`` (a short sequence on
    CUDA), else ``None``."""
    if not triton_runs_on(hidden) or hidden.dim() != 3 or not hidden.is_contiguous():
        return None
    if hidden.shape[1] >= MIN_TOKENS_FOR_MEDIAN:
        return None
    if hidden.requires_grad and torch.is_grad_enabled():
        return None
    return detect_rows


def row_decider(token_max: torch.Tensor):
    """:func:`decide_rows` where it can run on ``token_max``, else ``None``."""
    if not triton_runs_on(token_max) or token_max.dim() != 2:
        return None
    if token_max.shape[-1] > MAX_TOKENS or not token_max.is_contiguous():
        return None
    return decide_rows
