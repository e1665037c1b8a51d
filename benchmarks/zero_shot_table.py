"""The zero-shot table: lm-eval accuracy on the eight commonsense tasks (offline,
``eval=csr``) beside WikiText-2 perplexity and a greedy-generation check, for FP32,
INT8 dynamic / static / static + SpikeFree (RTN and QuIP + GPTQ), W4A4 static
with and without SpikeFree (QuIP + GPTQ), its dynamic reference, and the
PrefixQuant-style baseline.

One command runs every row as an ``iq-quantize`` multirun over the models (through
the interpreter running this script, so a checkout on ``PYTHONPATH`` is what runs)
into one sweep folder, renders it with ``iq-report`` and writes a small summary
JSON (per-task accuracy, standard errors, paired differences)::

    python benchmarks/zero_shot_table.py --models smollm2-135m --limit 20
    python benchmarks/zero_shot_table.py --rows fp32 w8a8_dynamic --limit 0.1
    python benchmarks/zero_shot_table.py --report-only multirun/zero_shot/<time>

``--limit`` is documents per task (omit it for the full validation sets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# row name -> iq-quantize overrides
ROWS = {
    "fp32": ["recipe=none"],
    "w8a8_dynamic_rtn": ["quant=w8a8_dynamic", "stages=rtn", "transform=none"],
    "w8a8_static_rtn": ["quant=w8a8_static", "stages=rtn", "transform=none"],
    "w8a8_static_rtn_spikefree": [
        "quant=w8a8_static",
        "stages=rtn",
        "transform=spikefree",
    ],
    "w8a8_dynamic_quip_gptq": [
        "quant=w8a8_dynamic",
        "stages=quip_gptq",
        "transform=none",
    ],
    "w8a8_static_quip_gptq_spikefree": [
        "quant=w8a8_static",
        "stages=quip_gptq",
        "transform=spikefree",
    ],
    "w4a4_dynamic_quip_gptq": [
        "quant=w4a4_dynamic",
        "stages=quip_gptq",
        "transform=none",
    ],
    "w4a4_static_quip_gptq": [
        "quant=w4a4_static",
        "stages=quip_gptq",
        "transform=none",
    ],
    "w4a4_static_quip_gptq_spikefree": [
        "quant=w4a4_static",
        "stages=quip_gptq",
        "transform=spikefree",
    ],
    "w4a4_static_quip_gptq_prefix": [
        "quant=w4a4_static",
        "stages=quip_gptq",
        "transform=prefix",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="documents per task (a fraction below 1; default: all)",
    )
    parser.add_argument("--output", type=Path, default=None, help="sweep folder")
    parser.add_argument(
        "--summary", type=Path, default=None, help="summary JSON (default: in sweep)"
    )
    parser.add_argument(
        "--report-only", type=Path, default=None, help="only report this sweep"
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra iq-quantize overrides (eval.num_samples=4)"
    )
    args = parser.parse_intermixed_args()
    output = args.report_only or args.output
    output = output or Path("multirun/zero_shot") / time.strftime("%Y-%m-%d_%H-%M-%S")
    if args.report_only is None:
        limit = [] if args.limit is None else [f"eval.limit={args.limit:g}"]
        for row in args.rows:
            command = [
                sys.executable,
                "-m",
                "iq_transform.cli.quantize",
                "-m",
                f"model={','.join(args.models)}",
                *ROWS[row],
                "eval=csr",
                *limit,
                "quant.group_size=64",
                "progress=false",
                f"hydra.sweep.dir={output}",
                "hydra.sweep.subdir=${hydra.job.override_dirname}",
                *args.overrides,
            ]
            print("+", " ".join(command), flush=True)
            subprocess.run(command, env=dict(os.environ), check=True)
    subprocess.run(
        [sys.executable, "-m", "iq_transform.cli.report", str(output)], check=True
    )
    from iq_transform.reports.zero_shot import summarize

    summary = summarize(output)
    path = args.summary or output / "zero_shot_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print((output / "results.md").read_text())
    print(f"summary: {path}")


if __name__ == "__main__":
    sys.exit(main())
