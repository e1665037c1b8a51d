"""``oneshot`` at Llama-3-8B shape on a GPU: W8A8 static GPTQ with vs without SpikeFree.

A random-weight Llama at 8B widths (32 layers, 4096/14336, 32/8 heads, vocab
128256, bf16) with two planted spike kinds (first token and a mid-sequence
delimiter, written at layer 1 and removed at layer 30, as in the tiny planted
model) goes through ``oneshot`` twice from the same weights: GPTQ W8A8 static with
the ``mse`` observer, and the same after a SpikeFree stage with the
``spikefree_mse`` observer (recipes/w8a8_static_spikefree_gptq.yaml). Reported:
wall seconds of each, peak GPU memory, peak host RSS, and an evaluation forward
with the runtime installed (and, for the ratio, with its templates removed). Each
run is its own process: something in llm-compressor's state keeps a finished
``oneshot``'s model alive (the session reset and ``gc`` did not free it), so in one
process the second run's peak memory included the first run's model.

    python benchmarks/oneshot_scale.py --out benchmarks/results/oneshot_scale.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from iq_transform import get_runtime
from iq_transform.composition.pipeline import RECIPES_DIR, apply_recipe
from iq_transform.models.toy import (
    MARKER,
    _plant_unit,
    _reserve_channels,
    _residual,
    _scale_unit,
    build_char_tokenizer,
)

BOS, DELIMITER = 1, 2
MARKERS, SPIKES = (3, 5), (17, 23)
TARGETS = (4000.0, 1500.0)
CREATE, REMOVE = 1, 30


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(layers: int, widths: tuple[int, int, int], seed: int = 0):
    hidden, intermediate, vocab = widths
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=vocab,
        max_position_embeddings=8192,
        bos_token_id=BOS,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    probe = torch.randint(10, config.vocab_size, (1, 64), device=DEVICE)
    probe[0, 0], probe[0, 20] = BOS, DELIMITER
    remove = min(REMOVE, layers - 1)
    with torch.no_grad():
        _reserve_channels(model, [*MARKERS, *SPIKES])
        embed = model.model.embed_tokens.weight
        for unit, (token, marker, spike) in enumerate(
            zip((BOS, DELIMITER), MARKERS, SPIKES, strict=True)
        ):
            embed[token, marker] = MARKER
            _plant_unit(model, CREATE, unit, marker, spike)
            _plant_unit(model, remove, unit, spike, spike)
        for unit, (position, spike, target) in enumerate(
            zip((0, 20), SPIKES, TARGETS, strict=True)
        ):
            reached = _residual(model, probe, CREATE)[position, spike].item()
            _scale_unit(model, CREATE, unit, spike, target / reached)
            before = _residual(model, probe, remove - 1)[position, spike].item()
            after = _residual(model, probe, remove)[position, spike].item()
            _scale_unit(model, remove, unit, spike, -before / (after - before))
    # its config and tokenizer on disk, as a loaded model has them; gone at exit
    folder = tempfile.mkdtemp(prefix="llama8b-shaped-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.config.save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    model.config._name_or_path = model.name_or_path = folder
    return model


def windows(count: int, length: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (count, length), generator=generator)
    ids[:, 0] = BOS
    ids[:, 97::211] = DELIMITER  # a few mid-sequence spike tokens per window
    return ids


def recipe(spikefree: bool) -> str:
    text = (RECIPES_DIR / "w8a8_static_spikefree_gptq.yaml").read_text()
    stages = yaml.safe_load(text)
    if not spikefree:
        del stages["spikefree_stage"]
        group = stages["quant_stage"]["quant_modifiers"]["GPTQModifier"]
        group["config_groups"]["group_0"]["input_activations"]["observer"] = "mse"
    path = tempfile.mktemp(suffix=".yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(stages, handle, sort_keys=False)
    return path


@torch.no_grad()
def forward_ms(model, ids: torch.Tensor, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats + 1):
        _synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def _synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(spikefree: bool, args) -> dict:
    model = build(args.layers, (args.hidden, args.intermediate, args.vocab))
    tokenizer = build_char_tokenizer()
    calibration = windows(args.samples, args.seqlen, model.config.vocab_size)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # what is on the GPU before this run's oneshot (its own model; nothing of the
    # previous run, which llm-compressor's session would otherwise keep alive)
    at_start = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else None
    start = time.perf_counter()
    oneshot_s, spikefree_s = apply_recipe(
        model, tokenizer, recipe(spikefree), calibration
    )
    wall = time.perf_counter() - start
    result = {
        "spikefree": spikefree,
        "oneshot_s": oneshot_s,
        "spikefree_calibration_s": spikefree_s,
        "wall_s": wall,
        "gpu_GiB_at_start": at_start,
        "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30
        if DEVICE == "cuda"
        else None,
        "peak_host_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    ids = windows(1, 2048, model.config.vocab_size).to(DEVICE)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    result["eval_loss_1x2048"] = loss
    result["eval_forward_ms_1x2048"] = forward_ms(model, ids)
    runtime = get_runtime(model)
    if runtime is not None:
        result["spike_tokens_handled"] = int(runtime.spike_tokens_seen)
        layers = runtime.layers
        kept = [layer.templates for layer in layers]
        for layer in layers:
            layer.templates = None
        result["eval_forward_ms_1x2048_templates_removed"] = forward_ms(model, ids)
        for layer, templates in zip(layers, kept, strict=True):
            layer.templates = templates
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return result


RESULT_PREFIX = "oneshot_scale result: "


def run_in_own_process(spikefree: bool) -> dict:
    """:func:`run` in a fresh interpreter, its output passed through."""
    command = [sys.executable, __file__, *sys.argv[1:], "--variant"]
    command.append("spikefree" if spikefree else "plain")
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    print(process.stdout, end="", flush=True)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode})")
    lines = [line for line in process.stdout.splitlines() if RESULT_PREFIX in line]
    return json.loads(lines[-1].split(RESULT_PREFIX, 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--variant", choices=("plain", "spikefree"), help="run one, in this process"
    )
    args = parser.parse_args()
    if args.variant is not None:
        run(args.variant == "spikefree", args)
        return
    results = [run_in_own_process(False), run_in_own_process(True)]
    report = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "layers": args.layers,
        "calibration": [args.samples, args.seqlen],
        "runs": results,
        "spikefree_over_plain_wall": results[1]["wall_s"] / results[0]["wall_s"],
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
