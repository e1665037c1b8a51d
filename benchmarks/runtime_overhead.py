"""Forward-time overhead of the installed SpikeFree runtime on CPU, as a ratio.

The same FP32 model is timed with and without the runtime (templates calibrated
on Brown), side by side, batch 1 and 8, 512 tokens; medians of interleaved runs.

    python benchmarks/runtime_overhead.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.data import TextSource, calibration_windows, load_documents
from iq_transform.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))
    calibration = calibration_windows(tokenizer, documents, 4, args.seqlen)
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    runtime = get_runtime(model)
    layers = runtime.layers
    templates = [layer.templates for layer in layers]
    inputs = calibration_windows(
        tokenizer, documents, max(args.batches), args.seqlen, 7
    )

    def timed(batch: torch.Tensor, installed: bool) -> float:
        for layer, layer_templates in zip(layers, templates, strict=True):
            layer.templates = layer_templates if installed else None
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=batch, use_cache=False)
        return time.perf_counter() - start

    print(f"| {args.model} | batch | tokens | without (s) | with (s) | ratio |")
    print("|---|---|---|---|---|---|")
    for size in args.batches:
        batch = inputs[:size]
        timed(batch, True), timed(batch, False)  # warm-up
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for installed in (False, True):
                runs[installed].append(timed(batch, installed))
        without, with_runtime = (statistics.median(runs[k]) for k in (False, True))
        print(
            f"| | {size} | {args.seqlen} | {without:.3f} | {with_runtime:.3f} | "
            f"{with_runtime / without:.3f} |"
        )


if __name__ == "__main__":
    main()
