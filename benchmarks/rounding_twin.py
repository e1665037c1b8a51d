"""How far a fake-quantized model's perplexity moves when only its rounding
boundaries move: the noise floor under "executed vs fake-quantized".

An executed int8 model computes each linear's fake-quantized product to ~1e-6,
yet its perplexity departs from the fake-quantized one's: wherever the two round
an activation differently in the last float bit, a code flips, and the network
carries the difference on. This runs ``iq-quantize`` in this process with its
overrides, and where ``execute=`` would convert the model it instead moves every
static activation scale (``input_scale``) by ``--ulps`` float32 ulps and leaves
the model fake-quantized: a twin that differs from the original only at rounding
boundaries. ``results.json`` then holds the twin's perplexity as ``ppl`` and the
original's as ``ppl_fake_quantized`` (``benchmarks/window_gaps.py`` reads both)::

    python benchmarks/rounding_twin.py --ulps 1 execute=int8_cpu \\
        quant=w8a8_static transform=spikefree model=gemma3-270m stages=rtn \\
        data.num_samples=8 eval.num_samples=64 output_dir=/tmp/twin
"""

from __future__ import annotations

import argparse
import sys

import torch
from loguru import logger

from iq_transform.cli import quantize
from iq_transform.composition import job


@torch.no_grad()
def move_static_scales(model: torch.nn.Module, ulps: int) -> int:
    """Move every ``input_scale`` by ``ulps`` float32 ulps; returns how many."""
    toward = torch.tensor(float("inf") if ulps > 0 else float("-inf"))
    moved = 0
    for module in model.modules():
        scale = getattr(module, "input_scale", None)
        if not isinstance(scale, torch.Tensor):
            continue
        for _ in range(abs(ulps)):
            scale.copy_(torch.nextafter(scale, toward.to(scale)))
        moved += 1
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ulps", type=int, default=1, help="signed, not 0")
    args, overrides = parser.parse_known_args()
    if args.ulps == 0:
        parser.error("--ulps 0 moves nothing")

    def twin(model, name):
        moved = move_static_scales(model, args.ulps)
        if moved == 0:
            raise SystemExit("no static input_scale to move: use a static quant=")
        logger.info(f"rounding twin: {moved} input scales moved by {args.ulps} ulp")
        return model

    job.execute = twin
    sys.argv = [sys.argv[0], *overrides]
    try:
        quantize.main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise


if __name__ == "__main__":
    sys.exit(main())
