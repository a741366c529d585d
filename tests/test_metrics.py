"""Metrics against independent answers: hand-built catalogs and masks, scikit-image, SEP, GalSim
HSM, analytic moments; JAX metrics against the NumPy ones, gradients against central differences.
"""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sep
from astropy.table import Table
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from btkjax import jax_metrics as jm
from btkjax import metrics
from btkjax.match import (
    IdentityMatcher,
    PixelHungarianMatcher,
    SkyClosestNeighbourMatcher,
    match_catalogs,
)
from btkjax.tolerances import (
    F64_SAME_RTOL,
    FD_STEP_F64,
    GRAD_RTOL_F64,
    JAX_NUMPY_METRICS_RTOL,
    KSB_SHEAR_ATOL,
    KSB_SHEAR_RTOL,
    METRICS_REFERENCE_RTOL,
)

pytestmark = pytest.mark.float64  # parity with GalSim / finite differences in float64


def _table(xy):
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return Table({"x_peak": xy[:, 0], "y_peak": xy[:, 1], "ra": xy[:, 0] * 0.2,
                  "dec": xy[:, 1] * 0.2})


# -- detection ---------------------------------------------------------------------------------


def test_precision_recall_f1_by_hand():
    true = [_table([(10, 10), (20, 20)]), _table([(5, 5)]),
            _table([(40, 40), (44, 40), (70, 70)])]
    detected = [_table([(10.5, 10), (30, 30)]), _table([]),
                _table([(41, 40), (43.5, 40), (60, 60)])]
    matches = match_catalogs(true, detected, PixelHungarianMatcher(5.0))
    # Blend 0: (10.5, 10) matches (10, 10); (30, 30) is 14 pixels from (20, 20). Blend 1: none.
    # Blend 2: (41, 40) and (43.5, 40) match; (70, 70) is 14 pixels from (60, 60).
    assert [list(m.match_detected_id) for m in matches] == [[0, -1], [-1], [0, 1, -1]]
    d = metrics.detection_metrics(matches, max_number=3)
    tp, n_det, n_true = 3, 5, 6
    assert (d["true_pos"], d["false_pos"], d["false_neg"]) == (tp, n_det - tp, n_true - tp)
    assert d["precision"] == pytest.approx(3 / 5)
    assert d["recall"] == pytest.approx(3 / 6)
    assert d["f1"] == pytest.approx(2 * (3 / 5) * (3 / 6) / (3 / 5 + 3 / 6))
    expected = np.zeros((5, 4))
    expected[1, 2] = expected[0, 1] = expected[2, 3] = 1  # [n matched, n true]
    np.testing.assert_array_equal(d["eff_matrix_counts"], expected)
    np.testing.assert_array_equal(d["eff_matrix"], 100 * expected)


def test_no_detections_gives_undefined_precision():
    d = metrics.detection_metrics(match_catalogs([_table([(1, 1)])], [_table([])]))
    assert np.isnan(d["precision"]) and d["recall"] == 0.0 and np.isnan(d["f1"])


# -- matching ------------------------------------------------------------------------------------


def test_hungarian_beats_greedy_nearest_neighbour():
    # Distances: T0-D0 1.0, T0-D1 2.0, T1-D0 1.5, T1-D1 4.5. Greedy nearest neighbour pairs T0
    # with D0 (its nearest, and the closest pair overall), leaving T1 with D1 beyond max_sep = 4:
    # one match. The optimal assignment pairs T0-D1 and T1-D0: two matches.
    true = _table([(0, 0), (2.5, 0)])
    detected = _table([(1, 0), (-2, 0)])
    greedy_first = np.argmin(np.hypot(0 - np.array([1, -2]), 0))
    assert greedy_first == 0  # what a greedy matcher would take for T0
    m = PixelHungarianMatcher(pixel_max_sep=4.0)(true, detected)
    assert list(m.match_detected_id) == [1, 0]
    np.testing.assert_allclose(m.dist, [2.0, 1.5])


def test_max_separation_is_respected():
    true = _table([(0, 0), (10, 0)])
    detected = _table([(3.0, 0), (13.01, 0)])
    m = PixelHungarianMatcher(pixel_max_sep=3.0)(true, detected)
    assert list(m.match_detected_id) == [0, -1]  # 3.0 is allowed (inclusive), 3.01 is not
    sky = SkyClosestNeighbourMatcher(arcsec_max_sep=0.6)(true, detected)
    assert list(sky.match_detected_id) == [0, -1]  # 0.6 arcsec and 0.602 arcsec


def test_sky_matcher_claims_and_wrapped_ra():
    true = Table({"ra": [0.0, 0.3], "dec": [0.0, 0.0]})
    # One detection given as astropy wraps it: -0.1 arcsec as 1296000 - 0.1.
    detected = Table({"ra": [360 * 3600 - 0.1], "dec": [0.0]})
    m = SkyClosestNeighbourMatcher(arcsec_max_sep=1.0)(true, detected)
    # Both true galaxies want the single detection; the closer (0.1 vs 0.4 arcsec) keeps it.
    assert list(m.match_detected_id) == [0, -1]
    # float64 rounding of ra near 360 deg = 1.3e6 arcsec
    assert m.dist[0] == pytest.approx(0.1, abs=F64_SAME_RTOL * 360 * 3600)


def test_identity_matcher_and_custom_function():
    true, det = _table([(0, 0), (9, 9)]), _table([(50, 50), (60, 60)])
    assert list(IdentityMatcher()(true, det).match_detected_id) == [0, 1]
    custom = match_catalogs([true], [det], lambda t, d: ([1], [0]))[0]
    assert list(custom.match_detected_id) == [-1, 0]
    with pytest.raises(TypeError, match="my_bad_matcher"):
        def my_bad_matcher(t, d):
            return None
        match_catalogs([true], [det], my_bad_matcher)


# -- segmentation ----------------------------------------------------------------------------------


def test_iou_hand_built_masks():
    a = np.zeros((8, 8), bool)
    b = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True
    b[2:6, 2:6] = True
    assert metrics.iou(a, b) == pytest.approx(4 / 28)  # 2x2 overlap, 16 + 16 - 4 union
    assert metrics.iou(a, a) == 1.0
    assert metrics.iou(a, np.roll(a, 4, axis=0)) == 0.0
    assert np.isnan(metrics.iou(np.zeros_like(a), np.zeros_like(a)))


def test_iou_through_compute_metrics_is_not_trivially_one():
    # One galaxy: a 4x4 square of 10 electrons; the threshold is 3 * sqrt(4) = 6 electrons. The
    # detection's segmentation is the square shifted by two pixels: IoU 8 / 24.
    iso = np.zeros((1, 1, 1, 10, 10))
    iso[0, 0, 0, 2:6, 2:6] = 10.0
    seg = np.zeros((1, 10, 10), bool)
    seg[0, 4:8, 2:6] = True
    res = metrics.compute_metrics(iso, [_table([(3.5, 3.5)])], [_table([(3.5, 5.5)])],
                                  segmentations=[seg], noise_threshold=3 * np.sqrt(4.0),
                                  meas_band_num=0, sky_level=4.0)
    assert res["segmentation"]["iou"][0][0] == pytest.approx(8 / 24)
    assert res["galaxy_summary"]["iou"][0] == pytest.approx(8 / 24)


# -- reconstruction: against scikit-image ---------------------------------------------------------


def _galaxy_pair(seed=0, shape=(3, 32, 30)):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[1], : shape[2]]
    true = np.stack([
        (b + 1) * 100 * np.exp(-0.5 * (((x - 14.3) / 3.0) ** 2 + ((y - 16.1) / 2.2) ** 2))
        for b in range(shape[0])
    ])
    pred = 0.9 * np.roll(true, 1, axis=-1) + rng.normal(0, 3.0, shape)
    return true, pred


def test_mse_is_mean_square_not_root():
    true, pred = _galaxy_pair()
    assert metrics.mse(true, pred) == pytest.approx(mean_squared_error(true, pred),
                                                    rel=METRICS_REFERENCE_RTOL)
    assert metrics.mse(np.zeros((1, 2, 2)), np.full((1, 2, 2), 3.0)) == 9.0


def test_psnr_matches_skimage():
    true, pred = _galaxy_pair()
    expected = peak_signal_noise_ratio(true, pred, data_range=true.max())
    assert metrics.psnr(true, pred) == pytest.approx(expected, rel=METRICS_REFERENCE_RTOL)
    assert metrics.psnr(true, pred, data_range=500.0) == pytest.approx(
        peak_signal_noise_ratio(true, pred, data_range=500.0), rel=METRICS_REFERENCE_RTOL)


@pytest.mark.parametrize("gaussian", [True, False])
def test_ssim_matches_skimage(gaussian):
    true, pred = _galaxy_pair(seed=1)
    if gaussian:  # Wang et al.: 11x11 Gaussian window, sigma 1.5, population covariance
        kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    else:  # scikit-image's defaults: 7x7 uniform window, sample covariance
        kw = dict(gaussian_weights=False)
    expected = structural_similarity(true, pred, data_range=true.max(), channel_axis=0, **kw)
    got = metrics.ssim(true, pred, gaussian_weights=gaussian)
    assert got == pytest.approx(expected, rel=METRICS_REFERENCE_RTOL)
    assert got < 0.99  # the pair differs: a value that could be false
    assert metrics.ssim(true, true, gaussian_weights=gaussian) == pytest.approx(1.0)


# -- target measures ------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["gaussian", "exponential"])
@pytest.mark.parametrize("g", [(0.05, -0.03), (-0.02, 0.06), (0.0, 0.0)])
def test_ksb_ellipticity_against_known_shear(profile, g):
    scale = 0.2
    psf = galsim.Gaussian(fwhm=0.7)
    prof = galsim.Gaussian(sigma=0.5) if profile == "gaussian" else galsim.Exponential(
        half_light_radius=0.6)
    gal = galsim.Convolve(prof.shear(g1=g[0], g2=g[1]).withFlux(1e6), psf)  # S/N ~ infinite
    image = gal.drawImage(nx=61, ny=61, scale=scale).array
    params = {"psf": [psf], "pixel_scale": scale, "meas_band_num": 0, "x_peak": 30.0,
              "y_peak": 30.0}
    e = np.array(metrics.meas_ksb_ellipticity(image[None], params))
    direct = galsim.hsm.EstimateShear(galsim.Image(image, scale=scale),
                                      psf.drawImage(nx=61, ny=61, scale=scale), shear_est="KSB")
    np.testing.assert_allclose(e, [direct.corrected_g1, direct.corrected_g2], rtol=F64_SAME_RTOL)
    np.testing.assert_allclose(e, g, rtol=KSB_SHEAR_RTOL, atol=KSB_SHEAR_ATOL)
    assert np.all(np.isnan(metrics.meas_ksb_ellipticity(np.zeros((1, 61, 61)), params)))


@pytest.mark.parametrize("x,y,r", [(20.3, 17.8, 5.3), (10.5, 10.5, 2.0), (0.2, 38.0, 6.0),
                                   (19.0, 21.0, 3.0)])
def test_aperture_flux_matches_sep_exact_overlap(x, y, r):
    image = np.random.default_rng(3).random((40, 41))
    expected = sep.sum_circle(image, np.array([x]), np.array([y]), r, subpix=0)[0][0]
    assert metrics.aperture_flux(image, x, y, r) == pytest.approx(expected,
                                                                  rel=METRICS_REFERENCE_RTOL)
    inside = metrics.aperture_weights(image.shape, 20.0, 20.0, r).sum()
    assert inside == pytest.approx(np.pi * r * r, rel=F64_SAME_RTOL)  # whole circle on the stamp
    params = {"meas_band_num": 0, "x_peak": x, "y_peak": y, "aperture_radius": r,
              "sky_level": 4.0}
    flux, err = metrics.meas_fixed_aperture(image[None], params)
    assert flux == pytest.approx(expected, rel=METRICS_REFERENCE_RTOL)


def test_moments_ellipticity_analytic_gaussian():
    # An elliptical Gaussian sampled at pixel centers with a circular Gaussian weight: the
    # weighted moments are those of the product, covariance (C^-1 + I / sigma_w^2)^-1.
    a, b, theta, sw = 4.0, 2.5, 0.4, 3.0
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    cov = rot @ np.diag([a * a, b * b]) @ rot.T
    y, x = np.mgrid[:64, :64]
    d = np.stack([x - 31.5, y - 31.5], -1)
    image = np.exp(-0.5 * np.einsum("...i,ij,...j", d, np.linalg.inv(cov), d))
    m = np.linalg.inv(np.linalg.inv(cov) + np.eye(2) / sw**2)
    expected = [(m[0, 0] - m[1, 1]) / np.trace(m), 2 * m[0, 1] / np.trace(m)]
    np.testing.assert_allclose(metrics.moments_ellipticity(image, sw), expected,
                               atol=F64_SAME_RTOL)
    np.testing.assert_allclose(jm.moments_ellipticity(image, sw), expected, atol=F64_SAME_RTOL)


def test_blendedness_and_snr_by_hand():
    iso = np.zeros((3, 6, 6))
    iso[0, 0:2, 0:2] = 1.0  # alone
    iso[1, 3:5, 3:5] = 2.0  # overlaps galaxy 2 exactly
    iso[2, 3:5, 3:5] = 2.0
    np.testing.assert_allclose(metrics.blendedness(iso), [0.0, 0.5, 0.5])
    sky = 5.0
    assert metrics.snr(iso[1], sky) == pytest.approx(np.sqrt(4 * 4.0 / (sky + 2.0)))


def test_chi2_by_hand():
    data = np.array([[[3.0, 1.0]], [[0.0, 2.0]]])  # [band=2, y=1, x=2]
    model = np.array([[[1.0, 1.0]], [[1.0, -1.0]]])
    sky = np.array([1.0, 2.0])
    expected = 4.0 / 2.0 + 0.0 + 1.0 / 3.0 + 9.0 / 2.0
    assert metrics.chi2(data, model, sky) == pytest.approx(expected)
    assert float(jm.chi2(data, model, sky)) == pytest.approx(expected)


# -- JAX metrics against NumPy, and their gradients ------------------------------------------------


def _batch(seed=0):
    pairs = [_galaxy_pair(seed + i, shape=(2, 24, 24)) for i in range(3)]
    true = np.stack([p[0] for p in pairs])
    pred = np.stack([p[1] for p in pairs])
    return true, pred  # [blend=3, band=2, 24, 24]


_JAX_NUMPY = {
    "mse": (lambda t, p: jm.mse(t, p), lambda t, p: metrics.mse(t, p)),
    "psnr": (lambda t, p: jm.psnr(t, p), lambda t, p: metrics.psnr(t, p)),
    "ssim": (lambda t, p: jm.ssim(t, p), lambda t, p: metrics.ssim(t, p)),
    "ssim_uniform": (lambda t, p: jm.ssim(t, p, gaussian_weights=False),
                     lambda t, p: metrics.ssim(t, p, gaussian_weights=False)),
    "chi2": (lambda t, p: jm.chi2(t, p, jnp.array([4.0, 9.0])),
             lambda t, p: metrics.chi2(t, p, np.array([4.0, 9.0]))),
    "ellipticity": (lambda t, p: jm.moments_ellipticity(p, 3.0, 11.3, 12.6),
                    lambda t, p: metrics.moments_ellipticity(p, 3.0, 11.3, 12.6)),
    "aperture": (lambda t, p: jm.aperture_flux(p, 11.3, 12.6, 4.2),
                 lambda t, p: metrics.aperture_flux(p, 11.3, 12.6, 4.2)),
    "aperture_soft": (lambda t, p: jm.aperture_flux(p, 11.3, 12.6, 4.2, method="soft"),
                      lambda t, p: metrics.aperture_flux(p, 11.3, 12.6, 4.2, method="soft")),
}


@pytest.mark.parametrize("name", sorted(_JAX_NUMPY))
def test_jax_metrics_equal_numpy(name):
    jax_f, np_f = _JAX_NUMPY[name]
    true, pred = _batch()
    got = np.asarray(jax.jit(jax_f)(jnp.asarray(true), jnp.asarray(pred)))
    expected = np_f(true, pred)
    assert got.shape == np.shape(expected) and got.shape[0] == 3
    np.testing.assert_allclose(got, expected, rtol=JAX_NUMPY_METRICS_RTOL)


@pytest.mark.parametrize("name", sorted(_JAX_NUMPY))
def test_jax_metric_gradients_against_central_differences(name):
    jax_f, _ = _JAX_NUMPY[name]
    true, pred = _batch(seed=5)
    true, pred = jnp.asarray(true), jnp.asarray(pred)

    def loss(p):
        return jnp.sum(jax_f(true, p))

    grad = np.asarray(jax.jit(jax.grad(loss))(pred))
    loss = jax.jit(loss)
    # A handful of pixels, on and off the galaxy, in both bands and blends.
    for idx in [(0, 0, 16, 14), (1, 1, 12, 12), (2, 0, 3, 20), (2, 1, 15, 13)]:
        h = FD_STEP_F64 * max(1.0, abs(float(pred[idx])))
        up, down = pred.at[idx].add(h), pred.at[idx].add(-h)
        fd = (float(loss(up)) - float(loss(down))) / (2 * h)
        scale = max(np.abs(grad).max(), 1e-300)
        assert abs(grad[idx] - fd) <= GRAD_RTOL_F64 * scale, (name, idx, grad[idx], fd)


def test_aperture_gradient_with_respect_to_center_and_radius():
    image = jnp.asarray(_batch()[1][0, 0])

    def flux(c):
        return jm.aperture_flux(image, c[0], c[1], c[2])

    c = jnp.array([11.3, 12.6, 4.2])
    grad = np.asarray(jax.jit(jax.grad(flux))(c))
    flux = jax.jit(flux)
    for k in range(3):
        h = FD_STEP_F64
        e = jnp.zeros(3).at[k].set(h)
        fd = (float(flux(c + e)) - float(flux(c - e))) / (2 * h)
        assert grad[k] == pytest.approx(fd, rel=GRAD_RTOL_F64, abs=GRAD_RTOL_F64 * abs(fd))
    # The radial derivative of an aperture flux is the flux density on its edge: positive here.
    assert grad[2] > 0


def test_jax_metrics_trace_once_per_shape():
    traces = []

    @jax.jit
    def loss(t, p):
        traces.append(1)
        return jm.ssim(t, p) + jm.mse(t, p)

    true, pred = _batch()
    for s in range(3):
        loss(jnp.asarray(true), jnp.asarray(pred) + s)
    assert len(traces) == 1
