"""The simulation step: from keys and global blend ids to a batch of blends, entirely in JAX.

One pure function, `simulate`, does what a generator's batch does: sample blends on the
device (the JAX samplers of `btkjax.samplers`), gather their sources from device-resident
catalog arrays, draw per-blend observing conditions (PSF FWHM, sky level), render (one static
FFT box), add noise, and compute the truth as arrays. Everything that fixes a shape lives in
the hashable `StepSpec` (static under ``jit``); everything else is a traced leaf of
`StepArrays`, so one compiled program serves every batch of a given size, and the step
composes with ``jit``, ``vmap``, ``grad`` (noise mode ``"none"``; images are differentiable in
the catalog arrays and in the conditions) and ``shard_map``.

Set-up (reading a catalog table, the survey, the sampling function, planning the FFT box with
GalSim) is host work and lives in the interface floor: ``btkjax.simulation.make_step``.

Usage (inside a user's jitted training step, no host round trip)::

    import jax, jax.numpy as jnp
    import btkjax as btk
    from btkjax.core.step import UniformConditions, step_keys
    from btkjax.simulation import make_step

    catalog = btk.catalog.CatsimCatalog.default()
    sampling = btk.sampling_functions.DefaultSampling(max_number=3, stamp_size=12.0)
    step = make_step(catalog, btk.survey.get_surveys("LSST"), sampling, noise="all",
                     conditions=UniformConditions(fwhm_scale=(0.8, 1.3), sky_scale=(0.8, 1.2)))
    keys = step_keys(jax.random.key(0))              # or step.keys(seed): the generator's keys

    @jax.jit
    def train_step(params, opt_state, i):
        ids = i * 16 + jnp.arange(16)                # global blend ids: fresh blends each step
        out = step(keys, ids)                        # StepOutput: images [16, band, S, S],
        x, truth = out.images, out.truth             # isolated, truth (mask, x, y, flux, ...)
        loss, grads = jax.value_and_grad(my_loss)(params, x, truth)
        ...                                          # optax update

``step.spec.render.fft_size`` is the one FFT box (the default catalog's largest galaxies need
500 pixels for a 120-pixel LSST stamp; pass ``fft_size`` to `make_step` to trade folding
accuracy for speed). Keep the batch size fixed (one compiled program).

Reproducibility: blend ``i`` depends only on the keys and ``i`` (`btkjax.core.keys`): its
galaxies, positions and conditions are the same in any batch. Its pixels are bit-identical in
any call of the same shape (any position, any neighbours, any number of devices each running
that call: `btkjax.engine` pads calls to one size for this); across call shapes XLA may round
differently (float32 ulps, so a Poisson deviate may land on the next integer). The step agrees
with what `CatsimGenerator` draws for the same seeds (`btkjax.simulation.SimulationStep.keys`)
within float32 rounding and the folding threshold (IMAGE_RTOL_PEAK_F32 of the peak): the
generator draws each galaxy in its own FFT box, the step every blend in one box. The
generator's images are the bit-stable reference of saved files and seeds; the step is
bit-stable for its own `StepSpec` and call size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core import profiles
from btkjax.core.keys import (
    NOISE_STREAM,
    ROTATION_STREAM,
    as_key,
    blend_keys,
    blend_uniform,
    stream_key,
)
from btkjax.core.noise import NOISE_MODES, add_noise
from btkjax.core.render import RenderSpec, render
from btkjax.core.samplers import Blends, default_sampler, density_sampler, pair_sampler
from btkjax.core.sources import CatalogArrays, make_sources
from btkjax.core.tolerances import CONDITIONS_BOUNDS_RTOL

__all__ = [
    "PSF_MODELS",
    "SAMPLERS",
    "Conditions",
    "UniformConditions",
    "StepKeys",
    "step_keys",
    "StepSpec",
    "StepArrays",
    "Truth",
    "StepOutput",
    "simulate",
    "psf_kimages",
    "blendedness",
    "snr",
    "trace_counts",
]

PSF_MODELS = ("kolmogorov_airy", "moffat", "fixed")
"""``kolmogorov_airy``: BTK's default PSF, Kolmogorov(fwhm) x Airy(lam_over_diam, obscuration);
``moffat``: Moffat(beta, fwhm); ``fixed``: k-images given once (any GalSim PSF; the FWHM of the
conditions is then not used)."""

SAMPLERS = ("default", "pair", "density")

# Stream tags of `step_keys` (`stream_key(key, tag)`; noise and rotation are the generators'
# tags of `btkjax.core.keys`).
SAMPLE_STREAM, CONDITIONS_STREAM = 0, 3

trace_counts: dict = {"simulate": 0}
"""How many times `simulate` was traced (a Python side effect that runs only while tracing)."""


class Conditions(NamedTuple):
    """Observing conditions, per blend and band.

    Attributes:
        fwhm: [blend, band] PSF FWHM in arcsec (atmosphere for ``kolmogorov_airy``).
        sky: [blend, band] mean sky level in electrons per pixel.
    """

    fwhm: jax.Array
    sky: jax.Array


@dataclasses.dataclass(frozen=True)
class UniformConditions:
    """Per-blend conditions: the survey's FWHM and sky of every band times one factor per
    blend each, drawn uniformly in ``fwhm_scale`` and ``sky_scale`` (the seeing and the sky
    brightness of an exposure move all bands together).

    Subclass and override `draw` (and `fwhm_bounds`, used at set-up to size the FFT box and
    the k-range) for another distribution.
    """

    fwhm_scale: tuple = (1.0, 1.0)
    sky_scale: tuple = (1.0, 1.0)

    def __post_init__(self):
        for name in ("fwhm_scale", "sky_scale"):
            lo, hi = getattr(self, name)
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got "
                                 f"{getattr(self, name)!r}.")

    def fwhm_bounds(self, fwhm):
        """Smallest and largest FWHM [band] that `draw` can return, from the survey's [band]."""
        fwhm = np.asarray(fwhm, float)
        return fwhm * self.fwhm_scale[0], fwhm * self.fwhm_scale[1]

    def draw(self, key, fwhm, sky):
        """One blend's conditions from its key and the survey's fwhm [band], sky [band]."""
        u = jax.random.uniform(key, (2,), jnp.float32)
        f = self.fwhm_scale[0] + (self.fwhm_scale[1] - self.fwhm_scale[0]) * u[0]
        s = self.sky_scale[0] + (self.sky_scale[1] - self.sky_scale[0]) * u[1]
        return fwhm * f.astype(fwhm.dtype), sky * s.astype(sky.dtype)


class StepKeys(NamedTuple):
    """The keys of a step's independent streams."""

    sample: jax.Array
    rotation: jax.Array
    noise: jax.Array
    conditions: jax.Array


def step_keys(key, sample_key=None, noise_stream: int | None = None) -> StepKeys:
    """The `StepKeys` of one key (or int seed): each stream is ``stream_key(key, tag)``.

    ``sample_key`` (a key or int seed) overrides the sampling stream and ``noise_stream``
    folds one more tag into the noise key: with ``sample_key=sampling_function.seed`` and
    ``noise_stream`` the survey's stream, these are exactly the keys `CatsimGenerator` uses for
    ``seed`` (so the step draws the generator's blends; see ``btkjax.simulation``).
    """
    key = as_key(key)
    sample = stream_key(key, SAMPLE_STREAM) if sample_key is None else as_key(sample_key)
    noise = stream_key(key, NOISE_STREAM)
    if noise_stream is not None:
        noise = stream_key(noise, noise_stream)
    return StepKeys(sample=sample, rotation=stream_key(key, ROTATION_STREAM), noise=noise,
                    conditions=stream_key(key, CONDITIONS_STREAM))


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that fixes a shape or a program (hashable: static under ``jit``).

    Attributes:
        render: the `RenderSpec` (stamp, one FFT box, k-range, component kinds).
        max_number: slots per blend.
        sampler: one of `SAMPLERS`.
        psf: one of `PSF_MODELS`.
        noise: one of `btkjax.noise.NOISE_MODES`.
        isolated: render each galaxy alone too (needed for blendedness and SNR).
        augment: rotate each galaxy by a uniform angle in [0, 360) degrees (rotation stream).
        apply_shear: keep the sampler's shear (else g1 = g2 = 0).
        conditions: an object with ``draw(key, fwhm, sky)`` (`UniformConditions`), or None for
            the survey's fixed conditions.
        dtype: "float32" or "float64" (float64 needs ``jax_enable_x64``).
        chunk: blends rendered per step of the compiled loop (memory bound).
    """

    render: RenderSpec
    max_number: int
    sampler: str = "default"
    psf: str = "kolmogorov_airy"
    noise: str = "all"
    isolated: bool = True
    augment: bool = False
    apply_shear: bool = False
    conditions: Callable | None = None
    dtype: str = "float32"
    chunk: int = 8

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.psf not in PSF_MODELS:
            raise ValueError(f"psf must be one of {PSF_MODELS}, got {self.psf!r}.")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}.")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}.")
        if self.max_number < 1 or self.chunk < 1:
            raise ValueError(f"max_number and chunk must be >= 1, got {self.max_number}, "
                             f"{self.chunk}.")


class StepArrays(NamedTuple):
    """The device-resident inputs of a step (all traced: differentiable, never baked in).

    Attributes:
        catalog: `CatalogArrays` [row, comp].
        fluxes: [row, band] total flux in electrons.
        rows: [n] eligible catalog rows (the bright rows of the pair sampler).
        rows_b: [m] the dim rows of the pair sampler ([1] otherwise, unused).
        poisson_cdf: [max_number + 1] of the density sampler ([1] otherwise, unused).
        min_number: int32 scalar.
        max_shift: arcsec, scalar.
        shear: [2] (g1, g2) of the sampler.
        fwhm: [band] the survey's PSF FWHM (arcsec).
        sky: [band] the survey's mean sky (electrons per pixel).
        lam_over_diam: [band] arcsec (0: no optics), ``kolmogorov_airy``.
        obscuration: [band] linear fraction, ``kolmogorov_airy``.
        moffat_beta: [band] Moffat index, ``moffat``.
        psf_k: [band, Ry, Cx] PSF x pixel on the evaluation grid, ``fixed`` ([1, 1, 1] else).
    """

    catalog: CatalogArrays
    fluxes: jax.Array
    rows: jax.Array
    rows_b: jax.Array
    poisson_cdf: jax.Array
    min_number: jax.Array
    max_shift: jax.Array
    shear: jax.Array
    fwhm: jax.Array
    sky: jax.Array
    lam_over_diam: jax.Array
    obscuration: jax.Array
    moffat_beta: jax.Array
    psf_k: jax.Array


class Truth(NamedTuple):
    """Per-slot truth of a batch (empty slots: mask False, zeros).

    Attributes:
        mask: [blend, slot] bool.
        index: [blend, slot] catalog row.
        x, y: [blend, slot] pixels (0-based, the stamp's true center at (S - 1) / 2).
        flux: [blend, slot, band] electrons.
        hlr: [blend, slot, comp] component half-light radii (arcsec).
        e1, e2: [blend, slot, comp] component ellipticity |g| = (1 - q) / (1 + q) at angle
            2 (beta + rotation), before the lensing shear.
        blendedness: [blend, slot, band] BTK's ``1 - <S_k, S_k> / <S_k, sum_j S_j>`` on the
            noiseless isolated images (None without ``isolated``).
        snr: [blend, slot, band] BTK's ``sqrt(sum S^2 / (sky + S))`` (None without
            ``isolated``).
        n_drawn: [blend] galaxies drawn before clipping to [min_number, max_number] (the
            density sampler's Poisson count; max_number + 1 means "more"), else the count.
        fwhm_in_bounds: [blend] False where a conditions FWHM falls outside the bounds the FFT
            box and k-range were planned for (`btkjax.simulation.make_step`).
    """

    mask: jax.Array
    index: jax.Array
    x: jax.Array
    y: jax.Array
    flux: jax.Array
    hlr: jax.Array
    e1: jax.Array
    e2: jax.Array
    blendedness: jax.Array | None
    snr: jax.Array | None
    n_drawn: jax.Array
    fwhm_in_bounds: jax.Array


class StepOutput(NamedTuple):
    """A batch from `simulate`.

    Attributes:
        images: [blend, band, S, S] (noisy unless ``noise="none"``; background subtracted).
        isolated: [blend, slot, band, S, S] noiseless, or None.
        truth: `Truth`.
        blends: the sampled `Blends` (dx, dy arcsec, rotation degrees, g1, g2).
        conditions: the `Conditions` of each blend.
    """

    images: jax.Array
    isolated: jax.Array | None
    truth: Truth
    blends: Blends
    conditions: Conditions


def _sample(spec: StepSpec, arrays: StepArrays, key, blend_ids):
    if spec.sampler == "default":
        blends = default_sampler(key, blend_ids, arrays.rows, max_number=spec.max_number,
                                 min_number=arrays.min_number, max_shift=arrays.max_shift,
                                 augment=False, g1=arrays.shear[0], g2=arrays.shear[1])
        return blends, blends.mask.sum(axis=-1).astype(jnp.int32)
    if spec.sampler == "pair":
        blends = pair_sampler(key, blend_ids, arrays.rows, arrays.rows_b,
                              max_shift=arrays.max_shift, augment=False)
        return blends, blends.mask.sum(axis=-1).astype(jnp.int32)
    return density_sampler(key, blend_ids, arrays.rows, max_number=spec.max_number,
                           min_number=arrays.min_number, poisson_cdf=arrays.poisson_cdf,
                           max_shift=arrays.max_shift, augment=False)


_MOFFAT_TABLE = 8192
"""Points of the Moffat transform's table in x = k r_d on [0, 60] (it is below 1e-20 beyond):
linear interpolation error h^2 / 8 |F''| < 2e-7 of F(0)."""


def psf_kimages(spec: RenderSpec, model: str, arrays: StepArrays, fwhm):
    """PSF x pixel on the evaluation grid of `spec` for each blend's FWHM.

    Args:
        spec: the `RenderSpec`.
        model: one of `PSF_MODELS`.
        arrays: `StepArrays` (optics and Moffat parameters per band).
        fwhm: [blend, band] arcsec (ignored for ``fixed``).

    Returns:
        real [blend, band, Ry, Cx] (the PSFs are centred and symmetric), or the fixed
        [band, Ry, Cx].
    """
    if model == "fixed":
        return arrays.psf_k
    dtype = fwhm.dtype
    kx = jnp.asarray(spec.x_indices * spec.dk, dtype)
    ky = jnp.asarray(spec.y_indices * spec.dk, dtype)
    ksq = kx[None, :] ** 2 + ky[:, None] ** 2
    pixel = profiles.pixel_kvalue(kx[None, :], ky[:, None], spec.pixel_scale).astype(dtype)
    f = fwhm[..., None, None]
    if model == "kolmogorov_airy":
        out = profiles.kolmogorov_kvalue(ksq, f)
        lam = arrays.lam_over_diam.astype(dtype)[:, None, None]
        obsc = arrays.obscuration.astype(dtype)[:, None, None]
        safe_lam = jnp.where(lam > 0, lam, 1.0)
        airy = profiles.airy_kvalue(ksq, safe_lam, obsc)
        out = jnp.where(lam > 0, out * airy, out)
    else:  # moffat: F depends on x = k r_d only; tabulated once per band and blend
        beta = arrays.moffat_beta.astype(dtype)
        rd = fwhm / (2.0 * jnp.sqrt(2.0 ** (1.0 / beta) - 1.0))  # [blend, band]
        x = jnp.linspace(0.0, 60.0, _MOFFAT_TABLE, dtype=dtype)
        table = profiles.moffat_kvalue(x[None, :] ** 2, beta[:, None], scale_radius=1.0)
        k = jnp.sqrt(ksq)

        def one(rd_b, table_b):
            return jnp.interp(k * rd_b, x, table_b)

        out = jax.vmap(jax.vmap(one, (0, 0)), (0, None))(rd, table)
    return (out * pixel).astype(dtype)


def blendedness(iso):
    """BTK's blendedness ``1 - <S_k, S_k> / <S_k, sum_j S_j>`` of isolated images
    [..., slot, y, x] -> [..., slot] (0 where a slot is empty)."""
    num = jnp.sum(iso * iso, axis=(-2, -1))
    den = jnp.sum(iso * iso.sum(axis=-3, keepdims=True), axis=(-2, -1))
    ok = den > 0
    return jnp.where(ok, 1.0 - num / jnp.where(ok, den, 1.0), 0.0)


def snr(iso, sky):
    """BTK's SNR ``sqrt(sum S^2 / (sky + S))`` of isolated images [..., y, x] with `sky`
    broadcastable to [...]."""
    s = jnp.maximum(iso, 0.0)
    total = jnp.sum(iso * iso / (jnp.asarray(sky)[..., None, None] + s), axis=(-2, -1))
    return jnp.sqrt(total)


def _truth(spec: StepSpec, sources, blends, drawn, iso, sky, in_bounds, dtype) -> Truth:
    r = spec.render
    center = (r.stamp_pixels - 1) / 2
    mask = blends.mask
    theta = 2 * (sources.beta + sources.rotation[..., None])
    g = (1 - sources.q) / (1 + sources.q)
    comp_on = mask[..., None] & (sources.flux.sum(axis=-2) > 0)
    zero = jnp.zeros_like(g)
    blend_k = snr_k = None
    if iso is not None:
        iso_t = jnp.swapaxes(iso, 1, 2)  # [blend, band, slot, y, x]
        blend_k = jnp.swapaxes(blendedness(iso_t), 1, 2)
        snr_k = snr(iso, sky[:, None, :])
        blend_k = jnp.where(mask[..., None], blend_k, 0.0)
        snr_k = jnp.where(mask[..., None], snr_k, 0.0)
    return Truth(
        mask=mask,
        index=blends.index,
        x=jnp.where(mask, center + sources.dx / r.pixel_scale, 0.0).astype(dtype),
        y=jnp.where(mask, center + sources.dy / r.pixel_scale, 0.0).astype(dtype),
        flux=sources.flux.sum(axis=-1),
        hlr=jnp.where(comp_on, sources.hlr, 0.0),
        e1=jnp.where(comp_on, g * jnp.cos(theta), zero),
        e2=jnp.where(comp_on, g * jnp.sin(theta), zero),
        blendedness=blend_k,
        snr=snr_k,
        n_drawn=drawn,
        fwhm_in_bounds=in_bounds,
    )


@partial(jax.jit, static_argnames=("spec",))
def simulate(arrays: StepArrays, keys: StepKeys, blend_ids, spec: StepSpec,
             conditions: Conditions | None = None, fwhm_bounds=None) -> StepOutput:
    """One batch of blends, entirely on the device.

    Args:
        arrays: `StepArrays` (device-resident; traced).
        keys: `StepKeys` (`step_keys`).
        blend_ids: [blend] int global blend ids (in [0, 2**31)).
        spec: the static `StepSpec`.
        conditions: `Conditions` [blend, band] to use instead of drawing them (e.g. to
            differentiate with respect to the FWHM), or None.
        fwhm_bounds: ([band], [band]) the FWHM range the box was planned for (flags
            ``truth.fwhm_in_bounds``), or None (all in bounds).

    Returns:
        `StepOutput`.
    """
    trace_counts["simulate"] += 1
    dtype = jnp.dtype(spec.dtype)
    blend_ids = jnp.asarray(blend_ids, jnp.int32)
    n = blend_ids.shape[0]
    blends, drawn = _sample(spec, arrays, keys.sample, blend_ids)
    if not spec.apply_shear:
        blends = blends._replace(g1=jnp.zeros_like(blends.g1), g2=jnp.zeros_like(blends.g2))
    if spec.augment:
        rot = blend_uniform(keys.rotation, blend_ids, (spec.max_number,), 0.0, 360.0)
        blends = blends._replace(rotation=jnp.where(blends.mask, rot, 0.0))
    fwhm0 = jnp.asarray(arrays.fwhm, dtype)
    sky0 = jnp.asarray(arrays.sky, dtype)
    if conditions is None:
        if spec.conditions is None:
            conditions = Conditions(jnp.broadcast_to(fwhm0, (n,) + fwhm0.shape),
                                    jnp.broadcast_to(sky0, (n,) + sky0.shape))
        else:
            ck = blend_keys(keys.conditions, blend_ids)
            fwhm, sky = jax.vmap(lambda k: spec.conditions.draw(k, fwhm0, sky0))(ck)
            conditions = Conditions(fwhm, sky)
    conditions = Conditions(jnp.asarray(conditions.fwhm, dtype), jnp.asarray(conditions.sky,
                                                                              dtype))
    if fwhm_bounds is None:
        in_bounds = jnp.ones((n,), bool)
    else:
        lo, hi = (jnp.asarray(b, dtype) for b in fwhm_bounds)
        eps = CONDITIONS_BOUNDS_RTOL
        in_bounds = jnp.all((conditions.fwhm >= lo * (1 - eps))
                            & (conditions.fwhm <= hi * (1 + eps)), axis=-1)
    sources = make_sources(blends, arrays.catalog, arrays.fluxes)
    sources = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                           else a, sources)
    psf_k = psf_kimages(spec.render, spec.psf, arrays, conditions.fwhm)
    if not jnp.iscomplexobj(psf_k):  # a fixed asymmetric PSF stays complex
        psf_k = psf_k.astype(dtype)
    images, iso = render(sources, psf_k, spec.render, isolated=spec.isolated,
                         chunk=min(spec.chunk, n))
    images = add_noise(keys.noise, blend_ids, images, conditions.sky, spec.noise)
    truth = _truth(spec, sources, blends, drawn, iso, conditions.sky, in_bounds, dtype)
    return StepOutput(images=images, isolated=iso, truth=truth, blends=blends,
                      conditions=conditions)

