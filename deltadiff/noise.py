"""Seeded noise for ``resshift-v3``: every noise tensor is an explicit input.

One generator for every backend and the reference: numpy PCG64 from a seed, drawn in the order
the step table names them (``n_prior``, then ``n_t`` for each noisy row). For tiled images the
field is drawn once at the full padded latent size and cropped per tile, so neighbouring tiles see
one continuous noise field.
"""

from __future__ import annotations

import numpy as np


def noise_field(names: list[str], shape: tuple[int, ...], seed: int) -> dict[str, np.ndarray]:
    """Standard normal float32 arrays of ``shape`` for each name, in order, from ``seed``."""
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape, dtype=np.float32) for n in names}
