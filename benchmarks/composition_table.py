"""The composition table: recipes x {none, SpikeFree, PrefixQuant-style, QFeM-style}
x {static per-tensor, dynamic per-token}, WikiText-2 PPL and oneshot wall time.

One command runs every family as an ``iq-quantize`` multirun (through the
interpreter running this script, so a checkout on ``PYTHONPATH`` is what runs) into
one sweep folder (one subfolder per combination) and renders it with
``iq-report``::

    python benchmarks/composition_table.py --models smollm2-135m gemma3-270m
    python benchmarks/composition_table.py --families w8a8 --jobs 2
    python benchmarks/composition_table.py --models gemma3-270m --stages quip_gptq

Rows are compared with the dynamic per-token run of the same model, stages and
formats; every run's ``results.json`` and ``recipe.yaml`` stay in the folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

TRANSFORMS = "none,spikefree,prefix,qfem"
# family -> (quant options, stage chains)
FAMILIES = {
    "w8a8": ("w8a8_static,w8a8_dynamic", "rtn,smoothquant_gptq,quip_gptq"),
    "fp8": ("fp8_static,fp8_dynamic", "rtn"),
    "w4": ("w4a8_static,w4a8_dynamic,w4a4_static,w4a4_dynamic", "quip_gptq"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument(
        "--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES)
    )
    parser.add_argument("--transforms", default=TRANSFORMS)
    parser.add_argument(
        "--quants",
        default=None,
        help="only these quant options of the chosen families, comma-separated "
        "(e.g. w4a4_static)",
    )
    parser.add_argument(
        "--stages",
        default=None,
        help="stage chains for every family instead of its own (e.g. quip_gptq)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="parallel runs (joblib launcher)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="sweep folder (default: a new one)"
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="INT4 weight group (64 divides SmolLM2's 576 and Gemma-3's 640)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra iq-quantize overrides (eval.num_samples=4)"
    )
    args = parser.parse_intermixed_args()
    quants = None if args.quants is None else args.quants.split(",")
    if quants is not None:
        chosen = {q for f in args.families for q in FAMILIES[f][0].split(",")}
        if unknown := sorted(set(quants) - chosen):
            parser.error(
                f"--quants {' '.join(unknown)}: not in the chosen families; "
                f"choose from {sorted(chosen)}"
            )
    output = args.output or Path("multirun/composition") / time.strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    env = dict(os.environ)
    launcher = []
    if args.jobs > 1:
        # Processes share the cores: one thread each avoids oversubscription.
        env["OMP_NUM_THREADS"] = "1"
        launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.jobs}"]
    for family in args.families:
        quant, stages = FAMILIES[family]
        if quants is not None:
            quant = ",".join(q for q in quant.split(",") if q in quants)
            if not quant:
                continue
        stages = args.stages or stages
        command = [
            sys.executable,
            "-m",
            "iq_transform.cli.quantize",
            "-m",
            f"model={','.join(args.models)}",
            f"quant={quant}",
            f"stages={stages}",
            f"transform={args.transforms}",
            f"quant.group_size={args.group_size}",
            "progress=false",
            f"hydra.sweep.dir={output}",
            "hydra.sweep.subdir=${hydra.job.override_dirname}",
            *launcher,
            *args.overrides,
        ]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, env=env, check=True)
    subprocess.run(
        [sys.executable, "-m", "iq_transform.cli.report", str(output)], check=True
    )
    print((output / "results.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
