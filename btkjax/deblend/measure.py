"""BTK measure function of the forward-model deblender (`ForwardModelMeasure`)."""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import sep
from astropy.table import Table

from btkjax.catalog import CatsimCatalog
from btkjax.core.step import blendedness
from btkjax.deblend.detector import Detector, check_detector_inputs, detect, load_detector
from btkjax.deblend.model import (
    MODELS,
    STATUS_TOO_MANY,
    Galaxies,
    Prior,
    fit_spec,
    model_images,
)
from btkjax.deblend.pipeline import check_penalty, fit_blends, pad_detections
from btkjax.deblend.priors import catalog_prior, colour_prior
from btkjax.measure import pixel_to_arcsec, select_survey, sep_singleband_measure
from btkjax.optics import psf_kimage_from_galsim
from btkjax.survey import get_mean_sky_level

__all__ = ["coadd_detections", "crop_origins", "crop_size", "crop_sizes", "ForwardModelMeasure",
           "COADD_SEP_KWARGS", "SERSIC_INDEX_PRIOR", "BULGE_DISK_PRIOR", "FluxErrorModel",
           "FLUX_ERROR_MODEL", "model_blendedness", "join_concentric", "DETECTIONS",
           "NETWORK_DEBLEND_THRESHOLD"]

# The default prior of model="sersic": n ~ N(1, 0.5), a disk unless the data say otherwise
# (width chosen on the tuning seeds of benchmarks/bench_deblend.py among 0.3, 0.5, 0.7, 1, inf)
SERSIC_INDEX_PRIOR = Prior(n_mean=1.0, n_width=0.5)

# The default prior of model="bulge+disk", from the embedded default CatSim catalog's 6,580 of
# 20,000 galaxies with both a bulge and a disk: logit of the bulge fraction (fluxnorm) mean
# -2.4, std 1.9; ln(bulge / disk half-light radius, circularized) median -0.77, std 0.61
BULGE_DISK_PRIOR = Prior(bulge_logit_mean=-2.4, bulge_logit_width=1.9,
                         log_bulge_ratio_mean=-0.77, log_bulge_ratio_width=0.61)


class FluxErrorModel(NamedTuple):
    """The flux error of a galaxy in a blend: its Fisher error and what no one fit's Fisher
    matrix counts, the light a profile that does not describe the galaxy exactly takes from or
    leaves to its surroundings (``floor``) and to its neighbours (``blend``):

    ``sigma_F^2 = fisher^2 + (floor * F)^2 + (blend * b * F)^2``

    with ``F`` the galaxy's fitted flux in the band and ``b`` its blendedness in the fitted
    models (`model_blendedness`: BTK's formula on the models instead of the true isolated
    images). An empirical model, calibrated on simulated blends (`FLUX_ERROR_MODEL`). Where the
    Fisher error is NaN (a Hessian not positive definite, see the status) so is sigma_F.
    ``bands``: ``(band, floor, blend)`` triples that replace ``floor`` and ``blend`` in the
    bands they name (`coefficients`); the others use ``floor`` and ``blend``.
    """

    floor: float
    blend: float
    bands: tuple = ()

    def coefficients(self, band: str) -> tuple[float, float]:
        """(floor, blend) of ``band``."""
        for name, floor, blend in self.bands:
            if name == band:
                return float(floor), float(blend)
        return float(self.floor), float(self.blend)


# Calibrated by benchmarks/calibrate_flux_errors.py on the 400 tuning blends of
# benchmarks/bench_deblend.py (sets "tune" and "tune2"; ForwardModelMeasure's defaults, no
# colour prior, LSST, up to 5 galaxies on 24" stamps): the (floor, blend) that bring the robust
# width (1.4826 MAD) of the i-band pulls (deblended - isolated) / sigma_F nearest 1 in the three
# blendedness bins (< 0.1, 0.1 - 0.5, > 0.5); the results file
# benchmarks/results/flux_error_calibration.json; checked on the reporting seeds in the README
# (benchmarks/results/flux_error_check_report.json). Applied to every band; other surveys and
# setups: not measured. Refitted whenever the defaults' fits change: session 5 (joined
# components, two starts, the ring search) gave (0.025, 0.55); session 6 (per-blend windows,
# Schwarz's ring threshold, the residual additions' peaks fixed), with which (0.025, 0.55) gave
# widths 0.85 / 1.16 / 1.62 on the first 200 tuning blends, gives (0.0075, 0.83). Session 7
# (penalty="bic") gives (0.0075, 0.82) in the i band, one grid step away (kept), and each other
# band its own pair, fitted on its own pulls (binned by its own blendedness) of the same 400
# tuning blends (benchmarks/results/flux_error_calibration_bands.json). Session 9 (the learned
# detector's detections at NETWORK_DEBLEND_THRESHOLD, the default since) gave (0.0175, 0.66)
# in the i band, and with its weaker peaks as candidates (candidate_threshold="auto", the
# default since) (0.02, 0.64), each other band its own pair, on the same 400 tuning blends.
# Session 10 (the float32 likelihood without cancellation, `nll_terms`, and the fits' float32
# stopping rule `FIT_RTOL_F32`): the Fisher errors alone give widths 1.13 / 1.52 / 1.90 (from
# 1.70 / 2.80 / 3.58), and the refit (0.005, 0.2) in the i band, 0 - 0.015 and 0.21 - 0.38 in
# the others.
FLUX_ERROR_MODEL = FluxErrorModel(floor=0.005, blend=0.2, bands=(
    ("u", 0.0, 0.25), ("g", 0.0025, 0.21), ("r", 0.0075, 0.21), ("z", 0.015, 0.28),
    ("y", 0.005, 0.38)))


def model_blendedness(models):
    """BTK's blendedness ``1 - <S_k, S_k> / <S_k, sum_j S_j>`` of each fitted galaxy, with its
    model ``S_k`` in place of its true isolated image.

    Args:
        models: [blend, slot, band, S, S] each galaxy's model (zeros for an empty slot).

    Returns:
        [blend, slot, band]; 0 for an empty slot.
    """
    if np.ndim(models) != 5:
        raise ValueError(f"models must be [blend, slot, band, S, S], got shape "
                         f"{np.shape(models)}.")
    b = blendedness(jnp.swapaxes(jnp.asarray(models), 1, 2))  # [blend, band, slot]
    return np.asarray(jnp.swapaxes(b, 1, 2))


# ForwardModelMeasure's detections (see its ``detection``)
DETECTIONS = ("auto", "network", "coadd", "sep", "truth")

# SEP's settings of the default coadd detection: finer deblending than SEP's default (0.005),
# the over-split pieces it makes are merged back by the fit's model comparison (chosen on the
# tuning seeds of benchmarks/bench_deblend.py)
COADD_SEP_KWARGS = {"deblend_cont": 1e-4}

# The heat of a detection of the shipped detector when ForwardModelMeasure fits its detections
# (its ``detection_threshold=None``): chosen for the deblender on the 400 tuning blends of
# benchmarks/bench_deblend.py (session 8; thresholds 0.2, 0.3, 0.45; session 6's rule: most
# targets met, ties to the lower all-galaxy median flux error: 0.0726, 0.0663, 0.0645). The
# detector's own threshold (0.3, its best F1 on its calibration blends) is what `detect` uses;
# the deblender adds the galaxies a stricter detection misses from its residuals.
NETWORK_DEBLEND_THRESHOLD = 0.45


def coadd_detections(image, sky, sigma_noise: float = 1.5, min_area: int = 5,
                     deblend_cont: float = 0.005, deblend_nthresh: int = 32,
                     weights: str = "sed"):
    """SEP's detections on a multi-band coadd of one blend, in units of its known noise.

    The coadd is ``sum_b w_b image_b`` divided by its noise ``sqrt(sum_b w_b^2 sky_b)``
    (background-dominated), so ``sigma_noise`` is in sigmas of the coadd (no background
    estimate). ``weights="sed"``: ``w_b`` = the blend's own flux in band b / sky_b (the matched
    filter of a source with the blend's mean colour; bands where the galaxies are faint do not
    dilute it); ``"flat"``: ``w_b = 1 / sky_b`` (a flat spectrum in electrons).

    Args:
        image: [band, S, S] background-subtracted electrons.
        sky: [band] sky electrons per pixel.
        sigma_noise, min_area, deblend_cont, deblend_nthresh: SEP's ``extract``'s.
        weights: "sed" or "flat".

    Returns:
        An astropy Table with ``x_peak``, ``y_peak`` (SEP's barycentres, pixels).
    """
    if weights not in ("sed", "flat"):
        raise ValueError(f"weights must be 'sed' or 'flat', got {weights!r}.")
    sky = np.asarray(sky, float)
    image = np.asarray(image, float)
    w = 1 / sky
    if weights == "sed":
        f = np.maximum(image.sum(axis=(1, 2)), 0.0)
        w = f / sky if np.any(f > 0) else w
    det = np.einsum("byx,b->yx", image, w) / np.sqrt(np.sum(w * w * sky))
    objs = sep.extract(np.ascontiguousarray(det), sigma_noise, err=1.0, minarea=min_area,
                       deblend_cont=deblend_cont, deblend_nthresh=deblend_nthresh)
    t = Table()
    t["x_peak"], t["y_peak"] = np.asarray(objs["x"], float), np.asarray(objs["y"], float)
    return t


def crop_origins(x, y, mask, stamp_pixels: int, size: int):
    """Lower-left corners [blend] (ox, oy) of ``size``-pixel windows of a stamp centred on each
    blend's detections (the middle of their bounding box; the stamp's centre when there are
    none), kept inside the stamp."""
    x, y, mask = np.asarray(x, float), np.asarray(y, float), np.asarray(mask, bool)
    c = (stamp_pixels - 1) / 2
    lo_x = np.where(mask, x, np.inf).min(axis=1)
    hi_x = np.where(mask, x, -np.inf).max(axis=1)
    lo_y = np.where(mask, y, np.inf).min(axis=1)
    hi_y = np.where(mask, y, -np.inf).max(axis=1)
    any_ = mask.any(axis=1)
    cx = np.where(any_, (np.where(any_, lo_x, 0) + np.where(any_, hi_x, 0)) / 2, c)
    cy = np.where(any_, (np.where(any_, lo_y, 0) + np.where(any_, hi_y, 0)) / 2, c)
    ox = np.clip(np.round(cx - (size - 1) / 2), 0, stamp_pixels - size).astype(int)
    oy = np.clip(np.round(cy - (size - 1) / 2), 0, stamp_pixels - size).astype(int)
    return ox, oy


def crop_sizes(x, y, mask, stamp_pixels: int, margin: float, step: int = 16) -> np.ndarray:
    """Each blend's fit window [blend]: the smallest multiple of ``step`` pixels that holds its
    detections with ``margin`` pixels on each side (at most the stamp; a blend without
    detections gets the window of one)."""
    x, y, mask = np.asarray(x, float), np.asarray(y, float), np.asarray(mask, bool)
    any_ = mask.any(axis=1)
    span_x = np.where(mask, x, -np.inf).max(axis=1) - np.where(mask, x, np.inf).min(axis=1)
    span_y = np.where(mask, y, -np.inf).max(axis=1) - np.where(mask, y, np.inf).min(axis=1)
    span = np.where(any_, np.maximum(np.where(any_, span_x, 0), np.where(any_, span_y, 0)), 0.0)
    need = np.ceil(span + 2 * margin + 1).astype(int)
    return np.minimum(stamp_pixels, -(-need // step) * step).astype(int)


def crop_size(x, y, mask, stamp_pixels: int, margin: float, step: int = 16) -> int:
    """The fit window that holds every blend given (the largest of `crop_sizes`)."""
    return int(crop_sizes(x, y, mask, stamp_pixels, margin, step).max())


def join_concentric(gal: Galaxies, errors: Galaxies | None, mask, models, join_pixels: float):
    """Fitted profiles of one blend whose centres lie within ``join_pixels`` of a brighter
    one's are that galaxy's components (a bulge and a disk fitted as a compact core and an
    extended profile): each is joined to the brightest such galaxy, its flux and model added
    to it (flux errors in quadrature: an upper bound, since two profiles of one centre share
    light and their fluxes are anti-correlated), its slot emptied; the galaxy keeps its
    brightest component's centre and shape (and errors), and for ``model="bulge+disk"`` the
    bulge fraction of the summed flux. Returns (galaxies, errors, mask, models), numpy."""
    gal = jax.tree.map(np.array, gal)
    errors = None if errors is None else jax.tree.map(np.array, errors)
    mask, models = np.array(mask, bool), np.array(models)
    total = gal.flux.sum(axis=-1)
    for b in range(mask.shape[0]):
        slots = [k for k in np.argsort(-total[b]) if mask[b, k]]
        for i, k in enumerate(slots):
            if not mask[b, k]:
                continue
            for j in slots[i + 1:]:
                if mask[b, j] and np.hypot(gal.x[b, j] - gal.x[b, k],
                                           gal.y[b, j] - gal.y[b, k]) < join_pixels:
                    if gal.bulge_frac is not None:  # the bulge's share of the summed flux
                        fk, fj = gal.flux[b, k], gal.flux[b, j]
                        tot = np.where(fk + fj != 0, fk + fj, 1.0)
                        gal.bulge_frac[b, k] = (gal.bulge_frac[b, k] * fk +
                                                gal.bulge_frac[b, j] * fj) / tot
                    gal.flux[b, k] += gal.flux[b, j]
                    models[b, k] += models[b, j]
                    models[b, j] = 0.0
                    if errors is not None:
                        errors.flux[b, k] = np.hypot(errors.flux[b, k], errors.flux[b, j])
                    mask[b, j] = False
    return gal, errors, mask, models


def _check_heat(name: str, value, detection: str, upper: float) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is a heat in (0, ``upper``) and the
    detection is the network's (``detection`` "network" or "auto")."""
    if detection not in ("network", "auto"):
        raise ValueError(f"{name} is the network's; detection is {detection!r}.")
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not (
            0 < value < upper):
        raise ValueError(f"{name} must be None or a heat in (0, {upper:g}), got {value!r}.")


class ForwardModelMeasure:
    """A BTK measure function that fits each batch once and serves every blend from a cache.

    ``MeasureGenerator(ForwardModelMeasure(), draw_generator)`` calls it per blend; the first
    call on a batch detects (``detection``: by default the learned detector on LSST images, SEP
    on the multi-band coadd elsewhere), initializes, fits the whole batch (`fit_blends`, with
    Fisher errors, adding galaxies that the detection missed from the residual:
    ``add_sources``) and renders the models on the whole stamp;
    later calls on the same batch (the same ``blend_images`` object) read the cache.

    The fit runs on a window of the stamp around each blend's detections (``fit_pixels``): the
    likelihood of the pixels in it, which holds the galaxies' light down to ``crop_margin``
    arcsec beyond the outermost detections. Light farther out carries little information, and
    the window's size sets the cost (an FFT box of 72 pixels instead of 128 for LSST 24"
    stamps). Each blend gets its own window (a multiple of 16 pixels, `crop_sizes`; a blend
    without detections the window of one detection), so with one blend per compiled call (the
    CPU default, `default_chunk`) its fit does not depend on the other blends of its batch; the
    batch is fitted in one call per window size, and each new size compiles once (with
    ``chunk`` > 1, each new size and group size).

    Args:
        model: the model fitted: a profile ("sersic", "exponential", "devaucouleurs",
            "gaussian") or "bulge+disk" (an exponential disk and a de Vaucouleurs bulge per
            galaxy, `btkjax.deblend.model`; its ``hlr`` is the disk's).
        max_sources: slots per blend (static shape: more detections are dropped, faintest
            first, and flagged; fewer are masked).
        deblended: "model" (each galaxy's model) or "split" (scarlet's data-weighted split:
            data * model_i / sum_j model_j).
        seg_factor: a galaxy's segmentation is where its model exceeds ``seg_factor`` times the
            sky noise in some band.
        pad_pixels: FFT box = the fit window + this many pixels (`fit_spec`).
        fit_pixels: "auto" (each blend's `crop_sizes` of its detections with
            ``crop_margin``), a window side in pixels, or None (the whole stamp).
        crop_margin: arcsec kept around the detections by ``fit_pixels="auto"``.
        errors: compute the Fisher errors (``*_err`` columns).
        add_sources: galaxies per blend that SEP missed, looked for in the residual of the fit
            and added when significant (`fit_blends`'s ``add_sources``; 0: exactly SEP's
            detections). The default, 2, is what beats SEP on blended galaxies in
            ``benchmarks/bench_deblend.py``: without it a galaxy's model absorbs the light of an
            undetected neighbour.
        asymmetry_sources: galaxies per blend hidden in a fitted galaxy's light, looked for in
            the antisymmetric part of its light about its centre before the residual rounds
            (`fit_blends`'s ``asymmetry_sources``, `asymmetry_peaks`) and added when the
            likelihood says so; 0: none. The default, 2, was chosen on the tuning seeds of
            ``benchmarks/bench_deblend.py`` (more blendedness > 0.5 galaxies matched).
        ring_sources: `fit_blends`'s ring search (a galaxy proposed beside the one with the
            largest residual excess, in this many directions; 0: none). The default, 6, was
            chosen on the tuning seeds (session 5, Akaike's threshold, batch-wide windows:
            blendedness > 0.5, 66 -> 81 of 133 matched, for twice the CPU time; see the README
            for this setup's numbers). Its acceptance threshold is `fit_blends`'s ``ring_penalty`` (a
            keyword passed through; default "bic").
        penalty: `fit_blends`'s ``penalty``, the information criterion of the additions,
            splits, merges and moves: "bic" (the default since session 7: Schwarz's, half a
            galaxy's 12 parameters times the log of the pixel values fitted, ~57 on a
            48-pixel, 6-band window), "aic" (Akaike's, 12: the earlier default) or a number.
            On the 400 tuning blends of ``benchmarks/bench_deblend.py`` Schwarz's criterion
            gave a lower median flux error in every blendedness bin (blendedness > 0.5: 0.399
            -> 0.382, all galaxies 0.0694 -> 0.0667) for 198 -> 186 of 271 heavy galaxies
            matched: fewer pieces of misfit galaxies kept as galaxies.
        multi_start: `fit_blends`'s two starts of every refit (from scratch and from the fit
            as it is; default True: on the tuning seeds the median flux error of all galaxies
            0.0719 -> 0.0650).
        join_pixels: None (each fitted profile is a galaxy) or a distance in pixels: profiles
            whose centres lie closer than it to a brighter one's are that galaxy's components
            (`join_concentric`: a bulge and a disk fitted as a compact core and an extended
            profile) and reported as one galaxy, their fluxes and models summed. Default 1.0
            (0.2" on LSST, a sixth of its PSF's FWHM: two galaxies that close are not
            resolved).
        dtype: fit dtype (default the images'; float64 needs jax_enable_x64).
        name: the name under which `MeasureGenerator` reports it.
        sep_kwargs: keyword arguments of the detection (`sep_singleband_measure`, or
            `coadd_detections` for ``detection="coadd"``).
        detection: "sep" (SEP on the i band, `sep_singleband_measure`: the detections SEP and
            scarlet2 get), "coadd" (SEP on the multi-band S/N coadd, `coadd_detections`),
            "network" (the learned detector ``detector``, `btkjax.deblend.detector`), "auto"
            ("network" where the images have the detector's
            bands and pixel scale, else "coadd"; the one used is ``last_detection``), or
            "truth" (the true centres, ``x_peak`` and ``y_peak`` of the batch's
            ``blend_list``, as BTK's scarlet tutorial gave scarlet: what the deblender does
            when detection is not the limit, a diagnostic).
        detector: the `Detector` of ``detection="network"`` or "auto", a path to one
            (`load_detector`), or None (the shipped LSST detector, trained by
            ``benchmarks/train_detector.py``); its bands and pixel scale must be the images'.
        candidate_threshold: "auto" (the default: the detector's own threshold, its best F1
            on its calibration blends, when ``detection_threshold`` is above it: 0.3 for the
            shipped detector at 0.45; else none), None (no candidates), or a heat below
            ``detection_threshold``: the network's peaks between the two are not detections
            but candidates, each tried in the fit (`fit_blends`'s ``candidates``: kept when
            the likelihood says so, by ``penalty``). Chosen on the 400 tuning blends (session
            9; session 6's rule): blendedness > 0.5, 193 -> 195 of 271 matched, median
            |dflux/flux| 0.302 -> 0.294; all galaxies 0.0645 -> 0.0651.
        detection_threshold: the heat of a network detection (default: 0.45,
            `NETWORK_DEBLEND_THRESHOLD`, for the shipped detector, chosen for the deblender on
            the tuning blends; a given detector's own threshold otherwise).
        prior: "auto" (the default: `SERSIC_INDEX_PRIOR` on the index for model="sersic",
            `BULGE_DISK_PRIOR` on the bulge for model="bulge+disk",
            nothing else), None (none), a `Prior`, or "catalog": `catalog_prior` of the
            embedded default CatSim catalog as the batch's survey sees it (computed once per
            survey), with `SERSIC_INDEX_PRIOR` for model="sersic" (`BULGE_DISK_PRIOR` for
            "bulge+disk").
        split_sources, merge_sources, move_sources: `fit_blends`'s model comparisons (a
            galaxy split in two, two merged into one, or a piece of a galaxy moved to a
            neighbour the detection missed, when the likelihood says so).
        start_hlr: `fit_blends`'s compact start (arcsec; None: the moments' shapes).
        colour_width: None (the default: no colour prior) or a number: `colour_prior` of the
            embedded default CatSim catalog (the population's colours as the batch's survey
            sees them; one SED per galaxy), its covariance scaled by ``colour_width**2``, added
            to ``prior``.
        flux_errors: the `FluxErrorModel` of the ``{band}_flux_err`` columns (default
            `FLUX_ERROR_MODEL`, calibrated on each LSST band's pulls of simulated blends with
            the default setup; a band is looked up by its name, whatever the survey, and bands
            it does not name take the i band's coefficients; other surveys are not measured);
            None: the Fisher errors.

    The defaults (a free-index Sersic profile with a prior on the index, the learned detector
    where it applies, splits, merges and moves, compact start) are the setup chosen on the
    tuning seeds of ``benchmarks/bench_deblend.py`` and reported on others in the README. On
    the 400 tuning blends the network's detections (threshold 0.45) took the blendedness > 0.5
    galaxies from 186 of 271 matched at a median |dflux/flux| of 0.382 (``detection="coadd"``,
    session 7's default) to 193 at 0.302, for 0.6x the CPU time;
    ``model="exponential", detection="sep", split_sources=False,
    merge_sources=False, start_hlr=None`` is the earlier default (exponential profiles on
    SEP's i-band detections); ``model="exponential"`` alone is 2.3x cheaper.
        **fit_kwargs: passed to `fit_blends` and `fit` (max_steps, chunk, prior,
            residual_kwargs, ...).

    Catalog columns: ``ra``, ``dec`` (arcsec), ``x_peak``, ``y_peak`` (pixels), ``{band}_flux``
    (electrons), ``hlr`` (arcsec), ``g1``, ``g2`` (reduced shear), ``e1``, ``e2`` (distortion,
    comparable with `btkjax.metrics.moments_ellipticity`), ``n`` (Sersic index), their 1-sigma
    Fisher errors ``x_peak_err``, ``y_peak_err``, ``hlr_err``, ``g1_err``, ``g2_err`` (and
    ``n_err`` for model="sersic"; NaN where the Hessian was not positive definite, see the
    status), the flux errors ``{band}_flux_err`` of ``flux_errors`` (the Fisher errors in
    ``{band}_flux_err_fisher``), ``{band}_blendedness`` (`model_blendedness`), ``added``
    (found in the residual, ``add_sources``), ``status`` and ``n_steps`` (the blend's),
    ``chi2_per_pixel`` (over the blend's fit window).
    """

    def __init__(self, model: str = "sersic", max_sources: int = 6, deblended="model",
                 seg_factor: float = 3.0, pad_pixels: int = 8, fit_pixels="auto",
                 crop_margin: float = 3.2, errors: bool = True, add_sources: int = 2,
                 asymmetry_sources: int = 2, join_pixels: float | None = 1.0,
                 ring_sources: int = 6, penalty: float | str = "bic",
                 multi_start: bool = True,
                 dtype=None, name: str = "forward_model", sep_kwargs=None,
                 detection: str = "auto", prior="auto", split_sources: bool = True,
                 merge_sources: bool = True, move_sources: bool = True,
                 start_hlr: float | None = 0.1,
                 flux_errors: FluxErrorModel | None = FLUX_ERROR_MODEL,
                 colour_width: float | None = None, detector=None,
                 detection_threshold: float | None = None,
                 candidate_threshold: float | str | None = "auto", **fit_kwargs):
        if detection not in DETECTIONS:
            raise ValueError(f"detection must be one of {DETECTIONS}, got {detection!r}.")
        self.detection = detection
        if not (detector is None or isinstance(detector, Detector | str | os.PathLike)):
            raise TypeError(f"detector must be None, a btkjax.deblend.Detector or a path, got "
                            f"{detector!r}.")
        if detection in ("network", "auto") and detector is None and detection_threshold is None:
            detection_threshold = NETWORK_DEBLEND_THRESHOLD  # the shipped detector's, for fits
        if detection in ("network", "auto") and not isinstance(detector, Detector):
            detector = load_detector(None if detector is None else os.fspath(detector))
        own = detector.threshold if isinstance(detector, Detector) else None
        if detection_threshold is not None:
            _check_heat("detection_threshold", detection_threshold, detection, 1.0)
            detector = detector._replace(threshold=float(detection_threshold))
        self.detector = detector
        if isinstance(candidate_threshold, str):
            if candidate_threshold != "auto":
                raise ValueError(f"candidate_threshold must be 'auto', None or a heat, got "
                                 f"{candidate_threshold!r}.")
            # the detector's own threshold (its best F1), where the fit starts above it
            candidate_threshold = own if own is not None and own < detector.threshold else None
        if candidate_threshold is not None:  # below the detection threshold
            _check_heat("candidate_threshold", candidate_threshold, detection,
                        detector.threshold if detector is not None else 1.0)
        self.candidate_threshold = candidate_threshold
        if not (prior is None or isinstance(prior, Prior) or
                (isinstance(prior, str) and prior in ("auto", "catalog"))):
            raise ValueError(f"prior must be None, 'auto', 'catalog' or a btkjax.deblend.Prior, "
                             f"got {prior!r}.")
        if "prior" in fit_kwargs:
            raise TypeError("prior is given once, as ForwardModelMeasure's own argument.")
        self.prior = prior
        if colour_width is not None and (
                isinstance(colour_width, bool) or
                not isinstance(colour_width, int | float | np.floating) or
                not (math.isfinite(colour_width) and colour_width > 0)):
            raise ValueError(f"colour_width must be None or a finite number > 0, got "
                             f"{colour_width!r}.")
        self.colour_width = colour_width
        self._priors = {}
        if flux_errors is not None:
            if not isinstance(flux_errors, FluxErrorModel):
                raise TypeError(f"flux_errors must be a btkjax.deblend.FluxErrorModel or "
                                f"None, got {flux_errors!r}.")
            numbers = [("floor", flux_errors.floor), ("blend", flux_errors.blend)]
            if not isinstance(flux_errors.bands, tuple | list):
                raise TypeError(f"FluxErrorModel.bands must be a tuple of (band, floor, blend), "
                                f"got {flux_errors.bands!r}.")
            seen = set()
            for item in flux_errors.bands:
                if not (isinstance(item, tuple | list) and len(item) == 3 and
                        isinstance(item[0], str)) or item[0] in seen:
                    raise TypeError(f"FluxErrorModel.bands must hold (band, floor, blend) with "
                                    f"each band named once, got {item!r}.")
                seen.add(item[0])
                numbers += [(f"bands[{item[0]!r}].floor", item[1]),
                            (f"bands[{item[0]!r}].blend", item[2])]
            for k, v in numbers:
                if isinstance(v, bool) or not isinstance(v, int | float | np.floating):
                    raise TypeError(f"FluxErrorModel.{k} must be a number, got {v!r}.")
                if not (math.isfinite(v) and v >= 0):
                    raise ValueError(f"FluxErrorModel.{k} must be finite and >= 0, got {v!r}.")
        self.flux_errors = flux_errors
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
        if deblended not in ("model", "split"):
            raise ValueError(f"deblended must be 'model' or 'split', got {deblended!r}.")
        if not (fit_pixels is None or fit_pixels == "auto" or
                (isinstance(fit_pixels, int | np.integer) and fit_pixels > 0)):
            raise ValueError(f"fit_pixels must be 'auto', a positive number of pixels or None, "
                             f"got {fit_pixels!r}.")
        if not crop_margin >= 0:
            raise ValueError(f"crop_margin must be >= 0 arcsec, got {crop_margin!r}.")
        self.model = model
        self.max_sources = int(max_sources)
        self.deblended = deblended
        self.seg_factor = float(seg_factor)
        self.pad_pixels = int(pad_pixels)
        self.fit_pixels = fit_pixels
        self.crop_margin = float(crop_margin)
        self.errors = bool(errors)
        if not (isinstance(add_sources, int | np.integer) and add_sources >= 0):
            raise ValueError(f"add_sources must be a number of galaxies >= 0, got "
                             f"{add_sources!r}.")
        self.add_sources = int(add_sources)
        if isinstance(asymmetry_sources, bool) or not (
                isinstance(asymmetry_sources, int | np.integer) and asymmetry_sources >= 0):
            raise ValueError(f"asymmetry_sources must be a number of galaxies >= 0, got "
                             f"{asymmetry_sources!r}.")
        self.asymmetry_sources = int(asymmetry_sources)
        if join_pixels is not None and (
                isinstance(join_pixels, bool) or
                not isinstance(join_pixels, int | float | np.integer | np.floating) or
                not (math.isfinite(join_pixels) and join_pixels > 0)):
            raise ValueError(f"join_pixels must be None or a finite number of pixels > 0, got "
                             f"{join_pixels!r}.")
        self.join_pixels = join_pixels
        if isinstance(ring_sources, bool) or not (
                isinstance(ring_sources, int | np.integer) and ring_sources >= 0):
            raise ValueError(f"ring_sources must be a number of directions >= 0, got "
                             f"{ring_sources!r}.")
        self.ring_sources = int(ring_sources)
        check_penalty("penalty", penalty)
        self.penalty = penalty
        self.multi_start = bool(multi_start)
        self.dtype = dtype
        self.__name__ = name
        if sep_kwargs is None:
            sep_kwargs = dict(COADD_SEP_KWARGS) if detection in ("coadd", "auto") else {}
        self.sep_kwargs = dict(sep_kwargs)
        self.fit_kwargs = {"split_sources": bool(split_sources),
                           "merge_sources": bool(merge_sources),
                           "move_sources": bool(move_sources), "start_hlr": start_hlr,
                           **fit_kwargs}
        self._key = None
        self._cache = None
        self._specs = {}
        self.n_fits = 0  # batches fitted (the cache's misses)
        self.last_fit_pixels = None  # the last batch's window sides [blend] (pixels)
        self.last_detection = None  # the last batch's detection ("auto" resolved)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_key"], state["_cache"], state["_specs"] = None, None, {}
        return state

    def _setup(self, batch, surveys, survey_name):
        images, wcs, multires = select_survey(batch, surveys, survey_name)
        psfs = batch["psf"] if not multires else batch["psf"][survey_name or surveys[0].name]
        survey = None
        if surveys:
            name = survey_name or surveys[0].name
            survey = next((s for s in surveys if s.name == name), surveys[0])
        if survey is None:
            raise ValueError("ForwardModelMeasure needs the surveys (MeasureGenerator gives "
                             "them as the `surveys` keyword).")
        pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
        bands = list(survey.available_filters)
        sky = np.array([get_mean_sky_level(survey, survey.get_filter(b)) for b in bands])
        return images, wcs, multires, psfs, pixel_scale, bands, sky, self.resolve_prior(survey)

    def resolve_detection(self, bands, pixel_scale: float) -> str:
        """The detection run on images of ``bands`` and ``pixel_scale`` (arcsec): ``detection``,
        with "auto" resolved ("network" where they are the detector's, else "coadd")."""
        if self.detection != "auto":
            return self.detection
        try:
            check_detector_inputs(self.detector, bands, pixel_scale)
        except ValueError:
            return "coadd"
        return "network"

    def resolve_prior(self, survey) -> Prior | None:
        """The `Prior` fitted on ``survey``'s images (see ``prior`` and ``colour_width``)."""
        prior = self._base_prior(survey)
        if self.colour_width is None:
            return prior
        key = ("colours", survey.name)
        if key not in self._priors:
            self._priors[key] = colour_prior(CatsimCatalog.default(), survey)
        cp = self._priors[key]
        if prior is not None and np.ndim(prior.colour_icov):
            raise ValueError("colour_width adds the catalog's colour prior, but the prior given "
                             "has colour terms already; give colour_width=None or a Prior "
                             "without colour_mean / colour_icov.")
        return (prior or Prior())._replace(colour_mean=cp.colour_mean,
                                           colour_icov=cp.colour_icov / self.colour_width**2)

    def _base_prior(self, survey) -> Prior | None:
        if self.prior == "catalog" and survey.name not in self._priors:
            self._priors[survey.name] = catalog_prior(CatsimCatalog.default(), survey)
        prior = self._priors.get(survey.name) if self.prior == "catalog" else (
            None if isinstance(self.prior, str) else self.prior)
        if isinstance(self.prior, str) and self.model == "sersic":
            return (prior or Prior())._replace(n_mean=SERSIC_INDEX_PRIOR.n_mean,
                                               n_width=SERSIC_INDEX_PRIOR.n_width)
        if isinstance(self.prior, str) and self.model == "bulge+disk":
            keep = ("bulge_logit_mean", "bulge_logit_width", "log_bulge_ratio_mean",
                    "log_bulge_ratio_width")
            return (prior or Prior())._replace(**{k: getattr(BULGE_DISK_PRIOR, k) for k in keep})
        return prior

    def _spec(self, size, pixel_scale, psfs, dtype):
        """(spec, psf_k) of a ``size``-pixel fit window, cached per size and PSFs."""
        ids = tuple(id(p) for p in psfs)
        if self._specs.get("psfs") != ids or self._specs.get("dtype") != dtype:
            # keep the PSF objects alive: their ids stay unique
            self._specs = {"psfs": ids, "dtype": dtype, "objects": psfs}
        key = (int(size), float(pixel_scale))
        if key not in self._specs:
            spec = fit_spec(int(size), pixel_scale, psfs, self.model, self.pad_pixels)
            cdtype = jnp.complex128 if dtype == np.float64 else jnp.complex64
            psf_k = jnp.asarray(np.stack([psf_kimage_from_galsim(p, spec) for p in psfs]),
                                cdtype)
            self._specs[key] = (spec, psf_k)
        return self._specs[key]

    def _fit_batch(self, batch, channels_last, surveys, survey_name):
        images, wcs, multires, psfs, pixel_scale, bands, sky, prior = self._setup(
            batch, surveys, survey_name)
        images = np.asarray(images)
        if channels_last:
            images = np.moveaxis(images, -1, 1)
        dtype = np.dtype(self.dtype or images.dtype)
        if dtype == np.float32 and jax.config.jax_enable_x64:
            dtype = np.dtype(np.float64)  # see fit_blends: optax's L-BFGS under x64
        s = images.shape[-1]
        detections, det_flux, cands = [], [], []
        detection = self.resolve_detection(bands, pixel_scale)
        self.last_detection = detection
        if detection == "network":
            check_detector_inputs(self.detector, bands, pixel_scale)
        for i in range(images.shape[0]):
            if detection == "network":
                # one blend per call: the same program for every blend, so its detections are
                # bit for bit the same in any batch (a batched convolution may block its sums
                # differently with the batch size)
                nx, ny, heat, nmask = detect(
                    self.detector, images[i:i + 1], sky, max_peaks=2 * self.max_sources,
                    threshold=self.candidate_threshold)
                strong = nmask[0] & (heat[0] > self.detector.threshold)
                weak = nmask[0] & ~strong
                cat = Table({"x_peak": nx[0][strong].astype(float),
                             "y_peak": ny[0][strong].astype(float)})
                cands.append((nx[0][weak].astype(float), ny[0][weak].astype(float)))
            elif detection == "truth":
                truth = batch["blend_list"]
                if multires:  # one blend list per survey
                    truth = truth[survey_name or surveys[0].name]
                cat = truth[i]
            elif detection == "coadd":
                cat = coadd_detections(images[i], sky, **self.sep_kwargs)
            else:
                cat = sep_singleband_measure(batch, i, channels_last=channels_last,
                                             surveys=surveys, survey_name=survey_name,
                                             **self.sep_kwargs)["catalog"]
            detections.append(cat)
            xi = np.clip(np.round(np.asarray(cat["x_peak"])).astype(int), 0, s - 1)
            yi = np.clip(np.round(np.asarray(cat["y_peak"])).astype(int), 0, s - 1)
            det_flux.append((images[i] / sky[:, None, None]).sum(0)[yi, xi])
        x, y, mask, too_many = pad_detections(detections, self.max_sources, det_flux)
        candidates = None
        if cands and max(len(c[0]) for c in cands):  # the network's weak peaks, strongest first
            kc = max(len(c[0]) for c in cands)
            cx, cy = np.zeros((len(cands), kc)), np.zeros((len(cands), kc))
            cm = np.zeros((len(cands), kc), bool)
            for b, (px, py) in enumerate(cands):
                cx[b, :len(px)], cy[b, :len(px)], cm[b, :len(px)] = px, py, True
            candidates = (cx, cy, cm)
        if self.fit_pixels is None:
            sizes = np.full(len(images), s)
        elif self.fit_pixels == "auto":  # each blend's own window: no blend sees the batch
            sizes = crop_sizes(x, y, mask, s, self.crop_margin / pixel_scale)
        else:
            sizes = np.full(len(images), min(int(self.fit_pixels), s))
        parts = []
        for size in np.unique(sizes):  # one fit per window size (each compiles once)
            sel = np.flatnonzero(sizes == size)
            ox, oy = crop_origins(x[sel], y[sel], mask[sel], s, int(size))
            rows = oy[:, None] + np.arange(size)[None, :]
            cols = ox[:, None] + np.arange(size)[None, :]
            window = images[sel[:, None, None, None],
                            np.arange(images.shape[1])[None, :, None, None],
                            rows[:, None, :, None], cols[:, None, None, :]]
            spec, psf_k = self._spec(int(size), pixel_scale, psfs, dtype)
            res = fit_blends(jnp.asarray(window, dtype),
                             (x[sel] - ox[:, None], y[sel] - oy[:, None], mask[sel]), psf_k,
                             spec, sky, errors=self.errors, add_sources=self.add_sources,
                             asymmetry_sources=self.asymmetry_sources,
                             ring_sources=self.ring_sources, multi_start=self.multi_start,
                             penalty=self.penalty, prior=prior,
                             candidates=None if candidates is None else (
                                 candidates[0][sel] - ox[:, None],
                                 candidates[1][sel] - oy[:, None], candidates[2][sel]),
                             **self.fit_kwargs)
            gal = jax.tree.map(np.asarray, res.galaxies)
            gal = gal._replace(x=gal.x + ox[:, None], y=gal.y + oy[:, None])
            parts.append((sel, {
                "galaxies": gal,
                "errors": None if res.errors is None else jax.tree.map(np.asarray, res.errors),
                "mask": np.asarray(res.mask), "added": np.asarray(res.added),
                "status": np.asarray(res.status), "n_steps": np.asarray(res.n_steps),
                "chi2": np.asarray(res.chi2) / res.n_pixels}))

        def gather(*leaves):  # the parts' [blend, ...] arrays back in the batch's order
            out = np.empty((len(images),) + leaves[0].shape[1:], leaves[0].dtype)
            for (sel, _), leaf in zip(parts, leaves, strict=True):
                out[sel] = leaf
            return out

        fitted = jax.tree.map(gather, *(p for _, p in parts))
        fitted["status"] = fitted["status"] | np.where(too_many, STATUS_TOO_MANY,
                                                       0).astype(np.int32)
        gal, errors, mask = fitted["galaxies"], fitted["errors"], fitted["mask"]
        full_spec, full_psf_k = self._spec(s, pixel_scale, psfs, dtype)
        models = np.asarray(model_images(jax.tree.map(jnp.asarray, gal), jnp.asarray(mask),
                                         full_psf_k, full_spec))
        if self.join_pixels:
            gal, errors, mask, models = join_concentric(gal, errors, mask, models,
                                                        self.join_pixels)
        self.n_fits += 1
        self.last_fit_pixels = sizes
        return {
            "galaxies": gal,
            "errors": errors,
            "mask": mask, "added": fitted["added"],
            "status": fitted["status"],
            "n_steps": fitted["n_steps"], "chi2": fitted["chi2"],
            "models": models, "blendedness": model_blendedness(models), "images": images,
            "sky": sky, "bands": bands, "wcs": wcs, "multires": multires,
        }

    def __call__(self, batch, idx, channels_last=False, surveys=None, survey_name=None,
                 **kwargs):
        images_obj = batch["blend_images"]
        if self._key is not images_obj:
            self._cache = self._fit_batch(batch, channels_last, surveys, survey_name)
            self._key = images_obj
        c = self._cache
        m = c["mask"][idx]
        gal = jax.tree.map(lambda a: a[idx][m], c["galaxies"])
        t = Table()
        t["ra"], t["dec"] = pixel_to_arcsec(c["wcs"], gal.x, gal.y)
        t["x_peak"], t["y_peak"] = gal.x.astype(float), gal.y.astype(float)
        for b, band in enumerate(c["bands"]):
            t[f"{band}_flux"] = gal.flux[:, b].astype(float)
        t["hlr"] = gal.hlr.astype(float)
        t["g1"], t["g2"] = gal.g1.astype(float), gal.g2.astype(float)
        gsq = gal.g1**2 + gal.g2**2
        t["e1"], t["e2"] = 2 * gal.g1 / (1 + gsq), 2 * gal.g2 / (1 + gsq)
        t["n"] = gal.n.astype(float)
        blend_k = c["blendedness"][idx][m]  # [n, band]
        for b, band in enumerate(c["bands"]):
            t[f"{band}_blendedness"] = blend_k[:, b].astype(float)
        if gal.bulge_frac is not None:
            for b, band in enumerate(c["bands"]):
                t[f"{band}_bulge_frac"] = gal.bulge_frac[:, b].astype(float)
            t["bulge_hlr"] = gal.bulge_hlr.astype(float)
        if c["errors"] is not None:
            err = jax.tree.map(lambda a: a[idx][m], c["errors"])
            t["x_peak_err"], t["y_peak_err"] = err.x.astype(float), err.y.astype(float)
            fisher = err.flux.astype(float)
            flux_err = fisher
            if self.flux_errors is not None:
                f = gal.flux.astype(float)
                fl, bl = np.array([self.flux_errors.coefficients(band)
                                   for band in c["bands"]], float).reshape(-1, 2).T
                flux_err = np.sqrt(fisher**2 + (fl * f) ** 2 + (bl * blend_k * f) ** 2)
            for b, band in enumerate(c["bands"]):
                t[f"{band}_flux_err"] = flux_err[:, b]
                t[f"{band}_flux_err_fisher"] = fisher[:, b]
            t["hlr_err"] = err.hlr.astype(float)
            t["g1_err"], t["g2_err"] = err.g1.astype(float), err.g2.astype(float)
            if self.model == "sersic":
                t["n_err"] = err.n.astype(float)
            if err.bulge_frac is not None:
                for b, band in enumerate(c["bands"]):
                    t[f"{band}_bulge_frac_err"] = err.bulge_frac[:, b].astype(float)
                t["bulge_hlr_err"] = err.bulge_hlr.astype(float)
        n = int(m.sum())
        t["added"] = c["added"][idx][m]
        t["status"] = np.full(n, int(c["status"][idx]), dtype=int)
        t["n_steps"] = np.full(n, int(c["n_steps"][idx]), dtype=int)
        t["chi2_per_pixel"] = np.full(n, float(c["chi2"][idx]))
        if c["multires"]:
            return {"catalog": t}
        models = c["models"][idx][m]  # [n, band, S, S]
        image = c["images"][idx]
        if self.deblended == "split":
            total = models.sum(axis=0, keepdims=True)
            frac = np.where(total > 0, models / np.where(total > 0, total, 1.0), 0.0)
            deblended = image[None] * frac
        else:
            deblended = models
        noise = np.sqrt(c["sky"])[None, :, None, None]
        segmentation = np.any(models > self.seg_factor * noise, axis=1)
        dtype = np.asarray(batch["blend_images"]).dtype if not c["multires"] else image.dtype
        deblended = deblended.astype(dtype)
        if channels_last:
            deblended = np.moveaxis(deblended, 1, -1)
        return {"catalog": t, "segmentation": segmentation, "deblended_images": deblended}
