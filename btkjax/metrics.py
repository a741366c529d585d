r"""Metrics: how well detections, segmentations and deblended images match the truth.

`MetricsGenerator` wraps a `btkjax.measure.MeasureGenerator`. For every batch it matches true
galaxies to detections (`btkjax.match`) and computes, for every measure function:

- detection (per batch): true and false positives, false negatives, precision
  ``tp / n_detected``, recall ``tp / n_true``, F1 (their harmonic mean), and the efficiency matrix
  ``eff_matrix[k, n]``: the percentage of blends of ``n`` true galaxies in which ``k`` were
  detected (matched); shape [max_number + 2, max_number + 1], columns sum to 100 (or 0 where no
  blend has n galaxies; ``eff_matrix_counts`` has the counts);
- segmentation (per galaxy): the intersection over union of the detection's segmentation with
  the true one, the pixels of the isolated galaxy above ``noise_threshold_factor`` times the sky
  noise in ``meas_band_name`` (BTK's definition);
- reconstruction (per matched galaxy, all bands): ``mse`` (also ``msr``, BTK's name; a true mean
  square, not BTK 1.0's root mean square), ``psnr`` and ``ssim`` (definitions in
  `btkjax.jax_metrics`, same numbers), and the target measures of the deblended image;
- per galaxy, in ``galaxy_summary``: every column of the blend tables, ``blend_id``,
  ``detected``, ``match_detected_id``, ``distance_detection``, ``distance_closest_galaxy`` (pixels,
  NaN when alone), ``blendedness`` :math:`1 - \langle S_k, S_k\rangle / \langle S_k,
  S_{all}\rangle` (:math:`S_{all}` the noiseless blend, the sum of the isolated images), ``snr``
  :math:`\sqrt{\sum_{pix} S_k^2 / (sky + S_k)}`, both in ``meas_band_name``, then ``iou``, the
  reconstruction metrics, and for each target measure ``{name}`` (deblended) and
  ``{name}_true`` (isolated), with ``{name}{i}`` for the i-th output of a function returning
  several numbers (the tutorial's ``ellipticity0``, ``flux0``).

``next(metrics_generator)`` returns ``(blend_results, meas_results, results)`` with
``results[key][measure_name]`` for ``key`` in ("detection", "segmentation", "reconstruction",
"galaxy_summary", "matches"). With several surveys every such entry is a dict keyed by survey
name (``results["galaxy_summary"][measure_name][survey_name]``), as BTK 0.9 does;
``meas_band_name`` then gives one band per survey (or one name present in all).

The NumPy image metrics here (`mse`, `psnr`, `ssim`, `chi2`, `moments_ellipticity`,
`aperture_flux`) have the definitions of their JAX twins in `btkjax.jax_metrics`.
"""

from __future__ import annotations

import os

import galsim
import numpy as np
import sep
from astropy.table import Table, vstack

from btkjax.jax_metrics import ssim_window
from btkjax.match import MatchResult, as_matcher
from btkjax.survey import get_mean_sky_level

__all__ = [
    "MetricsGenerator",
    "compute_metrics",
    "detection_metrics",
    "efficiency_matrix",
    "true_segmentation",
    "iou",
    "mse",
    "psnr",
    "ssim",
    "chi2",
    "moments_ellipticity",
    "aperture_flux",
    "aperture_weights",
    "blendedness",
    "snr",
    "meas_ksb_ellipticity",
    "meas_fixed_aperture",
    "meas_moments_ellipticity",
    "METRIC_GROUPS",
]

METRIC_GROUPS = ("detection", "segmentation", "reconstruction")
_IMAGE_AXES = (-3, -2, -1)


# -- image metrics (NumPy twins of btkjax.jax_metrics) ------------------------------------------


def mse(true, pred):
    """Mean squared error over the last three axes (band, y, x)."""
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    return np.mean((true - pred) ** 2, axis=_IMAGE_AXES)


def _peak(true, data_range):
    return np.max(true, axis=_IMAGE_AXES) if data_range is None else np.asarray(data_range, float)


def psnr(true, pred, data_range=None):
    """``10 log10(data_range^2 / mse)``; data_range defaults to the peak of ``true``."""
    true = np.asarray(true, dtype=float)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(_peak(true, data_range) ** 2 / mse(true, pred))


def _filter_valid(images, w):
    n = len(w)
    h, wd = images.shape[-2:]
    out = sum(w[k] * images[..., k : h - n + 1 + k, :] for k in range(n))
    return sum(w[k] * out[..., :, k : wd - n + 1 + k] for k in range(n))


def ssim(true, pred, data_range=None, gaussian_weights=True, sigma=1.5, win_size=None,
         use_sample_covariance=None, K1=0.01, K2=0.03):
    """Structural similarity over [..., band, y, x] (mean over window positions and bands).

    See `btkjax.jax_metrics.ssim` for the arguments; defaults: the Gaussian 11x11 window of
    Wang et al. (sigma 1.5, population covariance), ``data_range`` the peak of ``true``.
    """
    true, pred = np.asarray(true, dtype=float), np.asarray(pred, dtype=float)
    if true.shape != pred.shape:
        raise ValueError(
            f"true and pred must have the same shape, got {true.shape} and {pred.shape}."
        )
    w = ssim_window(gaussian_weights, sigma, win_size)
    if use_sample_covariance is None:
        use_sample_covariance = not gaussian_weights
    n_points = len(w) ** 2
    cov_norm = n_points / (n_points - 1.0) if use_sample_covariance else 1.0
    peak = np.asarray(_peak(true, data_range))[..., None, None, None]
    c1, c2 = (K1 * peak) ** 2, (K2 * peak) ** 2
    ux, uy = _filter_valid(true, w), _filter_valid(pred, w)
    vx = cov_norm * (_filter_valid(true * true, w) - ux * ux)
    vy = cov_norm * (_filter_valid(pred * pred, w) - uy * uy)
    vxy = cov_norm * (_filter_valid(true * pred, w) - ux * uy)
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return np.mean(smap, axis=_IMAGE_AXES)


def chi2(data, model, sky_level):
    """``sum((data - model)^2 / (sky + max(model, 0)))`` over band, y, x (sky per band or
    scalar)."""
    data, model = np.asarray(data, dtype=float), np.asarray(model, dtype=float)
    sky = np.asarray(sky_level, dtype=float)
    if sky.ndim == 1:
        sky = sky[:, None, None]
    return np.sum((data - model) ** 2 / (sky + np.maximum(model, 0.0)), axis=_IMAGE_AXES)


def moments_ellipticity(images, sigma=3.0, x=None, y=None):
    """(e1, e2) [..., 2] of Gaussian-weighted second moments about (x, y) (default: the stamp
    center); see `btkjax.jax_metrics.moments_ellipticity`."""
    images = np.asarray(images, dtype=float)
    ny, nx = images.shape[-2:]
    xc = np.asarray((nx - 1) / 2.0 if x is None else x, dtype=float)[..., None, None]
    yc = np.asarray((ny - 1) / 2.0 if y is None else y, dtype=float)[..., None, None]
    sig = np.asarray(sigma, dtype=float)[..., None, None]
    dx = np.arange(nx) - xc
    dy = np.arange(ny)[:, None] - yc
    wi = np.exp(-0.5 * (dx**2 + dy**2) / sig**2) * images
    qxx = np.sum(wi * dx * dx, axis=(-2, -1))
    qyy = np.sum(wi * dy * dy, axis=(-2, -1))
    qxy = np.sum(wi * dx * dy, axis=(-2, -1))
    return np.stack([(qxx - qyy) / (qxx + qyy), 2 * qxy / (qxx + qyy)], axis=-1)


def _segment_area(u, r):
    uc = np.clip(u, -r, r)
    s = np.sqrt(np.maximum(r * r - uc * uc, 0.0))
    return 0.5 * (uc * s + r * r * np.arctan2(uc, s))


def _corner_area(u, v, r):
    av = np.minimum(np.abs(v), r)
    w = np.sqrt(np.maximum(r * r - av * av, 0.0))
    g = (_segment_area(np.minimum(u, -w), r) - _segment_area(-r, r)
         + av * (np.clip(u, -w, w) + w)
         + _segment_area(np.maximum(u, w), r) - _segment_area(w, r))
    return np.sign(v) * g


def aperture_weights(shape, x, y, radius, method="exact", softness=0.5):
    """Per-pixel weights [..., y, x] of circular apertures: the exact fraction of each pixel in
    the circle, or a sigmoid soft edge; see `btkjax.jax_metrics.aperture_weights`."""
    ny, nx = shape
    xs, ys = np.arange(nx, dtype=float), np.arange(ny, dtype=float)[:, None]
    xc = np.asarray(x, dtype=float)[..., None, None]
    yc = np.asarray(y, dtype=float)[..., None, None]
    r = np.asarray(radius, dtype=float)[..., None, None]
    if method == "exact":
        u0, u1, v0, v1 = xs - 0.5 - xc, xs + 0.5 - xc, ys - 0.5 - yc, ys + 0.5 - yc
        return (_corner_area(u1, v1, r) - _corner_area(u0, v1, r)
                - _corner_area(u1, v0, r) + _corner_area(u0, v0, r))
    if method == "soft":
        d = np.sqrt((xs - xc) ** 2 + (ys - yc) ** 2)
        return 1.0 / (1.0 + np.exp(-(r - d) / softness))
    raise ValueError(f"method must be 'exact' or 'soft', got {method!r}.")


def aperture_flux(images, x, y, radius, method="exact", softness=0.5):
    """Flux [...] in circular apertures of [..., y, x] images (pixels, 0-based centers)."""
    images = np.asarray(images, dtype=float)
    w = aperture_weights(images.shape[-2:], x, y, radius, method, softness)
    return np.sum(w * images, axis=(-2, -1))


def iou(seg1, seg2):
    """Intersection over union of boolean masks [..., y, x] (NaN where both are empty)."""
    seg1, seg2 = np.asarray(seg1, dtype=bool), np.asarray(seg2, dtype=bool)
    inter = np.logical_and(seg1, seg2).sum(axis=(-2, -1))
    union = np.logical_or(seg1, seg2).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def true_segmentation(isolated_images, noise_threshold):
    """Pixels of isolated single-band images [..., y, x] above ``noise_threshold``."""
    return np.asarray(isolated_images) > noise_threshold


def blendedness(isolated_images):
    """BTK's blendedness of each galaxy: ``1 - <S_k, S_k> / <S_k, sum_j S_j>``.

    Args:
        isolated_images: [n_galaxies, y, x] noiseless isolated images of one blend, one band.

    Returns:
        [n_galaxies]; 0 for an isolated galaxy, towards 1 when others dominate its pixels.
    """
    iso = np.asarray(isolated_images, dtype=float)
    num = np.sum(iso * iso, axis=(-2, -1))
    den = np.sum(iso * iso.sum(axis=0, keepdims=True), axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, 1.0 - num / np.where(den != 0, den, 1.0), np.nan)


def snr(isolated_images, sky_level):
    """Signal-to-noise ratio ``sqrt(sum S^2 / (sky + S))`` of isolated images [..., y, x]."""
    iso = np.asarray(isolated_images, dtype=float)
    return np.sqrt(np.sum(iso * iso / (sky_level + np.maximum(iso, 0.0)), axis=(-2, -1)))


# -- detection ------------------------------------------------------------------------------------


def efficiency_matrix(n_matched, n_true, max_number=None):
    """Counts [max_number + 2, max_number + 1]: ``[k, n]`` blends of n true galaxies with k
    detected (BTK 0.9's layout: one spare row)."""
    n_matched, n_true = np.asarray(n_matched, dtype=int), np.asarray(n_true, dtype=int)
    num = int(max(max_number or 0, n_true.max(initial=0)))
    counts = np.zeros((num + 2, num + 1))
    np.add.at(counts, (np.minimum(n_matched, num + 1), n_true), 1)
    return counts


def detection_metrics(matches, max_number=None) -> dict:
    """Detection summary of a batch from its matches (list of `MatchResult`).

    Returns:
        dict: ``true_pos``, ``false_pos``, ``false_neg``, ``n_true``, ``n_detected``,
        ``precision``, ``recall``, ``f1`` (NaN where undefined), ``eff_matrix`` (percent per
        column) and ``eff_matrix_counts``.
    """
    n_matched = np.array([m.n_matched for m in matches], dtype=int)
    n_true = np.array([m.n_true for m in matches], dtype=int)
    n_det = np.array([m.n_detected for m in matches], dtype=int)
    tp, t, p = int(n_matched.sum()), int(n_true.sum()), int(n_det.sum())
    precision = tp / p if p else np.nan
    recall = tp / t if t else np.nan
    if precision > 0 and recall > 0:
        f1 = 2.0 / (1.0 / precision + 1.0 / recall)
    elif np.isnan(precision) or np.isnan(recall):
        f1 = np.nan
    else:
        f1 = 0.0
    counts = efficiency_matrix(n_matched, n_true, max_number)
    norm = counts.sum(axis=0)
    eff = 100.0 * counts / np.where(norm > 0, norm, 1.0)[None, :]
    return {
        "true_pos": tp, "false_pos": p - tp, "false_neg": t - tp, "n_true": t, "n_detected": p,
        "precision": precision, "recall": recall, "f1": f1,
        "eff_matrix": eff, "eff_matrix_counts": counts,
    }


# -- target measures ------------------------------------------------------------------------------


def _band_image(image, additional_params):
    return np.asarray(image)[additional_params["meas_band_num"]]


def _center_pixels(image2d, additional_params):
    x = additional_params.get("x_peak")
    y = additional_params.get("y_peak")
    if x is None or y is None:
        ny, nx = image2d.shape
        return (nx - 1) / 2.0, (ny - 1) / 2.0
    return float(x), float(y)


def meas_ksb_ellipticity(image, additional_params):
    """KSB shear estimate (GalSim HSM, ``shear_est="KSB"``) of one galaxy in the measure band.

    Args:
        image: [band, y, x] image of one isolated (or deblended) galaxy.
        additional_params: ``psf`` (GalSim PSF per band), ``pixel_scale`` (arcsec),
            ``meas_band_num``, optionally ``x_peak``, ``y_peak`` (0-based pixels; the guess of the
            centroid, default the stamp center) and ``verbose``.

    Returns:
        [g1, g2], the PSF-corrected shear estimates; NaN when HSM fails or the image is empty.
    """
    img = _band_image(image, additional_params)
    if not np.any(img > 0):
        return [np.nan, np.nan]
    b = additional_params["meas_band_num"]
    scale = float(additional_params["pixel_scale"])
    ny, nx = img.shape
    psf = additional_params["psf"][b]
    psf_image = psf.drawImage(nx=nx, ny=ny, scale=scale)
    gal_image = galsim.Image(np.array(img, dtype=np.float64, order="C"), scale=scale)
    x, y = _center_pixels(img, additional_params)
    res = galsim.hsm.EstimateShear(
        gal_image, psf_image, shear_est="KSB", strict=False,
        guess_centroid=galsim.PositionD(x + 1.0, y + 1.0),  # GalSim pixels start at 1
    )
    if res.error_message:
        if additional_params.get("verbose"):
            print(f"KSB failed: {res.error_message}")
        return [np.nan, np.nan]
    return [res.corrected_g1, res.corrected_g2]


def meas_fixed_aperture(image, additional_params):
    """Flux in a circular aperture (SEP ``sum_circle``, exact pixel overlap) in the measure band.

    The aperture is centred on ``x_peak``, ``y_peak`` of ``additional_params`` (the true
    position of the galaxy, the same for its isolated and deblended images; default the stamp
    center) with radius ``aperture_radius`` pixels, by default the band's PSF FWHM (BTK's choice).

    Returns:
        [flux, flux_err] (electrons); flux_err from the sky noise alone.
    """
    img = np.array(_band_image(image, additional_params), dtype=np.float64, order="C")
    x, y = _center_pixels(img, additional_params)
    radius = additional_params.get("aperture_radius")
    if radius is None:
        radius = additional_params["psf_fwhm"] / additional_params["pixel_scale"]
    sky = additional_params.get("sky_level")
    flux, err, _ = sep.sum_circle(img, np.array([x]), np.array([y]), float(radius),
                                  var=None if sky is None else float(sky), subpix=0)
    return [float(flux[0]), float(err[0])]


def meas_moments_ellipticity(image, additional_params):
    """(e1, e2) of Gaussian-weighted moments (`moments_ellipticity`, sigma ``moments_sigma``
    pixels, default 3) about ``x_peak``, ``y_peak`` in the measure band."""
    img = _band_image(image, additional_params)
    x, y = _center_pixels(img, additional_params)
    e = moments_ellipticity(img, additional_params.get("moments_sigma", 3.0), x, y)
    return [float(e[0]), float(e[1])]


def _target_keys(name, value):
    if np.ndim(value) == 0:
        return [name]
    return [f"{name}{i}" for i in range(len(value))]


def _target_values(value):
    return [float(value)] if np.ndim(value) == 0 else [float(v) for v in value]


# -- all metrics of one batch -------------------------------------------------------------------


def compute_metrics(isolated_images, blend_list, detection_catalogs, segmentations=None,
                    deblended_images=None, noise_threshold=None, meas_band_num=0,
                    target_meas=None, channels_last=False, matcher=None, sky_level=None,
                    additional_params=None, use_metrics=METRIC_GROUPS, max_number=None) -> dict:
    """Every metric of one batch for one measure function (and one survey).

    Args:
        isolated_images: [batch, max_number, band, y, x] (channels_last: [.., y, x, band]).
        blend_list: true tables, one per blend, with ``x_peak``, ``y_peak`` (and ``ra``, ``dec``).
        detection_catalogs: detected tables, one per blend, with ``x_peak``, ``y_peak``, ``ra``,
            ``dec``.
        segmentations: list over blends of bool [n_det, y, x] or None.
        deblended_images: list over blends of [n_det, band, y, x] (or channels_last) or None.
        noise_threshold: pixel value above which an isolated pixel is in the true segmentation.
        meas_band_num: band of segmentation, blendedness, SNR and target measures.
        target_meas: {name: f(image [band, y, x], additional_params) -> number or list}.
        channels_last: layout of the images.
        matcher: a `btkjax.match.Matcher` or callable (default Hungarian, 5 pixels).
        sky_level: sky electrons per pixel in the measure band (for SNR).
        additional_params: passed to the target measures (``x_peak``, ``y_peak`` are set per
            galaxy).
        use_metrics: which of "detection", "segmentation", "reconstruction" to compute.
        max_number: slots per blend (size of the efficiency matrix).

    Returns:
        dict with "matches", "detection", "segmentation", "reconstruction", "galaxy_summary".
    """
    bad = set(use_metrics) - set(METRIC_GROUPS)
    if bad:
        raise ValueError(f"use_metrics must be among {METRIC_GROUPS}, got {sorted(bad)}.")
    isolated_images = np.asarray(isolated_images)
    if channels_last:
        isolated_images = np.moveaxis(isolated_images, -1, 2)
        if deblended_images is not None:
            deblended_images = [None if d is None else np.moveaxis(d, -1, 1)
                                for d in deblended_images]
    n_blends = len(blend_list)
    if len(detection_catalogs) != n_blends or len(isolated_images) != n_blends:
        raise ValueError(
            f"{n_blends} blend tables, {len(detection_catalogs)} detection catalogs and "
            f"{len(isolated_images)} isolated image stacks: they must match."
        )
    matcher = as_matcher(matcher)
    matches: list[MatchResult] = [
        matcher(t, d) for t, d in zip(blend_list, detection_catalogs, strict=True)
    ]
    target_meas = dict(target_meas or {})
    additional_params = dict(additional_params or {})

    seg_on = "segmentation" in use_metrics and segmentations is not None and any(
        s is not None for s in segmentations)
    rec_on = "reconstruction" in use_metrics and deblended_images is not None and any(
        d is not None for d in deblended_images)
    if seg_on and noise_threshold is None:
        raise ValueError("Segmentation metrics need a noise_threshold.")

    # Names of the target measures' outputs, from their value on the first galaxy.
    target_keys = {}
    columns = {}

    def params_for(table, j):
        p = dict(additional_params)
        p["x_peak"], p["y_peak"] = float(table["x_peak"][j]), float(table["y_peak"][j])
        return p

    per_blend = {k: [] for k in ("iou", "msr", "mse", "psnr", "ssim")}
    target_true, target_meas_vals = [], []
    for i, (table, match) in enumerate(zip(blend_list, matches, strict=True)):
        n = len(table)
        iso = isolated_images[i, :n]
        iso_band = iso[:, meas_band_num] if n else np.zeros((0,) + iso.shape[-2:])
        det = match.match_detected_id
        ious = np.full(n, np.nan)
        recs = {k: np.full(n, np.nan) for k in ("mse", "psnr", "ssim")}
        if seg_on and segmentations[i] is not None and n:
            truth = true_segmentation(iso_band, noise_threshold)
            for j in np.where(det >= 0)[0]:
                ious[j] = iou(truth[j], segmentations[i][det[j]])
        if rec_on and deblended_images[i] is not None and n:
            debl = np.asarray(deblended_images[i])
            if debl.shape[1:] != iso.shape[1:]:
                raise ValueError(
                    f"Deblended images of blend {i} have shape {debl.shape[1:]} per galaxy, the "
                    f"isolated images {iso.shape[1:]}: they must match."
                )
            js = np.where(det >= 0)[0]
            if len(js):
                t_img, p_img = iso[js].astype(float), debl[det[js]].astype(float)
                recs["mse"][js] = mse(t_img, p_img)
                recs["psnr"][js] = psnr(t_img, p_img)
                recs["ssim"][js] = ssim(t_img, p_img)
        per_blend["iou"].append(list(ious))
        per_blend["mse"].append(list(recs["mse"]))
        per_blend["msr"].append(list(recs["mse"]))
        per_blend["psnr"].append(list(recs["psnr"]))
        per_blend["ssim"].append(list(recs["ssim"]))

        blend_true, blend_meas = [], []
        for j in range(n):
            vals_t, vals_m = {}, {}
            for name, f in target_meas.items():
                params = params_for(table, j)
                value = f(iso[j], params)
                if name not in target_keys:
                    target_keys[name] = _target_keys(name, value)
                keys = target_keys[name]
                vals = _target_values(value)
                if len(vals) != len(keys):
                    raise ValueError(f"Target measure {name!r} returned {len(vals)} values for "
                                     f"one galaxy and {len(keys)} for another.")
                vals_t.update(zip(keys, vals, strict=True))
                mvals = [np.nan] * len(keys)
                if rec_on and deblended_images[i] is not None and det[j] >= 0:
                    mvals = _target_values(f(np.asarray(deblended_images[i])[det[j]], params))
                vals_m.update(zip(keys, mvals, strict=True))
            blend_true.append(vals_t)
            blend_meas.append(vals_m)
        target_true.append(blend_true)
        target_meas_vals.append(blend_meas)

    flat_keys = [k for name in target_meas for k in target_keys.get(name, [])]
    results = {"matches": [m.to_table() for m in matches]}
    if "detection" in use_metrics:
        results["detection"] = detection_metrics(matches, max_number)
    if seg_on:
        results["segmentation"] = {"iou": per_blend["iou"]}
    if rec_on or flat_keys:
        rec = {}
        if rec_on:
            rec = {k: per_blend[k] for k in ("msr", "mse", "psnr", "ssim")}
        for k in flat_keys:
            rec[k] = [[g[k] for g in blend] for blend in target_meas_vals]
            rec[k + "_true"] = [[g[k] for g in blend] for blend in target_true]
        results["reconstruction"] = rec

    # -- galaxy summary --
    nonempty = [t for t in blend_list if len(t)]
    summary = vstack(nonempty, metadata_conflicts="silent") if nonempty else Table()
    n_gal = len(summary)
    blend_id = np.concatenate([np.full(len(t), i) for i, t in enumerate(blend_list)] or [[]])
    columns["blend_id"] = blend_id.astype(int)
    columns["detected"] = np.concatenate(
        [m.match_detected_id >= 0 for m in matches] or [[]]).astype(bool)
    columns["match_detected_id"] = np.concatenate(
        [m.match_detected_id for m in matches] or [[]]).astype(int)
    columns["distance_detection"] = np.concatenate(
        [np.where(m.match_detected_id >= 0, m.dist, np.nan) for m in matches] or [[]])
    closest, blendness, snrs = [], [], []
    for i, table in enumerate(blend_list):
        n = len(table)
        if n == 0:
            continue
        x, y = np.asarray(table["x_peak"], float), np.asarray(table["y_peak"], float)
        d = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
        np.fill_diagonal(d, np.inf)
        closest.append(np.where(np.isfinite(d.min(axis=1)), d.min(axis=1), np.nan))
        iso_band = isolated_images[i, :n, meas_band_num]
        blendness.append(blendedness(iso_band))
        snrs.append(snr(iso_band, sky_level) if sky_level is not None else np.full(n, np.nan))
    columns["distance_closest_galaxy"] = np.concatenate(closest or [[]])
    columns["blendedness"] = np.concatenate(blendness or [[]])
    columns["snr"] = np.concatenate(snrs or [[]])
    if seg_on:
        columns["iou"] = np.concatenate([np.asarray(v) for v in per_blend["iou"]] or [[]])
    if rec_on:
        for k in ("msr", "mse", "psnr", "ssim"):
            columns[k] = np.concatenate([np.asarray(v) for v in per_blend[k]] or [[]])
    for k in flat_keys:
        columns[k] = np.array([g[k] for blend in target_meas_vals for g in blend], dtype=float)
        columns[k + "_true"] = np.array([g[k] for blend in target_true for g in blend], dtype=float)
    for k, v in columns.items():
        if len(v) != n_gal:  # pragma: no cover - internal consistency
            raise RuntimeError(f"galaxy_summary column {k} has {len(v)} rows, expected {n_gal}.")
        summary[k] = v
    results["galaxy_summary"] = summary
    return results


# -- the generator --------------------------------------------------------------------------------


class MetricsGenerator:
    """Computes metrics on every batch of a `btkjax.measure.MeasureGenerator`.

    Args:
        meas_generator: the measure generator.
        use_metrics: which of "detection", "segmentation", "reconstruction" to compute
            (``matches`` and ``galaxy_summary`` are always there).
        meas_band_name: band of segmentation, blendedness, SNR and target measures; with several
            surveys, one band per survey (a tuple in the order of the surveys) or one name
            present in all.
        target_meas: {name: f(image [band, y, x], additional_params) -> number or list};
            ``additional_params`` holds ``psf`` (GalSim PSF per band), ``psf_fwhm`` (arcsec, of
            the measure band), ``pixel_scale`` (arcsec), ``meas_band_num``, ``survey``,
            ``sky_level`` (electrons per pixel), ``verbose`` and, per galaxy, ``x_peak``,
            ``y_peak`` of the true galaxy (pixels).
        save_path: folder where each batch of metrics is written with
            ``btkjax.utils.save_metrics_batch``.
        match_function: a `btkjax.match.Matcher` (default ``PixelHungarianMatcher(5.0)``) or a
            callable ``f(true_table, detected_table) -> (true_idx, detected_idx[, dist])``.
        noise_threshold_factor: true segmentations are the isolated pixels above this many sky
            sigmas (BTK's 3).
        verbose: print failures of target measures.

    ``next()`` returns ``(blend_results, meas_results, results)``; see the module docstring.
    """

    def __init__(self, meas_generator, use_metrics=METRIC_GROUPS, meas_band_name="r",
                 target_meas=None, save_path=None, match_function=None,
                 noise_threshold_factor: float = 3.0, verbose: bool = False):
        if isinstance(use_metrics, str):
            use_metrics = (use_metrics,)
        bad = set(use_metrics) - set(METRIC_GROUPS)
        if bad:
            raise ValueError(f"use_metrics must be among {METRIC_GROUPS}, got {sorted(bad)}.")
        target_meas = dict(target_meas or {})
        for name, f in target_meas.items():
            if not callable(f):
                raise TypeError(f"target_meas[{name!r}] must be a function f(image, params), "
                                f"got {type(f).__name__}.")
        if save_path is not None and not os.path.isdir(save_path):
            raise FileNotFoundError(f"save_path {save_path!r} is not an existing folder.")
        self.meas_generator = meas_generator
        self.use_metrics = tuple(use_metrics)
        self.target_meas = target_meas
        self.save_path = None if save_path is None else os.fspath(save_path)
        self.matcher = as_matcher(match_function)
        self.noise_threshold_factor = float(noise_threshold_factor)
        self.verbose = verbose
        self.surveys = list(meas_generator.surveys)
        self.is_multiresolution = len(self.surveys) > 1
        self.meas_band_names = self._band_names(meas_band_name)
        self.meas_band_name = meas_band_name
        self.batch_index = 0

    # BTK's attribute name.
    @property
    def measure_generator(self):
        return self.meas_generator

    def _band_names(self, meas_band_name):
        if isinstance(meas_band_name, str):
            names = [meas_band_name] * len(self.surveys)
        else:
            names = list(meas_band_name)
            if len(names) != len(self.surveys):
                raise ValueError(
                    f"meas_band_name needs one band per survey ({[s.name for s in self.surveys]}), "
                    f"got {names}."
                )
        for band, survey in zip(names, self.surveys, strict=True):
            if band not in survey.available_filters:
                raise ValueError(
                    f"Band {band!r} is not a band of survey {survey.name} "
                    f"({list(survey.available_filters)}); choose meas_band_name among them."
                )
        return names

    def _survey_metrics(self, survey, band, blend_results, meas_results, name, multires):
        def pick(entry):
            return entry[survey.name] if multires else entry

        band_num = list(survey.available_filters).index(band)
        filt = survey.get_filter(band)
        sky = get_mean_sky_level(survey, filt)
        pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
        params = {
            "psf": pick(blend_results["psf"]),
            "psf_fwhm": float(filt.psf_fwhm.to_value("arcsec")),
            "pixel_scale": pixel_scale,
            "meas_band_num": band_num,
            "survey": survey,
            "sky_level": sky,
            "verbose": self.verbose,
        }
        return compute_metrics(
            pick(blend_results["isolated_images"]),
            pick(blend_results["blend_list"]),
            pick(meas_results["catalog"][name]),
            segmentations=pick(meas_results["segmentation"][name]),
            deblended_images=pick(meas_results["deblended_images"][name]),
            noise_threshold=self.noise_threshold_factor * np.sqrt(sky),
            meas_band_num=band_num,
            target_meas=self.target_meas,
            channels_last=self.meas_generator.channels_last,
            matcher=self.matcher,
            sky_level=sky,
            additional_params=params,
            use_metrics=self.use_metrics,
            max_number=getattr(self.meas_generator.draw_generator, "max_number", None),
        )

    def __iter__(self):
        return self

    def __next__(self):
        blend_results, meas_results = next(self.meas_generator)
        if blend_results.get("isolated_images") is None or (
            isinstance(blend_results["isolated_images"], dict)
            and any(v is None for v in blend_results["isolated_images"].values())
        ):
            raise ValueError("Metrics need the isolated images: create the draw generator with "
                             "isolated=True.")
        keys = ("detection", "segmentation", "reconstruction", "galaxy_summary", "matches")
        results = {k: {} for k in keys}
        for name in meas_results["catalog"]:
            if self.is_multiresolution:
                per = {s.name: self._survey_metrics(s, b, blend_results, meas_results, name, True)
                       for s, b in zip(self.surveys, self.meas_band_names, strict=True)}
                for k in keys:
                    if any(k in r for r in per.values()):
                        results[k][name] = {s: r.get(k) for s, r in per.items()}
            else:
                r = self._survey_metrics(self.surveys[0], self.meas_band_names[0], blend_results,
                                         meas_results, name, False)
                for k in keys:
                    if k in r:
                        results[k][name] = r[k]
        index = getattr(self.meas_generator, "batch_index", self.batch_index + 1) - 1
        self.batch_index += 1
        if self.save_path is not None:
            self._save(index, results)
        return blend_results, meas_results, results

    def _save(self, index, results):
        from btkjax import utils

        utils.save_metrics_batch(self.save_path, index, results, self.config())

    def config(self) -> dict:
        """The generator's settings (JSON-able)."""
        return {
            "generator": type(self).__name__,
            "use_metrics": list(self.use_metrics),
            "meas_band_name": self.meas_band_names,
            "target_meas": {k: getattr(f, "__name__", repr(f))
                            for k, f in self.target_meas.items()},
            "match_function": repr(self.matcher),
            "noise_threshold_factor": self.noise_threshold_factor,
        }
