"""Every YAML in recipes/ runs through plain llm-compressor oneshot once
iq_transform is imported (tiny planted-spike model)."""

import subprocess
import sys

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


SPIKEFREE_RECIPES = [p for p in RECIPES if "SpikeFreeModifier" in p.read_text()]
MISSING_IMPORT = "No modifier of type 'SpikeFreeModifier' found."


@pytest.mark.parametrize("path", SPIKEFREE_RECIPES, ids=lambda path: path.stem)
def test_spikefree_recipes_say_to_import_iq_transform(path):
    header = "".join(
        line[2:] for line in path.read_text().splitlines(True) if line[:1] == "#"
    )
    assert "after `import iq_transform`" in header
    assert f'"{MISSING_IMPORT}"' in " ".join(header.split())


def test_without_the_import_llm_compressor_says_what_the_headers_quote():
    """A fresh interpreter that never imports iq_transform: the recipe header's
    quote is the error a user really gets."""
    code = (
        "from llmcompressor.recipe import Recipe\n"
        f"Recipe.create_instance({str(SPIKEFREE_RECIPES[0])!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    assert f"ValueError: {MISSING_IMPORT}" in result.stderr
