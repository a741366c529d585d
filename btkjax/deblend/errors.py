"""Fisher (Cramer-Rao) errors of the fitted parameters (`fisher_errors`)."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from btkjax.core.render import RenderSpec
from btkjax.deblend.chunks import apply_chunked, map_blends
from btkjax.deblend.fit import batch_inputs
from btkjax.deblend.model import (
    TRACES,
    Galaxies,
    Prior,
    check_spec,
    nll_terms,
    prior_residuals,
    prior_term,
    render_one,
    spec_model,
)

__all__ = ["FisherErrors", "fisher_errors"]


class FisherErrors(NamedTuple):
    """What `fisher_errors` returns.

    Attributes:
        errors: `Galaxies` of 1-sigma errors (NaN where not fitted or not positive definite).
        ok: [blend] bool, False where the Hessian is not positive definite or not finite.
    """

    errors: Galaxies
    ok: jax.Array


def _pack(gal1: Galaxies):
    """One blend's `Galaxies` -> [slot, 6 + band (+ band + 1)]: x, y, flux per band, hlr, g1,
    g2, (the bulge fraction per band and the bulge's hlr, for "bulge+disk"), n (last: fitted
    only by "sersic")."""
    cols = [gal1.x[:, None], gal1.y[:, None], gal1.flux, gal1.hlr[:, None], gal1.g1[:, None],
            gal1.g2[:, None]]
    if gal1.bulge_frac is not None:
        cols += [gal1.bulge_frac, gal1.bulge_hlr[:, None]]
    return jnp.concatenate(cols + [gal1.n[:, None]], axis=1)


def _unpack(v, n_band, bulge: bool = False) -> Galaxies:
    k = 5 + n_band
    return Galaxies(x=v[:, 0], y=v[:, 1], flux=v[:, 2:2 + n_band], hlr=v[:, 2 + n_band],
                    g1=v[:, 3 + n_band], g2=v[:, 4 + n_band], n=v[:, -1],
                    bulge_frac=v[:, k:k + n_band] if bulge else None,
                    bulge_hlr=v[:, k + n_band] if bulge else None)


def _errors_one(gal1: Galaxies, mask1, image, sky, weight, psf_k, prior, *, spec, noise,
                information):
    """1-sigma errors of one blend's parameters from the inverse Hessian of its negative
    log-likelihood (+ prior) at ``gal1``; (errors as `Galaxies`, ok)."""
    n_slot, n_band = gal1.flux.shape
    dtype = gal1.hlr.dtype
    bulge = gal1.bulge_frac is not None
    width = 6 + n_band + (n_band + 1 if bulge else 0)
    n_free = width if spec_model(spec) == "sersic" else width - 1  # n last: fitted or not
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

    def prior_res(v):
        return prior_residuals(_unpack(v, n_band, bulge), mask1, prior)

    size = n_slot * n_free
    if information == "expected":
        # The Hessian of -log L (+ prior) on the fitted model's own noiseless image, i.e. the
        # Fisher matrix at gal1: J^T diag(weight / variance) J + the prior's, with
        # J = d(model) / d(parameters) and the variance of `nll_terms` at data = model (the
        # Poisson rate sky + model; sky + max(model, 0) for noise="chi2"). Forward mode only:
        # cheaper than forward over reverse, and the same matrix.
        def model(v):
            return render_one(_unpack(v, n_band, bulge), mask1, psf_k, spec)

        m0 = model(v0)
        s3 = sky[:, None, None]
        var = (jnp.maximum(m0 + s3, 1e-3 * s3) if noise == "poisson"
               else s3 + jnp.maximum(m0, 0.0))
        jac = slot_columns(model).reshape((size,) + m0.shape)  # [slot * free, band, S, S]
        hess = jnp.einsum("pbyx,qbyx->pq", jac, jac * (weight / var)[None])
        # the prior's Fisher information J^T J of its whitened residuals (`prior_residuals`):
        # the expected Hessian of a Gaussian prior, positive semi-definite where the Hessian of
        # -log prior need not be (a Gaussian on ln F is not convex in F)
        jac_p = jax.jacfwd(prior_res)(v0)[:, :, :n_free].reshape(-1, size)
        hess = hess + jac_p.T @ jac_p
    else:
        # The Hessian of -log L (+ prior) on the data: forward over reverse, as jax.hessian.
        def nll(v):
            g = _unpack(v, n_band, bulge)
            m = render_one(g, mask1, psf_k, spec)
            return nll_terms(m, image, sky, weight, noise).nll + prior_term(g, mask1, prior)

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
    return _unpack(err, n_band, bulge), ok


@partial(jax.jit, static_argnames=("spec", "noise", "information"))
def _errors_jit(galaxies, mask, images, sky, weight, psf_k, prior, *, spec, noise, information):
    TRACES["errors"] += 1
    one = partial(_errors_one, prior=prior, spec=spec, noise=noise, information=information)
    return map_blends(one, 5, galaxies, mask, images, sky, weight, psf_k)


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
    the fitted parameters), and the prior's part is its Fisher information ``J^T J`` of the
    whitened residuals (`prior_residuals`; the Hessian of -log prior itself can be indefinite,
    e.g. a Gaussian on colours, i.e. on ln F): positive definite by construction, also in
    float32 and where the model does not describe the data well. ``"observed"``: the
    likelihood of the data (the observed information; it can be indefinite away from a
    well-fitting minimum).

    Args:
        galaxies: fitted `Galaxies` [blend, slot, ...].
        mask, images, psf_k, spec, sky, prior, weight, noise: as `neg_log_likelihood`.
        information: "expected" or "observed".
        chunk: blends per compiled call (`default_chunk`; with one blend per call, absent
            slots cost nothing).

    Returns:
        `FisherErrors`: errors (`Galaxies` with the fields' shapes, NaN where not fitted) and
        ok ([blend] bool: False where the Hessian is not positive definite or not finite, whose
        errors are NaN).
    """
    check_spec(spec)
    if information not in ("expected", "observed"):
        raise ValueError(f"information must be 'expected' or 'observed', got {information!r}.")
    if noise not in ("poisson", "chi2"):
        raise ValueError(f"noise must be 'poisson' or 'chi2', got {noise!r}.")
    images = jnp.asarray(images)
    dtype = images.dtype
    sky, weight, prior, psf_k, chunk, mask, per_blend, shared = batch_inputs(
        images, sky, weight, prior, psf_k, chunk, mask)
    n = images.shape[0]
    galaxies = jax.tree.map(lambda a: jnp.asarray(a, dtype), galaxies)
    batched = (galaxies, mask, images, sky, weight) + per_blend

    def run(g, m, img, s, w, pk):
        return _errors_jit(g, m, img, s, w, pk, prior, spec=spec, noise=noise,
                           information=information)

    return FisherErrors(*apply_chunked(run, n, chunk, batched, shared))
