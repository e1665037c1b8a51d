"""What a new user meets at the command line: one-line errors with their hint, no
empty run folders, a log in the run folder, model presets and specs told apart, an
unreachable hub found at once."""

import json
import time

import pytest

from iq_transform.composition.config import recipe_label
from iq_transform.models import ModelSpecError, load_model, loading
from iq_transform.models.registry import OFFLINE_MODELS
from tests.test_cli import REPO, run_app
from tests.test_quantize_cli import TINY_RUN


def test_a_user_error_is_one_line_and_leaves_no_run_folder(tmp_path):
    run = tmp_path / "run"
    result = run_app(
        "iq-quantize", *TINY_RUN, "recipe=nope", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "iq-quantize: error: Unknown recipe 'nope'" in result.stderr
    assert "HYDRA_FULL_ERROR=1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run.exists()


def test_hydra_full_error_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    result = run_app(
        "iq-quantize", *TINY_RUN, "recipe=nope", "hydra.run.dir=run", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RecipeError" in result.stderr


def test_analyze_errors_are_one_line_too(tmp_path):
    result = run_app(
        "iq-analyze", "model.spec=/no/such/folder/x", "hydra.run.dir=run", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "iq-analyze: error: Unknown model spec '/no/such/folder/x'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_preset_points_at_model_spec(tmp_path):
    for app in ("iq-quantize", "iq-analyze"):
        result = run_app(app, "model=my-model", cwd=tmp_path)
        assert result.returncode == 2
        assert f"{app}: error: model=my-model is not a model preset" in result.stderr
        assert "model.spec=my-model" in result.stderr
        assert "smollm2-135m" in result.stderr
    # a preset goes through to Hydra, and model.spec takes anything
    result = run_app("iq-quantize", "model=tiny-planted", "recipe=nope", cwd=tmp_path)
    assert "Unknown recipe" in result.stderr


def test_an_absolute_recipe_path_gives_one_run_folder_with_its_log(tmp_path):
    recipe = REPO / "recipes" / "w8a8_static_spikefree_minmax.yaml"
    result = run_app("iq-quantize", *TINY_RUN, f"recipe={recipe}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    label_dir = tmp_path / "outputs" / "quantize" / "tiny-planted" / recipe.stem
    (run,) = label_dir.iterdir()  # one timestamped run folder, nothing nested
    results = json.loads((run / "results.json").read_text())
    assert results["recipe"] == recipe.stem
    assert results["recipe_path"] == str(recipe)
    log = (run / "quantize.log").read_text()
    assert "oneshot took" in log and "SpikeFree" in log


def test_recipe_labels_are_one_folder_name():
    assert recipe_label("/abs/path/my_recipe.yaml") == "my_recipe"
    assert recipe_label("relative/r.yml") == "r"
    assert recipe_label("w8a8_static") == "w8a8_static"
    assert recipe_label(None, "w8a8_static", "rtn", "none") == "w8a8_static+rtn+none"


def test_an_unreachable_hub_is_one_probe_not_half_a_minute(monkeypatch):
    from huggingface_hub import constants

    # a closed loopback port: refused at once, as a dead network is
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    assert not loading._hub_reachable()
    with pytest.raises(ModelSpecError) as info:
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "unreachable" in message and "http://127.0.0.1:9" in message
    assert all(name in message for name in OFFLINE_MODELS)


def test_an_unreachable_hub_still_looks_in_the_local_hub_cache(monkeypatch):
    """An unreachable hub does not hide what the local hub cache holds."""
    from huggingface_hub import constants

    monkeypatch.setattr(loading, "_hub_reachable", lambda: False)
    calls = []

    def from_pretrained(spec, **kwargs):
        calls.append(kwargs)
        raise OSError("not cached")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(ModelSpecError, match=constants.ENDPOINT):
        load_model("some-org/some-model")
    assert calls == [{"local_files_only": True}]
