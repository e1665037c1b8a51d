"""Templates follow Gemma's (1 + w) norms, also through oneshot's norm swap."""

import math

import torch
from llmcompressor.modeling.offset_norm import norm_calibration_context
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from iq_transform.models.arch import get_arch_spec
from iq_transform.spikefree.runtime import SpikeFreeRuntime
from iq_transform.spikefree.templates import LayerTemplates, SpikeTemplates


def tiny_gemma() -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight"):
                parameter.normal_(0.0, 0.5)  # (1 + w) differs from w
    return model


def test_norm_templates_scale_with_the_current_gemma_norm():
    model = tiny_gemma()
    arch = get_arch_spec(model)
    assert arch.name == "gemma3"
    runtime = SpikeFreeRuntime(model, arch)
    hidden = model.config.hidden_size
    template = torch.randn(2, hidden)
    every_token = LayerTemplates(
        residual_threshold=torch.tensor(0.0),  # every token counts as a carrier
        down_threshold=torch.tensor(math.inf),
        norm_templates={name: template for name in arch.norm_names()},
    )
    runtime.load_templates(SpikeTemplates({0: every_token}))
    seen = {}

    def capture(module, args):
        seen["q_input"] = args[0].detach().clone()

    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(capture)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19, 21]])
    expected_first = template[0] * (1.0 + model.model.layers[0].input_layernorm.weight)
    expected_mid = template[1] * (1.0 + model.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        model(input_ids=ids)
        torch.testing.assert_close(seen["q_input"][0, 0], expected_first)
        torch.testing.assert_close(seen["q_input"][0, 5], expected_mid)
        original_norm = model.model.layers[0].input_layernorm
        with norm_calibration_context(model):
            swapped = model.model.layers[0].input_layernorm
            assert swapped is not original_norm  # llm-compressor's temporary norm
            model(input_ids=ids)
            torch.testing.assert_close(seen["q_input"][0, 0], expected_first)
        assert model.model.layers[0].input_layernorm is original_norm
        model(input_ids=ids)
        torch.testing.assert_close(seen["q_input"][0, 5], expected_mid)
    handle.remove()
    runtime.remove()
