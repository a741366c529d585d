"""The deblender's detection of galaxies SEP misses: colour-aware residual peaks, coadd
detections."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deblend_scene import PIXEL, fit_scene

from btkjax import deblend as D
from btkjax.tolerances import DEBLEND_NOISELESS_RTOL

S = 24
FLUX_B = 1600.0
SKY = np.array([400.0, 600.0])


@pytest.fixture(scope="module")
def setup():
    return fit_scene(S)


def _gal(x, y, flux):
    return D.Galaxies(x=jnp.array([[x]]), y=jnp.array([[y]]), flux=jnp.array([[flux]]),
                      hlr=jnp.array([[0.3]]), g1=jnp.zeros((1, 1)), g2=jnp.zeros((1, 1)),
                      n=jnp.ones((1, 1)))


def test_colour_aware_residual_finds_a_neighbour_of_another_colour(setup):
    """A fitted galaxy A and an undetected neighbour B whose light is all in the band of higher
    sky. The 1 / sky band sum weighs B's band by 1/600 against A's band's 1/400: its S/N there
    is 0.63 times its own band's ((1/600) / sqrt(1/400 + 1/600) * sqrt(600)). At B's flux
    (1600 electrons) the band sum's matched-filter S/N is between 4 and 5 (measured: found at a
    threshold of 4, not 5), below the threshold of 5, while the bands' chi-square is above 6
    sigmas."""
    spec, psf_k = setup
    a = _gal(7.0, 12.0, [20000.0, 20000.0])
    b = _gal(17.0, 12.0, [0.0, FLUX_B])
    mask = jnp.ones((1, 1), bool)
    image = (D.model_images(a, mask, psf_k, spec) + D.model_images(b, mask, psf_k, spec)).sum(1)
    found = {}
    for colour in (False, True):
        p = D.residual_peaks(a, mask, image, psf_k, spec, SKY, n_add=1, colour=colour)
        found[colour] = (bool(p.found[0, 0]), float(p.x[0, 0]), float(p.y[0, 0]))
    assert not found[False][0]
    assert found[True][0] and abs(found[True][1] - 17) <= 1 and abs(found[True][2] - 12) <= 1


def test_coadd_detections_threshold_is_in_sigmas_of_the_coadd():
    """On pure sky noise no 5-sigma detection; a galaxy of coadd S/N ~30 is found at its
    position. A coadd not normalized by its noise (electrons / sky) would either find nothing or
    flood the noise with detections."""
    rng = np.random.default_rng(0)
    sky = np.array([200.0, 400.0, 800.0])
    noise = rng.normal(size=(3, 48, 48)) * np.sqrt(sky)[:, None, None]
    assert len(D.coadd_detections(noise, sky, sigma_noise=5.0)) == 0
    gal = galsim.Convolve(galsim.Exponential(half_light_radius=0.4), galsim.Gaussian(fwhm=0.7))
    img = np.stack([gal.withFlux(f).drawImage(nx=48, ny=48, scale=PIXEL, offset=(5, -3)).array
                    for f in (2000.0, 4000.0, 6000.0)]) + noise
    for weights in ("sed", "flat"):
        t = D.coadd_detections(img, sky, sigma_noise=5.0, weights=weights)
        assert len(t) == 1
        # GalSim's centre of an even image is at (24, 24) in 1-based pixels: 0-based 23.5
        assert abs(t["x_peak"][0] - 28.5) < 0.5 and abs(t["y_peak"][0] - 20.5) < 0.5
    with pytest.raises(ValueError, match="weights"):
        D.coadd_detections(img, sky, weights="red")


def test_split_recovers_a_pair_merged_into_one_detection(setup, x64):
    """Two galaxies 5.6 pixels (1.1") apart, detected as one between them (as SEP merges
    them): the single-profile fit absorbs both; `split_candidates` flags it, and the split
    (two galaxies on its major axis, kept by the likelihood) recovers the pair. An isolated
    galaxy is not a candidate (no excess in its residual) and is left alone."""
    spec, psf_k = setup
    pair = D.Galaxies(x=jnp.array([[9.5, 15.0]]), y=jnp.array([[11.5, 12.5]]),
                      flux=jnp.array([[[60000.0, 90000.0], [40000.0, 30000.0]]]),
                      hlr=jnp.array([[0.5, 0.35]]), g1=jnp.array([[0.2, -0.1]]),
                      g2=jnp.array([[-0.05, 0.3]]), n=jnp.ones((1, 2)))
    alone = jax.tree.map(lambda a: a[:, :1], pair)
    images = jnp.concatenate([
        D.model_images(pair, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1),
        D.model_images(alone, jnp.ones((1, 1), bool), psf_k, spec).sum(axis=1)])
    det = (np.array([[12.0, 0.0], [10.0, 0.0]]), np.array([[12.0, 0.0], [12.0, 0.0]]),
           np.array([[True, False], [True, False]]))
    plain = D.fit_blends(images, det, psf_k, spec, SKY, errors=False, rtol=1e-13)
    res = D.fit_blends(images, det, psf_k, spec, SKY, errors=False, rtol=1e-13,
                       split_sources=True)
    assert np.asarray(res.mask).tolist() == [[True, True], [True, False]]
    assert float(res.loss[0]) < float(plain.loss[0]) - 100  # the pair explains the data
    got = np.stack([np.asarray(res.galaxies.x)[0], np.asarray(res.galaxies.y)[0]], -1)
    want = np.stack([np.asarray(pair.x)[0], np.asarray(pair.y)[0]], -1)
    np.testing.assert_allclose(got, want, atol=DEBLEND_NOISELESS_RTOL)  # pixels
    np.testing.assert_allclose(np.asarray(res.galaxies.flux)[0], np.asarray(pair.flux)[0],
                               rtol=DEBLEND_NOISELESS_RTOL)
    np.testing.assert_allclose(np.asarray(res.galaxies.x)[1, 0], 9.5, atol=DEBLEND_NOISELESS_RTOL)
