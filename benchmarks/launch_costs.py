"""Host time to enqueue each op the SpikeFree runtime uses, on CUDA.

Where a forward is host-bound (one 2048-token sequence, a decode step) the
runtime costs what its launches cost the host. Each op is enqueued 200 times
behind a 50 ms sleep kernel, so the host never waits for the GPU: ``host`` is the
enqueue time per call; ``stream`` the time per call on the stream afterwards (the
larger of the GPU time and the host time). Shapes: a 1x2048 prefill and a decode
step at Llama-3-8B widths (4096 hidden, 14336 intermediate), bf16. Compares the
row writer through :class:`~iq_transform.spikefree.triton_launch.FastLaunch`,
through ``kernel[grid]`` and through ``CompiledKernel.run`` with nothing else.

    python benchmarks/launch_costs.py \
        --output benchmarks/results/gpu/launch_costs_h200.txt
"""

from __future__ import annotations

import argparse
import time

import torch

from iq_transform.spikefree import row_writes
from iq_transform.spikefree.detect import token_max
from iq_transform.spikefree.row_decisions import decide_rows, detect_rows
from iq_transform.spikefree.row_writes import int8_bytes, row_block, write_rows

CALLS = 200


def bench(name: str, run, lines: list[str]) -> None:
    for _ in range(10):
        run()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9 * 0.05))  # keeps the GPU busy while the host enqueues
    start = time.perf_counter()
    for _ in range(CALLS):
        run()
    host = (time.perf_counter() - start) / CALLS * 1e6
    torch.cuda.synchronize()
    begin, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    begin.record()
    for _ in range(CALLS):
        run()
    end.record()
    torch.cuda.synchronize()
    stream = begin.elapsed_time(end) / CALLS * 1e3
    lines.append(f"{name:42s} host {host:7.1f} us   stream {stream:7.1f} us")
    print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = "cuda"
    lines = [f"# {torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for tokens, width in [(2048, 4096), (2048, 14336), (1, 4096), (1, 14336)]:
        x = torch.randn(1, tokens, width, device=device, dtype=torch.bfloat16)
        lines.append(f"== 1x{tokens}x{width}")
        print(lines[-1])
        bench("token_max (vector_norm inf)", lambda x=x: token_max(x, False), lines)
        maxima = token_max(x, float32=False)
        threshold = torch.tensor(1e4, device=device)
        record = torch.zeros(1, tokens, dtype=torch.bool, device=device)
        also = torch.zeros_like(record)
        if tokens >= 8:
            bench(
                "decide_rows",
                lambda m=maxima, t=threshold, a=also, r=record: decide_rows(
                    m, 64.0, None, t, a, r
                ),
                lines,
            )
        else:
            bench(
                "detect_rows (zeroing)",
                lambda x=x, t=threshold, a=also, r=record: detect_rows(
                    x, t, None, a, r, True
                ),
                lines,
            )
        rows = torch.zeros(1, tokens, dtype=torch.bool, device=device)
        rows[:, :1] = True
        kinds = torch.zeros(1, tokens, dtype=torch.long, device=device)
        values = torch.randn(2, width, device=device, dtype=torch.bfloat16)
        bench(
            "write_rows (FastLaunch)",
            lambda x=x, r=rows, k=kinds, v=values: write_rows(x, r, k, v),
            lines,
        )
        block, warps = row_block(width)
        flags = int8_bytes(rows)

        def jit(x=x, f=flags, k=kinds, v=values, w=width, b=block, n=warps):
            return row_writes._write_rows_kernel[(f.numel(),)](
                x, f, k, v, w, N=w, BLOCK=b, num_warps=n
            )

        bench("write_rows via kernel[grid]", jit, lines)
        compiled = jit()
        raw_stream = torch.cuda.current_stream().cuda_stream

        def direct(x=x, f=flags, k=kinds, v=values, w=width, b=block, c=compiled,
                   s=raw_stream):  # fmt: skip
            c.run(f.numel(), 1, 1, s, c.function, c.packed_metadata,
                  None, None, None, x, f, k, v, w, w, b)  # fmt: skip

        bench("write_rows via CompiledKernel.run only", direct, lines)
        bench(
            "torch.where (kind known)",
            lambda x=x, r=rows, v=values: torch.where(r.unsqueeze(-1), v[0], x),
            lines,
        )
        bench(
            "torch.where (values[kinds])",
            lambda x=x, r=rows, k=kinds, v=values: torch.where(
                r.unsqueeze(-1), v[k], x
            ),
            lines,
        )
        bench(
            "torch.empty (bool rows)",
            lambda t=tokens: torch.empty(1, t, dtype=torch.bool, device=device),
            lines,
        )
    if args.output:
        with open(args.output, "w") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
