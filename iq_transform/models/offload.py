"""
Forwards of offloaded, fake-quantized models that really use quantized weights.

A model that does not fit on one GPU is offloaded by compressed-tensors (loaded into
CPU memory and onloaded layer by layer by llm-compressor's sequential pipeline, or
loaded with ``device_map="auto"`` / ``"auto_offload"``, see
:func:`iq_transform.models.load_model`). compressed-tensors 0.19's quantized
``Linear`` forward fake-quantizes the weight it onloaded and then runs the plain
forward, which reads ``self.weight`` again. Outside ``disable_offloading`` each read
of an offloaded weight onloads a fresh copy (CPU -> GPU, or from disk), so that
second read is the unquantized weight: after oneshot, such a model computes with
quantized activations but full-precision weights. llm-compressor calibrates under
``disable_offloading``; :func:`onload_once_per_forward` does the same for every later
forward, one module at a time.
"""

from __future__ import annotations

from contextlib import ExitStack
from functools import partial

import torch
from compressed_tensors.offload import disable_offloading
from compressed_tensors.offload.cache import OffloadCache
from compressed_tensors.offload.dispatch import remove_dispatch
from loguru import logger
from torch import nn

__all__ = ["is_offloaded", "move_model", "onload_once_per_forward"]

# a module's onload hooks (their handles), once it carries them
HOOKED_ATTR = "_iq_onload_once_per_forward"


def is_offloaded(module: nn.Module) -> bool:
    """Whether compressed-tensors offloads the module's own parameters.

    :param module: any module
    """
    return isinstance(module._parameters, OffloadCache)


def move_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move a model to ``device`` for good, also one that oneshot left dispatched
    by compressed-tensors (whose every weight access onloads to the execution
    device it was dispatched to, whatever ``model.to`` says).

    :param model: any model
    :param device: where its weights go and its forward runs
    :return: ``model``, moved in place
    """
    if any(is_offloaded(module) for module in model.modules()):
        remove_dispatch(model)
        for module in model.modules():
            _remove_onload_hooks(module)
    return model.to(device)


def onload_once_per_forward(model: nn.Module) -> int:
    """
    Run the forward of every offloaded, quantized module inside
    ``disable_offloading``, so its weight is onloaded once per forward and the
    fake-quantized copy is the one the matmul uses. Only the running module's
    weights are kept onloaded (as in the sequential pipeline); a module whose weights
    stay on their device is unaffected. Calling it again adds nothing.

    :param model: a model after oneshot
    :return: how many modules got the hooks
    """
    hooked = 0
    for module in model.modules():
        if not is_offloaded(module) or not hasattr(module, "quantization_scheme"):
            continue
        if getattr(module, HOOKED_ATTR, False):
            continue
        stacks: list[ExitStack] = []
        keep_onloaded = partial(_keep_onloaded, stacks)
        # code that replays a module's pre-hooks to see its inputs
        # (spikefree.exact_rows.through_pre_hooks) must skip this one: without its
        # forward hook the context would stay open
        keep_onloaded.leaves_inputs_alone = True
        release = partial(_release, stacks)
        release.leaves_inputs_alone = True  # nor does the runtime count it a reader
        handles = (
            module.register_forward_pre_hook(keep_onloaded),
            module.register_forward_hook(release, always_call=True),
        )
        setattr(module, HOOKED_ATTR, handles)
        hooked += 1
    if hooked:
        logger.debug(f"{hooked} offloaded quantized modules onload once per forward")
    return hooked


def _remove_onload_hooks(module: nn.Module) -> None:
    """Take out the hooks :func:`onload_once_per_forward` gave ``module``: once
    nothing is offloaded they only make each call the slow one (an int8 linear
    after oneshot was called through them at every forward)."""
    for handle in vars(module).pop(HOOKED_ATTR, ()):
        handle.remove()


def _keep_onloaded(stacks: list[ExitStack], module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: keep onloaded weights until the forward ends."""
    stack = ExitStack()
    stack.enter_context(disable_offloading())
    stacks.append(stack)


def _release(
    stacks: list[ExitStack], module: nn.Module, args: tuple, output: object
) -> None:
    """Forward hook (also after an exception): release the onloaded weights."""
    if stacks:
        stacks.pop().close()
