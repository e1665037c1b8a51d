"""``iq-quantize``: load a model, oneshot it with a recipe, measure perplexity.

The job is :func:`iq_transform.composition.job.run_quantize`; this module is the
Hydra app around it. In a multirun (``-m``) a failing job writes ``results.json``
with ``"status": "failed"``, the error and its traceback, and the sweep goes on.

Example::

    iq-quantize quant=w8a8_static transform=spikefree stages=gptq model=gemma3-270m
    iq-quantize -m transform=none,spikefree quant=w8a8_static,w8a8_dynamic
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from iq_transform.cli.app import check_model_preset, run_job
from iq_transform.cli.schemas import register_configs
from iq_transform.composition.config import QuantizeConfig
from iq_transform.composition.job import run_quantize, write_failure

register_configs()

APP = "iq-quantize"


@hydra.main(
    version_base="1.3", config_path="pkg://iq_transform.conf", config_name="quantize"
)
def hydra_main(config: DictConfig) -> None:
    typed: QuantizeConfig = OmegaConf.to_object(config)
    output_dir = Path(typed.output_dir or HydraConfig.get().runtime.output_dir)
    run_job(
        APP,
        lambda: run_quantize(typed, output_dir),
        output_dir,
        on_failure=lambda error: write_failure(output_dir, typed, error),
    )


def main() -> None:
    """Entry point of ``iq-quantize``."""
    check_model_preset(APP, sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
