"""The deblender's detection of galaxies SEP misses: colour-aware residual peaks, coadd
detections."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deblend_scene import PIXEL, fit_scene

from btkjax import deblend as D
from btkjax.deblend.model import n_params
from btkjax.tolerances import (
    DEBLEND_NOISELESS_RTOL,
    F64_SAME_ATOL,
    F64_SAME_RTOL,
    MIRROR_GAUSSIAN_ATOL,
)

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


def test_mirror_reflects_through_any_centre(x64):
    """`mirror` against the reflection done by hand: a sum of two round Gaussians (sigma 2
    pixels: their spectrum at the Nyquist frequency is e^-19.7 of the peak, so band-limited
    interpolation is exact to 3e-9) reflected through a centre off the pixel grid is the same
    sum with the second Gaussian moved to 2c - p (`MIRROR_GAUSSIAN_ATOL`); through a
    half-integer centre it is a flip of the pixels to rounding; pixels whose reflection leaves
    the stamp are flagged and zero."""
    s = 40
    yy, xx = np.mgrid[0:s, 0:s].astype(float)

    def blob(x0, y0):
        return np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 2.0**2)

    cx, cy = 17.3, 21.6
    image = blob(cx, cy) + 0.3 * blob(22.0, 24.0)
    out, valid = D.mirror(jnp.asarray(image), cx, cy)
    want = blob(cx, cy) + 0.3 * blob(2 * cx - 22.0, 2 * cy - 24.0)
    inside = (2 * cx - xx >= 0) & (2 * cx - xx <= s - 1) & (2 * cy - yy >= 0) & \
        (2 * cy - yy <= s - 1)
    assert np.array_equal(np.asarray(valid), inside)
    np.testing.assert_allclose(np.asarray(out)[inside], want[inside], atol=MIRROR_GAUSSIAN_ATOL)
    assert np.all(np.asarray(out)[~inside] == 0)
    # a half-integer centre: pixel (y, x) -> (2 cy - y, 2 cx - x) exactly
    noise = np.random.default_rng(1).normal(size=(s, s))
    out, valid = D.mirror(jnp.asarray(noise), 19.5, 19.5)
    np.testing.assert_allclose(np.asarray(out), noise[::-1, ::-1], atol=F64_SAME_ATOL)
    assert np.asarray(valid).all()


def test_asymmetry_peaks_find_a_neighbour_in_a_bulge_disk_galaxy():
    """A bright bulge + disk galaxy (500,000 electrons) fitted with one exponential profile,
    with a faint exponential neighbour (3,000 to 10,000 electrons, 0.6 to 2% of it) 3.7 pixels
    from its centre, Poisson noise. The exponential's residual has a significant peak in the
    galaxy's wing, 11 pixels from anything, with or without the neighbour (`residual_peaks`
    takes the profile's mismatch for a source); the antisymmetric part about the galaxy's
    centre has none without the neighbour, and finds the neighbour within a pixel and a half."""
    s = 32
    spec_bd, psf_bd = fit_scene(s, "bulge+disk")
    spec, psf_k = fit_scene(s)

    def one(a):
        return jnp.asarray([[a]], float)

    bright = D.Galaxies(x=one(15.3), y=one(16.2), flux=jnp.asarray([[[200000.0, 300000.0]]]),
                        hlr=one(0.8), g1=one(0.15), g2=one(-0.1), n=one(1.0),
                        bulge_frac=jnp.asarray([[[0.5, 0.6]]]), bulge_hlr=one(0.2))
    m1 = jnp.ones((1, 1), bool)
    image_bright = D.model_images(bright, m1, psf_bd, spec_bd).sum(1)
    det = (np.array([[15.0]]), np.array([[16.0]]), np.array([[True]]))
    for flux in (0.0, 3000.0, 10000.0):
        neighbour = D.Galaxies(x=one(18.5), y=one(18.0), flux=jnp.asarray([[[flux, flux]]]),
                               hlr=one(0.3), g1=one(0.0), g2=one(0.0), n=one(1.0))
        image = np.asarray(image_bright + D.model_images(neighbour, m1, psf_k, spec).sum(1))
        rng = np.random.default_rng(3)
        image = image + rng.normal(size=image.shape) * np.sqrt(SKY[None, :, None, None] + image)
        fit = D.fit_blends(jnp.asarray(image), det, psf_k, spec, SKY, errors=False)
        res = D.residual_peaks(fit.galaxies, fit.mask, image, psf_k, spec, SKY, n_add=1)
        assert bool(res.found[0, 0])
        assert np.hypot(float(res.x[0, 0]) - 18.5, float(res.y[0, 0]) - 18.0) > 10
        asym = D.asymmetry_peaks(fit.galaxies, fit.mask, image, psf_k, spec, SKY, n_add=1)
        assert bool(asym.found[0, 0]) == (flux > 0)
        if flux > 0:
            assert np.hypot(float(asym.x[0, 0]) - 18.5, float(asym.y[0, 0]) - 18.0) <= 1.5


def test_join_concentric_adds_a_galaxys_components_by_hand():
    """Two fitted profiles 0.5 pixel apart are one galaxy's components: joined into the
    brighter (fluxes and models summed, flux errors in quadrature, its centre and shape kept,
    the fainter's slot emptied); a third 5 pixels away and the other blend are untouched."""
    rng = np.random.default_rng(0)
    flux = np.array([[[100.0, 200.0], [900.0, 800.0], [50.0, 60.0]],
                     [[10.0, 20.0], [30.0, 40.0], [0.0, 0.0]]])
    gal = D.Galaxies(x=np.array([[10.5, 10.0, 15.0], [10.0, 10.2, 0.0]]),
                     y=np.array([[10.0, 10.0, 10.0], [10.0, 10.0, 0.0]]), flux=flux,
                     hlr=np.array([[0.1, 0.6, 0.3], [0.2, 0.3, 0.0]]), g1=np.zeros((2, 3)),
                     g2=np.zeros((2, 3)), n=np.ones((2, 3)))
    err = gal._replace(flux=np.sqrt(flux) + 1.0)
    mask = np.array([[True, True, True], [True, False, False]])
    models = rng.random((2, 3, 2, 8, 8))
    g2, e2, m2, mod2 = D.join_concentric(gal, err, mask, models, join_pixels=1.0)
    assert m2.tolist() == [[False, True, True], [True, False, False]]
    np.testing.assert_allclose(g2.flux[0, 1], flux[0, 0] + flux[0, 1], rtol=F64_SAME_RTOL)
    np.testing.assert_allclose(e2.flux[0, 1], np.hypot(err.flux[0, 0], err.flux[0, 1]),
                               rtol=F64_SAME_RTOL)
    np.testing.assert_allclose(mod2[0, 1], models[0, 0] + models[0, 1], rtol=F64_SAME_RTOL)
    assert np.all(mod2[0, 0] == 0)
    assert (g2.x[0, 1], g2.hlr[0, 1]) == (10.0, 0.6)  # the brighter's centre and shape
    np.testing.assert_array_equal(mod2[0, 2], models[0, 2])
    np.testing.assert_array_equal(g2.flux[1], flux[1])  # slot 1 of blend 1 is not fitted
    assert gal.flux[0, 1, 0] == 900.0  # the inputs are not modified
    # bulge + disk components: the joined galaxy's bulge fraction is of the summed flux
    bd = gal._replace(bulge_frac=np.full((2, 3, 2), 0.5), bulge_hlr=np.full((2, 3), 0.1))
    bd.bulge_frac[0, 0] = [0.1, 0.3]
    g3, _, _, _ = D.join_concentric(bd, None, mask, models, join_pixels=1.0)
    want = (0.1 * flux[0, 0] * [1, 0] + 0.3 * flux[0, 0] * [0, 1] + 0.5 * flux[0, 1]) / (
        flux[0, 0] + flux[0, 1])
    np.testing.assert_allclose(g3.bulge_frac[0, 1], want, rtol=F64_SAME_RTOL)


def test_concentric_profile_takes_a_bulge_that_pieces_would_absorb(setup, x64):
    """One galaxy of two concentric profiles of different colours and sizes (a disk and a
    bulge), one detection. One profile misfits it, and the residual additions put two
    offset pieces beside it (the galaxy reported as three). With ``concentric_sources=1`` a
    second profile at the fitted centre is proposed first; it takes the bulge, nothing is
    left for the residual, and both profiles are recovered where they are (noiseless, the
    fitted family)."""
    spec, psf_k = setup
    bd = D.Galaxies(x=jnp.array([[11.3, 11.3]]), y=jnp.array([[12.2, 12.2]]),
                    flux=jnp.array([[[60000.0, 30000.0], [20000.0, 40000.0]]]),
                    hlr=jnp.array([[0.8, 0.2]]), g1=jnp.array([[0.3, 0.0]]),
                    g2=jnp.array([[0.05, 0.0]]), n=jnp.ones((1, 2)))
    image = D.model_images(bd, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1)
    det = (np.array([[11.0, 0.0, 0.0]]), np.array([[12.0, 0.0, 0.0]]),
           np.array([[True, False, False]]))
    same = dict(errors=False, rtol=1e-13, max_steps=3000, add_sources=2,
                split_min_excess=-np.inf)
    pieces = D.fit_blends(image, det, psf_k, spec, SKY, **same)
    assert int(np.asarray(pieces.mask).sum()) == 3
    # the pieces sit well away from the centre (neither is a bulge)
    far = np.hypot(np.asarray(pieces.galaxies.x)[0, 1:] - 11.3,
                   np.asarray(pieces.galaxies.y)[0, 1:] - 12.2)
    assert far.min() > 2.0, far
    res = D.fit_blends(image, det, psf_k, spec, SKY, concentric_sources=1, **same)
    assert np.asarray(res.mask).tolist() == [[True, True, False]]
    assert float(res.loss[0]) < float(pieces.loss[0])
    got = jax.tree.map(lambda a: np.asarray(a)[:, :2], res.galaxies)
    order = np.argsort(-got.hlr[0])  # disk first
    for name in ("x", "y", "hlr", "g1", "g2"):
        np.testing.assert_allclose(getattr(got, name)[0, order], np.asarray(getattr(bd, name))[0],
                                   atol=DEBLEND_NOISELESS_RTOL, err_msg=name)
    np.testing.assert_allclose(got.flux[0, order], np.asarray(bd.flux)[0],
                               rtol=DEBLEND_NOISELESS_RTOL)
    with pytest.raises(ValueError, match="concentric_sources must be a number of rounds"):
        D.fit_blends(image, det, psf_k, spec, SKY, concentric_sources=True, **same)


def test_ring_finds_a_neighbour_a_single_profile_absorbed(setup, x64):
    """A faint galaxy (10% of the light) 3.2 pixels (0.9 PSF FWHM) from a bright one, one
    detection: the single profile absorbs it, and no residual peak is left for
    ``add_sources``. ``ring_sources=6`` (a galaxy proposed beside the
    bright one in six directions, the best kept by Schwarz's criterion) finds it where it is, with both
    fluxes (noiseless, the fitted family). With ``multi_start`` every refit also starts from
    the fit as it is: the same answer, at a -log L no higher."""
    spec, psf_k = setup
    pair = D.Galaxies(x=jnp.array([[11.3, 14.3]]), y=jnp.array([[12.2, 13.3]]),
                      flux=jnp.array([[[60000.0, 90000.0], [6000.0, 4000.0]]]),
                      hlr=jnp.array([[0.5, 0.25]]), g1=jnp.array([[0.1, 0.0]]),
                      g2=jnp.array([[0.05, -0.1]]), n=jnp.ones((1, 2)))
    image = D.model_images(pair, jnp.ones((1, 2), bool), psf_k, spec).sum(axis=1)
    det = (np.array([[11.0, 0.0]]), np.array([[12.0, 0.0]]), np.array([[True, False]]))
    # noiseless: no residual chi-square exceeds its expectation, so the excess that picks the
    # galaxy to look beside is taken at any level (split_min_excess)
    same = dict(errors=False, rtol=1e-13, max_steps=3000, add_sources=2,
                split_min_excess=-np.inf)
    plain = D.fit_blends(image, det, psf_k, spec, SKY, **same)
    assert np.asarray(plain.mask).sum() == 1
    n_data = image.shape[1] * S * S  # pixel values fitted (bands x window)
    for multi in (False, True):
        res = D.fit_blends(image, det, psf_k, spec, SKY, ring_sources=6, multi_start=multi,
                           **same)
        assert np.asarray(res.mask).tolist() == [[True, True]]
        # Schwarz (the default ring_penalty): -log L lower by more than half the new galaxy's
        # parameters times log(n_data)
        gain = float(plain.loss[0]) - float(res.loss[0])
        assert gain > 0.5 * n_params("exponential", 2) * np.log(n_data)
        got = np.stack([np.asarray(res.galaxies.x)[0], np.asarray(res.galaxies.y)[0]], -1)
        want = np.stack([np.asarray(pair.x)[0], np.asarray(pair.y)[0]], -1)
        # which slot holds which galaxy is the optimizer's path (the detection's slot may
        # move 3 pixels to the faint one): each true galaxy is the fitted one nearest it
        order = np.argmin(np.hypot(*(want[:, None, :] - got[None, :, :]).transpose(2, 0, 1)),
                          axis=1)
        assert sorted(order.tolist()) == [0, 1]
        np.testing.assert_allclose(got[order], want, atol=DEBLEND_NOISELESS_RTOL)  # pixels
        np.testing.assert_allclose(np.asarray(res.galaxies.flux)[0][order],
                                   np.asarray(pair.flux)[0], rtol=DEBLEND_NOISELESS_RTOL)
    # a numeric ring_penalty is the threshold on that drop: just below it the galaxy is
    # kept, just above it the fit stays as it was
    for penalty, n_kept in ((gain - 1.0, 2), (gain + 1.0, 1)):
        res = D.fit_blends(image, det, psf_k, spec, SKY, ring_sources=6, multi_start=True,
                           ring_penalty=penalty, **same)
        assert int(np.asarray(res.mask).sum()) == n_kept, (penalty, gain)
    for bad in ("akaike", -1.0, float("nan"), True, None):
        with pytest.raises(ValueError, match="ring_penalty must be 'aic', 'bic' or a finite"):
            D.fit_blends(image, det, psf_k, spec, SKY, ring_sources=6, ring_penalty=bad,
                         **same)
