"""PSFs given as GalSim (or JAX-GalSim) objects, turned into what the renderer takes.

The interface side of rendering: everything here calls GalSim objects on the host (``drawKImage``,
``drawImage``, ``calculateHLR``), once per survey and box size. The kernel (`btkjax.core.render`)
and the array-only box planning (`btkjax.core.boxes`) never see a GalSim object.

- `psf_kimage_from_galsim`: the PSF x pixel transfer function on a `RenderSpec`'s grid, with the
  wings that the periodic box would fold back onto the stamp taken out (`folded_wings_kimage`);
- `maxk_index`: how far in k (however many aliases) the transfer function must be evaluated;
- `psf_fold_box`, `psf_extent`, `psf_wings`: how far the PSF's wings reach in real space;
- `make_render_spec`, `source_reach`: a `RenderSpec` for PSFs and galaxies.
"""

from __future__ import annotations

import math

import galsim
import numpy as np

from btkjax.core.boxes import box_size, galaxy_extents, good_fft_size, row_shapes
from btkjax.core.render import CATSIM_KINDS, RenderSpec
from btkjax.core.tolerances import FOLDING_THRESHOLD, MAXK_THRESHOLD
from btkjax.galsim_backend import tight_gsparams, with_gsparams

__all__ = [
    "psf_kimage_from_galsim",
    "folded_wings_kimage",
    "maxk_index",
    "psf_extent",
    "psf_wings",
    "psf_fold_box",
    "make_render_spec",
    "source_reach",
]

WING_COPIES = 2
"""Periodic copies of the box on each side whose PSF wings `folded_wings_kimage` sums (the
5 x 5 nearest, drawn); the light beyond them is spread uniformly over the box."""


def folded_wings_kimage(psf, spec: RenderSpec) -> np.ndarray:
    """The DFT [N, N] of the PSF x pixel light that the periodic box folds onto itself.

    A renderer with a periodic box of side L = N p draws each source convolved with the
    L-periodic sum of the PSF, sum_m PSF(x + m L): the copies m != 0 (power-law wings of the
    Kolmogorov, r^-11/3, and the Airy, r^-3) add light to every stamp pixel, a few 1e-9 of the
    peak each but ~3e-4 of the flux over an LSST stamp. Their sum W, sampled at the pixel
    centres of the central cell, is drawn here; subtracting its DFT from the transfer function
    at the primary k of each rfft bin leaves the PSF truncated to the central cell of the box,
    which is exact on the stamp for sources within L/2 - S p / 2 of the stamp centre (and the
    galaxy light smooth on the scale of W: only W's lowest k matter).

    Returns:
        complex128 [N, N]: sum_n W_n exp(-2 pi i m.n / N) (W in pixel units, as drawn), in
        numpy FFT order (index m mod N).
    """
    n = spec.fft_size
    copies = WING_COPIES if n <= 512 else 1
    side = (2 * copies + 1) * n + 1  # odd: pixel (side - 1) / 2 is the PSF's centre
    if isinstance(psf, galsim.GSObject):  # wings to ~1e-9 of the peak, not GalSim's default 1e-3
        psf = with_gsparams(psf, tight_gsparams())
    image = np.asarray(psf.drawImage(nx=side, ny=side, scale=spec.pixel_scale).array, float)
    c = (side - 1) // 2
    cell = np.zeros((n, n))
    for my in range(-copies, copies + 1):
        for mx in range(-copies, copies + 1):
            if mx == my == 0:
                continue
            y0, x0 = c - n // 2 + my * n, c - n // 2 + mx * n
            cell += image[y0 : y0 + n, x0 : x0 + n]
    # Light beyond the drawn area (~1e-4 of the flux beyond 2.5 boxes for LSST's Airy) folds in
    # from far away, nearly uniformly over the box.
    cell += (float(psf.flux) - image.sum()) / n**2
    # cell[j] is W at n = j - N/2; ifftshift puts n = 0 first
    return np.fft.fft2(np.fft.ifftshift(cell))


def psf_kimage_from_galsim(psf, spec: RenderSpec, include_pixel: bool = True,
                           fold_wings: bool = True) -> np.ndarray:
    """Evaluates a GalSim (or JAX-GalSim) PSF on the renderer's grid, on the host.

    Args:
        psf: the PSF object.
        spec: the `RenderSpec` whose grid to evaluate on.
        include_pixel: multiply by the square pixel's transfer function.
        fold_wings: (with the pixel) take out the wings the periodic box folds back
            (`folded_wings_kimage`): the stamp then holds the light GalSim draws, to ~1e-6 of the
            flux, instead of ~3e-4 more (LSST).

    Returns:
        complex128 numpy array [Ry, Cx] (PSF transform, times the pixel's if `include_pixel`).
    """
    xi, yi = spec.x_indices, spec.y_indices
    m = int(max(np.abs(xi).max(), np.abs(yi).max()))
    kimage = psf.drawKImage(nx=2 * m + 1, ny=2 * m + 1, scale=spec.dk)
    arr = np.asarray(kimage.array)[np.ix_(yi + m, xi + m)].astype(np.complex128)
    if include_pixel:
        kx, ky = xi * spec.dk, yi * spec.dk
        p = spec.pixel_scale
        arr = arr * np.sinc(ky * p / (2 * np.pi))[:, None] * np.sinc(kx * p / (2 * np.pi))[None, :]
        if fold_wings:
            wings = folded_wings_kimage(psf, spec)
            if np.all(arr.imag == 0):  # a symmetric PSF: W is, up to rounding
                wings = wings.real
            n, half = spec.fft_size, spec.fft_size // 2
            rows = np.flatnonzero((yi > -half) & (yi <= half))  # primary ky of each rfft row
            cols = np.flatnonzero((xi >= 0) & (xi <= half))
            arr[np.ix_(rows, cols)] -= wings[np.ix_(np.mod(yi[rows], n), xi[cols])]
    return arr


def maxk_index(psf, pixel_scale: float, fft_size: int, threshold: float = MAXK_THRESHOLD) -> int:
    """The smallest square of k indices (|kx|, |ky| <= M, in units of 2 pi / (N p)) outside of
    which |PSF x pixel| sums to at most `threshold` of its sum over all k, however many aliases
    (multiples of 2 pi / p) that is.

    Dropping k-values changes a pixel by at most their summed modulus (times dk^2 / (2 pi)^2),
    and the sum of all of them is a centred point source's peak pixel: so the cut costs at most
    `threshold` of that peak. (A pointwise cut at the same threshold drops a wide ring of small
    values when the PSF is undersampled: ~1e-5 of peak at Euclid's 0.1" pixels.) The search
    grid is doubled until its border ring holds less than a thousandth of the allowed sum.
    """
    dk = 2 * math.pi / (fft_size * pixel_scale)
    m = fft_size - 1
    while True:
        kimage = np.asarray(psf.drawKImage(nx=2 * m + 1, ny=2 * m + 1, scale=dk).array)
        k = np.arange(-m, m + 1) * dk
        sinc = np.abs(np.sinc(k * pixel_scale / (2 * np.pi)))
        amp = np.abs(kimage) * sinc[:, None] * sinc[None, :]
        y, x = np.indices(amp.shape) - m
        ring = np.maximum(np.abs(x), np.abs(y)).ravel()
        per_ring = np.bincount(ring, amp.ravel(), minlength=m + 1)
        total = per_ring.sum()
        if per_ring[-1] <= 1e-3 * threshold * total:
            break
        m *= 2
    beyond = total - np.cumsum(per_ring)  # beyond[i]: sum over rings > i
    return int(np.flatnonzero(beyond <= threshold * total)[0])


def psf_extent(psf, pixel_scale: float, threshold: float = FOLDING_THRESHOLD) -> float:
    """Radius (arcsec) beyond which a PSF's image stays below `threshold` of its peak.

    The PSF is drawn (pixel included) on a grid of 2 x 48 FWHM-equivalents (its half-light
    radius times 100), and the largest radius of a pixel above ``threshold * peak`` is returned.
    """
    hlr = float(psf.calculateHLR(scale=pixel_scale / 4, size=256))
    half = int(math.ceil(50 * hlr / pixel_scale))
    image = psf.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=pixel_scale).array
    y, x = np.indices(image.shape) - half
    above = np.abs(image) > threshold * image.max()
    return float(np.hypot(x[above], y[above]).max() * pixel_scale) + pixel_scale


def psf_wings(psfs, pixel_scale: float, threshold: float = FOLDING_THRESHOLD) -> float:
    """Extent (arcsec) of the PSFs' wings: where each falls below `threshold` of its peak."""
    return max(psf_extent(p, pixel_scale, threshold) for p in psfs)


def psf_fold_box(psfs, stamp_pixels: int, pixel_scale: float, max_shift: float,
                 threshold: float = FOLDING_THRESHOLD) -> int:
    """The smallest fast FFT size at which a point source's folded PSF wings stay below
    `threshold` of its peak anywhere in the stamp.

    The folded light at a stamp pixel x is the sum over the periodic copies m != 0 of the PSF
    at x - s + m L (L = N p the box, s the source's shift): computed from the PSF image, for a
    source at the largest shift, summing the 24 nearest copies (power-law wings such as the
    Airy's r^-3 fold in from all directions).
    """
    shift = int(math.ceil(max_shift / pixel_scale))
    s = stamp_pixels
    n = s
    while True:
        n = good_fft_size(n)
        worst = 0.0
        for psf in psfs:
            half = 2 * n + s
            image = psf.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=pixel_scale).array
            peak = image.max()
            folded = np.zeros((s, s))
            # stamp pixel j sits at j - (S - 1) / 2 from the center; the source at +shift
            lo = half - (s - 1) // 2 - shift
            for my in range(-2, 3):
                for mx in range(-2, 3):
                    if mx == my == 0:
                        continue
                    y0, x0 = lo + my * n, lo + mx * n
                    if y0 < 0 or x0 < 0 or y0 + s > image.shape[0] or x0 + s > image.shape[1]:
                        continue
                    folded += image[y0 : y0 + s, x0 : x0 + s]
            worst = max(worst, float(np.abs(folded).max() / peak))
        if worst <= threshold:
            return n
        n += 2


def make_render_spec(
    stamp_pixels: int,
    pixel_scale: float,
    psfs,
    kinds=CATSIM_KINDS,
    fft_size: int | None = None,
    reach_arcsec: float | None = None,
    maxk_threshold: float = MAXK_THRESHOLD,
) -> RenderSpec:
    """Chooses the FFT size and aliasing range for a survey's PSFs and its galaxies' extent.

    Args:
        stamp_pixels: side of the stamp in pixels.
        pixel_scale: arcsec per pixel.
        psfs: the PSF objects (GalSim or JAX-GalSim) of every band, to find how far in k the
            PSF x pixel transfer function must be evaluated (`maxk_index`).
        kinds: component kinds of the sources.
        fft_size: force the FFT box size (even, >= stamp_pixels).
        reach_arcsec: how far from the stamp centre galaxy light stays above FOLDING_THRESHOLD
            (`source_reach` computes it). In a periodic box of side L the copy of a galaxy lands
            at least L - S p / 2 - |shift| from any stamp pixel, so L >= reach + S p / 2 keeps
            folded light below the threshold (`btkjax.core.boxes.box_size`). Default: the
            stamp's side (a box of 1.5 stamp sides).
        maxk_threshold: the k-space cut (`maxk_index`).
    """
    if fft_size is None:
        reach = stamp_pixels * pixel_scale if reach_arcsec is None else float(reach_arcsec)
        fft_size = box_size(reach, stamp_pixels, pixel_scale)
    half = fft_size // 2
    m = max(maxk_index(p, pixel_scale, fft_size, maxk_threshold) for p in psfs)
    return RenderSpec(
        stamp_pixels=int(stamp_pixels),
        fft_size=int(fft_size),
        pixel_scale=float(pixel_scale),
        kinds=tuple(kinds),
        n_alias_x=int(m) if m > half else 0,
        n_alias_y=int(max(m, half)),
    )


def source_reach(
    kinds,
    hlr,
    n,
    max_shift: float,
    psf_fwhm: float,
    q=None,
    max_shear: float = 0.0,
    psfs=(),
    pixel_scale: float | None = None,
    has_flux=None,
    threshold: float = FOLDING_THRESHOLD,
    stamp_size: float | None = None,
) -> float:
    """How far (arcsec) from the stamp centre light of these galaxies stays above `threshold`.

    The largest `btkjax.core.boxes.galaxy_extents` (flattened and stretched by a lensing shear
    of up to `max_shear`; referred to the galaxy's wings on the stamp when it may sit off it)
    or the PSFs' wings (`psf_wings`; 20 FWHMs when no PSF object is given), plus the largest
    shift.

    Args:
        kinds: the component kinds.
        hlr: [row, comp] half-light radii of every catalog row that may be drawn.
        n: [row, comp] Sersic indices (used for "sersic" components).
        max_shift: largest |dx|, |dy| (arcsec).
        psf_fwhm: the widest PSF FWHM (arcsec).
        q: [row, comp] axis ratios (default 1).
        max_shear: largest lensing |g|, stretching by (1 + |g|) / sqrt(1 - |g|^2).
        psfs: PSF objects (GalSim) whose wings to measure, with `pixel_scale`.
        pixel_scale: arcsec per pixel, for `psf_wings`.
        has_flux: [row, comp] components that have flux (default all).
        stamp_size: the stamp's side (arcsec): galaxies shifted beyond its half are referred
            to their light on the stamp (default: every galaxy on the stamp).
    """
    hlr = np.asarray(hlr, dtype=float)
    q = np.ones_like(hlr) if q is None else q
    has_flux = np.ones(hlr.shape, bool) if has_flux is None else has_flux
    stretch = (1 + max_shear) / math.sqrt(1 - max_shear**2)
    off = 0.0 if stamp_size is None else max(0.0, max_shift - stamp_size / 2) * math.sqrt(2)
    shapes = row_shapes(kinds, hlr, q, n, has_flux)
    extent = galaxy_extents(shapes, psf_fwhm, stretch, off, threshold).max()
    # Power-law wings (Kolmogorov r^-11/3, Airy r^-3) fold in from all eight neighbouring
    # copies of the box: their extent is taken at a tenth of the threshold (`psf_fold_box`
    # computes the folded sum itself, for a tighter box).
    wings = psf_wings(psfs, pixel_scale, threshold / 10) if len(psfs) else 20.0 * psf_fwhm
    return max(extent, wings) + max_shift
