"""Set-up of the simulation step (`btkjax.core.step`) from BTK's objects: a catalog, a survey,
a sampling function. Host work, done once: the catalog's arrays moved to the device, the FFT
box planned from the catalog's size bounds, the sampler's largest shift and the widest PSF,
the k-range from the narrowest PSF.

    step = make_step(catalog, survey, sampling_function, conditions=UniformConditions(...))
    keys = step.keys(seed)              # the keys CatsimGenerator(seed=seed) uses
    out = step(keys, jnp.arange(64))    # a StepOutput, jittable / vmappable / differentiable

`step(keys, ids)` is `btkjax.core.step.simulate(step.arrays, keys, ids, step.spec)`: call either
inside your own ``jax.jit``.
"""

from __future__ import annotations

import math

import galsim
import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.boxes import box_size, row_extents
from btkjax.core.keys import survey_stream
from btkjax.core.render import CATSIM_KINDS
from btkjax.core.samplers import JaxDefaultSampler, JaxDensitySampler, JaxPairSampler
from btkjax.core.sources import CatalogArrays
from btkjax.core.step import (
    Conditions,
    StepArrays,
    StepKeys,
    StepOutput,
    StepSpec,
    simulate,
    step_keys,
)
from btkjax.galaxies import band_fluxes, catsim_arrays
from btkjax.optics import make_render_spec, psf_fold_box, psf_kimage_from_galsim
from btkjax.survey import default_psf_params, get_mean_sky_level

__all__ = ["SimulationStep", "make_step", "plan_fft_size"]

_PSF_CHOICES = ("kolmogorov_airy", "moffat", "survey")


class SimulationStep:
    """A configured simulation step: ``step(keys, blend_ids, conditions=None) -> StepOutput``.

    Attributes:
        spec: the static `StepSpec`.
        arrays: the device-resident `StepArrays`.
        fwhm_bounds: ([band], [band]) the FWHM range the box was planned for.
        bands: the survey's band names.
        survey_name: the survey's name.
        sample_seed: the sampling function's seed (the sampling stream of `keys`).
    """

    def __init__(self, spec: StepSpec, arrays: StepArrays, fwhm_bounds, bands, survey_name,
                 sample_seed):
        self.spec = spec
        self.arrays = arrays
        self.fwhm_bounds = tuple(jnp.asarray(b) for b in fwhm_bounds)
        self.bands = tuple(bands)
        self.survey_name = survey_name
        self.sample_seed = int(sample_seed)

    def keys(self, seed: int) -> StepKeys:
        """The `StepKeys` `CatsimGenerator(seed=seed)` uses for this survey and sampler."""
        return step_keys(int(seed), sample_key=self.sample_seed,
                         noise_stream=survey_stream(self.survey_name))

    def __call__(self, keys: StepKeys, blend_ids, conditions: Conditions | None = None
                 ) -> StepOutput:
        return simulate(self.arrays, keys, blend_ids, self.spec, conditions, self.fwhm_bounds)


def _sampler_arrays(jax_sampler, dtype):
    """(sampler name, rows, rows_b, poisson_cdf, min_number, max_shift, shear) of a JAX sampler."""
    one = jnp.zeros((1,), dtype)
    shift = jnp.asarray(jax_sampler.max_shift, dtype)
    if isinstance(jax_sampler, JaxDefaultSampler):
        return ("default", jax_sampler.eligible_rows, jnp.zeros((1,), jnp.int32), one,
                jax_sampler.min_number, shift, jnp.asarray(jax_sampler.shear, dtype))
    if isinstance(jax_sampler, JaxPairSampler):
        return ("pair", jax_sampler.bright_rows, jax_sampler.dim_rows, one, 2, shift,
                jnp.zeros((2,), dtype))
    if isinstance(jax_sampler, JaxDensitySampler):
        return ("density", jax_sampler.eligible_rows, jnp.zeros((1,), jnp.int32),
                jnp.asarray(jax_sampler.poisson_cdf, dtype), jax_sampler.min_number, shift,
                jnp.zeros((2,), dtype))
    raise TypeError(f"The step runs the built-in JAX samplers (JaxDefaultSampler, JaxPairSampler, "
                    f"JaxDensitySampler); got {type(jax_sampler).__name__}.")


def _galsim_psfs(model, fwhm, params, beta, survey):
    if model == "survey":
        return [survey.get_filter(b).psf for b in survey.available_filters]
    out = []
    for j, f in enumerate(fwhm):
        if model == "moffat":
            out.append(galsim.Moffat(beta=float(beta[j]), fwhm=float(f)))
            continue
        atmosphere = galsim.Kolmogorov(fwhm=float(f))
        lam, obsc = params[j]["lam_over_diam"], params[j]["obscuration"]
        out.append(atmosphere if lam <= 0 else
                   galsim.Convolve(atmosphere, galsim.Airy(lam_over_diam=lam, obscuration=obsc)))
    return out


def plan_fft_size(kinds, arrays: CatalogArrays, rows, stamp_pixels: int, pixel_scale: float,
                  wide_psfs, fwhm_max: float, max_shift: float, max_shear: float = 0.0) -> int:
    """The one FFT box of a step: the smallest fast size that keeps the light of every
    eligible catalog row (`row_extents`, stretched by the largest shear, at the largest shift)
    and the widest PSFs' folded wings (`psf_fold_box`) below FOLDING_THRESHOLD in the stamp."""
    rows = np.asarray(rows)
    ext = row_extents(kinds, arrays.hlr[rows], arrays.q[rows], arrays.n[rows],
                      arrays.frac[rows] > 0, fwhm_max)
    stretch = (1 + max_shear) / math.sqrt(1 - max_shear**2)
    reach = float(ext.max()) * stretch + math.sqrt(2) * max_shift
    return max(box_size(reach, stamp_pixels, pixel_scale),
               psf_fold_box(wide_psfs, stamp_pixels, pixel_scale, max_shift))


def make_step(catalog, survey, sampling_function, *, noise: str = "all",
              psf: str = "kolmogorov_airy", moffat_beta=3.5, conditions=None,
              fft_size: int | None = None, stamp_size: float | None = None,
              isolated: bool = True, augment: bool = False, apply_shear: bool = False,
              dtype: str = "float32", chunk: int = 8, arrays: CatalogArrays | None = None,
              kinds=CATSIM_KINDS) -> SimulationStep:
    """A `SimulationStep` for a catalog, a survey and a built-in sampling function.

    Args:
        catalog: a btkjax `Catalog` (CatSim columns; give `arrays` and `kinds` otherwise).
        survey: a `Survey`.
        sampling_function: a built-in sampling function (``has_jax_sampler``).
        noise: a noise mode (`btkjax.noise.NOISE_MODES`).
        psf: "kolmogorov_airy" (BTK's default PSF with the conditions' FWHM), "moffat" (with
            `moffat_beta`, scalar or per band) or "survey" (the survey's GalSim PSF objects as
            fixed k-images; the conditions then only set the sky).
        conditions: None (the survey's FWHM and sky) or an object with ``draw(key, fwhm, sky)``
            and ``fwhm_bounds(fwhm)``, e.g. `btkjax.core.step.UniformConditions`.
        fft_size: the FFT box (pixels, even); default planned by `plan_fft_size`.
        stamp_size: arcsec (default the sampling function's).
        isolated, augment, apply_shear, dtype, chunk: see `btkjax.core.step.StepSpec`.
        arrays: the catalog's `CatalogArrays` (default `catsim_arrays` of the table).
        kinds: the component kinds of `arrays`.
    """
    if not getattr(sampling_function, "has_jax_sampler", False):
        raise TypeError(f"make_step needs a built-in sampling function with a JAX sampler; "
                        f"{type(sampling_function).__name__} has none.")
    if psf not in _PSF_CHOICES:
        raise ValueError(f"psf must be one of {_PSF_CHOICES}, got {psf!r}.")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype='float64' needs jax_enable_x64.")
    jdtype = jnp.dtype(dtype)
    table = catalog.table
    stamp_size = float(stamp_size if stamp_size is not None else sampling_function.stamp_size)
    pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
    stamp_pixels = int(stamp_size / pixel_scale)
    bands = list(survey.available_filters)
    filters = [survey.get_filter(b) for b in bands]
    params = [default_psf_params(survey, f) for f in filters]
    fwhm0 = np.array([p["fwhm"] for p in params])
    beta = np.broadcast_to(np.asarray(moffat_beta, float), fwhm0.shape)
    if psf == "moffat" and not np.all(beta > 1.1):
        raise ValueError(f"moffat_beta must be > 1.1 (GalSim's untruncated Moffat), got {beta}.")
    sky0 = np.array([get_mean_sky_level(survey, f) for f in filters])
    lo, hi = (fwhm0, fwhm0) if conditions is None else conditions.fwhm_bounds(fwhm0)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    if conditions is not None and not hasattr(conditions, "draw"):
        raise TypeError(f"conditions must have draw(key, fwhm, sky) and fwhm_bounds(fwhm); "
                        f"got {type(conditions).__name__}.")
    sampler = sampling_function.jax_sampler(table)
    name, rows, rows_b, cdf, min_number, shift, shear = _sampler_arrays(sampler, jdtype)
    cat = catsim_arrays(table) if arrays is None else arrays
    max_shear = float(np.hypot(*np.asarray(shear))) if apply_shear else 0.0
    wide = _galsim_psfs("survey" if psf == "survey" else psf, hi, params, beta, survey)
    narrow = _galsim_psfs("survey" if psf == "survey" else psf, lo, params, beta, survey)
    if fft_size is None:
        all_rows = np.unique(np.concatenate([np.asarray(rows), np.asarray(rows_b)]))
        fft_size = plan_fft_size(kinds, cat, all_rows, stamp_pixels, pixel_scale, wide,
                                 float(hi.max()), float(sampler.max_shift), max_shear)
    rspec = make_render_spec(stamp_pixels, pixel_scale, narrow, kinds=kinds, fft_size=fft_size)
    psf_k = jnp.zeros((1, 1, 1), jdtype)
    if psf == "survey":
        k = np.stack([psf_kimage_from_galsim(p, rspec) for p in wide])
        psf_k = jnp.asarray(k.real if np.all(k.imag == 0) else k,
                            jdtype if np.all(k.imag == 0) else jnp.result_type(jdtype, jnp.complex64))
    spec = StepSpec(render=rspec, max_number=int(sampler.max_number), sampler=name,
                    psf="fixed" if psf == "survey" else psf, noise=noise, isolated=isolated,
                    augment=augment, apply_shear=apply_shear, conditions=conditions,
                    dtype=dtype, chunk=int(chunk))
    fluxes = band_fluxes(table, survey, "{band}_ab")
    step_arrays = StepArrays(
        catalog=CatalogArrays(*[jnp.asarray(a, jdtype) for a in cat]),
        fluxes=jnp.asarray(fluxes, jdtype),
        rows=jnp.asarray(rows, jnp.int32),
        rows_b=jnp.asarray(rows_b, jnp.int32),
        poisson_cdf=jnp.asarray(cdf, jdtype),
        min_number=jnp.asarray(min_number, jnp.int32),
        max_shift=jnp.asarray(shift, jdtype),
        shear=jnp.asarray(shear, jdtype),
        fwhm=jnp.asarray(fwhm0, jdtype),
        sky=jnp.asarray(sky0, jdtype),
        lam_over_diam=jnp.asarray([p["lam_over_diam"] for p in params], jdtype),
        obscuration=jnp.asarray([p["obscuration"] for p in params], jdtype),
        moffat_beta=jnp.asarray(beta, jdtype),
        psf_k=psf_k,
    )
    return SimulationStep(spec, step_arrays, (lo, hi), bands, survey.name,
                          sampling_function.seed)
