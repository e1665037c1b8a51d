"""Why SpikeFree refuses a SpinQuantModifier after it: what SpinQuant's offline
rotation (R1 + R2) does to a model's spike tokens and to its FP outputs.

Prints, per decoder layer, the largest ratio of a token's max |x| to the median
token max of its window (the quantity SpikeFree's ``ratio`` thresholds) before and
after llm-compressor's SpinQuant, and how far the FP logits move, with and
without its embedding centering.

    python benchmarks/spinquant_basis.py --model smollm2-135m --windows 2
"""

from __future__ import annotations

import argparse
import sys

import torch
from llmcompressor.core import State
from llmcompressor.modifiers.transform import SpinQuantModifier

from iq_transform.evaluation.data import TextSource, evaluation_windows, load_text
from iq_transform.models import load_model
from iq_transform.spikefree.detect import token_max


@torch.no_grad()
def top_ratios(model, windows: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Per layer input, the largest token-max / median-token-max ratio over the
    windows, and the logits."""
    output = model(windows, output_hidden_states=True)
    ratios = []
    for hidden in output.hidden_states[:-1]:
        maxima = token_max(hidden)
        ratios.append(float((maxima / maxima.median(-1, keepdim=True).values).max()))
    return ratios, output.logits


@torch.no_grad()
def rotate(model, center_embeddings: bool) -> None:
    spinquant = SpinQuantModifier(
        rotations=["R1", "R2"], transform_type="random-hadamard"
    )
    state = State(model=model)
    spinquant.on_initialize(state)
    if not center_embeddings:
        spinquant._center_embeddings = lambda model: None
    spinquant.on_calibration_start(state, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=32.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text, args.seqlen, args.windows)
    before, logits = top_ratios(model, windows)
    rotate(model, center_embeddings=True)
    after, centered_logits = top_ratios(model, windows)
    model, _ = load_model(args.model)
    rotate(model, center_embeddings=False)
    _, uncentered_logits = top_ratios(model, windows)

    print(f"layer | top ratio before | after R1+R2 | (threshold {args.ratio:g})")
    for layer, (old, new) in enumerate(zip(before, after, strict=True)):
        flag = "  <- lost" if old > args.ratio >= new else ""
        print(f"{layer:5d} | {old:16.1f} | {new:11.1f}{flag}")
    scale = float(logits.abs().max())
    print(
        f"max |logit| {scale:.2f}; |change| after SpinQuant: "
        f"{float((centered_logits - logits).abs().max()):.4f} with its embedding "
        f"centering, {float((uncentered_logits - logits).abs().max()):.4f} without"
    )


if __name__ == "__main__":
    sys.exit(main())
