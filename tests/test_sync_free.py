"""The installed runtime never makes the host wait for the device outside
calibration: prefill, padded batches and decode steps alike."""

import pytest
import torch

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.host_syncs import count_host_syncs
from iq_transform.models import load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def calibrated(calibration):
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    return model.to(DEVICE), tokenizer


def _syncs(model, **inputs) -> dict:
    """Host-synchronizing ops of one forward (and on CUDA: none may run)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            return dict(count_host_syncs(lambda: model(**inputs)))
    finally:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def test_the_counter_sees_what_waits():
    x = torch.randn(4, 5)
    counts = count_host_syncs(lambda: (bool(x.any()), x[x > 0], x.sum().item()))
    assert counts == {"_local_scalar_dense": 2, "index": 1}


def test_prefill_with_spike_tokens_never_waits(calibrated, calibration):
    model, _ = calibrated
    ids = calibration[:2].to(DEVICE)
    runtime = get_runtime(model)
    assert _syncs(model, input_ids=ids) == {}
    assert runtime.last_spike_tokens[:, 0].all()  # the BOS rows were handled
    assert _syncs(model, input_ids=ids[:, 1:]) == {}  # and with none at all


def test_padded_batch_and_decode_step_never_wait(calibrated):
    model, tokenizer = calibrated
    batch = tokenizer(
        ["Short one.\nEnds here", "A longer line of text.\nAnd a second one."],
        return_tensors="pt",
        padding=True,
    ).to(DEVICE)
    assert _syncs(model, **batch) == {}
    with torch.no_grad():
        prefill = model(**batch, use_cache=True)
    step = prefill.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(step)], dim=1)
    decode = _syncs(
        model,
        input_ids=step,
        attention_mask=mask,
        past_key_values=prefill.past_key_values,
        use_cache=True,
    )
    assert decode == {}


def test_templates_stay_on_the_model_device(calibrated, calibration):
    model, _ = calibrated
    runtime = get_runtime(model)
    with torch.no_grad():
        model(input_ids=calibration[:1].to(DEVICE))
    carrying = [layer for layer in runtime.layers if layer.templates.carries_spikes]
    resident = [layer.resident_templates(torch.device(DEVICE)) for layer in carrying]
    assert carrying and all(t.device.type == DEVICE for t in resident)
    # copied once, then reused by every insertion
    assert all(
        layer.resident_templates(torch.device(DEVICE)) is t
        for layer, t in zip(carrying, resident, strict=True)
    )
