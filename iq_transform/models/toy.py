"""Tiny decoders with planted massive activations, for tests and quick sweeps.

One builder for every Llama-layout family (``TOY_FAMILIES``: Llama, Mistral,
Qwen2 with q/k/v biases, Qwen3 with q/k norms, Phi-3 with fused ``qkv_proj`` and
``gate_up_proj``), each built from its own transformers config, so each family's
layout is exercised end to end.

Two spike kinds, as in real LLMs: ``<s>`` (BOS, always the first token) and the
newline delimiter (mid-sequence). Each carries a marker in its own embedding channel;
a dedicated unit of layer ``create_layer``'s MLP turns the marker into a spike in its
own residual channel, and a unit of layer ``remove_layer``'s MLP, keyed on that
channel, cancels it exactly. The channels involved are reserved (nothing else writes
to them), so between the two layers each spike token's normalized hidden vector is
a constant one-hot vector, like the first token of a real LLM.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from iq_transform.models.cache import cached_build
from iq_transform.models.registry import TOY_FAMILIES, TOY_MODEL

__all__ = [
    "PlantedSpike",
    "build_char_tokenizer",
    "build_planted_spike_model",
    "toy_family",
]

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
DELIMITER = "\n"
# Large enough to dominate its token's normalized MLP input (so the spike barely
# depends on context), small enough not to be a massive activation itself.
MARKER = 12.0
PROBE_TEXT = "Calibrate the planted units on a sentence.\nThen on another one."


@dataclass(frozen=True)
class PlantedSpike:
    """Where the spikes were planted (what analysis and calibration must find).

    :param token_id: the token that becomes a spike token
    :param marker_channel: embedding channel that marks the token
    :param spike_channel: residual channel that carries its spike
    :param spike: the spike's value in the residual stream
    :param create_layer: layer whose ``down_proj`` writes the spike
    :param remove_layer: layer whose ``down_proj`` removes it
    """

    token_id: int
    marker_channel: int
    spike_channel: int
    spike: float
    create_layer: int
    remove_layer: int


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII) that prepends ``<s>``."""
    alphabet = [PAD, BOS, EOS, UNK] + list(string.printable)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(alphabet))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_planted_spike_model(
    hidden_size: int = 64,
    num_layers: int = 6,
    create_layer: int = 1,
    remove_layer: int = 4,
    bos_spike: float = 4000.0,
    delimiter_spike: float = 1500.0,
    seed: int = 0,
    family: str = "llama",
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast, tuple[PlantedSpike, ...]]:
    """A random tiny decoder (fp32, eval mode) with two planted spike kinds.

    The model is named after a cache folder holding its config and tokenizer (no
    weights), so it goes straight into ``oneshot``, which reloads
    ``config._name_or_path``.

    :param family: the transformers ``model_type`` whose config and classes are
        built, one of ``TOY_FAMILIES``' values (``llama``, ``mistral``, ``qwen2``,
        ``qwen3``, ``phi3``)
    :return: model, character tokenizer, and one ``PlantedSpike`` per kind
        (BOS first, then the newline delimiter)
    """
    if not 0 <= create_layer < remove_layer < num_layers:
        raise ValueError("need 0 <= create_layer < remove_layer < num_layers")
    if family not in TOY_FAMILIES.values():
        raise ValueError(
            f"Unknown toy family {family!r}; choose one of "
            f"{sorted(TOY_FAMILIES.values())}."
        )
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    num_heads = 4
    extra = {} if family == "llama" else {"head_dim": hidden_size // num_heads}
    config = AutoConfig.for_model(
        family,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    delimiter_id = tokenizer.convert_tokens_to_ids(DELIMITER)
    spikes = (
        PlantedSpike(
            tokenizer.bos_token_id, 3, 17, bos_spike, create_layer, remove_layer
        ),
        PlantedSpike(delimiter_id, 5, 23, delimiter_spike, create_layer, remove_layer),
    )
    probe = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reserved = [c for p in spikes for c in (p.marker_channel, p.spike_channel)]
        _reserve_channels(model, reserved)
        embed = model.model.embed_tokens.weight
        for unit, planted in enumerate(spikes):
            embed[planted.token_id, planted.marker_channel] = MARKER
            _plant_unit(
                model, create_layer, unit, planted.marker_channel, planted.spike_channel
            )
            _plant_unit(
                model, remove_layer, unit, planted.spike_channel, planted.spike_channel
            )
        for unit, planted in enumerate(spikes):
            position = (probe[0] == planted.token_id).nonzero()[0].item()
            # down_proj is linear in its weight: scale each unit to hit its target.
            reached = _residual(model, probe, create_layer)[position]
            _scale_unit(
                model,
                create_layer,
                unit,
                planted.spike_channel,
                planted.spike / reached[planted.spike_channel].item(),
            )
            before = _residual(model, probe, remove_layer - 1)[position]
            after = _residual(model, probe, remove_layer)[position]
            channel = planted.spike_channel
            _scale_unit(
                model,
                remove_layer,
                unit,
                channel,
                -before[channel].item() / (after - before)[channel].item(),
            )
    _name_after_its_config(model, tokenizer)
    return model, tokenizer, spikes


def toy_family(spec: str) -> str | None:
    """The family a toy spec builds (``tiny-planted-qwen3`` -> ``qwen3``), if any."""
    return TOY_FAMILIES.get(spec)


def _name_after_its_config(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Point ``config._name_or_path`` at a cached folder with this toy's config and
    tokenizer: llm-compressor's ``oneshot`` loads the config from there to refuse
    checkpoints quantized in other formats, and fails on an empty name."""
    digest = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    name = f"{TOY_MODEL}.config-{digest[:12]}"

    def write(staging: Path, work_dir: Path) -> None:
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    folder = str(cached_build(name, None, write))
    model.config._name_or_path = folder
    model.name_or_path = folder


def _reserve_channels(model: PreTrainedModel, channels: list[int]) -> None:
    """Nothing but the planted units writes to ``channels``: ordinary tokens keep
    exact zeros there, so the planted units fire only on spike tokens."""
    model.model.embed_tokens.weight[:, channels] = 0.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[channels] = 0.0
        layer.mlp.down_proj.weight[channels] = 0.0


def _gate_and_up_rows(mlp, unit: int) -> list[tuple[torch.nn.Linear, int]]:
    """The gate and up projections' rows of MLP unit ``unit``: two linears, or
    Phi-3's fused ``gate_up_proj`` (gate rows first, then up rows)."""
    if hasattr(mlp, "gate_up_proj"):
        width = mlp.gate_up_proj.out_features // 2
        return [(mlp.gate_up_proj, unit), (mlp.gate_up_proj, width + unit)]
    return [(mlp.gate_proj, unit), (mlp.up_proj, unit)]


def _plant_unit(
    model: PreTrainedModel, layer: int, unit: int, read: int, write: int
) -> None:
    """Dedicate MLP unit ``unit`` of ``layer`` to map channel ``read`` to ``write``."""
    mlp = model.model.layers[layer].mlp
    for projection, row in _gate_and_up_rows(mlp, unit):
        projection.weight[row] = 0.0
        projection.weight[row, read] = 8.0
    mlp.down_proj.weight[:, unit] = 0.0
    mlp.down_proj.weight[write, unit] = 1.0


def _scale_unit(
    model: PreTrainedModel, layer: int, unit: int, write: int, factor: float
) -> None:
    model.model.layers[layer].mlp.down_proj.weight[write, unit] *= factor


def _residual(model, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Residual stream (tokens, channels) after decoder layer ``layer``."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer + 1][0]
