"""The deblender's model: parameters, their transforms, and the likelihood.

Each galaxy is one elliptical profile (exponential by default, or Sersic of free index) with a
position, a flux per band, a half-light radius and a reduced-shear ellipticity, convolved with
the band's PSF by `btkjax.core.render.render`; or, for ``model="bulge+disk"``, an exponential
disk and a de Vaucouleurs bulge with one centre and one ellipticity, each band's flux shared
between them by a bulge fraction of its own, the bulge of its own half-light radius. See
`btkjax.deblend` for the likelihood and the unconstrained parameterization.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.boxes import good_fft_size
from btkjax.core.kinds import get_kind
from btkjax.core.render import RenderSpec, Sources, render
from btkjax.optics import make_render_spec

__all__ = [
    "Galaxies", "Params", "Prior", "FitResult", "MODELS", "FIT_MAXK_THRESHOLD",
    "STATUS_CONVERGED", "STATUS_MAX_STEPS", "STATUS_NO_DETECTIONS", "STATUS_OUTSIDE_STAMP",
    "STATUS_NONFINITE", "STATUS_TOO_MANY", "STATUS_BAD_ERRORS", "STATUS_ADDED",
    "to_physical", "to_unconstrained", "to_sources", "fit_spec", "check_spec", "fixed_index",
    "spec_model", "n_params", "MODEL_KINDS",
    "render_one", "NLLTerms", "nll_terms", "prior_term", "prior_residuals", "check_prior",
    "neg_log_likelihood",
    "psf_images", "model_images",
    "trace_count", "TRACES",
]

# the deblender's models: name -> the renderer's component kinds (one per component axis of
# `Sources`)
MODEL_KINDS = {"exponential": ("exponential",), "sersic": ("sersic",),
               "devaucouleurs": ("devaucouleurs",), "gaussian": ("gaussian",),
               "bulge+disk": ("exponential", "devaucouleurs")}
MODELS = tuple(MODEL_KINDS)

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
# a bulge+disk galaxy's start (`init_galaxies`): this fraction of each band's flux in a bulge of
# this ratio of the disk's half-light radius
BULGE_START_FRAC = 0.2
BULGE_START_RATIO = 0.5
# The fit evaluates PSF x pixel out to where it falls below this fraction of its k=0 value
# (the renderer's default, MAXK_THRESHOLD = 1e-7, is for 2e-5-of-peak images): light beyond it
# is < 1e-4 of the flux, below the noise of any blend worth deblending, and the grid is smaller.
FIT_MAXK_THRESHOLD = 1e-4

# Traces of the jitted entry points, per name (`trace_count`).
TRACES = {"fit": 0, "init": 0, "unrolled": 0, "errors": 0, "residual": 0}


def trace_count(name: str = "fit") -> int:
    """How many times the jitted entry point ``name`` ("fit", "init", "unrolled", "errors") was
    traced."""
    return TRACES[name]


class Galaxies(NamedTuple):
    """Physical parameters of the fitted galaxies.

    Attributes:
        x: [blend, slot] column of the center in pixels (0-based, as ``x_peak``).
        y: [blend, slot] row of the center in pixels.
        flux: [blend, slot, band] electrons.
        hlr: [blend, slot] half-light radius in arcsec (circularized: area preserving shear).
        g1: [blend, slot] reduced shear, |g| = (1 - q) / (1 + q).
        g2: [blend, slot]
        n: [blend, slot] Sersic index (the model's fixed index for non-Sersic models; the
            disk's, 1, for "bulge+disk").
        bulge_frac: [blend, slot, band] the bulge's fraction of each band's flux
            (``model="bulge+disk"``; None for one-profile models). ``hlr`` is then the disk's.
        bulge_hlr: [blend, slot] the bulge's half-light radius in arcsec ("bulge+disk").
    """

    x: jax.Array
    y: jax.Array
    flux: jax.Array
    hlr: jax.Array
    g1: jax.Array
    g2: jax.Array
    n: jax.Array
    bulge_frac: jax.Array | None = None
    bulge_hlr: jax.Array | None = None


class Params(NamedTuple):
    """Unconstrained parameters (what the optimizer sees); see the module docstring."""

    shift: jax.Array  # [..., slot, 2]
    log_flux: jax.Array  # [..., slot, band]
    log_hlr: jax.Array  # [..., slot]
    eta: jax.Array  # [..., slot, 2]
    n_logit: jax.Array  # [..., slot]
    bulge_logit: jax.Array | None = None  # [..., slot, band] ("bulge+disk")
    log_bulge_hlr: jax.Array | None = None  # [..., slot] ("bulge+disk")


class Prior(NamedTuple):
    """Optional Gaussian priors per galaxy on its size and ellipticity; a width of inf (the
    default) means none.

    Size: ``ln(hlr / arcsec) ~ N(log_hlr_mean + log_hlr_slope * (ln F - log_flux_ref),
    log_hlr_width)`` with ``F`` the galaxy's flux summed over bands (electrons): the catalog's
    size-flux relation (`btkjax.deblend.catalog_prior`), or a flat mean with slope 0.
    Ellipticity: each reduced-shear component ``g1``, ``g2`` ~ N(0, ``g_width``).
    Sersic index (``model="sersic"``): ``n ~ N(n_mean, n_width)``; bright galaxies' data
    outweigh it, faint ones stay near ``n_mean`` (a model of fixed index has no term).
    Bulge + disk (``model="bulge+disk"``): each band's logit of the bulge fraction
    ``~ N(bulge_logit_mean, bulge_logit_width)`` and ``ln(bulge_hlr / hlr) ~
    N(log_bulge_ratio_mean, log_bulge_ratio_width)``; a faint galaxy's bulge is not measured
    and these keep its fit (and its Fisher matrix) well defined (`BULGE_DISK_PRIOR`).
    Colours (one SED per galaxy, from a population): the vector of ln flux ratios of adjacent
    bands, ``c_k = ln(F_{k+1} / F_k)`` (electrons), ``~ N(colour_mean, inv(colour_icov))``
    with ``colour_mean`` [band - 1] and the precision matrix ``colour_icov`` [band - 1,
    band - 1] (`btkjax.deblend.colour_prior` of a catalog); the scalar default 0 means none.

    Traced leaves: differentiable (see the module docstring's learning example).
    """

    log_hlr_mean: jax.Array | float = 0.0
    log_hlr_width: jax.Array | float = math.inf
    log_hlr_slope: jax.Array | float = 0.0
    log_flux_ref: jax.Array | float = 0.0
    g_width: jax.Array | float = math.inf
    n_mean: jax.Array | float = 1.0
    n_width: jax.Array | float = math.inf
    bulge_logit_mean: jax.Array | float = 0.0
    bulge_logit_width: jax.Array | float = math.inf
    log_bulge_ratio_mean: jax.Array | float = 0.0
    log_bulge_ratio_width: jax.Array | float = math.inf
    colour_mean: jax.Array | float = 0.0
    colour_icov: jax.Array | float = 0.0

    def astype(self, dtype) -> Prior:
        """The prior with every leaf a ``dtype`` array (what the jitted fits take)."""
        return Prior(*(jnp.asarray(v, dtype) for v in self))


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


def fixed_index(model: str) -> float:
    """The Sersic index of a fitted model of fixed shape (the kind's, from the registry
    `btkjax.core.kinds`; a Gaussian is a Sersic profile of index 0.5), the starting index
    of a free-index Sersic fit, and the disk's of "bulge+disk"."""
    if model in ("sersic", "bulge+disk"):
        return 1.0
    n = get_kind(model).sersic_index
    return float(n) if n is not None else {"gaussian": 0.5}[model]


def n_params(model: str, n_band: int) -> int:
    """Free parameters of one galaxy of ``model`` (position, fluxes, size, shear, and the
    index or the bulge's fractions and size)."""
    return 5 + n_band + {"sersic": 1, "bulge+disk": n_band + 1}.get(model, 0)


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
        n = jnp.full_like(params.log_hlr, fixed_index(model))
    bulge = model == "bulge+disk"
    return Galaxies(
        x=anchor_x + off[..., 0], y=anchor_y + off[..., 1], flux=jnp.exp(params.log_flux),
        hlr=jnp.exp(params.log_hlr), g1=g[..., 0], g2=g[..., 1], n=n,
        bulge_frac=jax.nn.sigmoid(params.bulge_logit) if bulge else None,
        bulge_hlr=jnp.exp(params.log_bulge_hlr) if bulge else None,
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
    bulge_logit = log_bulge_hlr = None
    if model == "bulge+disk":
        if gal.bulge_frac is None or gal.bulge_hlr is None:
            raise ValueError("model='bulge+disk' needs Galaxies with bulge_frac and bulge_hlr.")
        bf = jnp.clip(gal.bulge_frac, 1e-6, 1 - 1e-6)
        bulge_logit = (jnp.log(bf) - jnp.log1p(-bf)).astype(dtype)
        log_bulge_hlr = jnp.log(gal.bulge_hlr).astype(dtype)
    return Params(
        shift=max_offset * jnp.arctanh(off / max_offset),
        log_flux=jnp.log(gal.flux),
        log_hlr=jnp.log(gal.hlr),
        eta=_eta_from_g(g),
        n_logit=n_logit.astype(dtype),
        bulge_logit=bulge_logit,
        log_bulge_hlr=log_bulge_hlr,
    )


def to_sources(gal: Galaxies, mask, spec: RenderSpec) -> Sources:
    """`Galaxies` -> renderer `Sources`: one component of kind ``spec.kinds[0]``, or for
    "bulge+disk" the disk and the bulge (one centre, one shear)."""
    s = spec.stamp_pixels
    c = (s - 1) / 2
    if gal.bulge_frac is not None:
        flux = jnp.stack([gal.flux * (1 - gal.bulge_frac), gal.flux * gal.bulge_frac], -1)
        hlr = jnp.stack([gal.hlr, gal.bulge_hlr], -1)
        n = jnp.stack([gal.n, jnp.full_like(gal.n, 4.0)], -1)
    else:
        flux, hlr, n = gal.flux[..., None], gal.hlr[..., None], gal.n[..., None]
    return Sources(
        flux=flux, hlr=hlr, q=jnp.ones_like(hlr), beta=jnp.zeros_like(hlr), n=n,
        dx=(gal.x - c) * spec.pixel_scale, dy=(gal.y - c) * spec.pixel_scale,
        rotation=jnp.zeros_like(gal.hlr), g1=gal.g1, g2=gal.g2, mask=mask,
    )


def spec_model(spec: RenderSpec) -> str:
    """The deblender's model that ``spec`` renders (checked by `check_spec`)."""
    check_spec(spec)
    return next(m for m, kinds in MODEL_KINDS.items() if tuple(spec.kinds) == kinds)


def check_spec(spec: RenderSpec):
    if tuple(spec.kinds) not in MODEL_KINDS.values():
        raise ValueError(
            f"The fit's RenderSpec must render one of the models {MODELS} (component kinds "
            f"{tuple(MODEL_KINDS.values())}), got {spec.kinds}; build it with "
            "btkjax.deblend.fit_spec or make_render_spec(..., kinds=('exponential',))."
        )


def fit_spec(stamp_pixels: int, pixel_scale: float, psfs, model: str = "exponential",
             pad_pixels: int = 8, maxk_threshold: float = FIT_MAXK_THRESHOLD) -> RenderSpec:
    """A small `RenderSpec` for fitting: an FFT box of the stamp plus ``pad_pixels`` (light
    farther than the pad beyond the stamp's edge wraps around) and a loose maxk threshold."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}.")
    return make_render_spec(stamp_pixels, pixel_scale, psfs, kinds=MODEL_KINDS[model],
                            fft_size=good_fft_size(stamp_pixels + pad_pixels),
                            maxk_threshold=maxk_threshold)


# -- likelihood --------------------------------------------------------------------------------


def render_one(gal1: Galaxies, mask1, psf_k, spec: RenderSpec):
    """Model of one blend [band, S, S] (gal1 fields without the blend axis)."""
    src = to_sources(jax.tree.map(lambda a: a[None], gal1), mask1[None], spec)
    psf = psf_k if psf_k.ndim == 3 else psf_k[None]
    return render(src, psf, spec)[0][0]


class NLLTerms(NamedTuple):
    """What `nll_terms` returns: one blend's negative log-likelihood and Pearson chi2."""

    nll: jax.Array
    chi2: jax.Array


def nll_terms(model, image, sky, weight, noise="poisson") -> NLLTerms:
    """`NLLTerms` (negative log-likelihood, Pearson chi2) of one blend; sky [band].

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
        return NLLTerms(0.5 * jnp.sum(weight * (image - model) ** 2 / var), chi2)
    counts = jnp.maximum(image + sky, 0.0)
    safe = jnp.where(counts > 0, counts, 1.0)
    # (r - c) - c log(r / c) = c (u - log1p(u)), u = (r - c) / c, with r - c = m - d taken
    # without forming r and c (sky + galaxy: 1e5 electrons in a bright pixel). The textbook
    # form subtracts c log r - c log c, two numbers of ~1e6 whose float32 rounding (~0.1 each)
    # summed over a stamp made the loss jump by 5-10 when a position moved by 1e-4 pixel: more
    # than a faint galaxy's whole likelihood, so the line searches and the stopping rule
    # followed rounding, not data (session 10).
    plain = (model + sky >= 1e-3 * sky) & (image + sky >= 0)
    u = jnp.where(plain, model - image, rate - counts) / safe
    dev = jnp.where(counts > 0, safe * _u_minus_log1p(u), rate)
    return NLLTerms(jnp.sum(weight * dev), chi2)


def _u_minus_log1p(u):
    """``u - log1p(u)`` for u > -1 to float precision: its Taylor series u^2 (1/2 - u/3 + ...)
    where |u| < 0.1 (the direct difference loses 2 eps / |u| there), the difference
    elsewhere."""
    small = jnp.abs(u) < 0.1
    us = jnp.where(small, u, 0.0)
    series = 0.0
    for k in range(9, 1, -1):  # Horner: sum_{k>=2} (-1)^k u^k / k, to u^9 (error < u^10 / 10)
        series = (1.0 if k % 2 == 0 else -1.0) / k + us * series
    ul = jnp.where(small, 1.0, u)
    return jnp.where(small, us * us * series, ul - jnp.log1p(ul))


def prior_residuals(gal1: Galaxies, mask1, prior: Prior):
    """The whitened residuals ``r`` of the `Prior` of one blend's galaxies, [slot * k]:
    ``prior_term = 0.5 sum(r^2)`` (a width of inf gives 0; masked slots give 0). Their Jacobian
    J gives the prior's Fisher information ``J^T J`` (`fisher_errors`), positive semi-definite
    where the Hessian of ``prior_term`` need not be (a Gaussian on ln F is not convex in F)."""
    log_flux = jnp.log(jnp.sum(gal1.flux, axis=-1))
    mean = prior.log_hlr_mean + prior.log_hlr_slope * (log_flux - prior.log_flux_ref)
    cols = [((jnp.log(gal1.hlr) - mean) / prior.log_hlr_width)[:, None],
            (gal1.g1 / prior.g_width)[:, None], (gal1.g2 / prior.g_width)[:, None],
            ((gal1.n - prior.n_mean) / prior.n_width)[:, None]]
    if gal1.bulge_frac is not None:
        bf = jnp.clip(gal1.bulge_frac, 1e-30, 1.0)
        cols.append((jnp.log(bf) - jnp.log1p(-jnp.minimum(bf, 1 - 1e-7)) -
                     prior.bulge_logit_mean) / prior.bulge_logit_width)
        cols.append(((jnp.log(gal1.bulge_hlr / gal1.hlr) - prior.log_bulge_ratio_mean) /
                     prior.log_bulge_ratio_width)[:, None])
    icov = jnp.asarray(prior.colour_icov)
    if icov.ndim:  # a precision matrix of the colours (the scalar default: no colour prior)
        n_band = gal1.flux.shape[-1]
        check_colour_shapes(jnp.shape(prior.colour_mean), icov.shape, n_band)
        log_f = jnp.log(gal1.flux)
        dc = log_f[:, 1:] - log_f[:, :-1] - prior.colour_mean
        # d^T P d = |L^T d|^2 with P = L L^T
        cols.append(dc @ jnp.linalg.cholesky(icov))
    elif jnp.ndim(prior.colour_mean):
        raise ValueError(f"Prior.colour_mean has shape {jnp.shape(prior.colour_mean)} but "
                         f"colour_icov is a scalar (no colour prior); give both or neither.")
    r = jnp.concatenate(cols, axis=1)
    return jnp.where(mask1[:, None], r, 0.0).ravel()


def check_colour_shapes(mean_shape, icov_shape, n_band: int):
    """Raise unless a colour prior's mean is [band - 1] and its precision [band - 1, band - 1]."""
    k = n_band - 1
    if tuple(icov_shape) != (k, k) or tuple(mean_shape) != (k,):
        raise ValueError(f"A colour prior on {n_band} bands needs Prior.colour_mean of shape "
                         f"({k},) and colour_icov of shape ({k}, {k}), got {tuple(mean_shape)} "
                         f"and {tuple(icov_shape)}.")


def check_prior(prior: Prior, n_band: int):
    """Raise on a colour prior that cannot be one (before any fit): a non-zero scalar
    ``colour_icov``, a ``colour_mean`` without a precision matrix, shapes other than [band - 1]
    and [band - 1, band - 1], or a precision matrix that is not symmetric positive definite.
    Traced leaves (a prior being learned) are checked by shape only, where they are used."""
    icov, mean = prior.colour_icov, prior.colour_mean
    if isinstance(icov, jax.core.Tracer) or isinstance(mean, jax.core.Tracer):
        return
    a = np.asarray(icov, float)
    if a.ndim == 0:
        if a != 0:
            raise ValueError(f"Prior.colour_icov is {float(a)!r}: a colour prior needs a "
                             f"[{n_band - 1}, {n_band - 1}] precision matrix (the scalar 0: "
                             f"none).")
        if np.ndim(mean):
            raise ValueError(f"Prior.colour_mean has shape {np.shape(mean)} but colour_icov is "
                             f"0 (no colour prior); give both or neither.")
        return
    check_colour_shapes(np.shape(mean), a.shape, n_band)
    if not (np.all(np.isfinite(a)) and np.allclose(a, a.T) and
            np.all(np.linalg.eigvalsh(0.5 * (a + a.T)) > 0)):
        raise ValueError(f"Prior.colour_icov must be a finite symmetric positive definite "
                         f"matrix, got {a.tolist()}.")


def prior_term(gal1: Galaxies, mask1, prior: Prior):
    """-log of the `Prior` of one blend's galaxies (constants dropped)."""
    r = prior_residuals(gal1, mask1, prior)
    return 0.5 * jnp.sum(r * r)


def neg_log_likelihood(gal: Galaxies, mask, images, psf_k, spec: RenderSpec, sky,
                       prior: Prior | None = None, weight=None, noise: str = "poisson"):
    """Negative log-likelihood (+ prior) of a batch (see `nll_terms` for ``noise``).

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
        model = render_one(g1, m1, pk, spec)
        return nll_terms(model, img, s, w, noise).nll + prior_term(g1, m1, prior)

    pk_axis = 0 if psf_k.ndim == 4 else None
    return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, pk_axis))(gal, mask, images, sky, weight, psf_k)


def psf_images(psf_k, spec: RenderSpec, n_band, dtype, on_pixel: bool = False):
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


def model_images(galaxies: Galaxies, mask, psf_k, spec: RenderSpec):
    """Each fitted galaxy's model [blend, slot, band, S, S] (0 in empty slots)."""
    _, iso = render(to_sources(galaxies, mask, spec), psf_k, spec, isolated=True)
    return iso
