"""oneDNN's int8 GEMM paths at one SmolLM2 shape (512x576 @ 576x1536), beside
fp32, each checked against the exact int32 product of its codes:

- u8 codes, zero point 128: what the executed model feeds where the CPU has VNNI
  (or AMX); without VNNI the kernel adds pairs of products in 16 bits and clips
  them, so its error is printed, not assumed;
- the u8 codes split in two halves (``split_in_halves``, zero point 64, the weight
  repeated along the inputs): exact on every CPU, twice the int8 work; what the
  executed model feeds where ``u8_products_saturate()``;
- s8 codes: without AMX oneDNN runs them in its reference GEMM (~4,000x slower on
  AVX-512 VNNI), so they are timed once;
- u8 codes with a bf16 output (``to_int8_cpu(dtype=torch.bfloat16)``): without
  AVX-512 BF16 or AMX oneDNN writes it from its reference GEMM, so it is timed
  once there (the executed model writes float32 and casts instead).

Then, by rows (1 to 512: decode steps to prefill), the executed linear
(``Int8StaticLinear``, 7-bit weight codes, which no CPU saturates) in oneDNN and
in FBGEMM's static int8 linear (its path for at most ``SMALL_GEMM_ROWS`` rows),
beside fp32, at two SmolLM2 shapes (q/k/v joined, and ``down_proj``), each checked
against the exact product of its codes.

::

    python benchmarks/onednn_int8_paths.py
    ONEDNN_VERBOSE=1 python benchmarks/onednn_int8_paths.py  # which kernels ran
"""

from __future__ import annotations

import functools
import time

import torch

from iq_transform.kernels.int8_cpu import (
    ACTIVATION_ZERO_POINT,
    HALVES_ZERO_POINT,
    SIGN_BIT,
    SMALL_GEMM_ROWS,
    Int8StaticLinear,
    cpu_computes_bf16,
    fbgemm_available,
    int8_gemm,
    split_in_halves,
    u8_products_saturate,
)

M, K, N = 512, 576, 1536
# (in, out) of q/k/v joined and of down_proj in SmolLM2-135M
SMALL_SHAPES = ((576, 960), (1536, 576))
ROWS = (1, 8, 64, 256, 512)


def timed_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(N, K)
    inputs = torch.randn(M, K)
    weight_codes = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(weight_codes, None)
    repeated = torch.ops.onednn.qlinear_prepack(
        torch.cat([weight_codes, weight_codes], dim=1), None
    )
    scales, zeros = torch.ones(N), torch.zeros(N, dtype=torch.int32)
    signed = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    unsigned = signed.view(torch.uint8).bitwise_xor(SIGN_BIT)
    exact = signed.double() @ weight_codes.double().T

    def gemm(codes, zero_point, weight=packed, output=torch.float32):
        return int8_gemm(codes, 1.0, zero_point, weight, scales, zeros, None, output)

    print(
        f"{M}x{K} @ {K}x{N}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"u8 products saturate: {u8_products_saturate()}, "
        f"native bf16: {cpu_computes_bf16()}"
    )
    print(f"fp32 matmul: {timed_ms(lambda: inputs @ weight.T, 20):.2f} ms")
    paths = {
        "int8 GEMM, u8 codes, zero point 128": (
            lambda: gemm(unsigned, ACTIVATION_ZERO_POINT),
            20,
        ),
        "int8 GEMM, u8 codes in two halves, zero point 64": (
            lambda: gemm(split_in_halves(unsigned), HALVES_ZERO_POINT, repeated),
            20,
        ),
        "int8 GEMM, s8 codes": (lambda: gemm(signed, 0), 1),
        "int8 GEMM, u8 codes, bf16 output": (
            lambda: gemm(unsigned, ACTIVATION_ZERO_POINT, output=torch.bfloat16),
            20 if cpu_computes_bf16() else 1,
        ),
    }
    for name, (run, repeats) in paths.items():
        error = (run().double() - exact).abs().max().item()
        print(f"{name}: {timed_ms(run, repeats):.2f} ms, max |error| {error:.0f}")
    if fbgemm_available():
        by_rows()


def by_rows() -> None:
    """The executed linear in oneDNN and in FBGEMM, by rows, beside fp32 (us)."""
    print(
        f"\nInt8StaticLinear, 7-bit weight codes, by rows (FBGEMM at most "
        f"{SMALL_GEMM_ROWS} rows in the executed model), us a call"
    )
    print("| in → out | rows | fp32 | oneDNN | FBGEMM | rel. error oneDNN / FBGEMM |")
    print("|---|---|---|---|---|---|")
    scale = 0.02
    for features, outputs in SMALL_SHAPES:
        codes = torch.randint(-64, 64, (outputs, features), dtype=torch.int8)
        weight_scale = torch.rand(outputs) / 100 + 1e-3
        weight = codes.float() * weight_scale.unsqueeze(1)
        kernel = Int8StaticLinear(
            None, scale, codes, weight_scale, torch.float32, small_rows=max(ROWS)
        )
        for rows in ROWS:
            activation_codes = torch.randint(-128, 128, (rows, features))
            inputs = activation_codes.float() * scale  # no rounding ties
            exact = (activation_codes.double() @ codes.double().T) * scale
            exact = exact * weight_scale.double()
            errors, times = [], []
            for small_rows in (0, max(ROWS)):  # oneDNN, then FBGEMM
                kernel.small_rows = small_rows
                error = (kernel(inputs).double() - exact).abs().max()
                errors.append(f"{error.item() / exact.abs().max().item():.0e}")
                times.append(timed_ms(functools.partial(kernel, inputs), 50) * 1e3)
            fp32 = timed_ms(functools.partial(torch.matmul, inputs, weight.T), 50)
            fp32 *= 1e3
            print(
                f"| {features} → {outputs} | {rows} | {fp32:.0f} | {times[0]:.0f} | "
                f"{times[1]:.0f} | {' / '.join(errors)} |"
            )


if __name__ == "__main__":
    main()
