"""Public facade for the supernet's primitive ops: Gumbel sampling (TAS-SPEC 2.1) and CWI (TAS-SPEC 2.3, 2.4).

The implementations live in ``tas_jax.sampling`` and ``tas_jax.cwi``.
"""

from __future__ import annotations

from tas_jax.cwi import cwi, cwi_up, interpolation_matrix, left_add
from tas_jax.sampling import (
    argmax_choice,
    gumbel_noise,
    gumbel_softmax,
    sample_depth,
    sample_widths,
)

__all__ = [
    "argmax_choice",
    "cwi",
    "cwi_up",
    "gumbel_noise",
    "gumbel_softmax",
    "interpolation_matrix",
    "left_add",
    "sample_depth",
    "sample_widths",
]
