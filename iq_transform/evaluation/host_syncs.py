"""Count the operations that make the host wait for the device.

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` catches them; on a CPU
nothing waits, so they are counted at the dispatcher instead: reading a value
(``.item()``, ``bool()``, ``if tensor``), ``nonzero`` and the boolean-mask indexing
that calls it (its output shape depends on the data). The same count on CPU and GPU
says whether a forward can run ahead of the device and be captured in a CUDA graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_host_syncs"]

_READS_VALUES = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}
_INDEXING = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ())
    )


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS_VALUES or (func in _INDEXING and _bool_index(args)):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(run: Callable[[], object]) -> Counter:
    """Run ``run()`` and count its host-synchronizing operations by name.

    :param run: a callable, e.g. ``lambda: model(input_ids)``
    :return: ``Counter`` of op name -> calls (empty when the code never waits)
    """
    counter = _SyncCounter()
    with counter:
        run()
    return counter.counts
