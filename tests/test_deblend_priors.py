"""The deblender's catalog priors, compact start and model comparison by merging."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.table import Table
from deblend_scene import PIXEL, fit_scene

import btkjax
from btkjax import deblend as D
from btkjax.tolerances import (
    DEBLEND_ERRORS_HESSIAN_RTOL,
    DEBLEND_NOISELESS_RTOL,
    F64_SAME_ATOL,
    F64_SAME_RTOL,
    ROUNDED_HALF_UNIT,
)

pytestmark = pytest.mark.float64

SKY = np.array([1200.0, 1800.0])


def _spec(s):
    return fit_scene(s)


def _g(q, beta):
    g = (1 - q) / (1 + q)
    return g * np.cos(2 * beta), g * np.sin(2 * beta)


def test_prior_term_is_the_gaussian_of_its_docstring():
    """-log prior by hand: the size-flux line, the shear's and the index's Gaussians, masked
    slots out."""
    gal = D.Galaxies(x=jnp.zeros(3), y=jnp.zeros(3),
                     flux=jnp.array([[100.0, 300.0], [50.0, 50.0], [1.0, 1.0]]),
                     hlr=jnp.array([0.3, 0.2, 9.0]), g1=jnp.array([0.1, -0.2, 0.9]),
                     g2=jnp.array([0.05, 0.0, 0.9]), n=jnp.ones(3))
    mask = jnp.array([True, True, False])
    gal = gal._replace(n=jnp.array([1.5, 0.8, 4.0]))
    prior = D.Prior(log_hlr_mean=-1.0, log_hlr_width=0.5, log_hlr_slope=0.25,
                    log_flux_ref=5.0, g_width=0.3, n_mean=1.0, n_width=0.5)
    want = 0.0
    for i in range(2):
        f = float(np.sum(np.asarray(gal.flux)[i]))
        mean = -1.0 + 0.25 * (np.log(f) - 5.0)
        want += 0.5 * ((np.log(float(gal.hlr[i])) - mean) / 0.5) ** 2
        want += 0.5 * (float(gal.g1[i]) ** 2 + float(gal.g2[i]) ** 2) / 0.3 ** 2
        want += 0.5 * ((float(gal.n[i]) - 1.0) / 0.5) ** 2
    got = float(D.model.prior_term(gal, mask, prior))
    assert got == pytest.approx(want, rel=F64_SAME_RTOL)
    assert float(D.model.prior_term(gal, mask, D.Prior())) == 0.0  # no prior: nothing


def test_colour_prior_term_is_the_gaussian_of_the_colours():
    """-log prior of the colours by hand, 0.5 d^T P d with d the ln flux ratios of adjacent
    bands minus the mean; the same for any brightness (one SED, scaled); masked slots out."""
    flux = np.array([[100.0, 300.0, 500.0], [50.0, 20.0, 80.0], [1.0, 1.0, 1.0]])
    gal = D.Galaxies(x=jnp.zeros(3), y=jnp.zeros(3), flux=jnp.asarray(flux),
                     hlr=jnp.full(3, 0.3), g1=jnp.zeros(3), g2=jnp.zeros(3), n=jnp.ones(3))
    mask = jnp.array([True, True, False])
    mean = np.array([0.5, 0.2])
    icov = np.array([[4.0, -1.0], [-1.0, 2.0]])
    prior = D.Prior(colour_mean=mean, colour_icov=icov)
    want = 0.0
    for i in range(2):
        d = np.log(flux[i, 1:] / flux[i, :-1]) - mean
        want += 0.5 * d @ icov @ d
    got = float(D.model.prior_term(gal, mask, prior))
    assert got == pytest.approx(want, rel=F64_SAME_RTOL)
    scaled = gal._replace(flux=gal.flux * jnp.array([[7.0], [0.01], [1.0]]))
    assert float(D.model.prior_term(scaled, mask, prior)) == pytest.approx(
        want, rel=F64_SAME_RTOL)
    with pytest.raises(ValueError, match=r"colour_icov of shape \(2, 2\)"):
        D.model.prior_term(gal, mask, prior._replace(colour_icov=np.eye(3)))


def _one_galaxy():
    """(spec, psf_k, truth, mask, noiseless image) of one galaxy of two colours on 24 pixels."""
    spec, psf_k = _spec(24)
    true = D.Galaxies(x=jnp.array([[11.3]]), y=jnp.array([[12.6]]),
                      flux=jnp.array([[[6000.0, 8000.0]]]), hlr=jnp.array([[0.45]]),
                      g1=jnp.array([[0.15]]), g2=jnp.array([[-0.1]]), n=jnp.ones((1, 1)))
    mask = jnp.ones((1, 1), bool)
    return spec, psf_k, true, mask, D.model_images(true, mask, psf_k, spec).sum(axis=1)


def test_fisher_errors_with_a_colour_prior():
    """Expected information with a colour prior: the likelihood's Fisher matrix (jax.hessian at
    the noiseless image) plus the prior's J^T P J, by hand with J = dc/dF (-1/F_1, 1/F_2). A
    prior adds information, so no error grows, also for a galaxy whose colour lies 1.5 from the
    prior's mean, where the Hessian of -log prior has a negative eigenvalue (P (1 - d) / F_2^2
    along F_2 for d > 1)."""
    spec, psf_k, true, mask, image = _one_galaxy()

    def nll(v):
        g = D.Galaxies(x=v[0:1][None], y=v[1:2][None], flux=v[2:4].reshape(1, 1, 2),
                       hlr=v[4:5][None], g1=v[5:6][None], g2=v[6:7][None], n=jnp.ones((1, 1)))
        return D.neg_log_likelihood(g, mask, image, psf_k, spec, SKY)[0]

    v0 = jnp.array([11.3, 12.6, 6000.0, 8000.0, 0.45, 0.15, -0.1])
    fisher = np.asarray(jax.jit(jax.hessian(nll))(v0))  # one compiled program, not op by op

    def flat(e):
        return np.concatenate([np.asarray(a)[0, 0].ravel() for a in
                               (e.x, e.y, e.flux, e.hlr, e.g1, e.g2)])

    e0, ok0 = D.fisher_errors(true, mask, image, psf_k, spec, SKY)
    assert bool(ok0[0])
    icov = np.array([[1 / 0.05**2]])
    jac = np.zeros((1, 7))
    jac[0, 2], jac[0, 3] = -1 / 6000.0, 1 / 8000.0
    for offset in (0.0, 1.5):
        prior = D.Prior(colour_mean=np.array([np.log(8000 / 6000) - offset]), colour_icov=icov)
        want = np.sqrt(np.diag(np.linalg.inv(fisher + jac.T @ icov @ jac)))
        e, ok = D.fisher_errors(true, mask, image, psf_k, spec, SKY, prior=prior)
        assert bool(ok[0])
        np.testing.assert_allclose(flat(e), want, rtol=DEBLEND_ERRORS_HESSIAN_RTOL)
        assert np.all(flat(e) <= flat(e0) * (1 + DEBLEND_ERRORS_HESSIAN_RTOL))
        assert flat(e)[3] < flat(e0)[3]  # the colour adds information on the flux
    with pytest.raises(ValueError, match="symmetric positive definite"):
        D.fisher_errors(true, mask, image, psf_k, spec, SKY,
                        prior=D.Prior(colour_mean=np.zeros(1), colour_icov=-icov))
    with pytest.raises(ValueError, match="colour_icov is 5.0"):
        D.fit_blends(image, (np.full((1, 1), 11.0), np.full((1, 1), 13.0),
                             np.ones((1, 1), bool)), psf_k, spec, SKY,
                     prior=D.Prior(colour_icov=5.0))
    with pytest.raises(ValueError, match="give both or neither"):
        D.fisher_errors(true, mask, image, psf_k, spec, SKY,
                        prior=D.Prior(colour_mean=np.zeros(1)))


def test_fit_with_a_colour_prior_recovers_a_noiseless_galaxy():
    """The jitted fit with a colour prior centred on the galaxy's colour (its gradient 0 at the
    truth) recovers the noiseless galaxy; a prior 1 off its colour pulls the fainter band
    toward it, by less than the prior's width allows."""
    spec, psf_k, true, mask, image = _one_galaxy()
    det = (np.full((1, 1), 11.0), np.full((1, 1), 13.0), np.ones((1, 1), bool))
    colour = np.log(8000 / 6000)
    for offset in (0.0, 1.0):
        prior = D.Prior(colour_mean=np.array([colour - offset]), colour_icov=np.eye(1) / 0.2**2)
        res = D.fit_blends(image, det, psf_k, spec, SKY, rtol=1e-13, prior=prior)
        got = np.asarray(res.galaxies.flux)[0, 0]
        if offset == 0.0:
            np.testing.assert_allclose(got, [6000.0, 8000.0], rtol=DEBLEND_NOISELESS_RTOL)
            assert bool(np.isfinite(np.asarray(res.errors.flux)).all())
        else:
            fitted = np.log(got[1] / got[0])
            assert colour - offset < fitted < colour - 1e-3  # pulled toward the mean


def test_colour_prior_recovers_known_colours():
    """A CatSim-like table of known AB colours: the prior's mean is the flat-spectrum (0 AB
    colour) ln flux ratio of the survey's bands minus 0.4 ln 10 times the mean magnitude
    differences, its covariance (0.4 ln 10)^2 theirs; the catalog's galaxies have a mean
    Mahalanobis distance of (N - 1) / N (band - 1). The fluxes are galcheat's whole electrons:
    each ln F is off the formula by at most half an electron / F."""
    survey = btkjax.survey.get_surveys("LSST")
    bands = list(survey.available_filters)
    rng = np.random.default_rng(5)
    n = 400
    ref = rng.uniform(21.0, 25.0, n)
    mags = ref[:, None] + np.linspace(1.0, -0.5, len(bands)) + rng.normal(
        0, 0.2, (n, len(bands))) * np.arange(len(bands))
    t = Table({f"{b}_ab": mags[:, k] for k, b in enumerate(bands)})
    t["ref_mag"] = ref
    flat = Table({f"{b}_ab": np.full(1, 22.0) for b in bands})
    ln_k = np.log(btkjax.galaxies.band_fluxes(flat, survey)[0])
    dm = np.diff(mags, axis=1)
    k = 0.4 * np.log(10)
    p = D.colour_prior(t, survey, max_mag=26.0)
    fluxes = btkjax.galaxies.band_fluxes(t, survey)
    # rounding: each colour (a difference of two ln F) and its mean are off by <= delta, each
    # centred colour by <= 2 delta, a product of two by <= 4 delta |c| + 4 delta^2
    delta = 2 * ROUNDED_HALF_UNIT / fluxes.min()
    colours = np.diff(ln_k) - k * dm
    np.testing.assert_allclose(p.colour_mean, colours.mean(axis=0), rtol=0, atol=delta)
    bound = 4 * delta * np.abs(colours - colours.mean(axis=0)).max() + 4 * delta**2
    np.testing.assert_allclose(np.linalg.inv(p.colour_icov), np.cov(colours, rowvar=False),
                               rtol=F64_SAME_RTOL, atol=bound * n / (n - 1))
    log_f = np.log(fluxes)
    d = np.diff(log_f, axis=1) - p.colour_mean
    maha = np.einsum("ni,ij,nj->n", d, p.colour_icov, d)
    assert maha.mean() == pytest.approx((n - 1) / n * (len(bands) - 1), rel=F64_SAME_RTOL)
    with pytest.raises(ValueError, match="positive fluxes in every band"):
        D.colour_prior(t, survey, max_mag=15.0)


def test_catalog_prior_recovers_a_known_size_flux_relation():
    """A CatSim-like table built on the line ln hlr = a + b ln F exactly (disks, one colour):
    `catalog_prior` gives back a and b (about its median ln F) with zero width, and the rms
    shear component of the ellipticities put in; bulge-dominated rows use the bulge's size."""
    survey = btkjax.survey.get_surveys("LSST")
    rng = np.random.default_rng(3)
    n = 200
    mag = rng.uniform(21.0, 25.0, n)
    t = Table({f"{b}_ab": mag for b in survey.available_filters})
    t["ref_mag"] = mag
    flux = btkjax.galaxies.band_fluxes(t, survey).sum(axis=1)
    a_true, b_true = -1.3, 0.25
    hlr = np.exp(a_true + b_true * (np.log(flux) - 13.0))
    q = rng.uniform(0.3, 1.0, n)
    bulge = np.arange(n) % 4 == 0
    for comp, on in (("d", ~bulge), ("b", bulge)):
        t[f"a_{comp}"] = np.where(on, hlr / np.sqrt(q), 0.05)
        t[f"b_{comp}"] = np.where(on, hlr * np.sqrt(q), 0.05)
    t["fluxnorm_disk"] = np.where(bulge, 0.2, 1.0)
    t["fluxnorm_bulge"] = np.where(bulge, 0.8, 0.0)
    p = D.catalog_prior(t, survey, max_mag=26.0)
    ref = np.median(np.log(flux))
    assert p.log_flux_ref == pytest.approx(ref, rel=F64_SAME_RTOL)
    assert p.log_hlr_slope == pytest.approx(b_true, rel=F64_SAME_RTOL)
    assert p.log_hlr_mean == pytest.approx(a_true + b_true * (ref - 13.0), rel=F64_SAME_RTOL)
    assert p.log_hlr_width < F64_SAME_ATOL
    g = (1 - q) / (1 + q)
    assert p.g_width == pytest.approx(np.sqrt(np.mean(g * g) / 2), rel=F64_SAME_RTOL)
    with pytest.raises(ValueError, match="at least 10 galaxies"):
        D.catalog_prior(t, survey, max_mag=15.0)


def test_catalog_prior_of_the_default_catalog_matches_its_sizes():
    """On the embedded catalog (LSST, i <= 25.3): faint galaxies are smaller (slope > 0) and
    the prior's median size is the catalog's within its own scatter's standard error."""
    survey = btkjax.survey.get_surveys("LSST")
    cat = btkjax.catalog.CatsimCatalog.default()
    p = D.catalog_prior(cat, survey)
    t = cat.table[np.asarray(cat.table["ref_mag"]) <= 25.3]
    disk = np.asarray(t["fluxnorm_disk"]) >= np.asarray(t["fluxnorm_bulge"])
    a = np.where(disk, t["a_d"], t["a_b"])
    b = np.where(disk, t["b_d"], t["b_b"])
    log_hlr = 0.5 * np.log(a * b)
    assert p.log_hlr_slope > 0
    se = p.log_hlr_width / np.sqrt(len(t))
    assert abs(np.mean(log_hlr) - (p.log_hlr_mean + p.log_hlr_slope * (
        np.mean(np.log(btkjax.galaxies.band_fluxes(t, survey).sum(1))) - p.log_flux_ref))) < 3 * se


def test_compact_start_keeps_the_faint_neighbour_out_of_the_bright_wing():
    """Noiseless: a bright disk (hlr 1.22") and two faint ones 1.3" and 2" away. From the
    moments' start the fit settles with the nearer faint galaxy grown to take part of the
    bright one's wing (measured +49% flux); from the compact start (0.1", the brightest
    keeping its moments' shape) it is off by 14% and -log L is lower (chi2 15 against 142).
    Neither reaches the truth (chi2 0): both are local minima (rtol 1e-13)."""
    spec, psf_k = _spec(48)
    gs = [_g(0.73, 0.3), _g(0.93, 1.0), _g(0.98, 2.0)]
    true = D.Galaxies(x=jnp.array([[18.0, 24.0, 27.0]]), y=jnp.array([[22.0, 24.0, 18.0]]),
                      flux=jnp.array([[[3.0e6, 3.4e6], [7e4, 8.5e4], [1.6e5, 1.9e5]]]),
                      hlr=jnp.array([[1.22, 0.44, 0.45]]),
                      g1=jnp.array([[v[0] for v in gs]]), g2=jnp.array([[v[1] for v in gs]]),
                      n=jnp.ones((1, 3)))
    mask = jnp.ones((1, 3), bool)
    img = D.model_images(true, mask, psf_k, spec).sum(1)
    det = (np.asarray(true.x), np.asarray(true.y), np.ones((1, 3), bool))
    res = {s: D.fit_blends(img, det, psf_k, spec, SKY, errors=False, rtol=1e-13, start_hlr=s)
           for s in (None, 0.1)}
    err = {s: abs(float(r.galaxies.flux[0, 1, 1]) / 8.5e4 - 1) for s, r in res.items()}
    assert err[None] > 0.3 and err[0.1] < 0.2, err
    assert float(res[0.1].loss[0]) < float(res[None].loss[0])
    init = D.init_galaxies(img, true.x, true.y, mask, psf_k, spec, jnp.asarray(SKY),
                           start_hlr=0.1)
    moments = D.init_galaxies(img, true.x, true.y, mask, psf_k, spec, jnp.asarray(SKY))
    # the brightest keeps its moments' shape; the others start round and at most 0.1"
    np.testing.assert_allclose(init.hlr[0, 0], moments.hlr[0, 0])
    np.testing.assert_allclose(init.g1[0, 0], moments.g1[0, 0])
    np.testing.assert_allclose(init.hlr[0, 1:], jnp.minimum(moments.hlr[0, 1:], 0.1))
    assert float(jnp.max(jnp.abs(init.g1[0, 1:]))) == 0.0
    assert float(jnp.max(jnp.abs(init.g2[0, 1:]))) == 0.0


def test_compact_start_does_not_stall_the_brightest():
    """A start far below the PSF (0.1", half a pixel) for every galaxy stalls the fit of a
    bright 1.2" disk at ~0.15" (the model hardly depends on its size there; measured: chi2
    ~7e6); the brightest of the blend keeps its moments' size, and the fit recovers both."""
    spec, psf_k = _spec(64)
    true = D.Galaxies(x=jnp.array([[26.0, 38.6]]), y=jnp.array([[30.0, 33.5]]),
                      flux=jnp.array([[[3.0e6, 3.4e6], [8e4, 8.5e4]]]),
                      hlr=jnp.array([[1.2, 0.44]]), g1=jnp.array([[0.1, 0.02]]),
                      g2=jnp.array([[-0.1, 0.02]]), n=jnp.ones((1, 2)))
    mask = jnp.ones((1, 2), bool)
    img = D.model_images(true, mask, psf_k, spec).sum(1)
    det = (np.asarray(true.x), np.asarray(true.y), np.ones((1, 2), bool))
    res = D.fit_blends(img, det, psf_k, spec, SKY, errors=False, rtol=1e-13, start_hlr=0.1)
    np.testing.assert_allclose(res.galaxies.flux, true.flux, rtol=DEBLEND_NOISELESS_RTOL)
    np.testing.assert_allclose(res.galaxies.hlr, true.hlr, rtol=DEBLEND_NOISELESS_RTOL)


def test_merge_removes_a_spurious_piece_and_keeps_a_real_pair():
    """Blend 0: one galaxy detected twice, 1 pixel apart (an over-split detection): the merge
    keeps one galaxy, with the true flux and position. Blend 1: two galaxies 1.2" apart of
    similar size (1.33 sums of half-light radii, under the default 1.5): a candidate, but
    without it -log L rises by far more than its parameters, and both are kept."""
    spec, psf_k = _spec(32)
    one = D.Galaxies(x=jnp.array([[15.0, 0.0]]), y=jnp.array([[16.0, 0.0]]),
                     flux=jnp.array([[[5e4, 6e4], [1.0, 1.0]]]), hlr=jnp.array([[0.5, 0.3]]),
                     g1=jnp.array([[0.1, 0.0]]), g2=jnp.zeros((1, 2)), n=jnp.ones((1, 2)))
    pair = D.Galaxies(x=jnp.array([[12.0, 18.0]]), y=jnp.array([[16.0, 16.0]]),
                      flux=jnp.array([[[5e4, 6e4], [3e4, 2e4]]]), hlr=jnp.array([[0.45, 0.45]]),
                      g1=jnp.zeros((1, 2)), g2=jnp.zeros((1, 2)), n=jnp.ones((1, 2)))
    images = jnp.concatenate([
        D.model_images(one, jnp.array([[True, False]]), psf_k, spec).sum(axis=1),
        D.model_images(pair, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1)])
    det = (np.array([[14.5, 15.5], [12.0, 18.0]]), np.array([[16.0, 16.0], [16.0, 16.0]]),
           np.ones((2, 2), bool))
    res = D.fit_blends(images, det, psf_k, spec, SKY, errors=False, rtol=1e-13,
                       merge_sources=True)
    mask = np.asarray(res.mask)
    assert mask.tolist() == [[True, False], [True, True]] or \
        mask.tolist() == [[False, True], [True, True]]
    k = int(np.flatnonzero(mask[0])[0])
    np.testing.assert_allclose(np.asarray(res.galaxies.flux)[0, k], [5e4, 6e4],
                               rtol=DEBLEND_NOISELESS_RTOL)
    assert abs(float(res.galaxies.x[0, k]) - 15.0) < DEBLEND_NOISELESS_RTOL
    np.testing.assert_allclose(np.asarray(res.galaxies.flux)[1], np.asarray(pair.flux)[0],
                               rtol=DEBLEND_NOISELESS_RTOL)
    cand = D.merge_candidates(res.galaxies, res.mask, PIXEL)
    assert cand.slot[0] == -1 and cand.slot[1] == 1  # the fainter of the real pair
    assert cand.separation[1] == pytest.approx(6 / 4.5, rel=DEBLEND_NOISELESS_RTOL)


def test_merge_candidates_skip_the_pairs_tried():
    """Three galaxies on a line, 1 and 3 pixels apart, hlr 1 pixel each: the closest pair is
    (0, 1) at 1 / 2 sums of half-light radii, the fainter (1) is proposed with 0 as its
    partner; with that pair excluded the next is (1, 2) at 3 / 2, proposed only under a
    threshold above it."""
    gal = D.Galaxies(x=jnp.array([[10.0, 11.0, 14.0]]), y=jnp.full((1, 3), 10.0),
                     flux=jnp.array([[[5.0], [2.0], [3.0]]]), hlr=jnp.full((1, 3), PIXEL),
                     g1=jnp.zeros((1, 3)), g2=jnp.zeros((1, 3)), n=jnp.ones((1, 3)))
    mask = np.ones((1, 3), bool)
    cand = D.merge_candidates(gal, mask, PIXEL)
    assert (cand.slot[0], cand.partner[0]) == (1, 0)
    assert cand.separation[0] == pytest.approx(0.5, rel=F64_SAME_RTOL)
    tried = np.zeros((1, 3, 3), bool)
    tried[0, 1, 0] = True
    assert D.merge_candidates(gal, mask, PIXEL, exclude=tried).slot[0] == -1  # 1.5 is not < 1.5
    nxt = D.merge_candidates(gal, mask, PIXEL, exclude=tried, max_separation=2.0)
    assert (nxt.slot[0], nxt.partner[0]) == (1, 2)
    assert nxt.separation[0] == pytest.approx(1.5, rel=F64_SAME_RTOL)

def test_move_frees_a_piece_for_the_undetected_neighbour():
    """A bright galaxy detected twice, 1.2 pixels apart, and a faint neighbour 6 pixels away
    not detected at all (noiseless). Merging the piece loses the neighbour's light (-log L
    rises: the two pieces are kept), and a residual detection does not see it (the piece holds
    part of it), so without `move_sources` the neighbour's flux is wrong; with it the piece is
    moved to the merged fit's residual peak and both galaxies come back exactly."""
    spec, psf_k = _spec(40)
    truth = D.Galaxies(x=jnp.array([[18.0, 24.0]]), y=jnp.array([[20.0, 19.0]]),
                       flux=jnp.array([[[2e5, 2.4e5], [1.5e4, 2e4]]]),
                       hlr=jnp.array([[0.5, 0.3]]), g1=jnp.array([[0.1, 0.0]]),
                       g2=jnp.zeros((1, 2)), n=jnp.ones((1, 2)))
    images = D.model_images(truth, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1)
    det = (np.array([[17.4, 18.6, 0.0]]), np.array([[20.0, 20.0, 0.0]]),
           np.array([[True, True, False]]))
    kw = dict(errors=False, rtol=1e-13, merge_sources=True)
    stuck = D.fit_blends(images, det, psf_k, spec, SKY, **kw)
    res = D.fit_blends(images, det, psf_k, spec, SKY, move_sources=True, **kw)
    assert np.asarray(stuck.mask).sum() == 2 and np.asarray(res.mask).sum() == 2
    gal, mask = res.galaxies, np.asarray(res.mask)[0]
    slots = np.flatnonzero(mask)
    x = np.asarray(gal.x)[0, slots]
    near_b = slots[np.argmax(x)]
    assert abs(float(gal.x[0, near_b]) - 24.0) < DEBLEND_NOISELESS_RTOL
    assert abs(float(gal.y[0, near_b]) - 19.0) < DEBLEND_NOISELESS_RTOL
    np.testing.assert_allclose(np.asarray(gal.flux)[0, near_b], [1.5e4, 2e4],
                               rtol=DEBLEND_NOISELESS_RTOL)
    np.testing.assert_allclose(np.asarray(gal.flux)[0, slots[np.argmin(x)]], [2e5, 2.4e5],
                               rtol=DEBLEND_NOISELESS_RTOL)
    # without the move the galaxy nearest the neighbour holds the wrong flux
    sg, sm = stuck.galaxies, np.flatnonzero(np.asarray(stuck.mask)[0])
    far = sm[np.argmax(np.asarray(sg.x)[0, sm])]
    assert abs(float(sg.flux[0, far, 0]) / 1.5e4 - 1) > 10 * DEBLEND_NOISELESS_RTOL


@pytest.mark.parametrize("kwargs, match", [
    ({"split_rounds": 0, "split_sources": True}, "split_rounds"),
    ({"merge_rounds": 1.5, "merge_sources": True}, "merge_rounds"),
    ({"add_sources": -1}, "add_sources must be"),
    ({"residual_rounds": True}, "residual_rounds"),
    ({"add_sources": 1, "per_blend_psf": True}, "add_sources needs one PSF"),
    ({"split_sources": True, "per_blend_psf": True}, "split_sources needs one PSF"),
    ({"merge_sources": True, "move_sources": True, "per_blend_psf": True},
     "move_sources needs one PSF"),
    ({"asymmetry_sources": -2}, "asymmetry_sources must be"),
    ({"asymmetry_sources": 1, "per_blend_psf": True}, "asymmetry_sources needs one PSF"),
    ({"ring_sources": 2.5}, "ring_sources must be"),
    ({"ring_sources": 6, "per_blend_psf": True}, "ring_sources needs one PSF"),
    ({"ring_radius": 0.0}, "ring_radius must be"),
    ({"ring_radius": float("inf")}, "ring_radius must be"),
    ({"concentric_sources": -1}, "concentric_sources must be"),
    ({"concentric_sources": 1, "per_blend_psf": True}, "concentric_sources needs one PSF"),
])
def test_rounds_are_validated(kwargs, match):
    """Bad counts and options that need one PSF for the batch fail before any fit."""
    spec, psf_k = _spec(16)
    if kwargs.pop("per_blend_psf", False):
        psf_k = psf_k[None]
    with pytest.raises(ValueError, match=match):
        D.fit_blends(jnp.zeros((1, 2, 16, 16)), (np.full((1, 1), 8.0), np.full((1, 1), 8.0),
                                                 np.ones((1, 1), bool)),
                     psf_k, spec, SKY, errors=False, **kwargs)


def test_forward_model_measure_priors():
    """"auto": the index prior for Sersic fits only; "catalog": the catalog's size and shear
    terms, plus the index prior for Sersic fits; a Prior as given; anything else an error."""
    survey = btkjax.survey.get_surveys("LSST")
    idx = D.SERSIC_INDEX_PRIOR
    assert D.ForwardModelMeasure().resolve_prior(survey) == D.Prior(n_mean=idx.n_mean,
                                                                   n_width=idx.n_width)
    assert D.ForwardModelMeasure(model="exponential").resolve_prior(survey) is None
    assert D.ForwardModelMeasure(prior=None).resolve_prior(survey) is None
    cat = D.catalog_prior(btkjax.catalog.CatsimCatalog.default(), survey)
    got = D.ForwardModelMeasure(prior="catalog").resolve_prior(survey)
    assert got == cat._replace(n_mean=idx.n_mean, n_width=idx.n_width)
    assert D.ForwardModelMeasure(prior="catalog", model="exponential").resolve_prior(
        survey) == cat
    mine = D.Prior(g_width=0.2)
    assert D.ForwardModelMeasure(prior=mine).resolve_prior(survey) is mine
    # colour_width: the embedded catalog's colours, widened, on top of whichever prior
    colours = D.colour_prior(btkjax.catalog.CatsimCatalog.default(), survey)
    for fm, base, w in ((D.ForwardModelMeasure(colour_width=1.0),
                         D.Prior(n_mean=idx.n_mean, n_width=idx.n_width), 1.0),
                        (D.ForwardModelMeasure(prior=mine, colour_width=2.0), mine, 2.0)):
        got = fm.resolve_prior(survey)
        np.testing.assert_array_equal(got.colour_mean, colours.colour_mean)
        np.testing.assert_allclose(got.colour_icov, colours.colour_icov / w**2,
                                   rtol=F64_SAME_RTOL)
        assert got._replace(colour_mean=0.0, colour_icov=0.0) == base
    assert colours.colour_icov.shape == (5, 5)
    for bad in (0.0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="colour_width must be"):
            D.ForwardModelMeasure(colour_width=bad)
    with pytest.raises(ValueError, match="has colour terms already"):
        D.ForwardModelMeasure(prior=colours, colour_width=1.0).resolve_prior(survey)
    with pytest.raises(ValueError, match="prior must be"):
        D.ForwardModelMeasure(prior="flat")
