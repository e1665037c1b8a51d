"""Execution paths: the spike-free static model run in real low-bit kernels.

It sits above the method and the checkpoint export (it converts what they
produce) and below evaluation and composition (which run what it converts).

- :mod:`~iq_transform.kernels.int8_cpu`: static W8A8 INT8 in oneDNN's int8 GEMM
  (:func:`to_int8_cpu`), QuIP's online rotations inside them by their Kronecker
  factors (:mod:`~iq_transform.kernels.rotations`);
  :mod:`~iq_transform.kernels.cpu_memory`: large activations on reused heap pages
  (:func:`keep_freed_memory`)
- :mod:`~iq_transform.kernels.fp8`: static FP8 e4m3 in ``torch._scaled_mm`` fed by
  fused Triton norm / GLU / quantization kernels (:func:`to_fp8`)
"""

from __future__ import annotations

from torch import nn

from iq_transform.kernels.cpu_memory import keep_freed_memory
from iq_transform.kernels.fp8 import to_fp8
from iq_transform.kernels.int8_cpu import (
    Int8ExecutionError,
    is_int8_executed,
    to_int8_cpu,
)

__all__ = [
    "EXECUTORS",
    "Int8ExecutionError",
    "check_executor",
    "execute",
    "is_int8_executed",
    "keep_freed_memory",
    "to_fp8",
    "to_int8_cpu",
]

# ``iq-quantize execute=<name>``
EXECUTORS = {"int8_cpu": to_int8_cpu, "fp8": to_fp8}


# execution paths whose kernels quantize a norm's output directly, with no room for
# an online rotation between them
NO_ONLINE_ROTATIONS = ("fp8",)


def check_executor(name: str, online_rotations: bool = False) -> None:
    """Refuse an unknown execution path, naming the known ones, or one that cannot
    run the online rotations (QuIP's) the model will have."""
    if name not in EXECUTORS:
        raise ValueError(
            f"execute={name!r} is not an execution path; choose one of "
            f"{sorted(EXECUTORS)} (or leave execute unset for fake quantization)."
        )
    if online_rotations and name in NO_ONLINE_ROTATIONS:
        raise ValueError(
            f"execute={name} cannot run QuIP's online rotations: choose stages "
            "without QuIP (e.g. stages=gptq), or execute=int8_cpu with a W8A8 "
            "static recipe, which rotates inside its kernels."
        )


def execute(model: nn.Module, name: str) -> nn.Module:
    """Convert ``model`` in place to run in the execution path ``name``."""
    check_executor(name)
    return EXECUTORS[name](model)
