"""Catalogs: standardized astropy tables of galaxies to draw.

A `Catalog` wraps an input table and builds, once, a standardized ``table`` that the sampling
functions and generators use. Bad input fails here, at construction, with a message that names
the columns and rows at fault, before any blend is drawn.
"""

from __future__ import annotations

import os
import warnings
from copy import deepcopy
from importlib import resources

import galsim
import numpy as np
from astropy.io import fits
from astropy.table import Table, hstack

__all__ = [
    "Catalog",
    "CatsimCatalog",
    "CosmosCatalog",
    "CatalogError",
    "CATSIM_BANDS",
    "CATSIM_SHAPE_COLUMNS",
    "COSMOS_PIXEL_SCALE",
    "EXCLUSION_LEVELS",
    "MAGNITUDE_RANGE",
    "available_catalogs",
    "magnitude_problems",
]

CATSIM_BANDS = ("u", "g", "r", "i", "z", "y")
"""CatSim's six LSST-like bands; magnitudes live in columns ``{band}_ab``."""

CATSIM_REQUIRED_COLUMNS = (
    "ra",
    "dec",
    "fluxnorm_bulge",
    "fluxnorm_disk",
    "fluxnorm_agn",
    "a_b",
    "a_d",
    "b_b",
    "b_d",
    "pa_bulge",
    "pa_disk",
    "i_ab",
)
"""Columns a CatSim-like table must have (``i_ab`` is the reference magnitude)."""

CATSIM_SIZE_COLUMNS = ("a_b", "a_d", "b_b", "b_d")
CATSIM_FLUXNORM_COLUMNS = ("fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn")
CATSIM_SHAPE_COLUMNS = CATSIM_FLUXNORM_COLUMNS + CATSIM_SIZE_COLUMNS + ("pa_bulge", "pa_disk")
"""The columns a CatSim galaxy is drawn from, besides its band magnitudes."""

MAGNITUDE_RANGE = (-5.0, 90.0)
"""AB magnitudes a galaxy to draw may have, exclusive. The brightest galaxies on the sky are
~0 mag (the LMC ~0.9); -5 leaves room for stars and edits (-1.5 mag) while galcheat's counts
stay 100x below int64's limit (at -10 they reach 7e18 electrons; a -99 "missing" sentinel gave
-9e18). Faint values are harmless and real (CatSim u-band dropouts reach 41 in the default
catalog), but 90 and above are not magnitudes: catalog sentinels (99, 999) for missing values,
which would silently draw the galaxy as invisible in that band."""


class CatalogError(ValueError):
    """A catalog that cannot be drawn: missing columns or invalid values."""


def _read_table(path: str, fmt: str, what: str) -> Table:
    """``Table.read`` with an error naming the file and the expected format instead of
    astropy's (e.g. "No SIMPLE card found")."""
    try:
        return Table.read(path, format=fmt)
    except Exception as err:  # astropy raises OSError, ValueError, TypeError, ... by format
        kind = "FITS" if fmt == "fits" else "whitespace-separated ASCII (ascii.basic)"
        raise CatalogError(
            f"Cannot read the {what} file {path!r} as a {kind} table ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected a FITS file (.fits, .fit, "
            ".fz) or a whitespace-separated ASCII table with a header line."
        ) from None


def _numeric_problems(table, columns) -> list[str]:
    """Columns of ``table`` (among ``columns``) that are not real numbers (strings, objects)."""
    problems = []
    for col in columns:
        if col in table.colnames:
            kind = np.asarray(table[col]).dtype.kind
            if kind not in "biuf":
                problems.append(
                    f"column '{col}' holds {np.asarray(table[col]).dtype} values, expected numbers"
                )
    return problems


def magnitude_problems(table, columns) -> list[str]:
    """Magnitude columns of ``table`` with values that are not finite numbers within
    ``MAGNITUDE_RANGE`` (e.g. -99 "missing" sentinels), each naming the column, rows and values."""
    problems = _numeric_problems(table, columns)
    bad_type = {p.split("'")[1] for p in problems}
    lo, hi = MAGNITUDE_RANGE
    for col in columns:
        if col not in table.colnames or col in bad_type:
            continue
        mag = np.asarray(table[col], dtype=float)
        bad = np.flatnonzero(~((mag > lo) & (mag < hi)))
        if len(bad):
            values = ", ".join(f"{v:g}" for v in mag[bad[:5]])
            problems.append(
                f"magnitudes in '{col}' outside ({lo:g}, {hi:g}) (missing-value sentinels or "
                f"non-finite) at {_describe_rows(bad)}: {values}"
            )
    return problems


def _describe_rows(rows: np.ndarray, limit: int = 10) -> str:
    rows = np.asarray(rows)
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"rows [{shown}{more}]"


class Catalog:
    """Base class: a raw table and its standardized ``table``.

    Subclasses implement ``_prepare_table`` (validate and standardize) and ``from_file``.

    Attributes:
        table: the standardized astropy Table used by samplers and generators.
    """

    def __init__(self, raw_catalog: Table):
        if not isinstance(raw_catalog, Table):
            raise TypeError(
                f"{type(self).__name__} expects an astropy.table.Table, got "
                f"{type(raw_catalog).__name__}; use {type(self).__name__}.from_file(path) to "
                "read a file."
            )
        self._raw_catalog = raw_catalog
        self.table = self._prepare_table(raw_catalog)

    @classmethod
    def from_file(cls, catalog_files):  # pragma: no cover - abstract
        raise NotImplementedError(f"{cls.__name__} must implement from_file(catalog_files); "
                                  f"use CatsimCatalog or CosmosCatalog.")

    def _prepare_table(self, raw_catalog: Table) -> Table:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement "
                                  f"_prepare_table(raw_catalog).")

    @classmethod
    def row_problems(cls, table) -> list[str]:
        """What makes rows of ``table`` undrawable (empty if none); subclasses check their
        columns (magnitudes here)."""
        return magnitude_problems(table, [c for c in table.colnames if c.endswith("_ab")])

    @property
    def name(self) -> str:
        """The class name, used to check generator compatibility."""
        return type(self).__name__

    def get_raw_catalog(self) -> Table:
        """Returns the raw catalog as it was given."""
        return self._raw_catalog

    def __len__(self) -> int:
        return len(self.table)


class CatsimCatalog(Catalog):
    """A CatSim-like catalog: bulge + disk + AGN galaxies with u..y AB magnitudes.

    The standardized ``table`` keeps every input column and adds:

    - ``ref_mag``: the i-band magnitude (CatSim's reference band);
    - ``btk_size``: BTK's size estimate in arcsec,
      ``hypot(a_d * sqrt(1 - f) * 4.66, a_b * sqrt(f) * 1.46)`` with ``f`` the bulge fraction of
      the bulge + disk flux (BTK 0.9's formula).

    Input positions (``ra``, ``dec``) are kept as given: sampling functions overwrite them with
    offsets in arcsec from the stamp center.
    """

    @classmethod
    def from_file(cls, catalog_files: str | os.PathLike) -> CatsimCatalog:
        """Reads a FITS (``.fits``) or whitespace-separated ASCII table (any other extension).

        Args:
            catalog_files: path to the catalog file.
        """
        path = os.fspath(catalog_files)
        if not os.path.exists(path):
            raise FileNotFoundError(f"CatSim catalog file {path!r} does not exist.")
        _, ext = os.path.splitext(path)
        fmt = "fits" if ext.lower() in (".fits", ".fit", ".fz") else "ascii.basic"
        return cls(_read_table(path, fmt, "CatSim catalog"))

    @classmethod
    def default(cls) -> CatsimCatalog:
        """The embedded default catalog: a CatSim-like catalog made by btkjax itself.

        See ``data/make_default_catalog.py`` for how it is made and where its numbers come from.
        """
        ref = resources.files("btkjax") / "data" / "default_catalog.fits"
        with resources.as_file(ref) as path:
            return cls(Table.read(path, format="fits"))

    def _prepare_table(self, raw_catalog: Table) -> Table:
        missing = [c for c in CATSIM_REQUIRED_COLUMNS if c not in raw_catalog.colnames]
        if missing:
            raise CatalogError(
                f"CatSim catalog is missing required column(s) {missing}; a CatSim-like table "
                f"needs {list(CATSIM_REQUIRED_COLUMNS)} and magnitudes in '{{band}}_ab' columns."
            )
        if len(raw_catalog) == 0:
            raise CatalogError("CatSim catalog is empty: it has no rows to sample from.")
        problems = self.row_problems(raw_catalog)
        if problems:
            raise CatalogError("Invalid CatSim catalog: " + "; ".join(problems) + ".")

        table = deepcopy(raw_catalog)
        fb = np.asarray(table["fluxnorm_bulge"], dtype=float)
        fd = np.asarray(table["fluxnorm_disk"], dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.where(fb + fd > 0, fb / np.where(fb + fd > 0, fb + fd, 1.0), 0.0)
        table["btk_size"] = np.hypot(
            np.asarray(table["a_d"]) * np.sqrt(1 - f) * 4.66,
            np.asarray(table["a_b"]) * np.sqrt(f) * 1.46,
        )
        table["ref_mag"] = table["i_ab"]
        # Each row's position: kept by table[rows] in sampling functions, so that the generator
        # knows which catalog row a returned row came from (and whether it was edited).
        table["btk_index"] = np.arange(len(table), dtype=np.int64)
        return table

    @classmethod
    def row_problems(cls, table) -> list[str]:
        """What makes rows of a CatSim-like table undrawable (empty if none): non-numeric
        columns, magnitudes outside ``MAGNITUDE_RANGE``, non-finite or negative shapes and
        fluxnorms, components with flux but no size. Used on catalogs and on the rows that
        sampling functions return."""
        mag_columns = [c for c in table.colnames if c.endswith("_ab")]
        problems = _numeric_problems(table, CATSIM_SHAPE_COLUMNS)
        if problems:
            return problems + magnitude_problems(table, mag_columns)
        problems = magnitude_problems(table, mag_columns)
        for col in CATSIM_SHAPE_COLUMNS:
            if col not in table.colnames:
                continue
            values = np.asarray(table[col], dtype=float)
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                problems.append(f"non-finite values in '{col}' at {_describe_rows(bad)}")
            if col in CATSIM_SIZE_COLUMNS + CATSIM_FLUXNORM_COLUMNS:
                neg = np.flatnonzero(values < 0)
                if len(neg):
                    problems.append(f"negative values in '{col}' at {_describe_rows(neg)}")
        if not problems and all(c in table.colnames for c in CATSIM_SHAPE_COLUMNS):
            problems += cls._check_components(table)
        return problems

    @staticmethod
    def _check_components(raw: Table) -> list[str]:
        """A component with flux must have a positive size; the galaxy must have some flux."""
        problems = []
        total = sum(np.asarray(raw[c], dtype=float) for c in CATSIM_FLUXNORM_COLUMNS)
        bad = np.flatnonzero(total <= 0)
        if len(bad):
            problems.append(
                "fluxnorm_bulge + fluxnorm_disk + fluxnorm_agn is zero (nothing to draw) at "
                + _describe_rows(bad)
            )
        for comp, a, b in (("disk", "a_d", "b_d"), ("bulge", "a_b", "b_b")):
            has_flux = np.asarray(raw[f"fluxnorm_{comp}"], dtype=float) > 0
            size = np.asarray(raw[a], dtype=float) * np.asarray(raw[b], dtype=float)
            bad = np.flatnonzero(has_flux & ~(size > 0))
            if len(bad):
                problems.append(
                    f"the {comp} has flux but '{a}' * '{b}' is not positive at "
                    + _describe_rows(bad)
                )
        return problems


# ----------------------------------------------------------------------------------------------
# COSMOS (GalSim's format)
# ----------------------------------------------------------------------------------------------

COSMOS_PIXEL_SCALE = 0.03
"""arcsec per pixel of the COSMOS HST/ACS lensing reduction (the images' PIXEL_SCALE; the fit
radii and SExtractor's ``flux_radius`` are in these pixels: for the 23.5 example catalog
``flux_radius * 0.03`` is within ~10% of the Sersic fit's ``hlr`` in arcsec)."""

EXCLUSION_LEVELS = ("none", "bad_stamp", "bad_fits", "marginal")

FIT_COLUMNS = ("sersicfit", "bulgefit", "use_bulgefit", "hlr", "flux")


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


available_catalogs = {"catsim": CatsimCatalog, "cosmos": CosmosCatalog}
