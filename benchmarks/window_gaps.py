"""Where an executed model's perplexity parts from the fake-quantized one's.

Reads ``iq-quantize execute=... `` results (``eval`` and ``eval_fake_quantized``
with per-window NLL and spike tokens) and prints, per file: both perplexities,
the spike tokens each handled, the windows whose spike count differs, the share
of the NLL gap those windows carry, and the per-window gap's mean ± se::

    python benchmarks/window_gaps.py benchmarks/results/int8_quality/*_eval64.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    for path in paths:
        results = json.loads(Path(path).read_text())
        executed, fake = results["eval"], results["eval_fake_quantized"]
        gaps = [
            a - b
            for a, b in zip(executed["window_nll"], fake["window_nll"], strict=True)
        ]
        spikes, fake_spikes = (
            executed["window_spike_tokens"],
            fake["window_spike_tokens"],
        )
        counts = zip(spikes, fake_spikes, strict=True)
        differ = [i for i, (a, b) in enumerate(counts) if a != b]
        total, in_differ = sum(gaps), sum(gaps[i] for i in differ)
        share = in_differ / total if total else float("nan")
        per_window = total / len(gaps)
        se = statistics.stdev(gaps) / math.sqrt(len(gaps))
        print(
            f"{Path(path).name}: fake {fake['ppl']:.3f}, executed {executed['ppl']:.3f}"
            f" ({executed['ppl'] / fake['ppl'] - 1:+.2%}); spike tokens"
            f" {sum(fake_spikes)} / {sum(spikes)}; windows whose count differs"
            f" {len(differ)} of {len(gaps)}, carrying {share:.0%} of the NLL gap"
            f" ({total:+.2f} nats); per window {per_window:+.2f} ± {se:.2f} nats,"
            f" largest |gap| {max(map(abs, gaps)):.1f} of"
            f" {statistics.mean(fake['window_nll']):.0f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
