"""FP8 execution speed on a GPU: bf16 vs FP8 dynamic (eager, compiled, fused) vs
FP8 static + SpikeFree fused, on random-weight Llama-shaped decoder stacks:
prefill, an eager decode step, and a decode step replayed from a CUDA graph.

Also times the fused norm kernel alone (K=4096) against its eager reference and the
bandwidth floor, and measures the card's ceilings (copy bandwidth, bf16 and FP8
matrix rates) that the floors are computed from. Needs CUDA and Triton.

    python benchmarks/speed_gpu.py --out benchmarks/results/speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel, StaticCache

from iq_transform.kernels import fused_norm as ops
from iq_transform.kernels.fp8 import Fp8DecoderLayer
from iq_transform.models.arch import LLAMA
from iq_transform.spikefree.templates import LayerTemplates

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime_overhead  # noqa: E402

WIDTHS = {
    # hidden, intermediate, heads, kv heads, head dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "smollm2-135m": (576, 1536, 9, 3, 64),
    "gemma3-270m": (640, 2048, 4, 1, 256),
}
VARIANTS = (
    "bf16",
    "dynamic_eager",
    "dynamic_compiled",
    "dynamic",
    "static_plain",
    "static",
)
SPIKE_CHANNEL, SPIKE = 17, 1000.0
GRAPH_DECODE = "decode in a CUDA graph, 2048 cached"


_L2 = None


def timed(function, repeats: int, warmup: int = 3, flush: bool = False) -> float:
    """Median milliseconds of ``function()`` between CUDA events (``flush``: the
    L2 cache is overwritten before each call, outside the timed region)."""
    global _L2
    if flush and _L2 is None:
        _L2 = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if flush:
            _L2.zero_()
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ceilings() -> dict:
    """Copy bandwidth (GB/s, read + write), bf16 and FP8 dense rates (TFLOP/s)."""
    source = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    target = torch.empty_like(source)
    ms = timed(lambda: target.copy_(source), 20)
    bandwidth = 2 * source.numel() * 2 / ms / 1e6
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * n**3 / timed(lambda: a @ b, 20) / 1e9
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    fp8 = (
        2
        * n**3
        / timed(lambda: torch._scaled_mm(a8, b8, sa, sb, out_dtype=torch.bfloat16), 20)
        / 1e9
    )
    return {"copy_GBps": bandwidth, "bf16_TFLOPs": bf16, "fp8_TFLOPs": fp8}


# -- the fused norm kernel alone --------------------------------------------------
def _with_launch(rows: int, per_thread: int, function):
    from iq_transform.kernels import _triton

    default = _triton.NORM_ROWS, _triton.ELEMENTS_PER_THREAD
    _triton.NORM_ROWS, _triton.ELEMENTS_PER_THREAD = rows, per_thread
    try:
        return function()
    finally:
        _triton.NORM_ROWS, _triton.ELEMENTS_PER_THREAD = default


def _kernel_cases(x, weight, scale, spikefree) -> dict:
    def fused(**options):
        return ops.fused_norm_templates_quant(x, weight, 1e-5, **options)

    cases = {
        "eager reference + templates": lambda: ops.fused_norm_templates_quant_reference(
            x, weight, 1e-5, scale, **spikefree
        ),
        "fused, static": lambda: fused(scale=scale),
        "fused, static + templates": lambda: fused(scale=scale, **spikefree),
        "fused, dynamic per-token": lambda: fused(),
    }
    for rows, per_thread in ((1, 16), (2, 16), (4, 8), (8, 16)):
        cases[f"fused, static + templates, {rows} rows, {per_thread}/thread"] = (
            lambda r=rows, p=per_thread: _with_launch(
                r, p, lambda: fused(scale=scale, **spikefree)
            )
        )
    return cases


def kernel_table(ceiling: dict, width: int = 4096) -> list[dict]:
    rows = []
    for count in (4096, 8192, 16384):
        x = torch.randn(count, width, device="cuda", dtype=torch.bfloat16)
        x[::512, SPIKE_CHANNEL] = SPIKE  # one spike row in 512
        weight = (torch.randn(width, device="cuda") * 0.1 + 1).bfloat16()
        templates = torch.randn(2, width, device="cuda")
        kinds = torch.ones(count, dtype=torch.long, device="cuda")
        kinds[::2048] = 0
        scale = torch.tensor(0.02, device="cuda")
        threshold = torch.tensor(100.0, device="cuda")
        spikefree = dict(templates=templates, kinds=kinds, threshold=threshold)
        # read x (bf16) once, write codes (1 byte) + row scales, read the weight
        floor_us = (count * width * 3 + count * 4) / ceiling["copy_GBps"] / 1e3
        cases = _kernel_cases(x, weight, scale, spikefree)
        got = ops.fused_norm_templates_quant(x, weight, 1e-5, scale, **spikefree)
        want = ops.fused_norm_templates_quant_reference(
            x, weight, 1e-5, scale, **spikefree
        )
        codes_differ = (got.codes.float() != want.codes.float()).float().mean().item()
        for name, function in cases.items():
            us = timed(function, 50, flush=True) * 1e3
            rows.append(
                {"M": count, "K": width, "variant": name, "us": us,
                 "floor_us": floor_us, "x_floor": us / floor_us,
                 "codes_differ_from_reference": codes_differ}
            )  # fmt: skip
    return rows


# -- decoder stacks -----------------------------------------------------------------
def build_stack(name: str, layers: int) -> LlamaModel:
    hidden, intermediate, heads, kv_heads, head_dim = WIDTHS[name]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=256,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaModel(config).to("cuda", torch.bfloat16).eval()


def spiked_inputs(batch: int, tokens: int, hidden: int) -> torch.Tensor:
    x = torch.randn(batch, tokens, hidden, device="cuda", dtype=torch.bfloat16)
    x[:, 0, SPIKE_CHANNEL] = SPIKE  # every sequence's first token carries a spike
    return x


@torch.no_grad()
def calibrate(model: LlamaModel) -> tuple[list[dict], list[LayerTemplates]]:
    """Static input scales (absmax of the ordinary rows / 448) and templates
    (the spike row at each norm; ``down_proj`` output template at the first and
    last layer, as where spikes are created and removed) from one bf16 forward."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for index, layer in enumerate(model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) or name.endswith("layernorm"):
                key = f"{index}.{name}"

                def hook(module, args, output, key=key):
                    captured[key] = args[0].detach()
                    captured[key + ".out"] = output.detach()

                handles.append(module.register_forward_hook(hook))
    model(inputs_embeds=spiked_inputs(1, 2048, model.config.hidden_size))
    for handle in handles:
        handle.remove()
    scales, templates = [], []
    last = len(model.layers) - 1
    for index, layer in enumerate(model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                ordinary = captured[f"{index}.{name}"][:, 1:]
                module.input_scale = (ordinary.abs().amax().float() / 448.0).reshape(1)
        norm_templates = {}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            row = captured[f"{index}.{norm}"][0, 0].float()
            norm_templates[norm] = (row * torch.rsqrt(row.pow(2).mean() + 1e-6))[
                None
            ].expand(2, -1)
        down = captured[f"{index}.mlp.down_proj.out"][0, 0].float()[None].expand(2, -1)
        templates.append(
            LayerTemplates(
                residual_threshold=torch.tensor(SPIKE / 10),
                down_threshold=torch.tensor(1e6),
                norm_templates=norm_templates,
                down_template=down if index in (0, last) else None,
            )
        )
    return scales, templates


def floors(name: str, layers: int, batch: int, tokens: int, cached: int, c: dict):
    """(compute floor ms, bytes floor ms) for bf16 and FP8 linears."""
    hidden, inter, heads, kv, hd = WIDTHS[name]
    params = hidden * (heads + 2 * kv) * hd + heads * hd * hidden + 3 * hidden * inter
    rows = batch * tokens
    linear_flops = 2 * rows * params * layers
    context = cached + tokens
    # causal attention: QK^T and PV over the visible keys
    attn_flops = 4 * batch * heads * hd * tokens * (context - (tokens - 1) / 2) * layers
    kv_bytes = 2 * batch * context * kv * hd * 2 * layers
    act_bytes = 2 * rows * hidden * 2 * layers
    out = {}
    for dtype, weight_bytes, rate in (
        ("bf16", 2, "bf16_TFLOPs"),
        ("fp8", 1, "fp8_TFLOPs"),
    ):
        compute = linear_flops / c[rate] / 1e9 + attn_flops / c["bf16_TFLOPs"] / 1e9
        memory = (
            (params * layers * weight_bytes + kv_bytes + act_bytes)
            / c["copy_GBps"]
            / 1e6
        )
        out[dtype] = (compute, memory)
    return out


def _time_shape(model, batch, tokens, cached, hidden, repeats) -> float:
    if cached:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(inputs_embeds=spiked_inputs(batch, cached, hidden),
                  past_key_values=cache, use_cache=True)  # fmt: skip
        step = spiked_inputs(batch, 1, hidden)
        positions = torch.full((batch, 1), cached, device="cuda")

        def run():
            model(inputs_embeds=step, past_key_values=cache, use_cache=True,
                  position_ids=positions)  # fmt: skip
            cache.crop(cached)

    else:
        inputs = spiked_inputs(batch, tokens, hidden)

        def run():
            model(inputs_embeds=inputs, use_cache=False)

    with torch.no_grad():
        return timed(run, repeats if not cached else 4 * repeats)


def _time_graph_decode(model, batch, cached, hidden, repeats) -> float:
    """Replay ms of a decode step on a static KV cache (``cached`` tokens in it)
    captured in a CUDA graph, as servers run decode: an eager step of a few
    layers is bound by the host's launches, a replay by the device."""
    cache = StaticCache(config=model.config, max_cache_len=cached + 1)
    with torch.no_grad():
        model(inputs_embeds=spiked_inputs(batch, cached, hidden),
              past_key_values=cache, use_cache=True)  # fmt: skip
    step = spiked_inputs(batch, 1, hidden)
    positions = torch.full((batch, 1), cached, device="cuda")
    lengths = [layer.cumulative_length for layer in cache.layers]

    def run():
        for length in lengths:  # every replay writes position ``cached`` again
            length.fill_(cached)
        model(inputs_embeds=step, past_key_values=cache, use_cache=True,
              position_ids=positions)  # fmt: skip

    with torch.no_grad():
        graph, _ = runtime_overhead.captured(run, warmups=3)
    return timed(graph.replay, 4 * repeats)


def stack_table(name: str, layers: int, c: dict, repeats: int) -> list[dict]:
    model = build_stack(name, layers)
    hidden = model.config.hidden_size
    _, templates = calibrate(model)
    originals = list(model.layers)
    converted = {"bf16": originals}
    for variant in VARIANTS[1:]:
        converted[variant] = [
            Fp8DecoderLayer(
                layer,
                LLAMA,
                "static" if variant == "static_plain" else variant,
                templates[index] if variant == "static" else None,
            )  # fmt: skip
            for index, layer in enumerate(originals)
        ]
    shapes = (("prefill 1x2048", 1, 2048, 0), ("prefill 8x2048", 8, 2048, 0),
              ("decode, 2048 cached", 1, 1, 2048),
              (GRAPH_DECODE, 1, 1, 2048))  # fmt: skip
    results = []
    reference = None
    check = spiked_inputs(1, 2048, hidden)
    errors, syncs = {}, {}
    for variant in VARIANTS:
        model.layers = torch.nn.ModuleList(converted[variant])
        with torch.no_grad():
            out = model(inputs_embeds=check).last_hidden_state.float()
        if variant == "bf16":
            reference = out
        errors[variant] = (
            (out - reference)[:, 1:].norm() / reference[:, 1:].norm()
        ).item()
        syncs[variant] = "n/a"
        if variant in ("dynamic", "static_plain", "static"):
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.no_grad():
                    model(inputs_embeds=check)
                syncs[variant] = "none"
            except RuntimeError as error_message:
                syncs[variant] = f"syncs: {str(error_message)[:80]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
    # per shape, every variant in turn, twice (the second pass is reported; the
    # first shows the spread)
    first_pass: dict[str, float] = {}
    for label, batch, tokens, cached in shapes:
        for attempt in range(2):
            for variant in VARIANTS:
                model.layers = torch.nn.ModuleList(converted[variant])
                error = None
                if label != GRAPH_DECODE:
                    ms = _time_shape(model, batch, tokens, cached, hidden, repeats)
                else:
                    try:
                        ms = _time_graph_decode(model, batch, cached, hidden, repeats)
                    except Exception as failure:  # noqa: BLE001 - reported
                        ms, error = math.nan, f"{type(failure).__name__}: {failure}"
                        torch.cuda.synchronize()
                if attempt == 0:
                    first_pass[variant] = ms
                    continue
                compute, memory = floors(name, layers, batch, tokens, cached, c)[
                    "bf16" if variant == "bf16" else "fp8"
                ]
                results.append(
                    {"widths": name, "layers": layers, "shape": label,
                     "variant": variant, "ms": ms, "first_pass_ms": first_pass[variant],
                     "compute_floor_ms": compute, "bytes_floor_ms": memory,
                     "rel_error_vs_bf16": errors[variant],
                     "host_syncs": syncs[variant], "error": error}
                )  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
    model.layers = torch.nn.ModuleList(originals)
    del model, converted
    torch.cuda.empty_cache()
    return results


def profile(name: str, layers: int, batch: int = 1) -> None:
    """Top ops of one ``batch`` x 2048 forward: FP8 fused dynamic, and FP8 static
    with and without SpikeFree."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build_stack(name, layers)
    _, templates = calibrate(model)
    originals = list(model.layers)
    inputs = spiked_inputs(batch, 2048, model.config.hidden_size)
    runs = (
        ("dynamic", "dynamic", None),
        ("static_plain", "static", None),
        ("static", "static", templates),
    )
    for label, mode, layer_templates in runs:
        model.layers = torch.nn.ModuleList(
            Fp8DecoderLayer(
                layer,
                LLAMA,
                mode,
                layer_templates[index] if layer_templates else None,
            )  # fmt: skip
            for index, layer in enumerate(originals)
        )
        with torch.no_grad():
            for _ in range(3):
                model(inputs_embeds=inputs, use_cache=False)
            torch.cuda.synchronize()
            activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
            with torch_profile(activities=activities) as prof:
                model(inputs_embeds=inputs, use_cache=False)
                torch.cuda.synchronize()
        print(f"== {label}")
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16)
        print(table[:5000])
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=10)
        print(table[:3000])
    model.layers = torch.nn.ModuleList(originals)


def markdown(results: list[dict]) -> str:
    lines = []
    for name in dict.fromkeys(r["widths"] for r in results):
        rows = [r for r in results if r["widths"] == name]
        lines += [
            f"\n{name} widths, {rows[0]['layers']} layers (ms; x = vs bf16)",
            "| shape | "
            + " | ".join(VARIANTS)
            + " | floors bf16 / fp8 (compute, bytes) |",
            "|---" * (len(VARIANTS) + 2) + "|",
        ]
        for shape in dict.fromkeys(r["shape"] for r in rows):
            cells = {r["variant"]: r for r in rows if r["shape"] == shape}
            base = cells["bf16"]["ms"]
            text = [
                f"{cells[v]['ms']:.2f} ({base / cells[v]['ms']:.2f}x)"
                if math.isfinite(cells[v]["ms"])
                else "not captured"
                for v in VARIANTS
            ]
            b, f = cells["bf16"], cells["static"]
            text.append(
                f"{b['compute_floor_ms']:.2f}, {b['bytes_floor_ms']:.2f} / "
                f"{f['compute_floor_ms']:.2f}, {f['bytes_floor_ms']:.2f}"
            )
            lines.append(f"| {shape} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-batch", type=int, default=1)
    args = parser.parse_args()
    if args.profile:
        profile(args.widths[0], args.layers, args.profile_batch)
        return
    start = time.time()
    c = ceilings()
    print(json.dumps(c), flush=True)
    kernels = kernel_table(c)
    for row in kernels:
        print(json.dumps(row), flush=True)
    results = []
    for name in args.widths:
        results += stack_table(name, args.layers, c, args.repeats)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ceilings": c,
        "kernels": kernels,
        "stacks": results,
        "wall_s": time.time() - start,
    }
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    print("\n| M | K | variant | us | floor us | x floor | codes differ |")
    print("|---|---|---|---|---|---|---|")
    for r in kernels:
        print(
            f"| {r['M']} | {r['K']} | {r['variant']} | {r['us']:.1f} | "
            f"{r['floor_us']:.1f} | {r['x_floor']:.2f} | "
            f"{r['codes_differ_from_reference']:.1e} |"
        )
    print(markdown(results))
    for r in results:
        if r["error"]:
            print(f"{r['widths']} {r['shape']} {r['variant']}: {r['error'][:300]}")
    if not math.isfinite(report["wall_s"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
