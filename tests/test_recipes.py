"""Every YAML in recipes/ runs through plain llm-compressor oneshot once
iq_transform is imported (tiny planted-spike model)."""

import pytest
import torch

from iq_transform import get_runtime
from iq_transform.composition.pipeline import RECIPES_DIR, apply_recipe
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.models import load_model

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))


def test_the_recipes_cover_every_scheme():
    names = {path.stem for path in RECIPES}
    for scheme in ("w8a8", "fp8", "w4a8", "w4a4"):
        assert f"{scheme}_dynamic" in names or f"{scheme}_dynamic_quip_gptq" in names
        assert any(n.startswith(f"{scheme}_static_spikefree") for n in names)


@pytest.mark.parametrize("path", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_runs_in_plain_oneshot(path, calibration, planted_windows):
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, path, calibration)
    down_proj = model.model.layers[1].mlp.down_proj
    assert down_proj.quantization_scheme is not None
    spikefree = "spikefree" in path.stem
    assert (get_runtime(model) is not None) is spikefree
    static = "static" in path.stem
    assert hasattr(down_proj, "input_scale") is static
    ppl = perplexity(model, planted_windows, progress=False).ppl
    assert torch.isfinite(torch.tensor(ppl)) and ppl > 1
