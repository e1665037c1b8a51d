"""Triton launches with the compiled kernel kept.

``kernel[grid](...)`` binds and specializes every argument and looks the compiled
kernel up on each call. The runtime launches the same few kernels with the same
dtypes and constants at every layer, so :class:`FastLaunch` keeps each compiled
kernel under the key Triton itself specializes on (tensor dtypes and 16-byte
alignment, integers equal to 1 or divisible by 16, the constants and launch
options, the device) and launches it through ``CompiledKernel.run``, skipping the
launch metadata when no profiler hook listens. The first call with a new key goes
through ``kernel[grid]``, which compiles; Triton's interpreter
(``TRITON_INTERPRET=1``) always does.

Measured on the H200's host (``benchmarks/launch_costs.py``): ``CompiledKernel.run``
alone takes 6-10 us, ``kernel[grid]`` 17-27 us, and a launch that builds its
constants and key at every call 16-35 us: the argument tuples, the key and the
caller's views cost as much as Triton's binder. So a call site binds its
constants and options once (:meth:`FastLaunch.bind`, cached per combination by the
runtime's kernels), and each launch keys only its arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BoundLaunch", "FastLaunch", "arguments_key"]

try:
    from triton import knobs
    from triton.compiler import CompiledKernel
except ImportError:  # CPU-only installs, or a Triton without these
    knobs = CompiledKernel = None

_INT32 = range(-(2**31), 2**31)


def arguments_key(device: int, args: Sequence) -> tuple:
    """What Triton specializes a launch's arguments on
    (``native_specialize_impl``): tensors on their dtype and 16-byte alignment,
    integers on being 1, divisible by 16 and fitting 32 bits, booleans on their
    value, floats on nothing; and the device. One flat tuple, built inline: this
    runs at every launch of every layer.
    """
    key = [device]
    for value in args:
        if isinstance(value, torch.Tensor):
            key += (value.dtype, value.data_ptr() % 16 == 0)
        elif type(value) is int:
            key += (int, value == 1, value % 16 == 0, value in _INT32)
        elif type(value) is bool:
            key += (bool, value)
        elif type(value) is float:
            key.append(float)
        else:
            key += (object, value)
    return tuple(key)


class FastLaunch:
    """``kernel[grid](*args, **constants, **options)`` with the compiled kernel kept.

    :param kernel: a ``@triton.jit`` function whose parameters are the ``args``
        (tensors and scalars) followed by the ``constants`` (``tl.constexpr``)
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._bound: dict[tuple, BoundLaunch] = {}

    def bind(self, constants: dict, **options) -> BoundLaunch:
        """The launch with ``constants`` and ``options`` fixed, made once per
        distinct pair: a call site that binds once (or caches the bound launch)
        pays only for its arguments at each launch.

        :param constants: the kernel's ``tl.constexpr`` parameters, by name, in
            parameter order
        :param options: launch options (``num_warps``)
        """
        key = (*constants.items(), *options.items())
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = BoundLaunch(self.kernel, constants, options)
        return bound

    def __call__(
        self, grid: tuple[int, ...], args: Sequence, constants: dict, **options
    ) -> None:
        """Launch on ``args``' device, on its current stream.

        :param grid: one to three program counts
        :param args: the kernel's leading parameters, in order
        :param constants: its ``tl.constexpr`` parameters, by name
        :param options: launch options (``num_warps``)
        """
        self.bind(constants, **options)(grid, args)

    @property
    def compiled_kernels(self) -> int:
        """Compiled kernels kept, one per launch key seen (0 in the interpreter)."""
        return sum(len(bound.compiled) for bound in self._bound.values())


class BoundLaunch:
    """A kernel's launch with its constants and options fixed (see
    :meth:`FastLaunch.bind`).

    :param kernel: the ``@triton.jit`` function
    :param constants: its ``tl.constexpr`` parameters, by name, in parameter order
    :param options: launch options
    """

    def __init__(self, kernel, constants: dict, options: dict):
        self.kernel, self.constants, self.options = kernel, dict(constants), options
        self._values = tuple(constants.values())
        # compiled kernels by arguments_key
        self.compiled: dict[tuple, object] = {}

    def _check_order(self, leading: int) -> None:
        """The direct launch passes the constants positionally: in parameter order."""
        names = tuple(getattr(self.kernel, "arg_names", ()))[leading:]
        if names and tuple(self.constants) != names:
            raise ValueError(
                f"constants {tuple(self.constants)} must be given in the kernel's "
                f"parameter order {names}"
            )

    def __call__(self, grid: tuple[int, ...], args: Sequence) -> None:
        """Launch on ``args``' device, on its current stream.

        :param grid: one to three program counts
        :param args: the kernel's leading parameters, in order
        """
        if args[0].device.type != "cuda" or CompiledKernel is None:
            self.kernel[grid](*args, **self.constants, **self.options)  # interpreter
            return
        # Triton launches on the current device, as ``kernel[grid]`` does
        device = torch._C._cuda_getDevice()
        key = arguments_key(device, args)
        compiled = self.compiled.get(key)
        if compiled is None:
            self._check_order(len(args))
            compiled = self.kernel[grid](*args, **self.constants, **self.options)
            if isinstance(compiled, CompiledKernel):
                self.compiled[key] = compiled
            return
        # Triton's own launch passes every parameter, constants included, in order
        values = (*args, *self._values)
        stream = torch._C._cuda_getCurrentRawStream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if _silent(enter) and _silent(leave):  # no profiler listens: skip its metadata
            metadata = enter = leave = None
        else:
            metadata = compiled.launch_metadata(grid, stream, *values)
        compiled.run(
            grid[0],
            grid[1] if len(grid) > 1 else 1,
            grid[2] if len(grid) > 2 else 1,
            stream,
            compiled.function,
            compiled.packed_metadata,
            metadata,
            enter,
            leave,
            *values,
        )


def _silent(hook) -> bool:
    """Whether a launch hook (Triton keeps a chain of them) calls nothing."""
    return hook is None or not getattr(hook, "calls", True)
