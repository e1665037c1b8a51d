"""The installed runtime never makes the host wait for the device outside
calibration: prefill, padded batches and decode steps alike. On the CPU the
runtime selects spike rows by index (nothing waits there), so these tests run
the device path on the CPU too, and check that both paths compute the same."""

import os

import pytest
import torch
from transformers import StaticCache

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.host_syncs import count_host_syncs
from iq_transform.models import load_model
from iq_transform.spikefree import row_decisions, row_writes
from iq_transform.spikefree import runtime as runtime_module
from iq_transform.spikefree.detect import spike_token_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the in-place row kernel runs on CUDA, and on the CPU in Triton's interpreter
ROW_KERNEL = row_writes.triton is not None and (
    DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
)
needs_row_kernel = pytest.mark.skipif(
    not ROW_KERNEL, reason="the row kernel needs Triton: CUDA, or TRITON_INTERPRET=1"
)


@pytest.fixture(scope="module")
def calibrated(calibration):
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    return model.to(DEVICE), tokenizer


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    """The path a GPU takes, on whatever device runs the tests."""
    monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", set())


def _syncs(model, run=None, **inputs) -> dict:
    """Host-synchronizing ops the runtime adds to one forward (``run``, or the
    model on ``inputs``): with its templates installed, less those of the same
    forward without them (transformers' own mask code reads a padding mask, for
    one)."""
    runtime = get_runtime(model)
    templates = [layer.templates for layer in runtime.layers]
    run = run or (lambda: model(**inputs))
    counts = {}
    with torch.no_grad():
        for installed in (False, True):
            for layer, layer_templates in zip(runtime.layers, templates, strict=True):
                layer.templates = layer_templates if installed else None
            counts[installed] = count_host_syncs(run)
    return dict(counts[True] - counts[False])


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


def test_the_cpu_path_computes_what_the_device_path_does(
    calibrated, calibration, monkeypatch
):
    model, _ = calibrated
    ids = calibration[:2].to(DEVICE)
    with torch.no_grad():
        device_path = model(input_ids=ids).logits
        monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", {DEVICE})
        indexed = model(input_ids=ids).logits
    assert get_runtime(model).last_spike_tokens[:, 0].all()
    torch.testing.assert_close(indexed, device_path, rtol=0, atol=1e-6)


def test_a_static_cache_decode_step_never_waits(calibrated, calibration):
    """A static KV cache keeps its length on the device (what CUDA graphs need):
    the runtime decides token kinds there instead of reading it, and computes what
    it computes with a dynamic cache."""
    model, _ = calibrated
    ids = calibration[:1, :33].to(DEVICE)
    cache = StaticCache(config=model.config, max_cache_len=33)
    with torch.no_grad():
        model(input_ids=ids[:, :32], past_key_values=cache, use_cache=True)
    positions = torch.full((1, 1), 32, device=DEVICE)

    def step():
        for layer in cache.layers:  # each call writes position 32 again
            layer.cumulative_length.fill_(32)
        return model(
            input_ids=ids[:, 32:],
            past_key_values=cache,
            position_ids=positions,
            use_cache=True,
        ).logits

    assert _syncs(model, step) == {}
    with torch.no_grad():
        static = step()
        dynamic = model(input_ids=ids[:, :32], use_cache=True).past_key_values
        expected = model(input_ids=ids[:, 32:], past_key_values=dynamic).logits
    torch.testing.assert_close(static, expected, rtol=0, atol=1e-5)


@needs_row_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_row_kernel_writes_the_flagged_rows_alone(dtype):
    generator = torch.Generator().manual_seed(0)
    for shape, width in (((2, 37), 2500), ((1, 5), 1024), ((3, 4), 100)):
        output = torch.randn(*shape, width, generator=generator).to(DEVICE, dtype)
        rows = (torch.rand(shape, generator=generator) < 0.3).to(DEVICE)
        kinds = torch.randint(0, 2, shape, generator=generator).to(DEVICE)
        values = torch.randn(2, width, generator=generator).to(DEVICE)
        expected = torch.where(rows.unsqueeze(-1), values.to(dtype)[kinds], output)
        written = row_writes.write_rows(output.clone(), rows, kinds, values)
        assert torch.equal(written, expected)


@needs_row_kernel
def test_the_row_kernel_path_computes_what_torch_where_does(
    calibrated, calibration, monkeypatch
):
    model, _ = calibrated
    ids = calibration[:2].to(DEVICE)
    with torch.no_grad():
        monkeypatch.setattr(runtime_module, "KERNEL_DEVICES", set())
        where = model(input_ids=ids).logits
        monkeypatch.setattr(runtime_module, "KERNEL_DEVICES", {DEVICE})
        kernel = model(input_ids=ids).logits
    assert get_runtime(model).last_spike_tokens[:, 0].all()
    torch.testing.assert_close(kernel, where, rtol=0, atol=0)
    assert _syncs(model, input_ids=ids) == {}


@needs_row_kernel
def test_the_decision_kernel_decides_what_the_torch_ops_do():
    generator = torch.Generator().manual_seed(0)
    cases = [((2, 64), True), ((3, 300), False), ((1, 1), False), ((2, 5), True)]
    cases.append(((2, 9), True))  # a padded sequence too short for a median
    for (batch, tokens), padded in cases:
        token_max = torch.rand(batch, tokens, generator=generator) + 0.5
        token_max = token_max.bfloat16().float()  # what vector_norm gives in bf16
        token_max[:, 0] = 1000.0  # first-token spikes
        token_max[0, tokens // 2] = 70.0  # over 64 x the median, under the threshold
        token_max[-1, -1] = 40.0  # under 64 x the median, over the threshold
        valid = None
        if padded:
            valid = torch.ones(batch, tokens, dtype=torch.bool)
            valid[-1, : tokens // 3] = False  # left padding
        also = torch.rand(batch, tokens, generator=generator) < 0.05
        record = torch.rand(batch, tokens, generator=generator) < 0.05
        threshold = torch.tensor(20.0)
        # the previous layer's carriers: at even positions they keep half of
        # their max, at odd ones an eighth (under the quarter they must keep)
        odd = torch.arange(tokens) % 2 == 1
        previous_max = token_max * torch.where(odd, 8.0, 2.0)
        previous_rows = torch.rand(batch, tokens, generator=generator) < 0.3
        previous_rows[:, :2] = True
        carried = previous_rows & (token_max >= 0.25 * previous_max)
        on = dict(device=DEVICE)
        for follow in (False, True):
            expected = spike_token_mask(
                token_max, 64.0, valid, threshold, follow, carried if follow else None
            )
            expected = expected | also
            seen = record.to(**on)
            rows = row_decisions.decide_rows(
                token_max.to(**on),
                64.0,
                None if valid is None else valid.to(**on),
                threshold.to(**on),
                also.to(**on),
                seen,
                threshold_without_median_only=follow,
                previous=(previous_max.to(**on), previous_rows.to(**on), 0.25)
                if follow
                else None,
            )
            assert torch.equal(rows.cpu(), expected), (batch, tokens, follow)
            assert torch.equal(seen.cpu(), record | expected)


@needs_row_kernel
def test_the_decision_kernel_path_computes_what_the_torch_ops_do(
    calibrated, calibration, monkeypatch
):
    model, _ = calibrated
    ids = calibration[:2].to(DEVICE)
    runtime = get_runtime(model)

    def prefill_and_decode():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        rows = runtime.last_spike_tokens.clone()
        step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values)
        return out.logits, rows, step.logits

    with torch.no_grad():
        kernel = prefill_and_decode()
        monkeypatch.setattr(runtime_module, "row_decider", lambda token_max: None)
        monkeypatch.setattr(runtime_module, "row_detector", lambda hidden: None)
        torch_ops = prefill_and_decode()
    assert kernel[1][:, 0].all()
    assert torch.equal(kernel[1], torch_ops[1])
    torch.testing.assert_close(kernel[0], torch_ops[0], rtol=0, atol=0)
    torch.testing.assert_close(kernel[2], torch_ops[2], rtol=0, atol=0)


@needs_row_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_short_sequence_kernel_detects_and_zeroes_what_the_torch_ops_do(dtype):
    generator = torch.Generator().manual_seed(1)
    for batch, tokens, width in ((3, 1, 1500), (2, 5, 64)):
        hidden = torch.randn(batch, tokens, width, generator=generator).to(dtype)
        hidden[0, 0, 7] = 50.0  # over the threshold
        hidden[-1, -1, -1] = -50.0  # over it in |x|
        threshold = torch.tensor(20.0)
        valid = torch.ones(batch, tokens, dtype=torch.bool)
        valid[-1, 0] = False
        also = torch.zeros(batch, tokens, dtype=torch.bool)
        also[1, 0] = True
        record = torch.zeros(batch, tokens, dtype=torch.bool)
        record[0, -1] = True
        token_max = hidden.float().abs().amax(-1)
        expected = spike_token_mask(token_max, 64.0, valid, threshold) | also
        on = dict(device=DEVICE)
        written, seen = hidden.to(**on), record.to(**on)
        rows = row_decisions.detect_rows(
            written, threshold.to(**on), valid.to(**on), also.to(**on), seen, zero=True
        )
        assert torch.equal(rows.cpu(), expected), (batch, tokens)
        assert expected.any() and torch.equal(seen.cpu(), record | expected)
        zeroed = hidden.masked_fill(expected.unsqueeze(-1), 0.0)
        assert torch.equal(written.cpu(), zeroed)


@needs_row_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("output_width", [300, 120])
def test_the_short_sequence_kernel_writes_the_rows_it_detects_elsewhere(
    dtype, output_width
):
    """A decode step's detection at the layer input writes the first norm's
    template rows into the norm's output in the same pass; at the ``down_proj``
    input, its output template into ``down_proj``'s narrower output."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 2, 300, generator=generator).to(dtype)
    hidden[1, 0, 5] = 80.0
    output = torch.randn(3, 2, output_width, generator=generator).to(dtype)
    kinds = torch.tensor([[0, 1], [1, 1], [0, 1]])
    values = torch.randn(2, output_width, generator=generator).to(dtype)
    threshold = torch.tensor(20.0)
    expected = hidden.float().abs().amax(-1) > threshold
    on = dict(device=DEVICE)
    written = output.to(**on)
    rows = row_decisions.detect_rows(
        hidden.to(**on),
        threshold.to(**on),
        write=(written, kinds.to(**on), values.to(**on)),
    )
    assert torch.equal(rows.cpu(), expected) and expected.sum() == 1
    filled = torch.where(expected.unsqueeze(-1), values[kinds], output)
    assert torch.equal(written.cpu(), filled)


@needs_row_kernel
def test_a_decode_step_detected_in_the_norm_pass_computes_what_two_passes_do(
    calibrated, calibration, monkeypatch
):
    model, _ = calibrated
    # the norms that run themselves (fused norms resolve the detection first)
    get_runtime(model).fuse_norms = False
    prompt = calibration[:1, :40].to(DEVICE)
    fused = []
    original = runtime_module._fuses_detection
    monkeypatch.setattr(
        runtime_module,
        "_fuses_detection",
        lambda *args: fused.append(original(*args)) or fused[-1],
    )
    with torch.no_grad():
        cache = model(input_ids=prompt[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=prompt[:, -1:], past_key_values=cache).logits
        assert fused and all(fused)  # every templated layer took the one pass
        cache.crop(prompt.shape[1] - 1)
        monkeypatch.setattr(runtime_module, "_fuses_detection", lambda *args: False)
        separate = model(input_ids=prompt[:, -1:], past_key_values=cache).logits
    torch.testing.assert_close(step, separate, rtol=0, atol=0)
    assert _syncs(model, input_ids=prompt[:, -1:], past_key_values=cache) == {}


def test_a_disabled_runtime_runs_the_plain_forward_and_keeps_its_device_copies(
    calibrated, calibration
):
    model, _ = calibrated
    ids = calibration[:2].to(DEVICE)
    runtime = get_runtime(model)
    layers = runtime.layers
    with torch.no_grad():
        enabled = model(input_ids=ids).logits
        copies = [layer._resident for layer in layers]
        runtime.enabled = False
        try:
            disabled = model(input_ids=ids).logits
        finally:
            runtime.enabled = True
        again = model(input_ids=ids).logits
        kept = [layer._resident for layer in layers]
        assert all(a is b for a, b in zip(copies, kept, strict=True))
        templates = [layer.templates for layer in layers]
        for layer in layers:
            layer.templates = None
        removed = model(input_ids=ids).logits
        for layer, layer_templates in zip(layers, templates, strict=True):
            layer.templates = layer_templates
    assert torch.equal(again, enabled)
    assert torch.equal(disabled, removed)
    assert not torch.equal(disabled, enabled)  # the planted spikes matter


def _hook_keys(model) -> dict:
    return {
        name: [list(d) for d in (m._forward_pre_hooks, m._forward_hooks)]
        for name, m in model.named_modules()
    }


def test_a_detached_runtime_leaves_no_hook_and_comes_back_in_order(
    calibrated, calibration
):
    model, _ = calibrated
    ids = calibration[:2].to(DEVICE)
    runtime = get_runtime(model)
    with torch.no_grad():
        enabled = model(input_ids=ids).logits  # hooks every norm it fuses or not
        hooked = _hook_keys(model)
        runtime.enabled = False
        try:
            disabled = model(input_ids=ids).logits
        finally:
            runtime.enabled = True
        with runtime.detached():
            assert all(not pre and not post for pre, post in _hook_keys(model).values())
            detached = model(input_ids=ids).logits
        assert _hook_keys(model) == hooked
        again = model(input_ids=ids).logits
    assert torch.equal(detached, disabled)
    assert torch.equal(again, enabled)
    assert not torch.equal(detached, enabled)


def test_the_launch_key_separates_what_triton_compiles_apart():
    """A launch's compiled kernel is found by its bound launch (one per constants
    and options) and its arguments' key."""
    from iq_transform.spikefree.triton_launch import FastLaunch, arguments_key

    kernel = FastLaunch(None)

    def launch_key(device, args, constants, options):
        return kernel.bind(constants, **options), arguments_key(device, args)

    data = torch.zeros(64)
    aligned, misaligned = data[:32], data[1:33]  # 4-byte offset
    key = launch_key(0, (aligned, 17), {"N": 32}, {"num_warps": 4})
    assert key == launch_key(0, (data[4:36], 33), {"N": 32}, {"num_warps": 4})
    assert key != launch_key(0, (misaligned, 17), {"N": 32}, {"num_warps": 4})
    assert key != launch_key(0, (aligned.double(), 17), {"N": 32}, {"num_warps": 4})
    for other in (1, 16, 2**40):  # Triton specializes these integers
        assert key != launch_key(0, (aligned, other), {"N": 32}, {"num_warps": 4})
    assert key != launch_key(0, (aligned, 17), {"N": 64}, {"num_warps": 4})
    assert key != launch_key(0, (aligned, 17), {"N": 32}, {"num_warps": 8})
    assert key != launch_key(1, (aligned, 17), {"N": 32}, {"num_warps": 4})
    flag = launch_key(0, (aligned, True), {"N": 32}, {"num_warps": 4})
    assert flag != launch_key(0, (aligned, False), {"N": 32}, {"num_warps": 4})
    assert flag != launch_key(0, (aligned, 1), {"N": 32}, {"num_warps": 4})
    assert key != launch_key(0, (aligned, 17.0), {"N": 32}, {"num_warps": 4})


@needs_row_kernel
def test_direct_launches_write_what_the_first_launch_does(monkeypatch):
    """The second launch of a key is the direct one: misaligned views, widths and
    dtypes each get their own compiled kernel and the same result."""
    from iq_transform.spikefree.triton_launch import FastLaunch

    launch = FastLaunch(row_writes._write_rows_kernel)
    monkeypatch.setattr(row_writes, "_WRITE_ROWS", launch)
    generator = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(3 * 7 * 97 + 1, generator=generator).to(DEVICE, dtype)
        for offset in (0, 1):
            output = base[offset : offset + 3 * 7 * 97].view(3, 7, 97)
            rows = (torch.rand(3, 7, generator=generator) < 0.4).to(DEVICE)
            kinds = torch.randint(0, 2, (3, 7), generator=generator).to(DEVICE)
            values = torch.randn(2, 97, generator=generator).to(DEVICE, dtype)
            expected = torch.where(rows.unsqueeze(-1), values[kinds], output)
            for _ in range(2):  # compile, then launch directly
                # a copy of the whole buffer keeps the view's offset (a clone of
                # the view itself would be a fresh, aligned allocation)
                target = base.clone()[offset : offset + 3 * 7 * 97].view(3, 7, 97)
                written = row_writes.write_rows(target, rows, kinds, values)
                assert torch.equal(written, expected)
    if DEVICE == "cuda":  # one compiled kernel per dtype and alignment
        assert launch.compiled_kernels == 4
    with pytest.raises(ValueError, match="parameter order"):
        launch = FastLaunch(row_writes._write_rows_kernel)
        launch.bind({"BLOCK": 1024, "N": 97})._check_order(5)
