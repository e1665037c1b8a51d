"""Where the static activation error sits: per-group and per-layer sensitivity.

Quantizes once (W8A8 static per-tensor INT8, optionally with SpikeFree), then
evaluates with the *activation* quantization of one group of Linears switched off
(weights stay quantized). The PPL recovered by each group is its share of the error.

    python benchmarks/sensitivity.py --model smollm2-135m --spikefree --observer mse
"""

from __future__ import annotations

import argparse
import json
import re
from contextlib import contextmanager
from pathlib import Path

from torch import nn

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

GROUPS = {
    "q/k/v": r"self_attn\.[qkv]_proj$",
    "o_proj": r"self_attn\.o_proj$",
    "gate/up": r"mlp\.(gate|up)_proj$",
    "down_proj": r"mlp\.down_proj$",
}


@contextmanager
def activations_unquantized(model: nn.Module, pattern: str):
    """Skip input quantization of the Linears matching ``pattern`` (weights stay)."""
    # Schemes are shared between modules: give each affected module its own copy.
    saved = []
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and re.search(pattern, name):
            saved.append((module, scheme))
            module.quantization_scheme = scheme.model_copy(
                update={"input_activations": None}
            )
    try:
        yield len(saved)
    finally:
        for module, scheme in saved:
            module.quantization_scheme = scheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--observer", default="minmax", help="minmax, mse, ...")
    parser.add_argument("--spikefree", action="store_true")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--top", type=int, default=8, help="layers to list")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    calibration = calibration_windows(
        tokenizer,
        load_documents(TextSource(path="shared/brown/brown.txt")),
        args.calib_samples,
        args.seqlen,
    )
    windows = evaluation_windows(
        tokenizer,
        load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw")),
        args.seqlen,
        args.eval_windows,
    )
    observer = ("spikefree_" if args.spikefree else "") + args.observer
    recipe = [SpikeFreeModifier()] if args.spikefree else []
    recipe.append(w8a8_quantizer("int", dynamic=False, observer=observer))
    apply_recipe(model, tokenizer, recipe, calibration)

    def ppl() -> float:
        return evaluate(model, windows, progress=False)[0].ppl

    base = ppl()
    with activations_unquantized(model, r"proj$"):
        weights_only = ppl()
    rows = {"all activations static": base, "no activation quantization": weights_only}
    for group, pattern in GROUPS.items():
        with activations_unquantized(model, pattern):
            rows[f"{group} inputs unquantized"] = ppl()
    layers = {}
    for index in range(model.config.num_hidden_layers):
        with activations_unquantized(model, rf"layers\.{index}\.mlp\.down_proj$"):
            layers[index] = ppl()

    gap = base - weights_only
    print(f"{args.model}, W8A8 static ({observer}), {args.eval_windows} windows")
    print("| activations left unquantized | PPL | share of the gap |")
    print("|---|---|---|")
    for name, value in rows.items():
        share = (base - value) / gap if gap > 0 else 0.0
        print(f"| {name} | {value:.2f} | {share:.0%} |")
    print(f"\ndown_proj inputs by layer (top {args.top} by recovered PPL):")
    for index, value in sorted(layers.items(), key=lambda kv: kv[1])[: args.top]:
        print(f"  layer {index}: {value:.2f} ({(base - value) / gap:.0%} of the gap)")
    if args.output:
        Path(args.output).write_text(
            json.dumps({"args": vars(args), "groups": rows, "down_proj": layers})
        )


if __name__ == "__main__":
    main()
