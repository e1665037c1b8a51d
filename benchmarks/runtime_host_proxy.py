"""The runtime's host time on the CUDA path, measured on a CPU: a proxy for when no
GPU is lent.

A decode step on a GPU is host-bound: what the runtime costs there is the Python it
runs per layer (``runtime_overhead.py``'s eager decode ratio). This script runs the
runtime's CUDA code path on CPU tensors: the CPU is treated as a device whose rows
are selected by masks (not read on the host), the Triton kernels count as
runnable, and each launch is stubbed (its launch key is still computed, the
kernel does nothing, so outputs are garbage and only times count). The planted
Llama of ``runtime_overhead.py`` at small widths makes the model's own ops cheap,
so the difference between the runtime installed and removed is the runtime's own
host time per layer. A real launch adds CompiledKernel.run's 6-10 us per kernel
(``launch_costs.py``), and the GPU hosts lent so far run Python more slowly than
this CPU: read the per-layer figure as a lower bound, and compare commits with it.
The kernel launches of one installed step are printed too (three a templated
layer), so a run that fell back to the CPU path shows as one with none.

    python benchmarks/runtime_host_proxy.py --layers 4 --steps 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

import iq_transform.spikefree.norm_rows as norm_rows
import iq_transform.spikefree.row_decisions as row_decisions
import iq_transform.spikefree.row_writes as row_writes
import iq_transform.spikefree.runtime as runtime_module
import iq_transform.spikefree.triton_launch as triton_launch
from iq_transform.models.offload import move_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime_overhead  # noqa: E402


def _next_power_of_2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


LAUNCHES = [0]


def _stubbed_launch(self, grid, args) -> None:
    triton_launch.arguments_key(0, args)  # the host work kept
    LAUNCHES[0] += 1


def take_the_cuda_path() -> None:
    """Make CPU tensors take the runtime's CUDA path, launches stubbed."""
    fake_triton = types.SimpleNamespace(next_power_of_2=_next_power_of_2)
    for module in (row_writes, norm_rows, row_decisions, runtime_module):
        if hasattr(module, "triton"):
            module.triton = fake_triton
        if hasattr(module, "triton_runs_on"):
            module.triton_runs_on = lambda tensor: True
    runtime_module.HOST_INDEXED_DEVICES.clear()
    runtime_module.KERNEL_DEVICES.add("cpu")
    triton_launch.BoundLaunch.__call__ = _stubbed_launch
    row_decisions._DECIDE_ROWS = triton_launch.FastLaunch(None)
    row_decisions._DETECT_ROWS = triton_launch.FastLaunch(None)
    norm_rows._NORM_ROWS = triton_launch.FastLaunch(None)
    row_writes._WRITE_ROWS = triton_launch.FastLaunch(None)
    norm_rows._norm_rows_launch.cache_clear()  # bound to the kernels above
    row_decisions._detect_rows_launch.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs=3, default=(256, 1024, 1000))
    parser.add_argument("--cached", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    model, inputs, _ = runtime_overhead.planted_8b(args, device)
    move_model(model, device).to(dtype=torch.bfloat16)  # served: no dispatch
    ids = inputs(1, args.cached + 1)
    layers = runtime_module.get_runtime(model).layers
    templates = [layer.templates for layer in layers]
    with torch.no_grad():
        cache = model(input_ids=ids[:, : args.cached], use_cache=True).past_key_values
        take_the_cuda_path()  # after the prefill: the cache holds real values

        def decode() -> None:
            model(input_ids=ids[:, args.cached :], past_key_values=cache)
            cache.crop(args.cached)

        variants = (runtime_overhead.REMOVED, runtime_overhead.INSTALLED)
        times = {name: [] for name in variants}
        for name in variants:
            runtime_overhead.install(layers, templates, name)
            for _ in range(20):
                decode()
        for _ in range(args.steps):  # interleaved, each after one untimed step
            for name in variants:
                runtime_overhead.install(layers, templates, name)
                decode()  # the switch's one-off costs (see SETTLE_BELOW_S)
                start = time.perf_counter()
                decode()
                times[name].append(time.perf_counter() - start)
        # the launches of one installed step: the CUDA path ran, not the CPU's
        runtime_overhead.install(layers, templates, runtime_overhead.INSTALLED)
        LAUNCHES[0] = 0
        decode()
    medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    extra = medians[runtime_overhead.INSTALLED] - medians[runtime_overhead.REMOVED]
    print(
        f"decode step, {args.layers} layers at widths {tuple(args.widths)}: removed "
        f"{medians[runtime_overhead.REMOVED]:.0f} us, installed "
        f"{medians[runtime_overhead.INSTALLED]:.0f} us; the runtime's host time "
        f"{extra / args.layers:.1f} us a layer ({LAUNCHES[0]} kernel launches a step)"
    )


if __name__ == "__main__":
    main()
