"""Catalog arrays + Blends -> the renderer's `Sources`, by a jittable gather.

A catalog becomes, once, a set of device arrays indexed by catalog row (`CatalogArrays`, made
from tables by ``btkjax.galaxies``); a `Blends` (catalog rows, shifts, rotations, shears per
slot) then becomes `Sources`, so that sampling, source building and rendering stay on device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.render import Sources

__all__ = ["CatalogArrays", "make_sources"]


class CatalogArrays(NamedTuple):
    """Per-row galaxy shapes of a catalog, [row, comp] (kinds given with the render spec).

    Attributes:
        frac: [row, comp] fraction of the band flux in each component (sums to 1).
        hlr: [row, comp] half-light radius in arcsec (1 where the component has no flux).
        q: [row, comp] axis ratio in (0, 1] (1 where the component has no flux).
        beta: [row, comp] position angle in radians.
        n: [row, comp] Sersic index.
    """

    frac: np.ndarray
    hlr: np.ndarray
    q: np.ndarray
    beta: np.ndarray
    n: np.ndarray



@jax.jit
def make_sources(blends, arrays: CatalogArrays, fluxes) -> Sources:
    """Gathers catalog rows into renderer sources.

    Args:
        blends: a `btkjax.samplers.Blends` ([blend, slot] index, mask, dx, dy, rotation in
            degrees, g1, g2).
        arrays: `CatalogArrays` as device arrays.
        fluxes: [row, band] total flux in electrons; its float dtype is the sources' dtype.

    Returns:
        `Sources` with flux [blend, slot, band, comp].
    """
    idx = blends.index
    mask = blends.mask
    dtype = jnp.asarray(fluxes).dtype  # the fluxes' dtype, whatever jax_enable_x64 says
    flux = fluxes[idx][..., :, None] * arrays.frac[idx][..., None, :]
    flux = jnp.where(mask[..., None, None], flux, 0.0).astype(dtype)
    return Sources(
        flux=flux,
        hlr=arrays.hlr[idx].astype(dtype),
        q=arrays.q[idx].astype(dtype),
        beta=arrays.beta[idx].astype(dtype),
        n=arrays.n[idx].astype(dtype),
        dx=jnp.asarray(blends.dx, dtype),
        dy=jnp.asarray(blends.dy, dtype),
        rotation=jnp.radians(jnp.asarray(blends.rotation, dtype)),
        g1=jnp.asarray(blends.g1, dtype),
        g2=jnp.asarray(blends.g2, dtype),
        mask=jnp.asarray(mask, bool),
    )
