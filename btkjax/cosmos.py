"""COSMOS galaxies: GalSim's COSMOS catalog format, parametric fits and real HST images.

`CosmosCatalog` reads the two files of GalSim's COSMOS format (the real-galaxy catalog, with the
image and PSF file names, and its ``_fits`` companion with the parametric fits) and keeps a
`galsim.COSMOSCatalog` for the GalSim backend. `CosmosGenerator` draws its galaxies as BTK's
``CosmosGenerator`` does, ``gal_type="parametric"`` or ``"real"``, on the JAX path or with GalSim.

Parametric galaxies
    Exactly GalSim's ``COSMOSCatalog.makeGalaxy(gal_type="parametric")`` (``_buildParametric``,
    non-chromatic): when ``use_bulgefit`` a de Vaucouleurs bulge (``hlr[1]``, ``flux[1]``,
    ``q = bulgefit[11]``, ``beta = bulgefit[15]``) plus an exponential disk (``hlr[2]``,
    ``flux[2]``, ``q = bulgefit[3]``, ``beta = bulgefit[7]``); otherwise a Sersic profile with
    ``n = sersicfit[2]`` clipped to [0.3, 6] and rounded to the nearest 0.05 (GalSim's default
    ``sersic_prec``), ``hlr[0]``, ``q = sersicfit[3]``, ``beta = sersicfit[7]``. The ``hlr``
    column is already in arcsec (the 0.03" pixel values of the raw ``sersicfit`` / ``bulgefit``
    radii converted by GalSim's catalog makers); angles are radians; a shear is applied only
    where ``q < 1``. ``.withFlux(flux)`` with ``flux`` galcheat's ``mag2counts`` of the band's
    magnitude keeps the components' flux ratio. They become renderer `Sources` with kinds
    ("sersic", "devaucouleurs", "exponential") and go through `btkjax.render.render`.

Real galaxies
    GalSim's ``RealGalaxy`` is ``Convolve(InterpolatedImage(HST image), Deconvolve(
    InterpolatedImage(HST PSF, flux=1)))`` with quintic x-interpolants; its transform is
    ``G(k) u(k) / (P(k) u(k))`` with ``G``, ``P`` the pixel sums of the images (pixel centers
    about each image's true center) and ``u`` the quintic's transform; where
    ``|P(k) u(k)| < kvalue_accuracy`` (1e-5) the inverse is replaced by ``1 / kvalue_accuracy``,
    and ``Deconvolve`` sets the transform to zero beyond the HST PSF's ``maxk`` (its band limit,
    ~105 rad/arcsec for ACS's 0.03" pixels). btkjax computes, once per catalog row on the host,
    exactly this ratio (exact pixel-sum DFTs, no zero padding, normalized so that the value at
    k = 0 is 1) on a regular k-grid of spacing ``2 pi / (pad_factor L)`` (L the largest image
    side of the catalog in arcsec, ``pad_factor`` 4 as GalSim's), over ``|k| <= K`` where K is
    the largest wavenumber the generator's surveys can ask for (the renderer's k-grid corner,
    times the stretch of a |g| = 0.3 shear when shears are applied) or the HST PSF's maxk if
    smaller. Only the half plane kx >= 0 is stored (the images are real, so
    ``F(-k) = conj(F(k))``). On the device each galaxy's transform is interpolated at the
    transformed points ``A^T k`` (A = shear x rotation) with GalSim's quintic kernel in k (6 x 6
    taps), set to zero beyond min(HST PSF maxk, K), scaled by the band flux, shifted (phase),
    multiplied by the survey's PSF x pixel, folded and inverse FFT'd as `btkjax.render` does.

    Where btkjax differs from GalSim: GalSim evaluates each InterpolatedImage by quintic
    k-interpolation of the zero-padded image's FFT (pad_factor 4 of that image) and divides;
    btkjax interpolates the ratio, tabulated exactly, on a grid set by the largest image of the
    catalog (so small images are oversampled more). Both are approximations of the same exact
    transform; measured against the exact DFT ratio the table is within ~1e-4 of F(0) for the
    largest (190 pixel) stamp of the example catalog and ~4e-7 for a typical one; the images
    agree with GalSim's within `REAL_GALAXY_RTOL_PEAK` of the peak (tests/test_cosmos.py).
    Beyond K the table holds nothing: the survey's PSF x pixel is below 1e-7 there
    (`MAXK_THRESHOLD`), unless a shear stretches k by more than sqrt(2) x (1.36 with shears).

Noise of real galaxies
    The HST images carry HST noise. As BTK (``noise_pad_size=0``) btkjax neither pads the
    stamps with noise nor whitens: the original noise, deconvolved by the HST PSF and
    reconvolved by the survey PSF, stays in the images (correlated, far below the survey's sky
    noise for LSST/HSC depths), and the survey noise is then added as for any generator.

Limitations
    The per-row tables live in device memory: rows x (2 K / dk) x (K / dk) complex values (about
    0.5 MB per row in float64 for LSST with the example catalog), fine for thousands of rows,
    not for the full 87k-galaxy COSMOS sample at once (subset the catalog). The HST PSF maxk is
    computed with GalSim's default GSParams.
"""

from __future__ import annotations

import math
import os
import warnings
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import galsim
import jax
import jax.numpy as jnp
import numpy as np
from astropy.io import fits
from astropy.table import Table, hstack

from btkjax.catalog import Catalog, CatalogError
from btkjax.draw_blends import DrawBlendsGenerator
from btkjax.galaxies import CatalogArrays
from btkjax.noise import add_noise
from btkjax.render import (
    RenderSpec,
    _assemble,
    _grid_blocks,
    _split_psf,
    _to_stamp,
    shift_phases,
)

__all__ = [
    "COSMOS_PIXEL_SCALE",
    "COSMOS_KINDS",
    "EXCLUSION_LEVELS",
    "CosmosCatalog",
    "CosmosGenerator",
    "cosmos_parametric_arrays",
    "RealTableSpec",
    "RealTables",
    "RealSources",
    "real_galaxy_tables",
    "make_real_sources",
    "render_real",
    "render_cosmos_galsim",
    "quintic_kernel",
]

COSMOS_PIXEL_SCALE = 0.03
"""arcsec per pixel of the COSMOS HST/ACS lensing reduction (the images' PIXEL_SCALE; the fit
radii and SExtractor's ``flux_radius`` are in these pixels: for the 23.5 example catalog
``flux_radius * 0.03`` is within ~10% of the Sersic fit's ``hlr`` in arcsec)."""

COSMOS_KINDS = ("sersic", "devaucouleurs", "exponential")
"""Components of a parametric COSMOS galaxy: single Sersic, or bulge + disk."""

EXCLUSION_LEVELS = ("none", "bad_stamp", "bad_fits", "marginal")

FIT_COLUMNS = ("sersicfit", "bulgefit", "use_bulgefit", "hlr", "flux")

_KVALUE_ACCURACY = galsim.GSParams().kvalue_accuracy  # GalSim's Deconvolve threshold (1e-5)
_SHEAR_MARGIN = 0.3  # |g| whose stretch the real-galaxy tables cover when shears are applied


# ----------------------------------------------------------------------------------------------
# Catalog
# ----------------------------------------------------------------------------------------------


class _GalSimCOSMOSCatalog(galsim.COSMOSCatalog):
    """A `galsim.COSMOSCatalog` built from already-read tables (any file names, any exclusion).

    GalSim's constructor derives the fits file's name from the real catalog's and raises when an
    exclusion level needs a file or column that is absent; btkjax selects rows itself
    (`_exclusion_mask`) and hands GalSim the result. ``makeGalaxy`` works unchanged.
    """

    def __init__(self, real_file, param_cat, orig_index):  # noqa: D107 - see class doc
        self.use_real = True
        self.preload = False
        self.cut_ratio, self.sn_limit, self.min_mask_dist = 0.8, 10.0, 11
        self.orig_exptime = self.orig_area = 1.0
        self.exptime = self.area = None
        self._bandpass = self._sed = None
        self.full_file_name = os.fspath(real_file)
        self.use_sample = None
        self.param_cat = param_cat
        self.orig_index = np.asarray(orig_index, dtype=int)
        self.nobjects = len(self.orig_index)


def _selection_file(real_file: str) -> str:
    return real_file.replace(".fits", "_selection.fits")


def _exclusion_mask(coord: Table, fit: Table, real_file: str, level: str) -> np.ndarray:
    """GalSim's ``_apply_exclusion`` rows, or all rows (with a warning) when inputs are missing."""
    n = len(coord)
    mask = np.ones(n, dtype=bool)
    if level == "none":
        return mask
    missing = []
    selection = None
    if level in ("bad_stamp", "marginal"):
        path = _selection_file(real_file)
        if os.path.exists(path):
            selection = Table.read(path)
            if len(selection) != n:
                missing.append(f"a selection file with {n} rows ({path} has {len(selection)})")
        else:
            missing.append(f"the selection file {path}")
    need = []
    if level in ("bad_fits", "marginal"):
        need += ["fit_status"]
    if level == "marginal":
        need += ["hlr", "sersicfit"]
    missing += [f"column '{c}'" for c in need if c not in fit.colnames]
    if missing:
        warnings.warn(
            f"exclusion_level={level!r} needs {', '.join(missing)}, which this COSMOS catalog "
            "lacks: no exclusion is applied (as exclusion_level='none').",
            stacklevel=3,
        )
        return mask
    if selection is not None:
        div = np.asarray(selection["peak_image_pixel_count"], dtype=float).copy()
        div[div == 0.0] = 1e-5
        mask &= (np.asarray(selection["sn_ellip_gauss"]) >= 10.0) & (
            (np.asarray(selection["min_mask_dist_pixels"]) > 11)
            | (np.asarray(selection["average_mask_adjacent_pixel_count"]) / div < 0.8)
        )
        if "stamp_flux" in coord.colnames:
            mask &= np.asarray(coord["stamp_flux"]) > 0
    if level in ("bad_fits", "marginal"):
        status = np.asarray(fit["fit_status"])
        sersic_ok = (status[:, 4] > 0) & (status[:, 4] < 5)
        bulge_ok = (status[:, 0] > 0) & (status[:, 0] < 5)
        mask &= sersic_ok | bulge_ok
        if level == "marginal":
            mask &= sersic_ok & bulge_ok
            hlr = np.asarray(fit["hlr"])[:, 0]
            nser = np.asarray(fit["sersicfit"])[:, 2]
            mask &= (nser < 5) | (hlr < 1.0)
            mask &= np.abs(np.asarray(selection["dmag"])) < 0.8
    return mask


class CosmosCatalog(Catalog):
    """A COSMOS catalog in GalSim's format (real-galaxy catalog + parametric fits).

    The standardized ``table`` has the columns of both files (the fits file's duplicate
    ``IDENT`` dropped) and:

    - ``ra``, ``dec``: renamed from ``RA``, ``DEC`` (sampling functions overwrite them with
      offsets in arcsec from the stamp center);
    - ``btk_index``: the row in this (excluded) table, which is also the index GalSim's
      ``makeGalaxy`` takes;
    - ``ref_mag``: ``MAG``, the F814W AB magnitude;
    - ``flux_radius``: SExtractor's FLUX_RADIUS (radius enclosing half the flux) in COSMOS ACS
      pixels of 0.03", as in the COSMOS readme; ``btk_size = flux_radius * 0.03``: a half-light
      radius in arcsec.

    Per-band magnitudes come from ``{survey}_{filter}`` columns (e.g. ``HSC_i``) in either file;
    a generator uses ``MAG`` for every band lacking one, warning once per catalog and survey.

    Args:
        raw_catalog: the merged table (as `from_file` builds it).
        galsim_catalog: the `galsim.COSMOSCatalog` of the same rows (needed to draw).
    """

    def __init__(self, raw_catalog: Table, galsim_catalog: galsim.COSMOSCatalog | None = None):
        super().__init__(raw_catalog)
        self.galsim_catalog = galsim_catalog
        self.real_file = getattr(galsim_catalog, "full_file_name", None)
        self._warned_surveys: set[str] = set()

    @classmethod
    def from_file(cls, catalog_files, exclusion_level: str = "marginal") -> CosmosCatalog:
        """Reads the two COSMOS files and applies GalSim's exclusion cuts.

        Args:
            catalog_files: ``[catalog_file, fits_file]``: the real-galaxy catalog (image and PSF
                file names, noise) and the parametric-fit catalog. A single path means the
                real-galaxy catalog with its fits file named as GalSim expects (``_fits.fits``).
            exclusion_level: "none", "bad_stamp", "bad_fits" or "marginal" (GalSim's meaning).
                Levels that need a file (``<catalog>_selection.fits``) or columns
                (``fit_status``, ``hlr``, ``sersicfit``) that the catalog lacks fall back to no
                exclusion, with a warning.
        """
        if isinstance(catalog_files, (str, os.PathLike)):
            real_file = os.fspath(catalog_files)
            files = [real_file, real_file.replace(".fits", "_fits.fits")]
        else:
            files = [os.fspath(f) for f in catalog_files]
        if len(files) != 2:
            raise ValueError(
                f"CosmosCatalog.from_file needs [catalog_file, fits_file], got {catalog_files!r}."
            )
        for f in files:
            if not os.path.exists(f):
                raise FileNotFoundError(f"COSMOS catalog file {f!r} does not exist.")
        if exclusion_level not in EXCLUSION_LEVELS:
            raise ValueError(
                f"exclusion_level must be one of {EXCLUSION_LEVELS}, got {exclusion_level!r}."
            )
        real_file, fit_file = files
        coord = Table.read(real_file)
        fit = Table.read(fit_file)
        if len(coord) != len(fit):
            raise CatalogError(
                f"The COSMOS catalog {real_file} has {len(coord)} rows but its fits file "
                f"{fit_file} has {len(fit)}: they must describe the same galaxies, row by row."
            )
        if "IDENT" in coord.colnames and "IDENT" in fit.colnames:
            bad = np.flatnonzero(np.asarray(coord["IDENT"]) != np.asarray(fit["IDENT"]))
            if len(bad):
                raise CatalogError(
                    f"IDENT differs between {real_file} and {fit_file} at rows "
                    f"{bad[:10].tolist()}: the files must list the same galaxies in order."
                )
        mask = _exclusion_mask(coord, fit, real_file, exclusion_level)
        rows = np.flatnonzero(mask)
        with fits.open(fit_file) as hdus:
            param_cat = np.array(hdus[1].data, copy=True)
        galsim_catalog = _GalSimCOSMOSCatalog(real_file, param_cat, rows)
        fit = fit[[c for c in fit.colnames if c not in coord.colnames]]
        raw = hstack([coord[rows], fit[rows]], metadata_conflicts="silent")
        return cls(raw, galsim_catalog)

    def _prepare_table(self, raw_catalog: Table) -> Table:
        missing = [c for c in ("RA", "DEC", "MAG", "flux_radius") if c not in raw_catalog.colnames]
        if missing:
            raise CatalogError(
                f"COSMOS catalog is missing column(s) {missing}: the real-galaxy catalog needs "
                "RA, DEC, MAG (GalSim's format) and the fits catalog at least flux_radius."
            )
        if len(raw_catalog) == 0:
            raise CatalogError("COSMOS catalog is empty (after exclusion): no rows to sample.")
        bad = np.flatnonzero(~np.isfinite(np.asarray(raw_catalog["MAG"], dtype=float)))
        if len(bad):
            raise CatalogError(f"non-finite MAG at rows {bad[:10].tolist()}.")
        table = deepcopy(raw_catalog)
        table.rename_column("RA", "ra")
        table.rename_column("DEC", "dec")
        table["btk_index"] = np.arange(len(table))
        table["ref_mag"] = np.asarray(table["MAG"], dtype=float)
        table["btk_size"] = np.asarray(table["flux_radius"], dtype=float) * COSMOS_PIXEL_SCALE
        return table

    def get_galsim_catalog(self) -> galsim.COSMOSCatalog:
        """The `galsim.COSMOSCatalog` of the same rows (``makeGalaxy(btk_index, ...)``)."""
        if self.galsim_catalog is None:
            raise ValueError(
                "This CosmosCatalog was built from a table alone; use CosmosCatalog.from_file to "
                "get the galsim.COSMOSCatalog needed to draw its galaxies."
            )
        return self.galsim_catalog

    def band_magnitude_columns(self, survey) -> dict:
        """{band: column} for a survey: ``{survey}_{band}`` where present, else ``ref_mag``."""
        return {
            b: (f"{survey.name}_{b}" if f"{survey.name}_{b}" in self.table.colnames else "ref_mag")
            for b in survey.available_filters
        }


# ----------------------------------------------------------------------------------------------
# Parametric galaxies
# ----------------------------------------------------------------------------------------------


def _round_sersic(n, prec=0.05):
    return np.floor(np.asarray(n) / prec + 0.5) * prec


def cosmos_parametric_arrays(table) -> CatalogArrays:
    """The COSMOS fits as renderer components [row, (sersic, devaucouleurs, exponential)].

    Follows GalSim's ``COSMOSCatalog._buildParametric`` (see the module docstring).
    """
    missing = [c for c in FIT_COLUMNS if c not in table.colnames]
    if missing:
        raise CatalogError(
            f"Parametric COSMOS galaxies need the fit columns {list(FIT_COLUMNS)}; this catalog "
            f"lacks {missing} (use gal_type='real', or a catalog with parametric fits)."
        )
    s = np.asarray(table["sersicfit"], dtype=float)
    b = np.asarray(table["bulgefit"], dtype=float)
    hlr = np.asarray(table["hlr"], dtype=float)
    flux = np.asarray(table["flux"], dtype=float)
    use_bulge = np.asarray(table["use_bulgefit"]).astype(bool)
    nrow = len(table)
    bulge_flux, disk_flux = flux[:, 1], flux[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        bfrac = bulge_flux / (bulge_flux + disk_flux)
    bad = np.flatnonzero(use_bulge & ~((bfrac >= 0) & (bfrac <= 1)))
    if len(bad):
        raise CatalogError(f"bulge-to-total flux ratio outside [0, 1] at rows {bad[:10].tolist()}.")
    ones = np.ones(nrow)
    frac = np.where(use_bulge[:, None], np.stack([0 * ones, bfrac, 1 - np.nan_to_num(bfrac)], 1),
                    np.stack([ones, 0 * ones, 0 * ones], 1))
    n_ser = _round_sersic(np.clip(s[:, 2], 0.3, 6.0))

    def q_of(q):  # GalSim shears only where q < 1
        return np.where(q < 1, q, 1.0)

    hlr_arr = np.stack([np.where(use_bulge, 1.0, hlr[:, 0]), np.where(use_bulge, hlr[:, 1], 1.0),
                        np.where(use_bulge, hlr[:, 2], 1.0)], 1)
    q_arr = np.stack([np.where(use_bulge, 1.0, q_of(s[:, 3])), np.where(use_bulge, q_of(b[:, 11]), 1.0),
                      np.where(use_bulge, q_of(b[:, 3]), 1.0)], 1)
    beta = np.stack([s[:, 7], b[:, 15], b[:, 7]], 1)
    n_arr = np.stack([np.where(use_bulge, 1.0, n_ser), 4 * ones, ones], 1)
    # components without flux get neutral shapes (the renderer ignores them)
    hlr_arr = np.where(frac > 0, hlr_arr, 1.0)
    bad = np.flatnonzero(((frac > 0) & ~(hlr_arr > 0)).any(axis=1))
    if len(bad):
        raise CatalogError(f"non-positive fit half-light radius at rows {bad[:10].tolist()}.")
    return CatalogArrays(frac=frac, hlr=hlr_arr, q=q_arr, beta=beta, n=n_arr)


# ----------------------------------------------------------------------------------------------
# Real galaxies: k-space tables
# ----------------------------------------------------------------------------------------------


def quintic_kernel(x):
    """GalSim's Quintic interpolant in real space (support [-3, 3]), JAX or numpy input."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.abs(x)
    r1 = 1 + x**3 * (-95 / 12 + x * (23 / 2 + x * (-55 / 12)))
    r2 = (x - 1) * (x - 2) * (-23 / 4 + x * (29 / 2 + x * (-83 / 8 + x * (55 / 24))))
    r3 = (x - 2) * (x - 3) ** 2 * (-9 / 4 + x * (25 / 12 + x * (-11 / 24)))
    return xp.where(x <= 1, r1, xp.where(x <= 2, r2, xp.where(x <= 3, r3, 0.0)))


def _quintic_uval_np(u):
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


def _dft_matrix(n, scale, k):
    pos = (np.arange(n) - 0.5 * (n - 1)) * scale
    return np.exp(-1j * k[:, None] * pos[None, :])


def real_galaxy_tables(galsim_catalog, kmax: float, pad_factor: float = 4.0, rows=None):
    """Tabulates GalSim's RealGalaxy transform (image / HST PSF) per catalog row, on the host.

    Args:
        galsim_catalog: a `galsim.COSMOSCatalog` with real images (``getRealParams``).
        kmax: the largest |k| (rad/arcsec) that will be asked for.
        pad_factor: the grid spacing is ``2 pi / (pad_factor L)``, L the largest image side.
        rows: catalog indices (default all).

    Returns:
        (`RealTableSpec`, values [row, Ty, Tx] complex128 numpy, maxk [row] numpy).
    """
    rows = np.arange(galsim_catalog.getNObjects()) if rows is None else np.asarray(rows)
    params = []
    for i in rows:
        gal, psf, _, scale, _ = galsim_catalog.getRealParams(int(i))
        params.append((np.asarray(gal.array, dtype=float), np.asarray(psf.array, dtype=float),
                       float(gal.scale if gal.scale else scale), float(psf.scale or scale)))
    side = max(max(g.shape) * s for g, _, s, _ in params)
    dk = 2 * math.pi / (pad_factor * side)
    psf_maxk = np.array([
        galsim.InterpolatedImage(galsim.Image(p, scale=ps), flux=1.0).maxk
        for _, p, _, ps in params
    ])
    kmax = float(min(kmax, psf_maxk.max()))
    m = int(math.ceil(kmax / dk))
    n_neg, n_half = 3, m + 3
    spec = RealTableSpec(dk=dk, n_neg_x=n_neg, n_half_y=n_half, n_x=n_neg + m + 4, kmax=kmax)
    kx = (np.arange(spec.n_x) - n_neg) * dk
    ky = (np.arange(2 * n_half + 1) - n_half) * dk
    values = np.empty((len(rows),) + spec.shape, np.complex128)
    bad = []
    for r, (g, p, gs, ps) in enumerate(params):
        gk = _dft_matrix(g.shape[0], gs, ky) @ g @ _dft_matrix(g.shape[1], gs, kx).T
        pk = _dft_matrix(p.shape[0], ps, ky) @ p @ _dft_matrix(p.shape[1], ps, kx).T
        g0, p0 = g.sum(), p.sum()
        if not g0 > 0:
            bad.append(int(rows[r]))
            g0 = 1.0
        ug = _quintic_uval_np(ky * gs / (2 * np.pi))[:, None] * _quintic_uval_np(
            kx * gs / (2 * np.pi))[None, :]
        up = _quintic_uval_np(ky * ps / (2 * np.pi))[:, None] * _quintic_uval_np(
            kx * ps / (2 * np.pi))[None, :]
        orig_psf = pk * up / p0
        small = np.abs(orig_psf) < _KVALUE_ACCURACY
        inv = np.where(small, 1.0 / _KVALUE_ACCURACY, 1.0 / np.where(small, 1.0, orig_psf))
        values[r] = gk * ug / g0 * inv
    if bad:
        raise CatalogError(
            f"COSMOS rows {bad[:10]} have images whose pixels sum to <= 0: their flux cannot be "
            "set (GalSim's 'bad_stamp' exclusion removes such rows)."
        )
    return spec, values, psf_maxk


# ----------------------------------------------------------------------------------------------
# Real galaxies: rendering
# ----------------------------------------------------------------------------------------------


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
    from btkjax.render import _rotation_matrix, _shear_matrix

    a = _shear_matrix(src.g1, src.g2) @ _rotation_matrix(src.rotation)  # [slot, 2, 2]
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

    blocks = _grid_blocks(spec)

    def one(src, psf):
        psf_blocks = _split_psf(psf, spec)

        def block_values(b):  # the k-grid block by block, as `btkjax.render` does
            yp, xp = blocks[b][:2]
            kx = jnp.asarray(spec.x_indices[xp] * spec.dk, src.flux.dtype)
            ky = jnp.asarray(spec.y_indices[yp] * spec.dk, src.flux.dtype)
            gal_k = _real_kvalues(src, tables, tspec, spec, kx, ky)
            z = gal_k * psf_blocks[b][None] if isolated else gal_k.sum(axis=0) * psf_blocks[b]
            return z.real, z.imag

        images = _to_stamp(_assemble(block_values, spec), spec)
        if not isolated:
            return images, None
        iso = jnp.where(src.mask[:, None, None, None], images, 0.0)
        return iso.sum(axis=0), iso  # the blend: the sum of its galaxies (FFT linearity)

    if psf_k.ndim == 4:
        return jax.lax.map(lambda args: one(*args), (sources, psf_k), batch_size=chunk)
    return jax.lax.map(lambda src: one(src, psf_k), sources, batch_size=chunk)


@partial(jax.jit, static_argnames=("tspec", "spec", "mode", "isolated", "chunk"))
def _real_pipeline(blends, blend_ids, tables, fluxes, psf_k, sky, noise_key, tspec, spec, mode,
                   isolated, chunk):
    sources = make_real_sources(blends, fluxes)
    images, iso = render_real(sources, tables, psf_k, tspec, spec, isolated=isolated, chunk=chunk)
    return add_noise(noise_key, blend_ids, images, sky, mode), iso


# ----------------------------------------------------------------------------------------------
# GalSim backend
# ----------------------------------------------------------------------------------------------


def render_cosmos_galsim(galsim_catalog, blends, fluxes, psfs, spec: RenderSpec, gal_type: str,
                         isolated: bool = False, gsparams=None, dtype=np.float64):
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
    """
    index = np.asarray(blends.index)
    mask = np.asarray(blends.mask)
    n_blend, n_slot = index.shape
    n_band = len(psfs)
    s = spec.stamp_pixels
    images = np.zeros((n_blend, n_band, s, s), dtype)
    iso = np.zeros((n_blend, n_slot, n_band, s, s), dtype) if isolated else None
    cache = {}
    psfs = [p.withGSParams(gsparams) if gsparams is not None else p for p in psfs]
    for b in range(n_blend):
        for g in range(n_slot):
            if not mask[b, g]:
                continue
            row = int(index[b, g])
            if row not in cache:
                cache[row] = galsim_catalog.makeGalaxy(row, gal_type=gal_type, noise_pad_size=0,
                                                       gsparams=gsparams)
            for j in range(n_band):
                gal = cache[row].withFlux(float(fluxes[row, j]))
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


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


def _base_spec(state) -> RenderSpec:
    """The survey's base render spec (the smallest box of its FFT-size ladder)."""
    spec = state.spec
    return spec(state.ladder[0]) if callable(spec) else spec


class _BandColumns(str):
    """A magnitude-column 'format string' that maps each band to its own column."""

    def __new__(cls, mapping: dict):
        obj = super().__new__(cls, "{survey}_{band}")
        obj.mapping = dict(mapping)
        return obj

    def format(self, *args, band=None, **kwargs):  # noqa: A003 - mimics str.format
        return self.mapping[band]


class CosmosGenerator(DrawBlendsGenerator):
    """Draws COSMOS galaxies, parametric fits or real HST images, as BTK's CosmosGenerator.

    Args:
        catalog: a `CosmosCatalog` (from `CosmosCatalog.from_file`).
        sampling_function, surveys, batch_size, stamp_size, cpus, verbose, add_noise, seed,
            save_path, backend, isolated, apply_shear, augment_data, channels_last, use_bar,
            dtype, chunk: as `btkjax.draw_blends.DrawBlendsGenerator`.
        gal_type: "real" (default, BTK's) or "parametric".
        galsim_gsparams: GSParams of the GalSim backend (default GalSim's).
        real_pad_factor: oversampling of the real-galaxy k-tables (see the module docstring).

    Fluxes: galcheat's ``mag2counts`` of the ``{survey}_{band}`` column where the catalog has
    it, else of ``MAG`` (F814W), with a warning (once per catalog and survey).
    """

    compatible_catalogs = ("CosmosCatalog",)
    component_kinds = COSMOS_KINDS

    def __init__(self, catalog, sampling_function, surveys, batch_size: int = 8,
                 stamp_size: float = 24.0, cpus: int = 1, verbose: bool = False,
                 add_noise: str = "all", seed=None, save_path=None, backend: str = "jax",
                 isolated: bool = True, apply_shear: bool = False, augment_data: bool = False,
                 channels_last: bool = False, use_bar=None, dtype: str = "float32",
                 chunk: int = 32, gal_type: str = "real", galsim_gsparams=None,
                 real_pad_factor: float = 4.0):
        if gal_type not in ("real", "parametric"):
            raise ValueError(f"gal_type must be 'real' or 'parametric', got {gal_type!r}.")
        self.gal_type = gal_type
        self.galsim_gsparams = galsim_gsparams
        self.real_pad_factor = float(real_pad_factor)
        kwargs = {} if seed is None else {"seed": seed}
        super().__init__(catalog, sampling_function, surveys, batch_size=batch_size,
                         stamp_size=stamp_size, cpus=cpus, verbose=verbose, add_noise=add_noise,
                         save_path=save_path, backend=backend, isolated=isolated,
                         apply_shear=apply_shear, augment_data=augment_data,
                         channels_last=channels_last, use_bar=use_bar, dtype=dtype, chunk=chunk,
                         **kwargs)
        self._tables = None
        if gal_type == "real" and backend == "jax":
            self._build_tables()

    # -- hooks of DrawBlendsGenerator -------------------------------------------------------

    def _mag_column(self, survey):
        mapping = self.catalog.band_magnitude_columns(survey)
        fallback = [b for b, c in mapping.items() if c == "ref_mag"]
        if fallback and survey.name not in self.catalog._warned_surveys:
            self.catalog._warned_surveys.add(survey.name)
            warnings.warn(
                f"The COSMOS catalog has no '{survey.name}_{{band}}' magnitude column for band(s) "
                f"{fallback} of {survey.name}: the F814W magnitude (MAG) is used for them.",
                stacklevel=4,
            )
        return _BandColumns(mapping)

    def _check_catalog_columns(self):
        catalog = self.catalog
        catalog.get_galsim_catalog()
        if self.gal_type == "parametric":
            cosmos_parametric_arrays(catalog.table[:1])
        else:
            real_cat = Table.read(catalog.real_file)
            folder = os.path.dirname(os.path.abspath(catalog.real_file))
            for col in ("GAL_FILENAME", "PSF_FILENAME"):
                for name in sorted(set(str(x).strip() for x in real_cat[col])):
                    if not os.path.exists(os.path.join(folder, name)):
                        raise FileNotFoundError(
                            f"Real COSMOS galaxies need {name!r} ({col}) beside "
                            f"{catalog.real_file}; it is missing (gal_type='parametric' needs "
                            "only the catalogs)."
                        )

    def _catalog_arrays(self) -> CatalogArrays:
        if self.gal_type == "parametric":
            return cosmos_parametric_arrays(self.catalog.table)
        n = len(self.catalog.table)
        ones = np.ones((n, len(COSMOS_KINDS)))
        return CatalogArrays(frac=ones / len(COSMOS_KINDS), hlr=ones, q=ones, beta=0 * ones,
                             n=ones)

    # -- real galaxies ------------------------------------------------------------------------

    def _build_tables(self):
        kmax = 0.0
        stretch = math.sqrt((1 + _SHEAR_MARGIN) / (1 - _SHEAR_MARGIN)) if self.apply_shear else 1
        for state in self._states.values():
            spec = _base_spec(state)
            # Larger boxes of the ladder have a finer dk: their grid's last index lies within
            # one base dk of the base grid's.
            kx = np.abs(spec.x_indices).max() * spec.dk + spec.dk
            ky = np.abs(spec.y_indices).max() * spec.dk + spec.dk
            kmax = max(kmax, math.hypot(kx, ky) * stretch)
        gcat = self.catalog.get_galsim_catalog()
        tspec, values, maxk = real_galaxy_tables(gcat, kmax, self.real_pad_factor)
        cdtype = jnp.complex128 if self.dtype == jnp.float64 else jnp.complex64
        self._tspec = tspec
        self._tables = RealTables(values=jnp.asarray(values, cdtype),
                                  maxk=jnp.asarray(maxk, self.dtype))
        # Folding: a real galaxy's light reaches the corner of its HST stamp (plus the PSF).
        half_diag = np.array([
            0.5 * math.hypot(*gcat.getRealParams(i)[0].array.shape) * COSMOS_PIXEL_SCALE
            for i in range(gcat.getNObjects())
        ])
        for state in self._states.values():
            if hasattr(state, "row_extent"):
                fwhm = max(float(state.survey.get_filter(b).psf_fwhm.to_value("arcsec"))
                           for b in state.bands)
                state.row_extent = half_diag + fwhm

    def _draw_survey(self, state, blends, blend_ids):
        if self.gal_type != "real" or self.backend != "jax":
            return super()._draw_survey(state, blends, blend_ids)
        psfs = state.new_batch()
        noise_key = jax.random.fold_in(self._noise_key, state.stream)
        sky = jnp.asarray(state.sky, self.dtype)
        blends = jax.tree.map(np.asarray, blends)
        blend_ids = np.asarray(blend_ids)
        sizes = state.box_sizes(blends)
        n, s, n_band = len(blend_ids), state.stamp_pixels, len(state.bands)
        np_dtype = np.dtype(self.dtype)
        images = np.empty((n, n_band, s, s), np_dtype)
        iso = np.empty((n, self.max_number, n_band, s, s), np_dtype) if self.isolated else None
        chunk = self.chunk
        with self._bar(state.name) as bar:
            for size in np.unique(sizes):
                rows = np.flatnonzero(sizes == size)
                spec, psf_k = state.spec(int(size)), state.psf_k(int(size))
                for start in range(0, len(rows), chunk):
                    stop = min(start + chunk, len(rows))
                    take = rows[np.arange(start, start + chunk).clip(max=stop - 1)]
                    part = jax.tree.map(lambda a, t=take: jnp.asarray(a[t]), blends)
                    img, iso_part = _real_pipeline(
                        part, jnp.asarray(blend_ids[take]), self._tables, state.fluxes, psf_k,
                        sky, noise_key, self._tspec, spec, self.add_noise, self.isolated, chunk,
                    )
                    images[rows[start:stop]] = np.asarray(img)[: stop - start]
                    if self.isolated:
                        iso[rows[start:stop]] = np.asarray(iso_part)[: stop - start]
                    bar.update(stop - start)
        return images, iso, psfs

    # -- GalSim backend -------------------------------------------------------------------------

    def _render_galsim(self, state, blends, psfs):
        blends = jax.tree.map(np.asarray, blends)
        gcat = self.catalog.get_galsim_catalog()
        args = (state.fluxes_host, psfs, _base_spec(state), self.gal_type, self.isolated,
                self.galsim_gsparams)
        if self.cpus == 1 or self.batch_size == 1:
            return render_cosmos_galsim(gcat, blends, *args)
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            self._pool = ProcessPoolExecutor(self.cpus, mp_context=get_context("spawn"))
        parts = np.array_split(np.arange(self.batch_size), self.cpus)
        futures = [
            self._pool.submit(render_cosmos_galsim, gcat,
                              jax.tree.map(lambda a, p=p: a[p], blends), *args)
            for p in parts if len(p)
        ]
        results = [f.result() for f in futures]
        images = np.concatenate([r[0] for r in results])
        iso = np.concatenate([r[1] for r in results]) if self.isolated else None
        return images, iso

    def config(self) -> dict:
        out = super().config()
        out["gal_type"] = self.gal_type
        return out
