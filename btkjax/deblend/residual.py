"""Galaxies the detection missed: significant peaks of the residual of a fit."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.render import RenderSpec, render
from btkjax.deblend.chunks import apply_chunked, check_chunk, map_blends, pad_mask
from btkjax.deblend.model import (
    TRACES,
    Galaxies,
    check_spec,
    model_images,
    psf_images,
    render_one,
    to_sources,
)

__all__ = ["ResidualPeaks", "residual_peaks", "asymmetry_peaks", "mirror", "SplitCandidates",
           "split_candidates"]


class ResidualPeaks(NamedTuple):
    """What `residual_peaks` returns: [blend, n_add] pixel positions and significance."""

    x: jax.Array
    y: jax.Array
    found: jax.Array


def _matched_snr(resid, var, kern):
    """Matched-filter S/N [S, S] of a residual [S, S] of variance ``var`` with kernel ``kern``."""
    conv = partial(jax.scipy.signal.convolve2d, mode="same")
    return conv(resid, kern[::-1, ::-1]) / jnp.sqrt(
        jnp.maximum(conv(var, (kern * kern)[::-1, ::-1]), 1e-30))


def _gaussian_sigmas(chi2, dof):
    """The Gaussian significance (one-sided sigmas) of a chi-square ``chi2`` with ``dof``."""
    p = jax.scipy.special.gammaincc(dof / 2, jnp.maximum(chi2, 0.0) / 2)
    p = jnp.clip(p, 1e-300, 0.5)
    return -jax.scipy.special.ndtri(p)


def _peak_inputs(name, galaxies, mask, images, psf_k, spec, sky, chunk):
    """The checked, cast and padded inputs of `residual_peaks` and `asymmetry_peaks`."""
    check_spec(spec)
    images = jnp.asarray(images)
    dtype = images.dtype
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    chunk = check_chunk(chunk)
    mask = pad_mask(jnp.asarray(mask, bool), chunk)
    galaxies = jax.tree.map(lambda a: jnp.asarray(a, dtype), galaxies)
    psf_k = jnp.asarray(psf_k)
    if psf_k.ndim != 3:
        raise ValueError(f"{name} needs one PSF for the batch ([band, Ry, Cx]), got shape "
                         f"{psf_k.shape}.")
    return galaxies, mask, images, sky, psf_k, chunk


def _residual_peaks_one(gal1: Galaxies, mask1, image, sky, psf_k, *, spec, n_add, snr_threshold,
                        min_distance, mismatch, colour):
    """Up to ``n_add`` significant peaks of one blend's residual; (x, y, found) [n_add]."""
    dtype = image.dtype
    s = spec.stamp_pixels
    n_band = image.shape[0]
    model = render_one(gal1, mask1, psf_k, spec)
    var_b = sky[:, None, None] + jnp.maximum(model, 0.0) + (mismatch * model) ** 2
    psf_b = psf_images(psf_k, spec, n_band, dtype, True)
    c = s // 2
    h = min(5, c - 1)
    kern_b = psf_b[:, c - h:c + h + 1, c - h:c + h + 1]
    kern_b = kern_b / jnp.sum(kern_b, axis=(1, 2), keepdims=True)
    w = 1 / sky  # inverse-sky band weights, as the detection image of `init_galaxies`
    resid = jnp.einsum("Byx,B->yx", image - model, w)
    var = jnp.einsum("Byx,B->yx", sky[:, None, None] + jnp.maximum(model, 0.0), w * w)
    var = var + (mismatch * jnp.einsum("Byx,B->yx", model, w)) ** 2
    # matched filter: the band-weighted PSF image, cut to 11 x 11 pixels
    kern = jnp.einsum("Byx,B->yx", kern_b, w)
    snr = _matched_snr(resid, var, kern / jnp.sum(kern))
    if colour:
        # colour-aware: each band's matched-filter S/N, their positive parts squared and summed
        # (a chi-square of n_band degrees of freedom for noise; conservative, since only the
        # positive parts count), as a Gaussian significance: a neighbour whose colour differs
        # from the 1 / sky weighting (a red galaxy under a blue one) stands out in it.
        snr_b = jax.vmap(_matched_snr)(image - model, var_b, kern_b)
        chi2 = jnp.sum(jnp.maximum(snr_b, 0.0) ** 2, axis=0)
        snr = jnp.maximum(snr, _gaussian_sigmas(chi2, jnp.asarray(n_band, dtype)))
    return _top_peaks(snr, None, gal1, mask1, n_add, snr_threshold, min_distance)


def _top_peaks(snr, signal, gal1, mask1, n_add, snr_threshold, min_distance):
    """Up to ``n_add`` peaks (3 x 3 local maxima) of ``snr`` [S, S] at least ``min_distance``
    pixels from the fitted galaxies and from each other, the most significant first, each at
    its S/N peak or, given ``signal``, at the maximum of ``signal`` within ``min_distance`` of
    it; (x, y, found), found where the S/N exceeds ``snr_threshold``."""
    s, dtype = snr.shape[-1], snr.dtype
    yy, xx = jnp.mgrid[0:s, 0:s].astype(dtype)
    near = jnp.any(mask1[:, None, None] & ((xx[None] - gal1.x[:, None, None]) ** 2
                                           + (yy[None] - gal1.y[:, None, None]) ** 2
                                           < min_distance**2), axis=0)
    peak = snr >= jax.lax.reduce_window(snr, -jnp.inf, jax.lax.max, (3, 3), (1, 1), "SAME")
    score = jnp.where(peak & ~near & jnp.isfinite(snr), snr, -jnp.inf)
    taken = jnp.zeros((s, s), bool)
    xs, ys, found = [], [], []
    for _ in range(n_add):
        i = jnp.argmax(score)
        py0, px0 = (i // s).astype(dtype), (i % s).astype(dtype)
        px, py = px0, py0
        found.append(score.reshape(-1)[i] > snr_threshold)
        # the S/N peaks away from a bright galaxy (its noise grows toward its core): the
        # source is where the filtered light itself peaks, within min_distance of it
        if signal is not None:
            # (not near a fitted galaxy, nor where an earlier peak was taken)
            close = ((xx - px0) ** 2 + (yy - py0) ** 2 <= min_distance**2) & ~near & \
                jnp.isfinite(snr) & ~taken
            j = jnp.argmax(jnp.where(close, signal, -jnp.inf))
            px, py = (j % s).astype(dtype), (j // s).astype(dtype)
        xs.append(px)
        ys.append(py)
        # no later peak within min_distance of this one's S/N peak or of where it was put
        gone = ((xx - px0) ** 2 + (yy - py0) ** 2 < min_distance**2) | \
            ((xx - px) ** 2 + (yy - py) ** 2 < min_distance**2)
        taken = taken | gone
        score = jnp.where(gone, -jnp.inf, score)
    return jnp.stack(xs), jnp.stack(ys), jnp.stack(found)


@partial(jax.jit, static_argnames=("spec", "n_add", "colour"))
def _residual_peaks_jit(galaxies, mask, images, sky, psf_k, snr_threshold, min_distance, mismatch,
                        *, spec, n_add, colour):
    TRACES["residual"] += 1
    one = partial(_residual_peaks_one, spec=spec, n_add=n_add, snr_threshold=snr_threshold,
                  min_distance=min_distance, mismatch=mismatch, colour=colour)
    return map_blends(one, 4, galaxies, mask, images, sky, psf_k)


def residual_peaks(galaxies: Galaxies, mask, images, psf_k, spec: RenderSpec, sky, *,
                   n_add: int = 1, snr_threshold: float = 5.0, min_distance: float = 2.0,
                   mismatch: float = 0.05, colour: bool = False, chunk: int | None = None):
    """Sources the detection missed: significant peaks of the residual of a fit.

    The residual ``images - model`` is summed over bands with weights 1 / sky, filtered with
    the band-weighted PSF (the matched filter of a point source) and divided by the filtered
    noise, whose variance is the Poisson variance (sky + model) plus ``(mismatch * model)^2``:
    a galaxy that the single-profile model describes to a few percent (a bulge, a disk) leaves
    residuals that stay below the threshold, a neighbour that the detection missed does not.
    Peaks (3 x 3 local maxima) above ``snr_threshold`` and at least ``min_distance`` pixels from
    the fitted galaxies and from each other are returned, the most significant first.

    ``colour=True`` also computes each band's matched-filter S/N of the residual (its own PSF,
    its own noise) and sums the squares of their positive parts: a chi-square of ``n_band``
    degrees of freedom under the noise, turned into a Gaussian significance; a pixel's S/N is
    the larger of the two. The band sum weights bands as a flat spectrum in electrons would;
    the chi-square finds a neighbour of another colour (a red galaxy under a blue one) at the
    same false-positive rate per statistic.

    Args:
        galaxies, mask: the fit (`Galaxies`, [blend, slot] bool).
        images, psf_k, spec, sky: as `fit_blends` (one PSF for the batch: [band, Ry, Cx]).
        n_add: peaks per blend.
        snr_threshold, min_distance, mismatch, colour: see above.
        chunk: blends per compiled call (`default_chunk`).

    Returns:
        `ResidualPeaks` (x, y, found): [blend, n_add] pixel positions and whether each
        peak is significant.
    """
    galaxies, mask, images, sky, psf_k, chunk = _peak_inputs(
        "residual_peaks", galaxies, mask, images, psf_k, spec, sky, chunk)
    dtype, n = images.dtype, images.shape[0]

    def run(g, m, img, s1):
        return _residual_peaks_jit(g, m, img, s1, psf_k, jnp.asarray(snr_threshold, dtype),
                                   jnp.asarray(min_distance, dtype), jnp.asarray(mismatch, dtype),
                                   spec=spec, n_add=int(n_add), colour=bool(colour))

    return ResidualPeaks(*apply_chunked(run, n, chunk, (galaxies, mask, images, sky)))


# `asymmetry_peaks`: the radius (pixels, Gaussian weight) of the core whose symmetry fixes each
# galaxy's centre of reflection, and the Gauss-Newton steps taken from the fitted centre
CORE_PIXELS = 1.5
CENTRE_STEPS = 3


def mirror(image, cx, cy):
    """``image`` [S, S] point-reflected through (cx, cy) (pixels, any real numbers):
    ``out[y, x] = image(2 cy - y, 2 cx - x)``, band-limited (Fourier) interpolation on a grid
    zero-padded to 2S (no wrap-around), and whether each reflected point lies on the stamp
    (``valid`` [S, S]; elsewhere ``out`` is 0). A well-sampled image (PSF FWHM >~ 2 pixels)
    is interpolated to the noise; an integer or half-integer centre is an exact pixel flip."""
    s = image.shape[-1]
    c0 = (s - 1) / 2
    flipped = jnp.zeros((2 * s, 2 * s), image.dtype).at[:s, :s].set(image[::-1, ::-1])
    ky = jnp.fft.fftfreq(2 * s).astype(image.dtype)[:, None]
    kx = jnp.fft.rfftfreq(2 * s).astype(image.dtype)[None, :]
    # out(x) = flipped(x - 2 (c - c0)): a shift by 2 (c - c0) in each axis
    phase = jnp.exp(-2j * jnp.pi * (kx * 2 * (cx - c0) + ky * 2 * (cy - c0)))
    out = jnp.fft.irfft2(jnp.fft.rfft2(flipped) * phase, s=(2 * s, 2 * s))[:s, :s]
    yy, xx = jnp.mgrid[0:s, 0:s].astype(image.dtype)
    my, mx = 2 * cy - yy, 2 * cx - xx
    valid = (mx >= 0) & (mx <= s - 1) & (my >= 0) & (my <= s - 1)
    return jnp.where(valid, out, 0.0).astype(image.dtype), valid


def _asymmetry_peaks_one(gal1: Galaxies, mask1, image, sky, psf_k, *, spec, n_add,
                         snr_threshold, min_distance, mismatch):
    """Up to ``n_add`` significant peaks of one blend's asymmetric residuals; (x, y, found)."""
    dtype = image.dtype
    s = spec.stamp_pixels
    n_band = image.shape[0]
    src = to_sources(jax.tree.map(lambda a: a[None], gal1), mask1[None], spec)
    _, iso = render(src, psf_k, spec, isolated=True)
    iso = iso[0]  # [slot, band, S, S]
    w = 1 / sky  # inverse-sky band weights, as `residual_peaks`
    own = jnp.einsum("kByx,B->kyx", iso, w)  # each galaxy's model, band-weighted
    total = own.sum(axis=0)
    data = jnp.einsum("Byx,B->yx", image, w)
    var = jnp.einsum("Byx,B->yx", sky[:, None, None] + jnp.maximum(iso.sum(axis=0), 0.0),
                     w * w)
    psf_b = psf_images(psf_k, spec, n_band, dtype, True)
    c = s // 2
    h = min(5, c - 1)
    kern = jnp.einsum("Byx,B->yx", psf_b[:, c - h:c + h + 1, c - h:c + h + 1], w)
    kern = kern / jnp.sum(kern)

    yy, xx = jnp.mgrid[0:s, 0:s].astype(dtype)

    def one_slot(own_k, x, y, on):
        # the data less every other galaxy's model: galaxy k alone, plus what no model holds
        alone = data - (total - own_k)
        # the centre of symmetry of k's core: Gauss-Newton on the antisymmetric light within
        # ~CORE_PIXELS of the fitted centre (a neighbour pulls the fitted centre, which leaves
        # a dipole of k's bright core in the antisymmetric part; the core's symmetry does not)
        core = jnp.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / CORE_PIXELS**2) / var

        def anti_core(cen):
            return (jnp.sqrt(core) * (alone - mirror(alone, cen[0], cen[1])[0])).ravel()

        cen = jnp.stack([x, y])
        for _ in range(CENTRE_STEPS):
            jac = jax.jacfwd(anti_core)(cen)
            r = anti_core(cen)
            step = jnp.linalg.solve(jac.T @ jac + 1e-12 * jnp.eye(2, dtype=dtype), jac.T @ r)
            cen = cen - jnp.clip(step, -0.5, 0.5)
        cen = jnp.where(jnp.all(jnp.isfinite(cen)) & on, cen, jnp.stack([x, y]))
        x, y = cen[0], cen[1]
        flipped, valid = mirror(alone, x, y)
        var_m, _ = mirror(var, x, y)
        # the antisymmetric part about k's centre: 0 for any point-symmetric profile (a bulge
        # and a disk of one centre, whatever the model's mismatch), +f/2 on a neighbour
        anti = 0.5 * (alone - flipped)
        var_a = 0.25 * (var + jnp.maximum(var_m, 0.0)) + (mismatch * own_k) ** 2
        anti = jnp.where(valid, anti, 0.0)
        snr = _matched_snr(anti, jnp.where(valid, var_a, var), kern)
        # where galaxy k's model outshines the others' (its wings, where a neighbour hides)
        mine = valid & (own_k >= total - own_k) & on
        signal = jax.scipy.signal.convolve2d(anti, kern[::-1, ::-1], mode="same")
        return jnp.where(mine, snr, -jnp.inf), signal

    snr_k, signal_k = jax.vmap(one_slot)(own, gal1.x, gal1.y, mask1)
    owner = jnp.argmax(snr_k, axis=0)
    snr = jnp.max(snr_k, axis=0)
    signal = jnp.take_along_axis(signal_k, owner[None], axis=0)[0]
    return _top_peaks(snr, signal, gal1, mask1, n_add, snr_threshold, min_distance)


@partial(jax.jit, static_argnames=("spec", "n_add"))
def _asymmetry_peaks_jit(galaxies, mask, images, sky, psf_k, snr_threshold, min_distance,
                         mismatch, *, spec, n_add):
    TRACES["residual"] += 1
    one = partial(_asymmetry_peaks_one, spec=spec, n_add=n_add, snr_threshold=snr_threshold,
                  min_distance=min_distance, mismatch=mismatch)
    return map_blends(one, 4, galaxies, mask, images, sky, psf_k)


def asymmetry_peaks(galaxies: Galaxies, mask, images, psf_k, spec: RenderSpec, sky, *,
                    n_add: int = 1, snr_threshold: float = 5.0, min_distance: float = 2.0,
                    mismatch: float = 0.01, chunk: int | None = None) -> ResidualPeaks:
    """Sources hidden in a fitted galaxy's light: peaks of its antisymmetric residual.

    Galaxies are point-symmetric about their centres (an elliptical profile, a bulge and a
    disk of one centre, convolved with a symmetric PSF), whatever their radial profile. For
    each fitted galaxy k the data less the other galaxies' models, ``D_k``, is reflected
    through k's fitted centre (`mirror`); its antisymmetric part ``(D_k - mirror(D_k)) / 2``
    holds no light of k, even where the model of k is wrong (a bulge + disk fitted with one
    Sersic profile leaves a symmetric residual that `residual_peaks` may take for a source),
    and half the light of a neighbour that no model holds. Bands are summed with weights
    1 / sky and filtered with the PSF (the matched filter of a point source), over the noise
    of the difference (half the Poisson variances of the two points, in quadrature) plus
    ``(mismatch * model_k)^2`` (what the reflection does not cancel: interpolation, a PSF
    that is not quite symmetric, a centre off by a fraction of a pixel). Each pixel is scored
    by the galaxy whose model outshines the others' there; peaks (3 x 3 local maxima) above
    ``snr_threshold`` and at least ``min_distance`` pixels from the fitted galaxies and from
    each other are returned, the most significant first.

    Args:
        galaxies, mask: the fit (`Galaxies`, [blend, slot] bool).
        images, psf_k, spec, sky: as `fit_blends` (one PSF for the batch: [band, Ry, Cx]).
        n_add: peaks per blend.
        snr_threshold, min_distance, mismatch: see above.
        chunk: blends per compiled call (`default_chunk`).

    Returns:
        `ResidualPeaks` (x, y, found): [blend, n_add].
    """
    galaxies, mask, images, sky, psf_k, chunk = _peak_inputs(
        "asymmetry_peaks", galaxies, mask, images, psf_k, spec, sky, chunk)
    dtype, n = images.dtype, images.shape[0]

    def run(g, m, img, s1):
        return _asymmetry_peaks_jit(g, m, img, s1, psf_k, jnp.asarray(snr_threshold, dtype),
                                    jnp.asarray(min_distance, dtype),
                                    jnp.asarray(mismatch, dtype), spec=spec, n_add=int(n_add))

    return ResidualPeaks(*apply_chunked(run, n, chunk, (galaxies, mask, images, sky)))


class SplitCandidates(NamedTuple):
    """What `split_candidates` returns, per blend (numpy): the slot to split (-1: none), and
    the two positions (pixels) that replace it."""

    slot: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    excess: np.ndarray


def split_candidates(galaxies: Galaxies, mask, images, psf_k, spec: RenderSpec, sky, *,
                     min_excess: float = 25.0, radius_hlr: float = 1.5,
                     offset_hlr: float = 0.6) -> SplitCandidates:
    """Which fitted galaxy of each blend may be two: the one whose residual chi-square within
    ``radius_hlr`` half-light radii (2.5 pixels at least) exceeds its number of pixels x bands
    the most, when by more than ``min_excess``, in blends with a free slot. A single profile
    fitted to two merged galaxies leaves such an excess (a dipole or a waist) rather than a
    peak. The two positions are the galaxy's centre -+ ``offset_hlr`` half-light radii (1 to 3
    pixels) along its major axis.

    Args:
        galaxies, mask: the fit (`Galaxies`, [blend, slot] bool).
        images, psf_k, spec, sky: as `fit_blends` (one PSF for the batch, sky [band]).

    Returns:
        `SplitCandidates`.
    """
    mask = np.asarray(mask, bool)
    images = np.asarray(images, float)
    sky = np.asarray(sky, float)
    models = np.asarray(model_images(galaxies, jnp.asarray(mask), psf_k, spec), float)
    total = models.sum(axis=1)
    chi = (images - total) ** 2 / (sky[None, :, None, None] + np.maximum(total, 0.0))
    chi = chi.sum(axis=1)  # [blend, S, S]
    n_band = images.shape[1]
    g = jax.tree.map(np.asarray, galaxies)
    s = spec.stamp_pixels
    yy, xx = np.mgrid[0:s, 0:s]
    hlr_pix = g.hlr / spec.pixel_scale
    radius = np.maximum(2.5, radius_hlr * hlr_pix)  # [blend, slot]
    near = ((xx[None, None] - g.x[..., None, None]) ** 2 + (yy[None, None] - g.y[..., None, None])
            ** 2) < radius[..., None, None] ** 2
    excess = np.einsum("bkyx,byx->bk", near, chi) - n_band * near.sum(axis=(-2, -1))
    excess = np.where(mask, excess, -np.inf)
    best = np.argmax(excess, axis=1)
    n = len(best)
    top = excess[np.arange(n), best]
    ok = (top > min_excess) & (~mask).any(axis=1) & mask.any(axis=1)
    theta = 0.5 * np.arctan2(g.g2, g.g1)[np.arange(n), best]
    d = np.clip(offset_hlr * hlr_pix[np.arange(n), best], 1.0, 3.0)
    cx, cy = g.x[np.arange(n), best], g.y[np.arange(n), best]
    ux, uy = d * np.cos(theta), d * np.sin(theta)
    return SplitCandidates(slot=np.where(ok, best, -1), x1=cx - ux, y1=cy - uy, x2=cx + ux,
                           y2=cy + uy, excess=top)


class MergeCandidates(NamedTuple):
    """What `merge_candidates` returns, per blend (numpy): the slot to remove (-1: none), its
    separation from the galaxy it overlaps, in units of the sum of their half-light radii, and
    that galaxy's slot (``partner``)."""

    slot: np.ndarray
    separation: np.ndarray
    partner: np.ndarray | None = None


def merge_candidates(galaxies: Galaxies, mask, pixel_scale: float, *,
                     max_separation: float = 1.5, exclude=None) -> MergeCandidates:
    """Which fitted galaxy of each blend may be a piece of a neighbour: of the pair of galaxies
    closest in units of the sum of their half-light radii (PSF-free sizes, at least one pixel
    each), when closer than ``max_separation``, the one with less flux summed over bands. An
    over-split detection (a bright galaxy's wing or a residual of its model taken for a source)
    leaves such a pair after the fit; `fit_blends`'s ``merge_sources`` refits without it and
    keeps the fit with fewer galaxies unless -log L rises by more than its parameters.
    ``exclude``: optional [blend, slot, slot] bool, pairs not to propose (tried already)."""
    mask = np.asarray(mask, bool)
    x, y = np.asarray(galaxies.x, float), np.asarray(galaxies.y, float)
    r = np.maximum(np.asarray(galaxies.hlr, float) / pixel_scale, 1.0)
    flux = np.asarray(galaxies.flux, float).sum(axis=-1)
    sep = np.hypot(x[:, :, None] - x[:, None, :], y[:, :, None] - y[:, None, :]) / (
        r[:, :, None] + r[:, None, :])
    pair = mask[:, :, None] & mask[:, None, :] & ~np.eye(mask.shape[1], dtype=bool)[None]
    if exclude is not None:
        exclude = np.asarray(exclude, bool)
        pair &= ~(exclude | np.swapaxes(exclude, 1, 2))
    sep = np.where(pair, sep, np.inf)
    flat = sep.reshape(len(sep), -1).argmin(axis=1)
    i, j = np.unravel_index(flat, sep.shape[1:])
    b = np.arange(len(sep))
    best = sep[b, i, j]
    drop = np.where(flux[b, i] <= flux[b, j], i, j)
    keep = np.where(flux[b, i] <= flux[b, j], j, i)
    found = best < max_separation
    return MergeCandidates(slot=np.where(found, drop, -1).astype(int), separation=best,
                           partner=np.where(found, keep, -1).astype(int))
