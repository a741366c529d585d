"""Initialization of the fit from detections (pure JAX): symmetric-template shares of the
data, adaptive moments, linear fluxes, model-split refinements (see `init_galaxies`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from btkjax.core.render import RenderSpec, render
from btkjax.deblend.model import (
    BULGE_START_FRAC,
    BULGE_START_RATIO,
    HLR_FLOOR_ARCSEC,
    TRACES,
    Galaxies,
    fixed_index,
    psf_images,
    spec_model,
    to_sources,
)

__all__ = ["init_galaxies"]


def _adaptive_moments_one(img, x, y, n_iter=6, sigma0=2.0, max_move=1.0):
    """Adaptive Gaussian moments of ``img`` [S, S] around (x, y): the centroid (moved by at most
    ``max_move`` pixels) and the covariance [2, 2] in pixels^2 (the fixed point M = 2 Q, exact
    for Gaussians)."""
    s = img.shape[-1]
    dtype = img.dtype
    yy, xx = jnp.mgrid[0:s, 0:s].astype(dtype)
    img = jnp.maximum(img, 0.0)

    def body(_, carry):
        cx, cy, m = carry
        dx, dy = xx - cx, yy - cy
        inv = jnp.linalg.inv(m)
        w = jnp.exp(-0.5 * (inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy
                            + inv[1, 1] * dy * dy)) * img
        tot = jnp.maximum(jnp.sum(w), 1e-30)
        mx, my = jnp.sum(w * dx) / tot, jnp.sum(w * dy) / tot
        qxx = jnp.sum(w * dx * dx) / tot
        qyy = jnp.sum(w * dy * dy) / tot
        qxy = jnp.sum(w * dx * dy) / tot
        m_new = 2 * jnp.array([[qxx, qxy], [qxy, qyy]])
        ok = (jnp.linalg.det(m_new) > 0.01) & (jnp.trace(m_new) < 4 * s * s) & jnp.all(
            jnp.isfinite(m_new))
        return (jnp.where(ok, x + jnp.clip(cx + mx - x, -max_move, max_move), cx),
                jnp.where(ok, y + jnp.clip(cy + my - y, -max_move, max_move), cy),
                jnp.where(ok, m_new, m))

    m0 = jnp.eye(2, dtype=dtype) * sigma0**2
    return jax.lax.fori_loop(0, n_iter, body, (jnp.asarray(x, dtype), jnp.asarray(y, dtype), m0))


def _adaptive_moments(image, x0, y0, n_iter=6, sigma0=2.0, max_move=1.0):
    """`_adaptive_moments_one` for each slot: ``image`` [S, S] (shared) or [slot, S, S]."""
    f = partial(_adaptive_moments_one, n_iter=n_iter, sigma0=sigma0, max_move=max_move)
    return jax.vmap(f, in_axes=(0 if image.ndim == 3 else None, 0, 0))(image, x0, y0)


def _symmetric_templates(det, x, y, mask):
    """SDSS-style symmetric templates [slot, S, S] of one blend's detection image ``det``
    [S, S]: ``min(det(p), det(2 c - p))`` around each detection's pixel c, clipped at 0 (light of
    a neighbour on one side of a galaxy is not mirrored on the other, so it drops out)."""
    s = det.shape[-1]
    ix = jnp.clip(jnp.round(x), 0, s - 1).astype(jnp.int32)
    iy = jnp.clip(jnp.round(y), 0, s - 1).astype(jnp.int32)
    idx = jnp.arange(s)
    rx = 2 * ix[:, None] - idx[None, :]  # [slot, S]
    ry = 2 * iy[:, None] - idx[None, :]
    okx = (rx >= 0) & (rx < s)
    oky = (ry >= 0) & (ry < s)
    refl = det[jnp.clip(ry, 0, s - 1)[:, :, None], jnp.clip(rx, 0, s - 1)[:, None, :]]
    keep = oky[:, :, None] & okx[:, None, :] & mask[:, None, None]
    return jnp.where(keep, jnp.maximum(jnp.minimum(det[None], refl), 0.0), 0.0)


def _split(det, weights):
    """det [S, S] shared among slots in proportion to weights [slot, S, S] (scarlet's split)."""
    tot = jnp.sum(weights, axis=0, keepdims=True)
    return jnp.where(tot > 0, det[None] * weights / jnp.where(tot > 0, tot, 1.0), 0.0)


def _shape_from_moments(m_gal, spec: RenderSpec):
    """Intrinsic covariance [..., 2, 2] (pixels^2) -> (hlr arcsec, g1, g2), bounded."""
    model = spec_model(spec)
    floor = (HLR_FLOOR_ARCSEC / spec.pixel_scale) ** 2 + 0.09  # (0.3 pixel)^2 at least
    mxx, myy, mxy = m_gal[..., 0, 0], m_gal[..., 1, 1], m_gal[..., 0, 1]
    tr = jnp.maximum(mxx + myy, 2 * floor)
    e1 = (mxx - myy) / tr
    e2 = 2 * mxy / tr
    e = jnp.sqrt(e1**2 + e2**2)
    e_scale = jnp.minimum(1.0, 0.9 / jnp.maximum(e, 1e-12))
    e1, e2, e = e1 * e_scale, e2 * e_scale, jnp.minimum(e, 0.9)
    sigma_pix = jnp.sqrt(0.5 * tr * jnp.sqrt(1 - e * e))  # circularized per-axis sigma
    g_scale = 1 / (1 + jnp.sqrt(1 - e * e))  # distortion -> reduced shear
    g1 = jnp.clip(e1 * g_scale, -0.6, 0.6)
    g2 = jnp.clip(e2 * g_scale, -0.6, 0.6)
    # half-light radius / sigma: Gaussian 1.177, exponential ~0.97 (<r^2> = 6 r_d^2).
    ratio = {"gaussian": 1.177, "exponential": 0.97}.get(model, 0.9)
    hlr = jnp.clip(ratio * sigma_pix * spec.pixel_scale, HLR_FLOOR_ARCSEC * 2, 5.0)
    return hlr, g1, g2


def _linear_fluxes(unit: Galaxies, mask, images, psf_k, spec: RenderSpec, sky):
    """Per-band least-squares fluxes of the unit-flux templates (weights 1 / sky), floored at
    one pixel's sky noise; also returns the templates [blend, slot, band, S, S]."""
    dtype = images.dtype
    _, iso = render(to_sources(unit, mask, spec), psf_k, spec, isolated=True)
    t = iso / jnp.sqrt(sky)[None, None, :, None, None]
    d = images / jnp.sqrt(sky)[None, :, None, None]
    ata = jnp.einsum("biByx,bjByx->bBij", t, t)  # [blend, band, slot, slot]
    atd = jnp.einsum("biByx,bByx->bBi", t, d)  # [blend, band, slot]
    k = mask.shape[1]
    scale = jnp.maximum(jnp.trace(ata, axis1=-2, axis2=-1)[..., None, None] / k, 1e-30)
    reg = 1e-6 * scale * jnp.eye(k, dtype=dtype) + jnp.where(
        mask[:, None, :, None] & mask[:, None, None, :], 0.0, jnp.eye(k, dtype=dtype) * scale)
    f = jnp.linalg.solve(ata + reg, atd[..., None])[..., 0]  # [blend, band, slot]
    f = jnp.transpose(f, (0, 2, 1))
    f_floor = jnp.sqrt(sky)[None, None, :]  # one pixel's noise: positive, far below a detection
    return jnp.where(jnp.isfinite(f), jnp.maximum(f, f_floor), f_floor), iso


@partial(jax.jit, static_argnames=("spec", "n_refine", "start_hlr"))
def init_galaxies(images, x, y, mask, psf_k, spec: RenderSpec, sky, n_refine: int = 2,
                  start_hlr: float | None = None) -> Galaxies:
    """Initial `Galaxies` from detections: moments of the deblended data, linear fluxes.

    Each detection's share of the inverse-sky-weighted band sum is its symmetric template's
    fraction of the sum of the templates (`_symmetric_templates`); adaptive Gaussian moments of
    that share, minus the PSF's, give its centroid, size and ellipticity; the fluxes per band
    solve the linear least-squares problem of the data given the unit-flux models. Then
    ``n_refine`` times: the data are split in proportion to these models instead, and the
    moments and fluxes measured again.

    Args:
        images: [blend, band, S, S].
        x, y: [blend, slot] detection positions in pixels (0-based).
        mask: [blend, slot] bool.
        psf_k: [band, Ry, Cx] PSF x pixel on the spec's grid (one PSF for the batch).
        spec: the fit's `RenderSpec`.
        sky: [band] sky electrons per pixel.
        n_refine: model-split refinements.
        start_hlr: None (the moments' sizes and ellipticities), or a compact start: every
            galaxy but the brightest of its blend (flux summed over bands) round, its
            half-light radius the smaller of its moments' and ``start_hlr`` (arcsec), keeping
            the positions and fluxes. A galaxy's moments hold its
            neighbours' light where they overlap, and a fit started from them tends to stay in
            a minimum where a faint galaxy has grown to take a bright neighbour's wings; from a
            compact start it grows only as far as its own light asks (measured in
            ``benchmarks/bench_deblend.py``). The brightest keeps its moments' shape (its
            moments are mostly its own light): far below the PSF a model hardly depends on its
            size, and a bright galaxy started there can stall (tests/test_deblend_priors.py).

    Returns:
        `Galaxies` with finite values in every slot (empty slots hold harmless defaults).
    """
    TRACES["init"] += 1
    dtype = images.dtype
    model = spec_model(spec)
    n_band = images.shape[1]
    sky = jnp.asarray(sky, dtype)
    images = jnp.where(jnp.isfinite(images), images, 0.0)
    x = jnp.where(mask & jnp.isfinite(x), x, (spec.stamp_pixels - 1) / 2).astype(dtype)
    y = jnp.where(mask & jnp.isfinite(y), y, (spec.stamp_pixels - 1) / 2).astype(dtype)
    inv_sky = 1 / sky
    det = jnp.einsum("bByx,B->byx", images, inv_sky)  # [blend, S, S] inverse-sky weighted
    psf_img = psf_images(psf_k, spec, n_band, dtype)
    psf_det = jnp.einsum("Byx,B->yx", psf_img, inv_sky)
    c = jnp.full((1,), (spec.stamp_pixels - 1) / 2, dtype)
    m_psf = _adaptive_moments(psf_det, c, c)[2][0]
    weights = jax.vmap(_symmetric_templates)(det, x, y, mask)  # [blend, slot, S, S]
    n = jnp.full(mask.shape, fixed_index(model), dtype)
    moments = jax.vmap(_adaptive_moments)
    cx, cy, m_obs = moments(jax.vmap(_split)(det, weights), x, y)
    m_gal = m_obs - m_psf  # exact for Gaussians; the refinements correct the rest

    def bulge(hlr):
        """A bulge+disk galaxy's start: `BULGE_START_FRAC` of each band in a bulge of
        `BULGE_START_RATIO` times the disk's half-light radius."""
        if model != "bulge+disk":
            return {}
        return {"bulge_frac": jnp.full(mask.shape + (n_band,), BULGE_START_FRAC, dtype),
                "bulge_hlr": BULGE_START_RATIO * hlr}

    def unit_and_fluxes(m_gal, cx, cy):
        hlr, g1, g2 = _shape_from_moments(m_gal, spec)
        unit = Galaxies(x=jnp.where(mask, cx, x), y=jnp.where(mask, cy, y),
                        flux=jnp.ones(mask.shape + (n_band,), dtype), hlr=hlr, g1=g1, g2=g2, n=n,
                        **bulge(hlr))
        flux, iso = _linear_fluxes(unit, mask, images, psf_k, spec, sky)
        return unit._replace(flux=flux), iso

    def refine(_, carry):
        # Fluxes of the current shapes; then the data split in proportion to these models, and
        # each model's moments (measured the same way) moved onto those of its share.
        m_gal, cx, cy, _ = carry
        gal, iso = unit_and_fluxes(m_gal, cx, cy)
        mdet = jnp.einsum("bkByx,bkB,B->bkyx", iso, gal.flux, inv_sky)
        mdet = jnp.where(mask[..., None, None], jnp.maximum(mdet, 0.0), 0.0)
        cx_d, cy_d, m_obs = moments(jax.vmap(_split)(det, mdet), x, y)
        cx_m, cy_m, m_mod = moments(mdet, x, y)
        return m_gal + (m_obs - m_mod), cx + (cx_d - cx_m), cy + (cy_d - cy_m), gal

    # n_refine + 1 passes, the last one's refinement unused: one copy of the code to compile
    gal0 = Galaxies(x=x, y=y, flux=jnp.ones(mask.shape + (n_band,), dtype), hlr=x, g1=x, g2=x,
                    n=n, **bulge(x))
    gal = jax.lax.fori_loop(0, n_refine + 1, refine, (m_gal, cx, cy, gal0))[3]
    if start_hlr is not None:
        # the brightest galaxy of each blend keeps its moments' shape (they are mostly its own)
        total = jnp.where(mask, jnp.sum(gal.flux, axis=-1), -jnp.inf)
        compact = mask & (total < jnp.max(total, axis=-1, keepdims=True))
        gal = gal._replace(hlr=jnp.where(compact, jnp.minimum(gal.hlr, start_hlr), gal.hlr),
                           g1=jnp.where(compact, 0.0, gal.g1), g2=jnp.where(compact, 0.0, gal.g2))
        if model == "bulge+disk":
            gal = gal._replace(bulge_hlr=BULGE_START_RATIO * gal.hlr)
    return gal
