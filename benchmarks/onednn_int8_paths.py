"""oneDNN's int8 GEMM with s8 against u8 (zero point 128) activation codes, beside
fp32, at one SmolLM2 shape (512x576 @ 576x1536): without AMX, s8 activations run
in oneDNN's reference GEMM; the executed model (kernels/int8_cpu.py) feeds u8::

    python benchmarks/onednn_int8_paths.py
    ONEDNN_VERBOSE=1 python benchmarks/onednn_int8_paths.py  # which kernels ran
"""

from __future__ import annotations

import time

import torch

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
    packed = torch.ops.onednn.qlinear_prepack(
        torch.randint(-127, 128, (N, K), dtype=torch.int8), None
    )
    scales, zeros = torch.rand(N) / 100, torch.zeros(N, dtype=torch.int32)
    signed = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    unsigned = signed.view(torch.uint8).bitwise_xor(0x80)

    def gemm(codes, zero_point):
        return torch.ops.onednn.qlinear_pointwise(
            codes, 0.02, zero_point, packed, scales, zeros, None, 1.0, 0,
            torch.float32, "none", [], "",
        )  # fmt: skip

    assert torch.equal(gemm(signed, 0), gemm(unsigned, 128))
    print(f"{M}x{K} @ {K}x{N}, {torch.get_num_threads()} threads")
    print(f"fp32 matmul: {timed_ms(lambda: inputs @ weight.T, 20):.1f} ms")
    u8_ms = timed_ms(lambda: gemm(unsigned, 128), 20)
    print(f"int8 GEMM, u8 codes, zero point 128: {u8_ms:.1f} ms")
    print(f"int8 GEMM, s8 codes: {timed_ms(lambda: gemm(signed, 0), 1):.1f} ms")


if __name__ == "__main__":
    main()
