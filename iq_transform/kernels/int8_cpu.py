"""Run a static per-tensor W8A8 INT8 model in real int8 CPU kernels.

After ``oneshot`` (or loading a saved checkpoint) every quantized Linear still
computes in float: compressed-tensors fake-quantizes its input and weight.
:func:`to_int8_cpu` gives each one an int8 forward instead: the input is quantized
with its calibrated static scale (one fused pass), the product runs in oneDNN's
int8 GEMM (AMX / VNNI on x86) and is dequantized by the same kernel with the
per-channel weight scales. The spike-free runtime stays exact: the rows it
replaces by templates get outputs computed once here, at full precision, from the
templates (``template_outputs``), so spike rows are never quantized.

An online input rotation (QuIP) moves from its forward pre-hook into the kernel,
which rotates the float input before quantizing it: by the rotation's Kronecker
factors where it has them (:mod:`~iq_transform.kernels.rotations`), once for
siblings that read the same input through the same rotation.

On CPUs without VNNI the GEMM adds pairs of u8 x s8 products in 16 bits and clips
them; there a linear with 8-bit weights multiplies its codes split in two halves
(exact, twice the work), and one with 7-bit weights (a W7A8 recipe) runs as is.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from compressed_tensors.quantization.lifecycle.forward import quantize
from loguru import logger
from torch import nn

from iq_transform.kernels.rotations import (
    input_changing_hooks,
    input_rotation,
    kernel_rotation,
    rotation_matrix,
)
from iq_transform.models.arch import UnknownArchitectureError, get_arch_spec
from iq_transform.models.offload import is_offloaded, move_model
from iq_transform.spikefree.exact_rows import through_pre_hooks
from iq_transform.spikefree.runtime import get_runtime, write_count

__all__ = [
    "EXECUTABLE",
    "Int8ExecutionError",
    "Int8SiblingLinears",
    "Int8StaticLinear",
    "cpu_computes_bf16",
    "executed_kernels",
    "fbgemm_available",
    "fbgemm_linear",
    "fbgemm_prepack",
    "fbgemm_products_saturate",
    "int8_gemm",
    "is_int8_executed",
    "kernel_of",
    "products_saturate",
    "split_in_halves",
    "to_int8_cpu",
    "u8_products_saturate",
]

EXECUTABLE = (
    "static per-tensor symmetric INT8 activations with symmetric INT weights of "
    "at most 8 bits (per channel or per tensor), i.e. a W8A8 static recipe such as "
    "recipes/w8a8_static_spikefree.yaml (or W7A8: recipes/w7a8_static_spikefree.yaml)"
)
_EXECUTED_ATTRIBUTE = "_iq_int8_cpu"
# u8 activation codes are the int8 ones plus this (see Int8StaticLinear.__call__)
ACTIVATION_ZERO_POINT = 128
SIGN_BIT = 0x80
# a u8 code split in two halves of at most 128 each (see u8_products_saturate)
HALF_CODE = 128
HALVES_ZERO_POINT = ACTIVATION_ZERO_POINT // 2
# no pair of u8 x s8 products overflows 16 bits where no weight code exceeds this
# in magnitude: 2 * 255 * 64 = 32,640 (7-bit weights: codes from -64 to 63)
PAIR_SAFE_WEIGHT_CODE = 64
# inputs of at most this many rows (decode steps) go to FBGEMM's static int8 linear:
# at one row oneDNN's GEMM costs 206-219 us a call, FBGEMM's 84-110, and the two
# meet near 64 rows (benchmarks/onednn_int8_paths.py on an AVX2 EPYC)
SMALL_GEMM_ROWS = 64
# its fused per-tensor quantization is the fastest CPU path in torch 2.13 (pinned);
# deprecated there (torch is pinned), so its warning is not repeated to users
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", module=__name__)


class Int8ExecutionError(ValueError):
    """The model cannot be executed in int8 CPU kernels as it is."""


def is_int8_executed(model: nn.Module) -> bool:
    """Whether :func:`to_int8_cpu` has converted ``model``."""
    return bool(getattr(model, _EXECUTED_ATTRIBUTE, False))


def _pairs_saturate(product: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether an int8 GEMM adds pairs of u8 x s8 products in 16 bits, saturating:
    without VNNI (AVX2, AVX-512 before Cascade Lake, Zen 2-3) x86 multiplies with
    ``vpmaddubsw``, whose pair sums reach 2 * 255 * 127 and are clipped at 32767,
    so the results are wrong, not merely rounded. Found by one small product whose
    every pair saturates there (codes 127 against weights 127), not by reading CPU
    flags: it is what the kernel does that matters.

    :param product: the GEMM to test: given (out, in) int8 weight codes, its (1,
        out) float32 output for one input row of codes 127 (u8 255, zero point
        128), all scales 1
    """
    inputs, weights = 64, 8
    result = product(torch.full((weights, inputs), 127, dtype=torch.int8))
    return bool(result[0, 0] != inputs * 127 * 127)


def _onednn_product(weight_codes: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.onednn.qlinear_prepack(weight_codes, None)
    scale = torch.ones(len(weight_codes))
    codes = torch.full(
        (1, weight_codes.shape[1]), 127 + ACTIVATION_ZERO_POINT, dtype=torch.uint8
    )
    zero_points = torch.zeros_like(scale, dtype=torch.int32)
    return int8_gemm(
        codes, 1.0, ACTIVATION_ZERO_POINT, packed, scale, zero_points, None,
        torch.float32,
    )  # fmt: skip


def _fbgemm_product(weight_codes: torch.Tensor) -> torch.Tensor:
    packed = fbgemm_prepack(weight_codes, torch.ones(len(weight_codes)))
    return fbgemm_linear(torch.full((1, weight_codes.shape[1]), 127.0), 1.0, packed)


@functools.cache
def u8_products_saturate() -> bool:
    """Whether oneDNN's int8 GEMM on this CPU saturates pairs of products in 16
    bits (:func:`_pairs_saturate`)."""
    return _pairs_saturate(_onednn_product)


def fbgemm_available() -> bool:
    """Whether this torch build has FBGEMM's quantized engine (x86)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


@functools.cache
def fbgemm_products_saturate() -> bool:
    """Whether FBGEMM's static int8 linear saturates pairs of products in 16 bits
    (:func:`_pairs_saturate`): it picks its kernels apart from oneDNN (without
    AVX-512 VNNI it adds pairs in 16 bits even where oneDNN has AVX-VNNI)."""
    return _pairs_saturate(_fbgemm_product)


def fbgemm_prepack(
    codes: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
):
    """FBGEMM's packed (out, in) int8 ``codes`` with per-channel scales and bias."""
    weight = torch._make_per_channel_quantized_tensor(
        codes, weight_scale.double(), torch.zeros(len(codes), dtype=torch.long), 0
    )
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"  # the packing's engine, not x86's
    try:
        return torch.ops.quantized.linear_prepack(weight, bias)
    finally:
        torch.backends.quantized.engine = engine


def fbgemm_linear(x: torch.Tensor, input_scale: float, packed) -> torch.Tensor:
    """(rows, out) float32 product of float32 ``x`` (rows, in), quantized to u8
    codes with ``input_scale`` and zero point 128 (the same codes as
    :class:`Int8StaticLinear`'s), with FBGEMM's packed weight: int32 accumulation,
    dequantized by both scales, plus the bias."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x, input_scale, ACTIVATION_ZERO_POINT, packed
    )


def _pairs_fit_in_16_bits(weight_codes: torch.Tensor) -> bool:
    if weight_codes.numel() == 0:
        return True
    low, high = torch.aminmax(weight_codes)
    return max(-int(low), int(high)) <= PAIR_SAFE_WEIGHT_CODE


def products_saturate(
    weight_codes: torch.Tensor,
    pairs_saturate: Callable[[], bool] = u8_products_saturate,
) -> bool:
    """Whether a u8 x s8 GEMM on this CPU can saturate with these (out, in) int8
    weight codes: only where it adds pairs of products in 16 bits
    (``pairs_saturate``: oneDNN's :func:`u8_products_saturate`, or
    :func:`fbgemm_products_saturate`) and some code exceeds 64 in magnitude, as
    8-bit weights do; 7-bit weights (a W7A8 recipe) never saturate."""
    return pairs_saturate() and not _pairs_fit_in_16_bits(weight_codes)


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX); ``True``
    where torch cannot tell."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name, None) for name in checks]
    if any(check is None for check in found):
        return True
    return any(check() for check in found)


def int8_gemm(
    codes: torch.Tensor,
    input_scale: float,
    zero_point: int,
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    output_dtype: torch.dtype,
) -> torch.Tensor:
    """oneDNN's u8 x s8 GEMM of ``codes`` (rows, in) minus ``zero_point`` with the
    packed weight, int32 accumulation, dequantized by the two scales."""
    return torch.ops.onednn.qlinear_pointwise(
        codes,
        input_scale,
        zero_point,
        packed,
        weight_scale,
        weight_zero_point,
        bias,
        1.0,
        0,
        output_dtype,
        "none",
        [],
        "",
    )


def split_in_halves(codes: torch.Tensor) -> torch.Tensor:
    """(rows, 2 * in) u8 halves of u8 ``codes`` (rows, in): ``max(u - 128, 0)``,
    then ``min(u, 128)``. They add up to ``u`` and neither exceeds 128, so with the
    weight repeated along the inputs and zero point 64 the GEMM sums the same
    int32 terms, and every pair of products stays within 16 bits (from
    2 * 128 * -128 = -32768 to 2 * 128 * 127)."""
    rows, features = codes.shape
    halves = torch.empty(rows, 2 * features, dtype=torch.uint8)
    high, low = halves[:, :features], halves[:, features:]
    torch.clamp(codes, min=HALF_CODE, out=high)
    high.sub_(HALF_CODE)
    torch.clamp(codes, max=HALF_CODE, out=low)
    return halves


class Int8StaticLinear:
    """The int8 forward of one Linear: everything it needs, computed up front.

    The module's ``forward`` calls it (the module object, its hooks and its
    submodules stay), so the runtime's exact-row hooks keep working.

    :param bias: the Linear's (out,) bias, or ``None``
    :param input_scale: its static per-tensor input scale
    :param codes: (out, in) int8 weight codes
    :param weight_scale: (out,) float32 per-channel weight scales
    :param output_dtype: the dtype of the forward's output
    :param rotate: the online input rotation to apply before quantizing, or
        ``None``; one that returns its result in another order of the input
        features (its ``order``) gets the weight's columns in that order
    :param halves: multiply the activation codes split in two halves
        (:func:`split_in_halves`; exact, twice the int8 work) instead of as they
        are; ``None``: where the CPU's int8 GEMM would saturate with these weight
        codes (:func:`products_saturate`)
    :param small_rows: inputs of at most this many rows run in FBGEMM's static
        int8 linear (:func:`fbgemm_linear`), where it exists and does not saturate
        with these weight codes; 0: oneDNN always
    """

    def __init__(
        self,
        bias: torch.Tensor | None,
        input_scale: float,
        codes: torch.Tensor,
        weight_scale: torch.Tensor,
        output_dtype: torch.dtype,
        rotate: Callable | None = None,
        halves: bool | None = None,
        small_rows: int = SMALL_GEMM_ROWS,
    ):
        self.input_scale = input_scale
        self.out_features, self.in_features = codes.shape
        self.rotate = rotate
        order = getattr(rotate, "order", None)
        if order is not None:
            codes = codes[:, order].contiguous()
        self.halves = products_saturate(codes) if halves is None else halves
        self.bias = None if bias is None else bias.detach().float().clone()
        self.small_rows, self.small_packed = small_rows, None
        if (
            small_rows > 0
            and fbgemm_available()
            and not products_saturate(codes, fbgemm_products_saturate)
        ):
            # it takes the codes as floats (see product): both scales in the weight's
            scales = weight_scale.double() * input_scale
            self.small_packed = fbgemm_prepack(codes, scales, self.bias)
        if self.halves:
            codes = torch.cat([codes, codes], dim=1)
        self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        self.weight_scale = weight_scale
        self.weight_zero_point = torch.zeros_like(weight_scale, dtype=torch.int32)
        self.output_dtype = output_dtype
        # oneDNN writes a bf16 output from its fast int8 GEMM only where the CPU
        # computes in bf16; elsewhere (AVX2) its reference GEMM does, ~5,000x
        # slower (512x576 @ 576x1536 on an AVX2 EPYC: 15.3 s against 2.7 ms,
        # benchmarks/onednn_int8_paths.py): float32, then a cast
        native = output_dtype == torch.float32 or (
            output_dtype == torch.bfloat16 and cpu_computes_bf16()
        )
        self.gemm_dtype = output_dtype if native else torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x).reshape(*x.shape[:-1], self.out_features)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, out) output of ``x`` (..., in): rotated if it has a rotation,
        quantized with the static scale, one int8 GEMM, dequantized with the
        per-channel weight scales."""
        if self.rotate is not None:
            x = self.rotate(x)
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        if self.small_packed is not None and flat.shape[0] <= self.small_rows:
            # the fake-quantized codes, round(x / scale), as floats: FBGEMM adds
            # the zero point before it rounds, so values within a float ulp of a
            # half can land on the other code
            codes = torch.div(flat, self.input_scale).round_()
            product = fbgemm_linear(codes, 1.0, self.small_packed)
            return product.to(self.output_dtype)
        quantized = torch.quantize_per_tensor(flat, self.input_scale, 0, torch.qint8)
        # its bytes are the int8 codes: a view, where int_repr() would copy them
        codes = torch.empty(0, dtype=torch.uint8).set_(
            quantized.untyped_storage(), 0, quantized.shape, quantized.stride()
        )
        # shifted by 128 into uint8 (flipping the sign bit adds 128 to a two's
        # complement byte, exactly): oneDNN's fast int8 GEMMs take u8 activations
        # on every x86 CPU but s8 ones only with AMX; elsewhere (AVX-512 VNNI) s8
        # falls to its reference GEMM, ~4,000x slower (512x576 @ 576x1536: 5.3 s
        # against 1.3 ms, benchmarks/onednn_int8_paths.py). Quantizing to quint8
        # with zero point 128 directly rounds x / scale + 128, which differs from
        # the fake-quantized codes at some rounding boundaries.
        codes.bitwise_xor_(SIGN_BIT)  # in place: the codes are this call's own
        zero_point = ACTIVATION_ZERO_POINT
        if self.halves:
            codes, zero_point = split_in_halves(codes), HALVES_ZERO_POINT
        return self.gemm(codes, zero_point).to(self.output_dtype)

    def gemm(self, codes: torch.Tensor, zero_point: int) -> torch.Tensor:
        """(rows, out) oneDNN product of u8 ``codes`` (rows, in; in halves, rows,
        2 * in, where :attr:`halves`) minus ``zero_point`` with the packed weight,
        dequantized, plus the bias, in ``gemm_dtype``."""
        return int8_gemm(
            codes,
            self.input_scale,
            zero_point,
            self.packed,
            self.weight_scale,
            self.weight_zero_point,
            self.bias,
            self.gemm_dtype,
        )


class Int8SiblingLinears:
    """Linears that read the same input with the same static input scale (q/k/v
    after a layer's first norm, gate/up after its second) as one int8 GEMM: the
    input is quantized once and their weights are one matrix. Each sibling's
    forward takes its columns of the shared product; int32 accumulation is exact
    and the dequantization is per output channel, so every column equals the
    sibling's own GEMM bit for bit. A call with an input the product was not made
    from (or one written in place since, where writes are counted: not under
    ``torch.inference_mode``) makes the product anew.

    :param siblings: the fake-quantized Linears, in order
    :param input_scale: their common static input scale
    :param weights: each sibling's (int8 codes, per-channel scales)
    :param output_dtype: the dtype of the forwards' outputs
    :param rotate: their common online input rotation, applied once, or ``None``
    """

    def __init__(
        self,
        siblings: list[nn.Linear],
        input_scale: float,
        weights: list[tuple[torch.Tensor, torch.Tensor]],
        output_dtype: torch.dtype,
        rotate: Callable | None = None,
    ):
        codes = torch.cat([c for c, _ in weights])
        scales = torch.cat([s for _, s in weights])
        bias = None
        if any(m.bias is not None for m in siblings):
            bias = torch.cat([_bias_or_zeros(m) for m in siblings])
        self.kernel = Int8StaticLinear(
            bias, input_scale, codes, scales, output_dtype, rotate
        )
        self.columns: dict[nn.Linear, tuple[int, int]] = {}
        start = 0
        for sibling, (sibling_codes, _) in zip(siblings, weights, strict=True):
            self.columns[sibling] = (start, start + sibling_codes.shape[0])
            start += sibling_codes.shape[0]
        self._made_from: tuple | None = None
        self._product: torch.Tensor | None = None
        self._taken: set = set()

    def columns_of(self, sibling: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``sibling``'s output for ``x``: its columns of the shared product."""
        # under inference_mode ``x`` counts no writes: its siblings are called one
        # after another on it (their pre-hooks leave inputs alone), so ``x`` itself
        # is the key there
        made_from = (x, write_count(x))
        if (
            self._made_from is None
            or self._made_from[0] is not x
            or self._made_from[1] != made_from[1]
            or sibling in self._taken
        ):
            self._product = self.kernel.product(x)
            self._made_from, self._taken = made_from, set()
        start, end = self.columns[sibling]
        output = self._product[:, start:end].reshape(*x.shape[:-1], end - start)
        self._taken.add(sibling)
        if len(self._taken) == len(self.columns):  # every sibling has its columns
            self._made_from = self._product = None
        return output


def _bias_or_zeros(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is None:
        return torch.zeros(linear.out_features)
    return linear.bias.detach().float()


class _SiblingColumns:
    """One sibling's forward: its columns of the shared int8 product."""

    def __init__(self, group: Int8SiblingLinears, sibling: nn.Linear):
        self.group, self.sibling = group, sibling

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.columns_of(self.sibling, x)


def kernel_of(linear: nn.Linear) -> Int8StaticLinear:
    """The int8 GEMM that computes an executed ``linear``'s output (its sibling
    group's, where it shares one)."""
    forward = linear.int8_kernel
    return forward.group.kernel if isinstance(forward, _SiblingColumns) else forward


def executed_kernels(model: nn.Module) -> list[Int8StaticLinear]:
    """The int8 GEMMs of a model :func:`to_int8_cpu` has converted, each once
    (siblings that share one count once)."""
    kernels = [kernel_of(m) for m in model.modules() if hasattr(m, "int8_kernel")]
    return list({id(kernel): kernel for kernel in kernels}.values())


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # a bound method, as compressed-tensors' offloading expects of a forward
    return self.int8_kernel(x)


def _refusal(name: str, module: nn.Module) -> str | None:
    """Why ``module`` cannot run in the int8 kernels, or ``None`` if it can."""
    scheme = module.quantization_scheme
    weights, inputs = scheme.weights, scheme.input_activations
    if scheme.output_activations is not None:
        return f"{name}: quantized outputs"
    if weights is None or weights.type != "int" or weights.num_bits > 8:
        return f"{name}: weights {_describe(weights)}"
    if not weights.symmetric or weights.strategy not in ("channel", "tensor"):
        return f"{name}: weights {_describe(weights)}"
    if inputs is None:
        return f"{name}: weight-only quantization (no input scale)"
    if inputs.type != "int" or inputs.num_bits != 8 or not inputs.symmetric:
        return f"{name}: activations {_describe(inputs)}"
    if inputs.dynamic or inputs.strategy != "tensor":
        return f"{name}: activations {_describe(inputs)}"
    if not hasattr(module, "input_scale"):
        return f"{name}: no calibrated input_scale (run oneshot first)"
    return None


def _describe_rotations(rotations: dict[nn.Linear, tuple[int, Callable]]) -> str:
    if not rotations:
        return ""
    kinds = {id(rotate): rotate for _, rotate in rotations.values()}.values()
    shapes = [
        "x".join(map(str, rotate.blocks)) if hasattr(rotate, "blocks") else "dense"
        for rotate in kinds
    ]
    return (
        f"; {len(rotations)} online input rotations in the kernels "
        f"(Kronecker factors or dense: {', '.join(shapes)})"
    )


def _describe(args) -> str:
    if args is None:
        return "not quantized"
    kind = "dynamic" if args.dynamic else "static"
    return (
        f"{args.type}{args.num_bits} {kind} per-{args.strategy}"
        f"{'' if args.symmetric else ' asymmetric'}"
    )


def _weight_codes(module: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) int8 codes and (out,) float32 scales, as the fake-quantized
    forward uses them."""
    args = module.quantization_scheme.weights
    scale = module.weight_scale.detach().float()
    weight = module.weight.detach()
    if weight.dtype == torch.int8:  # a compressed checkpoint
        codes = weight
    else:
        zero_point = getattr(module, "weight_zero_point", None)
        if zero_point is None:
            zero_point = torch.zeros_like(scale, dtype=torch.int8)
        codes = quantize(weight.float(), scale, zero_point, args, dtype=torch.int8)
    return codes.contiguous(), scale.reshape(-1).expand(codes.shape[0]).contiguous()


def _template_outputs(
    model: nn.Module, weights: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]
) -> dict[nn.Module, torch.Tensor]:
    """Exact (kinds, out) outputs of every linear fed by a templated norm: the
    template through the linear's input rotation and its dequantized weight."""
    runtime = get_runtime(model)
    if runtime is None or not runtime.exact_template_rows:
        return {}
    outputs = {}
    for layer in runtime.layers:
        if layer.templates is None:
            continue
        # a checkpoint loaded on a GPU keeps its templates there: the CPU's copy
        templates = layer.resident_templates(torch.device("cpu"))
        for norm_name, linear_names in runtime.arch.norm_linears.items():
            template = templates.norm_templates.get(norm_name)
            if template is None:
                continue
            norm = layer.layer.get_submodule(norm_name)
            rows = template.float() * runtime.arch.effective_norm_weight(norm)
            for linear_name in linear_names:
                linear = layer.layer.get_submodule(linear_name)
                if linear not in weights:
                    continue
                codes, scale = weights[linear]
                inputs = through_pre_hooks(linear, rows).float()
                bias = None if linear.bias is None else linear.bias.float()
                dequantized = codes.float() * scale.unsqueeze(-1)
                outputs[linear] = nn.functional.linear(inputs, dequantized, bias)
    return outputs


def _kernel_rotations(
    model: nn.Module, modules: list[nn.Linear]
) -> dict[nn.Linear, tuple[int, Callable]]:
    """The online input rotations that move into the int8 kernels: for each linear
    whose one input-changing pre-hook, besides the spike-free runtime's (which act
    first, on the unrotated input), applies its rotation: (that hook's id, the
    rotation as its kernel applies it). Linears with equal rotation matrices get
    the same rotation object (all of one width, in QuIP)."""
    runtime = get_runtime(model)
    runtime_hooks = set() if runtime is None else runtime.hook_ids()
    made: list[tuple[torch.Tensor, Callable]] = []
    rotations = {}
    for module in modules:
        transform = input_rotation(module)
        hooks = input_changing_hooks(module, besides=runtime_hooks)
        if transform is None or len(hooks) != 1:
            continue
        hook_id = hooks[0]
        matrix = rotation_matrix(transform, module.in_features)
        rotate = next((r for m, r in made if torch.equal(m, matrix)), None)
        if rotate is None:
            rotate = kernel_rotation(matrix, transform)
            made.append((matrix, rotate))
        rotations[module] = (hook_id, rotate)
    return rotations


class _KernelInput(NamedTuple):
    """What a linear's int8 kernel does to its input before the GEMM."""

    scale: float
    rotate: Callable | None


def _sibling_groups(
    model: nn.Module,
    inputs: dict[nn.Linear, _KernelInput],
    rotations: dict[nn.Linear, tuple[int, Callable]],
) -> list[list[nn.Linear]]:
    """The linears each decoder layer's norms feed (the architecture's
    ``norm_linears``) that can share one GEMM: all converted, one input scale, one
    rotation (or none) in their kernels and no other input hook."""
    try:
        arch = get_arch_spec(model)
    except UnknownArchitectureError:
        return []
    groups = []
    for layer in arch.decoder_layers(model):
        for names in arch.norm_linears.values():
            siblings = [layer.get_submodule(name) for name in names]
            if len(siblings) < 2 or any(s not in inputs for s in siblings):
                continue
            if len({inputs[s].scale for s in siblings}) != 1:
                continue
            if len({id(inputs[s].rotate) for s in siblings}) != 1:
                continue
            if any(len(input_changing_hooks(s)) > (s in rotations) for s in siblings):
                continue
            groups.append(siblings)
    return groups


def _decompress(model: nn.Module) -> None:
    """A model saved with ``save_compressed`` (or just reloaded) holds int8
    weights until compressed-tensors' hook decompresses it on the first forward;
    decompress it now, as that forward would."""
    handle = getattr(model, "ct_decompress_hook", None)
    hook = None if handle is None else model._forward_pre_hooks.get(handle.id)
    if hook is not None:
        hook(model, ())


@torch.no_grad()
def to_int8_cpu(
    model: nn.Module, dtype: torch.dtype = torch.float32, join_siblings: bool = True
) -> nn.Module:
    """Give every quantized Linear of ``model`` an int8 CPU forward, in place.

    All-or-nothing: every module is checked and prepared before the first one is
    changed, so a refused model is left exactly as it was.

    :param model: a model after ``oneshot`` with a W8A8 static INT8 recipe (with or
        without SpikeFree; weights of fewer bits too: W7A8 runs one exact GEMM per
        linear on CPUs without VNNI, where 8-bit weights need two), or loaded from
        such a checkpoint; on any device (it is moved to the CPU)
    :param dtype: the float dtype of everything else (norms, attention, the
        runtime's insertions, ``lm_head``) and of the int8 linears' outputs;
        ``torch.bfloat16`` runs them in bf16 (AMX / AVX-512 BF16) while the
        converted linears keep their float32 weights for ``save_pretrained``
    :param join_siblings: the linears that read one norm's output with one input
        scale (q/k/v, gate/up) share one quantization of it and one GEMM
        (:class:`Int8SiblingLinears`; the same outputs, bit for bit); ``False``:
        one GEMM each
    :return: ``model``, converted
    :raises Int8ExecutionError: nothing to execute, a scheme the kernels cannot
        run (named, with what can), or no oneDNN
    """
    if is_int8_executed(model):
        raise Int8ExecutionError("The model already runs in int8 CPU kernels.")
    if not torch.backends.mkldnn.is_available():
        raise Int8ExecutionError(
            "This torch build has no oneDNN (torch.backends.mkldnn), which the int8 "
            "CPU kernels need: install the standard x86 CPU wheel of torch."
        )
    quantized = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and getattr(module, "quantization_scheme", None) is not None
    ]
    if not quantized:
        raise Int8ExecutionError(
            "No quantized Linear in the model: int8 CPU execution needs "
            f"{EXECUTABLE}, applied by oneshot or loaded from its checkpoint."
        )
    refusals = [r for name, m in quantized if (r := _refusal(name, m)) is not None]
    if refusals:
        shown = "; ".join(refusals[:3]) + (" ..." if len(refusals) > 3 else "")
        raise Int8ExecutionError(
            f"{len(refusals)} of {len(quantized)} quantized Linears cannot run in "
            f"int8 CPU kernels ({shown}). Executable: {EXECUTABLE}."
        )
    # any parameter: a checkpoint loaded on a GPU can hold its compressed linears
    # on the CPU and its norms on the GPU
    off_cpu = [
        (n, p.device) for n, p in model.named_parameters() if p.device.type != "cpu"
    ]
    if off_cpu:
        name, device = off_cpu[0]
        logger.info(
            f"int8 CPU execution: moving the model to the CPU ({name}: {device})"
        )
        move_model(model, "cpu")
    _decompress(model)
    if any(is_offloaded(module) for module in model.modules()):
        # the kernels are the CPU's; a model that oneshot left dispatched (on a GPU,
        # or on the CPU as decompressing a checkpoint leaves it) onloads at every
        # access and wraps every module's forward: the dispatch goes (the wrappers
        # alone cost a decode step 5 %)
        move_model(model, "cpu")
    weights = {module: _weight_codes(module) for _, module in quantized}
    template_outputs = _template_outputs(model, weights)
    rotations = _kernel_rotations(model, [module for _, module in quantized])
    inputs = {
        module: _KernelInput(
            float(module.input_scale.detach().float().reshape(-1)[0]),
            rotations[module][1] if module in rotations else None,
        )
        for _, module in quantized
    }
    groups = _sibling_groups(model, inputs, rotations) if join_siblings else []
    forwards: dict[nn.Linear, Int8StaticLinear | _SiblingColumns] = {}
    for siblings in groups:
        scale, rotate = inputs[siblings[0]]
        shared = [weights[sibling] for sibling in siblings]
        group = Int8SiblingLinears(siblings, scale, shared, dtype, rotate)
        for sibling in siblings:
            forwards[sibling] = _SiblingColumns(group, sibling)
    for module, (scale, rotate) in inputs.items():
        if module not in forwards:
            codes, weight_scale = weights[module]
            forwards[module] = Int8StaticLinear(
                module.bias, scale, codes, weight_scale, dtype, rotate
            )
    # the float weights stay: save_pretrained still writes the checkpoint
    for module, (hook_id, _) in rotations.items():
        del module._forward_pre_hooks[hook_id]
        module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for module, kernel in forwards.items():
        module.int8_kernel = kernel
        module.forward = types.MethodType(_int8_forward, module)
        if module in template_outputs:
            module.template_outputs = template_outputs[module]
    if dtype != torch.float32:
        for module in model.modules():
            if module not in forwards:
                for parameter in module.parameters(recurse=False):
                    if parameter.is_floating_point():
                        parameter.data = parameter.data.to(dtype)
    setattr(model, _EXECUTED_ATTRIBUTE, True)
    if dtype == torch.bfloat16 and not cpu_computes_bf16():
        logger.warning(
            "int8 CPU kernels: this CPU has neither AVX-512 BF16 nor AMX, so the "
            "bf16 norms, attention and lm_head run in slow converting paths "
            "(the int8 GEMMs write float32 and cast): pass dtype=torch.float32 "
            "here"
        )
    kernels = executed_kernels(model)
    in_halves = sum(kernel.halves for kernel in kernels)
    if in_halves:
        logger.warning(
            f"int8 CPU kernels: this CPU's int8 GEMM (no VNNI) would saturate pairs "
            f"of products in 16 bits with 8-bit weights; {in_halves} of "
            f"{len(kernels)} GEMMs multiply the activation codes split in two "
            "halves instead (exact, but twice the int8 work: no faster than "
            "float32 here). 7-bit weights run one exact GEMM here "
            "(recipes/w7a8_static_spikefree.yaml), as does any recipe on a CPU "
            "with AVX-512 VNNI, AVX-VNNI or AMX"
        )
    logger.info(
        f"int8 CPU kernels: {len(forwards)} Linears converted ({dtype} elsewhere), "
        f"{len(template_outputs)} with exact template rows, "
        f"{sum(map(len, groups))} in {len(groups)} GEMMs shared by siblings"
        + _describe_rotations(rotations)
    )
    return model
