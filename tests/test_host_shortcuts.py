"""The runtime's host-side shortcuts change no output: where reading a row mask
costs nothing (the CPU), a decode step whose token carries no spike skips every
insertion and leaves its norms and linears unhooked; norms are looked up and
checked again only when one is replaced; the module attributes the hot path reads
are read without ``nn.Module.__getattr__``."""

import copy
import dataclasses

import pytest
import torch

from iq_transform import get_runtime
from iq_transform.spikefree import runtime as runtime_module
from tests.conftest import count_calls
from tests.test_sync_free import DEVICE


def _decode_logits(model, prompt, step, before_step=lambda: None) -> torch.Tensor:
    with torch.no_grad():
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        before_step()
        return model(input_ids=step, past_key_values=cache).logits


@pytest.mark.parametrize("token", ["a", "\n"])  # an ordinary token, a delimiter
def test_a_decode_step_reads_its_rows_on_the_host_and_skips_what_it_can(
    w8a8_rtn_on_device, calibration, monkeypatch, token
):
    model, tokenizer = w8a8_rtn_on_device
    prompt = calibration[:2, :40].to(DEVICE)
    step = torch.tensor([tokenizer(token).input_ids[-1]] * 2, device=DEVICE)[:, None]
    insertions = count_calls(monkeypatch, runtime_module, "insert_templates")
    # the host path (index writes, rows read) on whatever device the tests run on
    host_indexed = {torch.device(DEVICE).type}
    monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", host_indexed)
    host = _decode_logits(model, prompt, step, insertions.clear)
    handled = get_runtime(model).last_spike_tokens.clone()
    host_insertions = len(insertions)
    # a layer that knows it has no carrier takes its norm and linear hooks out
    runtime = get_runtime(model)
    hooked = sum(
        _runtime_hooks(module, runtime)
        for layer in runtime.layers
        if layer.templates is not None and layer.templates.norm_templates
        for module in (layer.layer.input_layernorm, layer.layer.self_attn.q_proj)
    )
    monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", set())
    device = _decode_logits(model, prompt, step)
    torch.testing.assert_close(host, device, rtol=0, atol=0)
    assert torch.equal(handled, get_runtime(model).last_spike_tokens)
    if token == "\n":  # a carrier: its rows are written on both paths
        assert handled.all() and host_insertions > 0 and hooked > 0
    else:  # no carrier: nothing is inserted, nothing is hooked on the host path
        assert not handled.any() and host_insertions == 0 and hooked == 0


def test_a_decode_step_without_carriers_still_finds_the_spike_its_mlp_makes(
    w8a8_rtn_on_device, calibration, monkeypatch
):
    """A layer whose input has no carrier can make a spike in its MLP: the host's
    one reduction over the ``down_proj`` input finds it, and its row gets the
    output template as on the device path (here every row of the first layer
    with an output template, its ``down_proj`` threshold lowered to zero)."""
    model, tokenizer = w8a8_rtn_on_device
    runtime = get_runtime(model)
    layer = next(lr for lr in runtime.layers if lr.templates.down_template is not None)
    templates = layer.templates
    lowered = dataclasses.replace(
        templates, down_threshold=torch.zeros_like(templates.down_threshold)
    )
    prompt = calibration[:2, :40].to(DEVICE)
    step = torch.tensor([tokenizer("a").input_ids[-1]] * 2, device=DEVICE)[:, None]
    original = runtime_module.LayerRuntime._after_down_proj
    seen = []

    def after_down_proj(self, module, args, output):
        inserted = original(self, module, args, output)
        if self is layer:
            seen.append((self.current.has_carriers, inserted is not None))
        return inserted

    expected_without = _decode_logits(model, prompt, step)
    layer.templates = None  # its hooks out: registered again with the spy
    monkeypatch.setattr(
        runtime_module.LayerRuntime, "_after_down_proj", after_down_proj
    )
    host_indexed = {torch.device(DEVICE).type}
    monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", host_indexed)
    layer.templates = lowered
    try:
        host = _decode_logits(model, prompt, step)
        # no carrier, and the output hook wrote the rows (with index writes on
        # the CPU, in the detection kernel's pass on a GPU)
        assert seen[-1] == (False, True)
        monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", set())
        device = _decode_logits(model, prompt, step)
    finally:
        layer.templates = None
        monkeypatch.undo()
        layer.templates = templates
    torch.testing.assert_close(host, device, rtol=0, atol=0)
    assert not torch.equal(host, expected_without)


def test_a_short_host_sequence_under_the_threshold_is_decided_by_one_reduction(
    planted, planted_windows, monkeypatch
):
    from iq_transform import SpikeFreeModifier
    from iq_transform.composition.pipeline import apply_recipe

    model, tokenizer, _ = copy.deepcopy(planted)
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], planted_windows)
    runtime = get_runtime(model)
    per_row = count_calls(monkeypatch, runtime_module, "spike_token_mask")
    threshold = torch.tensor(10.0)
    hidden = torch.full((2, 3, 8), 9.0)
    hidden[1, 2, 5] = -10.0  # on the threshold: not over it
    rows = runtime.spike_rows(hidden, None, threshold)
    assert rows is runtime.no_rows(hidden) and runtime.found_none(rows)
    assert rows.shape == (2, 3) and not rows.any() and not per_row
    hidden[1, 2, 5] = -10.5
    rows = runtime.spike_rows(hidden, None, threshold)
    assert per_row and rows.tolist() == [[False] * 3, [False, False, True]]
    assert not runtime.found_none(rows)


def test_a_replaced_norm_is_hooked_at_the_next_forward(planted, planted_windows):
    from iq_transform import SpikeFreeModifier
    from iq_transform.composition.pipeline import apply_recipe

    model, tokenizer, _ = copy.deepcopy(planted)
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], planted_windows)
    ids = planted_windows[:1, :48]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        layer = get_runtime(model).layers[2]
        old = layer.layer.post_attention_layernorm
        # a new module with the same weights, as oneshot swaps norms in (a deepcopy
        # would also copy the forward the runtime gave the old one where it fuses
        # norms, which keeps a norm from being fused)
        replacement = type(old)(old.weight.shape[0], eps=old.variance_epsilon)
        replacement.load_state_dict(old.state_dict())
        layer.layer.post_attention_layernorm = replacement.to(old.weight.device)
        got = model(input_ids=ids).logits
    own = type(replacement).forward
    # hooked when the layer ran, or fused (where Triton runs: no hook then)
    fused = runtime_module._own_forward(replacement) is not own
    assert bool(replacement._forward_hooks) != fused
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    get_runtime(model).remove()
    assert not replacement._forward_hooks and not old._forward_hooks
    assert runtime_module._own_forward(replacement) is own


class _WithClassDefault(torch.nn.Linear):
    quantization_enabled = False


def test_the_hot_path_reads_attributes_as_getattr_does():
    linear = torch.nn.Linear(4, 4)
    read = runtime_module._plain_attribute
    assert read(linear, "quantization_scheme") is None
    assert read(linear, "quantization_enabled", True) is True
    linear.quantization_scheme = scheme = object()
    assert read(linear, "quantization_scheme") is scheme
    assert read(_WithClassDefault(4, 4), "quantization_enabled", True) is False
    assert read(linear, "in_features") == 4


def test_the_host_time_proxy_takes_the_cuda_path():
    """``benchmarks/runtime_host_proxy.py`` times the runtime's CUDA path on a CPU:
    a decode step of its 4-layer model launches the three kernels of every layer
    (the first norm with the detection, the second norm, ``down_proj``'s rows)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "benchmarks/runtime_host_proxy.py", "--steps", "3"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    found = re.search(r"(\d+) kernel launches a step", run.stdout)
    assert found, run.stdout[-2000:] + run.stderr[-2000:]
    assert int(found.group(1)) == 3 * 4


def _runtime_hooks(module: torch.nn.Module, runtime) -> int:
    ids = runtime.hook_ids()
    return len(ids & {*module._forward_pre_hooks, *module._forward_hooks})


def test_a_layer_keeps_only_the_hooks_its_templates_can_act_through(
    planted, planted_windows
):
    """A hook that returns at once still makes its module's call the slow one:
    a layer without templates has none, a layer's ``down_proj`` is hooked only
    with an output template, a template-fed linear only while it quantizes its
    input (checked at a forward with carriers), and the model gives the same
    logits throughout."""
    from iq_transform import SpikeFreeModifier
    from iq_transform.composition.pipeline import apply_recipe

    model, tokenizer, _ = copy.deepcopy(planted)
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], planted_windows)
    runtime = get_runtime(model)
    ids = planted_windows[:1, :48]
    layer = next(
        lr for lr in runtime.layers if lr.templates and lr.templates.norm_templates
    )
    block, attention = layer.layer, layer.layer.self_attn
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert _runtime_hooks(block, runtime) == 2
    assert _runtime_hooks(block.mlp.down_proj, runtime) == 2 * (
        layer.templates.down_template is not None
    )
    # SpikeFree alone quantizes nothing: no linear hook after a forward
    assert _runtime_hooks(attention.q_proj, runtime) == 0

    # a linear that quantizes its input from now on is hooked at the next forward
    kinds = len(layer.templates.norm_templates["input_layernorm"])
    outputs = torch.zeros(kinds, attention.q_proj.out_features)
    attention.q_proj.template_outputs = outputs  # (its rows' values: not checked)
    try:
        with torch.no_grad():
            model(input_ids=ids)
        assert _runtime_hooks(attention.q_proj, runtime) == 1
        assert _runtime_hooks(attention.k_proj, runtime) == 0
    finally:
        del attention.q_proj.template_outputs
    with torch.no_grad():
        model(input_ids=ids)
    assert _runtime_hooks(attention.q_proj, runtime) == 0

    templates = layer.templates
    layer.templates = None
    assert _runtime_hooks(block, runtime) == 0
    assert _runtime_hooks(block.mlp.down_proj, runtime) == 0
    assert all(not _runtime_hooks(m, runtime) for m in block.modules())
    runtime.follow_carriers = True  # a layer without templates ends a chain
    assert _runtime_hooks(block, runtime) == 2
    runtime.follow_carriers = False
    assert _runtime_hooks(block, runtime) == 0
    layer.templates = templates
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    runtime.remove()
    left = [
        hook
        for module in model.modules()
        for hook in [
            *module._forward_hooks.values(),
            *module._forward_pre_hooks.values(),
        ]
        if hook.__module__ == runtime_module.__name__
    ]
    assert not left


def test_template_fed_linears_of_a_quantized_model_are_hooked_where_rows_differ(
    w8a8_rtn_on_device, calibration
):
    """W8A8: q/k/v quantize their carriers' template rows, so they are hooked
    after a forward with carriers; gate/up are not where ``down_proj`` has an
    output template (its carrier rows become that template anyway)."""
    model, _ = w8a8_rtn_on_device
    runtime = get_runtime(model)
    with torch.no_grad():
        model(input_ids=calibration[:1, :48].to(DEVICE))
    hooked = 0
    for layer in runtime.layers:
        if layer.templates is None or not layer.templates.norm_templates:
            continue
        mlp, attention = layer.layer.mlp, layer.layer.self_attn
        if layer.templates.down_template is not None:
            assert not _runtime_hooks(mlp.gate_proj, runtime)
            assert not _runtime_hooks(mlp.up_proj, runtime)
        hooked += _runtime_hooks(attention.q_proj, runtime)
        assert _runtime_hooks(attention.k_proj, runtime) == _runtime_hooks(
            attention.q_proj, runtime
        )
    assert hooked > 0


@pytest.mark.parametrize("fuse", [None, True])  # norms hooked on the CPU, or fused
def test_the_decode_steps_of_a_sequence_skip_the_checks_its_first_forward_made(
    w8a8_rtn_on_device, calibration, monkeypatch, fuse
):
    """A sequence's first forward checks the norms, the template-fed linears and
    ``down_proj``'s hooks; its decode steps (the same cache) do not, and give the
    logits that checked steps give. Detaching the runtime mid-sequence (as the
    overhead benchmark switches variants) checks the norms again, setting
    ``fuse_norms`` everything."""
    model, tokenizer = w8a8_rtn_on_device
    runtime = get_runtime(model)
    # the device path: every layer looks for carriers (none is known absent)
    monkeypatch.setattr(runtime_module, "HOST_INDEXED_DEVICES", set())
    monkeypatch.setattr(runtime, "fuse_norms", fuse)
    norm_checks = count_calls(monkeypatch, runtime_module.LayerRuntime, "_hook_norms")
    down_checks = count_calls(monkeypatch, runtime_module, "_rows_stay_apart")
    prompt = calibration[:2, :40].to(DEVICE)
    tokens = [tokenizer(t).input_ids[-1] for t in ("\n", "a", "\n", "b")]
    steps = [torch.tensor([[token]] * 2, device=DEVICE) for token in tokens]

    def decode(recheck: bool, detach_at: int | None = None) -> list[torch.Tensor]:
        logits = []
        with torch.no_grad():
            cache = model(input_ids=prompt, use_cache=True).past_key_values
            for index, step in enumerate(steps):
                if recheck:
                    runtime.fuse_norms = fuse  # a new sequence: checked again
                if index == detach_at:
                    with runtime.detached():
                        model(input_ids=step, past_key_values=cache)
                    cache.crop(prompt.shape[1] + index)
                    norm_checks.clear()
                    down_checks.clear()
                logits.append(model(input_ids=step, past_key_values=cache).logits)
                if index == 0:
                    assert norm_checks and down_checks  # the first forward's
                    norm_checks.clear()
                    down_checks.clear()
                elif index == detach_at:
                    assert norm_checks  # the norms were given their forwards back
                    norm_checks.clear()
                    down_checks.clear()
                elif not recheck:
                    assert not norm_checks and not down_checks
        return logits

    checked = decode(recheck=True)
    for settled in (decode(recheck=False), decode(recheck=False, detach_at=2)):
        for got, expected in zip(settled, checked, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
