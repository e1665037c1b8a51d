"""``iq-analyze``: find a model's massive activations and write spikes.json/png.

Example::

    iq-analyze model=gemma3-270m data.num_samples=4 data.seqlen=256
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import OmegaConf

from iq_transform.cli.app import check_model_preset, run_job
from iq_transform.cli.schemas import register_configs
from iq_transform.composition.config import AnalyzeConfig
from iq_transform.evaluation.spike_analysis import analyze_spikes
from iq_transform.reports.spike_plot import plot_spike_report

register_configs()

APP = "iq-analyze"


def run_analysis(config: AnalyzeConfig, output_dir: Path) -> dict:
    """Load, analyze, write ``spikes.json`` and ``spikes.png``; return the report."""
    model, tokenizer = config.model.load()
    windows = config.data.calibration_windows(tokenizer)
    report = analyze_spikes(
        model,
        tokenizer,
        windows,
        ratio=config.ratio,
        top_k=config.top_k,
        model_name=config.model.spec,
        progress=config.progress,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    result = report.to_dict()
    (output_dir / "spikes.json").write_text(json.dumps(result, indent=1))
    plot_spike_report(report, output_dir / "spikes.png")
    print(report.summary())
    logger.info(f"wrote {output_dir / 'spikes.json'} and {output_dir / 'spikes.png'}")
    return result


@hydra.main(
    version_base="1.3", config_path="pkg://iq_transform.conf", config_name="analyze"
)
def hydra_main(config) -> None:
    typed: AnalyzeConfig = OmegaConf.to_object(config)
    output_dir = Path(typed.output_dir or HydraConfig.get().runtime.output_dir)
    run_job(APP, lambda: run_analysis(typed, output_dir), output_dir)


def main() -> None:
    """Entry point of ``iq-analyze``."""
    check_model_preset(APP, sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
