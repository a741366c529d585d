"""The deblender's bulge + disk model (``model="bulge+disk"``): its images against GalSim, its
fit, its Fisher errors and its prior."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deblend_scene import PIXEL, PSFS, fit_scene

import btkjax
from btkjax import deblend as D
from btkjax.galsim_backend import tight_gsparams
from btkjax.tolerances import (
    DEBLEND_ERRORS_HESSIAN_RTOL,
    DEBLEND_NOISELESS_RTOL,
    F64_SAME_RTOL,
    IMAGE_RTOL_PEAK_F64,
    MAXK_THRESHOLD,
    ROUNDED_HALF_UNIT,
)

pytestmark = pytest.mark.float64

SKY = np.array([1200.0, 1800.0])
TRUTH = dict(x=19.0, y=20.5, flux=(2e5, 3e5), hlr=0.8, g1=0.2, g2=-0.1, bulge_frac=(0.2, 0.4),
             bulge_hlr=0.25)


def _spec(s, **kw):
    return fit_scene(s, "bulge+disk", **kw)


def _galaxies(t, slots=1):
    one = D.Galaxies(x=jnp.array([[t["x"]]]), y=jnp.array([[t["y"]]]),
                     flux=jnp.array([[t["flux"]]]), hlr=jnp.array([[t["hlr"]]]),
                     g1=jnp.array([[t["g1"]]]), g2=jnp.array([[t["g2"]]]), n=jnp.ones((1, 1)),
                     bulge_frac=jnp.array([[t["bulge_frac"]]]),
                     bulge_hlr=jnp.array([[t["bulge_hlr"]]]))
    return jax.tree.map(lambda a: jnp.concatenate([a] * slots, axis=1), one)


def test_bulge_disk_images_are_galsims_exponential_plus_devaucouleurs():
    """One centre, one shear, each band's flux shared by its bulge fraction: GalSim's
    (Exponential + DeVaucouleurs).shear() convolved with the PSF, drawn tightly, to the
    accuracy GalSim users get (renderer-grade Fourier cut and a wide FFT box)."""
    s = 48
    spec, psf_k = _spec(s, pad_pixels=80, maxk_threshold=MAXK_THRESHOLD)
    img = np.asarray(D.model_images(_galaxies(TRUTH), jnp.ones((1, 1), bool), psf_k, spec))[0, 0]
    gsp = tight_gsparams()
    c = (s - 1) / 2
    for b, psf in enumerate(PSFS):
        f, bf = TRUTH["flux"][b], TRUTH["bulge_frac"][b]
        gal = (galsim.Exponential(half_light_radius=TRUTH["hlr"], flux=f * (1 - bf)) +
               galsim.DeVaucouleurs(half_light_radius=TRUTH["bulge_hlr"], flux=f * bf))
        gal = gal.shear(g1=TRUTH["g1"], g2=TRUTH["g2"])
        ref = galsim.Convolve(gal, psf, gsparams=gsp).drawImage(
            nx=s, ny=s, scale=PIXEL, offset=(TRUTH["x"] - c, TRUTH["y"] - c)).array
        assert np.abs(img[b] - ref).max() < IMAGE_RTOL_PEAK_F64 * ref.max()


def test_bulge_disk_fit_recovers_a_noiseless_galaxy():
    """Noiseless, no prior, started 0.4 pixel off with the default start (20% bulge of half
    the disk's size): every parameter back to the deblender's noiseless bar."""
    spec, psf_k = _spec(40)
    truth = _galaxies(TRUTH)
    image = D.model_images(truth, jnp.ones((1, 1), bool), psf_k, spec).sum(axis=1)
    det = (np.array([[18.6]]), np.array([[20.9]]), np.ones((1, 1), bool))
    res = D.fit_blends(image, det, psf_k, spec, SKY, rtol=1e-13)
    g = res.galaxies
    assert int(res.status[0]) == D.STATUS_CONVERGED
    for name in ("flux", "hlr", "bulge_hlr"):
        np.testing.assert_allclose(np.asarray(getattr(g, name)), np.asarray(getattr(truth, name)),
                                   rtol=DEBLEND_NOISELESS_RTOL, err_msg=name)
    for name in ("x", "y", "g1", "g2", "bulge_frac"):
        np.testing.assert_allclose(np.asarray(getattr(g, name)), np.asarray(getattr(truth, name)),
                                   atol=DEBLEND_NOISELESS_RTOL, err_msg=name)
    assert np.asarray(res.errors.bulge_frac).shape == (1, 1, 2)
    assert np.all(np.asarray(res.errors.bulge_frac) > 0)


def test_bulge_disk_fisher_errors_are_the_inverse_hessian():
    """`fisher_errors` of the bulge+disk parameters (packed with the bulge's columns before the
    unfitted index) at the truth of a noiseless image, against the inverse of jax.hessian of
    the negative log-likelihood written here on a flat vector, through a 2-slot blend."""
    spec, psf_k = _spec(40)
    truth = _galaxies(TRUTH)
    image = D.model_images(truth, jnp.ones((1, 1), bool), psf_k, spec).sum(axis=1)

    def nll(v):
        g = D.Galaxies(x=v[0:1], y=v[1:2], flux=v[None, 2:4], hlr=v[4:5], g1=v[5:6], g2=v[6:7],
                       n=jnp.ones(1), bulge_frac=v[None, 7:9], bulge_hlr=v[9:10])
        g = jax.tree.map(lambda a: a[None], g)
        return D.neg_log_likelihood(g, jnp.ones((1, 1), bool), image, psf_k, spec, SKY)[0]

    t = TRUTH
    v0 = jnp.array([t["x"], t["y"], *t["flux"], t["hlr"], t["g1"], t["g2"], *t["bulge_frac"],
                    t["bulge_hlr"]])
    # (jitted: one compiled program, instead of op-by-op dispatch of the model's ops)
    sigma = np.sqrt(np.diag(np.linalg.inv(np.asarray(jax.jit(jax.hessian(nll))(v0)))))
    e, ok = D.fisher_errors(_galaxies(TRUTH, 2), jnp.array([[True, False]]), image, psf_k, spec,
                            SKY)
    assert bool(ok[0])
    got = np.concatenate([np.asarray(a)[0, 0].ravel() for a in
                          (e.x, e.y, e.flux, e.hlr, e.g1, e.g2, e.bulge_frac, e.bulge_hlr)])
    np.testing.assert_allclose(got, sigma, rtol=DEBLEND_ERRORS_HESSIAN_RTOL)
    assert np.isnan(float(e.n[0, 0])) and np.isnan(float(e.bulge_hlr[0, 1]))


def test_bulge_disk_prior_term_and_the_catalog_it_comes_from():
    """-log prior of the bulge terms by hand, and `BULGE_DISK_PRIOR`'s numbers against the
    embedded catalog's galaxies with both a bulge and a disk (rounded to 2 digits)."""
    p = D.BULGE_DISK_PRIOR
    g = jax.tree.map(lambda a: a[0], _galaxies(TRUTH))
    bf, ratio = np.array(TRUTH["bulge_frac"]), TRUTH["bulge_hlr"] / TRUTH["hlr"]
    logit = np.log(bf / (1 - bf))
    want = 0.5 * (np.sum(((logit - p.bulge_logit_mean) / p.bulge_logit_width) ** 2) +
                  ((np.log(ratio) - p.log_bulge_ratio_mean) / p.log_bulge_ratio_width) ** 2)
    got = float(D.model.prior_term(g, jnp.ones(1, bool), p.astype(jnp.float64)))
    assert got == pytest.approx(want, rel=F64_SAME_RTOL)
    table = btkjax.catalog.CatsimCatalog.default().table
    fb, fd = np.asarray(table["fluxnorm_bulge"]), np.asarray(table["fluxnorm_disk"])
    both = (fb > 0) & (fd > 0)
    frac = fb[both] / (fb[both] + fd[both])
    lg = np.log(frac / (1 - frac))
    area_b = np.asarray(table["a_b"] * table["b_b"])[both]
    lr = 0.5 * np.log(area_b / np.asarray(table["a_d"] * table["b_d"])[both])
    one, two = ROUNDED_HALF_UNIT * 0.1, ROUNDED_HALF_UNIT * 0.01  # quoted to 1 and 2 decimals
    assert p.bulge_logit_mean == pytest.approx(lg.mean(), abs=one)
    assert p.bulge_logit_width == pytest.approx(lg.std(), abs=one)
    assert p.log_bulge_ratio_mean == pytest.approx(np.median(lr), abs=two)
    assert p.log_bulge_ratio_width == pytest.approx(lr.std(), abs=two)
    fm = D.ForwardModelMeasure(model="bulge+disk")
    assert fm.resolve_prior(btkjax.survey.get_surveys("LSST")) == p
