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

The default optimizer is optax's L-BFGS (backtracking line search), vmapped over blends so that
each blend has its own curvature history and line search; Adam with a decaying schedule is the
alternative (and the one `fit_unrolled` differentiates through).

Everything is vmapped over the blends of a batch with padded, masked slots: one compiled step
per (`RenderSpec`, model, optimizer, batch shape), cached, so fitting a second batch of the same
shape does not recompile. Each blend stops on its own when its loss changes by less than
``rtol |loss| + atol`` for ``patience`` steps in a row (or at ``max_steps``), and reports a status
(`STATUS_*` bit flags): converged, hit the step limit, had no detection, dropped a detection
outside the stamp, or diverged (a non-finite loss or gradient: that blend keeps its last finite
parameters, the others go on).

Initialization (`init_galaxies`, pure JAX): adaptive Gaussian second moments of the
inverse-sky-weighted band sum around each detection (SEP's positions), minus the PSF's moments,
give the size and ellipticity; the fluxes per band then solve the linear least-squares problem
of the data given those unit-flux templates.

Pure functions and the high-level path:

- `init_galaxies`, `to_unconstrained`, `to_physical`, `to_sources`, `neg_log_likelihood`;
- `fit` (jitted while-loop over steps, cached) and `fit_unrolled` (a fixed number of steps in a
  ``lax.scan``: reverse-mode differentiable, for learning);
- `fit_blends(images, detections, psf_k, spec, sky, ...)`: validation, init, fit, results;
- `ForwardModelMeasure`: a BTK measure function (``f(batch, idx, **kwargs)``) that fits the
  whole batch once (SEP detections) and serves each blend from a cache.

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

G_MAX = 0.95  # largest fitted |g| (q = 0.026)
N_MIN, N_MAX = 0.5, 6.0  # Sersic index range (inside btkjax.profiles' table, 0.3 .. 6.2)
HLR_FLOOR_ARCSEC = 0.02
# The fit evaluates PSF x pixel out to where it falls below this fraction of its k=0 value
# (the renderer's default, MAXK_THRESHOLD = 1e-7, is for 2e-5-of-peak images): light beyond it
# is < 1e-4 of the flux, below the noise of any blend worth deblending, and the grid is smaller.
FIT_MAXK_THRESHOLD = 1e-4

_TRACES = {"fit": 0, "init": 0, "unrolled": 0}


def trace_count(name: str = "fit") -> int:
    """How many times the jitted entry point ``name`` ("fit", "init", "unrolled") was traced."""
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
        init: the initial `Galaxies`.
        mask: [blend, slot] bool, slots that were fitted.
        status: [blend] int, `STATUS_*` bit flags (0: converged).
        n_steps: [blend] int, optimizer steps taken by each blend.
        loss: [blend] final negative log-likelihood (+ prior).
        chi2: [blend] final sum((d - m)^2 / (sky + model)).
        n_pixels: number of pixels x bands per blend (chi2 / n_pixels ~ 1 for a good fit).
    """

    galaxies: Galaxies
    init: Galaxies
    mask: jax.Array
    status: jax.Array
    n_steps: jax.Array
    loss: jax.Array
    chi2: jax.Array
    n_pixels: int


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


def _adaptive_moments(image, x0, y0, n_iter=6, sigma0=2.0):
    """Adaptive Gaussian moments of image [S, S] around (x0, y0) for each slot: centroid
    refined by up to 1 pixel, covariance [slot, 2, 2] (pixels^2, the fixed point M = 2 Q that is
    exact for Gaussians)."""
    s = image.shape[-1]
    yy, xx = jnp.mgrid[0:s, 0:s].astype(image.dtype)
    img = jnp.maximum(image, 0.0)

    def one(x, y):
        m = jnp.eye(2, dtype=image.dtype) * sigma0**2
        cx, cy = x, y
        for _ in range(n_iter):
            dx, dy = xx - cx, yy - cy
            inv = jnp.linalg.inv(m)
            w = jnp.exp(-0.5 * (inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy
                                + inv[1, 1] * dy * dy)) * img
            tot = jnp.maximum(jnp.sum(w), 1e-30)
            mx, my = jnp.sum(w * dx) / tot, jnp.sum(w * dy) / tot
            qxx = jnp.sum(w * dx * dx) / tot
            qyy = jnp.sum(w * dy * dy) / tot
            qxy = jnp.sum(w * dx * dy) / tot
            q = jnp.array([[qxx, qxy], [qxy, qyy]])
            m_new = 2 * q
            ok = (jnp.linalg.det(m_new) > 0.01) & (jnp.trace(m_new) < 4 * s * s) & jnp.all(
                jnp.isfinite(m_new))
            m = jnp.where(ok, m_new, m)
            cx = jnp.where(ok, x + jnp.clip(cx + mx - x, -1.0, 1.0), cx)
            cy = jnp.where(ok, y + jnp.clip(cy + my - y, -1.0, 1.0), cy)
        return cx, cy, m

    return jax.vmap(one)(x0, y0)


def _psf_images(psf_k, spec: RenderSpec, n_band, dtype):
    point = dataclasses.replace(spec, kinds=("point",))
    z = jnp.zeros((1, 1), dtype)
    src = Sources(flux=jnp.ones((1, 1, n_band, 1), dtype), hlr=jnp.ones((1, 1, 1), dtype),
                  q=jnp.ones((1, 1, 1), dtype), beta=jnp.zeros((1, 1, 1), dtype),
                  n=jnp.ones((1, 1, 1), dtype), dx=z, dy=z, rotation=z, g1=z, g2=z,
                  mask=jnp.ones((1, 1), bool))
    return render(src, psf_k, point)[0][0]  # [band, S, S]


@partial(jax.jit, static_argnames=("spec",))
def init_galaxies(images, x, y, mask, psf_k, spec: RenderSpec, sky) -> Galaxies:
    """Initial `Galaxies` from detections, adaptive moments and linear fluxes (pure JAX).

    Args:
        images: [blend, band, S, S].
        x, y: [blend, slot] detection positions in pixels (0-based).
        mask: [blend, slot] bool.
        psf_k: [band, Ry, Cx] PSF x pixel on the spec's grid (one PSF for the batch).
        spec: the fit's `RenderSpec`.
        sky: [band] sky electrons per pixel.

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
    det = jnp.sum(images / sky[None, :, None, None], axis=1)  # [blend, S, S] inverse-sky weighted
    psf_img = _psf_images(psf_k, spec, n_band, dtype)
    psf_det = jnp.sum(psf_img / sky[:, None, None], axis=0)
    c = jnp.full((1,), (spec.stamp_pixels - 1) / 2, dtype)
    _, _, m_psf = _adaptive_moments(psf_det, c, c)
    m_psf = m_psf[0]
    cx, cy, m_obs = jax.vmap(_adaptive_moments)(det, x, y)
    m_gal = m_obs - m_psf
    floor = (HLR_FLOOR_ARCSEC / spec.pixel_scale) ** 2 + 0.09  # (0.3 pixel)^2 at least
    mxx, myy, mxy = m_gal[..., 0, 0], m_gal[..., 1, 1], m_gal[..., 0, 1]
    tr = jnp.maximum(mxx + myy, 2 * floor)
    e1 = jnp.clip((mxx - myy) / tr, -0.9, 0.9)
    e2 = jnp.clip(2 * mxy / tr, -0.9, 0.9)
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
    n = jnp.full_like(hlr, _fixed_index(model))
    cx = jnp.where(mask, cx, x)
    cy = jnp.where(mask, cy, y)
    unit = Galaxies(x=cx, y=cy, flux=jnp.ones(mask.shape + (n_band,), dtype), hlr=hlr,
                    g1=g1, g2=g2, n=n)
    # Linear least-squares fluxes per band given the unit templates (weights 1 / sky).
    src = to_sources(unit, mask, spec)
    _, iso = render(src, psf_k, spec, isolated=True)  # [blend, slot, band, S, S]
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
    flux = jnp.where(jnp.isfinite(f), jnp.maximum(f, f_floor), f_floor)
    return unit._replace(flux=flux)


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
    prev_loss: jax.Array
    count: jax.Array
    done: jax.Array
    status: jax.Array
    n_steps: jax.Array


def _tree_where(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(v).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _make_blend_loss(spec, model, max_offset, prior, noise):
    def loss(params, ax, ay, mask, image, sky, weight, psf_k):
        gal = to_physical(params, ax, ay, model, max_offset)
        m = _render_one(gal, mask, psf_k, spec)
        return _nll_terms(m, image, sky, weight, noise)[0] + _prior_term(gal, mask, prior)
    return loss


@partial(jax.jit, static_argnames=("spec", "model", "optimizer", "max_steps", "patience",
                                   "max_offset", "noise"))
def _fit_jit(params, ax, ay, mask, images, sky, weight, psf_k, prior, rtol, atol, *, spec,
             model, optimizer, max_steps, patience, max_offset, noise):
    _TRACES["fit"] += 1
    blend_loss = _make_blend_loss(spec, model, max_offset, prior, noise)
    lbfgs = _extra_args(optimizer)
    pk_axis = 0 if psf_k.ndim == 4 else None

    def step_one(p, opt_state, prev, count, done, status, nst, ax1, ay1, m1, img1, s1, w1, pk1):
        f = partial(blend_loss, ax=ax1, ay=ay1, mask=m1, image=img1, sky=s1, weight=w1,
                    psf_k=pk1)
        value, grad = jax.value_and_grad(f)(p)
        if lbfgs:
            updates, new_state = optimizer.update(grad, opt_state, p, value=value, grad=grad,
                                                  value_fn=f)
        else:
            updates, new_state = optimizer.update(grad, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        finite = jnp.isfinite(value) & _all_finite(grad) & _all_finite(new_p)
        small = jnp.abs(prev - value) <= rtol * jnp.abs(value) + atol
        new_count = jnp.where(small, count + 1, 0)
        converged = new_count >= patience
        move = (~done) & finite
        p_out = _tree_where(move, new_p, p)
        s_out = _tree_where(move, new_state, opt_state)
        new_status = jnp.where((~done) & ~finite, status | STATUS_NONFINITE, status)
        new_done = done | ~finite | converged
        return (p_out, s_out, jnp.where(move, value, prev), jnp.where(done, count, new_count),
                new_done, new_status, nst + move.astype(nst.dtype))

    vstep = jax.vmap(step_one, in_axes=(0,) * 13 + (pk_axis,))
    opt_state = jax.vmap(optimizer.init)(params)
    n_blend = mask.shape[0]
    state = _FitState(
        params=params, opt_state=opt_state,
        prev_loss=jnp.full((n_blend,), jnp.inf, images.dtype),
        count=jnp.zeros((n_blend,), jnp.int32),
        done=jnp.zeros((n_blend,), bool),
        status=jnp.zeros((n_blend,), jnp.int32),
        n_steps=jnp.zeros((n_blend,), jnp.int32),
    )

    def cond(carry):
        i, st = carry
        return (i < max_steps) & ~jnp.all(st.done)

    def body(carry):
        i, st = carry
        out = vstep(st.params, st.opt_state, st.prev_loss, st.count, st.done, st.status,
                    st.n_steps, ax, ay, mask, images, sky, weight, psf_k)
        return i + 1, _FitState(*out)

    _, state = jax.lax.while_loop(cond, body, (jnp.asarray(0), state))
    status = jnp.where(state.done, state.status, state.status | STATUS_MAX_STEPS)

    def final(p, ax1, ay1, m1, img1, s1, w1, pk1):
        gal = to_physical(p, ax1, ay1, model, max_offset)
        mdl = _render_one(gal, m1, pk1, spec)
        nll, chi2 = _nll_terms(mdl, img1, s1, w1, noise)
        return nll + _prior_term(gal, m1, prior), chi2

    loss, chi2 = jax.vmap(final, in_axes=(0,) * 7 + (pk_axis,))(
        state.params, ax, ay, mask, images, sky, weight, psf_k)
    return state.params, status, state.n_steps, loss, chi2


def fit(params: Params, anchor_x, anchor_y, mask, images, psf_k, spec: RenderSpec, sky, *,
        model: str | None = None, optimizer="lbfgs", learning_rate: float = 0.05,
        final_ratio: float = 1e-2, max_steps: int = 200, rtol: float | None = None,
        atol: float = 0.0, patience: int = 5, max_offset: float = 4.0,
        prior: Prior | None = None, weight=None, noise: str = "poisson"):
    """Fits unconstrained `Params` of a batch; one jitted while-loop, cached per static setup.

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

    Returns:
        (params, status [blend], n_steps [blend], loss [blend], chi2 [blend]).
    """
    _check_spec(spec)
    if noise not in ("poisson", "chi2"):
        raise ValueError(f"noise must be 'poisson' or 'chi2', got {noise!r}.")
    model = spec.kinds[0] if model is None else model
    dtype = images.dtype
    if rtol is None:
        rtol = 1e-7 if dtype == jnp.float64 else 1e-5
    opt = _optimizer(optimizer, learning_rate, max_steps, final_ratio)
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    images = jnp.asarray(images)
    bad = ~jnp.isfinite(images)
    weight = jnp.ones_like(images) if weight is None else jnp.asarray(weight, dtype)
    # Non-finite pixels are NOT masked here: a blend with them diverges and says so (status).
    prior = Prior() if prior is None else prior
    prior = Prior(jnp.asarray(prior.log_hlr_mean, dtype), jnp.asarray(prior.log_hlr_width, dtype))
    _ = bad
    return _fit_jit(params, jnp.asarray(anchor_x, dtype), jnp.asarray(anchor_y, dtype),
                    jnp.asarray(mask, bool), images, sky, weight, jnp.asarray(psf_k), prior,
                    jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype), spec=spec, model=model,
                    optimizer=opt, max_steps=int(max_steps), patience=int(patience),
                    max_offset=float(max_offset), noise=noise)


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
               init: Galaxies | None = None, **fit_kwargs) -> FitResult:
    """Detections in, fitted galaxies out, for a whole batch (the high-level entry point).

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
        **fit_kwargs: passed to `fit` (optimizer, max_steps, rtol, prior, ...).

    Returns:
        `FitResult`.
    """
    _check_spec(spec)
    images = jnp.asarray(images)
    if jax.config.jax_enable_x64 and images.dtype == jnp.float32 and \
            fit_kwargs.get("optimizer", "lbfgs") == "lbfgs":
        # optax's L-BFGS line search transposes with a float64 cotangent under x64, which
        # fails on float32 parameters: fit in float64 (the sharp bit is optax's).
        images = images.astype(jnp.float64)
        psf_k = jnp.asarray(psf_k).astype(jnp.complex128)
    if images.ndim != 4 or images.shape[-1] != spec.stamp_pixels or images.shape[-2] != \
            spec.stamp_pixels:
        raise ValueError(f"images must be [blend, band, {spec.stamp_pixels}, "
                         f"{spec.stamp_pixels}] (the spec's stamp), got {images.shape}.")
    n_band = images.shape[1]
    sky_arr = np.asarray(sky, dtype=float)
    if sky_arr.shape[-1] != n_band or np.any(~(sky_arr > 0)):
        raise ValueError(f"sky must hold {n_band} positive levels (one per band), got {sky}.")
    if psf_k.shape[-3] != n_band:
        raise ValueError(f"psf_k must have {n_band} bands on axis -3, got shape {psf_k.shape}.")
    too_many = np.zeros(images.shape[0], bool)
    if isinstance(detections, tuple) and len(detections) == 3:
        x, y, mask = (np.asarray(a) for a in detections)
        mask = mask.astype(bool)
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
    if init is None:
        psf_shared = psf_k if psf_k.ndim == 3 else psf_k[0]
        init = init_galaxies(images, jnp.asarray(x, dtype), jnp.asarray(y, dtype),
                             jnp.asarray(mask), psf_shared, spec, jnp.asarray(sky_arr[..., :]
                             if sky_arr.ndim == 1 else sky_arr[0], dtype))
    ax, ay = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    params = to_unconstrained(init, ax, ay, model, max_offset)
    params, status, n_steps, loss, chi2 = fit(params, ax, ay, jnp.asarray(mask), images, psf_k,
                                              spec, sky_arr, **fit_kwargs)
    galaxies = to_physical(params, ax, ay, model, max_offset)
    status = status | jnp.asarray(np.where(~mask.any(axis=1), STATUS_NO_DETECTIONS, 0)
                                  | np.where(outside, STATUS_OUTSIDE_STAMP, 0)
                                  | np.where(too_many, STATUS_TOO_MANY, 0), jnp.int32)
    return FitResult(galaxies=galaxies, init=init, mask=jnp.asarray(mask), status=status,
                     n_steps=n_steps, loss=loss, chi2=chi2,
                     n_pixels=int(np.prod(images.shape[1:])))


def model_images(galaxies: Galaxies, mask, psf_k, spec: RenderSpec):
    """Each fitted galaxy's model [blend, slot, band, S, S] (0 in empty slots)."""
    _, iso = render(to_sources(galaxies, mask, spec), psf_k, spec, isolated=True)
    return iso


# -- BTK measure function ------------------------------------------------------------------------


class ForwardModelMeasure:
    """A BTK measure function that fits each batch once and serves every blend from a cache.

    ``MeasureGenerator(ForwardModelMeasure(), draw_generator)`` calls it per blend; the first
    call on a batch detects with SEP (`btkjax.measure.sep_singleband_measure`'s detections, so
    both are scored on the same detections), initializes, fits the whole batch in one compiled
    call and renders the models; later calls on the same batch (the same ``blend_images``
    object) read the cache.

    Args:
        model: the component kind fitted ("exponential", "sersic", ...).
        max_sources: slots per blend (static shape: more detections are dropped, faintest
            first, and flagged; fewer are masked).
        deblended: "model" (each galaxy's model) or "split" (scarlet's data-weighted split:
            data * model_i / sum_j model_j).
        seg_factor: a galaxy's segmentation is where its model exceeds ``seg_factor`` times the
            sky noise in some band.
        pad_pixels: FFT box = the stamp + this many pixels (`fit_spec`).
        dtype: fit dtype (default the images'; float64 needs jax_enable_x64).
        name: the name under which `MeasureGenerator` reports it.
        sep_kwargs: keyword arguments of `sep_singleband_measure` for detection.
        **fit_kwargs: passed to `fit`.

    Catalog columns: ``ra``, ``dec`` (arcsec), ``x_peak``, ``y_peak`` (pixels), ``{band}_flux``
    (electrons), ``hlr`` (arcsec), ``g1``, ``g2`` (reduced shear), ``e1``, ``e2`` (distortion,
    comparable with `btkjax.metrics.moments_ellipticity`), ``n`` (Sersic index), ``status`` and
    ``n_steps`` (the blend's), ``chi2_per_pixel``.
    """

    def __init__(self, model: str = "exponential", max_sources: int = 6, deblended="model",
                 seg_factor: float = 3.0, pad_pixels: int = 8, dtype=None,
                 name: str = "forward_model", sep_kwargs=None, **fit_kwargs):
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
        if deblended not in ("model", "split"):
            raise ValueError(f"deblended must be 'model' or 'split', got {deblended!r}.")
        self.model = model
        self.max_sources = int(max_sources)
        self.deblended = deblended
        self.seg_factor = float(seg_factor)
        self.pad_pixels = int(pad_pixels)
        self.dtype = dtype
        self.__name__ = name
        self.sep_kwargs = dict(sep_kwargs or {})
        self.fit_kwargs = fit_kwargs
        self._key = None
        self._cache = None
        self._specs = {}
        self.n_fits = 0  # batches fitted (the cache's misses)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_key"], state["_cache"], state["_specs"] = None, None, {}
        return state

    def _setup(self, batch, surveys, survey_name):
        from btkjax.measure import _select_survey
        from btkjax.survey import get_mean_sky_level

        images, wcs, multires = _select_survey(batch, surveys, survey_name)
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

    def _fit_batch(self, batch, channels_last, surveys, survey_name):
        from btkjax.measure import sep_singleband_measure
        from btkjax.render import psf_kimage_from_galsim

        images, wcs, multires, psfs, pixel_scale, bands, sky = self._setup(
            batch, surveys, survey_name)
        images = np.asarray(images)
        if channels_last:
            images = np.moveaxis(images, -1, 1)
        dtype = self.dtype or images.dtype
        s = images.shape[-1]
        key = (s, pixel_scale, tuple(id(p) for p in psfs))
        if key not in self._specs:
            spec = fit_spec(s, pixel_scale, psfs, self.model, self.pad_pixels)
            cdtype = jnp.complex128 if dtype == np.float64 else jnp.complex64
            psf_k = jnp.asarray(np.stack([psf_kimage_from_galsim(p, spec) for p in psfs]),
                                cdtype)
            self._specs = {key: (spec, psf_k, psfs)}  # keep psfs alive: ids stay unique
        spec, psf_k, _ = self._specs[key]
        detections, det_flux = [], []
        for i in range(images.shape[0]):
            cat = sep_singleband_measure(batch, i, channels_last=channels_last, surveys=surveys,
                                         survey_name=survey_name, **self.sep_kwargs)["catalog"]
            detections.append(cat)
            xi = np.clip(np.round(np.asarray(cat["x_peak"])).astype(int), 0, s - 1)
            yi = np.clip(np.round(np.asarray(cat["y_peak"])).astype(int), 0, s - 1)
            det_flux.append((images[i] / sky[:, None, None]).sum(0)[yi, xi])
        x, y, mask, too_many = pad_detections(detections, self.max_sources, det_flux)
        res = fit_blends(jnp.asarray(images, dtype), (x, y, mask), psf_k, spec, sky,
                         **self.fit_kwargs)
        res = res._replace(status=res.status | jnp.asarray(
            np.where(too_many, STATUS_TOO_MANY, 0), jnp.int32))
        models = np.asarray(model_images(res.galaxies, res.mask, psf_k, spec))
        self.n_fits += 1
        return {
            "galaxies": jax.tree.map(np.asarray, res.galaxies),
            "mask": np.asarray(res.mask), "status": np.asarray(res.status),
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
        n = int(m.sum())
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
