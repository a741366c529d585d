"""The real-galaxy kernel: COSMOS HST images, tabulated in k-space, rendered in batches.

GalSim's ``RealGalaxy`` is ``Convolve(InterpolatedImage(HST image), Deconvolve(
InterpolatedImage(HST PSF)))``; its transform, tabulated per catalog row on the host by
``btkjax.cosmos.real_galaxy_tables`` (see that module's docstring for the rule and the accuracy),
is interpolated here at the transformed points ``A^T k`` (A = shear x rotation) with GalSim's
quintic kernel (6 x 6 taps), set to zero beyond min(HST PSF maxk, K), scaled by the band flux,
shifted, multiplied by the survey's PSF x pixel and brought to the stamp as ``btkjax.core.render``
does for analytic profiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.noise import add_noise
from btkjax.core.profiles import rotation_matrix, shear_matrix
from btkjax.core.render import (
    RenderSpec,
    assemble,
    grid_blocks,
    shift_phases,
    split_psf,
    to_stamp,
)

__all__ = [
    "quintic_kernel",
    "quintic_uval",
    "RealTableSpec",
    "RealTables",
    "RealSources",
    "make_real_sources",
    "render_real",
    "real_pipeline",
]


def quintic_kernel(x):
    """GalSim's Quintic interpolant in real space (support [-3, 3]), JAX or numpy input."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.abs(x)
    r1 = 1 + x**3 * (-95 / 12 + x * (23 / 2 + x * (-55 / 12)))
    r2 = (x - 1) * (x - 2) * (-23 / 4 + x * (29 / 2 + x * (-83 / 8 + x * (55 / 24))))
    r3 = (x - 2) * (x - 3) ** 2 * (-9 / 4 + x * (25 / 12 + x * (-11 / 24)))
    return xp.where(x <= 1, r1, xp.where(x <= 2, r2, xp.where(x <= 3, r3, 0.0)))


def quintic_uval(u):
    """The quintic interpolant's Fourier transform at ``u = k / (2 pi)`` per pixel (numpy)."""
    s = np.sinc(u)
    piu = np.pi * u
    return s**5 * (s * (55.0 - 19.0 * piu**2) + 2.0 * np.cos(piu) * (piu**2 - 27.0))



@dataclass(frozen=True)
class RealTableSpec:
    """Static layout of the real-galaxy k-tables (hashable).

    Table column c holds kx = (c - n_neg_x) dk, row r holds ky = (r - n_half_y) dk; values
    beyond |k| = kmax are not used (zero).
    """

    dk: float
    n_neg_x: int
    n_half_y: int
    n_x: int
    kmax: float

    @property
    def shape(self):
        return (2 * self.n_half_y + 1, self.n_x)


class RealTables(NamedTuple):
    """Per-row transforms of real galaxies (deconvolved by the HST PSF, F(0) = 1).

    Attributes:
        values: [row, Ty, Tx] complex, on the `RealTableSpec` grid (half plane kx >= -3 dk).
        maxk: [row] the HST PSF's maxk (rad/arcsec): the transform is zero beyond.
    """

    values: jax.Array
    maxk: jax.Array



class RealSources(NamedTuple):
    """Real galaxies of a batch of blends.

    Attributes:
        flux: [blend, slot, band] electrons (0 in empty slots).
        index: [blend, slot] row of `RealTables`.
        dx, dy: [blend, slot] arcsec from the stamp center.
        rotation: [blend, slot] radians.
        g1, g2: [blend, slot] reduced shear applied after the rotation.
        mask: [blend, slot].
    """

    flux: jax.Array
    index: jax.Array
    dx: jax.Array
    dy: jax.Array
    rotation: jax.Array
    g1: jax.Array
    g2: jax.Array
    mask: jax.Array


@jax.jit
def make_real_sources(blends, fluxes) -> RealSources:
    """Gathers [row, band] fluxes into `RealSources` (rotation: degrees -> radians)."""
    dtype = fluxes.dtype
    mask = jnp.asarray(blends.mask, bool)
    idx = jnp.asarray(blends.index)
    flux = jnp.where(mask[..., None], fluxes[idx], 0.0)
    return RealSources(
        flux=flux, index=idx, dx=jnp.asarray(blends.dx, dtype), dy=jnp.asarray(blends.dy, dtype),
        rotation=jnp.radians(jnp.asarray(blends.rotation, dtype)),
        g1=jnp.where(mask, jnp.asarray(blends.g1, dtype), 0.0),
        g2=jnp.where(mask, jnp.asarray(blends.g2, dtype), 0.0), mask=mask,
    )


def _interp_table(table, tspec: RealTableSpec, kxp, kyp):
    """Quintic interpolation of one half-plane table [Ty, Tx] at points (kxp, kyp)."""
    flip = kxp < 0
    kxp = jnp.where(flip, -kxp, kxp)
    kyp = jnp.where(flip, -kyp, kyp)
    u = kxp / tspec.dk + tspec.n_neg_x
    v = kyp / tspec.dk + tspec.n_half_y
    i0 = jnp.floor(u).astype(jnp.int32)
    j0 = jnp.floor(v).astype(jnp.int32)
    ny, nx = tspec.shape
    flat = table.reshape(-1)
    offs = jnp.arange(-2, 4)
    ix = i0[..., None] + offs  # [..., 6]
    iy = j0[..., None] + offs
    wx = quintic_kernel(u[..., None] - ix)
    wy = quintic_kernel(v[..., None] - iy)
    ix = jnp.clip(ix, 0, nx - 1)
    iy = jnp.clip(iy, 0, ny - 1)
    out = 0.0
    for b in range(6):
        rowv = flat[iy[..., b, None] * nx + ix]  # [..., 6]
        out = out + wy[..., b] * jnp.sum(wx * rowv, axis=-1)
    return jnp.where(flip, jnp.conj(out), out)


def _real_kvalues(src: RealSources, tables: RealTables, tspec: RealTableSpec, spec: RenderSpec,
                  kx, ky):
    """Per-galaxy per-band transforms of one blend [slot, band, Ry, Cx]."""
    a = shear_matrix(src.g1, src.g2) @ rotation_matrix(src.rotation)  # [slot, 2, 2]
    kxg, kyg = kx[None, :], ky[:, None]

    def one(a_mat, row):
        kxp = a_mat[0, 0] * kxg + a_mat[1, 0] * kyg  # A^T k
        kyp = a_mat[0, 1] * kxg + a_mat[1, 1] * kyg
        val = _interp_table(tables.values[row], tspec, kxp, kyp)
        limit = jnp.minimum(tables.maxk[row], tspec.kmax)
        return jnp.where(kxp * kxp + kyp * kyp <= limit * limit, val, 0.0)

    shape_k = jax.vmap(one)(a, src.index)  # [slot, Ry, Cx]
    flux = jnp.where(src.mask[:, None], src.flux, 0.0).astype(kx.dtype)
    cos, sin = shift_phases(src.dx, src.dy, kx, ky, spec)
    shape_k = shape_k * jax.lax.complex(cos, -sin).astype(shape_k.dtype)
    return flux[:, :, None, None] * shape_k[:, None]


@partial(jax.jit, static_argnames=("tspec", "spec", "isolated", "chunk"))
def render_real(sources: RealSources, tables: RealTables, psf_k, tspec: RealTableSpec,
                spec: RenderSpec, isolated: bool = False, chunk: int = 16):
    """Renders noiseless blends of real galaxies, as `btkjax.render.render` does for profiles.

    Args:
        sources: `RealSources` with a leading blend axis.
        tables: `RealTables` (device arrays).
        psf_k: [band, Ry, Cx] PSF x pixel on the renderer's grid (or [blend, band, Ry, Cx]).
        tspec, spec: static table layout and render spec.

    Returns:
        (blend_images [blend, band, S, S], isolated [blend, slot, band, S, S] or None).
    """

    blocks = grid_blocks(spec)

    def one(src, psf):
        psf_blocks = split_psf(psf, spec)

        def block_values(b):  # the k-grid block by block, as `btkjax.render` does
            yp, xp = blocks[b][:2]
            kx = jnp.asarray(spec.x_indices[xp] * spec.dk, src.flux.dtype)
            ky = jnp.asarray(spec.y_indices[yp] * spec.dk, src.flux.dtype)
            gal_k = _real_kvalues(src, tables, tspec, spec, kx, ky)
            z = gal_k * psf_blocks[b][None] if isolated else gal_k.sum(axis=0) * psf_blocks[b]
            return z.real, z.imag

        images = to_stamp(assemble(block_values, spec), spec)
        if not isolated:
            return images, None
        iso = jnp.where(src.mask[:, None, None, None], images, 0.0)
        return iso.sum(axis=0), iso  # the blend: the sum of its galaxies (FFT linearity)

    if psf_k.ndim == 4:
        return jax.lax.map(lambda args: one(*args), (sources, psf_k), batch_size=chunk)
    return jax.lax.map(lambda src: one(src, psf_k), sources, batch_size=chunk)


@partial(jax.jit, static_argnames=("tspec", "spec", "mode", "isolated", "chunk"))
def real_pipeline(blends, blend_ids, tables, fluxes, psf_k, sky, noise_key, tspec, spec, mode,
                   isolated, chunk):
    sources = make_real_sources(blends, fluxes)
    images, iso = render_real(sources, tables, psf_k, tspec, spec, isolated=isolated, chunk=chunk)
    return add_noise(noise_key, blend_ids, images, sky, mode), iso

