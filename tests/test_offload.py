"""Loading with offloading (``model.device_map``) and oneshot on offloaded models.

The tiny model is spilled to disk with a 300 KB CPU budget, the way a model larger
than the machine's memory would be, and must quantize exactly like in memory.
"""

import json
import math

import pytest
import torch
from compressed_tensors.offload.cache import DiskCache

from iq_transform.composition.config import ModelConfig, TextConfig
from iq_transform.composition.pipeline import apply_recipe, evaluate, resolve_recipe
from iq_transform.models import TOY_MODEL, load_model
from iq_transform.models.loading import _max_memory
from iq_transform.models.offload import (
    is_offloaded,
    move_model,
    onload_once_per_forward,
)
from tests.test_cli import REPO, run_app
from tests.test_stages import counted_weight_quantizations
from tests.test_sweep import TINY

RECIPE = "w8a8_static_spikefree_minmax"
DATA = REPO.parent / "shared" / "data"


def quantized_ppl(model, tokenizer) -> float:
    """Sequential-pipeline oneshot on 2x64 Brown tokens, then 2x64 WikiText-2 PPL."""
    calibration = TextConfig(
        path=str(DATA / "brown" / "brown.txt"), num_samples=2, seqlen=64
    ).calibration_windows(tokenizer)
    windows = TextConfig(
        path=str(DATA / "wikitext-2-raw" / "wiki.test.raw"), num_samples=2, seqlen=64
    ).evaluation_windows(tokenizer)
    torch.manual_seed(0)  # llm-compressor shuffles the calibration samples
    apply_recipe(
        model, tokenizer, resolve_recipe(RECIPE), calibration, pipeline="sequential"
    )
    return evaluate(model, windows, progress=False)[0].ppl


def open_onload_contexts(model: torch.nn.Module) -> int:
    """How many onload contexts of ``onload_once_per_forward`` are still open."""
    return sum(
        len(hook.args[0])
        for module in model.modules()
        for hook in module._forward_pre_hooks.values()
        if getattr(hook, "leaves_inputs_alone", False)
    )


@pytest.fixture(scope="module")
def in_memory_ppl() -> float:
    return quantized_ppl(*load_model(TOY_MODEL))


def test_default_model_config_loads_into_memory():
    config = ModelConfig(spec=TOY_MODEL)
    assert (config.device_map, config.max_memory, config.offload_folder) == (
        None,
        None,
        None,
    )
    model, _ = config.load()
    assert not hasattr(model, "hf_device_map")
    assert not any(is_offloaded(module) for module in model.modules())


@pytest.mark.parametrize("device_map", ["auto", "auto_offload"])
def test_offloaded_to_disk_quantizes_like_in_memory(
    tmp_path, in_memory_ppl, device_map, monkeypatch
):
    config = ModelConfig(
        spec=TOY_MODEL,
        device_map=device_map,
        max_memory={"cpu": "300KB"},
        offload_folder=str(tmp_path),
    )
    model, tokenizer = config.load()
    if device_map == "auto":
        # accelerate's hooks and map (oneshot converts them to compressed-tensors
        # offloading); disk weights are read from the checkpoint itself
        assert "disk" in model.hf_device_map.values()
        assert not any(is_offloaded(module) for module in model.modules())
    else:
        # compressed-tensors' loader converts at once, disk weights to the folder
        assert any(isinstance(m._parameters, DiskCache) for m in model.modules())
        assert list(tmp_path.glob("*.safetensors"))
    ppl = quantized_ppl(model, tokenizer)
    assert math.isfinite(ppl) and ppl > 1
    # same weights, scales and fake-quantized forwards as the in-memory model
    assert ppl == pytest.approx(in_memory_ppl, rel=1e-6)
    assert onload_once_per_forward(model) == 0  # apply_recipe hooked them all
    # the runtime's exact template rows replay the linears' pre-hooks: none may
    # leave its onload context open (offloading would stay disabled for good)
    assert open_onload_contexts(model) == 0
    # an offloaded weight is a fresh copy at every access: the template rows of
    # final weights must still be computed once, not at every forward
    calls = counted_weight_quantizations(monkeypatch)
    ids = tokenizer("The quick brown fox jumps", return_tensors="pt").input_ids
    with torch.no_grad():
        first = model(input_ids=ids).logits
        once = len(calls)
        second = model(input_ids=ids).logits
    assert len(calls) == once
    assert torch.equal(first, second)


def _onload_hooks(model: torch.nn.Module) -> int:
    return sum(
        getattr(hook, "leaves_inputs_alone", False)
        for module in model.modules()
        for hook in [
            *module._forward_pre_hooks.values(),
            *module._forward_hooks.values(),
        ]
    )


def test_a_model_moved_for_good_keeps_no_onload_hooks():
    """oneshot leaves an in-memory model dispatched, its quantized modules hooked
    to onload once per forward; moved for good (as ``to_int8_cpu`` and the GPU
    paths do), nothing is offloaded and the hooks, which would make every call of
    those modules the slow one, go too. The logits stay."""
    model, tokenizer = load_model(TOY_MODEL)
    quantized_ppl(model, tokenizer)
    assert any(is_offloaded(module) for module in model.modules())
    assert _onload_hooks(model) > 0
    ids = tokenizer("The quick brown fox jumps", return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    move_model(model, "cpu")
    assert not any(is_offloaded(module) for module in model.modules())
    assert _onload_hooks(model) == 0
    with torch.no_grad():
        moved = model(input_ids=ids).logits
    assert torch.equal(moved, before)
    assert onload_once_per_forward(model) == 0  # nothing offloaded to hook


def test_max_memory_needs_a_device_map_and_a_mapping():
    with pytest.raises(ValueError, match="only apply with a device_map"):
        load_model(TOY_MODEL, max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="must map devices to sizes"):
        load_model(TOY_MODEL, device_map="auto", max_memory="1GiB")
    # config files and command lines give GPU indices and byte counts as text
    assert _max_memory({"0": "70GiB", "cpu": "300000"}) == {0: "70GiB", "cpu": 300000}


def test_quantize_app_offloads_and_runs_the_sequential_pipeline(tmp_path):
    offload = tmp_path / "offload"
    result = run_app(
        "iq-quantize",
        *TINY,
        "model.device_map=auto_offload",
        "model.max_memory={cpu:300KB}",
        f"model.offload_folder={offload}",
        "pipeline=sequential",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "ok"
    assert math.isfinite(results["ppl"]) and results["ppl"] > 1
    model = results["config"]["model"]
    assert model["device_map"] == "auto_offload"
    assert model["max_memory"] == {"cpu": "300KB"}
    assert results["config"]["pipeline"] == "sequential"
    assert list(offload.glob("*.safetensors"))
