"""Baselines that SpikeFree is measured against, in the same harness.

- :mod:`~iq_transform.baselines.prefixquant`: a prefix of outlier tokens whose KV
  cache is computed in full precision (PrefixQuant, Chen et al. 2024);
- :mod:`~iq_transform.baselines.qfem`: linear layers with activation spikes left
  unquantized (QFeM, Yang et al. 2024).

Both are deliberately small: they exist to be compared with, like with like. What
a run measures for them before composing is
:func:`iq_transform.composition.plan.plan_transform`.
"""

from iq_transform.baselines.prefixquant import (
    PrefixQuantModifier,
    find_prefix,
    with_prefix,
)
from iq_transform.baselines.qfem import spiky_linears

__all__ = ["PrefixQuantModifier", "find_prefix", "with_prefix", "spiky_linears"]
