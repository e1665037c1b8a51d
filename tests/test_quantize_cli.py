import json
from pathlib import Path

import pytest
import yaml

from tests.test_cli import run_app

# iq-quantize on the tiny planted model with short windows (seconds)
TINY_RUN = (
    "model=tiny-planted",
    "data.num_samples=4",
    "data.seqlen=128",
    "eval.num_samples=2",
    "eval.seqlen=128",
    "progress=false",
)


def test_quantize_app_writes_results_and_recipe(tmp_path):
    result = run_app(
        "iq-quantize",
        *TINY_RUN,
        "recipe=w8a8_static_spikefree_minmax",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["model"] == "tiny-planted"
    assert results["config"]["data"]["num_samples"] == 4
    assert results["eval"]["num_windows"] == 2 and results["ppl"] > 1
    assert results["oneshot_seconds"] > results["spikefree_calibration_seconds"] > 0
    assert results["spike_tokens_in_eval"] >= 2  # every window starts with BOS
    # per window: the NLLs add up to the total, every window has its BOS carrier
    evaluated = results["eval"]
    assert sum(evaluated["window_nll"]) == pytest.approx(evaluated["nll_sum"])
    assert len(evaluated["window_spike_tokens"]) == 2
    assert min(evaluated["window_spike_tokens"]) >= 1
    assert sum(evaluated["window_spike_tokens"]) == results["spike_tokens_in_eval"]
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert "SpikeFreeModifier" in str(recipe)


def test_quantize_app_unknown_recipe_names_the_choices(tmp_path):
    result = run_app(
        "iq-quantize", "model=tiny-planted", "recipe=nope", cwd=Path(tmp_path)
    )
    assert result.returncode != 0
    assert "Unknown recipe 'nope'" in result.stderr
    assert "w8a8_static_spikefree" in result.stderr


@pytest.mark.slow
def test_smollm2_spikefree_static_is_much_closer_to_dynamic(tmp_path):
    """A short real run: 4x256 calibration, 2x256 evaluation windows."""
    from iq_transform import SpikeFreeModifier
    from iq_transform.composition.pipeline import apply_recipe
    from iq_transform.composition.schemes import w8a8_quantizer
    from iq_transform.evaluation.data import (
        TextSource,
        calibration_windows,
        evaluation_windows,
        load_documents,
        load_text,
    )
    from iq_transform.evaluation.perplexity import perplexity
    from iq_transform.models import load_model
    from tests.test_spikefree import static_int8

    _, tokenizer = load_model("smollm2-135m")
    calibration = calibration_windows(
        tokenizer, load_documents(TextSource(path="shared/brown/brown.txt")), 4, 256
    )
    windows = evaluation_windows(
        tokenizer,
        load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw")),
        256,
        2,
    )
    recipes = {
        "dynamic": lambda: [w8a8_quantizer("int", dynamic=True)],
        "static": lambda: [static_int8("minmax")],
        "spikefree": lambda: [SpikeFreeModifier(), static_int8("spikefree_minmax")],
    }
    ppl = {}
    for name, recipe in recipes.items():
        model, tokenizer = load_model("smollm2-135m")
        apply_recipe(model, tokenizer, recipe(), calibration)
        ppl[name] = perplexity(model, windows, progress=False).ppl
    gap_static = ppl["static"] - ppl["dynamic"]
    gap_spikefree = ppl["spikefree"] - ppl["dynamic"]
    assert gap_static > 0.3 * ppl["dynamic"]  # the spike really ruins static scales
    assert gap_spikefree < 0.5 * gap_static, ppl


def test_the_app_runs_as_a_module_as_the_benchmarks_call_it(tmp_path):
    """``python -m iq_transform.cli.quantize`` (benchmarks/composition_table.py)
    finds the packaged configs like the console script does."""
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "iq_transform.cli.quantize",
            *TINY_RUN,
            "recipe=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["recipe"] == "none" and results["ppl"] > 1
