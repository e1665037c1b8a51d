"""SpikeFreeModifier on the planted-spike tiny Llama: exact expectations."""

import pytest
import torch
import yaml

from iq_transform import SpikeFreeModifier, SpikeFreeOrderError, get_runtime
from iq_transform.composition.pipeline import RECIPES_DIR, apply_recipe
from iq_transform.composition.schemes import w8a8_quantizer
from iq_transform.evaluation.data import TextSource
from iq_transform.models import load_model
from iq_transform.spikefree.templates import FIRST_TOKEN, MID_SEQUENCE


def static_int8(observer: str):
    return w8a8_quantizer("int", dynamic=False, observer=observer)


@pytest.fixture
def fresh():
    return load_model("tiny-planted")


@pytest.fixture(scope="module")
def calibrated(calibration):
    """The planted model with SpikeFree calibrated and installed (no quantization)."""
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    return model, tokenizer


def test_sites_are_found_where_planted(calibrated):
    templates = get_runtime(calibrated[0]).templates
    assert templates.carrier_layers == [2, 3, 4]
    assert templates.down_proj_layers == [1, 2, 3, 4]
    for index in (2, 3, 4):
        assert torch.isfinite(templates.layers[index].residual_threshold)
    assert torch.isinf(templates.layers[0].residual_threshold)


def test_templates_equal_the_planted_vectors(calibrated, planted, calibration):
    model, tokenizer = calibrated
    _, _, (bos, delimiter) = planted
    templates = get_runtime(model).templates
    fp_model, _ = load_model("tiny-planted")
    with torch.no_grad():
        hidden = fp_model(
            input_ids=calibration, output_hidden_states=True
        ).hidden_states
    written = hidden[2] - hidden[1]  # what layer 1 added (attention is reserved-free)
    creating = templates.layers[1].down_template
    for kind, planted_spike in ((FIRST_TOKEN, bos), (MID_SEQUENCE, delimiter)):
        rows = calibration == planted_spike.token_id
        channel = planted_spike.spike_channel
        # the output template is the mean spike the creating down_proj wrote
        expected = written[rows][:, channel].mean()
        assert creating[kind, channel] == pytest.approx(expected.item(), rel=1e-4)
        other = (set((bos.spike_channel, delimiter.spike_channel)) - {channel}).pop()
        assert creating[kind, other] == 0.0  # each kind writes only its own channel
    assert creating[FIRST_TOKEN, bos.spike_channel] == pytest.approx(bos.spike, 1e-3)
    # norm templates are the carriers' normalized residual: one-hot, sqrt(hidden)
    hidden_size = model.config.hidden_size
    for layer in (2, 3, 4):
        for name, template in templates.layers[layer].norm_templates.items():
            for kind, planted_spike in ((FIRST_TOKEN, bos), (MID_SEQUENCE, delimiter)):
                value = template[kind, planted_spike.spike_channel]
                assert value == pytest.approx(hidden_size**0.5, rel=1e-3), name
                rest = template[kind].clone()
                rest[planted_spike.spike_channel] = 0
                assert rest.norm() < 0.01 * value


def test_first_token_template_is_exact_so_fp_outputs_are_unchanged(calibrated):
    model, tokenizer = calibrated
    ids = tokenizer(
        ["The quick brown fox jumps over the lazy dog." * 3], return_tensors="pt"
    )
    runtime = get_runtime(model)
    with torch.no_grad():
        with_runtime = model(**ids).logits
        runtime_state = [(layer, layer.templates) for layer in runtime.layers]
        for layer, _ in runtime_state:
            layer.templates = None
        without = model(**ids).logits
        for layer, templates in runtime_state:
            layer.templates = templates
    torch.testing.assert_close(with_runtime, without, rtol=1e-4, atol=1e-4)


def test_detection_with_left_padding_batch_and_mid_sequence_spikes(calibrated, planted):
    model, tokenizer = calibrated
    _, _, (bos, delimiter) = planted
    texts = [
        "Short one.\nEnds here",
        "A longer line of text.\nAnd a second one.\nThird",
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch.attention_mask[0] == 0).any()  # the first row is left-padded
    runtime = get_runtime(model)
    with torch.no_grad():
        model(**batch)
    expected = (batch.input_ids == bos.token_id) | (
        batch.input_ids == delimiter.token_id
    )
    expected &= batch.attention_mask.bool()
    assert torch.equal(runtime.last_spike_tokens.cpu(), expected)
    assert expected.sum() == 5


def test_generation_with_kv_cache_equals_generation_without(calibrated):
    model, tokenizer = calibrated
    prompt = tokenizer(["Once upon a time\nthere"], return_tensors="pt")
    runtime = get_runtime(model)
    with torch.no_grad():
        cached = model.generate(**prompt, max_new_tokens=24, do_sample=False)
        seen_with_cache = runtime.spike_tokens_seen
        uncached = model.generate(
            **prompt, max_new_tokens=24, do_sample=False, use_cache=False
        )
    assert torch.equal(cached, uncached)
    assert seen_with_cache > 0


def test_observer_scales_exclude_spike_rows(calibration):
    scales = {}
    for observer, recipe_head in (("minmax", []), ("spikefree_minmax", "sf")):
        model, tokenizer = load_model("tiny-planted")
        recipe = ([SpikeFreeModifier()] if recipe_head else []) + [
            static_int8(observer)
        ]
        apply_recipe(model, tokenizer, recipe, calibration)
        scales[observer] = {
            name: module.input_scale.item()
            for name, module in model.named_modules()
            if hasattr(module, "input_scale")
        }
    creating = "model.layers.1.mlp.down_proj"
    removing = "model.layers.4.mlp.down_proj"
    for name in (creating, removing):
        assert scales["minmax"][name] > 50 * scales["spikefree_minmax"][name]


def test_spikefree_static_int8_beats_plain_static(calibration, fresh):
    from iq_transform.evaluation.data import evaluation_windows, load_text
    from iq_transform.evaluation.perplexity import perplexity

    _, tokenizer = fresh
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text[:20000], seqlen=128, num_windows=4)
    ppl = {}
    for name, recipe in (
        ("fp32", []),
        ("static", [static_int8("minmax")]),
        ("spikefree", [SpikeFreeModifier(), static_int8("spikefree_minmax")]),
    ):
        model, tokenizer = load_model("tiny-planted")
        if recipe:
            apply_recipe(model, tokenizer, recipe, calibration)
        ppl[name] = perplexity(model, windows, progress=False).ppl
    assert abs(ppl["spikefree"] - ppl["fp32"]) < abs(ppl["static"] - ppl["fp32"]) / 3


def test_yaml_recipe_round_trip(calibration):
    from llmcompressor.recipe import Recipe

    path = RECIPES_DIR / "w8a8_static_spikefree.yaml"
    recipe = Recipe.create_instance(path_or_modifiers=str(path))
    kinds = [type(m).__name__ for m in recipe.modifiers]
    assert kinds == ["SpikeFreeModifier", "QuantizationModifier"]
    assert recipe.modifiers[0].ratio == 32.0
    reparsed = yaml.safe_load(recipe.yaml())
    assert "SpikeFreeModifier" in str(reparsed)
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, path, calibration)
    runtime = get_runtime(model)
    assert runtime.ratio == 32.0
    assert {1, 2, 3, 4} <= set(runtime.templates.down_proj_layers)  # planted sites
    assert hasattr(model.model.layers[1].mlp.down_proj, "input_scale")


def test_model_without_spikes_passes_through_and_still_quantizes(
    calibration, loguru_warnings
):
    model, tokenizer = load_model("tiny-planted")
    with torch.no_grad():  # unplant: no marker, so no unit fires
        model.model.embed_tokens.weight[:, 3] = 0.0
        model.model.embed_tokens.weight[:, 5] = 0.0
    apply_recipe(
        model,
        tokenizer,
        [SpikeFreeModifier(), static_int8("spikefree_minmax")],
        calibration,
    )
    assert "no spike tokens" in loguru_warnings.text
    assert get_runtime(model) is None
    assert hasattr(model.model.layers[1].mlp.down_proj, "input_scale")


def test_spikefree_after_a_quantizer_is_a_clear_error(calibration, fresh):
    model, tokenizer = fresh
    with pytest.raises(SpikeFreeOrderError, match="must come first"):
        apply_recipe(
            model,
            tokenizer,
            [static_int8("minmax"), SpikeFreeModifier()],
            calibration,
        )


def test_empty_calibration_set_is_a_clear_error(fresh):
    model, tokenizer = fresh
    with pytest.raises(Exception, match="calibration"):
        apply_recipe(
            model,
            tokenizer,
            [SpikeFreeModifier()],
            torch.zeros(0, 16, dtype=torch.long),
        )


def test_nan_activations_are_a_clear_error(calibration, fresh):
    model, tokenizer = fresh
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)


def test_unknown_architecture_is_a_clear_error(calibration, fresh):
    model, tokenizer = fresh
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="Unknown architecture.*mystery"):
        apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)


def test_spikefree_mse_averages_batches_evenly_and_drops_spike_rows():
    from compressed_tensors.quantization import QuantizationArgs

    from iq_transform.spikefree.observers import SpikeFreeMSEObserver
    from iq_transform.spikefree.rows import set_excluded_rows

    args = QuantizationArgs(num_bits=8, type="int", strategy="tensor", symmetric=True)
    torch.manual_seed(0)
    batches = [torch.randn(1, 64, 16) * scale for scale in (1.0, 2.0, 4.0)]
    alone = []
    for batch in batches:
        single = SpikeFreeMSEObserver(base_name="input", args=args)
        single(batch)
        alone.append(single.max_vals.clone())
    observer = SpikeFreeMSEObserver(base_name="input", args=args)
    for batch in batches:
        observer(batch)
    torch.testing.assert_close(observer.max_vals, torch.stack(alone).mean(0))
    spiky = batches[0].clone()
    spiky[0, 0] = 1000.0
    rows = torch.zeros(1, 64, dtype=torch.bool)
    rows[0, 0] = True
    clean = SpikeFreeMSEObserver(base_name="input", args=args)
    set_excluded_rows(rows)
    try:
        clean(spiky)
    finally:
        set_excluded_rows(None)
    assert clean.max_vals.max() < 10.0


def test_spikefree_mse_wide_search_clips_4_bit_scales_below_the_default_floor():
    """At 4 bits the MSE-optimal clip of Gaussian-like (rotated) activations lies
    near 0.6 x their max: ``maxshrink: 0.9`` (conf/quant/w4a4_static.yaml) reaches
    it, llm-compressor's default search stops at 0.8 x max."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from iq_transform.spikefree.observers import SpikeFreeMSEObserver

    torch.manual_seed(0)
    batch = torch.randn(1, 2048, 64)
    errors, maxima = {}, {}
    for maxshrink in (None, 0.9):
        kwargs = (
            {} if maxshrink is None else {"observer_kwargs": {"maxshrink": maxshrink}}
        )
        args = QuantizationArgs(
            num_bits=4, type="int", strategy="tensor", symmetric=True, **kwargs
        )
        observer = SpikeFreeMSEObserver(base_name="input", args=args)
        observer(batch)
        scale, zero_point = calculate_qparams(
            observer.min_vals, observer.max_vals, args
        )
        quantized = fake_quantize(batch, scale, zero_point, args)
        errors[maxshrink] = float((quantized - batch).pow(2).mean())
        maxima[maxshrink] = float(observer.max_vals.max())
    absmax = float(batch.abs().max())
    assert maxima[None] >= 0.79 * absmax
    assert maxima[0.9] < 0.7 * absmax
    assert errors[0.9] < 0.7 * errors[None]


@pytest.mark.parametrize("stage", ["QuIPModifier", "SmoothQuantModifier"])
def test_spikefree_after_a_rotation_or_smoothing_is_a_clear_error(
    calibration, fresh, stage
):
    from llmcompressor.modifiers import transform

    model, tokenizer = fresh
    before = getattr(transform, stage)()
    with pytest.raises(SpikeFreeOrderError, match=f"placed after {stage}"):
        apply_recipe(model, tokenizer, [before, SpikeFreeModifier()], calibration)
