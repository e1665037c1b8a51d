"""Which spike decisions differ between an executed and a fake-quantized model.

Runs ``iq-quantize`` in this process with its overrides (``execute=`` among them)
and records, during the two perplexity evaluations (fake-quantized, then
executed), every detection the runtime makes: per forward, call and sequence,
the rows the ratio-to-median test and the calibrated absolute threshold each
select, and the rows decided. It then prints, per site (layer input or
``down_proj`` input of a layer), in how many sequences the two models decided
differently and which test the difference came from::

    python benchmarks/detection_flips.py execute=int8_cpu quant=w8a8_static \\
        transform=spikefree model=gemma3-270m stages=rtn data.num_samples=8 \\
        eval.num_samples=64 hydra.run.dir=/tmp/flips
"""

from __future__ import annotations

import collections
import json
import sys

from iq_transform.cli import quantize
from iq_transform.composition import job
from iq_transform.spikefree import runtime as runtime_module
from iq_transform.spikefree.detect import spike_token_mask, token_max

RECORDS: dict[str, list] = {"fake": [], "executed": []}
STATE = {"phase": None, "executed": False, "forward": None, "layer": None}


def _recording_evaluate(evaluate):
    def wrapped(*args, **kwargs):
        STATE["phase"] = "executed" if STATE["executed"] else "fake"
        try:
            return evaluate(*args, **kwargs)
        finally:
            STATE["phase"] = None

    return wrapped


def _recording_execute(execute):
    def wrapped(*args, **kwargs):
        STATE["executed"] = True
        return execute(*args, **kwargs)

    return wrapped


def _recording_begin(begin):
    def wrapped(self, *args, **kwargs):
        if STATE["phase"] is not None:
            STATE["forward"] = []
            RECORDS[STATE["phase"]].append(STATE["forward"])
        return begin(self, *args, **kwargs)

    return wrapped


def _recording_spike_rows(spike_rows):
    def wrapped(
        self,
        hidden,
        mask,
        threshold,
        also=None,
        kinds=None,
        zero=False,
        write=None,
        follow=False,
    ):
        if STATE["phase"] is not None and STATE["forward"] is not None:
            peaks = token_max(hidden)
            by_ratio = spike_token_mask(peaks, self.ratio, mask)
            by_threshold = peaks > threshold.float()
        rows = spike_rows(
            self, hidden, mask, threshold, also, kinds, zero, write, follow
        )
        if STATE["phase"] is not None and STATE["forward"] is not None:
            STATE["forward"].append(
                {
                    "site": "down_proj" if zero else "input",
                    "layer": STATE["layer"],
                    "ratio": by_ratio.cpu(),
                    "threshold": by_threshold.cpu(),
                    "rows": rows.cpu(),
                }
            )
        return rows

    return wrapped


def compare() -> dict:
    fake, executed = RECORDS["fake"], RECORDS["executed"]
    if len(fake) != len(executed):
        raise SystemExit(f"{len(fake)} fake forwards vs {len(executed)} executed")
    sites = collections.defaultdict(collections.Counter)
    for forward_fake, forward_executed in zip(fake, executed, strict=True):
        for a, b in zip(forward_fake, forward_executed, strict=True):
            key = f"layer {a['layer']:2d} {a['site']}"
            differs = (a["rows"] != b["rows"]).any(dim=-1)
            counter = sites[key]
            counter["sequences"] += differs.numel()
            counter["rows_fake"] += int(a["rows"].sum())
            counter["rows_executed"] += int(b["rows"].sum())
            counter["differ"] += int(differs.sum())
            counter["by_ratio"] += int((a["ratio"] != b["ratio"]).any(-1).sum())
            counter["by_threshold"] += int(
                (a["threshold"] != b["threshold"]).any(-1).sum()
            )
    return {site: dict(counts) for site, counts in sites.items()}


def _recording_layer(before_layer):
    def wrapped(self, *args, **kwargs):
        STATE["layer"] = self.index
        return before_layer(self, *args, **kwargs)

    return wrapped


def main() -> None:
    job.evaluate = _recording_evaluate(job.evaluate)
    job.execute = _recording_execute(job.execute)
    cls = runtime_module.SpikeFreeRuntime
    cls.begin_forward = _recording_begin(cls.begin_forward)
    cls.spike_rows = _recording_spike_rows(cls.spike_rows)
    layer = runtime_module.LayerRuntime
    layer._before_layer = _recording_layer(layer._before_layer)
    try:
        quantize.main()
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
    report = compare()
    for site, counts in sorted(report.items()):
        if counts["differ"] or counts["rows_fake"] or counts["rows_executed"]:
            print(site, json.dumps(counts))


if __name__ == "__main__":
    sys.exit(main())
