"""QuIP's online Hadamard rotations as Kronecker factors: the structured product
equals the dense one (in its blocked order), and a matrix without the structure is
left dense."""

import pytest
import torch
from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

from iq_transform.kernels.rotations import KroneckerRotation, kernel_rotation


@pytest.mark.parametrize(
    ("size", "blocks"),
    [(576, (144, 4)), (1536, (192, 8)), (4096, (64, 64))],  # SmolLM2, Llama widths
)
@pytest.mark.parametrize("inverse", [False, True])
def test_a_random_hadamard_rotation_factors_into_its_kronecker_blocks(
    size, blocks, inverse
):
    generator = torch.Generator().manual_seed(size)
    weight = random_hadamard_matrix(size, torch.float32, gen=generator)
    matrix = (weight.T if inverse else weight).double() / size**0.5
    rotation = KroneckerRotation.factor(matrix)
    assert rotation is not None and rotation.blocks == blocks
    x = torch.randn(3, 5, size)
    dense = (x.double() @ matrix).reshape(-1, size)[:, rotation.order]
    torch.testing.assert_close(rotation(x).double(), dense, rtol=0, atol=2e-5)
    assert sorted(rotation.order.tolist()) == list(range(size))


def test_a_bfloat16_input_is_rotated_in_float32():
    weight = random_hadamard_matrix(576, torch.bfloat16, gen=torch.Generator())
    rotation = KroneckerRotation.factor(weight.double() / 24)
    x = torch.randn(4, 576)
    got = rotation(x.bfloat16())
    assert got.dtype == torch.float32
    expected = (x.bfloat16().double() @ (weight.double() / 24))[:, rotation.order]
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_matrices_without_the_structure_stay_dense():
    torch.manual_seed(0)
    orthogonal, _ = torch.linalg.qr(torch.randn(576, 576, dtype=torch.float64))
    assert KroneckerRotation.factor(orthogonal) is None
    # one magnitude, random signs: no Kronecker split of the sign pattern holds
    signs = torch.randint(0, 2, (576, 576), dtype=torch.float64) * 2 - 1
    assert KroneckerRotation.factor(signs / 24) is None
    transform = torch.nn.Identity()
    assert kernel_rotation(orthogonal, transform) is transform
    # narrow rotations run faster as one dense product, their own
    narrow = random_hadamard_matrix(64, torch.float64, gen=torch.Generator()) / 8
    assert KroneckerRotation.factor(narrow) is not None
    assert kernel_rotation(narrow, transform) is transform
