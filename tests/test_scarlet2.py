"""scarlet2 as a BTK measure function (optional extra ``btkjax[scarlet2]``; skipped without it)."""

import galsim
import numpy as np
import pytest

from btkjax.deblend import Scarlet2Measure, odd_psf_images
from btkjax.tolerances import F64_SAME_RTOL, SCARLET2_ISOLATED_FLUX_RTOL

PIXEL = 0.2
SKY = np.array([400.0, 600.0])
PSFS = [galsim.Kolmogorov(fwhm=0.7), galsim.Kolmogorov(fwhm=0.8)]


def test_odd_psf_images_are_centred_on_a_pixel():
    img = odd_psf_images(PSFS, PIXEL, 25)
    assert img.shape == (2, 25, 25)
    yy, xx = np.mgrid[0:25, 0:25]
    for band in img:
        np.testing.assert_allclose(band.sum(), 1.0, rtol=F64_SAME_RTOL)
        # first moments at the central pixel (12, 12): a symmetric PSF drawn centred there
        assert abs((band * xx).sum() - 12) < 1e-6 and abs((band * yy).sum() - 12) < 1e-6
    with pytest.raises(ValueError, match="odd"):
        odd_psf_images(PSFS, PIXEL, 24)


def test_isolated_flux_and_negative_band_initialization():
    pytest.importorskip("scarlet2")
    s = 61
    # A: an ordinary galaxy; B, 30 pixels away: its band-1 light slightly negative (an
    # over-subtracted background), so its moment-initialized spectrum is negative in that band,
    # which scarlet2's positive constraint turns into NaN unless it is caught.
    a = galsim.Exponential(half_light_radius=0.5).shear(g1=0.2, g2=-0.1)
    b = galsim.Exponential(half_light_radius=0.4)
    flux_a = np.array([2e4, 3e4])
    flux_b = np.array([1e4, -200.0])
    img = np.stack([
        galsim.Convolve(a.withFlux(fa), p).drawImage(nx=s, ny=s, scale=PIXEL,
                                                     offset=(-15, 0)).array
        + galsim.Convolve(b.withFlux(fb), p).drawImage(nx=s, ny=s, scale=PIXEL,
                                                       offset=(15, 0)).array
        for fa, fb, p in zip(flux_a, flux_b, PSFS, strict=True)]).astype(float)
    own_a = np.stack([galsim.Convolve(a.withFlux(fa), p).drawImage(
        nx=s, ny=s, scale=PIXEL, offset=(-15, 0)).array for fa, p in zip(flux_a, PSFS,
                                                                        strict=True)])
    centers = np.array([[30.0, 15.0], [30.0, 45.0]])  # (y, x)
    m = Scarlet2Measure()
    models, labels = m.deblend(img, centers, odd_psf_images(PSFS, PIXEL, 25), SKY)
    assert np.all(np.isfinite(models))
    assert labels[0] == "moments"
    assert labels[1] in ("floored", "fallback")  # reported, not silently used
    np.testing.assert_allclose(models[0].sum(axis=(-2, -1)), own_a.sum(axis=(-2, -1)),
                               rtol=SCARLET2_ISOLATED_FLUX_RTOL)


def test_scarlet2_measure_in_btk_pipeline():
    pytest.importorskip("scarlet2")
    import btkjax
    from btkjax.measure import MeasureGenerator, sep_singleband_measure

    catalog = btkjax.catalog.CatsimCatalog.default()
    sampler = btkjax.sampling_functions.DefaultSampling(max_number=3, min_number=2,
                                                        stamp_size=6.0, max_shift=1.0, seed=3)
    survey = btkjax.survey.get_surveys("LSST")
    draw = btkjax.draw_blends.CatsimGenerator(catalog, sampler, survey, batch_size=2,
                                              stamp_size=6.0, add_noise="all", seed=5)
    s2 = Scarlet2Measure()
    meas = MeasureGenerator([sep_singleband_measure, s2], draw)
    blend_results, meas_results = next(meas)
    for i in range(2):
        cat_sep = meas_results["catalog"]["sep_singleband_measure"][i]
        cat = meas_results["catalog"]["scarlet2"][i]
        deb = np.asarray(meas_results["deblended_images"]["scarlet2"][i])
        # the same detections as SEP, one deblended image each, never NaN
        np.testing.assert_array_equal(np.asarray(cat["x_peak"]), np.asarray(cat_sep["x_peak"]))
        assert deb.shape[0] == len(cat) and deb.shape[1:] == \
            np.asarray(blend_results["blend_images"][i]).shape
        if len(cat):
            assert np.all(np.isfinite(deb))
            kept = np.asarray(cat["init"]) != "dropped"
            assert np.all(np.asarray(cat["r_flux"])[kept] > 0)
