"""Host time per forward in each SpikeFree runtime function, on CUDA.

The runtime never waits for the GPU, so the host time of its hooks is the time it
takes to enqueue their work: where a forward is host-bound (a decode step, a small
batch), that is what the runtime costs. Each function is wrapped with a timer (the
wrappers add a few microseconds each); ten forwards are enqueued back to back,
with the runtime detached and installed, for a 1x2048 prefill and a decode step with
2048 cached tokens on the planted Llama at 8B widths (``runtime_overhead.py``).

    python benchmarks/runtime_host_time.py --layers 4
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama as llama

import iq_transform.spikefree.row_decisions as row_decisions
import iq_transform.spikefree.row_writes as row_writes
import iq_transform.spikefree.runtime as runtime_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime_overhead  # noqa: E402

TOTAL: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()
WRAPPED = {
    runtime_module.LayerRuntime: (
        "_before_layer",
        "_after_layer",
        "_before_down_proj",
        "_after_down_proj",
        "_scaled_norm_template",
        "_fused_norm_output",
        "_hook_norms",
        "_order_down_proj_hooks",
    ),
    runtime_module.SpikeFreeRuntime: (
        "spike_rows",
        "tokens",
        "begin_forward",
        "end_forward",
    ),
    runtime_module: (
        "insert_templates",
        "zero_rows",
        "_quantizes_input",
        "fused_norm_templates",
    ),
    row_writes: ("write_rows",),
    row_decisions: ("decide_rows", "detect_rows"),
    llama.LlamaDecoderLayer: ("forward",),
    llama.LlamaRMSNorm: ("forward",),
    llama.LlamaForCausalLM: ("forward",),
}


def timed(owner, name: str) -> None:
    label = f"{getattr(owner, '__name__', owner)}.{name}"

    def add(seconds: float) -> None:
        TOTAL[label] += seconds
        CALLS[label] += 1

    setattr(owner, name, runtime_overhead.with_timer(getattr(owner, name), add))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--forwards", type=int, default=10)
    args = parser.parse_args()
    args.widths = (4096, 14336, 128256)
    for owner, names in WRAPPED.items():
        for name in names:
            timed(owner, name)
    device = torch.device("cuda")
    model, inputs, _ = runtime_overhead.planted_8b(args, device)
    model.to(device=device, dtype=torch.bfloat16)
    layers = runtime_module.get_runtime(model).layers
    templates = [layer.templates for layer in layers]
    ids = inputs(1, 2049).to(device)
    n = args.forwards
    with torch.no_grad():
        cache = model(input_ids=ids[:, :2048], use_cache=True).past_key_values

        def decode() -> None:
            model(input_ids=ids[:, 2048:], past_key_values=cache, use_cache=True)
            cache.crop(2048)

        runs = {
            "prefill 1x2048": lambda: model(input_ids=ids[:, :2048], use_cache=False),
            "decode 1 (+2048 cached)": decode,
        }
        for label, run in runs.items():
            for variant in runtime_overhead.variants(device):
                runtime_overhead.install(layers, templates, variant)
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
                TOTAL.clear()
                CALLS.clear()
                start = time.perf_counter()
                for _ in range(n):
                    run()
                host = time.perf_counter() - start
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
                print(
                    f"== {label}, {variant}: host "
                    f"{1e3 * host / n:.2f} ms a forward, wall {1e3 * wall / n:.2f} ms"
                )
                for key, seconds in TOTAL.most_common():
                    print(f"  {1e6 * seconds / n:9.1f} us {CALLS[key] // n:4d}x  {key}")
    runtime_overhead.install(layers, templates, runtime_overhead.INSTALLED)


if __name__ == "__main__":
    main()
