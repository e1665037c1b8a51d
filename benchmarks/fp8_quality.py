"""Perplexity of the FP8-executed spike-free model against the fake-quantized one.

The tiny planted-spike model goes through ``oneshot`` with
recipes/fp8_static_spikefree.yaml (on the GPU when there is one); the
fake-quantized model (compressed-tensors emulation, SpikeFree runtime installed) is
scored on WikiText-2 test windows, then converted by
:func:`iq_transform.kernels.fp8.convert_to_fp8` (``torch._scaled_mm`` on FP8 codes
from the fused kernels) and scored again, with each carrier detection rule.

    python benchmarks/fp8_quality.py
"""

from __future__ import annotations

import copy
import json

import torch

from iq_transform import get_runtime
from iq_transform.composition.pipeline import RECIPES_DIR, apply_recipe
from iq_transform.evaluation.data import (
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.kernels.fp8 import convert_to_fp8
from iq_transform.models import load_model


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model("tiny-planted")
    model.to(device)
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))[:200]
    calibration = calibration_windows(tokenizer, documents, num_samples=4, seqlen=128)
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text, 256, num_windows=16)
    apply_recipe(
        model, tokenizer, RECIPES_DIR / "fp8_static_spikefree.yaml", calibration
    )
    runtime = get_runtime(model)
    result = {"device": device, "windows": list(windows.shape)}
    result["fake_quantized"] = perplexity(model, windows, progress=False).ppl
    templates = runtime.templates
    runtime.remove()
    result["fake_quantized_runtime_removed"] = perplexity(
        model, windows, progress=False
    ).ppl
    for detect in ("threshold", "ratio"):
        executed = convert_to_fp8(
            copy.deepcopy(model), "static", templates, detect=detect
        )
        ppl = perplexity(executed, windows, progress=False).ppl
        result[f"executed_{detect}"] = ppl
        result[f"executed_{detect}_relative"] = ppl / result["fake_quantized"] - 1
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
