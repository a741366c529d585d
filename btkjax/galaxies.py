"""From catalog tables to the arrays the renderer's `Sources` are gathered from.

A catalog becomes, once, a set of device arrays indexed by catalog row (`CatalogArrays`); a
`Blends` (catalog rows, shifts, rotations, shears per slot) then becomes `Sources` by a jittable
gather, so that sampling, source building and rendering stay on the device.

CatSim galaxies are drawn as BTK draws them (``btk.draw_blends.get_catsim_galaxy``): an
exponential disk, a de Vaucouleurs bulge and a point-source AGN; the total flux in each band is
galcheat's ``mag2counts`` of the band's magnitude, split by the fluxnorm fractions; each
component has ``hlr = sqrt(a * b)``, ``q = b / a`` and position angle ``pa`` (degrees).
"""

from __future__ import annotations

import numpy as np

from btkjax.catalog import CatalogError, magnitude_problems
from btkjax.core.render import CATSIM_KINDS
from btkjax.core.sources import CatalogArrays, make_sources
from btkjax.survey import get_flux

__all__ = ["CatalogArrays", "catsim_arrays", "band_fluxes", "make_sources"]


def catsim_arrays(table) -> CatalogArrays:
    """The CatSim disk/bulge/AGN components of every row of a (standardized) CatSim table."""
    fd = np.asarray(table["fluxnorm_disk"], dtype=float)
    fb = np.asarray(table["fluxnorm_bulge"], dtype=float)
    fa = np.asarray(table["fluxnorm_agn"], dtype=float)
    total = fd + fb + fa
    frac = np.stack([fd, fb, fa], axis=1) / total[:, None]

    def shape(a_col, b_col, has_flux):
        a = np.asarray(table[a_col], dtype=float)
        b = np.asarray(table[b_col], dtype=float)
        ok = has_flux & (a > 0) & (b > 0)
        hlr = np.where(ok, np.sqrt(np.where(ok, a * b, 1.0)), 1.0)
        q = np.where(ok, np.where(ok, b, 1.0) / np.where(ok, a, 1.0), 1.0)
        return hlr, q

    hlr_d, q_d = shape("a_d", "b_d", fd > 0)
    hlr_b, q_b = shape("a_b", "b_b", fb > 0)
    ones = np.ones_like(fd)
    beta_d = np.radians(np.asarray(table["pa_disk"], dtype=float))
    beta_b = np.radians(np.asarray(table["pa_bulge"], dtype=float))
    return CatalogArrays(
        frac=frac,
        hlr=np.stack([hlr_d, hlr_b, ones], axis=1),
        q=np.stack([q_d, q_b, ones], axis=1),
        beta=np.stack([beta_d, beta_b, 0 * ones], axis=1),
        n=np.stack([ones, 4 * ones, ones], axis=1),
    )


def band_fluxes(table, survey, mag_column: str = "{band}_ab") -> np.ndarray:
    """Total flux in electrons of every row in every band of a survey, [row, band].

    Exactly galcheat's ``mag2counts`` (an integer number of electrons). Magnitudes outside
    `btkjax.catalog.MAGNITUDE_RANGE` (missing-value sentinels, NaN) raise a CatalogError naming
    the column, rows and values: they would give garbage or vanishing fluxes.
    """
    out = np.empty((len(table), len(survey.available_filters)))
    for b, band in enumerate(survey.available_filters):
        column = mag_column.format(band=band, survey=survey.name)
        if column not in table.colnames:
            raise KeyError(
                f"The catalog has no magnitude column {column!r} for band {band} of "
                f"{survey.name}; its columns are {table.colnames}."
            )
        problems = magnitude_problems(table, [column])
        if problems:
            raise CatalogError(
                f"Cannot compute {survey.name} {band}-band fluxes: " + "; ".join(problems) + "."
            )
        out[:, b] = get_flux(np.asarray(table[column], dtype=float), survey, survey.get_filter(band))
    return out


CATSIM_COMPONENT_KINDS = CATSIM_KINDS
