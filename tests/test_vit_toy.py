"""The planted-spike tiny ViTs (Dinov2Model, ViTModel): spikes on CLS and on one
patch position, LayerNorm, fc1 -> fc2 MLPs; exact expectations as for the Llama
toy, and SpikeFree inside oneshot with image calibration data."""

import pytest
import torch

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.composition.schemes import w8a8_quantizer
from iq_transform.evaluation.features import feature_quality, image_features
from iq_transform.models import get_arch_spec
from iq_transform.models.toy_vit import (
    build_planted_spike_vit,
    random_images,
    toy_image_processor,
)
from iq_transform.spikefree.runtime import SpikeFreeRuntime
from iq_transform.spikefree.templates import FIRST_TOKEN, MID_SEQUENCE

FAMILIES = ["dinov2", "vit"]


@pytest.fixture(scope="module", params=FAMILIES)
def toy(request):
    model, spikes = build_planted_spike_vit(request.param)
    return model, spikes


@pytest.fixture(scope="module")
def images():
    return random_images(3, seed=1)


def calibrated_runtime(model) -> SpikeFreeRuntime:
    runtime = SpikeFreeRuntime(model, get_arch_spec(model), ratio=64.0)
    runtime.start_collecting()
    runtime.calibration_forward(random_images(4, seed=2))
    runtime.finish_collecting()
    return runtime


def test_planted_spikes_sit_where_planted(toy, images):
    model, spikes = toy
    with torch.no_grad():
        hidden = model(pixel_values=images, output_hidden_states=True).hidden_states
    for spike in spikes:
        position, channel = spike.token_id, spike.spike_channel
        for layer in range(spike.create_layer, spike.remove_layer):
            values = hidden[layer + 1][:, position, channel]
            torch.testing.assert_close(
                values, torch.full_like(values, spike.spike), rtol=0.02, atol=0
            )
        removed = hidden[spike.remove_layer + 1][:, position, channel]
        assert removed.abs().max() < 0.05 * spike.spike  # as the Llama toy


def test_sites_templates_and_spike_tokens_are_exact(toy, images):
    model, (cls, patch) = toy
    runtime = calibrated_runtime(model)
    try:
        templates = runtime.templates
        assert templates.carrier_layers == [2, 3, 4]
        assert templates.down_proj_layers == [1, 2, 3, 4]
        creating = templates.layers[1].down_template
        assert creating[FIRST_TOKEN, cls.spike_channel] == pytest.approx(
            cls.spike, rel=0.02
        )
        assert creating[MID_SEQUENCE, patch.spike_channel] == pytest.approx(
            patch.spike, rel=0.02
        )
        # LayerNorm templates: a token dominated by one channel normalizes to
        # sqrt(hidden - 1) there (its mean is subtracted first)
        hidden_size = model.config.hidden_size
        for layer in (2, 3, 4):
            for name, template in templates.layers[layer].norm_templates.items():
                for kind, spike in ((FIRST_TOKEN, cls), (MID_SEQUENCE, patch)):
                    value = template[kind, spike.spike_channel]
                    assert value == pytest.approx((hidden_size - 1) ** 0.5, 0.01), name
        with torch.no_grad():
            model(pixel_values=images)
        expected = torch.zeros_like(runtime.last_spike_tokens)
        expected[:, [cls.token_id, patch.token_id]] = True
        assert torch.equal(runtime.last_spike_tokens, expected)
    finally:
        runtime.remove()


def test_templates_keep_every_other_token_and_cls_features(toy, images):
    """The spike patch token is replaced by its kind's mean (its own patch content
    is lost while it carries the spike, as DINOv2's high-norm tokens); CLS and
    every ordinary token keep their FP features."""
    model, (cls, patch) = toy
    with torch.no_grad():
        before = model(pixel_values=images).last_hidden_state
    runtime = calibrated_runtime(model)
    try:
        with torch.no_grad():
            after = model(pixel_values=images).last_hidden_state
    finally:
        runtime.remove()
    cosine = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    others = [i for i in range(cosine.shape[1]) if i != patch.token_id]
    assert cosine[:, others].min() > 0.999
    assert cosine[:, cls.token_id].min() > 0.999


def test_spikefree_in_oneshot_with_images_beats_plain_static():
    images = random_images(8, seed=3)
    features = {}
    for name, recipe in (
        ("fp32", []),
        ("static", [w8a8_quantizer("int", dynamic=False, observer="minmax")]),
        (
            "spikefree",
            [
                SpikeFreeModifier(),
                w8a8_quantizer("int", dynamic=False, observer="spikefree_minmax"),
            ],
        ),
    ):
        model, _ = build_planted_spike_vit("dinov2")
        if recipe:
            apply_recipe(model, toy_image_processor(), recipe, random_images(4, seed=2))
        features[name] = image_features(model, images)
        if name == "spikefree":
            assert get_runtime(model).templates.carrier_layers == [2, 3, 4]
            fc2 = model.encoder.layer[1].mlp.fc2
            assert hasattr(fc2, "input_scale")
    static = feature_quality(features["static"], features["fp32"])
    spikefree = feature_quality(features["spikefree"], features["fp32"])
    assert 1 - spikefree.pooled_cosine < (1 - static.pooled_cosine) / 3, (
        static,
        spikefree,
    )
    assert spikefree.cls_cosine > static.cls_cosine


def test_analysis_finds_the_planted_cls_and_patch_spikes(toy, images):
    from iq_transform.evaluation.spike_analysis import analyze_spikes

    model, (cls, patch) = toy
    report = analyze_spikes(model, None, images, progress=False)
    assert report.seqlen == 17  # CLS + 4x4 patches
    found = {(t.sample, t.token_index) for t in report.spike_tokens}
    assert found == {(s, p) for s in range(3) for p in (cls.token_id, patch.token_id)}
    names = {t.token for t in report.spike_tokens}
    assert names == {"<cls>", f"<patch {patch.token_id - 1}>"}
    for token in report.spike_tokens:
        assert token.created_at_layer == 1 and token.removed_at_layer == 4
    layers = arch_layers(model)
    assert report.creating_sites == [f"{layers}.1.mlp.fc2"]
    assert report.removing_sites == [f"{layers}.4.mlp.fc2"]


def arch_layers(model) -> str:
    return get_arch_spec(model).layers


def test_iq_quantize_and_iq_analyze_take_a_vit_and_image_data(tmp_path):
    """The apps' image path: data=imagenet_sample / eval=imagenet_sample (real
    photos, resized by the toy's image processor), features against FP32."""
    from iq_transform.cli.analyze import run_analysis
    from iq_transform.composition.config import AnalyzeConfig
    from iq_transform.composition.job import run_quantize
    from tests.test_compose import composed_config

    config = composed_config(
        "model=tiny-planted-dinov2",
        "data=imagenet_sample",
        "eval=imagenet_sample",
        "data.num_samples=4",
        "eval.num_samples=8",
        "transform.ratio=64",
        "quant.observer=minmax",
        "progress=false",
        f"save_dir={tmp_path / 'saved'}",
    )
    results = run_quantize(config, tmp_path / "quantize")
    assert results["spikefree_carrier_layers"] == [2, 3, 4]
    from iq_transform import load_pretrained

    saved = load_pretrained(tmp_path / "saved")
    assert get_runtime(saved).templates.carrier_layers == [2, 3, 4]
    features = results["features"]
    assert features["num_images"] == 8 and features["cls_cosine"] > 0.99
    assert (tmp_path / "quantize" / "recipe.yaml").is_file()
    analyze = AnalyzeConfig(model=config.model, data=config.data, progress=False)
    report = run_analysis(analyze, tmp_path / "analyze")
    assert report["has_spikes"] and report["seqlen"] == 17
    assert {t["token"] for t in report["spike_tokens"]} == {"<cls>", "<patch 5>"}


@pytest.mark.parametrize(
    "name", ["CLIPVisionModel", "Dinov2WithRegistersModel", "ViTForImageClassification"]
)
def test_other_vision_layouts_resolve_and_pass_through(name):
    """Every ArchSpec path resolves (CLIP's layer_norm1/2, registers, a task head's
    ``vit.`` prefix) and a random model without spikes passes through unchanged."""
    import transformers

    model_class = getattr(transformers, name)
    config_class = model_class.config_class
    config = config_class(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    )
    model = model_class(config).eval()
    arch = get_arch_spec(model)
    for layer in arch.decoder_layers(model):
        for norm, linears in arch.norm_linears.items():
            assert isinstance(layer.get_submodule(norm), torch.nn.LayerNorm)
            for linear in (*linears, arch.down_proj):
                assert isinstance(layer.get_submodule(linear), torch.nn.Linear)
    images = random_images(2, size=28)
    with torch.no_grad():
        before = model(pixel_values=images)[0]
        runtime = SpikeFreeRuntime(model, arch, ratio=64.0)
        runtime.start_collecting()
        runtime.calibration_forward(random_images(2, size=28, seed=4))
        runtime.finish_collecting()
        assert not runtime.templates.has_spikes
        after = model(pixel_values=images)[0]
        runtime.remove()
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_vit_reloads_with_its_runtime_and_the_same_features(family, tmp_path):
    """A quantized SpikeFree ViT saved with save_pretrained loads back through
    load_pretrained and its Auto class (AutoModel for a backbone) as a
    ``<family>_spikefree`` model with the runtime: the same features, exactly."""
    import json

    from transformers import AutoModel

    from iq_transform import load_pretrained
    from iq_transform.export.save import save_checkpoint

    model, _ = build_planted_spike_vit(family)
    recipe = [
        SpikeFreeModifier(),
        w8a8_quantizer("int", dynamic=False, observer="spikefree_minmax"),
    ]
    apply_recipe(model, toy_image_processor(), recipe, random_images(4, seed=2))
    images = random_images(3, seed=5)
    before = image_features(model, images)
    folder = tmp_path / "checkpoint"
    save_checkpoint(model, toy_image_processor(), folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"{family}_spikefree"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    for loaded in (load_pretrained(folder), AutoModel.from_pretrained(folder)):
        assert isinstance(loaded, type(model))
        assert get_runtime(loaded).templates.carrier_layers == [2, 3, 4]
        after = image_features(loaded.eval(), images)
        torch.testing.assert_close(after.cls, before.cls, rtol=0, atol=1e-6)
        torch.testing.assert_close(after.pooled, before.pooled, rtol=0, atol=1e-6)
