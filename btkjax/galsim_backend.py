"""The GalSim reference backend: the renderer's inputs drawn by GalSim, galaxy by galaxy, on CPU.

It takes the same `Sources` and `RenderSpec` as `btkjax.render.render` and the bands' PSFs as
GalSim objects, and draws each galaxy as BTK does: components built, ``.rotate``, ``.shear``,
convolved with the PSF, ``.shift(dx, dy)``, ``drawImage(nx=S, ny=S, scale=p)`` (pixel included).
This is how btkjax proves its images right, and the baseline its benchmarks divide by.
"""

from __future__ import annotations

import galsim
import numpy as np

from btkjax.core.kinds import get_kind
from btkjax.core.render import RenderSpec, Sources

__all__ = [
    "GALSIM_PROFILES", "galsim_galaxy", "render_galsim", "render_cosmos_galsim", "tight_gsparams",
    "with_gsparams",
]


def tight_gsparams() -> galsim.GSParams:
    """GSParams tightened well below GalSim's defaults (folding 5e-3, maxk 1e-3, kvalue 1e-5) for
    converged reference drawings; tighter folding is unaffordable with the Airy's r^-3 tails."""
    return galsim.GSParams(
        folding_threshold=1e-4,
        maxk_threshold=1e-6,
        kvalue_accuracy=1e-9,
        xvalue_accuracy=1e-9,
        maximum_fft_size=32768,
    )


def with_gsparams(obj, gsparams: galsim.GSParams):
    """``obj.withGSParams(gsparams)`` without the values GalSim computed for the old gsparams.

    GalSim's ``withGSParams`` copies the object with ``copy.copy``, which keeps its cached lazy
    properties: a PSF whose ``stepk`` was computed at the default folding_threshold (5e-3, by
    any earlier drawing) keeps that FFT box (~10" for LSST's PSF instead of ~190" at 1e-4),
    and its wings fold back into the reference images (+1e-3 of a star's flux in a 24" stamp).
    Cached values are dropped here, through wrapped objects too.
    """
    out = obj.withGSParams(gsparams)
    _drop_cached(out, set())
    return out


def _drop_cached(obj, seen: set) -> None:
    if id(obj) in seen or not isinstance(obj, galsim.GSObject):
        return
    seen.add(id(obj))
    cls = type(obj)
    for name in list(vars(obj)):
        if isinstance(getattr(cls, name, None), galsim.utilities.lazy_property):
            delattr(obj, name)
    for child in list(getattr(obj, "obj_list", ())) + [getattr(obj, "original", None)]:
        _drop_cached(child, seen)


def _point(flux, hlr, n, gsparams):
    # BTK draws the AGN as a Gaussian of sigma 1e-8 arcsec; GalSim's DeltaFunction is the same
    # profile without the numerical width.
    return galsim.DeltaFunction(flux=flux, gsparams=gsparams)


GALSIM_PROFILES = {
    "exponential": lambda flux, hlr, n, gsparams: galsim.Exponential(
        flux=flux, half_light_radius=hlr, gsparams=gsparams),
    "devaucouleurs": lambda flux, hlr, n, gsparams: galsim.DeVaucouleurs(
        flux=flux, half_light_radius=hlr, gsparams=gsparams),
    "sersic": lambda flux, hlr, n, gsparams: galsim.Sersic(
        n=n, flux=flux, half_light_radius=hlr, gsparams=gsparams),
    "gaussian": lambda flux, hlr, n, gsparams: galsim.Gaussian(
        flux=flux, half_light_radius=hlr, gsparams=gsparams),
    "point": _point,
}
"""The GalSim profile of each component kind of ``btkjax.core.kinds.KINDS`` (same names; a test
checks it): ``GALSIM_PROFILES[kind](flux, hlr, n, gsparams)``."""


def _component(kind: str, flux: float, hlr: float, n: float, gsparams):
    try:
        make = GALSIM_PROFILES[kind]
    except KeyError:
        raise ValueError(f"Unknown component kind {kind!r}; expected one of "
                         f"{tuple(GALSIM_PROFILES)}.") from None
    return make(flux, hlr, n, gsparams)


def galsim_galaxy(sources: Sources, blend: int, slot: int, band: int, kinds, gsparams=None):
    """The GalSim profile (before PSF and shift) of one galaxy in one band, or None if empty."""
    if not bool(sources.mask[blend, slot]):
        return None
    comps = []
    for c, kind in enumerate(kinds):
        flux = float(sources.flux[blend, slot, band, c])
        if flux == 0:
            continue
        prof = _component(
            kind, flux, float(sources.hlr[blend, slot, c]), float(sources.n[blend, slot, c]),
            gsparams,
        )
        if not get_kind(kind).is_point:
            prof = prof.shear(
                q=float(sources.q[blend, slot, c]),
                beta=float(sources.beta[blend, slot, c]) * galsim.radians,
            )
        comps.append(prof)
    if not comps:
        return None
    gal = galsim.Add(comps, gsparams=gsparams) if len(comps) > 1 else comps[0]
    gal = gal.rotate(float(sources.rotation[blend, slot]) * galsim.radians)
    g1, g2 = float(sources.g1[blend, slot]), float(sources.g2[blend, slot])
    if g1 != 0 or g2 != 0:
        gal = gal.shear(g1=g1, g2=g2)
    return gal


def render_galsim(
    sources: Sources,
    psfs,
    spec: RenderSpec,
    isolated: bool = False,
    gsparams: galsim.GSParams | None = None,
    dtype=np.float64,
):
    """Draws the batch with GalSim, one galaxy and band at a time.

    Args:
        sources: `Sources` (numpy or JAX arrays), leading blend axis.
        psfs: one GalSim PSF per band (or, per blend, a list of such lists).
        spec: the `RenderSpec` (stamp size, pixel scale, component kinds).
        isolated: also return each galaxy alone.
        gsparams: GalSim accuracy parameters for the galaxy profiles (default GalSim's).

    Returns:
        (blend_images [blend, band, S, S], isolated [blend, slot, band, S, S] or None), numpy.
    """
    sources = Sources(*[np.asarray(x) for x in sources])
    n_blend, n_slot, n_band, _ = sources.flux.shape
    s = spec.stamp_pixels
    blends = np.zeros((n_blend, n_band, s, s), dtype)
    iso = np.zeros((n_blend, n_slot, n_band, s, s), dtype) if isolated else None
    per_blend_psf = isinstance(psfs[0], (list, tuple))
    for b in range(n_blend):
        band_psfs = psfs[b] if per_blend_psf else psfs
        for j in range(n_band):
            psf = band_psfs[j]
            if gsparams is not None:
                psf = with_gsparams(psf, gsparams)
            for g in range(n_slot):
                gal = galsim_galaxy(sources, b, g, j, spec.kinds, gsparams)
                if gal is None:
                    continue
                conv = galsim.Convolve(gal, psf, gsparams=gsparams)
                conv = conv.shift(float(sources.dx[b, g]), float(sources.dy[b, g]))
                img = conv.drawImage(nx=s, ny=s, scale=spec.pixel_scale, dtype=np.float64)
                blends[b, j] += img.array
                if isolated:
                    iso[b, g, j] = img.array
    return blends, iso


def render_cosmos_galsim(galsim_catalog, blends, fluxes, psfs, spec: RenderSpec, gal_type: str,
                         isolated: bool = False, gsparams=None, dtype=np.float64,
                         source_rows=None):
    """Draws COSMOS blends with GalSim as BTK does.

    ``makeGalaxy(index, gal_type, noise_pad_size=0).withFlux(flux)`` -> ``.rotate`` ->
    ``.shear`` (if nonzero) -> ``Convolve(psf)`` -> ``.shift(dx, dy)`` -> ``drawImage``.

    Args:
        galsim_catalog: the `galsim.COSMOSCatalog`.
        blends: numpy `Blends` (rotation in degrees).
        fluxes: [row, band] electrons.
        psfs: one GalSim PSF per band.
        spec: the render spec (stamp size, pixel scale).
        gal_type: "real" or "parametric".
        gsparams: GalSim accuracy parameters (default GalSim's).
        source_rows: the galaxy (GalSim catalog row) of each row of `fluxes` (default: the same
            row; rows past the catalog's are edited copies of a catalog row).
    """
    index = np.asarray(blends.index)
    mask = np.asarray(blends.mask)
    n_blend, n_slot = index.shape
    n_band = len(psfs)
    s = spec.stamp_pixels
    images = np.zeros((n_blend, n_band, s, s), dtype)
    iso = np.zeros((n_blend, n_slot, n_band, s, s), dtype) if isolated else None
    cache = {}
    psfs = [with_gsparams(p, gsparams) if gsparams is not None else p for p in psfs]
    for b in range(n_blend):
        for g in range(n_slot):
            if not mask[b, g]:
                continue
            row = int(index[b, g])
            source = row if source_rows is None else int(source_rows[row])
            if source not in cache:
                cache[source] = galsim_catalog.makeGalaxy(source, gal_type=gal_type,
                                                          noise_pad_size=0, gsparams=gsparams)
            for j in range(n_band):
                gal = cache[source].withFlux(float(fluxes[row, j]))
                gal = gal.rotate(float(blends.rotation[b, g]) * galsim.degrees)
                g1, g2 = float(blends.g1[b, g]), float(blends.g2[b, g])
                if g1 != 0 or g2 != 0:
                    gal = gal.shear(g1=g1, g2=g2)
                conv = galsim.Convolve(gal, psfs[j], gsparams=gsparams)
                conv = conv.shift(float(blends.dx[b, g]), float(blends.dy[b, g]))
                img = conv.drawImage(nx=s, ny=s, scale=spec.pixel_scale, dtype=np.float64).array
                images[b, j] += img
                if isolated:
                    iso[b, g, j] = img
    return images, iso
