r"""Forward-model deblending: every detected galaxy of a blend fitted jointly, in all bands.

Each detected galaxy is modelled as one elliptical profile (exponential by default, or a Sersic
profile of free index) with a position, a flux per band, a half-light radius and a reduced-shear
ellipticity, convolved with the band's known PSF by `btkjax.render.render`. The parameters of all
galaxies of a blend are fitted at once by minimizing the Gaussian negative log-likelihood of the
background-subtracted image under the Poisson noise model of `btkjax.noise` ("all" mode): half
the Poisson deviance of the counts ``d + sky`` given the rate ``m + sky``,

.. math::

    -\log L = \sum_{band, pix} \left[(m - d) - (d + sky) \log\frac{m + sky}{d + sky}\right]
    \approx \frac12 \sum \frac{(d - m)^2}{sky + m},

i.e. the chi-square with **variance = sky + model**, in its exact Poisson form. Unlike the
Gaussian chi-square with a model-dependent variance it is unbiased (its score has mean zero at
the truth) AND its minimum on a noiseless image is the truth (zero deviance at m = d).
``noise="chi2"`` selects the chi-square with variance = sky + data (fixed weights) instead.
``chi2`` in the results is Pearson's sum((d - m)^2 / (sky + m)).

Parameters are fitted in an unconstrained space:

- position: pixel offset from the initial detection ``R tanh(u / R)`` (``R = max_offset``
  pixels), so a fit can never wander off its detection;
- fluxes: ``exp(u)`` per band (always positive);
- half-light radius: ``exp(u)`` arcsec;
- ellipticity: reduced shear ``g = G_MAX * 2 eta / (1 + sqrt(1 + 4 |eta|^2))``, smooth
  everywhere, ``g ~ eta`` near 0, ``|g| < G_MAX``;
- Sersic index (``model="sersic"``): ``N_MIN + (N_MAX - N_MIN) sigmoid(u)``.

The default optimizer is optax's L-BFGS (backtracking line search; the loss and gradient it
stores at the accepted point start the next step); Adam with a decaying schedule is the
alternative (and the one `fit_unrolled` differentiates through).

Execution: the batch is cut into chunks of ``chunk`` blends (`default_chunk`: 1 on CPU, 64 on
accelerators; the last chunk is padded with empty blends), each chunk one call of a jitted
program (vmapped over its blends, with padded, masked slots) compiled once per (`RenderSpec`,
model, optimizer, chunk shape) whatever the number of blends: a second batch, of any size,
does not recompile. With one blend per call each blend runs its own while loop and line
searches; vmapped, every blend steps until the slowest has converged and every line search
runs as long as the longest (2 CPU cores, 20 LSST blends on 24" stamps, float32: 3.7 s one
blend per call, 20.2 s vmapped). Each
blend stops when its loss changes by less than ``rtol |loss| + atol`` for ``patience`` steps in
a row (or at ``max_steps``), and reports a status (`STATUS_*` bit flags): converged, hit the
step limit, had no detection, dropped a detection outside the stamp, had more detections than
slots, diverged (a non-finite loss or gradient: that blend keeps its last finite parameters,
the others go on), had a Hessian that is not positive definite (NaN errors), or got galaxies
added from its residual.

Initialization (`init_galaxies`, pure JAX): the inverse-sky-weighted band sum is shared among
the detections in proportion to their SDSS-style symmetric templates (``min(I(p), I(2c - p))``
around each detection pixel c: the light of a neighbour on one side of a galaxy is not mirrored
on the other, so it drops out); adaptive Gaussian moments of each share, minus the PSF's, give
its centroid, size and ellipticity; the fluxes per band solve the linear least-squares problem
of the data given the unit-flux models. Then, twice, the data are shared in proportion to these
models instead, and each model's moments (measured the same way) are moved onto those of its
share. Moments of the raw image around each detection, which the fit started from before, mix
the two galaxies of a close pair and led it into wrong minima (13 of 60 random noiseless pairs
1.5 to 4 pixels apart, none with the shared moments; tests/test_deblend.py fits pairs 4.8 and
3.05 pixels apart, 1.3 and 0.8 PSF FWHM, to 1e-3 from this initialization).

Errors (`fisher_errors`): the inverse of the Hessian of -log L with respect to the physical
parameters of all the galaxies of a blend (so blended galaxies' correlations are in), by
default on the fitted model's own image (the Fisher matrix at the fit, i.e. the Cramer-Rao
bound; ``information="observed"`` uses the data). `fit_blends` returns them with the fit.

Galaxies the detection missed (`residual_peaks`, ``add_sources``): a fitted single profile
absorbs the light of an undetected neighbour. The matched-filtered residual, divided by its
noise (Poisson plus a few percent of the model for model mismatch), shows such a neighbour; it
is put in a free slot and the blend fitted again, and the refit is kept when -log L drops by
more than the number of new parameters.

Pure functions and the high-level path:

- `init_galaxies`, `to_unconstrained`, `to_physical`, `to_sources`, `neg_log_likelihood`;
- `fit` (jitted while-loops, cached) and `fit_unrolled` (a fixed number of steps in a
  ``lax.scan``: reverse-mode differentiable, for learning);
- `fisher_errors`, `residual_peaks`;
- `fit_blends(images, detections, psf_k, spec, sky, ...)`: validation, init, fit, added
  galaxies, errors, results;
- `ForwardModelMeasure`: a BTK measure function (``f(batch, idx, **kwargs)``) that fits the
  whole batch once (SEP detections, on a window around them: `crop_size`, `crop_origins`) and
  serves each blend from a cache.

Gradients for learning. `fit_unrolled` is differentiable in the images, the PSF, the sky and the
`Prior`, so a hyper-parameter can be trained by differentiating a metric of the fitted result.
For example, the mean of a log-normal prior on the half-light radius::

    import jax, jax.numpy as jnp, optax
    from btkjax import deblend

    def metric(log_hlr_mean):  # squared error of the fitted log-radii after 60 Adam steps
        prior = deblend.Prior(log_hlr_mean=log_hlr_mean, log_hlr_width=0.3)
        gal, _ = deblend.fit_unrolled(images, init, anchor, mask, psf_k, spec, sky,
                                      n_steps=60, prior=prior)
        return jnp.mean((jnp.log(gal.hlr) - jnp.log(true_hlr)) ** 2, where=mask)

    opt = optax.adam(0.1); theta = jnp.log(0.2); state = opt.init(theta)
    for _ in range(10):
        g = jax.grad(metric)(theta)
        updates, state = opt.update(g, state); theta = optax.apply_updates(theta, updates)

(``tests/test_deblend.py::test_learn_hlr_prior_through_unrolled_fit`` runs it.)
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from btkjax.render import RenderSpec, Sources, good_fft_size, make_render_spec, render

__all__ = [
    "Galaxies",
    "Params",
    "Prior",
    "FitResult",
    "STATUS_CONVERGED",
    "STATUS_MAX_STEPS",
    "STATUS_NO_DETECTIONS",
    "STATUS_OUTSIDE_STAMP",
    "STATUS_NONFINITE",
    "STATUS_TOO_MANY",
    "STATUS_BAD_ERRORS",
    "STATUS_ADDED",
    "MODELS",
    "FIT_MAXK_THRESHOLD",
    "init_galaxies",
    "to_unconstrained",
    "to_physical",
    "to_sources",
    "neg_log_likelihood",
    "model_images",
    "fit",
    "fit_unrolled",
    "fit_blends",
    "fisher_errors",
    "residual_peaks",
    "crop_origins",
    "crop_size",
    "default_chunk",
    "pad_detections",
    "fit_spec",
    "ForwardModelMeasure",
    "trace_count",
]

MODELS = ("exponential", "sersic", "devaucouleurs", "gaussian")

# Status bit flags, per blend (0 = converged, nothing to report).
STATUS_CONVERGED = 0
STATUS_MAX_STEPS = 1  # stopped at max_steps before the loss settled
STATUS_NO_DETECTIONS = 2  # nothing to fit
STATUS_OUTSIDE_STAMP = 4  # a detection outside the stamp (or non-finite) was dropped
STATUS_NONFINITE = 8  # non-finite loss or gradient: the blend kept its last finite parameters
STATUS_TOO_MANY = 16  # more detections than slots: the faintest were dropped
STATUS_BAD_ERRORS = 32  # the Hessian at the fit is not positive definite: errors are NaN
STATUS_ADDED = 64  # galaxies missed by the detection were added from the residual

G_MAX = 0.95  # largest fitted |g| (q = 0.026)
N_MIN, N_MAX = 0.5, 6.0  # Sersic index range (inside btkjax.profiles' table, 0.3 .. 6.2)
HLR_FLOOR_ARCSEC = 0.02
# The fit evaluates PSF x pixel out to where it falls below this fraction of its k=0 value
# (the renderer's default, MAXK_THRESHOLD = 1e-7, is for 2e-5-of-peak images): light beyond it
# is < 1e-4 of the flux, below the noise of any blend worth deblending, and the grid is smaller.
FIT_MAXK_THRESHOLD = 1e-4

_TRACES = {"fit": 0, "init": 0, "unrolled": 0, "errors": 0, "residual": 0}


def trace_count(name: str = "fit") -> int:
    """How many times the jitted entry point ``name`` ("fit", "init", "unrolled", "errors") was
    traced."""
    return _TRACES[name]


class Galaxies(NamedTuple):
    """Physical parameters of the fitted galaxies.

    Attributes:
        x: [blend, slot] column of the center in pixels (0-based, as ``x_peak``).
        y: [blend, slot] row of the center in pixels.
        flux: [blend, slot, band] electrons.
        hlr: [blend, slot] half-light radius in arcsec (circularized: area preserving shear).
        g1: [blend, slot] reduced shear, |g| = (1 - q) / (1 + q).
        g2: [blend, slot]
        n: [blend, slot] Sersic index (the model's fixed index for non-Sersic models).
    """

    x: jax.Array
    y: jax.Array
    flux: jax.Array
    hlr: jax.Array
    g1: jax.Array
    g2: jax.Array
    n: jax.Array


class Params(NamedTuple):
    """Unconstrained parameters (what the optimizer sees); see the module docstring."""

    shift: jax.Array  # [..., slot, 2]
    log_flux: jax.Array  # [..., slot, band]
    log_hlr: jax.Array  # [..., slot]
    eta: jax.Array  # [..., slot, 2]
    n_logit: jax.Array  # [..., slot]


class Prior(NamedTuple):
    """Optional Gaussian prior on log(hlr / arcsec); width inf (the default) means none.

    Traced leaves: differentiable (see the module docstring's learning example).
    """

    log_hlr_mean: jax.Array | float = 0.0
    log_hlr_width: jax.Array | float = math.inf


class FitResult(NamedTuple):
    """What `fit_blends` returns (JAX arrays).

    Attributes:
        galaxies: fitted `Galaxies`.
        init: the initial `Galaxies` (of the second fit where galaxies were added).
        mask: [blend, slot] bool, slots that were fitted.
        status: [blend] int, `STATUS_*` bit flags (0: converged).
        n_steps: [blend] int, optimizer steps taken by each blend (both fits where galaxies
            were added).
        loss: [blend] final negative log-likelihood (+ prior).
        chi2: [blend] final sum((d - m)^2 / (sky + model)).
        n_pixels: number of pixels x bands per blend (chi2 / n_pixels ~ 1 for a good fit).
        errors: `Galaxies` of 1-sigma Fisher errors (`fisher_errors`; NaN where not fitted),
            or None when not computed.
        added: [blend, slot] bool, galaxies added from the residual (``add_sources``).
    """

    galaxies: Galaxies
    init: Galaxies
    mask: jax.Array
    status: jax.Array
    n_steps: jax.Array
    loss: jax.Array
    chi2: jax.Array
    n_pixels: int
    errors: Galaxies | None = None
    added: jax.Array | None = None


# -- parameter transforms --------------------------------------------------------------------


def _fixed_index(model: str) -> float:
    return {"exponential": 1.0, "devaucouleurs": 4.0, "gaussian": 0.5, "sersic": 1.0}[model]


def _g_from_eta(eta):
    r2 = jnp.sum(eta * eta, axis=-1, keepdims=True)
    return G_MAX * 2 * eta / (1 + jnp.sqrt(1 + 4 * r2))


def _eta_from_g(g):
    # inverse of g = G 2 eta / (1 + sqrt(1 + 4 |eta|^2)): |eta| = t / (1 - t^2), t = |g| / G
    t = g / G_MAX
    t2 = jnp.sum(t * t, axis=-1, keepdims=True)
    return t / (1 - t2)


def to_physical(params: Params, anchor_x, anchor_y, model: str = "exponential",
                max_offset: float = 4.0) -> Galaxies:
    """Unconstrained `Params` -> `Galaxies`, around the anchors (initial positions, pixels)."""
    off = max_offset * jnp.tanh(params.shift / max_offset)
    g = _g_from_eta(params.eta)
    if model == "sersic":
        n = N_MIN + (N_MAX - N_MIN) * jax.nn.sigmoid(params.n_logit)
    else:
        n = jnp.full_like(params.log_hlr, _fixed_index(model))
    return Galaxies(
        x=anchor_x + off[..., 0], y=anchor_y + off[..., 1], flux=jnp.exp(params.log_flux),
        hlr=jnp.exp(params.log_hlr), g1=g[..., 0], g2=g[..., 1], n=n,
    )


def to_unconstrained(gal: Galaxies, anchor_x, anchor_y, model: str = "exponential",
                     max_offset: float = 4.0) -> Params:
    """`Galaxies` -> unconstrained `Params` (inverse of `to_physical`; values are clipped into
    the open domains: offsets to 0.999 R, |g| to 0.999 G_MAX, n inside its range)."""
    dtype = gal.hlr.dtype
    lim = 0.999 * max_offset
    off = jnp.stack([jnp.clip(gal.x - anchor_x, -lim, lim),
                     jnp.clip(gal.y - anchor_y, -lim, lim)], axis=-1)
    g = jnp.stack([gal.g1, gal.g2], axis=-1)
    gnorm = jnp.sqrt(jnp.sum(g * g, axis=-1, keepdims=True))
    g = g * jnp.minimum(1.0, 0.999 * G_MAX / jnp.maximum(gnorm, 1e-30))
    frac = jnp.clip((gal.n - N_MIN) / (N_MAX - N_MIN), 1e-3, 1 - 1e-3)
    n_logit = jnp.log(frac) - jnp.log1p(-frac) if model == "sersic" else jnp.zeros_like(gal.hlr)
    return Params(
        shift=max_offset * jnp.arctanh(off / max_offset),
        log_flux=jnp.log(gal.flux),
        log_hlr=jnp.log(gal.hlr),
        eta=_eta_from_g(g),
        n_logit=n_logit.astype(dtype),
    )


def to_sources(gal: Galaxies, mask, spec: RenderSpec) -> Sources:
    """`Galaxies` -> renderer `Sources` (one component of kind ``spec.kinds[0]``)."""
    s = spec.stamp_pixels
    c = (s - 1) / 2
    ones = jnp.ones_like(gal.hlr)
    return Sources(
        flux=gal.flux[..., None], hlr=gal.hlr[..., None], q=ones[..., None],
        beta=jnp.zeros_like(gal.hlr)[..., None], n=gal.n[..., None],
        dx=(gal.x - c) * spec.pixel_scale, dy=(gal.y - c) * spec.pixel_scale,
        rotation=jnp.zeros_like(gal.hlr), g1=gal.g1, g2=gal.g2, mask=mask,
    )


def _check_spec(spec: RenderSpec):
    if len(spec.kinds) != 1 or spec.kinds[0] not in MODELS:
        raise ValueError(
            f"The fit's RenderSpec must have one component kind among {MODELS}, got "
            f"{spec.kinds}; build it with btkjax.deblend.fit_spec or make_render_spec(..., "
            "kinds=('exponential',))."
        )


def fit_spec(stamp_pixels: int, pixel_scale: float, psfs, model: str = "exponential",
             pad_pixels: int = 8, maxk_threshold: float = FIT_MAXK_THRESHOLD) -> RenderSpec:
    """A small `RenderSpec` for fitting: an FFT box of the stamp plus ``pad_pixels`` (light
    farther than the pad beyond the stamp's edge wraps around) and a loose maxk threshold."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    return make_render_spec(stamp_pixels, pixel_scale, psfs, kinds=(model,),
                            fft_size=good_fft_size(stamp_pixels + pad_pixels),
                            maxk_threshold=maxk_threshold)


# -- likelihood --------------------------------------------------------------------------------


def _render_one(gal1: Galaxies, mask1, psf_k, spec: RenderSpec):
    """Model of one blend [band, S, S] (gal1 fields without the blend axis)."""
    src = to_sources(jax.tree.map(lambda a: a[None], gal1), mask1[None], spec)
    psf = psf_k if psf_k.ndim == 3 else psf_k[None]
    return render(src, psf, spec)[0][0]


def _nll_terms(model, image, sky, weight, noise="poisson"):
    """(negative log-likelihood, Pearson chi2) of one blend; sky [band].

    ``noise="poisson"``: half the Poisson deviance of the counts ``d + sky`` given the rate
    ``m + sky``, ``sum[(m - d) - (d + s) log((m + s) / (d + s))]``: the exact likelihood of
    "all"-mode noise, zero where m = d, and to second order in (d - m) the chi2 with variance
    sky + model. ``noise="chi2"``: half the chi2 with variance sky + max(data, 0) (fixed
    weights; a slight bias toward low fluxes where sources outshine the sky).
    """
    sky = sky[:, None, None]
    rate = jnp.maximum(model + sky, 1e-3 * sky)  # the Poisson rate; stays positive
    chi2 = jnp.sum(weight * (image - model) ** 2 / jnp.maximum(sky + model, sky))
    if noise == "chi2":
        var = sky + jnp.maximum(image, 0.0)
        return 0.5 * jnp.sum(weight * (image - model) ** 2 / var), chi2
    counts = jnp.maximum(image + sky, 0.0)
    safe = jnp.where(counts > 0, counts, 1.0)
    dev = (rate - counts) - counts * (jnp.log(rate) - jnp.log(safe))
    return jnp.sum(weight * dev), chi2


def _prior_term(gal1: Galaxies, mask1, prior: Prior):
    z = (jnp.log(gal1.hlr) - prior.log_hlr_mean) / prior.log_hlr_width
    return 0.5 * jnp.sum(jnp.where(mask1, z * z, 0.0))


def neg_log_likelihood(gal: Galaxies, mask, images, psf_k, spec: RenderSpec, sky,
                       prior: Prior | None = None, weight=None, noise: str = "poisson"):
    """Negative log-likelihood (+ prior) of a batch (see `_nll_terms` for ``noise``).

    Args:
        gal: `Galaxies` [blend, slot, ...].
        mask: [blend, slot] bool.
        images: [blend, band, S, S] background-subtracted electrons.
        psf_k: [band, Ry, Cx] (or [blend, band, Ry, Cx]) PSF x pixel on the spec's grid.
        spec: the static `RenderSpec` (one component kind).
        sky: [band] (or [blend, band]) sky electrons per pixel.
        prior: optional `Prior`.
        weight: optional [blend, band, S, S] pixel weights (0 masks a pixel).

    Returns:
        [blend] negative log-likelihoods (constants dropped).
    """
    prior = Prior() if prior is None else prior
    sky = jnp.broadcast_to(jnp.asarray(sky, images.dtype), images.shape[:2])
    weight = jnp.ones_like(images) if weight is None else weight

    def one(g1, m1, img, s, w, pk):
        model = _render_one(g1, m1, pk, spec)
        return _nll_terms(model, img, s, w, noise)[0] + _prior_term(g1, m1, prior)

    pk_axis = 0 if psf_k.ndim == 4 else None
    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, pk_axis))(gal, mask, images, sky, weight, psf_k)


# -- initialization ----------------------------------------------------------------------------


def _adaptive_moments_one(img, x, y, n_iter=6, sigma0=2.0, max_move=1.0):
    """Adaptive Gaussian moments of ``img`` [S, S] around (x, y): the centroid (moved by at most
    ``max_move`` pixels) and the covariance [2, 2] in pixels^2 (the fixed point M = 2 Q, exact
    for Gaussians)."""
    s = img.shape[-1]
    dtype = img.dtype
    yy, xx = jnp.mgrid[0:s, 0:s].astype(dtype)
    img = jnp.maximum(img, 0.0)

    def body(_, carry):
        cx, cy, m = carry
        dx, dy = xx - cx, yy - cy
        inv = jnp.linalg.inv(m)
        w = jnp.exp(-0.5 * (inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy
                            + inv[1, 1] * dy * dy)) * img
        tot = jnp.maximum(jnp.sum(w), 1e-30)
        mx, my = jnp.sum(w * dx) / tot, jnp.sum(w * dy) / tot
        qxx = jnp.sum(w * dx * dx) / tot
        qyy = jnp.sum(w * dy * dy) / tot
        qxy = jnp.sum(w * dx * dy) / tot
        m_new = 2 * jnp.array([[qxx, qxy], [qxy, qyy]])
        ok = (jnp.linalg.det(m_new) > 0.01) & (jnp.trace(m_new) < 4 * s * s) & jnp.all(
            jnp.isfinite(m_new))
        return (jnp.where(ok, x + jnp.clip(cx + mx - x, -max_move, max_move), cx),
                jnp.where(ok, y + jnp.clip(cy + my - y, -max_move, max_move), cy),
                jnp.where(ok, m_new, m))

    m0 = jnp.eye(2, dtype=dtype) * sigma0**2
    return jax.lax.fori_loop(0, n_iter, body, (jnp.asarray(x, dtype), jnp.asarray(y, dtype), m0))


def _adaptive_moments(image, x0, y0, n_iter=6, sigma0=2.0, max_move=1.0):
    """`_adaptive_moments_one` for each slot: ``image`` [S, S] (shared) or [slot, S, S]."""
    f = partial(_adaptive_moments_one, n_iter=n_iter, sigma0=sigma0, max_move=max_move)
    return jax.vmap(f, in_axes=(0 if image.ndim == 3 else None, 0, 0))(image, x0, y0)


def _symmetric_templates(det, x, y, mask):
    """SDSS-style symmetric templates [slot, S, S] of one blend's detection image ``det``
    [S, S]: ``min(det(p), det(2 c - p))`` around each detection's pixel c, clipped at 0 (light of
    a neighbour on one side of a galaxy is not mirrored on the other, so it drops out)."""
    s = det.shape[-1]
    ix = jnp.clip(jnp.round(x), 0, s - 1).astype(jnp.int32)
    iy = jnp.clip(jnp.round(y), 0, s - 1).astype(jnp.int32)
    idx = jnp.arange(s)
    rx = 2 * ix[:, None] - idx[None, :]  # [slot, S]
    ry = 2 * iy[:, None] - idx[None, :]
    okx = (rx >= 0) & (rx < s)
    oky = (ry >= 0) & (ry < s)
    refl = det[jnp.clip(ry, 0, s - 1)[:, :, None], jnp.clip(rx, 0, s - 1)[:, None, :]]
    keep = oky[:, :, None] & okx[:, None, :] & mask[:, None, None]
    return jnp.where(keep, jnp.maximum(jnp.minimum(det[None], refl), 0.0), 0.0)


def _split(det, weights):
    """det [S, S] shared among slots in proportion to weights [slot, S, S] (scarlet's split)."""
    tot = jnp.sum(weights, axis=0, keepdims=True)
    return jnp.where(tot > 0, det[None] * weights / jnp.where(tot > 0, tot, 1.0), 0.0)


def _psf_images(psf_k, spec: RenderSpec, n_band, dtype, on_pixel: bool = False):
    """PSF images [band, S, S] centred on the stamp's centre, or with ``on_pixel`` on pixel
    (S // 2, S // 2)."""
    point = dataclasses.replace(spec, kinds=("point",))
    z = jnp.zeros((1, 1), dtype)
    d = z + (0.5 * spec.pixel_scale if on_pixel and spec.stamp_pixels % 2 == 0 else 0.0)
    src = Sources(flux=jnp.ones((1, 1, n_band, 1), dtype), hlr=jnp.ones((1, 1, 1), dtype),
                  q=jnp.ones((1, 1, 1), dtype), beta=jnp.zeros((1, 1, 1), dtype),
                  n=jnp.ones((1, 1, 1), dtype), dx=d, dy=d, rotation=z, g1=z, g2=z,
                  mask=jnp.ones((1, 1), bool))
    return render(src, psf_k, point)[0][0]


def _shape_from_moments(m_gal, spec: RenderSpec):
    """Intrinsic covariance [..., 2, 2] (pixels^2) -> (hlr arcsec, g1, g2), bounded."""
    model = spec.kinds[0]
    floor = (HLR_FLOOR_ARCSEC / spec.pixel_scale) ** 2 + 0.09  # (0.3 pixel)^2 at least
    mxx, myy, mxy = m_gal[..., 0, 0], m_gal[..., 1, 1], m_gal[..., 0, 1]
    tr = jnp.maximum(mxx + myy, 2 * floor)
    e1 = (mxx - myy) / tr
    e2 = 2 * mxy / tr
    e = jnp.sqrt(e1**2 + e2**2)
    e_scale = jnp.minimum(1.0, 0.9 / jnp.maximum(e, 1e-12))
    e1, e2, e = e1 * e_scale, e2 * e_scale, jnp.minimum(e, 0.9)
    sigma_pix = jnp.sqrt(0.5 * tr * jnp.sqrt(1 - e * e))  # circularized per-axis sigma
    g_scale = 1 / (1 + jnp.sqrt(1 - e * e))  # distortion -> reduced shear
    g1 = jnp.clip(e1 * g_scale, -0.6, 0.6)
    g2 = jnp.clip(e2 * g_scale, -0.6, 0.6)
    # half-light radius / sigma: Gaussian 1.177, exponential ~0.97 (<r^2> = 6 r_d^2).
    ratio = {"gaussian": 1.177, "exponential": 0.97}.get(model, 0.9)
    hlr = jnp.clip(ratio * sigma_pix * spec.pixel_scale, HLR_FLOOR_ARCSEC * 2, 5.0)
    return hlr, g1, g2


def _linear_fluxes(unit: Galaxies, mask, images, psf_k, spec: RenderSpec, sky):
    """Per-band least-squares fluxes of the unit-flux templates (weights 1 / sky), floored at
    one pixel's sky noise; also returns the templates [blend, slot, band, S, S]."""
    dtype = images.dtype
    _, iso = render(to_sources(unit, mask, spec), psf_k, spec, isolated=True)
    t = iso / jnp.sqrt(sky)[None, None, :, None, None]
    d = images / jnp.sqrt(sky)[None, :, None, None]
    ata = jnp.einsum("biByx,bjByx->bBij", t, t)  # [blend, band, slot, slot]
    atd = jnp.einsum("biByx,bByx->bBi", t, d)  # [blend, band, slot]
    k = mask.shape[1]
    scale = jnp.maximum(jnp.trace(ata, axis1=-2, axis2=-1)[..., None, None] / k, 1e-30)
    reg = 1e-6 * scale * jnp.eye(k, dtype=dtype) + jnp.where(
        mask[:, None, :, None] & mask[:, None, None, :], 0.0, jnp.eye(k, dtype=dtype) * scale)
    f = jnp.linalg.solve(ata + reg, atd[..., None])[..., 0]  # [blend, band, slot]
    f = jnp.transpose(f, (0, 2, 1))
    f_floor = jnp.sqrt(sky)[None, None, :]  # one pixel's noise: positive, far below a detection
    return jnp.where(jnp.isfinite(f), jnp.maximum(f, f_floor), f_floor), iso


@partial(jax.jit, static_argnames=("spec", "n_refine"))
def init_galaxies(images, x, y, mask, psf_k, spec: RenderSpec, sky, n_refine: int = 2) -> Galaxies:
    """Initial `Galaxies` from detections: moments of the deblended data, linear fluxes.

    Each detection's share of the inverse-sky-weighted band sum is its symmetric template's
    fraction of the sum of the templates (`_symmetric_templates`); adaptive Gaussian moments of
    that share, minus the PSF's, give its centroid, size and ellipticity; the fluxes per band
    solve the linear least-squares problem of the data given the unit-flux models. Then
    ``n_refine`` times: the data are split in proportion to these models instead, and the
    moments and fluxes measured again.

    Args:
        images: [blend, band, S, S].
        x, y: [blend, slot] detection positions in pixels (0-based).
        mask: [blend, slot] bool.
        psf_k: [band, Ry, Cx] PSF x pixel on the spec's grid (one PSF for the batch).
        spec: the fit's `RenderSpec`.
        sky: [band] sky electrons per pixel.
        n_refine: model-split refinements.

    Returns:
        `Galaxies` with finite values in every slot (empty slots hold harmless defaults).
    """
    _TRACES["init"] += 1
    dtype = images.dtype
    model = spec.kinds[0]
    n_band = images.shape[1]
    sky = jnp.asarray(sky, dtype)
    images = jnp.where(jnp.isfinite(images), images, 0.0)
    x = jnp.where(mask & jnp.isfinite(x), x, (spec.stamp_pixels - 1) / 2).astype(dtype)
    y = jnp.where(mask & jnp.isfinite(y), y, (spec.stamp_pixels - 1) / 2).astype(dtype)
    inv_sky = 1 / sky
    det = jnp.einsum("bByx,B->byx", images, inv_sky)  # [blend, S, S] inverse-sky weighted
    psf_img = _psf_images(psf_k, spec, n_band, dtype)
    psf_det = jnp.einsum("Byx,B->yx", psf_img, inv_sky)
    c = jnp.full((1,), (spec.stamp_pixels - 1) / 2, dtype)
    m_psf = _adaptive_moments(psf_det, c, c)[2][0]
    weights = jax.vmap(_symmetric_templates)(det, x, y, mask)  # [blend, slot, S, S]
    n = jnp.full(mask.shape, _fixed_index(model), dtype)
    moments = jax.vmap(_adaptive_moments)
    cx, cy, m_obs = moments(jax.vmap(_split)(det, weights), x, y)
    m_gal = m_obs - m_psf  # exact for Gaussians; the refinements correct the rest

    def unit_and_fluxes(m_gal, cx, cy):
        hlr, g1, g2 = _shape_from_moments(m_gal, spec)
        unit = Galaxies(x=jnp.where(mask, cx, x), y=jnp.where(mask, cy, y),
                        flux=jnp.ones(mask.shape + (n_band,), dtype), hlr=hlr, g1=g1, g2=g2, n=n)
        flux, iso = _linear_fluxes(unit, mask, images, psf_k, spec, sky)
        return unit._replace(flux=flux), iso

    def refine(_, carry):
        # Fluxes of the current shapes; then the data split in proportion to these models, and
        # each model's moments (measured the same way) moved onto those of its share.
        m_gal, cx, cy, _ = carry
        gal, iso = unit_and_fluxes(m_gal, cx, cy)
        mdet = jnp.einsum("bkByx,bkB,B->bkyx", iso, gal.flux, inv_sky)
        mdet = jnp.where(mask[..., None, None], jnp.maximum(mdet, 0.0), 0.0)
        cx_d, cy_d, m_obs = moments(jax.vmap(_split)(det, mdet), x, y)
        cx_m, cy_m, m_mod = moments(mdet, x, y)
        return m_gal + (m_obs - m_mod), cx + (cx_d - cx_m), cy + (cy_d - cy_m), gal

    # n_refine + 1 passes, the last one's refinement unused: one copy of the code to compile
    gal0 = Galaxies(x=x, y=y, flux=jnp.ones(mask.shape + (n_band,), dtype), hlr=x, g1=x, g2=x,
                    n=n)
    return jax.lax.fori_loop(0, n_refine + 1, refine, (m_gal, cx, cy, gal0))[3]


# -- the fit -----------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _default_optimizer(name: str, learning_rate: float, max_steps: int, final_ratio: float):
    """Cached so that the same settings give the same (hashable) optimizer: no recompilation."""
    if name == "adam":
        schedule = optax.exponential_decay(learning_rate, transition_steps=max_steps,
                                           decay_rate=final_ratio)
        return optax.adam(schedule)
    if name == "lbfgs":
        # A backtracking line search: about one evaluation per step once the fit is close,
        # where the zoom line search (optax's default) costs several (measured 2x slower here).
        return optax.lbfgs(linesearch=optax.scale_by_backtracking_linesearch(
            max_backtracking_steps=12, store_grad=True))
    raise ValueError(f"optimizer must be 'adam', 'lbfgs' or an optax transformation, got {name!r}")


def _optimizer(optimizer, learning_rate, max_steps, final_ratio):
    if isinstance(optimizer, str):
        return _default_optimizer(optimizer, float(learning_rate), int(max_steps),
                                  float(final_ratio))
    return optimizer


def _extra_args(opt) -> bool:
    """Whether ``opt.update`` takes ``value``, ``grad``, ``value_fn`` (L-BFGS's line search)."""
    return isinstance(opt, optax.GradientTransformationExtraArgs)


class _FitState(NamedTuple):
    params: Params
    opt_state: object
    value: jax.Array  # loss at params
    grad: Params  # its gradient
    count: jax.Array  # consecutive small changes
    done: jax.Array
    status: jax.Array
    n_steps: jax.Array  # steps taken


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _make_blend_loss(spec, model, max_offset, prior, noise):
    def loss(params, ax, ay, mask, image, sky, weight, psf_k):
        gal = to_physical(params, ax, ay, model, max_offset)
        m = _render_one(gal, mask, psf_k, spec)
        return _nll_terms(m, image, sky, weight, noise)[0] + _prior_term(gal, mask, prior)
    return loss


def _fit_one(params, ax, ay, mask, image, sky, weight, psf_k, prior, rtol, atol, *, spec,
             model, optimizer, max_steps, patience, max_offset, noise):
    """One blend's fit: its own while loop and line searches (nothing waits for other blends).

    L-BFGS's backtracking line search stores the loss and gradient at the accepted point, so a
    step costs one loss-and-gradient per line-search trial and nothing more.
    """
    f = partial(_make_blend_loss(spec, model, max_offset, prior, noise), ax=ax, ay=ay,
                mask=mask, image=image, sky=sky, weight=weight, psf_k=psf_k)
    value_and_grad = jax.value_and_grad(f)
    lbfgs = _extra_args(optimizer)
    value, grad = value_and_grad(params)
    finite = jnp.isfinite(value) & _all_finite(grad)
    # a blend without galaxies (no detection, padding) has nothing to fit
    state = _FitState(params=params, opt_state=optimizer.init(params), value=value, grad=grad,
                      count=jnp.asarray(0, jnp.int32), done=~finite | ~jnp.any(mask),
                      status=jnp.where(finite, 0, STATUS_NONFINITE).astype(jnp.int32),
                      n_steps=jnp.asarray(0, jnp.int32))

    def cond(st):
        return (st.n_steps < max_steps) & ~st.done

    def body(st):
        if lbfgs:
            updates, opt_state = optimizer.update(st.grad, st.opt_state, st.params,
                                                  value=st.value, grad=st.grad, value_fn=f)
            new_p = optax.apply_updates(st.params, updates)
            new_value = optax.tree.get(opt_state, "value")
            new_grad = optax.tree.get(opt_state, "grad")
        else:
            updates, opt_state = optimizer.update(st.grad, st.opt_state, st.params)
            new_p = optax.apply_updates(st.params, updates)
            new_value, new_grad = value_and_grad(new_p)
        finite = jnp.isfinite(new_value) & _all_finite(new_grad) & _all_finite(new_p)
        small = jnp.abs(st.value - new_value) <= rtol * jnp.abs(new_value) + atol
        count = jnp.where(small, st.count + 1, 0)
        # A non-finite step is not taken: the blend keeps its last finite parameters.
        return _FitState(
            params=_tree_where(finite, new_p, st.params),
            opt_state=_tree_where(finite, opt_state, st.opt_state),
            value=jnp.where(finite, new_value, st.value),
            grad=_tree_where(finite, new_grad, st.grad),
            count=count, done=~finite | (count >= patience),
            status=jnp.where(finite, st.status, st.status | STATUS_NONFINITE),
            n_steps=st.n_steps + finite.astype(jnp.int32),
        )

    st = jax.lax.while_loop(cond, body, state)
    status = jnp.where(st.done, st.status, st.status | STATUS_MAX_STEPS)
    gal = to_physical(st.params, ax, ay, model, max_offset)
    nll, chi2 = _nll_terms(_render_one(gal, mask, psf_k, spec), image, sky, weight, noise)
    return st.params, status, st.n_steps, nll + _prior_term(gal, mask, prior), chi2


@partial(jax.jit, static_argnames=("spec", "model", "optimizer", "max_steps", "patience",
                                   "max_offset", "noise"))
def _fit_jit(params, ax, ay, mask, images, sky, weight, psf_k, prior, rtol, atol, *, spec,
             model, optimizer, max_steps, patience, max_offset, noise):
    """`_fit_one` over a chunk of blends: called directly for a chunk of one, vmapped else."""
    _TRACES["fit"] += 1
    one = partial(_fit_one, prior=prior, rtol=rtol, atol=atol, spec=spec, model=model,
                  optimizer=optimizer, max_steps=max_steps, patience=patience,
                  max_offset=max_offset, noise=noise)
    return _map_blends(one, 7, params, ax, ay, mask, images, sky, weight, psf_k)


def _map_blends(one, n_batched, *args):
    """``one`` over the blend axis of the first ``n_batched`` args and of a per-blend PSF (the
    last arg, [blend, band, Ry, Cx]; shared when [band, Ry, Cx]): called directly for a chunk of
    one blend (its while loops and conds stay scalar: a finished blend stops, an absent slot is
    skipped), vmapped else."""
    psf_k = args[-1]
    pk_axis = 0 if psf_k.ndim == 4 else None
    if args[n_batched - 1].shape[0] == 1:
        first = [jax.tree.map(lambda a: a[0], a) for a in args[:n_batched]]
        out = one(*first, *args[n_batched:-1], psf_k[0] if pk_axis == 0 else psf_k)
        return jax.tree.map(lambda a: a[None], out)
    in_axes = (0,) * n_batched + (None,) * (len(args) - n_batched - 1) + (pk_axis,)
    return jax.vmap(one, in_axes=in_axes)(*args)


def default_chunk() -> int:
    """Blends per compiled call of the fit: 1 on CPU (each blend runs its own loop and line
    searches; a vmapped batch would step every blend until the slowest converged and run every
    line search as long as the longest), 64 on accelerators (parallelism wins there)."""
    return 1 if jax.default_backend() == "cpu" else 64


def _check_chunk(chunk) -> int:
    chunk = default_chunk() if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of blends, got {chunk!r}.")
    return int(chunk)


def _chunked(fn, n, chunk, batched, shared=()):
    """Calls ``fn(*chunk_of_batched, *shared)`` on consecutive chunks of the leading axis of
    the pytrees ``batched`` (the last chunk padded by repeating the last blend; ``fn`` must
    return pytrees with a leading blend axis), and concatenates the results to ``n`` blends.

    One compiled shape whatever ``n``. The chunks are cut on the host (numpy): slicing a JAX
    array at a Python offset would compile a small program for every offset.
    """
    chunk = max(1, min(int(chunk), n))
    n_pad = -(-n // chunk) * chunk

    def pad(a):
        a = np.asarray(a)
        if a.shape[0] == n_pad:
            return a
        return np.concatenate([a, np.repeat(a[-1:], n_pad - n, axis=0)], axis=0)

    batched = jax.tree.map(pad, batched)
    outs = [fn(*jax.tree.map(lambda a, i=i: a[i:i + chunk], batched), *shared)
            for i in range(0, n_pad, chunk)]
    return jax.tree.map(lambda *a: jnp.asarray(np.concatenate([np.asarray(x) for x in a])[:n]),
                        *outs)


def fit(params: Params, anchor_x, anchor_y, mask, images, psf_k, spec: RenderSpec, sky, *,
        model: str | None = None, optimizer="lbfgs", learning_rate: float = 0.05,
        final_ratio: float = 1e-2, max_steps: int = 200, rtol: float | None = None,
        atol: float = 0.0, patience: int = 5, max_offset: float = 4.0,
        prior: Prior | None = None, weight=None, noise: str = "poisson",
        chunk: int | None = None):
    """Fits unconstrained `Params` of a batch: jitted while-loops, ``chunk`` blends per call.

    Args:
        params: initial `Params` [blend, slot, ...] (`to_unconstrained` of `init_galaxies`).
        anchor_x, anchor_y: [blend, slot] anchor positions (pixels) of `to_physical`.
        mask: [blend, slot] bool.
        images: [blend, band, S, S].
        psf_k: [band, Ry, Cx] or [blend, band, Ry, Cx].
        spec: the fit's static `RenderSpec` (one kind).
        sky: [band] or [blend, band] electrons per pixel.
        model: component kind (default ``spec.kinds[0]``).
        optimizer: "lbfgs" (default: optax.lbfgs with a backtracking line search; converges
            in ~30-80 steps to the optimum), "adam" (Adam with an exponential decay from
            ``learning_rate`` to ``learning_rate * final_ratio`` over ``max_steps``: cheaper
            steps, slower and noisier convergence), or any optax transformation (keep the same
            object between calls, or each new one recompiles).
        max_steps: most steps per blend.
        rtol, atol: a blend stops when ``|loss_prev - loss| <= rtol |loss| + atol`` holds
            ``patience`` steps in a row. ``rtol`` default: 1e-7 in float64, 1e-5 in float32.
        max_offset: largest shift (pixels) from the anchors.
        prior: optional `Prior`.
        weight: optional [blend, band, S, S] pixel weights.
        noise: "poisson" (default: the Poisson deviance, variance = sky + model) or "chi2"
            (variance = sky + data); see `_nll_terms`.
        chunk: blends per compiled call (`default_chunk`: 1 on CPU); the batch is cut into
            chunks (the last one padded), so any number of blends runs on one compiled program.

    Returns:
        (params, status [blend], n_steps [blend], loss [blend], chi2 [blend]).
    """
    _check_spec(spec)
    if noise not in ("poisson", "chi2"):
        raise ValueError(f"noise must be 'poisson' or 'chi2', got {noise!r}.")
    model = spec.kinds[0] if model is None else model
    images = jnp.asarray(images)
    dtype = images.dtype
    if rtol is None:
        rtol = 1e-7 if dtype == jnp.float64 else 1e-5
    opt = _optimizer(optimizer, learning_rate, max_steps, final_ratio)
    # Non-finite pixels are NOT masked here: a blend with them diverges and says so (status).
    sky, weight, prior, psf_k, chunk, mask, per_blend, shared = _batch_inputs(
        images, sky, weight, prior, psf_k, chunk, mask)
    n = images.shape[0]
    batched = (params, jnp.asarray(anchor_x, dtype), jnp.asarray(anchor_y, dtype), mask, images,
               sky, weight) + per_blend

    def run(p, ax, ay, m, img, s, w, pk):
        return _fit_jit(p, ax, ay, m, img, s, w, pk, prior, jnp.asarray(rtol, dtype),
                        jnp.asarray(atol, dtype), spec=spec, model=model, optimizer=opt,
                        max_steps=int(max_steps), patience=int(patience),
                        max_offset=float(max_offset), noise=noise)

    return _chunked(run, n, chunk, batched, shared)


_to_unconstrained_jit = jax.jit(to_unconstrained, static_argnames=("model", "max_offset"))
_to_physical_jit = jax.jit(to_physical, static_argnames=("model", "max_offset"))


def _convert(fn, tree, ax, ay, chunk, model, max_offset):
    """`to_unconstrained` / `to_physical` chunk by chunk: compiled once per chunk shape (eager
    on the whole batch, each of their operations would compile for every batch size)."""
    return _chunked(partial(fn, model=model, max_offset=max_offset), ax.shape[0], chunk,
                    (tree, ax, ay))


def _batch_inputs(images, sky, weight, prior, psf_k, chunk, mask):
    """The per-batch inputs of `fit` and `fisher_errors` in the images' dtype: (sky [blend,
    band], weight, prior, psf_k, chunk, padded mask, per-blend PSF args, shared PSF args)."""
    dtype = images.dtype
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    weight = jnp.ones_like(images) if weight is None else jnp.asarray(weight, dtype)
    prior = Prior() if prior is None else prior
    prior = Prior(jnp.asarray(prior.log_hlr_mean, dtype), jnp.asarray(prior.log_hlr_width, dtype))
    psf_k = jnp.asarray(psf_k)
    chunk = _check_chunk(chunk)
    mask = _pad_mask(jnp.asarray(mask, bool), chunk)
    per_blend = (psf_k,) if psf_k.ndim == 4 else ()
    shared = () if psf_k.ndim == 4 else (psf_k,)
    return sky, weight, prior, psf_k, chunk, mask, per_blend, shared


def _pad_mask(mask, chunk):
    """mask [blend, slot] padded with empty blends to a multiple of ``chunk`` (padding blends
    cost nothing: `_chunked` leaves arrays that are already padded alone)."""
    n = mask.shape[0]
    n_pad = -(-n // min(chunk, n)) * min(chunk, n)
    return jnp.concatenate([mask, jnp.zeros((n_pad - n,) + mask.shape[1:], bool)]) \
        if n_pad > n else mask


@partial(jax.jit, static_argnames=("spec", "model", "optimizer", "n_steps", "max_offset",
                                   "noise"))
def _unrolled_jit(params, ax, ay, mask, images, sky, psf_k, prior, *, spec, model, optimizer,
                  n_steps, max_offset, noise):
    _TRACES["unrolled"] += 1
    blend_loss = _make_blend_loss(spec, model, max_offset, prior, noise)
    weight = jnp.ones_like(images)
    pk_axis = 0 if psf_k.ndim == 4 else None

    def total(p):
        return jnp.sum(jax.vmap(blend_loss, in_axes=(0,) * 7 + (pk_axis,))(
            p, ax, ay, mask, images, sky, weight, psf_k))

    def body(carry, _):
        p, st = carry
        value, grad = jax.value_and_grad(total)(p)
        updates, st = optimizer.update(grad, st, p)
        return (optax.apply_updates(p, updates), st), value

    (p, _), losses = jax.lax.scan(body, (params, optimizer.init(params)), None, length=n_steps)
    return to_physical(p, ax, ay, model, max_offset), losses


def fit_unrolled(init: Galaxies, anchor_x, anchor_y, mask, images, psf_k, spec: RenderSpec,
                 sky, *, n_steps: int = 50, optimizer="adam", learning_rate: float = 0.05,
                 final_ratio: float = 0.1, max_offset: float = 4.0,
                 prior: Prior | None = None, noise: str = "poisson"):
    """A fixed number of optimizer steps in a ``lax.scan``: reverse-mode differentiable.

    Differentiable in ``init``, ``images``, ``psf_k``, ``sky`` and ``prior`` (the optimizer must
    have no while loop: Adam yes, L-BFGS's line search no). Adam is elementwise, so the summed
    loss of the batch fits each blend independently.

    Returns:
        (fitted `Galaxies`, losses [n_steps] of the summed batch loss at each step).
    """
    _check_spec(spec)
    model = spec.kinds[0]
    dtype = images.dtype
    opt = _optimizer(optimizer, learning_rate, n_steps, final_ratio)
    if isinstance(optimizer, str) and optimizer == "lbfgs":
        raise ValueError("fit_unrolled cannot differentiate L-BFGS's line search; use 'adam'.")
    prior = Prior() if prior is None else prior
    params = to_unconstrained(init, anchor_x, anchor_y, model, max_offset)
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    return _unrolled_jit(params, anchor_x, anchor_y, mask, images, sky, psf_k,
                         Prior(jnp.asarray(prior.log_hlr_mean, dtype),
                               jnp.asarray(prior.log_hlr_width, dtype)),
                         spec=spec, model=model, optimizer=opt, n_steps=int(n_steps),
                         max_offset=float(max_offset), noise=noise)


# -- Fisher (Cramer-Rao) errors --------------------------------------------------------------


def _pack(gal1: Galaxies):
    """One blend's `Galaxies` -> [slot, 6 + band]: x, y, flux per band, hlr, g1, g2, n."""
    return jnp.concatenate([gal1.x[:, None], gal1.y[:, None], gal1.flux, gal1.hlr[:, None],
                            gal1.g1[:, None], gal1.g2[:, None], gal1.n[:, None]], axis=1)


def _unpack(v, n_band) -> Galaxies:
    return Galaxies(x=v[:, 0], y=v[:, 1], flux=v[:, 2:2 + n_band], hlr=v[:, 2 + n_band],
                    g1=v[:, 3 + n_band], g2=v[:, 4 + n_band], n=v[:, 5 + n_band])


def _errors_one(gal1: Galaxies, mask1, image, sky, weight, psf_k, prior, *, spec, noise,
                information):
    """1-sigma errors of one blend's parameters from the inverse Hessian of its negative
    log-likelihood (+ prior) at ``gal1``; (errors as `Galaxies`, ok)."""
    n_slot, n_band = gal1.flux.shape
    dtype = gal1.hlr.dtype
    width = 6 + n_band
    n_free = width if spec.kinds[0] == "sersic" else width - 1  # n last: fitted or not
    v0 = _pack(gal1)
    basis = jnp.eye(n_free, width, dtype=dtype)

    def slot_columns(column):
        # The columns of slot k, all at once; skipped (zeros) for an absent slot when the blends
        # are not vmapped.
        def one_slot(k):
            zeros = jax.eval_shape(column, v0)
            zeros = jnp.zeros((n_free,) + zeros.shape, zeros.dtype)

            def compute():
                tangents = jnp.zeros((n_free, n_slot, width), dtype).at[:, k, :].set(basis)
                return jax.vmap(lambda t: jax.jvp(column, (v0,), (t,))[1])(tangents)

            return jax.lax.cond(mask1[k], compute, lambda: zeros)

        return jax.lax.map(one_slot, jnp.arange(n_slot))

    def prior_term(v):
        return _prior_term(_unpack(v, n_band), mask1, prior)

    size = n_slot * n_free
    if information == "expected":
        # The Hessian of -log L (+ prior) on the fitted model's own noiseless image, i.e. the
        # Fisher matrix at gal1: J^T diag(weight / variance) J + the prior's, with
        # J = d(model) / d(parameters) and the variance of `_nll_terms` at data = model (the
        # Poisson rate sky + model; sky + max(model, 0) for noise="chi2"). Forward mode only:
        # cheaper than forward over reverse, and the same matrix.
        def model(v):
            return _render_one(_unpack(v, n_band), mask1, psf_k, spec)

        m0 = model(v0)
        s3 = sky[:, None, None]
        var = (jnp.maximum(m0 + s3, 1e-3 * s3) if noise == "poisson"
               else s3 + jnp.maximum(m0, 0.0))
        jac = slot_columns(model).reshape((size,) + m0.shape)  # [slot * free, band, S, S]
        hess = jnp.einsum("pbyx,qbyx->pq", jac, jac * (weight / var)[None])
        hess_prior = jax.hessian(prior_term)(v0)[:, :n_free][:, :, :, :n_free]
        hess = hess + hess_prior.reshape(size, size)
    else:
        # The Hessian of -log L (+ prior) on the data: forward over reverse, as jax.hessian.
        def nll(v):
            g = _unpack(v, n_band)
            m = _render_one(g, mask1, psf_k, spec)
            return _nll_terms(m, image, sky, weight, noise)[0] + _prior_term(g, mask1, prior)

        cols = slot_columns(jax.grad(nll))  # [slot, free, slot, width]
        hess = cols[..., :n_free].reshape(size, size)
    hess = 0.5 * (hess + hess.T)
    free = jnp.repeat(mask1, n_free)
    # Absent slots: 1 on the diagonal, 0 elsewhere (invertible, no coupling); then Jacobi
    # scaling, so that electrons and shears invert together, in float32 too.
    hess = jnp.where(free[:, None] & free[None, :], hess, 0.0) + jnp.diag(
        jnp.where(free, 0.0, 1.0).astype(dtype))
    d = jnp.sqrt(jnp.abs(jnp.diag(hess)))
    d = jnp.where(free & (d > 0) & jnp.isfinite(d), d, 1.0)
    chol = jnp.linalg.cholesky(hess / d[:, None] / d[None, :])
    inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(size, dtype=dtype))
    var = jnp.diag(inv) / (d * d)
    good = jnp.isfinite(var) & (var > 0)
    ok = jnp.all(jnp.where(free, good, True))
    err = jnp.where(free & good, jnp.sqrt(jnp.where(good, var, 1.0)), jnp.nan)
    err = jnp.concatenate([err.reshape(n_slot, n_free),
                           jnp.full((n_slot, width - n_free), jnp.nan, dtype)], axis=1)
    return _unpack(err, n_band), ok


@partial(jax.jit, static_argnames=("spec", "noise", "information"))
def _errors_jit(galaxies, mask, images, sky, weight, psf_k, prior, *, spec, noise, information):
    _TRACES["errors"] += 1
    one = partial(_errors_one, prior=prior, spec=spec, noise=noise, information=information)
    return _map_blends(one, 5, galaxies, mask, images, sky, weight, psf_k)


def fisher_errors(galaxies: Galaxies, mask, images, psf_k, spec: RenderSpec, sky, *,
                  prior: Prior | None = None, weight=None, noise: str = "poisson",
                  information: str = "expected", chunk: int | None = None):
    """Cramer-Rao (Fisher) 1-sigma errors of fitted parameters, per galaxy.

    The inverse of the Hessian of the negative log-likelihood (+ prior) of each blend with
    respect to the physical parameters of all its galaxies (x, y in pixels, the flux of each
    band in electrons, hlr in arcsec, g1, g2, and the Sersic index when the model is
    "sersic"), at ``galaxies``; the errors are the square roots of its diagonal, so they
    include the correlations between blended galaxies. Absent slots and fixed parameters get 1
    on the diagonal (no coupling) and NaN errors. The Hessian is computed column by column,
    forward over reverse mode (as ``jax.hessian``), slot by slot.

    ``information="expected"`` (default): the likelihood is that of the fitted model's own
    noiseless image, so the Hessian is the Fisher matrix at the fit (the Cramer-Rao bound of
    the fitted parameters): positive definite by construction, also in float32 and where the
    model does not describe the data well. ``"observed"``: the likelihood of the data (the
    observed information; it can be indefinite away from a well-fitting minimum).

    Args:
        galaxies: fitted `Galaxies` [blend, slot, ...].
        mask, images, psf_k, spec, sky, prior, weight, noise: as `neg_log_likelihood`.
        information: "expected" or "observed".
        chunk: blends per compiled call (`default_chunk`; with one blend per call, absent
            slots cost nothing).

    Returns:
        (errors `Galaxies` with the fields' shapes (NaN where not fitted), ok [blend] bool:
        False where the Hessian is not positive definite or not finite, whose errors are NaN).
    """
    _check_spec(spec)
    if information not in ("expected", "observed"):
        raise ValueError(f"information must be 'expected' or 'observed', got {information!r}.")
    if noise not in ("poisson", "chi2"):
        raise ValueError(f"noise must be 'poisson' or 'chi2', got {noise!r}.")
    images = jnp.asarray(images)
    dtype = images.dtype
    sky, weight, prior, psf_k, chunk, mask, per_blend, shared = _batch_inputs(
        images, sky, weight, prior, psf_k, chunk, mask)
    n = images.shape[0]
    galaxies = jax.tree.map(lambda a: jnp.asarray(a, dtype), galaxies)
    batched = (galaxies, mask, images, sky, weight) + per_blend

    def run(g, m, img, s, w, pk):
        return _errors_jit(g, m, img, s, w, pk, prior, spec=spec, noise=noise,
                           information=information)

    return _chunked(run, n, chunk, batched, shared)


# -- sources missed by the detection ---------------------------------------------------------


def _residual_peaks_one(gal1: Galaxies, mask1, image, sky, psf_k, *, spec, n_add, snr_threshold,
                        min_distance, mismatch):
    """Up to ``n_add`` significant peaks of one blend's residual; (x, y, found) [n_add]."""
    dtype = image.dtype
    s = spec.stamp_pixels
    model = _render_one(gal1, mask1, psf_k, spec)
    w = 1 / sky  # inverse-sky band weights, as the detection image of `init_galaxies`
    resid = jnp.einsum("Byx,B->yx", image - model, w)
    var = jnp.einsum("Byx,B->yx", sky[:, None, None] + jnp.maximum(model, 0.0), w * w)
    var = var + (mismatch * jnp.einsum("Byx,B->yx", model, w)) ** 2
    # matched filter: the band-weighted PSF image, cut to 11 x 11 pixels
    psf = jnp.einsum("Byx,B->yx", _psf_images(psf_k, spec, image.shape[0], dtype, True), w)
    c = s // 2
    h = min(5, c - 1)
    kern = psf[c - h:c + h + 1, c - h:c + h + 1]
    kern = kern / jnp.sum(kern)
    conv = partial(jax.scipy.signal.convolve2d, mode="same")
    snr = conv(resid, kern[::-1, ::-1]) / jnp.sqrt(jnp.maximum(conv(var, (kern * kern)[::-1, ::-1]),
                                                              1e-30))
    yy, xx = jnp.mgrid[0:s, 0:s].astype(dtype)
    near = jnp.any(mask1[:, None, None] & ((xx[None] - gal1.x[:, None, None]) ** 2
                                           + (yy[None] - gal1.y[:, None, None]) ** 2
                                           < min_distance**2), axis=0)
    peak = snr >= jax.lax.reduce_window(snr, -jnp.inf, jax.lax.max, (3, 3), (1, 1), "SAME")
    score = jnp.where(peak & ~near & jnp.isfinite(snr), snr, -jnp.inf)
    xs, ys, found = [], [], []
    for _ in range(n_add):
        i = jnp.argmax(score)
        py, px = (i // s).astype(dtype), (i % s).astype(dtype)
        ok = score.reshape(-1)[i] > snr_threshold
        xs.append(px)
        ys.append(py)
        found.append(ok)
        score = jnp.where((xx - px) ** 2 + (yy - py) ** 2 < min_distance**2, -jnp.inf, score)
    return jnp.stack(xs), jnp.stack(ys), jnp.stack(found)


@partial(jax.jit, static_argnames=("spec", "n_add"))
def _residual_peaks_jit(galaxies, mask, images, sky, psf_k, snr_threshold, min_distance, mismatch,
                        *, spec, n_add):
    _TRACES["residual"] += 1
    one = partial(_residual_peaks_one, spec=spec, n_add=n_add, snr_threshold=snr_threshold,
                  min_distance=min_distance, mismatch=mismatch)
    return _map_blends(one, 4, galaxies, mask, images, sky, psf_k)


def residual_peaks(galaxies: Galaxies, mask, images, psf_k, spec: RenderSpec, sky, *,
                   n_add: int = 1, snr_threshold: float = 5.0, min_distance: float = 2.0,
                   mismatch: float = 0.05, chunk: int | None = None):
    """Sources the detection missed: significant peaks of the residual of a fit.

    The residual ``images - model`` is summed over bands with weights 1 / sky, filtered with
    the band-weighted PSF (the matched filter of a point source) and divided by the filtered
    noise, whose variance is the Poisson variance (sky + model) plus ``(mismatch * model)^2``:
    a galaxy that the single-profile model describes to a few percent (a bulge, a disk) leaves
    residuals that stay below the threshold, a neighbour that the detection missed does not.
    Peaks (3 x 3 local maxima) above ``snr_threshold`` and at least ``min_distance`` pixels from
    the fitted galaxies and from each other are returned, the most significant first.

    Args:
        galaxies, mask: the fit (`Galaxies`, [blend, slot] bool).
        images, psf_k, spec, sky: as `fit_blends` (one PSF for the batch: [band, Ry, Cx]).
        n_add: peaks per blend.
        snr_threshold, min_distance, mismatch: see above.
        chunk: blends per compiled call (`default_chunk`).

    Returns:
        (x, y, found): [blend, n_add] pixel positions and whether each peak is significant.
    """
    _check_spec(spec)
    images = jnp.asarray(images)
    dtype = images.dtype
    n = images.shape[0]
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    chunk = _check_chunk(chunk)
    mask = _pad_mask(jnp.asarray(mask, bool), chunk)
    galaxies = jax.tree.map(lambda a: jnp.asarray(a, dtype), galaxies)
    psf_k = jnp.asarray(psf_k)
    if psf_k.ndim != 3:
        raise ValueError(f"residual_peaks needs one PSF for the batch ([band, Ry, Cx]), got "
                         f"shape {psf_k.shape}.")

    def run(g, m, img, s1):
        return _residual_peaks_jit(g, m, img, s1, psf_k, jnp.asarray(snr_threshold, dtype),
                                   jnp.asarray(min_distance, dtype), jnp.asarray(mismatch, dtype),
                                   spec=spec, n_add=int(n_add))

    return _chunked(run, n, chunk, (galaxies, mask, images, sky))


# -- high level ----------------------------------------------------------------------------------


def pad_detections(detections, max_sources: int | None = None, fluxes=None):
    """Ragged detections -> padded (x, y, mask, dropped_too_many) numpy arrays.

    Args:
        detections: list over blends of [n_i, 2] (x, y) pixel arrays (or tables with
            ``x_peak``, ``y_peak``).
        max_sources: slots per blend (default the largest n_i, at least 1).
        fluxes: optional list over blends of [n_i] brightness used to keep the brightest when
            a blend has more than ``max_sources`` detections (default: the first ones).
    """
    rows = []
    for d in detections:
        if hasattr(d, "colnames"):
            d = np.stack([np.asarray(d["x_peak"], float), np.asarray(d["y_peak"], float)], -1)
        d = np.asarray(d, dtype=float).reshape(-1, 2)
        rows.append(d)
    k = max_sources or max([1] + [len(r) for r in rows])
    n = len(rows)
    x = np.zeros((n, k))
    y = np.zeros((n, k))
    mask = np.zeros((n, k), bool)
    too_many = np.zeros(n, bool)
    for i, r in enumerate(rows):
        order = np.arange(len(r))
        if len(r) > k:
            too_many[i] = True
            if fluxes is not None:
                order = np.argsort(-np.asarray(fluxes[i], float))
            order = np.sort(order[:k])
        r = r[order]
        x[i, : len(r)], y[i, : len(r)] = r[:, 0], r[:, 1]
        mask[i, : len(r)] = True
    return x, y, mask, too_many


def fit_blends(images, detections, psf_k, spec: RenderSpec, sky, *, max_sources=None,
               init: Galaxies | None = None, errors: bool = True, chunk: int | None = None,
               add_sources: int = 0, residual_kwargs: dict | None = None,
               **fit_kwargs) -> FitResult:
    """Detections in, fitted galaxies and their errors out, for a whole batch (the high-level
    entry point).

    Args:
        images: [blend, band, S, S] background-subtracted images (electrons).
        detections: ``(x, y, mask)`` arrays [blend, slot] in pixels, or a list over blends of
            [n_i, 2] (x, y) arrays or tables with ``x_peak``, ``y_peak``.
        psf_k: [band, Ry, Cx] PSF x pixel on ``spec``'s grid (`btkjax.render.psf_kimage_from_galsim`
            or `default_psf_kimage`), or [blend, band, Ry, Cx].
        spec: the fit's `RenderSpec` (`fit_spec`), one component kind: the model.
        sky: [band] sky electrons per pixel.
        max_sources: slots per blend for ragged detections.
        init: initial `Galaxies` (default `init_galaxies`).
        errors: compute the Fisher errors (`fisher_errors`) at the fit.
        chunk: blends per compiled call (`default_chunk`).
        add_sources: after the fit, look for up to this many sources per blend that the
            detection missed (`residual_peaks` of the residual, ``residual_kwargs``), put them
            in free slots, and fit those blends again from `init_galaxies`; the refit is kept
            (status `STATUS_ADDED`, ``FitResult.added``) when -log L drops by more than the
            number of new parameters.
        residual_kwargs: ``snr_threshold``, ``min_distance``, ``mismatch`` of `residual_peaks`.
        **fit_kwargs: passed to `fit` (optimizer, max_steps, rtol, prior, ...).

    Returns:
        `FitResult`.
    """
    _check_spec(spec)
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != spec.stamp_pixels or images.shape[-2] != \
            spec.stamp_pixels:
        raise ValueError(f"images must be [blend, band, {spec.stamp_pixels}, "
                         f"{spec.stamp_pixels}] (the spec's stamp), got {images.shape}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    if jax.config.jax_enable_x64 and images.dtype == jnp.float32 and \
            fit_kwargs.get("optimizer", "lbfgs") == "lbfgs":
        # optax's L-BFGS line search differentiates its value function with a float64
        # cotangent under x64, which fails on float32 parameters: fit in float64 (the sharp bit
        # is optax's).
        images = images.astype(jnp.float64)
    psf_k = jnp.asarray(psf_k)
    if psf_k.dtype != (jnp.complex128 if images.dtype == jnp.float64 else jnp.complex64):
        psf_k = psf_k.astype(jnp.complex128 if images.dtype == jnp.float64 else jnp.complex64)
    n_band = images.shape[1]
    sky_arr = np.asarray(sky, dtype=float)
    if sky_arr.shape[-1] != n_band or np.any(~(sky_arr > 0)):
        raise ValueError(f"sky must hold {n_band} positive levels (one per band), got {sky}.")
    if psf_k.ndim not in (3, 4) or psf_k.shape[-3] != n_band:
        raise ValueError(f"psf_k must be [band, Ry, Cx] or [blend, band, Ry, Cx] with {n_band} "
                         f"bands, got shape {psf_k.shape}.")
    too_many = np.zeros(images.shape[0], bool)
    if isinstance(detections, tuple) and len(detections) == 3:
        x, y, mask = (np.asarray(a) for a in detections)
        mask = mask.astype(bool)
        if not (x.shape == y.shape == mask.shape and x.ndim == 2 and len(x) == len(images)):
            raise ValueError(f"detections (x, y, mask) must be [blend, slot] arrays with "
                             f"{len(images)} blends, got shapes {x.shape}, {y.shape}, "
                             f"{mask.shape}.")
    else:
        if len(detections) != images.shape[0]:
            raise ValueError(f"detections has {len(detections)} blends, images "
                             f"{images.shape[0]}.")
        x, y, mask, too_many = pad_detections(detections, max_sources)
    s = spec.stamp_pixels
    inside = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x <= s - 0.5) & (y >= -0.5) & \
        (y <= s - 0.5)
    outside = (mask & ~inside).any(axis=1)
    mask = mask & inside
    x = np.where(mask, x, (s - 1) / 2)
    y = np.where(mask, y, (s - 1) / 2)
    dtype = images.dtype
    model = spec.kinds[0]
    max_offset = float(fit_kwargs.get("max_offset", 4.0))
    chunk = _check_chunk(chunk)
    ax, ay = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    jmask = jnp.asarray(mask)
    sky_init = jnp.asarray(sky_arr if sky_arr.ndim == 1 else sky_arr[0], dtype)
    if init is None:
        psf_shared = psf_k if psf_k.ndim == 3 else psf_k[0]
        init = _chunked(lambda img, x1, y1, m1: init_galaxies(img, x1, y1, m1, psf_shared, spec,
                                                              sky_init),
                        images.shape[0], chunk, (images, ax, ay, _pad_mask(jmask, chunk)))
    params = _convert(_to_unconstrained_jit, init, ax, ay, chunk, model, max_offset)
    params, status, n_steps, loss, chi2 = fit(params, ax, ay, jmask, images, psf_k, spec,
                                              sky_arr, chunk=chunk, **fit_kwargs)
    galaxies = _convert(_to_physical_jit, params, ax, ay, chunk, model, max_offset)
    added = np.zeros(mask.shape, bool)
    if isinstance(add_sources, bool) or not isinstance(add_sources, int | np.integer) or \
            add_sources < 0:
        raise ValueError(f"add_sources must be a number of galaxies >= 0, got {add_sources!r}.")
    if add_sources:
        if psf_k.ndim != 3:
            raise ValueError("add_sources needs one PSF for the batch ([band, Ry, Cx]).")
        px, py, found = (np.asarray(a) for a in residual_peaks(
            galaxies, jmask, images, psf_k, spec, sky_init, n_add=int(add_sources),
            chunk=chunk, **(residual_kwargs or {})))
        free = (~mask).sum(axis=1)
        found = found & (np.cumsum(found, axis=1) <= free[:, None])
        redo = np.flatnonzero(found.any(axis=1))
        if len(redo):
            x2, y2, m2, a2 = x[redo].copy(), y[redo].copy(), mask[redo].copy(), added[redo].copy()
            for r in range(len(redo)):
                slots = np.flatnonzero(~m2[r])[:found[r].sum()]
                x2[r, slots], y2[r, slots] = px[redo[r]][found[r]], py[redo[r]][found[r]]
                m2[r, slots] = a2[r, slots] = True
            img2 = np.asarray(images)[redo]  # numpy: no gather compiled per len(redo)
            ax2, ay2, jm2 = jnp.asarray(x2, dtype), jnp.asarray(y2, dtype), jnp.asarray(m2)
            init2 = _chunked(lambda img, x1, y1, m1: init_galaxies(img, x1, y1, m1, psf_k, spec,
                                                                   sky_init),
                             len(redo), chunk, (img2, ax2, ay2, _pad_mask(jm2, chunk)))
            sky2 = sky_arr if sky_arr.ndim == 1 else sky_arr[redo]
            out2 = fit(_convert(_to_unconstrained_jit, init2, ax2, ay2, chunk, model, max_offset),
                       ax2, ay2, jm2, img2, psf_k, spec, sky2, chunk=chunk, **fit_kwargs)
            # Keep a refit only if the likelihood gained more than the new parameters
            # (Akaike: -log L drops by more than their number).
            n_par = (found[redo].sum(axis=1)) * (5 + n_band + (model == "sersic"))
            keep = np.asarray(out2[3]) < np.asarray(loss)[redo] - n_par
            keep &= np.isfinite(np.asarray(out2[3]))
            k, kr = redo[keep], np.flatnonzero(keep)
            if len(k):
                # merged on the host: eager scatters would compile for every len(k)
                def merge(a, b):
                    a = np.array(a)
                    a[k] = np.asarray(b)[kr]
                    return jnp.asarray(a)

                gal2 = _convert(_to_physical_jit, out2[0], ax2, ay2, chunk, model, max_offset)
                galaxies = jax.tree.map(merge, galaxies, gal2)
                init = jax.tree.map(merge, init, init2)
                status = merge(status, np.asarray(out2[1]) | STATUS_ADDED)
                n_steps = merge(n_steps, np.asarray(out2[2]) + np.asarray(n_steps)[redo])
                loss, chi2 = merge(loss, out2[3]), merge(chi2, out2[4])
                mask[k], added[k] = m2[kr], a2[kr]
                jmask = jnp.asarray(mask)
    status = np.asarray(status) | (np.where(~mask.any(axis=1), STATUS_NO_DETECTIONS, 0)
                                   | np.where(outside, STATUS_OUTSIDE_STAMP, 0)
                                   | np.where(too_many, STATUS_TOO_MANY, 0)).astype(np.int32)
    errs = None
    if errors:
        errs, ok = fisher_errors(galaxies, jmask, images, psf_k, spec, sky_arr, chunk=chunk,
                                 prior=fit_kwargs.get("prior"), weight=fit_kwargs.get("weight"),
                                 noise=fit_kwargs.get("noise", "poisson"))
        status = status | np.where(np.asarray(ok), 0, STATUS_BAD_ERRORS).astype(np.int32)
    return FitResult(galaxies=galaxies, init=init, mask=jmask, status=jnp.asarray(status),
                     n_steps=n_steps, loss=loss, chi2=chi2,
                     n_pixels=int(np.prod(images.shape[1:])), errors=errs,
                     added=jnp.asarray(added))


def model_images(galaxies: Galaxies, mask, psf_k, spec: RenderSpec):
    """Each fitted galaxy's model [blend, slot, band, S, S] (0 in empty slots)."""
    _, iso = render(to_sources(galaxies, mask, spec), psf_k, spec, isolated=True)
    return iso


# -- BTK measure function ------------------------------------------------------------------------


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


def crop_size(x, y, mask, stamp_pixels: int, margin: float, step: int = 16) -> int:
    """The fit window of a batch: the smallest multiple of ``step`` pixels that holds every
    blend's detections with ``margin`` pixels on each side (at most the stamp)."""
    x, y, mask = np.asarray(x, float), np.asarray(y, float), np.asarray(mask, bool)
    if not mask.any():
        return int(min(stamp_pixels, step))
    span_x = np.where(mask, x, -np.inf).max(axis=1) - np.where(mask, x, np.inf).min(axis=1)
    span_y = np.where(mask, y, -np.inf).max(axis=1) - np.where(mask, y, np.inf).min(axis=1)
    span = float(np.max(np.where(mask.any(axis=1), np.maximum(span_x, span_y), 0.0)))
    need = int(math.ceil(span + 2 * margin + 1))
    return int(min(stamp_pixels, -(-need // step) * step))


class ForwardModelMeasure:
    """A BTK measure function that fits each batch once and serves every blend from a cache.

    ``MeasureGenerator(ForwardModelMeasure(), draw_generator)`` calls it per blend; the first
    call on a batch detects with SEP (`btkjax.measure.sep_singleband_measure`'s detections),
    initializes, fits the whole batch (`fit_blends`, with Fisher errors, adding galaxies that
    SEP missed from the residual: ``add_sources``) and renders the models on the whole stamp;
    later calls on the same batch (the same ``blend_images`` object) read the cache.

    The fit runs on a window of the stamp around each blend's detections (``fit_pixels``): the
    likelihood of the pixels in it, which holds the galaxies' light down to ``crop_margin``
    arcsec beyond the outermost detections. Light farther out carries little information, and
    the window's size sets the cost (an FFT box of 72 pixels instead of 128 for LSST 24"
    stamps). One window size per batch: each new size compiles once.

    Args:
        model: the component kind fitted ("exponential", "sersic", ...).
        max_sources: slots per blend (static shape: more detections are dropped, faintest
            first, and flagged; fewer are masked).
        deblended: "model" (each galaxy's model) or "split" (scarlet's data-weighted split:
            data * model_i / sum_j model_j).
        seg_factor: a galaxy's segmentation is where its model exceeds ``seg_factor`` times the
            sky noise in some band.
        pad_pixels: FFT box = the fit window + this many pixels (`fit_spec`).
        fit_pixels: "auto" (`crop_size` of the batch's detections with ``crop_margin``), a
            window side in pixels, or None (the whole stamp).
        crop_margin: arcsec kept around the detections by ``fit_pixels="auto"``.
        errors: compute the Fisher errors (``*_err`` columns).
        add_sources: galaxies per blend that SEP missed, looked for in the residual of the fit
            and added when significant (`fit_blends`'s ``add_sources``; 0: exactly SEP's
            detections). The default, 2, is what beats SEP on blended galaxies in
            ``benchmarks/bench_deblend.py``: without it a galaxy's model absorbs the light of an
            undetected neighbour.
        dtype: fit dtype (default the images'; float64 needs jax_enable_x64).
        name: the name under which `MeasureGenerator` reports it.
        sep_kwargs: keyword arguments of `sep_singleband_measure` for detection.
        **fit_kwargs: passed to `fit_blends` and `fit` (max_steps, chunk, prior,
            residual_kwargs, ...).

    Catalog columns: ``ra``, ``dec`` (arcsec), ``x_peak``, ``y_peak`` (pixels), ``{band}_flux``
    (electrons), ``hlr`` (arcsec), ``g1``, ``g2`` (reduced shear), ``e1``, ``e2`` (distortion,
    comparable with `btkjax.metrics.moments_ellipticity`), ``n`` (Sersic index), their 1-sigma
    Fisher errors ``x_peak_err``, ``y_peak_err``, ``{band}_flux_err``, ``hlr_err``, ``g1_err``,
    ``g2_err`` (and ``n_err`` for model="sersic"; NaN where the Hessian was not positive
    definite, see the status), ``added`` (found in the residual, ``add_sources``), ``status``
    and ``n_steps`` (the blend's), ``chi2_per_pixel``.
    """

    def __init__(self, model: str = "exponential", max_sources: int = 6, deblended="model",
                 seg_factor: float = 3.0, pad_pixels: int = 8, fit_pixels="auto",
                 crop_margin: float = 3.2, errors: bool = True, add_sources: int = 2,
                 dtype=None, name: str = "forward_model", sep_kwargs=None, **fit_kwargs):
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
        self.dtype = dtype
        self.__name__ = name
        self.sep_kwargs = dict(sep_kwargs or {})
        self.fit_kwargs = fit_kwargs
        self._key = None
        self._cache = None
        self._specs = {}
        self.n_fits = 0  # batches fitted (the cache's misses)
        self.last_fit_pixels = None  # the window of the last batch

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_key"], state["_cache"], state["_specs"] = None, None, {}
        return state

    def _setup(self, batch, surveys, survey_name):
        from btkjax.measure import select_survey
        from btkjax.survey import get_mean_sky_level

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
        return images, wcs, multires, psfs, pixel_scale, bands, sky

    def _spec(self, size, pixel_scale, psfs, dtype):
        """(spec, psf_k) of a ``size``-pixel fit window, cached per size and PSFs."""
        from btkjax.render import psf_kimage_from_galsim

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
        from btkjax.measure import sep_singleband_measure

        images, wcs, multires, psfs, pixel_scale, bands, sky = self._setup(
            batch, surveys, survey_name)
        images = np.asarray(images)
        if channels_last:
            images = np.moveaxis(images, -1, 1)
        dtype = np.dtype(self.dtype or images.dtype)
        if dtype == np.float32 and jax.config.jax_enable_x64:
            dtype = np.dtype(np.float64)  # see fit_blends: optax's L-BFGS under x64
        s = images.shape[-1]
        detections, det_flux = [], []
        for i in range(images.shape[0]):
            cat = sep_singleband_measure(batch, i, channels_last=channels_last, surveys=surveys,
                                         survey_name=survey_name, **self.sep_kwargs)["catalog"]
            detections.append(cat)
            xi = np.clip(np.round(np.asarray(cat["x_peak"])).astype(int), 0, s - 1)
            yi = np.clip(np.round(np.asarray(cat["y_peak"])).astype(int), 0, s - 1)
            det_flux.append((images[i] / sky[:, None, None]).sum(0)[yi, xi])
        x, y, mask, too_many = pad_detections(detections, self.max_sources, det_flux)
        if self.fit_pixels is None:
            size = s
        elif self.fit_pixels == "auto":
            size = crop_size(x, y, mask, s, self.crop_margin / pixel_scale)
        else:
            size = min(int(self.fit_pixels), s)
        ox, oy = crop_origins(x, y, mask, s, size)
        rows = oy[:, None] + np.arange(size)[None, :]
        cols = ox[:, None] + np.arange(size)[None, :]
        window = images[np.arange(len(images))[:, None, None, None],
                        np.arange(images.shape[1])[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
        spec, psf_k = self._spec(size, pixel_scale, psfs, dtype)
        res = fit_blends(jnp.asarray(window, dtype),
                         (x - ox[:, None], y - oy[:, None], mask), psf_k, spec, sky,
                         errors=self.errors, add_sources=self.add_sources, **self.fit_kwargs)
        res = res._replace(status=np.asarray(res.status) | np.where(
            too_many, STATUS_TOO_MANY, 0).astype(np.int32))
        gal = jax.tree.map(np.asarray, res.galaxies)
        gal = gal._replace(x=gal.x + ox[:, None], y=gal.y + oy[:, None])
        full_spec, full_psf_k = self._spec(s, pixel_scale, psfs, dtype)
        models = np.asarray(model_images(jax.tree.map(jnp.asarray, gal), res.mask, full_psf_k,
                                         full_spec))
        self.n_fits += 1
        self.last_fit_pixels = size
        return {
            "galaxies": gal,
            "errors": None if res.errors is None else jax.tree.map(np.asarray, res.errors),
            "mask": np.asarray(res.mask), "added": np.asarray(res.added),
            "status": np.asarray(res.status),
            "n_steps": np.asarray(res.n_steps), "chi2": np.asarray(res.chi2) / res.n_pixels,
            "models": models, "images": images, "sky": sky, "bands": bands, "wcs": wcs,
            "multires": multires,
        }

    def __call__(self, batch, idx, channels_last=False, surveys=None, survey_name=None,
                 **kwargs):
        from astropy.table import Table

        from btkjax.measure import pixel_to_arcsec

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
        if c["errors"] is not None:
            err = jax.tree.map(lambda a: a[idx][m], c["errors"])
            t["x_peak_err"], t["y_peak_err"] = err.x.astype(float), err.y.astype(float)
            for b, band in enumerate(c["bands"]):
                t[f"{band}_flux_err"] = err.flux[:, b].astype(float)
            t["hlr_err"] = err.hlr.astype(float)
            t["g1_err"], t["g2_err"] = err.g1.astype(float), err.g2.astype(float)
            if self.model == "sersic":
                t["n_err"] = err.n.astype(float)
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
