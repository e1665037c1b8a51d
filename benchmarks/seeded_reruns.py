"""What a seed changes in ``oneshot``: the tiny planted model through QuIP + GPTQ
(W4, groups of 32), GPTQ alone and QuIP + RTN, each with seeds 0, 1 and 0 again.

Per recipe: the calibration orders drawn (llm-compressor's ``RandomSampler``, from
torch's global generator, which ``apply_recipe`` seeds), whether the GPTQ Hessians
of seeds 0 and 1 are bitwise equal and by how much they differ, how many weights
differ after quantization, and whether the logits of seeds 0 and 1 (and of two
seed-0 runs) are equal. QuIP's random Hadamards come from compressed-tensors' own
``torch.Generator()`` (a fixed default seed), not from the global one.

    python benchmarks/seeded_reruns.py --out benchmarks/results/seeded_reruns_cpu.json
"""

from __future__ import annotations

import argparse
import json

import torch
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.transform import QuIPModifier
from torch.utils.data import RandomSampler

from iq_transform.composition.pipeline import apply_recipe
from iq_transform.composition.schemes import quantizer, weight_args
from iq_transform.evaluation.data import TextSource, calibration_windows, load_documents
from iq_transform.models import load_model

RECIPES = {
    "quip_gptq": (True, True),
    "gptq": (False, True),
    "quip_rtn": (True, False),
}

_orders: list[list[int]] = []
_hessians: dict[str, torch.Tensor] = {}
_devices: set[str] = set()


def _record_orders() -> None:
    sampler_iter = RandomSampler.__iter__

    def recorded(self):
        order = list(sampler_iter(self))
        _orders.append(order)
        return iter(order)

    RandomSampler.__iter__ = recorded
    compress = GPTQModifier.compress_modules

    def keep_hessians(self):
        for module, hessian in self._hessians.items():
            _hessians[self._module_names[module]] = hessian.detach().cpu().clone()
            _devices.add(f"{hessian.device.type} {hessian.dtype}")
        return compress(self)

    GPTQModifier.compress_modules = keep_hessians


def _run(seed: int, quip: bool, gptq: bool, calibration, prompts):
    model, tokenizer = load_model("tiny-planted")
    recipe = [QuIPModifier(transform_type="random-hadamard")] if quip else []
    recipe.append(quantizer(weight_args("int", 4, "group", 32), None, gptq=gptq))
    _orders.clear()
    _hessians.clear()
    _devices.clear()
    apply_recipe(model, tokenizer, recipe, calibration, seed=seed)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=prompts.to(device)).logits.float().cpu()
    weights = {
        name: value.detach().float().cpu().clone()
        for name, value in model.state_dict().items()
        if value.is_floating_point()
    }
    return {
        "logits": logits,
        "weights": weights,
        "orders": [list(order) for order in _orders],
        "hessians": dict(_hessians),
        "device": device.type,
    }


def compare(quip: bool, gptq: bool, calibration, prompts) -> dict:
    zero, one, again = (_run(s, quip, gptq, calibration, prompts) for s in (0, 1, 0))
    hessian_devices = sorted(_devices)
    differing = {
        name: int((zero["weights"][name] != one["weights"][name]).sum())
        for name in zero["weights"]
        if zero["weights"][name].shape == one["weights"][name].shape
    }
    differing = {name: count for name, count in differing.items() if count}
    logit_gap = (zero["logits"] - one["logits"]).abs().max().item()
    report = {
        "model_device": zero["device"],
        "orders_seed0": zero["orders"],
        "orders_seed1": one["orders"],
        "seed0_rerun_logits_equal": torch.equal(zero["logits"], again["logits"]),
        "seed0_seed1_logits_equal": torch.equal(zero["logits"], one["logits"]),
        "seed0_seed1_logits_max_abs": logit_gap,
        "weights_differing_seed0_seed1": sum(differing.values()),
        "first_differing_tensors": dict(list(differing.items())[:4]),
    }
    if zero["hessians"]:
        names = list(zero["hessians"])
        h0, h1 = zero["hessians"], one["hessians"]
        report["hessian_device"] = hessian_devices
        report["hessians_bitwise_equal_seed0_seed1"] = (
            f"{sum(torch.equal(h0[n], h1[n]) for n in names)}/{len(names)}"
        )
        first = names[0]
        report["first_hessian"] = first
        report["first_hessian_max_rel_diff"] = (
            (h0[first] - h1[first]).abs().max() / h0[first].abs().max()
        ).item()
        report["hessians_bitwise_equal_seed0_rerun"] = all(
            torch.equal(h0[n], again["hessians"][n]) for n in names
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    _record_orders()
    _, tokenizer = load_model("tiny-planted")
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))[:200]
    calibration = calibration_windows(tokenizer, documents, num_samples=4, seqlen=128)
    prompts = calibration[:2, :64]
    report = {
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "recipes": {
            name: compare(*RECIPES[name], calibration, prompts) for name in args.recipes
        },
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
