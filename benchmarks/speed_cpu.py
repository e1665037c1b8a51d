"""CPU speed of the spike-free static INT8 model against the CPU user's options,
side by side in one run, as ratios (and its perplexity beside each).

Variants (same model, same tokens, same threads):
- ``fp32``: the model as loaded;
- ``bf16``: ``model.to(torch.bfloat16)``;
- ``dynamic int8``: ``torch.ao.quantization.quantize_dynamic`` on the decoder
  Linears (dynamic per-tensor activations: what a CPU user gets from PyTorch);
- ``fake-quant``: W8A8 static + SpikeFree after ``oneshot`` (float kernels);
- ``int8 static + SpikeFree``: the same model through ``to_int8_cpu``, with
  float32 or bf16 everywhere else (norms, attention, ``lm_head``), and with q/k/v
  and gate/up each in their own GEMM (``join_siblings=False``);
- ``--also-recipe``: each further static recipe, fake-quantized and executed
  (``recipes/w7a8_static_spikefree.yaml``: one GEMM a linear on CPUs without
  VNNI, where W8A8 multiplies its codes in two halves);
- ``llama.cpp`` (if llama-cpp-cffi is installed: ``pip install --no-deps
  llama-cpp-cffi==0.4.42``, see ``llama_cpp_anchor.py``): the model's GGUF and
  its Q8_0 requantization with llama.cpp's own quantize API, batch 1 only.

Prefill runs to the last hidden state plus the last token's logits
(``logits_to_keep=1``, as generation does); a decode step appends one token to a
KV cache of ``--cached`` tokens. Times are medians of ``--repeats`` interleaved
runs; each table gives the linears' FLOPs (prefill) or weight bytes (decode) as
the hardware floor's measure, and the rate reached. By default the whole process
first calls ``keep_freed_memory()`` (``--allocator keep-freed``): glibc would
otherwise fault in fresh pages for every activation above 32 MiB (batched
prefill), in every variant alike.

The ceiling table bounds what int8 linears alone can gain on this CPU: each
decoder GEMM of the fp32 model and of the executed one timed alone at the
prefill's rows (``fp32_linear_seconds``, ``int8_gemm_seconds``), and fp32's
forward with the first replaced by the second; beside it, the time each model
spends outside its linears.

    python benchmarks/speed_cpu.py --model smollm2-135m --output \
        benchmarks/results/speed_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from runtime_overhead import side_by_side
from torch import nn

from iq_transform import get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.data import (
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.export import load_pretrained
from iq_transform.export.save import save_checkpoint
from iq_transform.kernels import keep_freed_memory, to_int8_cpu
from iq_transform.kernels.int8_cpu import (
    ACTIVATION_ZERO_POINT,
    HALVES_ZERO_POINT,
    executed_kernels,
)
from iq_transform.models import get_arch_spec, load_model

RECIPE = "recipes/w8a8_static_spikefree.yaml"
WIKITEXT = "shared/wikitext-2-raw/wiki.test.raw"
BROWN = "shared/brown/brown.txt"
FAKE = "fake-quant W8A8 static + SpikeFree"


def decoder_linears(model: nn.Module) -> list[nn.Linear]:
    layers = get_arch_spec(model).decoder_layers(model)
    return [m for m in layers.modules() if isinstance(m, nn.Linear)]


def linear_flops(model: nn.Module, tokens: int) -> float:
    """2 x (decoder linear parameters) x tokens, plus the last token's lm_head."""
    weights = sum(m.in_features * m.out_features for m in decoder_linears(model))
    head = model.get_output_embeddings()
    return 2.0 * weights * tokens + 2.0 * head.in_features * head.out_features


def weight_bytes(model: nn.Module, bytes_per_weight: float) -> float:
    weights = sum(m.in_features * m.out_features for m in decoder_linears(model))
    return weights * bytes_per_weight


def prefill(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1)


def fp32_linear_seconds(fp32: nn.Module, rows: int, repeats: int) -> float:
    """Seconds of one forward's decoder linears at ``rows`` input rows in
    ``F.linear`` with ``fp32``'s weights, each shape timed alone on a random input
    and counted as often as the model runs it."""
    shapes: dict[tuple, list] = {}
    for linear in decoder_linears(fp32):
        shapes.setdefault(tuple(linear.weight.shape), []).append(linear.weight)
    seconds = 0.0
    for weights in shapes.values():
        x = torch.randn(rows, weights[0].shape[1])

        def run(x=x, weight=weights[0]) -> None:
            with torch.no_grad():
                nn.functional.linear(x, weight)

        seconds += timed(run, repeats) * len(weights)
    return seconds


def int8_gemm_seconds(executed: nn.Module, rows: int, repeats: int) -> float:
    """:func:`fp32_linear_seconds` for the executed model's int8 GEMMs
    (``Int8StaticLinear.gemm``, its halves too, where it has them), fed u8 codes
    directly, without the quantization."""
    shapes: dict[tuple, list] = {}
    for kernel in executed_kernels(executed):
        shape = (kernel.in_features, kernel.out_features, kernel.halves)
        shapes.setdefault(shape, []).append(kernel)
    seconds = 0.0
    for (in_features, _, halves), kernels in shapes.items():
        width = 2 * in_features if halves else in_features
        codes = torch.randint(0, 256, (rows, width), dtype=torch.uint8)
        zero_point = HALVES_ZERO_POINT if halves else ACTIVATION_ZERO_POINT

        def run(codes=codes, zero_point=zero_point, kernel=kernels[0]) -> None:
            kernel.gemm(codes, zero_point)

        seconds += timed(run, repeats) * len(kernels)
    return seconds


def decode_step(model: nn.Module, ids: torch.Tensor, cached: int):
    """A callable timing one decode step after a prefill of ``cached`` tokens."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :cached], use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    step = ids[:, cached : cached + 1]

    def run() -> None:
        with torch.no_grad():
            model(input_ids=step, past_key_values=cache, use_cache=True)
        cache.crop(cached)

    return run


def timed(run, repeats: int) -> float:
    run()  # warm-up: oneDNN picks and caches its kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


ALLOCATORS = ("keep-freed", "glibc-default")

# torch.profiler op names whose self time makes up each part of a forward
PARTS = {
    "attention": ("scaled_dot_product",),
    "int8 GEMMs": (
        "qlinear_pointwise",
        "linear_dynamic",
        "linear_with_input_q_dq_qweight_dq_output_fp32",
    ),
    "float GEMMs": ("aten::mm", "aten::addmm", "aten::bmm"),
}
# what the shares of a forward are taken of
EXECUTED = "int8 static + SpikeFree (to_int8_cpu)"
SHARED_VARIANTS = (EXECUTED, "dynamic int8")


def executed_name(recipe: str) -> str:
    """The variant name of ``--also-recipe``'s ``recipe``, executed."""
    return f"int8 static + SpikeFree, {Path(recipe).stem}"


def forward_shares(run) -> dict[str, float]:
    """Share of one call's CPU self time spent in each of ``PARTS`` (the rest is
    ``other``: norms, SiLU, adds, quantization, the runtime, Python), from
    ``torch.profiler``, whose own cost inflates ``other`` a little."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    times = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(times.values())
    shares = {
        part: sum(t for key, t in times.items() if any(n in key for n in names)) / total
        for part, names in PARTS.items()
    }
    shares["other"] = 1.0 - sum(shares.values())
    return shares


def build_variants(args, tokenizer_windows) -> dict[str, nn.Module]:
    base, tokenizer = load_model(args.model)
    variants = {"fp32": base}
    bf16, _ = load_model(args.model)
    variants["bf16"] = bf16.to(torch.bfloat16)
    dynamic, _ = load_model(args.model)
    for layer in get_arch_spec(dynamic).decoder_layers(dynamic):
        torch.ao.quantization.quantize_dynamic(
            layer, {nn.Linear}, dtype=torch.qint8, inplace=True
        )
    variants["dynamic int8 (quantize_dynamic)"] = dynamic
    calibration = tokenizer_windows(tokenizer, BROWN, args.calib_samples)
    # oneshot once; the static variants load its checkpoint (exact reload)
    checkpoint = calibrated(args, args.recipe, tokenizer, calibration)
    variants[FAKE] = load_pretrained(checkpoint)
    variants[EXECUTED] = to_int8_cpu(load_pretrained(checkpoint))
    variants["int8 static + SpikeFree, bf16 elsewhere"] = to_int8_cpu(
        load_pretrained(checkpoint), dtype=torch.bfloat16
    )
    # q/k/v and gate/up each in their own GEMM: what joining the siblings gains
    variants["int8 static + SpikeFree, a GEMM per linear"] = to_int8_cpu(
        load_pretrained(checkpoint), join_siblings=False
    )
    for recipe in args.also_recipe:  # e.g. W7A8: one GEMM where W8A8 needs halves
        checkpoint = calibrated(args, recipe, tokenizer, calibration)
        variants[f"fake-quant {Path(recipe).stem}"] = load_pretrained(checkpoint)
        variants[executed_name(recipe)] = to_int8_cpu(load_pretrained(checkpoint))
    return variants, tokenizer


def calibrated(args, recipe: str, tokenizer, calibration) -> Path:
    """The checkpoint of ``args.model`` after ``oneshot`` with ``recipe``."""
    quantized, _ = load_model(args.model)
    apply_recipe(quantized, tokenizer, recipe, calibration)
    checkpoint = Path(args.work_dir) / f"{args.model}-{Path(recipe).stem}"
    save_checkpoint(quantized, tokenizer, checkpoint)
    return checkpoint


def windows_of(tokenizer, path: str, samples: int, seqlen: int = 512):
    """Calibration windows (random documents) or, for WikiText-2, its first
    non-overlapping evaluation windows."""
    if path == WIKITEXT:
        text = load_text(TextSource(path=path))
        return evaluation_windows(tokenizer, text, seqlen, samples)
    documents = load_documents(TextSource(path=path))
    return calibration_windows(tokenizer, documents, samples, seqlen)


def llama_cpp_variants(args, ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Seconds of llama.cpp on the model's GGUF and on that GGUF requantized to Q8_0
    by llama.cpp's ``llama_model_quantize``, on the same tokens and threads.

    Through llama-cpp-cffi's CPU build (``llama_cpp_anchor``); ``{}`` when it is
    not installed. Timed like the other variants (``timed``: a warm-up, then the
    median of interleaved repeats), one ``llama_decode`` each, with logits for the
    last token only:
    - ``prefill 1xT``: the KV cache cleared, then the first T tokens of ``ids[0]``
      as one batch (``n_batch = n_ubatch`` = the longest T: one graph);
    - ``decode 1 (+C cached)``: token C appended to the C tokens cached, then
      removed again from the cache (``llama_kv_self_seq_rm``).
    Batch 8 is not timed: llama.cpp keeps all sequences in one KV cache, and a
    batch of 8 prompts is cut into ubatches whose attention spans the cells of
    every sequence, masked, so its time would not be that of 8 prompts.
    """
    try:
        from llama_cpp_anchor import LlamaCpp, library, quantize

        library()
    except ImportError as error:  # not installed, or its CPU module does not load
        print(f"llama.cpp skipped: {error}", flush=True)
        return {}
    from iq_transform.models.gguf import locate_gguf
    from iq_transform.models.registry import OFFLINE_MODELS

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    source = locate_gguf(OFFLINE_MODELS[args.model], work)
    q8 = work / f"{source.stem}.requantized-Q8_0.gguf"
    threads = torch.get_num_threads()
    if not q8.is_file():
        quantize(source, q8, "Q8_0", threads)
    longest = max(*args.seqlens, args.cached + 1)
    paths = {f"llama.cpp {source.name}": source, "llama.cpp Q8_0 (requantized)": q8}
    models = {
        label: LlamaCpp(path, longest + 8, longest, threads)
        for label, path in paths.items()
    }
    tokens = ids[0].tolist()
    results: dict[str, dict[str, float]] = {label: {} for label in models}
    try:
        for seqlen in args.seqlens:
            key = f"prefill 1x{seqlen}"
            for label, llm in models.items():  # interleaved, as above
                batch = llm.batch(tokens[:seqlen])

                def run(llm=llm, batch=batch) -> None:
                    llm.keep(0)
                    llm.decode(batch)

                results[label][key] = timed(run, args.repeats)
                print(f"{key} {label}: {results[label][key]:.3f} s", flush=True)
        key = f"decode 1 (+{args.cached} cached)"
        for label, llm in models.items():
            llm.keep(0)
            llm.decode(llm.batch(tokens[: args.cached]))
            step = llm.batch(tokens[args.cached : args.cached + 1], args.cached)

            def run(llm=llm, step=step) -> None:
                llm.decode(step)
                llm.keep(args.cached)

            results[label][key] = timed(run, max(args.repeats, 5))
            print(f"{key} {label}: {results[label][key] * 1e3:.1f} ms", flush=True)
    finally:
        for llm in models.values():
            llm.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cached", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument(
        "--recipe", default=RECIPE, help="the static W8A8 recipe (QuIP: its cost)"
    )
    parser.add_argument(
        "--also-recipe",
        nargs="*",
        default=[],
        help="more static recipes, each timed fake-quantized and executed (e.g. "
        "recipes/w7a8_static_spikefree.yaml on a CPU without VNNI)",
    )
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--fake-quant-shapes", nargs="+", default=["1x512"], help="BxT to time it at"
    )
    parser.add_argument(
        "--work-dir", default=os.path.expanduser("~/.cache/iq_transform/bench")
    )
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="keep-freed",
        help="keep-freed: keep_freed_memory() before any variant is built (all "
        "share it); glibc-default: fresh pages for every allocation above 32 MiB",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator == "keep-freed" and not keep_freed_memory():
        raise SystemExit("--allocator keep-freed needs glibc; use glibc-default")
    variants, tokenizer = build_variants(args, windows_of)
    longest = max(args.seqlens)
    ids = windows_of(tokenizer, WIKITEXT, max(args.batches), longest + 1)
    evaluation = windows_of(tokenizer, WIKITEXT, args.eval_windows)

    shapes = [(b, s) for s in args.seqlens for b in args.batches]
    times: dict[str, dict[str, float]] = {name: {} for name in variants}
    for batch, seqlen in shapes:
        key = f"prefill {batch}x{seqlen}"
        for name, model in variants.items():  # interleaved: same machine state
            fake = name.startswith("fake-quant")
            if fake and f"{batch}x{seqlen}" not in args.fake_quant_shapes:
                continue  # float kernels plus quantize-dequantize: slowest of all
            inputs = ids[:batch, :seqlen]
            times[name][key] = timed(
                lambda m=model, x=inputs: prefill(m, x), args.repeats
            )
            print(f"{key} {name}: {times[name][key]:.3f} s", flush=True)
    for batch in args.batches:
        key = f"decode {batch} (+{args.cached} cached)"
        for name, model in variants.items():
            run = decode_step(model, ids[:batch], args.cached)
            times[name][key] = timed(run, max(args.repeats, 5))
            print(f"{key} {name}: {times[name][key] * 1e3:.1f} ms", flush=True)
    # the runtime's own share of the executed model's forward
    int8_model = variants[EXECUTED]
    runtime = get_runtime(int8_model)
    templates = [layer.templates for layer in runtime.layers]
    overhead = {}
    for batch, seqlen in shapes:
        overhead[f"prefill {batch}x{seqlen}"] = side_by_side(
            lambda x=ids[:batch, :seqlen]: prefill(int8_model, x),
            int8_model,
            runtime.layers,
            templates,
            torch.device("cpu"),
            args.repeats,
        )
    for batch in args.batches:
        overhead[f"decode {batch} (+{args.cached} cached)"] = side_by_side(
            decode_step(int8_model, ids[:batch], args.cached),
            int8_model,
            runtime.layers,
            templates,
            torch.device("cpu"),
            max(args.repeats, 5),
        )
    executed_also = {executed_name(recipe) for recipe in args.also_recipe}
    # where the time of the executed model and of dynamic int8 goes: the part
    # both share (attention) bounds what faster linears can gain over dynamic
    shares = {
        name: {
            f"prefill {batch}x{seqlen}": forward_shares(
                lambda m=model, x=ids[:batch, :seqlen]: prefill(m, x)
            )
            for batch, seqlen in shapes
        }
        for name, model in variants.items()
        if name.startswith(SHARED_VARIANTS) or name in executed_also
    }
    # the linears' own ceiling: every decoder GEMM at the int8 kernel's speed,
    # all else at fp32's
    rows_of = {f"prefill {batch}x{seqlen}": batch * seqlen for batch, seqlen in shapes}
    linears = {
        "fp32": {
            key: fp32_linear_seconds(variants["fp32"], rows, args.repeats)
            for key, rows in rows_of.items()
        }
    }
    for name in (EXECUTED, *sorted(executed_also)):
        linears[name] = {
            key: int8_gemm_seconds(variants[name], rows, args.repeats)
            for key, rows in rows_of.items()
        }
    ppl = {
        name: perplexity(model, evaluation, progress=False).ppl
        for name, model in variants.items()
    }
    times.update(llama_cpp_variants(args, ids))

    fp32 = variants["fp32"]
    floors = {
        key: linear_flops(
            fp32, int(key.split()[1].split("x")[0]) * int(key.split("x")[1])
        )
        for key in times["fp32"]
        if key.startswith("prefill")
    }
    report = {
        "model": args.model,
        "recipe": args.recipe,
        "also_recipes": args.also_recipe,
        "threads": torch.get_num_threads(),
        "allocator": args.allocator,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": times,
        "int8_runtime_overhead": overhead,
        "forward_shares": shares,
        "linear_seconds": linears,
        "ppl": ppl,
        "eval": f"{args.eval_windows}x512 WikiText-2 windows",
        "prefill_linear_flops": floors,
        "decode_weight_bytes": {
            "fp32": weight_bytes(fp32, 4),
            "bf16": weight_bytes(fp32, 2),
            "int8": weight_bytes(fp32, 1),
        },
    }
    print_tables(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1))


def print_tables(report: dict) -> None:
    times = report["seconds"]
    names = list(times)
    keys = list(times["fp32"])
    header = " | ".join(names)
    print(
        f"\n{report['model']}, {report['threads']} threads, allocator "
        f"{report.get('allocator', 'glibc-default')}, speed-up over fp32"
    )
    print(f"| shape | fp32 (s) | {header} | linear GFLOP / int8 GFLOP/s |")
    print("|" + "---|" * (len(names) + 3))
    int8 = next(n for n in names if n.startswith("int8"))  # the float32 one
    for key in keys:
        base = times["fp32"][key]
        cells = [
            f"{base / times[n][key]:.2f}×" if key in times[n] else "–" for n in names
        ]
        if key in report["prefill_linear_flops"]:
            flops = report["prefill_linear_flops"][key]
            floor = f"{flops / 1e9:.0f} / {flops / times[int8][key] / 1e9:.0f}"
        else:
            weights = report["decode_weight_bytes"]["int8"]
            rate = weights / times[int8][key] / 1e9
            floor = f"int8 weights {weights / 1e6:.0f} MB: {rate:.1f} GB/s"
        print(f"| {key} | {base:.3f} | " + " | ".join(cells) + f" | {floor} |")
    print(
        "\n| int8 static + SpikeFree | runtime removed (s) | installed (s) | ratio "
        "| in the runtime's hooks |"
    )
    print("|---|---|---|---|---|")
    for key, row in report["int8_runtime_overhead"].items():
        print(
            f"| {key} | {row['without_s']:.4f} | {row['with_s']:.4f} | "
            f"{row['ratio']:.3f} | {row['hook_share']:.2%} |"
        )
    print("\n| variant | shape | attention | int8 GEMMs | float GEMMs | other |")
    print("|---|---|---|---|---|---|")
    for name, rows in report.get("forward_shares", {}).items():
        for key, parts in rows.items():
            cells = " | ".join(f"{100 * parts[p]:.0f} %" for p in (*PARTS, "other"))
            print(f"| {name} | {key} | {cells} |")
    print_ceilings(report)
    print("\n| variant | WikiText-2 PPL |\n|---|---|")
    for name, value in report["ppl"].items():
        print(f"| {name} | {value:.3f} |")


def print_ceilings(report: dict) -> None:
    """What faster linears alone can gain: fp32's forward with its decoder linears'
    fp32 time replaced by the int8 GEMMs' (``int8_gemm_seconds``), against what the
    executed model measured."""
    times = report["seconds"]
    print(
        "\n| executed | shape | fp32 (s) | its linears in fp32 (s) | in int8 GEMMs "
        "(s) | int8 GEMMs' speed-up | ceiling over fp32 | measured | executed "
        "outside its GEMMs (s) | fp32 outside its linears (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    linears = report.get("linear_seconds", {})
    for name, rows in linears.items():
        if name == "fp32":
            continue
        for key, int8 in rows.items():
            fp32, executed = times["fp32"][key], times[name][key]
            fp32_linears = linears["fp32"][key]
            rest = fp32 - fp32_linears
            print(
                f"| {name} | {key} | {fp32:.3f} | {fp32_linears:.3f} | {int8:.3f} | "
                f"{fp32_linears / int8:.2f}× | {fp32 / (rest + int8):.2f}× | "
                f"{fp32 / executed:.2f}× | {executed - int8:.3f} | {rest:.3f} |"
            )


if __name__ == "__main__":
    main()
