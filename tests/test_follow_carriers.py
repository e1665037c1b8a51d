"""``follow_carriers``: at inference a carrier stays one while it keeps its share
of the previous layer's max, as in calibration, and the absolute thresholds
decide only sequences too short for a median. Planted tiny Llama: carriers at
layers 2-4 (the first token at 4000, delimiters at 1597, ordinary tokens under
4), thresholds 73-85."""

import json
import math

import pytest
import torch

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.export.format import (
    STATE_FILE,
    TENSORS_FILE,
    SpikeFreeState,
    read_state,
    write_state,
)
from iq_transform.kernels.fp8 import to_fp8
from iq_transform.models import load_model
from iq_transform.spikefree.detect import spike_token_mask
from iq_transform.spikefree.runtime import SpikeFreeRuntime

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def calibrated(calibration):
    """A fresh planted model with SpikeFree calibrated (each test edits it)."""
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    return model.to(DEVICE), tokenizer


def _set_residual_threshold(layer, value: float) -> None:
    layer.templates.residual_threshold.fill_(value)
    layer.templates = layer.templates  # drops the device copies


def _layer_input_rows(runtime: SpikeFreeRuntime, monkeypatch) -> list:
    """Record the rows each layer input's detection decides, in call order."""
    calls = []
    spike_rows = SpikeFreeRuntime.spike_rows

    def recording(self, hidden, *args, follow=False, **kwargs):
        rows = spike_rows(self, hidden, *args, follow=follow, **kwargs)
        if follow:
            calls.append(rows.nonzero().tolist())
        return rows

    monkeypatch.setattr(SpikeFreeRuntime, "spike_rows", recording)
    return calls


def test_the_threshold_decides_only_sequences_without_a_median():
    token_max = torch.tensor(
        [
            [9.0, 1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 0.8, 1.0, 1.0],
            [9.0, 1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 0.8, 1.0, 1.0],
        ]
    )
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :4] = False  # 6 valid tokens: no median
    carried = torch.zeros(2, 10, dtype=torch.bool)
    carried[0, 5] = True
    carried[1, 0] = True  # padding is never a spike
    everywhere = spike_token_mask(token_max, 64.0, valid, 5.0)
    assert everywhere.nonzero().tolist() == [[0, 0]]
    only = spike_token_mask(token_max, 64.0, valid, 0.95, True, carried)
    # row 0 has a median: the ratio test finds nothing, the carried row stays;
    # row 1 has none: the threshold decides
    assert only.nonzero().tolist() == [[0, 5], [1, 4], [1, 5], [1, 6], [1, 8], [1, 9]]
    short = token_max[:, :4]
    assert spike_token_mask(short, 64.0, None, 5.0, True).nonzero().tolist() == [
        [0, 0],
        [1, 0],
    ]
    assert not spike_token_mask(token_max, 64.0, None, 0.5, True).any()


def test_a_threshold_in_a_narrow_gap_no_longer_decides(calibrated, calibration):
    model, _ = calibrated
    runtime = get_runtime(model)
    ids = calibration[:2].to(DEVICE)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        expected = runtime.last_spike_tokens.clone()
        # as if calibration's gap at layer 3 were narrow: ordinary tokens reach
        # 3.5 there, the median is ~2
        _set_residual_threshold(runtime.layers[3], 3.0)
        model(input_ids=ids)
        by_threshold = runtime.last_spike_tokens.clone()
        runtime.follow_carriers = True
        followed = model(input_ids=ids).logits
    assert expected.nonzero().tolist() == [[0, 0], [0, 117], [0, 118], [1, 0]]
    assert by_threshold.sum() > expected.sum()  # ordinary tokens templated
    assert torch.equal(runtime.last_spike_tokens, expected)
    torch.testing.assert_close(followed, reference, rtol=0, atol=0)


def test_a_carrier_stays_one_where_the_ratio_test_loses_it(
    calibrated, calibration, monkeypatch
):
    model, _ = calibrated
    runtime = get_runtime(model)
    for layer in runtime.layers:
        if layer.templates is not None:
            _set_residual_threshold(layer, math.inf)
    # the first token of sequence 0 is 2624x the median at layer 2, 2020x at 3,
    # 1738x at 4; sequence 1's is under 2500x everywhere
    runtime.ratio = 2500.0
    calls = _layer_input_rows(runtime, monkeypatch)
    ids = calibration[:2].to(DEVICE)
    with torch.no_grad():
        model(input_ids=ids)
        ratio_only = list(calls)
        calls.clear()
        runtime.follow_carriers = True
        model(input_ids=ids)
        followed = list(calls)
        calls.clear()
        # the chain starts afresh in every forward: the last forward's layer 4
        # carried (0, 0), where this batch's first token is not 2500x the median
        model(input_ids=ids.flip(0))
    assert ratio_only == [[[0, 0]], [], []]  # layers 2, 3, 4
    assert followed == [[[0, 0]], [[0, 0]], [[0, 0]]]
    assert calls == [[[1, 0]], [[1, 0]], [[1, 0]]]


def test_decode_steps_keep_the_threshold_and_generation_is_unchanged(calibrated):
    model, tokenizer = calibrated
    runtime = get_runtime(model)
    prompt = tokenizer(["Once upon a time\nthere"], return_tensors="pt").to(DEVICE)
    with torch.no_grad():
        plain = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        runtime.follow_carriers = True
        cached = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        uncached = model.generate(
            **prompt, max_new_tokens=24, do_sample=False, use_cache=False
        )
    assert torch.equal(cached, plain)
    assert torch.equal(uncached, plain)


def test_the_setting_is_saved_with_the_templates(calibration, tmp_path):
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(
        model, tokenizer, [SpikeFreeModifier(follow_carriers=True)], calibration
    )
    runtime = get_runtime(model)
    assert runtime.follow_carriers
    write_state(tmp_path, model, SpikeFreeState.of(runtime))
    state = read_state(tmp_path / STATE_FILE, tmp_path / TENSORS_FILE, model)
    assert state.follow_carriers is True
    # a checkpoint written before the setting existed keeps the thresholds
    meta = json.loads((tmp_path / STATE_FILE).read_text())
    del meta["follow_carriers"]
    (tmp_path / STATE_FILE).write_text(json.dumps(meta))
    state = read_state(tmp_path / STATE_FILE, tmp_path / TENSORS_FILE, model)
    assert state.follow_carriers is False
    assert state.install(model).follow_carriers is False


def test_the_fused_fp8_layers_refuse_it_and_leave_the_model_as_it_was(calibrated):
    model, _ = calibrated
    runtime = get_runtime(model)
    runtime.follow_carriers = True
    layers = list(runtime.arch.decoder_layers(model))
    with pytest.raises(ValueError, match="follow_carriers=False"):
        to_fp8(model)
    assert get_runtime(model) is runtime
    assert list(runtime.arch.decoder_layers(model)) == layers
