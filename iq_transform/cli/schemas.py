"""The typed configs, registered with Hydra's ConfigStore for the apps."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from iq_transform.composition.config import AnalyzeConfig, QuantizeConfig, recipe_label

__all__ = ["register_configs"]


def register_configs() -> None:
    """Make the schemas known to Hydra (called at import of each app module, so
    launcher workers that re-import it see them too)."""
    store = ConfigStore.instance()
    store.store(name="analyze_schema", node=AnalyzeConfig)
    store.store(name="quantize_schema", node=QuantizeConfig)
    # ${iq_recipe_label:${recipe},${quant.name},${stages.name},${transform.name}}
    OmegaConf.register_new_resolver("iq_recipe_label", recipe_label, replace=True)
