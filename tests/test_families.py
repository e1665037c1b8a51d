"""The planted-spike toy in every Llama-layout family the ArchSpec table names
(Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k norms, Phi-3 with fused
``qkv_proj`` and ``gate_up_proj``): the same exact
expectations as the Llama toy, end to end through oneshot, SmoothQuant and a
save/reload."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from iq_transform import get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.data import TextSource, evaluation_windows, load_text
from iq_transform.models import get_arch_spec, load_model
from iq_transform.models.toy import build_planted_spike_model
from iq_transform.spikefree.runtime import SpikeFreeRuntime
from iq_transform.spikefree.templates import FIRST_TOKEN, MID_SEQUENCE
from tests.test_compose import composed_config, recipe_of

FAMILIES = ["mistral", "qwen2", "qwen3", "phi3"]


def device_of(model) -> torch.device:
    """Where oneshot left the model: a GPU when there is one."""
    return next(model.parameters()).device


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids``, on the CPU."""
    return model(ids.to(device_of(model))).logits.cpu()


def quantized(family: str, calibration, transform: str, stages: str):
    model, tokenizer = load_model(f"tiny-planted-{family}")
    # ratio 64 (the modifier's default): at 32 the toy's embedding markers (12, against
    # ordinary tokens' ~0.25) make every layer a carrier
    overrides = ["transform.ratio=64"] if transform == "spikefree" else []
    config = composed_config(
        "quant=w8a8_static", f"stages={stages}", f"transform={transform}", *overrides
    )
    apply_recipe(model, tokenizer, recipe_of(config, get_arch_spec(model)), calibration)
    return model, tokenizer


@pytest.fixture(scope="module")
def eval_windows(planted):
    _, tokenizer, _ = planted
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    return evaluation_windows(tokenizer, text[:20000], seqlen=128, num_windows=4)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, calibration, eval_windows, tmp_path_factory):
    """Per family: the FP toy, W8A8 static without and with SpikeFree (behind
    SmoothQuant, whose mappings come from the ArchSpec), and the latter saved."""
    name = request.param
    fp, _ = load_model(f"tiny-planted-{name}")
    static, _ = quantized(name, calibration, "none", "rtn")
    spikefree, tokenizer = quantized(name, calibration, "spikefree", "smoothquant_rtn")
    folder = tmp_path_factory.mktemp(name) / "checkpoint"
    spikefree.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    return {
        "name": name,
        "fp": fp,
        "static": static,
        "spikefree": spikefree,
        "folder": folder,
    }


def test_each_family_is_its_own_transformers_class(family):
    model = family["fp"]
    assert model.config.model_type == family["name"]
    assert get_arch_spec(model).name == (
        "phi3" if family["name"] == "phi3" else "llama"
    )
    layer = model.model.layers[0]
    if family["name"] == "phi3":
        assert hasattr(layer.self_attn, "qkv_proj") and hasattr(
            layer.mlp, "gate_up_proj"
        )
    if family["name"] == "qwen2":
        assert layer.self_attn.q_proj.bias is not None
    if family["name"] == "qwen3":
        assert hasattr(layer.self_attn, "q_norm")


def test_sites_and_templates_are_exact(family):
    templates = get_runtime(family["spikefree"]).templates
    assert templates.carrier_layers == [2, 3, 4]
    assert templates.down_proj_layers == [1, 2, 3, 4]
    _, _, (bos, delimiter) = build_planted_spike_model(family=family["name"])
    creating = templates.layers[1].down_template
    assert creating[FIRST_TOKEN, bos.spike_channel] == pytest.approx(bos.spike, 1e-3)
    hidden_size = family["fp"].config.hidden_size
    for layer in (2, 3, 4):
        for name, template in templates.layers[layer].norm_templates.items():
            for kind, planted_spike in ((FIRST_TOKEN, bos), (MID_SEQUENCE, delimiter)):
                value = template[kind, planted_spike.spike_channel]
                assert value == pytest.approx(hidden_size**0.5, rel=1e-3), name


def test_first_token_templates_leave_the_fp_model_unchanged(family, calibration):
    """The first-token template is exact (mid-sequence ones are means over
    contexts), so a text without delimiters computes the same logits."""
    fp = family["fp"]
    _, tokenizer = load_model(f"tiny-planted-{family['name']}")
    ids = tokenizer(
        ["The quick brown fox jumps over the lazy dog." * 3], return_tensors="pt"
    )
    with torch.no_grad():
        before = fp(**ids).logits
        runtime = SpikeFreeRuntime(fp, get_arch_spec(fp), ratio=64.0)
        try:
            runtime.start_collecting()
            runtime.calibration_forward(calibration)
            runtime.finish_collecting()
            assert runtime.templates.carrier_layers == [2, 3, 4]
            after = fp(**ids).logits
            assert runtime.last_spike_tokens.sum() == 1
        finally:
            runtime.remove()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_smoothquant_mappings_resolve_in_every_layer(family):
    fp, smoothed = family["fp"], family["spikefree"]
    for norm in get_arch_spec(fp).norm_linears:
        for index in range(fp.config.num_hidden_layers):
            before = fp.model.layers[index].get_submodule(norm).weight.cpu()
            after = smoothed.model.layers[index].get_submodule(norm).weight.cpu()
            assert not torch.allclose(before, after), (norm, index)


def test_static_with_spikefree_beats_plain_static(family, eval_windows):
    """Measured as the logits' error to FP (a random toy's perplexity sits near the
    vocabulary size, where it hardly moves)."""
    with torch.no_grad():
        reference = logits_of(family["fp"], eval_windows)
        error = {
            key: (logits_of(family[key], eval_windows) - reference).pow(2).mean().item()
            for key in ("static", "spikefree")
        }
    assert error["spikefree"] < error["static"] / 3, error


def test_a_reloaded_checkpoint_computes_what_the_model_in_memory_did(
    family, eval_windows
):
    model = AutoModelForCausalLM.from_pretrained(family["folder"])
    assert model.config.model_type == f"{family['name']}_spikefree"
    assert get_runtime(model) is not None
    model.to(device_of(family["spikefree"]))  # the same kernels on both sides
    with torch.no_grad():
        expected = logits_of(family["spikefree"], eval_windows)
        torch.testing.assert_close(
            logits_of(model, eval_windows), expected, rtol=1e-4, atol=1e-4
        )
