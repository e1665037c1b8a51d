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
