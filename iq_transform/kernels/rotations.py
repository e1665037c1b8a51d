"""QuIP's online input rotations at the cost of their structure, not a dense GEMM.

compressed-tensors applies an online Hadamard rotation as ``x @ M`` with a dense
n x n matrix: on SmolLM2 that is as many FLOPs per token as the int8 linears it
feeds, in float32 (80 % of the executed int8 prefill). Its Hadamard matrices are
Kronecker products (Sylvester's 2^k times a known K x K matrix) behind random
signs, ``M = c * diag(left) (A kron B) diag(right)``. Found by its signs alone
(:meth:`KroneckerRotation.factor`), ``x @ M`` costs one (tokens * m, K) x (K, K)
GEMM and one m x m product per token: K + m multiply-adds per value instead of n.
The result comes in a blocked order that the int8 GEMM it feeds takes by permuting
its weight's columns (exact: a sum in another order of the same int32 terms).
"""

from __future__ import annotations

import torch
from torch import nn

from iq_transform.spikefree.exact_rows import leaves_inputs_alone

__all__ = [
    "KroneckerRotation",
    "input_changing_hooks",
    "input_rotation",
    "kernel_rotation",
    "online_rotations",
    "rotation_matrix",
]

# below this many values a token one dense GEMM call beats the structured product's
# four small ops (n = 64: 0.03 against 0.08 ms for 512 tokens on an EPYC Zen 5)
STRUCTURED_FROM = 256
# |M| of a Hadamard rotation is one value (exactly so in bfloat16); the float noise
# of a transform computed in float32 stays far below this
_MAGNITUDE_RTOL = 1e-3


class KroneckerRotation:
    """``x @ M`` for ``M = diag(left) (outer kron inner) diag(right)``, in float32,
    returned in blocked order: ``rotation(x) == (x @ M)[..., rotation.order]``.

    With a token's values as a (K, m) matrix X (row-major), ``x (A kron B)`` is
    ``A^T X B``; computed as ``B^T (X^T A)`` it is one (tokens * m, K) x (K, K)
    GEMM, the large factor, and a batched m x m product, and comes out as
    ``(A^T X B)^T``: the blocked order.

    :param left: (n,) signs applied to the input
    :param outer: (K, K) matrix A
    :param inner: (m, m) matrix B
    :param right: (n,) factors applied to the output (signs times the scale)
    """

    def __init__(
        self,
        left: torch.Tensor,
        outer: torch.Tensor,
        inner: torch.Tensor,
        right: torch.Tensor,
    ):
        outer_size, inner_size = outer.shape[0], inner.shape[0]
        self.size = outer_size * inner_size
        self.blocks = (outer_size, inner_size)
        # (m, K) views of (K, m) vectors: the blocked order
        self.left = left.float().view(outer_size, inner_size).T.contiguous()
        self.outer = outer.float().contiguous()
        self.inner_t = inner.float().T.contiguous()
        self.right = right.float().view(outer_size, inner_size).T.contiguous()
        self.order = torch.arange(self.size).view(outer_size, inner_size).T.flatten()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n) float32, the rotated ``x`` (..., n) in blocked order."""
        outer_size, inner_size = self.blocks
        rows = x.reshape(-1, outer_size, inner_size)
        if rows.dtype != torch.float32:
            rows = rows.float()
        signed = torch.empty(rows.shape[0], inner_size, outer_size)
        torch.mul(rows.transpose(1, 2), self.left, out=signed)
        mixed = (signed.view(-1, outer_size) @ self.outer).view_as(signed)
        rotated = torch.matmul(self.inner_t, mixed)
        return rotated.mul_(self.right).view(-1, self.size)

    @classmethod
    def factor(cls, matrix: torch.Tensor) -> KroneckerRotation | None:
        """``matrix`` (n, n) as a Kronecker rotation, or ``None`` when it is not
        one: all its entries must have one magnitude (a scaled ±1 matrix) and its
        sign pattern, with the signs of its first row and column divided out, must
        be a Kronecker product of two smaller ones. Of the splits n = K * m that
        hold, the cheapest (least K + m) is taken."""
        matrix = matrix.detach().double().cpu()
        size = matrix.shape[0]
        if matrix.ndim != 2 or matrix.shape[1] != size or size < 4:
            return None
        magnitude = matrix.abs()
        scale = magnitude.mean()
        if scale == 0 or not torch.allclose(
            magnitude, scale.expand_as(magnitude), rtol=_MAGNITUDE_RTOL, atol=0
        ):
            return None
        signs = matrix.sign()
        right = signs[0].clone()
        left = signs[:, 0] * signs[0, 0]
        normalized = left[:, None] * signs * right[None, :]
        splits = sorted(
            (k for k in range(2, size // 2 + 1) if size % k == 0),
            key=lambda k: k + size // k,
        )
        for outer_size in splits:
            inner_size = size // outer_size
            outer = normalized[::inner_size, ::inner_size]
            inner = normalized[:inner_size, :inner_size]
            if torch.equal(normalized, torch.kron(outer, inner)):
                return cls(left, outer, inner, right * scale)
        return None


def input_rotation(module: nn.Module) -> nn.Module | None:
    """``module``'s online input rotation (a compressed-tensors transform applied
    by a forward pre-hook, as QuIP leaves it), or ``None``."""
    from compressed_tensors.transform.factory.base import TransformBase

    rotations = [
        child
        for child in module.children()
        if isinstance(child, TransformBase) and child.args.location == "input"
    ]
    return rotations[0] if len(rotations) == 1 else None


def online_rotations(module: nn.Module) -> list[str]:
    """The names of the compressed-tensors transforms in ``module`` that rotate
    activations at every forward (QuIP's online rotations), not those fused into
    weights."""
    from compressed_tensors.transform.factory.base import TransformBase

    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, TransformBase) and child.args.is_online()
    ]


def input_changing_hooks(module: nn.Module, besides: set[int] = frozenset()) -> list:
    """The ids of ``module``'s forward pre-hooks that may change its input, not
    counting the onload hooks of :mod:`iq_transform.models.offload` nor those in
    ``besides``."""
    return [
        key
        for key, hook in module._forward_pre_hooks.items()
        if not leaves_inputs_alone(hook) and key not in besides
    ]


def kernel_rotation(
    matrix: torch.Tensor, transform: nn.Module
) -> KroneckerRotation | nn.Module:
    """The fastest exact way to apply ``transform``, whose matrix is ``matrix``:
    its Kronecker factors where it has them and is wide enough, else itself."""
    if matrix.shape[0] >= STRUCTURED_FROM:
        structured = KroneckerRotation.factor(matrix)
        if structured is not None:
            return structured
    return transform


def rotation_matrix(rotation: nn.Module, size: int) -> torch.Tensor:
    """The (size, size) float64 matrix M with ``rotation(x) == x @ M``."""
    weight = next(rotation.parameters())
    identity = torch.eye(size, dtype=torch.float64, device=weight.device)
    with torch.no_grad():
        return rotation(identity).double().cpu()
