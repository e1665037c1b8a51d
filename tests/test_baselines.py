"""PrefixQuant-style and QFeM-style baselines on the planted-spike tiny Llama."""

import copy
import json

import pytest
import torch

from iq_transform.baselines import (
    PrefixQuantModifier,
    find_prefix,
    spiky_linears,
    with_prefix,
)
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.composition.schemes import w8a8_quantizer
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.models import load_model
from tests.conftest import TEXT
from tests.test_cli import run_app
from tests.test_quantize_cli import TINY_RUN


@pytest.fixture(scope="module")
def plain_windows():
    """Four 48-token windows with neither BOS nor the planted delimiter: without a
    prefix nothing in them spikes."""
    _, tokenizer = load_model("tiny-planted")
    ids = tokenizer(TEXT.replace("\n", " "), add_special_tokens=False).input_ids
    return torch.tensor(ids[: 4 * 48]).reshape(4, 48)


def test_qfem_finds_the_creating_and_removing_down_projs(planted, planted_windows):
    model, tokenizer, _ = planted
    spiky = spiky_linears(model, tokenizer, planted_windows, progress=False)
    assert sorted(spiky) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.4.mlp.down_proj",
    ]


def test_prefix_is_bos_when_first_tokens_spike(planted, planted_windows):
    model, tokenizer, (bos, _) = planted
    prefix = find_prefix(model, tokenizer, planted_windows, progress=False)
    assert prefix[0] == bos.token_id == tokenizer.bos_token_id
    assert len(prefix) <= 4


def test_with_prefix_keeps_the_window_length(plain_windows):
    prefixed = with_prefix(plain_windows, [1, 13])
    assert prefixed.shape == plain_windows.shape
    assert (prefixed[:, :2] == torch.tensor([1, 13])).all()
    assert torch.equal(prefixed[:, 2:], plain_windows[:, :-2])
    assert with_prefix(plain_windows, []) is plain_windows
    with pytest.raises(ValueError, match="leaves nothing"):
        with_prefix(plain_windows[:, :2], [1, 13])


def test_empty_prefix_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="leave PrefixQuantModifier out"):
        PrefixQuantModifier(prefix_ids=[])


def test_prefix_rows_are_left_out_of_static_scales(plain_windows):
    """The BOS prefix spikes (planted); with the modifier its rows never reach the
    observers, so the spike-creating down_proj's scale is an ordinary one."""
    model, tokenizer = load_model("tiny-planted")
    prefix = [tokenizer.bos_token_id]
    calibration = with_prefix(plain_windows, prefix)
    scales = {}
    for name, recipe in (
        ("prefix", [PrefixQuantModifier(prefix_ids=prefix)]),
        ("plain", []),
    ):
        model, tokenizer = load_model("tiny-planted")
        quantizer = w8a8_quantizer("int", dynamic=False, observer="spikefree_minmax")
        apply_recipe(model, tokenizer, [*recipe, quantizer], calibration)
        scales[name] = model.model.layers[1].mlp.down_proj.input_scale.item()
    assert scales["plain"] > 50 * scales["prefix"]


def test_prefix_cache_is_full_precision_and_scores_only_the_window(plain_windows):
    model, tokenizer = load_model("tiny-planted")
    fp_model = copy.deepcopy(model)
    prefix = [tokenizer.bos_token_id]
    quantizer = w8a8_quantizer("int", dynamic=False, observer="spikefree_minmax")
    apply_recipe(
        model,
        tokenizer,
        [PrefixQuantModifier(prefix_ids=prefix), quantizer],
        with_prefix(plain_windows, prefix),
    )
    result = perplexity(model, plain_windows, progress=False, prefix=prefix)
    # by hand: the prefix's KV cache from the unquantized model, then the window
    nll, count = 0.0, 0
    # oneshot leaves the model on the accelerator when there is one
    device = next(model.parameters()).device
    fp_model.to(device)
    with torch.no_grad():
        for window in plain_windows.to(device):
            ids = torch.tensor([prefix], device=device)
            past = fp_model(input_ids=ids, use_cache=True).past_key_values
            out = model(input_ids=window[None], past_key_values=past, use_cache=True)
            logits = out.logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(
                logits, window[1:], reduction="sum"
            ).item()
            count += window.numel() - 1
    assert result.num_predictions == count
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)


def test_quantize_app_runs_both_baselines(tmp_path):
    for transform in ("qfem", "prefix"):
        run = tmp_path / transform
        result = run_app(
            "iq-quantize",
            *TINY_RUN,
            f"transform={transform}",
            f"hydra.run.dir={run}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        results = json.loads((run / "results.json").read_text())
        recipe = (run / "recipe.yaml").read_text()
        if transform == "qfem":
            assert sorted(results["unquantized"]) == [
                "model.layers.1.mlp.down_proj",
                "model.layers.4.mlp.down_proj",
            ]
            assert "model.layers.4.mlp.down_proj" in recipe
        else:
            assert results["prefix_ids"][0] == 1
            assert "PrefixQuantModifier" in recipe
        assert results["ppl"] > 1
