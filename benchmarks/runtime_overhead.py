"""Forward-time overhead of the installed SpikeFree runtime, as a ratio.

The same model is timed with its runtime's templates installed and removed, side
by side (interleaved runs, medians): prefill at each ``--shapes`` entry and a
decode step with ``--cached`` tokens in the KV cache. Each row also gives the
host-synchronizing operations of one forward
(:func:`iq_transform.evaluation.host_syncs.count_host_syncs`).

    python benchmarks/runtime_overhead.py --model smollm2-135m
    python benchmarks/runtime_overhead.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.data import TextSource, calibration_windows, load_documents
from iq_transform.evaluation.host_syncs import count_host_syncs
from iq_transform.models import load_model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(run, layers, templates, device, repeats: int) -> dict:
    """Median seconds with the runtime's templates removed and installed."""

    def install(installed: bool) -> None:
        for layer, layer_templates in zip(layers, templates, strict=True):
            layer.templates = layer_templates if installed else None

    runs = {False: [], True: []}
    syncs = {}
    for installed in (False, True):  # warm-up, and the sync count
        install(installed)
        run()
        syncs[installed] = sum(count_host_syncs(run).values())
    for _ in range(repeats):
        for installed in (False, True):
            install(installed)
            runs[installed].append(timed(run, device))
    install(True)
    without, with_runtime = (statistics.median(runs[k]) for k in (False, True))
    return {
        "without_s": without,
        "with_s": with_runtime,
        "ratio": with_runtime / without,
        "host_syncs_without": syncs[False],
        "host_syncs_with": syncs[True],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--shapes", nargs="+", default=["1x512", "8x512", "1x2048"], help="BxT"
    )
    parser.add_argument("--cached", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    model, tokenizer = load_model(args.model)
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))
    calibration = calibration_windows(tokenizer, documents, 4, 512)
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    runtime = get_runtime(model)
    layers = runtime.layers
    templates = [layer.templates for layer in layers]
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes]
    longest = max([t for _, t in shapes] + [args.cached + 1])
    batch = max(b for b, _ in shapes)
    inputs = calibration_windows(tokenizer, documents, batch, longest, 7).to(device)

    rows = {}
    with torch.no_grad():
        for size, tokens in shapes:
            ids = inputs[:size, :tokens]
            rows[f"prefill {size}x{tokens}"] = side_by_side(
                lambda ids=ids: model(input_ids=ids, use_cache=False),
                layers,
                templates,
                device,
                args.repeats,
            )
        prefill = model(input_ids=inputs[:1, : args.cached], use_cache=True)
        cache = prefill.past_key_values
        step = inputs[:1, args.cached : args.cached + 1]

        def decode() -> None:
            model(input_ids=step, past_key_values=cache, use_cache=True)
            cache.crop(args.cached)

        rows[f"decode 1 (+{args.cached} cached)"] = side_by_side(
            decode, layers, templates, device, max(args.repeats, 10)
        )
    print(
        f"| {args.model} {args.device} {args.dtype} | without (s) | with (s) | ratio "
        "| host syncs without / with |"
    )
    print("|---|---|---|---|---|")
    for key, row in rows.items():
        print(
            f"| {key} | {row['without_s']:.4f} | {row['with_s']:.4f} | "
            f"{row['ratio']:.3f} | {row['host_syncs_without']} / "
            f"{row['host_syncs_with']} |"
        )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        args.output.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
