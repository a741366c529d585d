"""Forward-model deblender: recovery, Cramer-Rao pulls, bad inputs, traces, learning, BTK glue."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from btkjax import deblend as D
from btkjax.noise import add_noise
from btkjax.render import psf_kimage_from_galsim
from btkjax.tolerances import (
    DEBLEND_NOISELESS_RTOL,
    DEBLEND_PULL_MEAN_ATOL,
    DEBLEND_PULL_WIDTH_RTOL,
    GRAD_RTOL_F64,
)

S = 24
PIXEL = 0.2
SKY = np.array([400.0, 600.0])


@pytest.fixture(scope="module")
def setup():
    psfs = [galsim.Kolmogorov(fwhm=0.7), galsim.Kolmogorov(fwhm=0.8)]
    spec = D.fit_spec(S, PIXEL, psfs, "exponential")
    psf_k = jnp.asarray(np.stack([psf_kimage_from_galsim(p, spec) for p in psfs]))
    return spec, psf_k


def _pair(scale=1.0):
    """A 2-galaxy blend (truth), fluxes times `scale`."""
    return D.Galaxies(
        x=jnp.array([[9.7, 14.1]]), y=jnp.array([[11.4, 13.3]]),
        flux=scale * jnp.array([[[6000.0, 9000.0], [4000.0, 3000.0]]]),
        hlr=jnp.array([[0.5, 0.35]]), g1=jnp.array([[0.2, -0.1]]),
        g2=jnp.array([[-0.05, 0.3]]), n=jnp.ones((1, 2)),
    )


def _rel_errors(fit, true):
    out = {}
    for f in ("flux", "hlr"):
        a, b = np.asarray(getattr(fit, f)), np.asarray(getattr(true, f))
        out[f] = np.max(np.abs(a - b) / np.abs(b))
    for f in ("x", "y", "g1", "g2"):  # positions in pixels, shears absolute
        out[f] = np.max(np.abs(np.asarray(getattr(fit, f)) - np.asarray(getattr(true, f))))
    return out


def _perturbed(true, rel=0.08, shift=0.4):
    """Truth with every parameter moved: fluxes and sizes by `rel`, positions by `shift` pixels,
    shears by `rel` (absolute)."""
    signs = np.array([[1.0, -1.0]])
    return true._replace(
        x=true.x + shift * signs, y=true.y - shift * signs,
        flux=true.flux * (1 + rel * signs[..., None]), hlr=true.hlr * (1 - rel * signs),
        g1=true.g1 + rel * signs, g2=true.g2 - rel * signs,
    )


def test_noiseless_recovery(setup):
    spec, psf_k = setup
    true = _pair()
    mask = jnp.ones((1, 2), bool)
    image = D.model_images(true, mask, psf_k, spec).sum(axis=1)
    init = _perturbed(true)
    # detections (anchors): the true centers rounded to whole pixels, as SEP would give
    x0, y0 = np.round(np.asarray(true.x)), np.round(np.asarray(true.y))
    res = D.fit_blends(image, (x0, y0, np.ones((1, 2), bool)), psf_k, spec, SKY, init=init,
                       rtol=1e-13)
    init_err = _rel_errors(res.init, true)
    err = _rel_errors(res.galaxies, true)
    assert min(init_err.values()) > 0.05  # every parameter had to move
    assert max(err.values()) < DEBLEND_NOISELESS_RTOL, err
    assert float(res.chi2[0]) < 1e-6


def test_pulls_match_cramer_rao(setup):
    """120 Poisson realizations of an isolated galaxy in one vmapped fit: pulls ~ N(0, 1)."""
    spec, psf_k = setup
    true = D.Galaxies(x=jnp.array([[11.3]]), y=jnp.array([[12.6]]),
                      flux=jnp.array([[[6000.0, 8000.0]]]), hlr=jnp.array([[0.45]]),
                      g1=jnp.array([[0.15]]), g2=jnp.array([[-0.1]]), n=jnp.ones((1, 1)))
    mask = jnp.ones((1, 1), bool)
    image = D.model_images(true, mask, psf_k, spec).sum(axis=1)
    n_real = 120
    noisy = add_noise(jax.random.key(11), jnp.arange(n_real),
                      jnp.broadcast_to(image, (n_real,) + image.shape[1:]), jnp.asarray(SKY),
                      "all")

    def unpack(v):
        return D.Galaxies(x=v[0:1][None], y=v[1:2][None], flux=v[2:4].reshape(1, 1, 2),
                          hlr=v[4:5][None], g1=v[5:6][None], g2=v[6:7][None],
                          n=jnp.ones((1, 1)))

    def nll(v, data):
        return D.neg_log_likelihood(unpack(v), mask, data[None], psf_k, spec, SKY)[0]

    v0 = jnp.concatenate([true.x[0], true.y[0], true.flux[0].ravel(), true.hlr[0],
                          true.g1[0], true.g2[0]])
    fisher = np.asarray(jax.hessian(nll)(v0, image[0]))  # at the noiseless image: E[Hessian]
    crb = np.linalg.inv(fisher)
    sigma = np.sqrt(np.diag(crb))
    # The linearized estimator -F^-1 grad(nll)(truth) has mean 0 and variance the CRB; as a
    # control variate it measures the fit's bias with a standard error far below 0.1.
    scores = np.asarray(jax.vmap(jax.grad(nll), in_axes=(None, 0))(v0, noisy))
    lin = -scores @ crb.T / sigma

    x0 = np.full((n_real, 1), np.round(float(true.x[0, 0])))
    y0 = np.full((n_real, 1), np.round(float(true.y[0, 0])))
    res = D.fit_blends(noisy, (x0, y0, np.ones((n_real, 1), bool)), psf_k, spec, SKY)
    assert np.mean(np.asarray(res.status) == D.STATUS_CONVERGED) > 0.95
    g = res.galaxies
    est = np.concatenate([g.x, g.y, np.asarray(g.flux).reshape(n_real, 2), g.hlr, g.g1, g.g2],
                         axis=1)
    pull = (est - np.asarray(v0)) / sigma
    flux_and_shape = np.array([2, 3, 5, 6])
    bias = (pull - lin).mean(axis=0)[flux_and_shape]
    width = pull.std(axis=0)[flux_and_shape]
    print("pull bias", bias, "width", width, "raw mean", pull.mean(axis=0)[flux_and_shape])
    assert np.all(np.abs(bias) < DEBLEND_PULL_MEAN_ATOL), bias
    assert np.all(np.abs(width - 1) < DEBLEND_PULL_WIDTH_RTOL), width
    # the raw pull means, whose own standard error is 1 / sqrt(120) = 0.09
    raw = pull.mean(axis=0)[flux_and_shape]
    assert np.all(np.abs(raw) < DEBLEND_PULL_MEAN_ATOL + 3 / np.sqrt(n_real)), raw


def test_bad_inputs_give_statuses_not_crashes(setup):
    spec, psf_k = setup
    true = _pair()
    image = np.asarray(D.model_images(true, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1))
    images = np.repeat(image, 4, axis=0)
    images[3, 0, 5, 5] = np.nan  # a divergent fit
    x0, y0 = np.round(np.asarray(true.x)[0]), np.round(np.asarray(true.y)[0])
    detections = [
        np.stack([x0, y0], -1),  # good
        np.zeros((0, 2)),  # no detections
        np.array([[x0[0], y0[0]], [-30.0, 4.0]]),  # one detection outside the stamp
        np.stack([x0, y0], -1),  # NaN pixel
    ]
    res = D.fit_blends(jnp.asarray(images), detections, psf_k, spec, SKY)
    status = np.asarray(res.status)
    assert status[0] & ~D.STATUS_MAX_STEPS == 0
    assert status[1] & ~D.STATUS_NO_DETECTIONS == 0
    assert status[1] & D.STATUS_NO_DETECTIONS
    assert status[2] & D.STATUS_OUTSIDE_STAMP
    assert status[3] & D.STATUS_NONFINITE
    assert np.asarray(res.mask).tolist() == [[True, True], [False, False], [True, False],
                                             [True, True]]
    # the good blend's fit is the one it gets alone: its neighbours in the batch do not matter
    alone = D.fit_blends(jnp.asarray(images[:1]), detections[:1], psf_k, spec, SKY)
    for a, b in zip(res.galaxies, alone.galaxies, strict=True):
        # vmapped vs single-blend XLA reductions differ in summation order only
        np.testing.assert_allclose(np.asarray(a)[:1], np.asarray(b), rtol=1e-6, atol=1e-9)
    assert int(res.n_steps[0]) == int(alone.n_steps[0]) > 0
    # every returned number is finite, even for the diverged blend (its initial values)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in res.galaxies)
    assert int(res.n_steps[3]) == 0


def test_second_batch_does_not_recompile(setup):
    spec, psf_k = setup
    true = _pair()
    rng = np.random.default_rng(0)
    image = np.asarray(D.model_images(true, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1))
    det = (np.round(np.asarray(true.x)).repeat(4, 0), np.round(np.asarray(true.y)).repeat(4, 0),
           np.ones((4, 2), bool))

    def batch():
        return jnp.asarray(image.repeat(4, 0) + rng.normal(0, 20, (4,) + image.shape[1:]))

    D.fit_blends(batch(), det, psf_k, spec, SKY)
    before = (D.trace_count("fit"), D.trace_count("init"))
    res = D.fit_blends(batch(), det, psf_k, spec, SKY)
    assert (D.trace_count("fit"), D.trace_count("init")) == before
    assert np.all(np.asarray(res.n_steps) > 0)


def test_learn_hlr_prior_through_unrolled_fit(setup):
    """The module docstring's example: train a prior's mean by differentiating the fit."""
    spec, psf_k = setup
    true = D.Galaxies(x=jnp.array([[11.3]]), y=jnp.array([[12.6]]),
                      flux=jnp.array([[[3000.0, 4000.0]]]), hlr=jnp.array([[0.5]]),
                      g1=jnp.array([[0.1]]), g2=jnp.array([[0.05]]), n=jnp.ones((1, 1)))
    mask = jnp.ones((1, 1), bool)
    images = D.model_images(true, mask, psf_k, spec).sum(axis=1)
    init = true._replace(hlr=jnp.array([[0.3]]))

    def metric(log_hlr_mean):
        prior = D.Prior(log_hlr_mean=log_hlr_mean, log_hlr_width=0.1)
        gal, _ = D.fit_unrolled(init, true.x, true.y, mask, images, psf_k, spec, SKY,
                                n_steps=25, prior=prior)
        return jnp.mean((jnp.log(gal.hlr) - jnp.log(true.hlr)) ** 2)

    theta = jnp.log(0.2)
    value, grad = jax.value_and_grad(metric)(theta)
    h = 1e-5
    fd = (metric(theta + h) - metric(theta - h)) / (2 * h)
    assert grad < 0  # a larger prior mean reduces the error
    np.testing.assert_allclose(grad, fd, rtol=GRAD_RTOL_F64 * 10)
    opt = optax.adam(0.1)
    state = opt.init(theta)
    for _ in range(10):
        g = jax.grad(metric)(theta)
        updates, state = opt.update(g, state)
        theta = optax.apply_updates(theta, updates)
    assert metric(theta) < 0.1 * value
    assert abs(float(theta) - np.log(0.5)) < abs(np.log(0.2) - np.log(0.5)) / 3


def test_forward_model_measure_in_btk_pipeline():
    import btkjax
    from btkjax.measure import MeasureGenerator, sep_singleband_measure
    from btkjax.metrics import MetricsGenerator

    catalog = btkjax.catalog.CatsimCatalog.default()
    sampler = btkjax.sampling_functions.DefaultSampling(max_number=3, min_number=2,
                                                        stamp_size=6.0, max_shift=1.0, seed=3)
    survey = btkjax.survey.get_surveys("LSST")
    draw = btkjax.draw_blends.CatsimGenerator(catalog, sampler, survey, batch_size=3,
                                              stamp_size=6.0, add_noise="all", seed=5)
    fm = D.ForwardModelMeasure(max_sources=4, max_steps=60, deblended="split")
    meas = MeasureGenerator([sep_singleband_measure, fm], draw)
    metrics = MetricsGenerator(meas, meas_band_name="r")
    blend_results, meas_results, results = next(metrics)
    assert fm.n_fits == 1  # one batched fit served the three blends
    n_sep = [len(c) for c in meas_results["catalog"]["sep_singleband_measure"]]
    n_fm = [len(c) for c in meas_results["catalog"]["forward_model"]]
    assert n_fm == [min(n, 4) for n in n_sep]  # same detections (SEP's)
    cat = meas_results["catalog"]["forward_model"][0]
    for col in ("ra", "dec", "x_peak", "y_peak", "r_flux", "hlr", "e1", "e2", "status"):
        assert col in cat.colnames
    # the data-weighted split conserves the flux of the blend where the models have support
    img = blend_results["blend_images"][0]
    deb = meas_results["deblended_images"]["forward_model"][0]
    if len(deb):
        support = deb.sum(axis=0) != 0
        np.testing.assert_allclose(deb.sum(axis=0)[support], img[support], rtol=1e-4, atol=1e-2)
    summary = results["galaxy_summary"]["forward_model"]
    assert np.any(summary["detected"])
    assert np.all(np.isfinite(np.asarray(summary["mse"])[np.asarray(summary["detected"])]))
