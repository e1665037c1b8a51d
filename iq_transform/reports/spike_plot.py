"""Figures a person reads at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from iq_transform.evaluation.spike_analysis import LINEAR_INPUT, RESIDUAL, SpikeReport  # noqa: E402

__all__ = ["plot_spike_report"]


def plot_spike_report(report: SpikeReport, path: str | Path) -> Path:
    """Per-layer top-1/2/3 |activation| and median, log scale (as in Sun et al.
    2024, "Massive activations"), for the residual stream and ``down_proj`` inputs.
    """
    residual = [s for s in report.sites if s.kind == RESIDUAL]
    down_proj = [
        s for s in report.sites if s.kind == LINEAR_INPUT and "down_proj" in s.name
    ]
    panels = [("residual stream (decoder layer output)", residual)]
    if down_proj:
        panels.append(("MLP down_proj input", down_proj))
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False
    )
    for axis, (title, sites) in zip(axes[0], panels, strict=True):
        layers = [site.layer for site in sites]
        for rank, marker in zip(range(3), ("o", "s", "^"), strict=True):
            values = [
                site.top[rank].value if len(site.top) > rank else float("nan")
                for site in sites
            ]
            axis.plot(layers, values, marker=marker, ms=4, label=f"top-{rank + 1}")
        axis.plot(layers, [s.median_abs for s in sites], "k--", lw=1, label="median")
        for site in sites:
            if site.spike_tokens:
                axis.axvspan(
                    site.layer - 0.5, site.layer + 0.5, color="red", alpha=0.08
                )
        axis.set_yscale("log")
        axis.set_xlabel("layer")
        axis.set_ylabel("|activation|")
        axis.set_title(title)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8)
    verdict = (
        f"{len(report.spike_tokens)} spike tokens (ratio {report.ratio:g}); shaded: "
        "layers with spike tokens"
        if report.has_spikes
        else f"no spike tokens at ratio {report.ratio:g}"
    )
    figure.suptitle(f"{report.model}: {verdict}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
