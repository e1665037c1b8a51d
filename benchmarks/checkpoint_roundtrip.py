"""Save and reload a SpikeFree model; what a plain load would give instead.

One run: oneshot with a recipe (default W8A8 static + SpikeFree, RTN), WikiText-2
perplexity in memory, ``save_pretrained(save_compressed=True)``, then
- ``iq_transform.load_pretrained`` (= ``AutoModelForCausalLM.from_pretrained``
  after ``import iq_transform``): perplexity, logits, greedy tokens with the KV
  cache against the model in memory;
- the base class forced onto the folder (``LlamaForCausalLM.from_pretrained``, as a
  tool that ignores the model type would): the model without its runtime;
- ``AutoModelForCausalLM.from_pretrained`` in a fresh interpreter that never
  imported iq_transform: its error.

Example::

    python benchmarks/checkpoint_roundtrip.py --model smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

import iq_transform
from iq_transform import get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation import (
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
    perplexity,
)
from iq_transform.export.format import STATE_FILE, TENSORS_FILE
from iq_transform.models import load_model
from iq_transform.models.arch import base_model_type

NEW_TOKENS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="recipes/w8a8_static_spikefree.yaml")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--output", type=Path, default=None, help="results JSON")
    return parser.parse_args()


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[0, ids.shape[1] :]


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model(args.model)
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))
    calibration = calibration_windows(
        tokenizer, documents, args.calib_samples, args.seqlen
    )
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text, args.seqlen, args.eval_windows)
    prompt = windows[:1, :32]
    apply_recipe(model, tokenizer, Path(args.recipe), calibration)
    with torch.no_grad():
        logits = model(windows).logits
    rows = {"in memory": perplexity(model, windows, progress=False).ppl}
    tokens = greedy(model, prompt)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        start = time.perf_counter()
        model.save_pretrained(folder, save_compressed=True)
        tokenizer.save_pretrained(folder)
        save_seconds = time.perf_counter() - start
        sizes = {
            name: (folder / name).stat().st_size for name in (STATE_FILE, TENSORS_FILE)
        }
        start = time.perf_counter()
        reloaded = iq_transform.load_pretrained(folder)
        load_seconds = time.perf_counter() - start
        rows["iq_transform.load_pretrained"] = perplexity(
            reloaded, windows, progress=False
        ).ppl
        with torch.no_grad():
            logit_diff = (reloaded(windows).logits - logits).abs().max().item()
        agree = (greedy(reloaded, prompt) == tokens).float().mean().item()
        assert get_runtime(reloaded) is not None
        del reloaded

        base = MODEL_FOR_CAUSAL_LM_MAPPING[
            CONFIG_MAPPING[base_model_type(model.config)]
        ]
        plain = base.from_pretrained(folder).eval()
        rows[f"{base.__name__}.from_pretrained (no runtime)"] = perplexity(
            plain, windows, progress=False
        ).ppl
        plain_tokens = greedy(plain, prompt)
        plain_agree = (plain_tokens == tokens).float().mean().item()
        del plain

        fresh = subprocess.run(
            [
                sys.executable,
                "-c",
                "from transformers import AutoModelForCausalLM\n"
                f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n",
            ],
            capture_output=True,
            text=True,
        )
        error = [
            line.replace(str(folder), "<checkpoint>")
            for line in fresh.stderr.splitlines()
            if "Error" in line
        ][-1:]

    print(f"{args.model}, {args.recipe}, {args.eval_windows}x{args.seqlen} WikiText-2")
    print("\n| model | WikiText-2 PPL |\n|---|---|")
    for name, ppl in rows.items():
        print(f"| {name} | {ppl:.3f} |")
    print(
        f"\nreloaded vs in memory: max |logit diff| {logit_diff:.2e}, greedy tokens "
        f"agree {agree:.0%} ({NEW_TOKENS} tokens, KV cache); without the runtime "
        f"{plain_agree:.0%}"
    )
    print(f"save {save_seconds:.1f} s, load {load_seconds:.1f} s; files {sizes}")
    print(f"plain AutoModelForCausalLM without import iq_transform: {error}")
    results = {
        "model": args.model,
        "recipe": args.recipe,
        "ppl": rows,
        "max_logit_diff": logit_diff,
        "greedy_agreement": agree,
        "greedy_agreement_without_runtime": plain_agree,
        "save_seconds": save_seconds,
        "load_seconds": load_seconds,
        "bytes": sizes,
        "plain_load_error": error,
        "plain_load_returncode": fresh.returncode,
    }
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
