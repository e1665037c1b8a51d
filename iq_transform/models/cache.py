"""The cache of converted and built models, written atomically."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

__all__ = ["CACHE_ENV_VAR", "cached_build", "default_cache_dir", "offline_model_dir"]

CACHE_ENV_VAR = "IQ_TRANSFORM_CACHE"


def default_cache_dir() -> Path:
    """The cache root: ``$IQ_TRANSFORM_CACHE``, else ``~/.cache/iq_transform``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "iq_transform"


def offline_model_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """The folder an offline model is (or will be) converted into."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    return root / "models" / name


def cached_build(
    name: str, cache_dir: str | Path | None, write: Callable[[Path, Path], None]
) -> Path:
    """
    The cache folder of ``name``, written by ``write(staging, work_dir)`` if missing.

    Everything is written into a temporary folder next to the target and renamed at
    the end, so an interrupted conversion never leaves a half-written cache.
    """
    target = offline_model_dir(name, cache_dir)
    if (target / "config.json").is_file():
        logger.debug(f"Using cached {name} from {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}.tmp-") as tmp:
        staging = Path(tmp) / name
        write(staging, Path(tmp) / "work")
        _publish(staging, target)
    logger.info(f"Wrote {name} into {target} in {time.perf_counter() - start:.1f} s")
    return target


def _publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place; a concurrent finished one wins."""
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info(f"{target} was converted concurrently; keeping that one")
