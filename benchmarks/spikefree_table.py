"""SpikeFree against llm-compressor baselines, in one run, one protocol.

Rows: FP32, FP32 + SpikeFree, and INT8 / FP8 W8A8 x {dynamic per-token, static
per-tensor, static + SpikeFree} x {RTN, GPTQ}. Every row starts from a fresh copy of
the model; calibration (Brown) and evaluation (WikiText-2 test) windows are the same
for all rows of a model. Prints a Markdown table and writes JSON.

    python benchmarks/spikefree_table.py                       # both models, all rows
    python benchmarks/spikefree_table.py --models smollm2-135m --rows int8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from iq_transform import SpikeFreeModifier
from iq_transform.composition.pipeline import apply_recipe, evaluate
from iq_transform.composition.schemes import w8a8_quantizer
from iq_transform.evaluation.data import (
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.models import load_model

# Static observers: llm-compressor's defaults (``minmax`` for INT8, ``static_minmax``
# as in its FP8 preset), its MSE clipping, and their spike-free counterparts.
STATIC_OBSERVERS = {"int": ("minmax", "mse"), "float": ("static_minmax",)}


def build_rows(spikefree_kwargs: dict) -> dict[str, Callable[[], list]]:
    rows: dict[str, Callable[[], list]] = {
        "FP32": lambda: [],
        "FP32 + SpikeFree": lambda: [SpikeFreeModifier(**spikefree_kwargs)],
    }
    for kind, label in (("int", "INT8"), ("float", "FP8")):
        for gptq in (False, True):
            prefix = f"{label} {'GPTQ' if gptq else 'RTN'}"
            rows[f"{prefix} dynamic per-token"] = lambda kind=kind, gptq=gptq: [
                w8a8_quantizer(kind, True, None, gptq)
            ]
            for observer in STATIC_OBSERVERS[kind]:
                rows[f"{prefix} static per-tensor ({observer})"] = (
                    lambda kind=kind, gptq=gptq, observer=observer: [
                        w8a8_quantizer(kind, False, observer, gptq)
                    ]
                )
            for observer in STATIC_OBSERVERS[kind]:
                spikefree_observer = "spikefree_" + observer
                rows[f"{prefix} static + SpikeFree ({spikefree_observer})"] = (
                    lambda kind=kind, gptq=gptq, observer=spikefree_observer: [
                        SpikeFreeModifier(**spikefree_kwargs),
                        w8a8_quantizer(kind, False, observer, gptq),
                    ]
                )
    return rows


def run_model(spec: str, row_names: list[str], rows, args) -> list[dict]:
    _, tokenizer = load_model(spec)
    calibration = calibration_windows(
        tokenizer,
        load_documents(TextSource(path=args.calibration)),
        args.calib_samples,
        args.seqlen,
    )
    windows = evaluation_windows(
        tokenizer,
        load_text(TextSource(path=args.evaluation)),
        args.seqlen,
        args.eval_windows,
    )
    results = []
    for name in row_names:
        model, tokenizer = load_model(spec)
        recipe = rows[name]()
        start = time.perf_counter()
        oneshot_seconds = spikefree_seconds = None
        if recipe:
            oneshot_seconds, spikefree_seconds = apply_recipe(
                model, tokenizer, recipe, calibration
            )
        result, eval_seconds, spikes = evaluate(model, windows, progress=False)
        row = {
            "model": spec,
            "row": name,
            "ppl": result.ppl,
            "oneshot_seconds": oneshot_seconds,
            "spikefree_seconds": spikefree_seconds,
            "eval_seconds": eval_seconds,
            "spike_tokens_in_eval": spikes,
            "wall_seconds": time.perf_counter() - start,
        }
        logger.info(f"{spec} | {name} | PPL {result.ppl:.3f}")
        results.append(row)
        del model
    return results


def markdown(results: list[dict]) -> str:
    lines = []
    for spec in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == spec]
        reference = {
            r["row"].replace(" dynamic per-token", ""): r["ppl"]
            for r in rows
            if "dynamic" in r["row"]
        }
        lines += [
            f"**{spec}**",
            "",
            "| setting | WikiText-2 PPL | x dynamic | oneshot s | SpikeFree s |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            base = next(
                (v for k, v in reference.items() if r["row"].startswith(k + " ")),
                None,
            )
            ratio = f"{r['ppl'] / base:.3f}" if base else ""
            oneshot = f"{r['oneshot_seconds']:.0f}" if r["oneshot_seconds"] else ""
            spikefree = (
                f"{r['spikefree_seconds']:.1f}" if r["spikefree_seconds"] else ""
            )
            lines.append(
                f"| {r['row']} | {r['ppl']:.2f} | {ratio} | {oneshot} | {spikefree} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument(
        "--rows", nargs="*", default=None, help="substrings of row names to keep"
    )
    parser.add_argument(
        "--exclude", nargs="*", default=[], help="row names to leave out"
    )
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calibration", default="shared/brown/brown.txt")
    parser.add_argument("--evaluation", default="shared/wikitext-2-raw/wiki.test.raw")
    parser.add_argument("--no-norm-templates", action="store_true")
    parser.add_argument("--output", default="benchmarks/results/spikefree_table.json")
    args = parser.parse_args(argv)
    rows = build_rows({"norm_templates": not args.no_norm_templates})
    names = [
        name
        for name in rows
        if (args.rows is None or any(part in name for part in args.rows))
        and name not in args.exclude
    ]
    results = []
    for spec in args.models:
        results += run_model(spec, names, rows, args)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(markdown(results))
    print(f"(written to {output}; command: python {' '.join(sys.argv)})")


if __name__ == "__main__":
    main()
