import json

import pytest
import torch

from iq_transform.evaluation.spike_analysis import analyze_spikes
from iq_transform.reports.spike_plot import plot_spike_report
from iq_transform.spikefree.detect import spike_token_mask


def test_spike_token_mask_ratio_padding_and_threshold():
    token_max = torch.tensor(
        [
            [100.0, 1.0, 1.2, 0.9, 1.1, 1.0, 70.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 500.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    mask = torch.ones_like(token_max, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    spikes = spike_token_mask(token_max, ratio=64, attention_mask=mask)
    assert spikes.nonzero().tolist() == [[0, 0], [0, 6], [1, 2]]
    # One decode token: no median, only the calibrated absolute threshold decides.
    single = torch.tensor([[300.0]])
    assert not spike_token_mask(single, ratio=64).any()
    assert spike_token_mask(single, ratio=64, threshold=100.0).all()
    assert not spike_token_mask(torch.tensor([[50.0]]), 64, threshold=100.0).any()


def test_analysis_finds_the_planted_spikes(planted, planted_windows, tmp_path):
    model, tokenizer, spikes = planted
    report = analyze_spikes(model, tokenizer, planted_windows, progress=False)
    assert report.has_spikes
    expected = {
        (sample, position)
        for planted_spike in spikes
        for sample, position in (planted_windows == planted_spike.token_id)
        .nonzero()
        .tolist()
    }
    found = {(t.sample, t.token_index) for t in report.spike_tokens}
    assert found == expected
    channel_of = {p.token_id: p.spike_channel for p in spikes}
    for token in report.spike_tokens:
        token_id = int(planted_windows[token.sample, token.token_index])
        assert token.channel == channel_of[token_id]
        assert token.created_at_layer == 1
        assert token.removed_at_layer == 4
        assert token.kind == (
            "first_token" if token.token_index == 0 else "mid_sequence"
        )
    assert report.creating_sites == ["model.layers.1.mlp.down_proj"]
    assert report.removing_sites == ["model.layers.4.mlp.down_proj"]
    kinds = {v.kind: v for v in report.constant_vectors}
    assert set(kinds) == {"first_token", "mid_sequence"}
    assert all(v.min_cosine > 0.999 for v in kinds.values())
    # the largest residual activation is the BOS spike in its channel
    residual_2 = next(s for s in report.sites if s.name == "model.layers.2")
    assert residual_2.top[0].channel == spikes[0].spike_channel
    assert residual_2.top[0].token == "<s>"
    json.dumps(report.to_dict())
    assert plot_spike_report(report, tmp_path / "spikes.png").stat().st_size > 10_000


def test_model_without_spikes_is_reported_not_an_error(planted_windows):
    from transformers import LlamaConfig, LlamaForCausalLM

    from iq_transform.models.toy import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    report = analyze_spikes(model, tokenizer, planted_windows, progress=False)
    assert not report.has_spikes
    assert report.spike_tokens == [] and report.creating_sites == []
    assert "no spike tokens" in report.summary()


def test_nan_activations_are_a_clear_error(planted, planted_windows):
    model, tokenizer, _ = planted
    layer = model.model.layers[2]
    handle = layer.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(FloatingPointError, match="NaN"):
            analyze_spikes(model, tokenizer, planted_windows, progress=False)
    finally:
        handle.remove()


def test_token_spikes_and_channel_outliers_are_told_apart(planted, planted_windows):
    """The planted spikes are token spikes (their channels are zero on ordinary
    tokens); a constant added to one embedding channel is a channel outlier on
    every token, which the report points to SmoothQuant / rotation instead."""
    model, tokenizer, spikes = planted
    plain = analyze_spikes(model, tokenizer, planted_windows, progress=False)
    assert not [o for o in plain.channel_outliers if o.residual_layers]
    assert "SpikeFree handles them" in plain.summary()
    assert "no channel outliers in the residual stream" in plain.summary()
    channel, value = 40, 5.0
    # a reserved channel, as the toy's spike channels: no layer reads or writes it,
    # so it keeps ``value`` on every token through every layer
    rows = [model.model.embed_tokens.weight[:, channel]]
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        rows += [attention.o_proj.weight[channel], mlp.down_proj.weight[channel]]
        rows += [
            linear.weight[:, channel]
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj)
        ]
        rows += [mlp.gate_proj.weight[:, channel], mlp.up_proj.weight[:, channel]]
    saved = [row.clone() for row in rows]
    with torch.no_grad():
        for row in rows[1:]:
            row.zero_()
        rows[0].fill_(value)
    try:
        report = analyze_spikes(model, tokenizer, planted_windows, progress=False)
    finally:
        with torch.no_grad():
            for row, original in zip(rows, saved, strict=True):
                row.copy_(original)
    outlier = report.channel_outliers[0]
    assert outlier.channel == channel
    assert outlier.residual_layers == list(range(model.config.num_hidden_layers))
    found = {(t.sample, t.token_index) for t in report.spike_tokens}
    assert found == {(t.sample, t.token_index) for t in plain.spike_tokens}
    assert {t.channel for t in report.spike_tokens} == {p.spike_channel for p in spikes}
    summary = report.summary()
    assert f"channel {channel}: residual of layers 0-5" in summary
    assert "SmoothQuant or a rotation" in summary
