import torch

from iq_transform.models.toy import DELIMITER


def test_planted_spikes_sit_where_planted(planted, planted_windows):
    model, tokenizer, spikes = planted
    hidden = model(
        input_ids=planted_windows, output_hidden_states=True, use_cache=False
    ).hidden_states
    bos, delimiter = spikes
    assert delimiter.token_id == tokenizer.convert_tokens_to_ids(DELIMITER)
    for planted_spike in spikes:
        rows, cols = (planted_windows == planted_spike.token_id).nonzero(as_tuple=True)
        assert len(rows) > 0
        for layer in range(planted_spike.create_layer, planted_spike.remove_layer):
            values = hidden[layer + 1][rows, cols, planted_spike.spike_channel]
            # within 5 %: the planted unit barely depends on context
            torch.testing.assert_close(
                values, torch.full_like(values, planted_spike.spike), rtol=0.05, atol=0
            )
        after = hidden[planted_spike.remove_layer + 1][rows, cols]
        assert (
            after[:, planted_spike.spike_channel].abs().max()
            < 0.05 * planted_spike.spike
        )
    assert bos.token_id == tokenizer.bos_token_id


def test_a_toy_straight_from_the_builder_goes_through_oneshot(calibration):
    """No save and reload: the builder names the model after a folder with its
    config, which llm-compressor's oneshot loads."""
    from pathlib import Path

    from iq_transform import SpikeFreeModifier, get_runtime
    from iq_transform.composition.pipeline import apply_recipe
    from iq_transform.composition.schemes import w8a8_quantizer
    from iq_transform.models import build_planted_spike_model

    model, tokenizer, _ = build_planted_spike_model()
    folder = Path(model.config._name_or_path)
    assert (folder / "config.json").is_file()
    assert not (folder / "model.safetensors").exists()  # a name, not a checkpoint
    recipe = [SpikeFreeModifier(), w8a8_quantizer("int", dynamic=False)]
    apply_recipe(model, tokenizer, recipe, calibration)
    assert get_runtime(model).templates.carrier_layers == [2, 3, 4]
    assert model.model.layers[0].self_attn.q_proj.quantization_scheme is not None
