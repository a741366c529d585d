"""Surveys and filters: galcheat's (and surveycodex's) parameters, modifiable, with a PSF per filter.

`get_surveys("LSST")` returns a `Survey` whose filters carry a ``psf``: by default BTK's model, a
Kolmogorov atmosphere with the filter's FWHM convolved with an Airy pattern of lambda/D and the
central obscuration implied by the effective over the mirror area, normalized to unit flux.

Fluxes and sky levels in electrons are galcheat's `mag2counts` and `mean_sky_level`, called on
these objects (they subclass galcheat's), so the numbers are galcheat's to the electron.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import fields

import astropy.units as u
import galcheat
import galcheat.filter
import galcheat.survey
import galsim
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from galcheat.utilities import mag2counts as _galcheat_mag2counts
from galcheat.utilities import mean_sky_level as _galcheat_mean_sky_level

try:  # surveycodex adds Roman, Euclid NISP, SDSS, Pan-STARRS to galcheat's list.
    import surveycodex
except ImportError:  # pragma: no cover - surveycodex is a declared dependency
    surveycodex = None

__all__ = [
    "Survey",
    "Filter",
    "available_surveys",
    "get_surveys",
    "get_default_psf",
    "default_psf_params",
    "get_psf_from_file",
    "make_wcs",
    "get_flux",
    "get_mean_sky_level",
    "SurveyError",
    "check_survey",
]


class SurveyError(ValueError):
    """An unknown survey or filter name, or inconsistent survey parameters."""


def available_surveys() -> list[str]:
    """Names accepted by `get_surveys`: galcheat's surveys, then surveycodex's extra ones."""
    names = list(galcheat.available_surveys)
    if surveycodex is not None:
        names += [s for s in surveycodex.available_surveys if s not in names]
    return names


class Filter(galcheat.filter.Filter):
    """A galcheat filter whose attributes can be modified, with a ``psf`` attribute.

    ``psf`` is a GalSim (or JAX-GalSim) object of unit flux, or a callable with no argument that
    returns one; the generators call it once per batch (random PSFs).
    """

    def __setattr__(self, name, value):
        self.__dict__[name] = value

    def __delattr__(self, name):
        del self.__dict__[name]

    @classmethod
    def from_codex(cls, filt) -> Filter:
        """Copies a galcheat or surveycodex Filter."""
        values = {f.name: getattr(filt, f.name) for f in fields(galcheat.filter.Filter)}
        new = cls(**values)
        new.psf = None
        return new


class Survey(galcheat.survey.Survey):
    """A galcheat survey whose attributes and filters can be modified."""

    def __setattr__(self, name, value):
        self.__dict__[name] = value

    def __delattr__(self, name):
        del self.__dict__[name]

    def get_filter(self, filter_name: str) -> Filter:
        """Returns the filter itself (not a copy), so that modifying it modifies the survey."""
        if filter_name not in self._filters:
            raise SurveyError(
                f"Unknown filter {filter_name!r} for survey {self.name}; the available filters "
                f"are {list(self._filters)}."
            )
        return self._filters[filter_name]

    @property
    def available_filters(self) -> list[str]:  # type: ignore[override]
        return list(self._filters)

    @available_filters.setter
    def available_filters(self, value):  # galcheat's __post_init__ sets it; keep it derived.
        pass

    @classmethod
    def from_codex(cls, survey) -> Survey:
        """Copies a galcheat or surveycodex Survey (filters included)."""
        init_fields = [f.name for f in fields(galcheat.survey.Survey) if f.init]
        values = {name: getattr(survey, name) for name in init_fields}
        values["_filters"] = {
            name: Filter.from_codex(survey.get_filter(name)) for name in survey.available_filters
        }
        return cls(**values)

    def __repr__(self):
        return f"Survey {self.name}"


def _codex_survey(name: str):
    if name in galcheat.available_surveys:
        return galcheat.get_survey(name)
    if surveycodex is not None and name in surveycodex.available_surveys:
        return surveycodex.get_survey(name)
    raise SurveyError(f"Unknown survey {name!r}; the available surveys are {available_surveys()}.")


def default_psf_params(survey: Survey, filtr: Filter) -> dict:
    """Parameters of BTK's default PSF for a filter.

    Returns:
        dict with ``fwhm`` (arcsec, atmosphere), ``lam_over_diam`` (arcsec; 0 when the survey
        has no mirror or the filter no wavelength) and ``obscuration`` (linear fraction,
        sqrt(1 - effective_area / mirror_area)).
    """
    fwhm = float(filtr.psf_fwhm.to_value("arcsec"))
    diameter = float(survey.mirror_diameter.to_value("m"))
    wavelength = filtr.effective_wavelength
    if diameter <= 0 or wavelength is None:
        return {"fwhm": fwhm, "lam_over_diam": 0.0, "obscuration": 0.0}
    mirror_area = np.pi * (0.5 * diameter) ** 2
    area_ratio = float(survey.effective_area.to_value("m2")) / mirror_area
    if not 0 < area_ratio <= 1:
        raise SurveyError(
            f"Survey {survey.name}: effective area / mirror area = {area_ratio:.4g}, expected a "
            "value in (0, 1]; check effective_area and mirror_diameter."
        )
    lam_over_diam = 3600 * np.degrees(float(wavelength.to_value("m")) / diameter)
    return {
        "fwhm": fwhm,
        "lam_over_diam": float(lam_over_diam),
        "obscuration": float(np.sqrt(1 - area_ratio)),
    }


def get_default_psf(survey: Survey, filtr: Filter) -> galsim.GSObject:
    """BTK's default PSF: Kolmogorov(fwhm) convolved with an obscured Airy, unit flux."""
    params = default_psf_params(survey, filtr)
    atmosphere = galsim.Kolmogorov(fwhm=params["fwhm"])
    if params["lam_over_diam"] <= 0:
        return atmosphere.withFlux(1.0)
    optics = galsim.Airy(lam_over_diam=params["lam_over_diam"], obscuration=params["obscuration"])
    return galsim.Convolve(atmosphere, optics).withFlux(1.0)


def get_surveys(
    names: str | Sequence[str], psf: Callable | None = None
) -> Survey | list[Survey]:
    """Surveys by name, each filter with a PSF.

    Args:
        names: a survey name (see `available_surveys`) or a list of names.
        psf: optional callable ``psf(survey, filter)`` returning a GalSim/JAX-GalSim object, or a
            callable with no argument that returns one (then called once per batch). Default:
            BTK's Kolmogorov x Airy model (`get_default_psf`).

    Returns:
        A `Survey` for a single name (or a one-element list), else a list of them.
    """
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"names must be a survey name or a list of names, got {names!r}.")
    if psf is not None and not callable(psf):
        raise TypeError(f"psf must be a callable psf(survey, filter), got {type(psf).__name__}.")
    surveys = []
    for name in names:
        survey = Survey.from_codex(_codex_survey(name))
        for band in survey.available_filters:
            filtr = survey.get_filter(band)
            filtr.psf = get_default_psf(survey, filtr) if psf is None else psf(survey, filtr)
            _check_psf(filtr.psf, survey, filtr)
        surveys.append(survey)
    return surveys[0] if len(surveys) == 1 else surveys


def _is_profile(obj) -> bool:
    return hasattr(obj, "drawKImage") and hasattr(obj, "kValue")


def _check_psf(psf, survey, filtr):
    if not (_is_profile(psf) or callable(psf)):
        raise TypeError(
            f"The PSF of {survey.name} filter {filtr.name} is a {type(psf).__name__}; expected a "
            "GalSim or JAX-GalSim object, or a callable returning one."
        )
    if _is_profile(psf):
        _check_psf_flux(psf, survey, filtr)


def _check_psf_flux(psf, survey, filtr):
    """A PSF's flux multiplies every galaxy's: it must be a finite positive number (a zero flux
    makes every galaxy vanish, a negative one has no folding box)."""
    flux = getattr(psf, "flux", None)
    try:
        flux = float(flux)
    except (TypeError, ValueError):
        return  # a profile without a scalar flux (not GalSim's API): nothing to check here
    if not (np.isfinite(flux) and flux > 0):
        raise SurveyError(
            f"The PSF of {survey.name} filter {filtr.name} has flux {flux}; expected a finite "
            "positive flux (PSFs are normalized to 1: use psf.withFlux(1.0))."
        )


def check_survey(survey: Survey) -> Survey:
    """Checks the parameters a generator divides by or draws with, naming the bad value:
    a finite positive pixel scale, and every filter with a PSF (of positive finite flux)."""
    pixel = survey.pixel_scale
    try:
        value = float(pixel.to_value("arcsec")) if isinstance(pixel, u.Quantity) else float(pixel)
    except (TypeError, ValueError, u.UnitConversionError):
        raise SurveyError(
            f"Survey {survey.name}: pixel_scale = {pixel!r}; expected an angle (astropy "
            "Quantity in arcsec)."
        ) from None
    if not (np.isfinite(value) and value > 0):
        raise SurveyError(
            f"Survey {survey.name}: pixel_scale = {pixel!r}; expected a finite positive angle "
            "(arcsec per pixel)."
        )
    for band in survey.available_filters:
        filtr = survey.get_filter(band)
        if getattr(filtr, "psf", None) is None:
            raise SurveyError(
                f"Filter {band} of {survey.name} has no PSF; build surveys with get_surveys()."
            )
        _check_psf(filtr.psf, survey, filtr)
    return survey


def evaluate_psf(survey: Survey, filtr: Filter):
    """The filter's PSF for this batch: calls the PSF callable if it is one."""
    psf = filtr.psf
    if psf is None:
        raise SurveyError(
            f"Filter {filtr.name} of {survey.name} has no PSF; build surveys with get_surveys()."
        )
    if not _is_profile(psf):
        psf = psf()
        if not _is_profile(psf):
            raise TypeError(
                f"The PSF callable of {survey.name} filter {filtr.name} returned a "
                f"{type(psf).__name__}; expected a GalSim or JAX-GalSim object."
            )
    _check_psf_flux(psf, survey, filtr)
    return psf


def get_psf_from_file(psf_dir: str | os.PathLike, pixel_scale, rng=None) -> galsim.GSObject:
    """A PSF read from a FITS image in ``psf_dir`` (a random one if there are several).

    Args:
        psf_dir: folder holding FITS images of the PSF.
        pixel_scale: the images' pixel scale: arcsec as a float, an astropy Quantity, or a Survey.
        rng: optional `numpy.random.Generator` choosing among several files (reproducible).

    Returns:
        A `galsim.InterpolatedImage` of unit flux.
    """
    if isinstance(pixel_scale, galcheat.survey.Survey):
        pixel_scale = pixel_scale.pixel_scale
    if isinstance(pixel_scale, u.Quantity):
        pixel_scale = pixel_scale.to_value("arcsec")
    pixel_scale = float(pixel_scale)
    if not pixel_scale > 0:
        raise ValueError(f"pixel_scale must be positive (arcsec), got {pixel_scale}.")
    psf_dir = os.fspath(psf_dir)
    files = sorted(f for f in os.listdir(psf_dir) if f.lower().endswith((".fits", ".fit")))
    if not files:
        raise FileNotFoundError(f"No PSF FITS files (*.fits) found in {psf_dir!r}.")
    rng = np.random.default_rng() if rng is None else rng
    chosen = files[int(rng.integers(len(files)))] if len(files) > 1 else files[0]
    array = np.asarray(fits.getdata(os.path.join(psf_dir, chosen)), dtype=float)
    if array.ndim != 2 or not np.all(np.isfinite(array)) or array.sum() <= 0:
        raise ValueError(
            f"PSF file {chosen!r} must hold a finite 2-D image with positive total, got shape "
            f"{array.shape}."
        )
    return galsim.InterpolatedImage(galsim.Image(array, scale=pixel_scale)).withFlux(1.0)


def make_wcs(
    pixel_scale: float,
    shape: tuple[int, int],
    projection: str = "TAN",
    center_pix: tuple[float, float] | None = None,
    center_sky: tuple[float, float] | None = None,
) -> WCS:
    """An astropy WCS for a stamp, as BTK makes it.

    By default the image center in FITS pixels, ((s + 1) / 2, (s + 1) / 2), is at (ra, dec) =
    (0, 0), with ra increasing along +x; `ra`, `dec` in blend tables are offsets in arcsec.

    Args:
        pixel_scale: arcsec per pixel.
        shape: image shape in pixels.
        projection: FITS projection code.
        center_pix: reference pixel (FITS, 1-based); default the image center.
        center_sky: (ra, dec) of the reference pixel in arcsec; default (0, 0).
    """
    center_pix = [(s + 1) / 2 for s in shape] if center_pix is None else list(center_pix)
    center_sky = [0.0, 0.0] if center_sky is None else list(center_sky)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---" + projection, "DEC--" + projection]
    w.wcs.crpix = center_pix
    w.wcs.pc = np.diag([pixel_scale / 3600, pixel_scale / 3600])
    w.wcs.cdelt = [1.0, 1.0]
    w.wcs.crval = [c / 3600 for c in center_sky]
    w.array_shape = shape
    return w


def get_flux(magnitude, survey: Survey, filtr: Filter) -> np.ndarray:
    """Electrons over the full exposure: galcheat's `mag2counts` (truncated to an integer)."""
    mag = np.asarray(magnitude, dtype=float)
    return np.asarray(_galcheat_mag2counts(mag.copy(), survey, filtr).value, dtype=float)


def get_mean_sky_level(survey: Survey, filtr: Filter) -> float:
    """Mean sky level in electrons per pixel: galcheat's `mean_sky_level`."""
    return float(_galcheat_mean_sky_level(survey, filtr).value)


def pixel_scale_arcsec(survey: Survey) -> float:
    """The survey's pixel scale in arcsec, as a float."""
    return float(survey.pixel_scale.to_value("arcsec"))
