"""W8A8 on a vision transformer: feature fidelity to FP32 on real photos.

Calibrates on the first ``--calibration`` images of a folder (ImageNet sample: one
photo per class) and evaluates on the others: per recipe, the cosine of each
image's CLS and mean-pooled patch features to the FP32 model's and the
nearest-neighbour agreement (:mod:`iq_transform.evaluation.features`). Recipes:
W8A8 static per-tensor (min-max observer; ``--observer mse`` is ~20x slower on
CPU) without and with SpikeFree, and W8A8 dynamic per-token. Also reports what
SpikeFree found (no spikes: it passes through).

Example::

    python benchmarks/vit_features.py --model dinov2-small
    python benchmarks/vit_features.py --model facebook/dinov2-large   # with a network
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import iq_transform  # noqa: F401  (registers SpikeFreeModifier and the observers)
from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.composition.schemes import w8a8_quantizer
from iq_transform.evaluation.features import (
    feature_quality,
    image_features,
    load_image_folder,
)
from iq_transform.models import load_model


def recipes(observer: str) -> dict:
    return {
        "w8a8_static": [w8a8_quantizer("int", dynamic=False, observer=observer)],
        "w8a8_static+spikefree": [
            SpikeFreeModifier(ratio=32.0),
            w8a8_quantizer("int", dynamic=False, observer=f"spikefree_{observer}"),
        ],
        "w8a8_dynamic": [w8a8_quantizer("int", dynamic=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--images", default="shared/imagenet-sample")
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--evaluation", type=int, default=None, help="default: all")
    parser.add_argument("--observer", default="minmax", choices=["minmax", "mse"])
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model, processor = load_model(args.model)
    pixels = load_image_folder(args.images, processor)
    calibration, evaluation = pixels[: args.calibration], pixels[args.calibration :]
    evaluation = evaluation[: args.evaluation]
    start = time.perf_counter()
    reference = image_features(model, evaluation)
    results = {
        "model": args.model,
        "calibration_images": len(calibration),
        "evaluation_images": len(evaluation),
        "fp32_seconds": time.perf_counter() - start,
        "observer": args.observer,
        "recipes": {},
    }
    for name, recipe in recipes(args.observer).items():
        model, processor = load_model(args.model)
        start = time.perf_counter()
        apply_recipe(model, processor, recipe, calibration)
        oneshot_seconds = time.perf_counter() - start
        runtime = get_runtime(model)
        quality = feature_quality(image_features(model, evaluation), reference)
        results["recipes"][name] = {
            **quality.to_dict(),
            "oneshot_seconds": oneshot_seconds,
            "spikefree_carrier_layers": (
                runtime.templates.carrier_layers if runtime is not None else None
            ),
        }
        print(
            f"{name:24s} CLS cosine {quality.cls_cosine:.5f} (min "
            f"{quality.cls_cosine_min:.5f})  pooled cosine {quality.pooled_cosine:.5f}"
            f"  NN agreement {quality.nn_agreement:.3f}"
            + ("" if "spikefree" not in name else f"  SpikeFree runtime: {runtime}")
        )
    output = args.output or Path(__file__).parent / "results" / (
        f"vit_features_{Path(args.model).name}.json"
    )
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
