"""Data-parallel ``oneshot`` under ``torchrun``: SpikeFree + GPTQ, W8A8 static.

Every rank loads the same model, takes its own contiguous shard of the calibration
windows (rank r of N: windows ``[floor(r S / N), floor((r + 1) S / N))``, the split
llm-compressor itself uses) and runs llm-compressor's ``oneshot`` on it with the
recipe ``SpikeFreeModifier -> GPTQModifier`` (``quant=w8a8_static`` ``stages=gptq``
``transform=spikefree``, composed as ``iq-quantize`` does). SpikeFree all-reduces
its calibration statistics (``iq_transform.spikefree.distributed``), the static
observers their activation ranges and GPTQ its Hessians, so afterwards

- every rank must hold identical SpikeFree templates, thresholds and sites: the
  SHA-256 of ``get_runtime(model).templates.state_dict()`` is gathered and
  compared, and so is a hash of the whole quantized model (weights, scales and
  SpikeFree buffers);
- with ``--reference``, rank 0 then runs this script with ``--single`` in a fresh
  process on the union of the shards and compares the templates (same sites, values
  within ``--rtol``/``--atol``: the float64 sums only add up in another order) and,
  for information, the activation and weight scales and the integer levels of the
  quantized weights.

Reported per rank: the oneshot wall seconds (the calibration wall time: SpikeFree
calibration + GPTQ + static scales), SpikeFree's own calibration seconds and the
peak GPU memory; rank 0 writes the JSON (``--out``). Exit status 1 when the ranks
disagree or the reference does not match.

Backends: NCCL when CUDA is available (rank r on ``cuda:LOCAL_RANK``), else gloo.
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and
``NVSHMEM_DISABLE_NVLS=1`` are defaulted before the process group starts (no
NVLink multicast). ``compressed_tensors.distributed.init_dist()`` is not used: it
needs an accelerator (``torch.accelerator.current_accelerator().type`` fails on a
CPU-only machine), so the group is started with ``init_process_group`` directly.

Models: ``tiny-planted`` (the planted toy, offline, calibrated on Brown windows),
``llama3-8b-planted`` (``benchmarks/oneshot_scale.py``'s random-weight Llama at 8B
widths with planted spikes, built on each rank's GPU from the same seed, on random
token windows; ``--layers`` decoder layers, default 4) or any other spec
``iq_transform.models.load_model`` knows (Brown windows). In a process group
oneshot's pipelines offload every module where it lies, through compressed-tensors'
distributed caches, which give every rank rank 0's weights: a model in CPU memory
(``load_model``) goes to CPU memory shared by the ranks (``DistributedCPUCache``;
``/dev/shm`` must hold the model), one built on the GPU stays on each rank's GPU
with rank 0's values broadcast (``DistributedDeviceCache``).

GPTQ under ``torchrun`` (llm-compressor 0.14.0.1, read in its source and run here
on 2 gloo ranks): supported. Each layer's Hessians are ``dist.reduce``-d to one
owner rank per module, the owner runs GPTQ, and the result is broadcast (GPU
ranks) or written into the shared CPU memory (CPU ranks); static activation
observers are all-reduced at each layer's end (``mse``/``minmax``:
``ReduceOp.AVG``, which gloo takes in torch 2.13; ``static_minmax``: MIN/MAX). On
CPU ranks nothing waits for the owner's write before the other ranks propagate
through the layer, so without a fix the CPU result changes from run to run: this
script adds a barrier after each layer's GPTQ on gloo ranks
(:func:`barrier_after_gptq_on_cpu`; ``--no-cpu-gptq-barrier`` leaves it out).
With it, 2 gloo ranks on tiny-planted match one process bit for bit (templates,
weight levels) and to 1e-7 (activation scales).

Observer: ``--observer auto`` is ``mse`` (``spikefree_mse`` with SpikeFree), the
``w8a8_static`` default. ``mse`` and ``minmax`` average the ranks' statistics
(``ReduceOp.AVG``), which is one process's only for equal shards (5 windows on 2
ranks: activation scales up to 8 % off); ``static_minmax`` (MIN/MAX) is exact for
any split. SpikeFree's templates are exact for any split.

CPU, 2 gloo ranks, with the single-process reference (what
tests/test_distributed_oneshot.py runs)::

    torchrun --nproc-per-node 2 benchmarks/distributed_oneshot.py \\
        --model tiny-planted --samples 8 --seqlen 128 --reference \\
        --out /tmp/distributed_oneshot_cpu.json

2 GPUs, NCCL (one H100 per rank), and the 1-GPU wall-time baseline::

    torchrun --nproc-per-node 2 benchmarks/distributed_oneshot.py \\
        --model llama3-8b-planted --layers 4 --samples 32 --seqlen 512 \\
        --reference --out benchmarks/results/distributed_oneshot_2gpu.json
    python benchmarks/distributed_oneshot.py --single \\
        --model llama3-8b-planted --layers 4 --samples 32 --seqlen 512 \\
        --out benchmarks/results/distributed_oneshot_1gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger
from torch import nn

LLAMA_8B = "llama3-8b-planted"
BROWN = "shared/brown/brown.txt"
# what torchrun sets; removed from the environment of the --reference process
TORCHRUN_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# set before the process group starts, unless given: no NVLink multicast (NVLS)
NCCL_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
SCALE_SUFFIXES = ("weight_scale", "input_scale")
# quantized weights compared level by level with the reference up to this many
LEVELS_LIMIT = 1_000_000_000


@dataclass
class Context:
    """Where this process runs: its rank among ``world_size`` (0 of 1 alone)."""

    rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def distributed(self) -> bool:
        return self.backend is not None


# -- setup ------------------------------------------------------------------------
def start(single: bool, timeout_min: float) -> Context:
    """Start the default process group (NCCL on ``cuda:LOCAL_RANK``, else gloo), or
    nothing with ``single``."""
    for name, value in NCCL_DEFAULTS.items():
        os.environ.setdefault(name, value)
    cuda = torch.cuda.is_available()
    if single:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("--single runs one process: launch it without torchrun")
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        return Context(0, 1, device, None)
    if "RANK" not in os.environ:
        raise SystemExit(
            "No torchrun environment: launch with `torchrun --nproc-per-node N "
            f"{Path(__file__).name} ...`, or pass --single for one process."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(minutes=timeout_min)
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    backend = str(dist.get_backend())
    context = Context(dist.get_rank(), dist.get_world_size(), device, backend)
    logger.info(
        f"rank {context.rank}/{context.world_size}: {context.backend} on {device}"
    )
    return context


def barrier_after_gptq_on_cpu(context: Context) -> bool:
    """Make every gloo rank wait for each layer's GPTQ writes (a workaround).

    On CPU ranks llm-compressor 0.14's GPTQ quantizes each module on one owner rank
    and writes it into CPU memory the ranks share (compressed-tensors'
    ``DistributedCPUCache``), skipping the broadcast that synchronizes GPU ranks
    (``broadcast_qparams_and_cleanup(skip_cpu=True)``). Nothing then waits for the
    owner's write: the other ranks propagate through the layer while it is being
    written, so the following layers' Hessians and activation scales change from
    run to run (same seed; seen on this script with 2 gloo ranks). A barrier after
    each layer's ``compress_modules`` makes the CPU run deterministic. NCCL ranks
    execute on their GPUs and are synchronized by that broadcast: no patch there.

    :return: whether the patch was applied
    """
    if context.backend != "gloo":
        return False
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    compress_modules = GPTQModifier.compress_modules

    @functools.wraps(compress_modules)
    def compress_then_wait(self: GPTQModifier) -> None:
        compress_modules(self)
        dist.barrier()

    GPTQModifier.compress_modules = compress_then_wait
    return True


def load(
    args: argparse.Namespace, context: Context
) -> tuple[nn.Module, Any, torch.Tensor]:
    """``(model, tokenizer, windows)``: the same model and all calibration windows
    on every rank."""
    if args.model == LLAMA_8B:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from oneshot_scale import build, windows

        widths = (args.hidden, args.intermediate, args.vocab)
        model = build(args.layers, widths, seed=args.seed)  # on cuda:LOCAL_RANK
        from iq_transform.models.toy import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        calibration = windows(args.samples, args.seqlen, model.config.vocab_size)
        return model, tokenizer, calibration
    from iq_transform.evaluation.data import (
        TextSource,
        calibration_windows,
        load_documents,
    )
    from iq_transform.models import load_model

    # rank 0 first: an offline model is converted into the cache on first use
    if context.rank != 0:
        barrier(context)
    model, tokenizer = load_model(args.model)
    if context.rank == 0:
        barrier(context)
    documents = load_documents(TextSource(path=BROWN))
    calibration = calibration_windows(tokenizer, documents, args.samples, args.seqlen)
    return model, tokenizer, calibration


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def same_weights(model: nn.Module, context: Context) -> bool:
    """Whether all ranks start from the same weights; rank 0's are broadcast to
    the others either way (oneshot's distributed offload caches hand out rank 0's
    anyway: this checks the premise, it does not depend on them)."""
    if not context.distributed:
        return True
    agree = len(set(gather(state_hash(model), context))) == 1
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "meta":
                continue
            moved = tensor.data.to(collective_device(context))
            dist.broadcast(moved, src=0)
            tensor.data.copy_(moved)
    return agree


def collective_device(context: Context) -> torch.device:
    return context.device if context.backend == "nccl" else torch.device("cpu")


def shard(windows: torch.Tensor, context: Context) -> tuple[int, int]:
    """This rank's contiguous share of the windows (llm-compressor's split)."""
    count = windows.shape[0]
    start = count * context.rank // context.world_size
    end = count * (context.rank + 1) // context.world_size
    return start, end


def recipe(
    model: nn.Module, stages: str, observer: str, spikefree_samples: int
) -> list:
    """SpikeFree -> ``stages`` at W8A8 static, composed like ``iq-quantize``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import iq_transform.cli.quantize  # noqa: F401  (registers the schemas)
    from iq_transform.composition.recipe import compose_recipe
    from iq_transform.models.arch import get_arch_spec

    overrides = [
        "quant=w8a8_static",
        f"stages={stages}",
        "transform=spikefree",
        f"transform.num_calibration_samples={spikefree_samples}",
    ]
    if observer != "auto":
        overrides.append(f"quant.observer={observer}")
    with initialize_config_module(
        config_module="iq_transform.conf", version_base="1.3"
    ):
        config = OmegaConf.to_object(compose("quantize", overrides=overrides))
    return compose_recipe(
        config.quant, config.transform, config.stages, get_arch_spec(model)
    )


# -- what the ranks compare ---------------------------------------------------------
def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    sha = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sha.update(tensor_bytes(tensor))
    return sha.hexdigest()


def state_hash(model: nn.Module) -> str:
    return digest(dict(model.state_dict()))


def tensor_hashes(model: nn.Module) -> dict[str, str]:
    """One SHA-256 per state-dict tensor, to name those the ranks disagree on."""
    return {
        name: hashlib.sha256(tensor_bytes(tensor)).hexdigest()
        for name, tensor in model.state_dict().items()
    }


def digest_of_hashes(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def disagreeing(hashes: list[dict[str, str]]) -> list[str]:
    """Tensors whose hash differs between some ranks (or that some lack)."""
    names = sorted(set().union(*hashes))
    return [n for n in names if len({h.get(n) for h in hashes}) > 1]


def templates_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from iq_transform import get_runtime

    runtime = get_runtime(model)
    if runtime is None:
        return {}
    return {k: v.detach().cpu() for k, v in runtime.templates.state_dict().items()}


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every static activation and weight scale of the quantized model."""
    return {
        name: tensor.detach().float().cpu()
        for name, tensor in model.state_dict().items()
        if name.endswith(SCALE_SUFFIXES)
    }


def weight_levels(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The integer level of every quantized weight (``round(weight / scale)``;
    GPTQ leaves weights on their grid), or None above :data:`LEVELS_LIMIT`."""
    state = model.state_dict()
    names = [n.removesuffix("_scale") for n in state if n.endswith(".weight_scale")]
    if sum(state[n].numel() for n in names) > LEVELS_LIMIT:
        return None
    return {
        name: (state[name].float() / state[name + "_scale"].float())
        .round()
        .clamp(-128, 127)
        .to(torch.int8)
        .cpu()
        for name in names
    }


def gather(value: Any, context: Context) -> list[Any]:
    if not context.distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def compare_templates(
    ours: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    rtol: float,
    atol: float,
) -> dict[str, Any]:
    """Same sites (keys), and every value within tolerance."""
    sites_match = sorted(ours) == sorted(reference)
    worst_abs, worst_rel, close = 0.0, 0.0, sites_match
    for key in sorted(set(ours) & set(reference)):
        a, b = ours[key].double(), reference[key].double()
        if a.shape != b.shape:
            close = False
            continue
        finite = torch.isfinite(a) & torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)) or not torch.equal(
            a[~finite], b[~finite]
        ):  # infinite thresholds (no site) must agree exactly
            close = False
        diff = (a[finite] - b[finite]).abs()
        if diff.numel():
            worst_abs = max(worst_abs, diff.max().item())
            scale = b[finite].abs().clamp_min(1e-30)
            worst_rel = max(worst_rel, (diff / scale).max().item())
        close &= torch.allclose(a[finite], b[finite], rtol=rtol, atol=atol)
    return {
        "sites_match": sites_match,
        "templates_match": bool(close),
        "max_abs_diff": worst_abs,
        "max_rel_diff": worst_rel,
        "rtol": rtol,
        "atol": atol,
    }


def compare_scales(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Largest relative difference of each kind of scale (information only)."""
    result: dict[str, Any] = {}
    for suffix in SCALE_SUFFIXES:
        keys = [k for k in reference if k.endswith(suffix) and k in ours]
        worst = 0.0
        for key in keys:
            a, b = ours[key], reference[key]
            rel = ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()
            worst = max(worst, rel)
        result[suffix] = {"tensors": len(keys), "max_rel_diff": worst}
    return result


def compare_levels(
    ours: dict[str, torch.Tensor] | None, reference: dict[str, torch.Tensor] | None
) -> dict[str, Any] | None:
    """How many quantized weights sit on another integer level (information)."""
    if ours is None or reference is None:
        return None
    differing, total, worst = 0, 0, 0
    for name, levels in reference.items():
        step = (ours[name].int() - levels.int()).abs()
        differing += int((step > 0).sum())
        total += levels.numel()
        worst = max(worst, int(step.max()))
    return {
        "weights": total,
        "on_another_level": differing,
        "fraction": differing / max(total, 1),
        "max_level_step": worst,
    }


# -- the run ------------------------------------------------------------------------
def run(args: argparse.Namespace, context: Context) -> dict[str, Any]:
    from iq_transform import get_runtime
    from iq_transform.composition.pipeline import apply_recipe

    model, tokenizer, windows = load(args, context)
    if windows.shape[0] < context.world_size:
        raise SystemExit(
            f"{windows.shape[0]} windows for {context.world_size} ranks: every rank "
            "needs at least one (--samples)."
        )
    same_start = same_weights(model, context)
    start, end = shard(windows, context)
    modifiers = recipe(model, args.stages, args.observer, windows.shape[0])
    if context.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(context.device)
    barrier(context)  # the ranks start oneshot together
    oneshot_s, spikefree_s = apply_recipe(
        model, tokenizer, modifiers, windows[start:end], seed=args.seed
    )
    # on CPU ranks GPTQ writes the last layer's weights into memory the ranks
    # share (DistributedCPUCache) from each module's owner, and no collective
    # follows: wait for every rank before reading them
    barrier(context)
    runtime = get_runtime(model)
    templates = templates_state(model)
    hashes = tensor_hashes(model)
    return {
        "templates": templates,
        "hashes": hashes,
        "scales": scales(model),
        "levels": weight_levels(model) if context.rank == 0 else None,
        "rank": {
            "rank": context.rank,
            "device": str(context.device),
            "shard": [start, end],
            "windows": end - start,
            "same_weights_at_start": same_start,
            "oneshot_s": oneshot_s,
            "spikefree_calibration_s": spikefree_s,
            "peak_gpu_GiB": torch.cuda.max_memory_allocated(context.device) / 2**30
            if context.device.type == "cuda"
            else None,
            "torch_threads": torch.get_num_threads(),
            "templates_sha256": digest(templates),
            "model_sha256": digest_of_hashes(hashes),
            "sites": sorted(templates),
            "carrier_layers": runtime.templates.carrier_layers if runtime else [],
            "down_proj_layers": runtime.templates.down_proj_layers if runtime else [],
        },
    }


def reference_command(args: argparse.Namespace, folder: Path) -> list[str]:
    """This script with ``--single`` on all windows, saving what rank 0 compares."""
    command = [sys.executable, str(Path(__file__).resolve()), "--single"]
    command += ["--model", args.model, "--layers", str(args.layers)]
    command += ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    command += ["--vocab", str(args.vocab), "--samples", str(args.samples)]
    command += ["--seqlen", str(args.seqlen), "--stages", args.stages]
    command += ["--observer", args.observer, "--seed", str(args.seed)]
    command += ["--out", str(folder / "reference.json")]
    command += ["--save-state", str(folder / "reference.pt")]
    return command


def run_reference(args: argparse.Namespace) -> tuple[dict, dict]:
    """The single-process run on the union of the shards, in a fresh process
    (llm-compressor keeps a finished oneshot's model alive in-process)."""
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in TORCHRUN_VARIABLES and not k.startswith("TORCHELASTIC_")
    }
    with tempfile.TemporaryDirectory(prefix="distributed-oneshot-") as name:
        folder = Path(name)
        command = reference_command(args, folder)
        logger.info(f"reference: {' '.join(command)}")
        process = subprocess.run(command, env=environment, check=False)
        if process.returncode != 0:
            raise RuntimeError(f"the reference run failed ({process.returncode})")
        report = json.loads((folder / "reference.json").read_text())
        return report, torch.load(folder / "reference.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-planted")
    parser.add_argument("--layers", type=int, default=4, help=f"{LLAMA_8B} only")
    parser.add_argument("--hidden", type=int, default=4096, help=f"{LLAMA_8B} only")
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--samples", type=int, default=8, help="windows in all")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument(
        "--stages", default="gptq", help="conf/stages option (gptq, rtn, quip_gptq..)"
    )
    parser.add_argument(
        "--observer",
        default="auto",
        help="static activation observer: auto (the w8a8_static default, mse), "
        "mse, minmax, static_minmax",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single", action="store_true", help="one process on all windows (baseline)"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="rank 0 also runs --single on all windows and compares",
    )
    parser.add_argument(
        "--no-cpu-gptq-barrier",
        action="store_true",
        help="gloo: leave llm-compressor's GPTQ as it is (its CPU runs then vary "
        "from run to run; see barrier_after_gptq_on_cpu)",
    )
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--timeout-min", type=float, default=60.0)
    parser.add_argument("--out", default=None, help="JSON written by rank 0")
    parser.add_argument("--save-state", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    context = start(args.single, args.timeout_min)
    workarounds = []
    if not args.no_cpu_gptq_barrier and barrier_after_gptq_on_cpu(context):
        workarounds.append("barrier after GPTQ compress_modules on gloo (CPU) ranks")
    try:
        result = run(args, context)
        ranks = gather(result["rank"], context)
        differing = disagreeing(gather(result["hashes"], context))
        barrier(context)
        if context.rank != 0:
            return 0
        report = summarize(args, context, ranks)
        report["model_tensors_differing"] = differing
        report["workarounds"] = workarounds
        if args.save_state:
            saved = {k: result[k] for k in ("templates", "scales", "levels")}
            torch.save(saved, args.save_state)
        if args.reference and context.distributed:
            reference, saved = run_reference(args)
            report["reference"] = {
                "oneshot_s": reference["ranks"][0]["oneshot_s"],
                "spikefree_calibration_s": reference["ranks"][0][
                    "spikefree_calibration_s"
                ],
                "device": reference["ranks"][0]["device"],
                **compare_templates(
                    result["templates"], saved["templates"], args.rtol, args.atol
                ),
                "scales": compare_scales(result["scales"], saved["scales"]),
                "weight_levels": compare_levels(result["levels"], saved["levels"]),
            }
            report["speedup_over_reference"] = (
                report["reference"]["oneshot_s"] / report["oneshot_s_max"]
            )
        report["ok"] = bool(
            report["ranks_agree"]["templates"]
            and report["ranks_agree"]["model"]
            and report["has_spikefree_sites"]
            and report.get("reference", {}).get("templates_match", True)
        )
        text = json.dumps(report, indent=1)
        print(text, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return 0 if report["ok"] else 1
    finally:
        if context.distributed:
            dist.destroy_process_group()


def summarize(
    args: argparse.Namespace, context: Context, ranks: list[dict]
) -> dict[str, Any]:
    device = (
        torch.cuda.get_device_name(context.device)
        if context.device.type == "cuda"
        else "cpu"
    )
    return {
        "mode": "distributed" if context.distributed else "single",
        "backend": context.backend,
        "world_size": context.world_size,
        "device": device,
        "model": args.model,
        "layers": args.layers if args.model == LLAMA_8B else None,
        "calibration": [args.samples, args.seqlen],
        "recipe": f"w8a8_static+{args.stages}+spikefree",
        "observer": args.observer,
        "env": {name: os.environ.get(name) for name in NCCL_DEFAULTS},
        "ranks": ranks,
        "oneshot_s_max": max(r["oneshot_s"] for r in ranks),
        "ranks_agree": {
            "templates": len({r["templates_sha256"] for r in ranks}) == 1,
            "model": len({r["model_sha256"] for r in ranks}) == 1,
        },
        "has_spikefree_sites": bool(ranks[0]["sites"]),
        "sites": ranks[0]["sites"],
        "carrier_layers": ranks[0]["carrier_layers"],
        "down_proj_layers": ranks[0]["down_proj_layers"],
    }


if __name__ == "__main__":
    sys.exit(main())
