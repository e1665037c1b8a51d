"""keep_freed_memory: large activations reuse the heap's pages instead of
faulting in fresh ones at every forward (counted in page faults, not timed)."""

import subprocess
import sys

import pytest

from iq_transform.kernels.cpu_memory import keep_freed_memory

FAULTS = """
import resource, sys, torch
from iq_transform.kernels.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(3):  # 50 MiB: above glibc's largest default threshold
    torch.empty(50 << 18).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.empty(50 << 18).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    sys.platform != "linux", reason="glibc's mmap threshold: Linux only"
)
def test_large_tensors_reuse_freed_pages():
    pages = 4 * (50 << 20) // 4096
    assert _page_faults("default") > pages // 2  # fresh pages at every allocation
    assert _page_faults("keep") < pages // 20


@pytest.mark.parametrize("limit", [0, -1, 2**31])
def test_a_limit_out_of_a_c_int_is_refused(limit):
    with pytest.raises(ValueError, match="out of range"):
        keep_freed_memory(limit=limit)
