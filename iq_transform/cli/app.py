"""What each Hydra app does around its job.

- The job's log goes into the run folder (``quantize.log``, ``analyze.log``):
  llm-compressor and iq_transform log through loguru, which Hydra's file handler
  does not see.
- Expected user errors (a bad recipe, data path, model spec, recipe order: every
  ``ValueError`` and ``FileNotFoundError``) print one line, ``<app>: error: ...``,
  with the hint the error carries; ``HYDRA_FULL_ERROR=1`` shows the traceback.
- A single run that fails on such an error leaves no run folder behind.
- ``model=<name>`` that names no preset says that folders and hub ids go through
  ``model.spec=``.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from loguru import logger

__all__ = [
    "DEBUG_ENV",
    "USER_ERRORS",
    "check_model_preset",
    "exit_with_user_error",
    "is_multirun",
    "job_log",
    "model_presets",
    "run_job",
]

USER_ERRORS = (ValueError, FileNotFoundError)
# Hydra's own switch for complete tracebacks
DEBUG_ENV = "HYDRA_FULL_ERROR"


def is_multirun() -> bool:
    """Whether this job is one of a ``-m`` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def job_log(output_dir: Path):
    """Log (loguru) into the run folder's ``<job name>.log`` while the job runs."""
    log_file = output_dir / f"{HydraConfig.get().job.name}.log"
    sink = logger.add(log_file, level="INFO", backtrace=False, diagnose=False)
    try:
        yield log_file
    finally:
        logger.remove(sink)


def exit_with_user_error(app: str, error: Exception, output_dir: Path) -> None:
    """Print ``error`` as one line and exit 1; remove the run folder when it holds
    only Hydra's bookkeeping and the log (re-raise under ``HYDRA_FULL_ERROR=1``)."""
    _remove_if_only_bookkeeping(output_dir)
    if os.environ.get(DEBUG_ENV) == "1":
        raise error
    print(f"{app}: error: {error}", file=sys.stderr)
    print(f"{app}: (the traceback: set {DEBUG_ENV}=1)", file=sys.stderr)
    sys.exit(1)


def run_job(
    app: str,
    job: Callable[[], object],
    output_dir: Path,
    on_failure: Callable[[Exception], object] | None = None,
):
    """Run ``job`` with its log in ``output_dir``.

    A multirun job that fails is recorded by ``on_failure`` and the sweep goes on.
    A single run that fails on a user error prints it as one line and exits 1;
    on any other error it is recorded and raised (Hydra prints the traceback).

    :param app: the app's name, for error lines
    :param job: the job
    :param output_dir: the run folder
    :param on_failure: records a failed job (``iq-quantize`` writes a failed
        ``results.json``)
    """
    with job_log(output_dir):
        try:
            return job()
        except Exception as error:
            expected = isinstance(error, USER_ERRORS)
            if on_failure is not None and (is_multirun() or not expected):
                on_failure(error)
            if is_multirun():
                return None
            if not expected:
                raise
            failure = error
    exit_with_user_error(app, failure, output_dir)


def check_model_preset(app: str, argv: list[str]) -> None:
    """Exit with a hint when ``model=NAME`` names no file in ``conf/model/``.

    :param app: the app's name, for the error line
    :param argv: the command-line overrides
    """
    presets = model_presets()
    for argument in argv:
        key, _, value = argument.partition("=")
        if key != "model" or not value or "(" in value:
            continue
        unknown = [name for name in value.split(",") if name not in presets]
        if unknown:
            print(
                f"{app}: error: model={unknown[0]} is not a model preset (presets: "
                f"{', '.join(presets)}). Any offline name, local folder or hub id "
                f"goes through model.spec=..., e.g. model.spec={unknown[0]}",
                file=sys.stderr,
            )
            sys.exit(2)


def model_presets() -> list[str]:
    """The names ``model=`` takes: the YAML files of ``conf/model/``."""
    folder = resources.files("iq_transform.conf").joinpath("model")
    return sorted(
        p.name.removesuffix(".yaml")
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    )


def _remove_if_only_bookkeeping(output_dir: Path) -> None:
    if not HydraConfig.initialized() or not output_dir.is_dir():
        return
    config = HydraConfig.get()
    made_by_hydra = {config.output_subdir or "", f"{config.job.name}.log"}
    if {p.name for p in output_dir.iterdir()} <= made_by_hydra:
        shutil.rmtree(output_dir)
