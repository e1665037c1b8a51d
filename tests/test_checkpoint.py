"""Save and reload a SpikeFree model the standard way: the runtime comes back, the
reloaded model computes what the in-memory one did, bad checkpoints are refused."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import iq_transform
from iq_transform import CheckpointError, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.export import install_from_checkpoint
from iq_transform.export.format import FORMAT_VERSION, STATE_FILE, TENSORS_FILE
from iq_transform.models import get_arch_spec, load_model
from tests.test_compose import composed_config, recipe_of

# the four recipes a checkpoint must reproduce: quant, stages
RECIPES = {
    "w8a8_static+rtn": ("w8a8_static", "rtn"),
    "w8a8_static+quip_gptq": ("w8a8_static", "quip_gptq"),
    "w4a4_static+quip_gptq": ("w4a4_static", "quip_gptq"),
    "fp8_static+rtn": ("fp8_static", "rtn"),
}
PROMPT = "The planted units.\nThey spike"
NEW_TOKENS = 64


def quantized(quant: str, stages: str, calibration, spikefree: bool = True):
    """The planted model after oneshot with a composed recipe."""
    model, tokenizer = load_model("tiny-planted")
    config = composed_config(
        f"quant={quant}",
        f"stages={stages}",
        f"transform={'spikefree' if spikefree else 'none'}",
        "quant.group_size=64",
    )
    apply_recipe(model, tokenizer, recipe_of(config, get_arch_spec(model)), calibration)
    return model, tokenizer


def greedy(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(
            ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS
        )[0, ids.shape[1] :]


def device_of(model) -> torch.device:
    """Where oneshot left the model: a GPU when there is one."""
    return next(model.parameters()).device


def measured(model, tokenizer, windows) -> dict:
    with torch.no_grad():
        logits = model(windows.to(device_of(model))).logits.cpu()
    return {
        "device": device_of(model),
        "logits": logits,
        "ppl": perplexity(model, windows, progress=False).ppl,
        "tokens": greedy(model, tokenizer),
    }


@pytest.fixture(scope="module", params=list(RECIPES))
def saved(request, calibration, planted_windows, tmp_path_factory):
    """(measurements in memory, checkpoint folder) for each recipe."""
    model, tokenizer = quantized(*RECIPES[request.param], calibration)
    runtime = get_runtime(model)
    before = measured(model, tokenizer, planted_windows)
    before["templates"] = runtime.templates
    folder = tmp_path_factory.mktemp(request.param) / "checkpoint"
    model.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    return before, folder


@pytest.mark.parametrize("loader", ["auto", "load_pretrained"])
def test_a_reloaded_checkpoint_computes_what_the_model_in_memory_did(
    saved, loader, planted_windows
):
    before, folder = saved
    if loader == "auto":
        model = AutoModelForCausalLM.from_pretrained(folder)
    else:
        model = iq_transform.load_pretrained(folder)
    _, tokenizer = load_model(str(folder))
    assert get_runtime(model) is not None
    model.to(before["device"])  # the same kernels as the model in memory
    after = measured(model, tokenizer, planted_windows)
    assert after["ppl"] == pytest.approx(before["ppl"], rel=1e-4)
    torch.testing.assert_close(after["logits"], before["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(after["tokens"], before["tokens"])
    assert len(after["tokens"]) == NEW_TOKENS


def test_the_checkpoint_holds_the_runtime_state(saved):
    before, folder = saved
    templates = before["templates"]
    files = {p.name for p in folder.iterdir()}
    assert {STATE_FILE, TENSORS_FILE, "spikefree_checkpoint.py", "recipe.yaml"} <= files
    meta = json.loads((folder / STATE_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["carrier_layers"] == templates.carrier_layers
    assert meta["down_proj_layers"] == templates.down_proj_layers
    assert {2, 3, 4} <= set(templates.carrier_layers)  # the planted carriers
    assert meta["ratio"] == 32.0 and meta["exact_template_rows"] is True
    assert meta["follow_carriers"] is False  # the default: thresholds everywhere
    # layer 2 carries spikes, so its down_proj output is a template and the
    # carrier rows are zeroed before it: only q/k/v compute exact template rows
    assert meta["exact_rows"]["2"] == [
        "self_attn.k_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    tensors = load_file(folder / TENSORS_FILE)
    for key, value in templates.state_dict().items():
        torch.testing.assert_close(tensors[key], value.float().cpu(), rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama_spikefree"
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_a_checkpoint_without_spikefree_loads_as_plain_llm_compressor(
    calibration, planted_windows, tmp_path
):
    model, tokenizer = quantized("w8a8_static", "rtn", calibration, spikefree=False)
    device = device_of(model)
    with torch.no_grad():
        before = model(planted_windows.to(device)).logits
    model.save_pretrained(tmp_path, save_compressed=True)
    assert not (tmp_path / STATE_FILE).exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is LlamaForCausalLM and get_runtime(reloaded) is None
    with torch.no_grad():
        after = reloaded.to(device)(planted_windows.to(device)).logits
    torch.testing.assert_close(after, before)


@pytest.fixture(scope="module")
def rtn_checkpoint(calibration, tmp_path_factory):
    model, tokenizer = quantized("w8a8_static", "rtn", calibration)
    folder = tmp_path_factory.mktemp("rtn") / "checkpoint"
    model.save_pretrained(folder, save_compressed=True)
    tokenizer.save_pretrained(folder)
    return model, folder


def fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )


def test_a_process_without_iq_transform_refuses_the_checkpoint(rtn_checkpoint):
    """Plain transformers cannot load it as the broken plain model."""
    _, folder = rtn_checkpoint
    result = fresh_python(
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
    )
    assert result.returncode != 0
    assert "trust_remote_code=True" in result.stderr
    remote = (folder / "spikefree_checkpoint.py").read_text()
    assert "import iq_transform" in remote


def test_trust_remote_code_loads_it_with_its_runtime_anywhere(
    rtn_checkpoint, planted_windows
):
    model, folder = rtn_checkpoint
    # on the in-memory model's device: a static scale turns the last-bit rounding
    # differences between devices into different codes
    device = str(device_of(model))
    result = fresh_python(
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, "
        f"trust_remote_code=True).to({device!r})\n"
        "from iq_transform import get_runtime\n"
        "print('runtime', get_runtime(m) is not None)\n"
        f"ids = torch.tensor({planted_windows[:1].tolist()}, device={device!r})\n"
        f"torch.save(m(ids).logits.cpu(), {str(folder / 'remote_logits.pt')!r})\n"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "runtime True" in result.stdout
    with torch.no_grad():
        expected = model(planted_windows[:1].to(device)).logits.cpu()
    torch.testing.assert_close(torch.load(folder / "remote_logits.pt"), expected)


def other_llama(hidden: int = 64, layers: int = 6) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=104,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "model, wrong",
    [
        (lambda: other_llama(hidden=32), "hidden_size 64 (this model: 32)"),
        (lambda: other_llama(layers=4), "num_hidden_layers 6 (this model: 4)"),
    ],
    ids=["hidden size", "layer count"],
)
def test_templates_refuse_a_model_they_were_not_made_for(rtn_checkpoint, model, wrong):
    _, folder = rtn_checkpoint
    target = model()
    with pytest.raises(CheckpointError) as info:
        install_from_checkpoint(target, folder)
    message = str(info.value)
    assert str(folder / STATE_FILE) in message and wrong in message
    assert "Load it into the model it was saved with" in message
    assert get_runtime(target) is None  # never half-patched


def test_templates_refuse_another_architecture(rtn_checkpoint, tmp_path):
    _, folder = rtn_checkpoint
    copy = shutil.copytree(folder, tmp_path / "copy")
    meta = json.loads((copy / STATE_FILE).read_text())
    meta["architecture"] = "gemma3"
    (copy / STATE_FILE).write_text(json.dumps(meta))
    target = other_llama()
    with pytest.raises(CheckpointError, match="architecture 'gemma3'"):
        install_from_checkpoint(target, copy)
    assert get_runtime(target) is None


def broken_copy(folder: Path, tmp_path: Path, edit) -> Path:
    copy = shutil.copytree(folder, tmp_path / "copy")
    edit(copy)
    return copy


def truncate_tensors(folder: Path) -> None:
    path = folder / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:-100])


def edit_a_template(folder: Path) -> None:
    path = folder / TENSORS_FILE
    tensors = load_file(path)
    tensors["layers.2.down_template"] = tensors["layers.2.down_template"] * 2
    save_file(tensors, str(path))


def drop_a_layer_from_the_json(folder: Path) -> None:
    path = folder / STATE_FILE
    meta = json.loads(path.read_text())
    del meta["layers"]["3"]
    path.write_text(json.dumps(meta))


def future_version(folder: Path) -> None:
    path = folder / STATE_FILE
    meta = json.loads(path.read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(meta))


def half_json(folder: Path) -> None:
    path = folder / STATE_FILE
    path.write_text(path.read_text()[:50])


def no_tensors(folder: Path) -> None:
    (folder / TENSORS_FILE).unlink()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (truncate_tensors, f"{TENSORS_FILE} does not match"),
        (edit_a_template, f"{TENSORS_FILE} does not match"),
        (drop_a_layer_from_the_json, "lists other templates"),
        (future_version, "upgrade iq-transform"),
        (half_json, "is not readable JSON"),
        (no_tensors, f"without {TENSORS_FILE}"),
    ],
    ids=["truncated", "edited tensors", "edited json", "future", "half json", "gone"],
)
def test_a_broken_checkpoint_is_one_clear_error(
    rtn_checkpoint, tmp_path, edit, expected
):
    _, folder = rtn_checkpoint
    copy = broken_copy(folder, tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        AutoModelForCausalLM.from_pretrained(copy)
    assert expected in str(info.value)
    assert str(copy) in str(info.value)


def test_an_interrupted_save_leaves_the_target_absent_or_intact(
    rtn_checkpoint, tmp_path, monkeypatch
):
    model, folder = rtn_checkpoint
    from iq_transform.export import save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(save, "write_state", interrupted)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(fresh, save_compressed=True)
    assert not fresh.exists()
    existing = shutil.copytree(folder, tmp_path / "existing")
    contents = {p.name: p.read_bytes() for p in existing.iterdir() if p.is_file()}
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(existing, save_compressed=True)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == contents
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]  # no staging left


def test_saving_over_a_folder_keeps_the_tokenizer_saved_first(rtn_checkpoint, tmp_path):
    model, folder = rtn_checkpoint
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(folder / "tokenizer.json", target / "tokenizer.json")
    model.save_pretrained(target, save_compressed=True)
    assert (target / "tokenizer.json").is_file() and (target / STATE_FILE).is_file()


def test_iq_quantize_saves_and_then_evaluates_the_folder_as_saved(tmp_path):
    from tests.test_cli import run_app
    from tests.test_quantize_cli import TINY_RUN

    saved = tmp_path / "saved"
    first = run_app(
        "iq-quantize", *TINY_RUN, f"save_dir={saved}", "hydra.run.dir=a", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (saved / STATE_FILE).is_file() and (saved / "tokenizer.json").is_file()
    evaluation = ("eval.num_samples=2", "eval.seqlen=128", "progress=false")
    again = run_app(
        "iq-quantize",
        f"model.spec={saved}",
        *evaluation,
        "hydra.run.dir=b",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    quantized = json.loads((tmp_path / "a" / "results.json").read_text())
    as_saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert quantized["save_dir"] == str(saved) and not quantized["evaluated_as_saved"]
    assert as_saved["evaluated_as_saved"] and as_saved["recipe"] == "saved"
    assert as_saved["oneshot_seconds"] is None
    # on a GPU, decompressed and fake-quantized weights round differently in their
    # last bits, and a static scale turns some of that into flipped codes
    tolerance = 1e-3 if torch.cuda.is_available() else 1e-4
    assert as_saved["ppl"] == pytest.approx(quantized["ppl"], rel=tolerance)
    assert as_saved["spike_tokens_in_eval"] == quantized["spike_tokens_in_eval"] > 0
    assert "SpikeFreeModifier" in (tmp_path / "b" / "recipe.yaml").read_text()

    requantize = run_app(
        "iq-quantize",
        f"model.spec={saved}",
        "recipe=w8a8_static",
        *evaluation,
        "hydra.run.dir=c",
        cwd=tmp_path,
    )
    assert requantize.returncode == 1
    assert "is already quantized" in requantize.stderr

    analysis = run_app(
        "iq-analyze",
        f"model.spec={saved}",
        "data.num_samples=2",
        "data.seqlen=128",
        "progress=false",
        "hydra.run.dir=d",
        cwd=tmp_path,
    )
    assert analysis.returncode == 0, analysis.stderr[-3000:]
    assert "SpikeFree runtime installed" in (tmp_path / "d" / "analyze.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_smollm2_checkpoints_reload_exactly(recipe, tmp_path):
    """SmolLM2-135M, 2x128 calibration, 2x128 WikiText-2 windows."""
    from iq_transform.evaluation import (
        TextSource,
        calibration_windows,
        evaluation_windows,
        load_documents,
        load_text,
    )

    quant, stages = RECIPES[recipe]
    model, tokenizer = load_model("smollm2-135m")
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))
    calibration = calibration_windows(tokenizer, documents, 2, 128)
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text, 128, 2)
    config = composed_config(
        f"quant={quant}", f"stages={stages}", "quant.group_size=64"
    )
    apply_recipe(model, tokenizer, recipe_of(config, get_arch_spec(model)), calibration)
    before = measured(model, tokenizer, windows)
    model.save_pretrained(tmp_path, save_compressed=True)
    tokenizer.save_pretrained(tmp_path)
    reloaded = iq_transform.load_pretrained(tmp_path)
    assert get_runtime(reloaded) is not None
    after = measured(reloaded, tokenizer, windows)
    assert after["ppl"] == pytest.approx(before["ppl"], rel=1e-4)
    torch.testing.assert_close(after["logits"], before["logits"], rtol=1e-4, atol=1e-4)
    assert torch.equal(after["tokens"], before["tokens"])


def test_a_quip_checkpoint_without_spikefree_gets_its_rotations_back(
    calibration, planted_windows, tmp_path
):
    """transformers 5.17 skips transform_config; load_model attaches the online
    rotations, so a plain QuIP baseline can be re-evaluated as saved too."""
    model, tokenizer = quantized("w8a8_static", "quip_gptq", calibration, False)
    device = device_of(model)
    with torch.no_grad():
        before = model(planted_windows.to(device)).logits.cpu()
    model.save_pretrained(tmp_path, save_compressed=True)
    tokenizer.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded, _ = load_model(str(tmp_path))
    reloaded.to(device)  # the same kernels as the model in memory
    with torch.no_grad():
        assert not torch.allclose(plain(planted_windows).logits, before, atol=1e-2)
        after = reloaded(planted_windows.to(device)).logits.cpu()
    torch.testing.assert_close(after, before)
