"""Where a static recipe loses to dynamic activations: switch groups to dynamic.

Runs one composed ``iq-quantize`` configuration (the same overrides), then
evaluates with the input activations of one group of Linears switched to dynamic
per-token scales (weights, rotations and every other group unchanged): all of them,
each kind (q/k/v, o_proj, gate/up, down_proj), and each layer's ``down_proj``::

    python benchmarks/dynamic_groups.py quant=w4a4_static stages=quip_gptq \\
        transform=spikefree quant.group_size=64 data.num_samples=8 --eval-windows 4
"""

from __future__ import annotations

import argparse
import json
import re
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn

from iq_transform.cli.schemas import register_configs
from iq_transform.composition.job import compose_from_config, oneshot_from_config
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.models.arch import get_arch_spec

KINDS = {
    "q/k/v": r"self_attn\.[qkv]_proj$",
    "o_proj": r"self_attn\.o_proj$",
    "gate/up": r"mlp\.(gate|up)_proj$",
    "down_proj": r"mlp\.down_proj$",
}


def statically_quantized_linears(model: nn.Module) -> dict[str, nn.Linear]:
    linears = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        activations = getattr(scheme, "input_activations", None)
        if isinstance(module, nn.Linear) and activations and not activations.dynamic:
            linears[name] = module
    return linears


@contextmanager
def dynamic_inputs(linears: list[nn.Linear]):
    """Per-token dynamic input scales for ``linears``; each gets its own scheme
    copy, since compressed-tensors shares one scheme object between modules."""
    saved = [linear.quantization_scheme for linear in linears]
    for linear, scheme in zip(linears, saved, strict=True):
        dynamic = scheme.input_activations.model_copy(
            update={"dynamic": True, "strategy": "token"}
        )
        linear.quantization_scheme = scheme.model_copy(
            update={"input_activations": dynamic}
        )
    try:
        yield
    finally:
        for linear, scheme in zip(linears, saved, strict=True):
            linear.quantization_scheme = scheme


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--output", type=Path, default=None, help="JSON file")
    parser.add_argument("overrides", nargs="*", help="iq-quantize overrides")
    args = parser.parse_intermixed_args()

    register_configs()
    with initialize_config_module(
        config_module="iq_transform.conf", version_base="1.3"
    ):
        config = OmegaConf.to_object(
            compose(config_name="quantize", overrides=args.overrides)
        )
    model, tokenizer = config.model.load()
    calibration = config.data.calibration_windows(tokenizer)
    windows = config.eval.evaluation_windows(tokenizer)[: args.eval_windows]
    recipe, plan = compose_from_config(config, model, tokenizer, calibration)
    oneshot_from_config(config, model, tokenizer, recipe, calibration, plan)
    linears = statically_quantized_linears(model)
    prefix = plan.prefix_ids or None

    def ppl(names: list[str]) -> float:
        with dynamic_inputs([linears[name] for name in names]):
            return perplexity(model, windows, progress=False, prefix=prefix).ppl

    groups = {"none (all static)": [], "all": list(linears)}
    for kind, pattern in KINDS.items():
        groups[kind] = [name for name in linears if re.search(pattern, name)]
    for index in range(len(get_arch_spec(model).decoder_layers(model))):
        groups[f"down_proj layer {index}"] = [
            name for name in linears if name.endswith(f".{index}.mlp.down_proj")
        ]
    static, dynamic = ppl([]), ppl(groups["all"])
    print(f"{config.recipe_label()}: {args.eval_windows} windows")
    print("| inputs switched to dynamic | PPL | share of the static gap |")
    print("|---|---|---|")
    results = {}
    for label, names in groups.items():
        value = ppl(names) if names else static
        results[label] = value
        share = (static - value) / (static - dynamic) if static != dynamic else 0.0
        print(f"| {label} | {value:.2f} | {share:.0%} |", flush=True)
    if args.output:
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
