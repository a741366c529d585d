"""The optimizer loop: jitted while-loops per blend (`fit`), and a fixed number of steps in
a ``lax.scan`` (`fit_unrolled`, reverse-mode differentiable)."""

from __future__ import annotations

from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from btkjax.core.render import RenderSpec
from btkjax.deblend.chunks import apply_chunked, check_chunk, map_blends, pad_mask
from btkjax.deblend.model import (
    STATUS_MAX_STEPS,
    STATUS_NONFINITE,
    TRACES,
    Galaxies,
    Params,
    Prior,
    check_prior,
    check_spec,
    nll_terms,
    prior_term,
    render_one,
    spec_model,
    to_physical,
    to_unconstrained,
)

__all__ = ["FitOutput", "fit", "fit_unrolled", "batch_inputs", "to_unconstrained_batch",
           "to_physical_batch", "FIT_RTOL_F32"]


class FitOutput(NamedTuple):
    """What `fit` returns, per blend.

    Attributes:
        params: fitted unconstrained `Params` [blend, slot, ...].
        status: [blend] int, `STATUS_*` bit flags.
        n_steps: [blend] optimizer steps taken.
        loss: [blend] final negative log-likelihood (+ prior).
        chi2: [blend] final Pearson chi2.
    """

    params: Params
    status: jax.Array
    n_steps: jax.Array
    loss: jax.Array
    chi2: jax.Array


# float32 fits stop when -log L changes by less than 2 float32 eps of itself, 5 steps in a row:
# the rounding level of a loss that is now exact to a few eps (`nll_terms`). 1e-5 until session
# 10 stopped faint galaxies' fits while their sizes and fluxes still moved (a restart from half
# or twice the fitted size ended up to 5 units of -log L apart; with 2e-7, within 0.5): on the 400
# tuning blends of benchmarks/bench_deblend.py blendedness > 0.5 median |dflux/flux| 0.151 ->
# 0.133, all galaxies 0.0405 -> 0.0380 (session 6's rule chose it), for 1.2 -> 2.0 CPU s per blend.
FIT_RTOL_F32 = 2e-7


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
        m = render_one(gal, mask, psf_k, spec)
        return nll_terms(m, image, sky, weight, noise).nll + prior_term(gal, mask, prior)
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
    nll, chi2 = nll_terms(render_one(gal, mask, psf_k, spec), image, sky, weight, noise)
    return FitOutput(st.params, status, st.n_steps, nll + prior_term(gal, mask, prior), chi2)


@partial(jax.jit, static_argnames=("spec", "model", "optimizer", "max_steps", "patience",
                                   "max_offset", "noise"))
def _fit_jit(params, ax, ay, mask, images, sky, weight, psf_k, prior, rtol, atol, *, spec,
             model, optimizer, max_steps, patience, max_offset, noise):
    """`_fit_one` over a chunk of blends: called directly for a chunk of one, vmapped else."""
    TRACES["fit"] += 1
    one = partial(_fit_one, prior=prior, rtol=rtol, atol=atol, spec=spec, model=model,
                  optimizer=optimizer, max_steps=max_steps, patience=patience,
                  max_offset=max_offset, noise=noise)
    return map_blends(one, 7, params, ax, ay, mask, images, sky, weight, psf_k)




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
        model: the model (default the spec's, `spec_model`).
        optimizer: "lbfgs" (default: optax.lbfgs with a backtracking line search; converges
            in ~30-80 steps to the optimum), "adam" (Adam with an exponential decay from
            ``learning_rate`` to ``learning_rate * final_ratio`` over ``max_steps``: cheaper
            steps, slower and noisier convergence), or any optax transformation (keep the same
            object between calls, or each new one recompiles).
        max_steps: most steps per blend.
        rtol, atol: a blend stops when ``|loss_prev - loss| <= rtol |loss| + atol`` holds
            ``patience`` steps in a row. ``rtol`` default: 1e-7 in float64, 2e-7 in float32
            (`FIT_RTOL_F32`).
        max_offset: largest shift (pixels) from the anchors.
        prior: optional `Prior`.
        weight: optional [blend, band, S, S] pixel weights.
        noise: "poisson" (default: the Poisson deviance, variance = sky + model) or "chi2"
            (variance = sky + data); see `nll_terms`.
        chunk: blends per compiled call (`default_chunk`: 1 on CPU); the batch is cut into
            chunks (the last one padded), so any number of blends runs on one compiled program.

    Returns:
        `FitOutput` (params, status, n_steps, loss, chi2; each [blend]).
    """
    check_spec(spec)
    if noise not in ("poisson", "chi2"):
        raise ValueError(f"noise must be 'poisson' or 'chi2', got {noise!r}.")
    model = spec_model(spec) if model is None else model
    images = jnp.asarray(images)
    dtype = images.dtype
    if rtol is None:
        rtol = 1e-7 if dtype == jnp.float64 else FIT_RTOL_F32
    opt = _optimizer(optimizer, learning_rate, max_steps, final_ratio)
    # Non-finite pixels are NOT masked here: a blend with them diverges and says so (status).
    sky, weight, prior, psf_k, chunk, mask, per_blend, shared = batch_inputs(
        images, sky, weight, prior, psf_k, chunk, mask)
    n = images.shape[0]
    batched = (params, jnp.asarray(anchor_x, dtype), jnp.asarray(anchor_y, dtype), mask, images,
               sky, weight) + per_blend

    def run(p, ax, ay, m, img, s, w, pk):
        return _fit_jit(p, ax, ay, m, img, s, w, pk, prior, jnp.asarray(rtol, dtype),
                        jnp.asarray(atol, dtype), spec=spec, model=model, optimizer=opt,
                        max_steps=int(max_steps), patience=int(patience),
                        max_offset=float(max_offset), noise=noise)

    return FitOutput(*apply_chunked(run, n, chunk, batched, shared))


_to_unconstrained_jit = jax.jit(to_unconstrained, static_argnames=("model", "max_offset"))
_to_physical_jit = jax.jit(to_physical, static_argnames=("model", "max_offset"))


def _convert(fn, tree, ax, ay, chunk, model, max_offset):
    """`to_unconstrained` / `to_physical` chunk by chunk: compiled once per chunk shape (eager
    on the whole batch, each of their operations would compile for every batch size)."""
    return apply_chunked(partial(fn, model=model, max_offset=max_offset), ax.shape[0], chunk,
                         (tree, ax, ay))


def to_unconstrained_batch(gal: Galaxies, ax, ay, chunk, model, max_offset) -> Params:
    """`to_unconstrained` of a batch, ``chunk`` blends per compiled call."""
    return _convert(_to_unconstrained_jit, gal, ax, ay, chunk, model, max_offset)


def to_physical_batch(params: Params, ax, ay, chunk, model, max_offset) -> Galaxies:
    """`to_physical` of a batch, ``chunk`` blends per compiled call."""
    return _convert(_to_physical_jit, params, ax, ay, chunk, model, max_offset)


def batch_inputs(images, sky, weight, prior, psf_k, chunk, mask):
    """The per-batch inputs of `fit` and `fisher_errors` in the images' dtype: (sky [blend,
    band], weight, prior, psf_k, chunk, padded mask, per-blend PSF args, shared PSF args)."""
    dtype = images.dtype
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    weight = jnp.ones_like(images) if weight is None else jnp.asarray(weight, dtype)
    prior = Prior() if prior is None else prior
    check_prior(prior, images.shape[1])
    prior = prior.astype(dtype)
    psf_k = jnp.asarray(psf_k)
    chunk = check_chunk(chunk)
    mask = pad_mask(jnp.asarray(mask, bool), chunk)
    per_blend = (psf_k,) if psf_k.ndim == 4 else ()
    shared = () if psf_k.ndim == 4 else (psf_k,)
    return sky, weight, prior, psf_k, chunk, mask, per_blend, shared




@partial(jax.jit, static_argnames=("spec", "model", "optimizer", "n_steps", "max_offset",
                                   "noise"))
def _unrolled_jit(params, ax, ay, mask, images, sky, psf_k, prior, *, spec, model, optimizer,
                  n_steps, max_offset, noise):
    TRACES["unrolled"] += 1
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
    check_spec(spec)
    model = spec_model(spec)
    dtype = images.dtype
    opt = _optimizer(optimizer, learning_rate, n_steps, final_ratio)
    if isinstance(optimizer, str) and optimizer == "lbfgs":
        raise ValueError("fit_unrolled cannot differentiate L-BFGS's line search; use 'adam'.")
    prior = Prior() if prior is None else prior
    check_prior(prior, images.shape[1])
    params = to_unconstrained(init, anchor_x, anchor_y, model, max_offset)
    sky = jnp.broadcast_to(jnp.asarray(sky, dtype), images.shape[:2])
    return _unrolled_jit(params, anchor_x, anchor_y, mask, images, sky, psf_k,
                         prior.astype(dtype),
                         spec=spec, model=model, optimizer=opt, n_steps=int(n_steps),
                         max_offset=float(max_offset), noise=noise)
