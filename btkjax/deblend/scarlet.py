"""scarlet2 (optional extra ``btkjax[scarlet2]``) as a BTK measure function.

`Scarlet2Measure` deblends each blend with scarlet2 0.5.1 set up as its quick-start guide does
(``docs/0-quickstart.ipynb``: an `Observation` with an `ArrayPSF`, ``Frame.from_observations``,
one `Source` per detection initialized by ``init.from_gaussian_moments(obs, center,
min_corr=0.99)`` (``init.pixel_spectrum`` + ``init.compact_morphology`` where that raises),
spectra constrained positive with ``relative_step(factor=0.05)``, morphologies constrained to the
unit interval with ``relative_step(factor=1e-3)``, ``scene.fit(obs, parameters, max_iter=1000,
e_rel=1e-4)``), on SEP's detections (the same as `btkjax.deblend.ForwardModelMeasure`'s), so
the two deblenders can be compared inside `MeasureGenerator` / `MetricsGenerator`.

What suits scarlet2 here:

- PSF images: odd-sized (``psf_pixels``, default 25) and centred on the central pixel, drawn
  from the batch's GalSim PSFs (``drawImage`` at the survey's pixel scale, pixel response
  included): scarlet2's `ArrayPSF` assumes that centring (an even-sized image centred between
  pixels shifts every model by half a pixel);
- weights: the inverse sky variance of each band (``1 / sky``, electrons), the background-
  dominated noise of the blends;
- NaN safety: a source whose initialization raises, or gives a non-finite or non-positive
  spectrum in some band (a noisy band's negative flux: the positive constraint's log turns it
  into NaN and the whole scene with it), is initialized from the documented fallback and its
  spectrum floored at ``spectrum_floor`` times the sky noise; its ``init`` column says so. A
  source whose fitted model is still non-finite is dropped and the scene fitted again without
  it (``init`` = "dropped": the blend keeps finite images; the catalog row is kept with NaN
  fluxes so that nothing is silently lost).

scarlet2 is imported only when the measure function is called.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
from astropy.table import Table

from btkjax.measure import pixel_to_arcsec, select_survey, sep_singleband_measure
from btkjax.survey import get_mean_sky_level

__all__ = ["Scarlet2Measure", "odd_psf_images"]


def odd_psf_images(psfs, pixel_scale: float, size: int = 25) -> np.ndarray:
    """PSF images [band, size, size] for scarlet2: ``size`` odd, each GalSim PSF (pixel response
    included) drawn centred on the central pixel, normalized to a unit sum."""
    if size % 2 != 1 or size < 3:
        raise ValueError(f"psf size must be an odd number of pixels >= 3, got {size!r}.")
    out = []
    for p in psfs:
        img = p.drawImage(nx=size, ny=size, scale=pixel_scale).array.astype(np.float64)
        out.append(img / img.sum())
    return np.stack(out)


class Scarlet2Measure:
    """scarlet2 as a BTK measure function (``f(batch, idx, **kwargs)``); see the module docstring.

    Args:
        max_iter, e_rel: ``scene.fit``'s (the documented 1000 and 1e-4).
        psf_pixels: side of the odd PSF images.
        min_corr: ``from_gaussian_moments``'s.
        spectrum_floor: a source's initial spectrum is floored at this many sky sigmas (per
            band, in the spectrum's units: flux per unit peak morphology).
        name: the name `MeasureGenerator` reports.
        validation: scarlet2's validation checks and their printed reports during the call
            (scarlet2's global switch is restored afterwards).
        sep_kwargs: keyword arguments of `sep_singleband_measure` (the detections).

    Catalog columns: ``ra``, ``dec``, ``x_peak``, ``y_peak``, ``{band}_flux`` (the sum of the
    source's rendered model), ``init`` ("moments", "fallback", "floored" or "dropped"),
    ``fit_s`` (the blend's wall time). `reports` holds, per call, the blend index, the number of
    sources and their ``init`` labels.
    """

    def __init__(self, max_iter: int = 1000, e_rel: float = 1e-4, psf_pixels: int = 25,
                 min_corr: float = 0.99, spectrum_floor: float = 1e-3, name: str = "scarlet2",
                 validation: bool = False, sep_kwargs=None):
        if not (isinstance(max_iter, int | np.integer) and max_iter > 0):
            raise ValueError(f"max_iter must be a positive number of steps, got {max_iter!r}.")
        if not e_rel > 0:
            raise ValueError(f"e_rel must be > 0, got {e_rel!r}.")
        if psf_pixels % 2 != 1 or psf_pixels < 3:
            raise ValueError(f"psf_pixels must be odd and >= 3, got {psf_pixels!r}.")
        if not spectrum_floor > 0:
            raise ValueError(f"spectrum_floor must be > 0, got {spectrum_floor!r}.")
        self.max_iter = int(max_iter)
        self.e_rel = float(e_rel)
        self.psf_pixels = int(psf_pixels)
        self.min_corr = float(min_corr)
        self.spectrum_floor = float(spectrum_floor)
        self.__name__ = name
        self.validation = bool(validation)
        self.sep_kwargs = dict(sep_kwargs or {})
        self.reports = []  # one dict per call: blend, n_sources, fallback, floored, dropped

    def _setup(self, batch, surveys, survey_name):
        images, wcs, multires = select_survey(batch, surveys, survey_name)
        if not surveys:
            raise ValueError("Scarlet2Measure needs the surveys (MeasureGenerator gives them as "
                             "the `surveys` keyword).")
        name = survey_name or surveys[0].name
        survey = next((s for s in surveys if s.name == name), surveys[0])
        psfs = batch["psf"] if not multires else batch["psf"][name]
        pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
        bands = list(survey.available_filters)
        sky = np.array([get_mean_sky_level(survey, survey.get_filter(b)) for b in bands])
        return images, wcs, multires, psfs, pixel_scale, bands, sky

    def _scene(self, s2, obs, frame, centers, noise):
        """(scene, parameters, init labels) for ``centers`` [(y, x)]."""
        import jax.numpy as jnp
        from numpyro.distributions import constraints

        labels = []
        with s2.Scene(frame) as scene:
            for c in centers:
                center = jnp.asarray(c, float)
                label = "moments"
                try:
                    spectrum, morph = s2.init.from_gaussian_moments(obs, center,
                                                                    min_corr=self.min_corr)
                    ok = bool(jnp.all(jnp.isfinite(spectrum)) & jnp.all(jnp.isfinite(morph)))
                except (ValueError, FloatingPointError, ZeroDivisionError):
                    ok = False
                if not ok:
                    label = "fallback"
                    spectrum = s2.init.pixel_spectrum(obs, center)
                    morph = s2.init.compact_morphology()
                floor = self.spectrum_floor * noise
                spectrum = jnp.where(jnp.isfinite(spectrum), spectrum, floor)
                if bool(jnp.any(spectrum < floor)):
                    label = "floored" if label == "moments" else label
                    spectrum = jnp.maximum(spectrum, floor)
                s2.Source(center, spectrum, morph)
                labels.append(label)
        spec_step = partial(s2.relative_step, factor=0.05)
        morph_step = partial(s2.relative_step, factor=1e-3)
        with s2.Parameters(scene) as parameters:
            for i in range(len(scene.sources)):
                s2.Parameter(scene.sources[i].spectrum, name=f"spectrum:{i}",
                             constraint=constraints.positive, stepsize=spec_step)
                s2.Parameter(scene.sources[i].morphology, name=f"morph:{i}",
                             constraint=constraints.unit_interval, stepsize=morph_step)
        return scene, parameters, labels

    def deblend(self, image, centers, psf_images, sky):
        """Fits one blend. image [band, H, W] electrons (background-subtracted); centers
        [n, 2] (y, x) pixels; psf_images [band, P, P]; sky [band].

        Returns (models [n, band, H, W] in the observation's frame, init labels [n])."""
        import jax.numpy as jnp
        import scarlet2 as s2
        from scarlet2 import validation_utils

        previous = validation_utils.VALIDATION_SWITCH
        s2.set_validation(self.validation)
        try:
            return self._deblend(s2, jnp, image, centers, psf_images, sky)
        finally:
            s2.set_validation(previous)

    def _deblend(self, s2, jnp, image, centers, psf_images, sky):
        image = np.asarray(image, float)
        n = len(centers)
        if n == 0:
            return np.zeros((0,) + image.shape), []
        weights = np.broadcast_to((1.0 / np.asarray(sky, float))[:, None, None], image.shape)
        obs = s2.Observation(jnp.asarray(image), jnp.asarray(weights),
                             psf=s2.ArrayPSF(jnp.asarray(psf_images)))
        frame = s2.Frame.from_observations(obs)
        noise = jnp.asarray(np.sqrt(sky), float)
        keep = list(range(n))
        labels = ["dropped"] * n
        models = np.zeros((n,) + image.shape)
        while keep:
            scene, parameters, lab = self._scene(s2, obs, frame, [centers[i] for i in keep],
                                                 noise)
            scene_ = scene.fit(obs, parameters, max_iter=self.max_iter, e_rel=self.e_rel,
                               progress_bar=False)
            rendered = [np.asarray(obs.render(scene_.evaluate_source(src)))
                        for src in scene_.sources]
            bad = [k for k, m in enumerate(rendered) if not np.all(np.isfinite(m))]
            if not bad:
                for k, i in enumerate(keep):
                    models[i], labels[i] = rendered[k], lab[k]
                break
            keep = [i for k, i in enumerate(keep) if k not in bad]
        return models, labels

    def __call__(self, batch, idx, channels_last=False, surveys=None, survey_name=None,
                 **kwargs):
        import scarlet2  # noqa: F401  (a clear ImportError before any work: pip install btkjax[scarlet2])

        images, wcs, multires, psfs, pixel_scale, bands, sky = self._setup(
            batch, surveys, survey_name)
        image = np.asarray(images[idx])
        if channels_last:
            image = np.moveaxis(image, -1, 0)
        cat = sep_singleband_measure(batch, idx, channels_last=channels_last, surveys=surveys,
                                     survey_name=survey_name, **self.sep_kwargs)["catalog"]
        x = np.asarray(cat["x_peak"], float)
        y = np.asarray(cat["y_peak"], float)
        t0 = time.perf_counter()
        psf_img = odd_psf_images(psfs, pixel_scale, self.psf_pixels)
        models, labels = self.deblend(image, np.stack([y, x], -1), psf_img, sky)
        dt = time.perf_counter() - t0
        self.reports.append({"blend": int(idx), "n_sources": len(x),
                             "init": list(labels)})
        t = Table()
        t["ra"], t["dec"] = pixel_to_arcsec(wcs, x, y)
        t["x_peak"], t["y_peak"] = x, y
        dropped = np.array([lab == "dropped" for lab in labels], bool)
        flux = models.sum(axis=(-2, -1))  # [n, band]
        for b, band in enumerate(bands):
            t[f"{band}_flux"] = np.where(dropped, np.nan, flux[:, b]) if len(x) else flux[:, b]
        t["init"] = np.array(labels, dtype="U8") if len(x) else np.zeros(0, "U8")
        t["fit_s"] = np.full(len(x), dt)
        if multires:
            return {"catalog": t}
        noise = np.sqrt(sky)[None, :, None, None]
        segmentation = np.any(models > 3.0 * noise, axis=1)
        deblended = models.astype(np.asarray(images).dtype)
        if channels_last:
            deblended = np.moveaxis(deblended, 1, -1)
        return {"catalog": t, "segmentation": segmentation, "deblended_images": deblended}
