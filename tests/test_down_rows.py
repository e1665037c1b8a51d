"""``down_proj``'s spike rows at inference: where nothing but the runtime reads
that linear's input and its quantization takes no scale across rows, the rows are
found after it (from its input, in the pass that writes its output template) and
not zeroed first; the outputs are those of the zeroing path, bit for bit.
Wherever a row could reach another row or a statistic, they are still zeroed."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus

from iq_transform import get_runtime
from iq_transform.spikefree import runtime as runtime_module
from tests.conftest import count_calls
from tests.test_sync_free import DEVICE

DOWN_SITE = 2  # a carrier layer of the planted model: its down_proj has a template


def _down_proj(model, layer: int = DOWN_SITE):
    return get_runtime(model).layers[layer].layer.mlp.down_proj


def _logits_and_step(model, prompt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Prefill logits and the logits of one decode step after it."""
    with torch.no_grad():
        out = model(input_ids=prompt[:, :-1], use_cache=True)
        step = model(input_ids=prompt[:, -1:], past_key_values=out.past_key_values)
    return out.logits, step.logits


@pytest.mark.parametrize("device_path", [False, True])
def test_rows_found_after_down_proj_give_the_zeroing_paths_outputs(
    w8a8_rtn_on_device, calibration, monkeypatch, device_path
):
    model, _ = w8a8_rtn_on_device
    if device_path:  # torch.where over every row, as on a GPU
        monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", set())
    prompt = calibration[:2, :48].to(DEVICE)
    zeroed = count_calls(monkeypatch, runtime_module, "zero_rows")
    after = _logits_and_step(model, prompt)
    handled_after = get_runtime(model).last_spike_tokens.clone()
    assert not zeroed  # a frozen static model: nothing zeroed
    monkeypatch.setattr(runtime_module, "_rows_stay_apart", lambda *args: False)
    before = _logits_and_step(model, prompt)
    assert zeroed  # the zeroing path ran
    for got, expected in zip(after, before, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(get_runtime(model).last_spike_tokens, handled_after)


def test_a_hook_reading_down_projs_input_sees_the_spike_rows_zeroed(
    w8a8_rtn_on_device, calibration
):
    """An observer, GPTQ's Hessian or a transform on ``down_proj`` must never see a
    spike: with any such hook the rows are zeroed before it runs, as before."""
    model, _ = w8a8_rtn_on_device
    down_proj = _down_proj(model)
    seen = []
    handle = down_proj.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            model(input_ids=calibration[:1, :48].to(DEVICE))
    finally:
        handle.remove()
    rows = get_runtime(model).last_spike_tokens[0]
    assert rows[0]  # the first token is a spike token of the planted model
    assert torch.count_nonzero(seen[0][0, rows]) == 0
    assert torch.count_nonzero(seen[0][0, ~rows]) > 0


def test_which_down_proj_inputs_keep_their_rows_apart(w8a8_rtn_on_device):
    model, _ = w8a8_rtn_on_device
    layer = get_runtime(model).layers[DOWN_SITE]
    down_proj, own = _down_proj(model), layer._down_hook_ids
    stay_apart = runtime_module._rows_stay_apart
    assert stay_apart(down_proj, own)  # frozen static per-tensor: yes
    inputs = down_proj.quantization_scheme.input_activations
    status = down_proj.quantization_status
    try:
        down_proj.quantization_status = QuantizationStatus.CALIBRATION
        assert not stay_apart(down_proj, own)  # observers may read every row
        down_proj.quantization_status = status
        per_tensor = QuantizationArgs(num_bits=8, dynamic=True, strategy="tensor")
        down_proj.quantization_scheme.input_activations = per_tensor
        assert not stay_apart(down_proj, own)  # one scale from every row
        per_token = QuantizationArgs(num_bits=8, dynamic=True, strategy="token")
        down_proj.quantization_scheme.input_activations = per_token
        assert stay_apart(down_proj, own)
    finally:
        down_proj.quantization_scheme.input_activations = inputs
        down_proj.quantization_status = status
    handle = down_proj.register_forward_hook(lambda *args: None)
    try:
        assert not stay_apart(down_proj, own)  # another reader of the input
    finally:
        handle.remove()
    assert stay_apart(down_proj, own)
