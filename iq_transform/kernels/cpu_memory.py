"""Large CPU activations served from the process's heap, not fresh pages.

glibc hands every allocation above its mmap threshold (at most 32 MiB unless set)
fresh pages from the kernel and returns them when the tensor is freed, so each
forward pays a page fault per 4 KiB of every large activation. Batched prefill
makes such tensors: a batch of 8x512 tokens' gate/up product of SmolLM2 is 50 MB
in float32, and its int8 GEMM takes twice as long on fresh pages as on reused
ones (``benchmarks/speed_cpu.py --allocator``). PyTorch's CPU performance guide
swaps in jemalloc or tcmalloc for the same reason; raising the threshold does it
with the C library the process already has.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from loguru import logger

# mallopt's parameters (malloc.h); their values are C ints
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_LARGEST_INT = 2**31 - 1
DEFAULT_LIMIT = 1 << 30


def keep_freed_memory(limit: int = DEFAULT_LIMIT) -> bool:
    """Serve allocations up to ``limit`` bytes from the heap and keep up to
    ``limit`` bytes of freed memory there for reuse, for the rest of the process
    (every model in it: apply it before timing anything you compare). Returns
    whether the C library took the setting: only glibc has it; elsewhere nothing
    changes and a warning says so.

    :param limit: the largest allocation served from the heap, in bytes
    """
    if not 0 < limit <= _LARGEST_INT:
        raise ValueError(
            f"keep_freed_memory: limit={limit} bytes is out of range; glibc takes "
            f"1 to {_LARGEST_INT} (a C int), e.g. the default {DEFAULT_LIMIT}."
        )
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        logger.warning(
            "keep_freed_memory: this process's C library is not glibc "
            f"({platform.system()}, {platform.libc_ver()[0] or 'unknown'}); large "
            "activations keep their fresh pages. Preload jemalloc or tcmalloc "
            "instead (PyTorch's CPU performance guide)."
        )
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # without the trim threshold, freeing a large tensor at the heap's top would
    # hand its pages back to the kernel all the same
    taken = libc.mallopt(_M_MMAP_THRESHOLD, limit) and libc.mallopt(
        _M_TRIM_THRESHOLD, limit
    )
    if not taken:
        logger.warning(
            f"keep_freed_memory: glibc refused a threshold of {limit} bytes; try a "
            "smaller limit (older glibc caps the mmap threshold at 32 MiB)."
        )
        return False
    logger.info(
        f"Allocations up to {limit / 2**20:.0f} MiB now come from the heap and are "
        "reused after they are freed (glibc mmap threshold)"
    )
    return True
