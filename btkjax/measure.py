"""Measurement: detections, segmentations and deblended images, BTK's interface.

A measure function has the signature ``f(batch, idx, **kwargs) -> dict`` where ``batch`` is what
``next(draw_generator)`` returned and ``idx`` the blend to measure. It returns a dict with:

- ``catalog`` (mandatory): an astropy Table, one row per detection, with ``ra`` and ``dec``:
  offsets from the stamp center in arcsec, in the convention of ``batch["wcs"]`` (use
  `pixel_to_arcsec`). ``x_peak``, ``y_peak`` (pixels, 0-based) are added by `MeasureGenerator`
  from ``ra``, ``dec`` when the function does not give them.
- ``segmentation`` (optional): bool [n_detections, y, x].
- ``deblended_images`` (optional): [n_detections, band, y, x] (channels_last: [n, y, x, band]).

With several surveys (multi-resolution) ``batch["blend_images"]`` is a dict keyed by survey
name; the built-in functions then detect on one survey (``survey_name``, default the first of
``surveys``) and return only the catalog, and `MeasureGenerator` gives it per survey, with that
survey's pixel coordinates. ``segmentation`` and ``deblended_images`` of a multi-resolution
function, when given, are dicts keyed by survey name.

`MeasureGenerator` runs functions (and lists of keyword arguments) over every blend of each batch,
optionally in a process pool, validates what they return and collects it as
``meas_results[key][name]`` = list over blends, ``key`` in ("catalog", "segmentation",
"deblended_images").
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import sep
from astropy.table import Table

__all__ = [
    "MeasureGenerator",
    "sep_singleband_measure",
    "sep_multiband_measure",
    "pixel_to_arcsec",
    "arcsec_to_pixel",
    "available_measure_functions",
    "MEASURE_KEYS",
    "check_blend_images",
]

MEASURE_KEYS = ("catalog", "segmentation", "deblended_images")


# -- coordinates ---------------------------------------------------------------------------------


def pixel_to_arcsec(wcs, x, y):
    """Pixel coordinates (0-based) -> (ra, dec) offsets in arcsec, ra wrapped to [-180, 180) deg.

    astropy returns ra in [0, 360) degrees, so a pixel left of the center of a stamp whose
    reference is (0, 0) would come out near 1.3e6 arcsec; this wraps it to a small negative offset.
    """
    ra, dec = wcs.pixel_to_world_values(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    ra = (np.asarray(ra, dtype=float) + 180.0) % 360.0 - 180.0
    return ra * 3600.0, np.asarray(dec, dtype=float) * 3600.0


def arcsec_to_pixel(wcs, ra, dec):
    """(ra, dec) offsets in arcsec -> pixel coordinates (0-based)."""
    x, y = wcs.world_to_pixel_values(np.asarray(ra, dtype=float) / 3600.0,
                                     np.asarray(dec, dtype=float) / 3600.0)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


# -- helpers for the built-in functions ----------------------------------------------------------


def select_survey(batch, surveys, survey_name):
    """(image [band, y, x] or channels_last, wcs, is_multiresolution) of the survey to measure."""
    images = batch["blend_images"]
    if not isinstance(images, dict):
        return images, batch["wcs"], False
    if survey_name is None:
        survey_name = surveys[0].name if surveys else next(iter(images))
    if survey_name not in images:
        raise ValueError(
            f"survey_name {survey_name!r} is not in the batch's surveys {list(images)}."
        )
    return images[survey_name], batch["wcs"][survey_name], True


def _band_index(band, survey_bands, n_bands):
    if isinstance(band, str):
        if survey_bands is None or band not in survey_bands:
            raise ValueError(f"Band {band!r} is not one of the survey's bands {survey_bands}.")
        return list(survey_bands).index(band)
    band = int(band)
    if not -n_bands <= band < n_bands:
        raise ValueError(f"Band index {band} is out of range for {n_bands} bands.")
    return band


def _survey_bands(surveys, survey_name, multiresolution):
    if not surveys:
        return None
    if multiresolution and survey_name is not None:
        for s in surveys:
            if s.name == survey_name:
                return list(s.available_filters)
    return list(surveys[0].available_filters)


def _sep_image(image):
    return np.array(image, dtype=np.float64, order="C")  # a writable copy (JAX arrays are not)


def _sep_extract(image, sigma_noise, min_area, segmentation_map):
    image = _sep_image(image)
    bkg = sep.Background(image)
    return sep.extract(image, sigma_noise, err=bkg.globalrms, minarea=min_area,
                       segmentation_map=segmentation_map)


def _catalog(wcs, x, y):
    ra, dec = pixel_to_arcsec(wcs, x, y)
    t = Table()
    t["ra"], t["dec"] = ra, dec
    t["x_peak"], t["y_peak"] = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return t


# -- built-in measure functions ------------------------------------------------------------------


def sep_singleband_measure(batch, idx, meas_band_num=3, use_mean=False, channels_last=False,
                           surveys=None, sigma_noise=1.5, survey_name=None, min_area=5,
                           **kwargs):
    """Detection, segmentation and deblended images with SEP on one band or the band average.

    SEP (Source Extractor in Python) detects pixels ``sigma_noise`` times the global rms of its
    background estimate; each detection's segment gives its segmentation and its deblended image
    (the blend masked by the segment, in every band), as BTK does.

    With several surveys, detection runs on ``survey_name`` (default the first of ``surveys``) and
    only the catalog is returned.

    Args:
        batch: output of a draw generator's ``__next__``.
        idx: index of the blend in the batch.
        meas_band_num: band to detect on, an index or a band name (BTK's default 3, LSST's i).
        use_mean: detect on the mean over bands instead.
        channels_last: images are [.., y, x, band] (set by `MeasureGenerator`).
        surveys: the generator's surveys (set by `MeasureGenerator`).
        sigma_noise: detection threshold in units of the background rms.
        survey_name: the survey to measure on (multi-resolution).
        min_area: minimum number of pixels of a detection.

    Returns:
        ``{"catalog", "segmentation", "deblended_images"}`` (only ``catalog`` for several surveys).
    """
    image, wcs, multires = select_survey(batch, surveys, survey_name)
    image = np.asarray(image[idx])
    band_axis = -1 if channels_last else 0
    n_bands = image.shape[band_axis]
    if use_mean:
        band_image = np.mean(image, axis=band_axis)
    else:
        b = _band_index(meas_band_num, _survey_bands(surveys, survey_name, multires), n_bands)
        band_image = np.take(image, b, axis=band_axis)
    catalog, segmap = _sep_extract(band_image, sigma_noise, min_area, True)
    n = len(catalog)
    t = _catalog(wcs, catalog["x"], catalog["y"])
    if multires:
        return {"catalog": t}
    segmentation = segmap[None, :, :] == (np.arange(n) + 1)[:, None, None]
    mask = segmentation[:, :, :, None] if channels_last else segmentation[:, None, :, :]
    deblended = (image[None] * mask).astype(image.dtype)
    return {"catalog": t, "segmentation": segmentation, "deblended_images": deblended}


def sep_multiband_measure(batch, idx, channels_last=False, surveys=None, matching_threshold=5.0,
                          sigma_noise=1.5, survey_name=None, min_area=5, **kwargs):
    """Detections with SEP in every band, merged (BTK's approach).

    Each band is searched in turn; a detection joins the running list unless it lies within
    ``matching_threshold`` pixels of one already there.

    Args:
        batch: output of a draw generator's ``__next__``.
        idx: index of the blend in the batch.
        channels_last: images are [.., y, x, band] (set by `MeasureGenerator`).
        surveys: the generator's surveys (set by `MeasureGenerator`).
        matching_threshold: merge distance in pixels (5 pixels = BTK's 1 arcsec on LSST).
        sigma_noise: detection threshold in units of the background rms.
        survey_name: the survey to measure on (multi-resolution).
        min_area: minimum number of pixels of a detection.

    Returns:
        ``{"catalog"}``.
    """
    image, wcs, _ = select_survey(batch, surveys, survey_name)
    image = np.asarray(image[idx])
    band_axis = -1 if channels_last else 0
    xs = np.zeros(0)
    ys = np.zeros(0)
    for b in range(image.shape[band_axis]):
        cat = _sep_extract(np.take(image, b, axis=band_axis), sigma_noise, min_area, False)
        x, y = np.asarray(cat["x"], dtype=float), np.asarray(cat["y"], dtype=float)
        if len(xs) and len(x):
            d = np.hypot(x[:, None] - xs[None, :], y[:, None] - ys[None, :]).min(axis=1)
            keep = d > matching_threshold
            x, y = x[keep], y[keep]
        xs, ys = np.concatenate([xs, x]), np.concatenate([ys, y])
    return {"catalog": _catalog(wcs, xs, ys)}


available_measure_functions = {
    "sep_singleband_measure": sep_singleband_measure,
    "sep_multiband_measure": sep_multiband_measure,
}


# -- the generator ---------------------------------------------------------------------------------

_PER_BLEND_KEYS = ("blend_images", "isolated_images", "blend_list")


def _slice_batch(batch: dict, start: int, stop: int) -> dict:
    """The blends [start, stop) of a batch (per-blend entries sliced; PSF, WCS kept)."""
    out = {}
    for key, value in batch.items():
        if key in _PER_BLEND_KEYS and value is not None:
            if isinstance(value, dict):
                out[key] = {k: (None if v is None else v[start:stop]) for k, v in value.items()}
            else:
                out[key] = value[start:stop]
        else:
            out[key] = value
    return out


def _function_name(f) -> str:
    return getattr(f, "__name__", type(f).__name__)


def check_blend_images(batch: dict, idx: int):
    """ValueError naming the blend, survey and pixel count unless blend `idx`'s images are all
    finite: a measure function (or deblender) given NaN or infinite pixels returns numbers that
    mean nothing (a deblend of an all-NaN image returned finite parameters)."""
    images = batch["blend_images"]
    items = images.items() if isinstance(images, dict) else [(None, images)]
    for survey, arr in items:
        blend = np.asarray(arr[idx])
        finite = np.isfinite(blend)
        if not finite.all():
            where = "" if survey is None else f" of survey {survey!r}"
            raise ValueError(
                f"blend_images[{idx}]{where} has {int((~finite).sum())} non-finite pixel(s) "
                f"(of {blend.size}; e.g. {blend[~finite][:3].tolist()}); measure functions need "
                "finite images."
            )


def _run_blends(functions, kwargs_list, batch, indices):
    """Runs every (function, kwargs) on the blends `indices` of `batch`: module level, so that a
    spawned process pool can run it. Returns [blend][kwargs][function] raw outputs."""
    out = []
    for i in indices:
        per_kwargs = []
        for kwargs in kwargs_list:
            per_function = []
            for f in functions:
                try:
                    per_function.append(f(batch, int(i), **kwargs))
                except Exception as err:  # name the culprit, keep the original error
                    err.add_note(f"(raised by measure function {_function_name(f)!r} on blend "
                                 f"{int(i)} of the batch with kwargs {sorted(kwargs)})")
                    raise
            per_kwargs.append(per_function)
        out.append(per_kwargs)
    return out


class MeasureGenerator:
    """Runs measure functions on every batch of a draw generator.

    Args:
        measure_functions: a function or a list of them, ``f(batch, idx, **kwargs) -> dict``.
        draw_generator: a `btkjax.draw_blends.DrawBlendsGenerator`.
        cpus: processes measuring blends in parallel (a spawned pool: functions must be
            importable module-level functions).
        verbose: print progress.
        measure_kwargs: a dict or a list of dicts of keyword arguments; each function runs once
            per dict. ``channels_last``, ``surveys`` and ``is_multiresolution`` are added.
        save_path: folder where each batch of measurements is written with
            ``btkjax.utils.save_measure_batch``.

    ``next()`` returns ``(blend_results, meas_results)``: the draw generator's batch and
    ``meas_results[key][name]`` for ``key`` in `MEASURE_KEYS`, ``name`` the function's
    ``__name__`` (followed by the index of the kwargs dict when there are several), each a list
    over blends (None where a function gave no such output). With several surveys each of these
    lists is a dict keyed by survey name; catalogs then carry each survey's ``x_peak``,
    ``y_peak``.
    """

    def __init__(self, measure_functions, draw_generator, cpus: int = 1, verbose: bool = False,
                 measure_kwargs=None, save_path=None):
        if callable(measure_functions):
            measure_functions = [measure_functions]
        if not isinstance(measure_functions, (list, tuple)) or not measure_functions:
            raise TypeError(
                "measure_functions must be a function or a non-empty list of functions, got "
                f"{type(measure_functions).__name__}."
            )
        for f in measure_functions:
            if not callable(f):
                raise TypeError(f"measure_functions must hold functions; {f!r} is not callable.")
        names = [_function_name(f) for f in measure_functions]
        if len(set(names)) != len(names):
            raise ValueError(f"Measure functions need distinct names (__name__), got {names}.")
        if measure_kwargs is None:
            measure_kwargs = [{}]
        elif isinstance(measure_kwargs, dict):
            measure_kwargs = [measure_kwargs]
        if not isinstance(measure_kwargs, (list, tuple)) or not measure_kwargs or not all(
            isinstance(m, dict) for m in measure_kwargs
        ):
            raise TypeError(
                f"measure_kwargs must be a dict or a list of dicts, got {measure_kwargs!r}."
            )
        if not isinstance(cpus, (int, np.integer)) or cpus < 1:
            raise ValueError(f"cpus must be a positive integer, got {cpus!r}.")
        if save_path is not None and not os.path.isdir(save_path):
            raise FileNotFoundError(f"save_path {save_path!r} is not an existing folder.")

        self.measure_functions = list(measure_functions)
        self.draw_generator = draw_generator
        self.cpus = int(cpus)
        self.verbose = verbose
        self.save_path = None if save_path is None else os.fspath(save_path)
        self.batch_size = draw_generator.batch_size
        self.channels_last = getattr(draw_generator, "channels_last", False)
        surveys = draw_generator.surveys
        self.surveys = list(surveys) if isinstance(surveys, (list, tuple)) else [surveys]
        self.is_multiresolution = len(self.surveys) > 1
        self.measure_kwargs = []
        for m in measure_kwargs:
            m = dict(m)
            m["channels_last"] = self.channels_last
            m["surveys"] = self.surveys
            m["is_multiresolution"] = self.is_multiresolution
            self.measure_kwargs.append(m)
        several = len(self.measure_kwargs) > 1
        self.names = [
            [f"{_function_name(f)}{m}" if several else _function_name(f)
             for f in self.measure_functions]
            for m in range(len(self.measure_kwargs))
        ]
        self.batch_index = 0
        self._pool = None
        if self.cpus > 1:
            for f in self.measure_functions:
                try:
                    pickle.dumps(f)
                except Exception as err:
                    raise TypeError(
                        f"With cpus > 1 measure functions must be picklable (module-level "
                        f"functions); {_function_name(f)!r} is not: {err}"
                    ) from err

    # BTK's attribute name.
    @property
    def draw_blend_generator(self):
        return self.draw_generator

    @property
    def measure_names(self) -> list[str]:
        """All result names, kwargs-major (name of function j with kwargs m is names[m][j])."""
        return [n for row in self.names for n in row]

    def __iter__(self):
        return self

    def _raw_outputs(self, batch):
        n = self.batch_size
        for i in range(n):  # the boundary: no measure function sees a non-finite image
            check_blend_images(batch, i)
        if self.cpus == 1 or n == 1:
            return _run_blends(self.measure_functions, self.measure_kwargs, batch, range(n))
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.cpus, mp_context=get_context("spawn"))
        parts = [p for p in np.array_split(np.arange(n), self.cpus) if len(p)]
        futures = [
            self._pool.submit(
                _run_blends, self.measure_functions, self.measure_kwargs,
                _slice_batch(batch, int(p[0]), int(p[-1]) + 1), range(len(p)),
            )
            for p in parts
        ]
        out = []
        for fut in futures:
            out.extend(fut.result())
        return out

    def _validate(self, out, f, idx, batch):
        name = _function_name(f)
        where = f"measure function {name!r} (blend {idx})"
        if not isinstance(out, dict):
            raise TypeError(f"The {where} must return a dict with a 'catalog', got "
                            f"{type(out).__name__}.")
        if "catalog" not in out or out["catalog"] is None:
            raise ValueError(f"The {where} returned no 'catalog' (keys: {sorted(out)}); a "
                             "catalog with 'ra' and 'dec' columns is mandatory.")
        catalog = out["catalog"]
        if not isinstance(catalog, Table):
            raise TypeError(f"The 'catalog' of {where} must be an astropy Table, got "
                            f"{type(catalog).__name__}.")
        missing = [c for c in ("ra", "dec") if c not in catalog.colnames]
        if missing:
            raise ValueError(f"The catalog of {where} lacks the mandatory column(s) {missing} "
                             f"(arcsec offsets from the stamp center); it has {catalog.colnames}.")
        n = len(catalog)
        surveys = [s.name for s in self.surveys]
        for key in ("segmentation", "deblended_images"):
            value = out.get(key)
            if value is None:
                continue
            if self.is_multiresolution:
                if not isinstance(value, dict):
                    raise TypeError(f"With several surveys the '{key}' of {where} must be a dict "
                                    f"keyed by survey name {surveys}, got {type(value).__name__}.")
                items = [(s, value.get(s)) for s in surveys]
            else:
                items = [(None, value)]
            for s, arr in items:
                if arr is None:
                    continue
                label = key if s is None else f"{key}[{s!r}]"
                if not isinstance(arr, np.ndarray):
                    raise TypeError(f"The '{label}' of {where} must be a numpy array, got "
                                    f"{type(arr).__name__}.")
                images = batch["blend_images"] if s is None else batch["blend_images"][s]
                stamp = images.shape[1:]
                if key == "segmentation":
                    hw = stamp[:-1] if self.channels_last else stamp[1:]
                    expected = (n, *hw)
                    if arr.dtype != bool:
                        raise TypeError(
                            f"The '{label}' of {where} must be boolean, got {arr.dtype}."
                        )
                else:
                    expected = (n, *stamp)
                if arr.shape != expected:
                    raise ValueError(f"The '{label}' of {where} has shape {arr.shape}; expected "
                                     f"{expected} ({n} detections in its catalog).")

    def _with_pixels(self, catalog, wcs, overwrite):
        cat = catalog.copy()
        if overwrite or "x_peak" not in cat.colnames or "y_peak" not in cat.colnames:
            x, y = arcsec_to_pixel(wcs, cat["ra"], cat["dec"])
            cat["x_peak"], cat["y_peak"] = x, y
        return cat

    def __next__(self):
        batch = next(self.draw_generator)
        raw = self._raw_outputs(batch)
        survey_names = [s.name for s in self.surveys]
        meas_results = {key: {} for key in MEASURE_KEYS}
        for m, row in enumerate(self.names):
            for j, (f, name) in enumerate(zip(self.measure_functions, row, strict=True)):
                outs = [raw[i][m][j] for i in range(len(raw))]
                for i, out in enumerate(outs):
                    self._validate(out, f, i, batch)
                if self.is_multiresolution:
                    meas_results["catalog"][name] = {
                        s: [self._with_pixels(o["catalog"], batch["wcs"][s], True) for o in outs]
                        for s in survey_names
                    }
                    for key in ("segmentation", "deblended_images"):
                        meas_results[key][name] = {
                            s: [None if o.get(key) is None else o[key].get(s) for o in outs]
                            for s in survey_names
                        }
                else:
                    meas_results["catalog"][name] = [
                        self._with_pixels(o["catalog"], batch["wcs"], False) for o in outs
                    ]
                    for key in ("segmentation", "deblended_images"):
                        meas_results[key][name] = [o.get(key) for o in outs]
        if self.verbose:
            print(f"Measured batch {self.batch_index} with {self.measure_names}.")
        index = getattr(self.draw_generator, "batch_index", self.batch_index + 1) - 1
        self.batch_index += 1
        if self.save_path is not None:
            self._save(index, meas_results)
        return batch, meas_results

    def _save(self, index, meas_results):
        from btkjax import utils

        utils.save_measure_batch(self.save_path, index, meas_results, self.config())

    def config(self) -> dict:
        """The generator's settings (JSON-able)."""
        kwargs = [
            {k: v for k, v in m.items() if k not in ("surveys",)
             and isinstance(v, (int, float, str, bool, type(None)))}
            for m in self.measure_kwargs
        ]
        return {
            "generator": type(self).__name__,
            "measure_functions": [_function_name(f) for f in self.measure_functions],
            "measure_names": self.measure_names,
            "measure_kwargs": kwargs,
            "cpus": self.cpus,
        }

    def close(self):
        """Shuts the process pool down (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
