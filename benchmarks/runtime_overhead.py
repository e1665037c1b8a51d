"""Forward-time overhead of the installed SpikeFree runtime, as a ratio.

The same model is timed with its runtime's templates installed and removed, side
by side (interleaved runs, medians): prefill at each ``--shapes`` entry and a
decode step with ``--cached`` tokens in the KV cache. After calibration the model
is moved for good (:func:`iq_transform.models.offload.move_model`), as a saved
and reloaded model runs: oneshot leaves every module wrapped by compressed-tensors'
offloading, whose per-call host time (a fifth of the host proxy's decode step)
would dilute the runtime's. Each row also gives the
host-synchronizing operations of one forward
(:func:`iq_transform.evaluation.host_syncs.count_host_syncs`) and, on CUDA, the
kernels it launches (``torch.profiler``).

``--model llama3-8b-planted`` is a random Llama at Llama-3-8B widths (``--layers``
decoder layers, 4096/14336, 32/8 heads, vocab 128256, bf16) with the two spike
kinds of :mod:`benchmarks.oneshot_scale` planted (first token and a delimiter every
211 tokens), calibrated by SpikeFree alone on random-token windows; its inputs are
such windows, plus a row with no spike token at all. On CUDA, ``--sync-check`` runs
a prefill and a decode step under ``torch.cuda.set_sync_debug_mode("error")`` and
``--graph`` captures a decode step (static KV cache) in a CUDA graph with the
runtime installed and removed, and times its replays against eager steps.
``--execute int8_cpu`` times a real model after ``--recipe`` (W8A8 static +
SpikeFree) run in the int8 CPU kernels (:func:`iq_transform.kernels.to_int8_cpu`):
the runtime's own share of the executed model, with more interleaved pairs than
``speed_cpu.py`` takes.

    python benchmarks/runtime_overhead.py --model smollm2-135m
    python benchmarks/runtime_overhead.py --model smollm2-135m --execute int8_cpu \
        --shapes 1x512 8x512 --cached 512
    python benchmarks/runtime_overhead.py --model llama3-8b-planted --device cuda \
        --dtype bfloat16 --shapes 1x2048 8x2048 --sync-check --graph
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.data import TextSource, calibration_windows, load_documents
from iq_transform.evaluation.host_syncs import count_host_syncs
from iq_transform.kernels import to_int8_cpu
from iq_transform.models import load_model
from iq_transform.models.offload import move_model
from iq_transform.spikefree.norm_rows import fused_norm_templates
from iq_transform.spikefree.row_writes import triton_runs_on

# untimed runs of each variant first: the first timed row paid for clocks ramping up
WARMUP_RUNS = 3
# The first forward after switching variants pays one-off costs a generation pays
# once (the runtime fuses its norms again after being detached, checks its hooks
# again): each timed run of a forward shorter than this follows one untimed run of
# the same variant. Longer forwards are timed right after the switch (those costs
# are then under 0.1 % of them, and an extra run would double a CPU benchmark).
SETTLE_BELOW_S = 1.0
# a decode step takes milliseconds and this VM moves single runs by several per
# cent: its ratio is a median of more interleaved pairs
DECODE_REPEATS = 40


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


# What is timed side by side. ``removed``: the runtime detached (the model's own
# forward, no hook of the runtime left in it); ``installed``: enabled as a user
# gets it (on CUDA its norms compute their template rows in the fused kernel).
# Where Triton runs, also:
# ``installed, norms hooked``: enabled with ``fuse_norms=False`` (the norms run
# themselves, templates written after them: the previous path); ``removed, fused
# norm kernel``: detached, with the decoder layers' norms running the same fused
# kernel without templates, so the runtime's own cost on top of that kernel shows.
REMOVED, INSTALLED = "removed", "installed"
HOOKED, FUSED_KERNEL = "installed, norms hooked", "removed, fused norm kernel"


def variants(device: torch.device) -> tuple[str, ...]:
    if triton_runs_on(torch.empty(0, device=device)):
        return REMOVED, FUSED_KERNEL, HOOKED, INSTALLED
    return REMOVED, INSTALLED


# the architecture's norm weight offset of each norm class (0: Llama's, 1: Gemma's)
_NORM_OFFSETS: dict[type, float] = {}


def _fused_kernel_alone(norm, hidden_states):
    offset = _NORM_OFFSETS[type(norm)]
    output, _ = fused_norm_templates(
        hidden_states,
        norm.weight,
        float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))),
        weight_offset=offset,
        cast_before_weight=offset == 0.0,
    )
    return output


def install(layers, templates, variant: str) -> None:
    """Set up ``variant``. Detaching keeps the templates installed, so their
    copies on the device are made once, not before every timed run (a
    host-to-device copy waits for the device)."""
    runtime = layers[0].runtime
    _DETACHED.close()  # the runtime's hooks back in place
    runtime.enabled = variant in (INSTALLED, HOOKED)
    runtime.fuse_norms = False if variant == HOOKED else None
    for layer, layer_templates in zip(layers, templates, strict=True):
        if layer.templates is not layer_templates:
            layer.templates = layer_templates
    norm_classes = {
        type(layer.layer.get_submodule(name))
        for layer in layers
        for name in runtime.arch.norm_names()
    }
    for norm_class in norm_classes:
        _NORM_OFFSETS[norm_class] = runtime.arch.norm_weight_offset
        original = vars(norm_class).get("_benchmark_own_forward")
        if variant == FUSED_KERNEL and original is None:
            norm_class._benchmark_own_forward = norm_class.forward
            norm_class.forward = _fused_kernel_alone
        elif variant != FUSED_KERNEL and original is not None:
            norm_class.forward = original
            del norm_class._benchmark_own_forward
    if variant in (REMOVED, FUSED_KERNEL):
        _DETACHED.enter_context(runtime.detached())


# the runtime detached by the variant installed last, if it is a removed one
_DETACHED = contextlib.ExitStack()


def hooked_calls(run) -> int:
    """Module calls of one ``run`` that go through hooks of their own (each such
    call takes ``nn.Module``'s slow path, hooks that return at once included)."""
    calls = [0]

    def count(module, args):
        if module._forward_hooks or module._forward_pre_hooks:
            calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return calls[0]


def with_timer(function, spent):
    """``function`` wrapped to call ``spent(seconds)`` with the host time of each
    of its calls."""

    @functools.wraps(function)
    def timed_call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent(time.perf_counter() - start)

    return timed_call


def hook_seconds(run, model, runtime, runs: int) -> float:
    """Median host seconds one ``run`` spends inside the runtime's hooks, over
    ``runs`` calls: the runtime's own Python and the ops it issues, measured
    apart from the model's (a ratio of two forwards moves by several per cent
    on a noisy host; this does not). Not counted: ``nn.Module``'s dispatch of
    the hooks, and norms whose forward the fused kernel replaced."""
    ours, per_run, wrapped = runtime.hook_ids(), [], []

    def add(seconds: float) -> None:
        per_run[-1] += seconds

    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in ours & hooks.keys():
                wrapped.append((hooks, key, hooks[key]))
                hooks[key] = with_timer(hooks[key], add)
    try:
        for _ in range(runs):
            per_run.append(0.0)
            run()
    finally:
        for hooks, key, hook in wrapped:
            hooks[key] = hook
    return statistics.median(per_run)


def cuda_kernels(run) -> int:
    """CUDA kernels (and memsets/copies) one call of ``run`` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return sum(1 for event in prof.events() if event.device_type == cuda)


def side_by_side(run, model, layers, templates, device, repeats: int) -> dict:
    """Median seconds of every variant (interleaved runs); ``ratio`` is
    installed over removed; ``hook_share`` the host time inside the runtime's
    hooks over the removed forward."""
    names = variants(device)
    runs = {name: [] for name in names}
    syncs, kernels, hooked = {}, {}, {}
    for name in names:  # warm-up (GPU clocks ramp), the sync count
        install(layers, templates, name)
        for _ in range(WARMUP_RUNS):
            run()
        syncs[name] = sum(count_host_syncs(run).values())
        hooked[name] = hooked_calls(run)
        if device.type == "cuda":
            kernels[name] = cuda_kernels(run)
        if name == INSTALLED:
            in_hooks = hook_seconds(run, model, layers[0].runtime, repeats)
    settle = timed(run, device) < SETTLE_BELOW_S
    for _ in range(repeats):
        for name in names:
            install(layers, templates, name)
            if settle:
                run()
            runs[name].append(timed(run, device))
    install(layers, templates, INSTALLED)
    medians = {name: statistics.median(runs[name]) for name in names}
    row = {
        "without_s": medians[REMOVED],
        "with_s": medians[INSTALLED],
        "ratio": medians[INSTALLED] / medians[REMOVED],
        "host_syncs_without": syncs[REMOVED],
        "host_syncs_with": syncs[INSTALLED],
        "hooked_calls_without": hooked[REMOVED],
        "hooked_calls_with": hooked[INSTALLED],
        "hook_s": in_hooks,
        "hook_share": in_hooks / medians[REMOVED],
        "runs_without_s": runs[REMOVED],
        "runs_with_s": runs[INSTALLED],
    }
    if HOOKED in medians:
        row["hooked_s"] = medians[HOOKED]
        row["ratio_hooked"] = medians[HOOKED] / medians[REMOVED]
        row["fused_kernel_alone_s"] = medians[FUSED_KERNEL]
        row["ratio_to_fused_kernel_alone"] = medians[INSTALLED] / medians[FUSED_KERNEL]
        row["runs_s"] = runs
    if kernels:
        row["kernels_without"], row["kernels_with"] = (
            kernels[REMOVED],
            kernels[INSTALLED],
        )
        row["kernels"] = kernels
    return row


def profile(run, label: str) -> None:
    """Print the top ops of one call of ``run`` (runtime installed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(f"== profile {label}, runtime installed")
    print(averages.table(sort_by="self_cuda_time_total", row_limit=15)[:5000])
    print(averages.table(sort_by="cpu_time_total", row_limit=12)[:4000], flush=True)


def sync_check(run, layers=None) -> str:
    """``"none"`` when ``run()`` passes under ``set_sync_debug_mode("error")``;
    with ``layers`` (the runtime's), only inside the decoder layers, where the
    runtime acts (transformers' own mask code may wait outside them)."""
    handles = []
    if layers is not None:
        for layer in layers:
            module = layer.layer
            handles += [
                module.register_forward_pre_hook(
                    lambda *_: torch.cuda.set_sync_debug_mode("error"), prepend=True
                ),
                module.register_forward_hook(
                    lambda *_: torch.cuda.set_sync_debug_mode(0)
                ),
            ]
    torch.cuda.synchronize()
    if layers is None:
        torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return "none"
    except RuntimeError as error:
        return f"synchronizes: {str(error).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
        for handle in handles:
            handle.remove()


def captured(run, warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """``run`` captured in a CUDA graph after ``warmups`` calls on a side stream
    (allocation, compilation and autotuning happen before the capture):
    ``(graph, what the captured call returned)``."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        output = run()
    return graph, output


def graph_decode(model, layers, templates, prompt, cached: int, repeats: int):
    """A decode step on a static KV cache (``cached`` tokens in it), captured in a
    CUDA graph with the runtime installed and removed: whether it captures, replay
    ms against eager ms, and the logits of replay against eager."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=cached + 1)
    with torch.no_grad():
        model(input_ids=prompt[:, :cached], past_key_values=cache, use_cache=True)
    step = prompt[:, cached : cached + 1].clone()
    positions = torch.full((1, 1), cached, device=prompt.device)
    lengths = [layer.cumulative_length for layer in cache.layers]

    def decode():
        for length in lengths:  # the step overwrites position ``cached`` each time
            length.fill_(cached)
        out = model(
            input_ids=step,
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
        )
        return out.logits

    def eager_ms() -> float:
        times = []
        for _ in range(repeats):
            synchronize(prompt.device)
            start = time.perf_counter()
            decode()
            synchronize(prompt.device)
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    out = {}
    with torch.no_grad():
        for key in variants(prompt.device):
            install(layers, templates, key)
            for _ in range(3):
                eager = decode().clone()
            row = {"eager_ms": eager_ms()}
            try:
                graph, logits = captured(decode)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                row["captured"] = False
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                torch.cuda.synchronize()
                out[key] = row
                continue
            graph.replay()
            torch.cuda.synchronize()
            row["captured"] = True
            row["replay_vs_eager_max_abs"] = (logits - eager).abs().max().item()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            row["replay_ms"] = statistics.median(times)
            out[key] = row
            del graph
    install(layers, templates, INSTALLED)
    removed = out[REMOVED]
    for key in out.copy():
        suffix = "" if key == INSTALLED else f" ({key})"
        if key == REMOVED:
            continue
        out["eager_ratio" + suffix] = out[key]["eager_ms"] / removed["eager_ms"]
        if removed.get("captured") and out[key].get("captured"):
            out["replay_ratio" + suffix] = out[key]["replay_ms"] / removed["replay_ms"]
    return out


def planted_8b(args, device):
    """The planted Llama at 8B widths, SpikeFree-calibrated, and its inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import oneshot_scale

    from iq_transform.models.toy import build_char_tokenizer

    oneshot_scale.DEVICE = device.type
    hidden, intermediate, vocab = args.widths
    model = oneshot_scale.build(args.layers, (hidden, intermediate, vocab))
    tokenizer = build_char_tokenizer()
    calibration = oneshot_scale.windows(4, 512, vocab)
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)

    def inputs(batch: int, tokens: int) -> torch.Tensor:
        return oneshot_scale.windows(batch, tokens, vocab)

    def no_spikes(ids: torch.Tensor) -> torch.Tensor:
        plain = ids.clone()
        spiking = (plain == oneshot_scale.BOS) | (plain == oneshot_scale.DELIMITER)
        plain[spiking] = 10  # an ordinary token
        return plain

    return model, inputs, no_spikes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default="smollm2-135m", help="a model name, or llama3-8b-planted"
    )
    parser.add_argument("--layers", type=int, default=4, help="llama3-8b-planted")
    parser.add_argument(
        "--widths",
        type=int,
        nargs=3,
        default=(4096, 14336, 128256),
        help="llama3-8b-planted: hidden, intermediate, vocab",
    )
    parser.add_argument("--sync-check", action="store_true")
    parser.add_argument("--graph", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="CUDA: top ops, first shape and decode"
    )
    parser.add_argument(
        "--shapes", nargs="+", default=["1x512", "8x512", "1x2048"], help="BxT"
    )
    parser.add_argument("--cached", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--execute",
        choices=["int8_cpu"],
        default=None,
        help="a real model after --recipe, run in the int8 CPU kernels (to_int8_cpu)",
    )
    parser.add_argument(
        "--recipe",
        default="recipes/w8a8_static_spikefree.yaml",
        help="with --execute: the W8A8 static recipe oneshot applies",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.execute and (args.device != "cpu" or args.model == "llama3-8b-planted"):
        parser.error("--execute int8_cpu takes a real model on --device cpu")
    device = torch.device(args.device)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    longest = max([t for _, t in shapes] + [args.cached + 1])
    batch = max(b for b, _ in shapes)
    no_spikes = None
    if args.model == "llama3-8b-planted":
        model, make_inputs, no_spikes = planted_8b(args, device)
        move_model(model, device).to(dtype=getattr(torch, args.dtype))
        inputs = make_inputs(batch, longest).to(device)
    else:
        model, tokenizer = load_model(args.model)
        documents = load_documents(TextSource(path="shared/brown/brown.txt"))
        calibration = calibration_windows(tokenizer, documents, 4, 512)
        recipe = args.recipe if args.execute else [SpikeFreeModifier()]
        apply_recipe(model, tokenizer, recipe, calibration)
        if args.execute == "int8_cpu":
            model = to_int8_cpu(model, dtype=getattr(torch, args.dtype))
        else:
            move_model(model, device).to(dtype=getattr(torch, args.dtype))
        inputs = calibration_windows(tokenizer, documents, batch, longest, 7)
        inputs = inputs.to(device)
    runtime = get_runtime(model)
    layers = runtime.layers
    templates = [layer.templates for layer in layers]

    rows, checks = {}, {}
    with torch.no_grad():
        for size, tokens in shapes:
            ids = inputs[:size, :tokens]
            rows[f"prefill {size}x{tokens}"] = side_by_side(
                lambda ids=ids: model(input_ids=ids, use_cache=False),
                model,
                layers,
                templates,
                device,
                args.repeats,
            )
        if no_spikes is not None:
            size, tokens = shapes[0]
            plain = no_spikes(inputs[:size, :tokens])
            rows[f"prefill {size}x{tokens}, no spike tokens"] = side_by_side(
                lambda: model(input_ids=plain, use_cache=False),
                model,
                layers,
                templates,
                device,
                args.repeats,
            )
            model(input_ids=plain, use_cache=False)
            checks["spike_tokens_without_spike_tokens"] = int(
                runtime.last_spike_tokens.sum()
            )
        model(input_ids=inputs[:1, : shapes[0][1]], use_cache=False)
        checks["spike_tokens_handled_first_shape"] = int(
            runtime.last_spike_tokens.sum()
        )
        prefill = model(input_ids=inputs[:1, : args.cached], use_cache=True)
        cache = prefill.past_key_values
        step = inputs[:1, args.cached : args.cached + 1]

        def decode() -> None:
            model(input_ids=step, past_key_values=cache, use_cache=True)
            cache.crop(args.cached)

        rows[f"decode 1 (+{args.cached} cached)"] = side_by_side(
            decode, model, layers, templates, device, max(args.repeats, DECODE_REPEATS)
        )
        if args.profile and device.type == "cuda":
            size, tokens = shapes[0]
            ids = inputs[:size, :tokens]
            profile(lambda: model(input_ids=ids, use_cache=False), f"{size}x{tokens}")
            profile(decode, "decode")
        if args.sync_check and device.type == "cuda":
            size, tokens = shapes[0]
            ids = inputs[:size, :tokens]
            prefill_run = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
            checks["sync_debug_prefill"] = sync_check(prefill_run)
            checks["sync_debug_decode"] = sync_check(decode)
            for key in (REMOVED, INSTALLED):
                install(layers, templates, key)
                # the first forward after installation copies the templates to
                # the device (once; that copy waits): checked after it
                prefill_run()
                decode()
                checks[f"sync_debug_prefill_layers_{key}"] = sync_check(
                    prefill_run, layers
                )
                checks[f"sync_debug_decode_layers_{key}"] = sync_check(decode, layers)
            print(json.dumps(checks), flush=True)
    if args.graph and device.type == "cuda":
        try:
            checks["cuda_graph_decode"] = graph_decode(
                model, layers, templates, inputs[:1], args.cached, 4 * args.repeats
            )
        except Exception as error:  # noqa: BLE001 - reported, not raised
            checks["cuda_graph_decode"] = f"{type(error).__name__}: {error}"[:300]
        print(json.dumps(checks["cuda_graph_decode"]), flush=True)
    print(
        f"| {args.model} {args.execute or args.device} {args.dtype} | without (s) "
        "| with (s) | ratio "
        "| in the runtime's hooks (share of without) "
        "| host syncs without / with | hooked module calls without / with |"
    )
    print("|---|---|---|---|---|---|---|")
    for key, row in rows.items():
        print(
            f"| {key} | {row['without_s']:.4f} | {row['with_s']:.4f} | "
            f"{row['ratio']:.3f} | {row['hook_s'] * 1e6:.0f} us "
            f"({row['hook_share']:.2%}) | {row['host_syncs_without']} / "
            f"{row['host_syncs_with']} | {row['hooked_calls_without']} / "
            f"{row['hooked_calls_with']} |"
        )
    for key, row in rows.items():
        if "hooked_s" in row:
            print(
                f"{key}: norms hooked {row['hooked_s'] * 1e3:.2f} ms "
                f"({row['ratio_hooked']:.3f}), fused norm kernel alone "
                f"{row['fused_kernel_alone_s'] * 1e3:.2f} ms (installed / it "
                f"{row['ratio_to_fused_kernel_alone']:.3f}); kernels "
                f"{row.get('kernels')}"
            )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "execute": args.execute,
            "recipe": args.recipe if args.execute else None,
            "int8_linears": sum(hasattr(m, "int8_kernel") for m in model.modules()),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "layers": len(layers),
            "rows": rows,
            "checks": checks,
        }
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
