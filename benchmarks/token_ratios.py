"""Each decoder layer's input: the first token's and the largest other tokens'
max |x| as multiples of the sequence's median token (the ratio SpikeFree's
detection tests), over WikiText-2 test windows of the FP model::

    python benchmarks/token_ratios.py --model gemma3-270m --windows 16
"""

from __future__ import annotations

import argparse

import torch

from iq_transform.composition.config import TextConfig
from iq_transform.models import load_model
from iq_transform.models.arch import get_arch_spec
from iq_transform.spikefree.detect import token_max


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=32.0)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    windows = TextConfig(
        path="shared/wikitext-2-raw/wiki.test.raw",
        num_samples=args.windows,
        seqlen=args.seqlen,
    ).evaluation_windows(tokenizer)
    layers = get_arch_spec(model).decoder_layers(model)
    ratios: dict[int, list[torch.Tensor]] = {}

    def record(index: int):
        def before_layer(module, layer_args, kwargs):
            hidden = layer_args[0] if layer_args else kwargs["hidden_states"]
            peaks = token_max(hidden).float()
            median = peaks.median(dim=-1, keepdim=True).values
            ratios.setdefault(index, []).append(peaks / median)

        return before_layer

    handles = [
        layer.register_forward_pre_hook(record(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for batch in windows.split(4):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    print(f"{args.model}, {args.windows}x{args.seqlen} WikiText-2 windows")
    print(
        "| layer | first token | largest other (min / median / max) | "
        f"second largest other (median) | other tokens > {args.ratio:g}x |"
    )
    print("|---|---|---|---|---|")
    for index in sorted(ratios):
        ratio = torch.cat(ratios[index])
        first, others = ratio[:, 0], ratio[:, 1:]
        top = others.topk(2, dim=-1).values
        print(
            f"| {index} | {first.min():.1f}–{first.max():.1f} | "
            f"{top[:, 0].min():.1f} / {top[:, 0].median():.1f} / "
            f"{top[:, 0].max():.1f} | {top[:, 1].median():.1f} | "
            f"{int((others > args.ratio).sum())} |"
        )


if __name__ == "__main__":
    main()
