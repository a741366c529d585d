"""Priors of the deblender's fit from a catalog's population (`catalog_prior`)."""

from __future__ import annotations

import numpy as np

from btkjax.deblend.model import Prior
from btkjax.galaxies import band_fluxes

__all__ = ["catalog_prior", "colour_prior"]


def _in_cut(catalog, max_mag, min_mag, mag_name):
    """(table, rows with min_mag < mag <= max_mag, the magnitude column used: ``mag_name``,
    or "i_ab" where the table has no such column)."""
    table = getattr(catalog, "table", catalog)
    if mag_name not in table.colnames:
        mag_name = "i_ab"
    mag = np.asarray(table[mag_name], float)
    return table, np.flatnonzero((mag > min_mag) & (mag <= max_mag)), mag_name


def catalog_prior(catalog, survey, max_mag: float = 25.3, min_mag: float = -np.inf,
                  mag_name: str = "ref_mag") -> Prior:
    """The `Prior` of a CatSim-like catalog's galaxies as a survey sees them.

    Over the rows with ``min_mag < mag_name <= max_mag`` (`DefaultSampling`'s cut by default):

    - size: the least-squares line of ``ln(hlr)`` on ``ln(F)`` (the size-flux relation), with
      ``F`` the row's flux summed over the survey's bands (electrons, `band_fluxes`) and
      ``hlr`` = sqrt(a b) (arcsec) of its brighter component (disk or bulge); the width is
      the standard deviation of the residuals about the line;
    - ellipticity: ``g_width`` = the rms of one reduced-shear component, sqrt(<|g|^2> / 2),
      with ``|g| = (1 - q) / (1 + q)`` of the brighter component (orientations uniform).

    Args:
        catalog: a `btkjax.catalog.CatsimCatalog` (or its table) with the CatSim columns.
        survey: the `btkjax.survey.Survey` whose bands and zero points give the fluxes.
        max_mag, min_mag, mag_name: the magnitude cut of the sampled galaxies.

    Returns:
        `Prior` (float64 numbers; `Prior.astype` casts it).
    """
    table, rows, mag_name = _in_cut(catalog, max_mag, min_mag, mag_name)
    if len(rows) < 10:
        raise ValueError(f"catalog_prior needs at least 10 galaxies with {min_mag} < {mag_name} "
                         f"<= {max_mag}; the catalog has {len(rows)}.")
    t = table[rows]
    flux = band_fluxes(t, survey).sum(axis=1)
    bulge = np.asarray(t["fluxnorm_bulge"], float) > np.asarray(t["fluxnorm_disk"], float)
    a = np.where(bulge, np.asarray(t["a_b"], float), np.asarray(t["a_d"], float))
    b = np.where(bulge, np.asarray(t["b_b"], float), np.asarray(t["b_d"], float))
    ok = (a > 0) & (b > 0) & (flux > 0)
    if ok.sum() < 10:
        raise ValueError(f"catalog_prior needs at least 10 galaxies with positive sizes and "
                         f"fluxes in the cut; the catalog has {int(ok.sum())}.")
    log_f = np.log(flux[ok])
    log_hlr = 0.5 * np.log(a[ok] * b[ok])
    ref = float(np.median(log_f))
    slope, mean = np.polyfit(log_f - ref, log_hlr, 1)
    width = float(np.std(log_hlr - (mean + slope * (log_f - ref)), ddof=2))
    q = b[ok] / a[ok]
    g = (1 - q) / (1 + q)
    return Prior(log_hlr_mean=float(mean), log_hlr_width=width, log_hlr_slope=float(slope),
                 log_flux_ref=ref, g_width=float(np.sqrt(np.mean(g * g) / 2)))


def colour_prior(catalog, survey, max_mag: float = 25.3, min_mag: float = -np.inf,
                 mag_name: str = "ref_mag", prior: Prior | None = None) -> Prior:
    """A `Prior` on each galaxy's colours (its SED) from a CatSim-like catalog's population.

    The colours are the ln flux ratios of adjacent bands, ``c_k = ln(F_{k+1} / F_k)``, of the
    galaxies with ``min_mag < mag_name <= max_mag`` as ``survey`` sees them (electrons,
    `band_fluxes`: bulge, disk and AGN together); their mean and the inverse of their
    covariance matrix are the prior's ``colour_mean`` and ``colour_icov`` (a Gaussian over the
    whole population: red and blue galaxies together).

    Args:
        catalog, survey, max_mag, min_mag, mag_name: as `catalog_prior`.
        prior: the `Prior` to add the colour terms to (default: none other).

    Returns:
        `Prior` (float64 arrays; `Prior.astype` casts it).
    """
    table, rows, mag_name = _in_cut(catalog, max_mag, min_mag, mag_name)
    flux = band_fluxes(table[rows], survey)
    ok = np.all(flux > 0, axis=1)
    n_band = flux.shape[1]
    if n_band < 2 or ok.sum() < 10 * n_band:
        raise ValueError(f"colour_prior needs at least 2 bands and {10 * n_band} galaxies with "
                         f"positive fluxes in every band in {min_mag} < {mag_name} <= "
                         f"{max_mag}; got {n_band} bands and {int(ok.sum())} galaxies.")
    log_f = np.log(flux[ok])
    colours = log_f[:, 1:] - log_f[:, :-1]
    cov = np.atleast_2d(np.cov(colours, rowvar=False))
    return (prior or Prior())._replace(colour_mean=colours.mean(axis=0),
                                       colour_icov=np.linalg.inv(cov))
