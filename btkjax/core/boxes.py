"""FFT box planning from arrays: how far each galaxy's light reaches, and the box that holds it.

Pure numpy (no GalSim objects): the interface measures the PSFs (`btkjax.optics`), this module
turns galaxy shapes and positions into box sizes.

The rule. A blend is rendered in a periodic box of side L = N p, so the copy of a galaxy at
shift s lands at s +- L: its light at distance >= L - |s| - S p / 2 from its centre falls on
the stamp. L >= reach + S p / 2, with reach = extent + |s| (|s| the larger of |dx|, |dy|),
keeps that light below the threshold, where the extent is where the galaxy's brightness falls
below ``threshold`` of the *dimmest brightness it has inside the PSF core on the stamp* (the
stamp's peak is at least about that):

- the dimmest point of the PSF core (radius c = FWHM / 2) around the galaxy's point nearest the
  stamp (its centre if it is on the stamp, else at distance d) lies, at worst, along the minor
  axis, at elliptical radius (d + c) / q_eff in units of the major axis (q_eff: minor / major
  axis after the component's q and the lensing shear). For flat galaxies narrower than the PSF
  this is what the PSF dilutes the peak to; for galaxies off the stamp it is their wings inside;
- a Sersic component of major-axis half-light radius a is exp(-b (r / a)^(1/n)) (relative),
  so the extent solves exp(-b ((R / a)^(1/n) - (r_ref / a)^(1/n))) = threshold;
- the PSF smooths the tail by about its FWHM: added to the extent.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from btkjax.core.kinds import get_kind
from btkjax.core.tolerances import FOLDING_THRESHOLD

__all__ = [
    "MAX_FFT_SIZE",
    "RowShapes",
    "good_fft_size",
    "fast_sizes_at_least",
    "sersic_extent",
    "row_shapes",
    "galaxy_extents",
    "row_extents",
    "shear_stretch",
    "stamp_distance",
    "box_size",
    "box_sizes",
    "box_ladder",
    "galaxy_reach",
]

MAX_FFT_SIZE = 4096
"""The largest FFT box (pixels per side) the planner hands out, half GalSim's default
``maximum_fft_size``: one galaxy's [component, k] grid at 4096 pixels is ~0.2 GB per array in
float32 (and it holds galaxies up to ~400" from a 0.2" stamp); a blend needing more raises a
ValueError naming it rather than folding its light back in."""

def good_fft_size(n: int) -> int:
    """The smallest even integer >= n whose prime factors are 2, 3 and 5 (fast for XLA's FFT)."""
    m = max(int(n), 2)
    while True:
        if m % 2 == 0:
            r = m
            for p in (2, 3, 5):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


def fast_sizes_at_least(pixels) -> np.ndarray:
    """`good_fft_size` of every element of an integer array, vectorized (a table lookup)."""
    pixels = np.asarray(pixels, dtype=np.int64)
    top = int(pixels.max(initial=2))
    sizes, n = [], 2
    while not sizes or sizes[-1] < top:
        sizes.append(good_fft_size(n))
        n = sizes[-1] + 1
    return np.asarray(sizes)[np.searchsorted(sizes, pixels)]


def sersic_b(n):
    """Sersic b_n: half the light inside the half-light radius (numpy, any shape)."""
    from scipy.special import gammaincinv

    return gammaincinv(2 * np.asarray(n, dtype=float), 0.5)


def sersic_extent(hlr, n, core_radius, threshold: float = FOLDING_THRESHOLD):
    """Radius (arcsec) where a Sersic profile falls to `threshold` of its brightness at
    `core_radius` (both along the same axis): solves
    ``exp(-b ((R / hlr)^(1/n) - (core / hlr)^(1/n))) = threshold``.

    Args:
        hlr: half-light radii (arcsec), any shape.
        n: Sersic indices, broadcastable to `hlr`.
        core_radius: the reference radius (arcsec), broadcastable to `hlr`.
        threshold: the brightness ratio.
    """
    hlr = np.asarray(hlr, dtype=float)
    n = np.broadcast_to(np.asarray(n, dtype=float), hlr.shape)
    b = sersic_b(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = (np.asarray(core_radius, dtype=float) / hlr) ** (1 / n) + math.log(1 / threshold) / b
    return hlr * x**n


class RowShapes(NamedTuple):
    """What the box rule needs of each catalog row's components ([row, comp])."""

    major: np.ndarray  # major-axis half-light radius hlr / sqrt(q) (arcsec); sigma for Gaussians
    q: np.ndarray  # component axis ratio
    n: np.ndarray  # Sersic index (1 for Gaussians and points)
    b: np.ndarray  # Sersic b_n (0.5 for Gaussians: exp(-r^2 / (2 sigma^2)) in units of sigma)
    shaped: np.ndarray  # bool: the component has flux and is not a point


def row_shapes(kinds, hlr, q, n, has_flux) -> RowShapes:
    """`RowShapes` of catalog rows: [row, comp] half-light radii, axis ratios, Sersic indices
    (used by kinds of free index) and which components have flux; each kind's extent rule comes
    from the registry (`btkjax.core.kinds`)."""
    hlr = np.asarray(hlr, dtype=float)
    q = np.broadcast_to(np.asarray(q, dtype=float), hlr.shape)
    n = np.broadcast_to(np.asarray(n, dtype=float), hlr.shape).copy()
    registry = [get_kind(name) for name in kinds]
    shaped = np.asarray(has_flux, bool) & np.array([not k.is_point for k in registry])[None, :]
    major = hlr / np.sqrt(q)
    b = np.full(hlr.shape, 0.5)
    for c, kind in enumerate(registry):
        if kind.extent == "gaussian":
            # exp(-(r / sigma)^2 / 2): a Sersic of n = 1/2, b = 1/2 in units of sigma
            n[:, c] = 0.5
            major[:, c] = major[:, c] / math.sqrt(2 * math.log(2))
        elif kind.extent == "sersic":
            if kind.sersic_index is not None:
                n[:, c] = kind.sersic_index
            b[:, c] = sersic_b(n[:, c])
    return RowShapes(major=major, q=q, n=n, b=b, shaped=shaped)


def shear_stretch(g1, g2) -> np.ndarray:
    """The largest stretch (1 + |g|) / sqrt(1 - |g|^2) of a lensing shear (GalSim's
    area-preserving ``.shear``): the major axis grows by it, the minor axis shrinks by it."""
    g = np.hypot(np.asarray(g1, dtype=float), np.asarray(g2, dtype=float))
    return (1 + g) / np.sqrt(np.clip(1 - g * g, 1e-12, None))


def stamp_distance(dx, dy, stamp_arcsec: float) -> np.ndarray:
    """Distance (arcsec) from a galaxy centre at (dx, dy) to the nearest point of the stamp
    (0 on the stamp)."""
    half = stamp_arcsec / 2
    ex = np.maximum(np.abs(np.asarray(dx, dtype=float)) - half, 0.0)
    ey = np.maximum(np.abs(np.asarray(dy, dtype=float)) - half, 0.0)
    return np.hypot(ex, ey)


def galaxy_extents(shapes: RowShapes, psf_fwhm: float, stretch=1.0, distance=0.0,
                   threshold: float = FOLDING_THRESHOLD) -> np.ndarray:
    """How far (arcsec) each galaxy's light stays above `threshold` of its dimmest brightness
    inside the PSF core on the stamp (module docstring); 0 for galaxies of point sources only
    (the PSF's wings are counted apart, by `btkjax.optics.psf_fold_box`).

    Args:
        shapes: `RowShapes` [..., comp] of the galaxies (rows indexed per galaxy).
        psf_fwhm: the widest PSF FWHM (arcsec).
        stretch: [...] `shear_stretch` of each galaxy's lensing shear.
        distance: [...] `stamp_distance` of each galaxy.
    """
    stretch = np.asarray(stretch, dtype=float)[..., None]
    distance = np.asarray(distance, dtype=float)[..., None]
    major = shapes.major * stretch
    q_eff = shapes.q / stretch**2
    r_ref = (distance + psf_fwhm / 2) / q_eff
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = (r_ref / major) ** (1 / shapes.n) + math.log(1 / threshold) / shapes.b
        ext = major * x**shapes.n + psf_fwhm
    return np.where(shapes.shaped, ext, 0.0).max(axis=-1)


def row_extents(kinds, hlr, q, n, has_flux, psf_fwhm: float, threshold=FOLDING_THRESHOLD):
    """`galaxy_extents` of catalog rows drawn unsheared on the stamp: [row] arcsec."""
    return galaxy_extents(row_shapes(kinds, hlr, q, n, has_flux), psf_fwhm, threshold=threshold)


def box_size(reach_arcsec: float, stamp_pixels: int, pixel_scale: float) -> int:
    """The smallest fast even FFT size whose box keeps light from `reach_arcsec` off the stamp.

    In a periodic box of side L = N p, the copy of light at distance R from the stamp centre
    lands at least L - R - S p / 2 from any stamp pixel, so L >= R + S p / 2.
    """
    return int(box_sizes(np.asarray([reach_arcsec]), stamp_pixels, pixel_scale)[0])


def box_sizes(reach_arcsec, stamp_pixels: int, pixel_scale: float) -> np.ndarray:
    """`box_size` of every reach (arcsec) of an array, vectorized."""
    side = stamp_pixels * pixel_scale
    box = np.maximum(side, np.asarray(reach_arcsec, dtype=float) + side / 2)
    return fast_sizes_at_least(np.ceil(box / pixel_scale - 1e-9).astype(np.int64))


def box_ladder(base: int, largest: int, step: float = 1.25) -> np.ndarray:
    """The box sizes blends are routed to: `base` (fits the PSF's wings), then fast sizes
    growing by ~`step` each, up to at least `largest`. Each size compiles once."""
    ladder = [int(base)]
    while ladder[-1] < largest:
        ladder.append(good_fft_size(max(int(ladder[-1] * step), ladder[-1] + 2)))
    return np.asarray(ladder)


def galaxy_reach(shapes: RowShapes, index, mask, dx, dy, g1, g2, psf_fwhm: float,
                 stamp_arcsec: float, row_extent=None,
                 threshold: float = FOLDING_THRESHOLD) -> np.ndarray:
    """How far (arcsec) from the stamp centre each galaxy of a batch reaches: its extent
    (`galaxy_extents`, at its shear and distance from the stamp) plus its shift, the larger of
    |dx| and |dy|; 0 in empty slots.

    Args:
        shapes: `RowShapes` of the catalog rows ([row, comp]).
        index, mask, dx, dy, g1, g2: [blend, slot] the blends' rows, occupied slots, shifts
            (arcsec) and lensing shears.
        psf_fwhm: the widest PSF FWHM (arcsec).
        stamp_arcsec: the stamp's side.
        row_extent: [row] fixed extents (arcsec) to use instead of the shapes' (real galaxies:
            their image's half diagonal plus a PSF FWHM), stretched by the shear.
    """
    index = np.asarray(index)
    mask = np.asarray(mask, bool)
    dx, dy = np.asarray(dx, dtype=float), np.asarray(dy, dtype=float)
    stretch = shear_stretch(g1, g2)
    if row_extent is not None:
        extent = np.asarray(row_extent)[index] * stretch
    else:
        rows = RowShapes(*[a[index] for a in shapes])
        extent = galaxy_extents(rows, psf_fwhm, stretch, stamp_distance(dx, dy, stamp_arcsec),
                                threshold)
    shift = np.maximum(np.abs(dx), np.abs(dy))
    # The PSF's wings reach the far side of the stamp: L >= S p + 2 |s| keeps every stamp pixel
    # within the box cell around the galaxy, where the PSF k-images (wings folded out, see
    # btkjax.optics.folded_wings_kimage) equal the PSF.
    extent = np.maximum(extent, stamp_arcsec / 2 + shift)
    return np.where(mask, extent + shift, 0.0)
