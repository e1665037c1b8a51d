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

::

    python benchmarks/onednn_int8_paths.py
    ONEDNN_VERBOSE=1 python benchmarks/onednn_int8_paths.py  # which kernels ran
"""

from __future__ import annotations

import time

import torch

from iq_transform.kernels.int8_cpu import (
    ACTIVATION_ZERO_POINT,
    HALVES_ZERO_POINT,
    SIGN_BIT,
    cpu_computes_bf16,
    int8_gemm,
    split_in_halves,
    u8_products_saturate,
)

M, K, N = 512, 576, 1536


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


if __name__ == "__main__":
    main()
