"""Catalogs: standardized astropy tables of galaxies to draw.

A `Catalog` wraps an input table and builds, once, a standardized ``table`` that the sampling
functions and generators use. Bad input fails here, at construction, with a message that names
the columns and rows at fault, before any blend is drawn.
"""

from __future__ import annotations

import os
from copy import deepcopy
from importlib import resources

import numpy as np
from astropy.table import Table

__all__ = ["Catalog", "CatsimCatalog", "CatalogError", "CATSIM_BANDS", "available_catalogs"]

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


class CatalogError(ValueError):
    """A catalog that cannot be drawn: missing columns or invalid values."""


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
        return cls(Table.read(path, format=fmt))

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
        mag_columns = [c for c in raw_catalog.colnames if c.endswith("_ab")]
        problems = []
        for col in mag_columns:
            bad = np.flatnonzero(~np.isfinite(np.asarray(raw_catalog[col], dtype=float)))
            if len(bad):
                problems.append(f"non-finite magnitudes in '{col}' at {_describe_rows(bad)}")
        for col in CATSIM_SIZE_COLUMNS + CATSIM_FLUXNORM_COLUMNS + ("pa_bulge", "pa_disk"):
            values = np.asarray(raw_catalog[col], dtype=float)
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                problems.append(f"non-finite values in '{col}' at {_describe_rows(bad)}")
            if col in CATSIM_SIZE_COLUMNS + CATSIM_FLUXNORM_COLUMNS:
                neg = np.flatnonzero(values < 0)
                if len(neg):
                    problems.append(f"negative values in '{col}' at {_describe_rows(neg)}")
        if not problems:
            problems += self._check_components(raw_catalog)
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
        return table

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


available_catalogs = {"catsim": CatsimCatalog}


def __getattr__(name):
    # CosmosCatalog lives in btkjax.cosmos, which imports this module: re-exported lazily.
    if name == "CosmosCatalog":
        from btkjax.cosmos import CosmosCatalog

        available_catalogs.setdefault("cosmos", CosmosCatalog)
        return CosmosCatalog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
