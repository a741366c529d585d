"""MeasureGenerator and the SEP measure functions; MetricsGenerator end to end.

One real LSST batch is drawn once (module fixture); other layouts (channels_last, several
surveys) are that batch rearranged, served by a stub draw generator, so no test recompiles.
"""

import os

import numpy as np
import pytest
from astropy.table import Table

import btkjax
from btkjax import measure, metrics
from btkjax.draw_blends import CatsimGenerator
from btkjax.sampling_functions import DefaultSampling
from btkjax.survey import get_surveys, make_wcs
from btkjax.tolerances import F64_SAME_RTOL, PIXEL_ATOL

BATCH = 8


@pytest.fixture(scope="module")
def lsst_batch(catsim_sample):
    sf = DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0, seed=0)
    gen = CatsimGenerator(catsim_sample, sf, get_surveys("LSST"), batch_size=BATCH,
                          stamp_size=24.0)
    return gen, next(gen)


class StubGenerator:
    """Serves one fixed batch, with a draw generator's attributes."""

    def __init__(self, batch, surveys, channels_last=False, max_number=3):
        self.batch, self.surveys, self.channels_last = batch, surveys, channels_last
        self.batch_size = len(next(iter(batch["blend_list"].values()))
                              if isinstance(batch["blend_list"], dict) else batch["blend_list"])
        self.max_number = max_number
        self.batch_index = 0

    def __next__(self):
        self.batch_index += 1
        return self.batch


# Module-level measure functions (picklable, for the process pool).
def returns_list(batch, idx, **kwargs):
    return [1, 2]


def returns_no_catalog(batch, idx, **kwargs):
    return {"segmentation": None}


def returns_pixels_only(batch, idx, **kwargs):
    return {"catalog": Table({"x_peak": [1.0], "y_peak": [2.0]})}


def returns_bad_segmentation(batch, idx, **kwargs):
    out = measure.sep_singleband_measure(batch, idx, **kwargs)
    out["segmentation"] = out["segmentation"][:, :-1]
    return out


# -- the built-in functions ------------------------------------------------------------------


def test_singleband_detects_true_galaxies(lsst_batch):
    _, batch = lsst_batch
    gen = StubGenerator(batch, [get_surveys("LSST")])
    _, meas = next(measure.MeasureGenerator(measure.sep_singleband_measure, gen))
    n_near = 0
    for cat, true, _ in zip(meas["catalog"]["sep_singleband_measure"], batch["blend_list"],
                                  batch["blend_images"], strict=True):
        # ra, dec are arcsec offsets consistent with x_peak, y_peak through the batch's WCS.
        x, y = measure.arcsec_to_pixel(batch["wcs"], cat["ra"], cat["dec"])
        np.testing.assert_allclose(x, cat["x_peak"], atol=PIXEL_ATOL)
        np.testing.assert_allclose(y, cat["y_peak"], atol=PIXEL_ATOL)
        assert np.all(np.abs(cat["ra"]) < 12.0) and np.all(np.abs(cat["dec"]) < 12.0)
        d = np.hypot(np.asarray(true["x_peak"])[:, None] - np.asarray(cat["x_peak"])[None],
                     np.asarray(true["y_peak"])[:, None] - np.asarray(cat["y_peak"])[None])
        n_near += int(np.sum(d.min(axis=1) < 2.0)) if len(cat) else 0
    n_true = sum(len(t) for t in batch["blend_list"])
    assert n_near >= 0.7 * n_true  # bright CatSim blends: most centers found within 2 pixels


def test_band_choice_by_index_name_or_mean(lsst_batch):
    _, batch = lsst_batch
    surveys = [get_surveys("LSST")]
    by_index = measure.sep_singleband_measure(batch, 0, meas_band_num=2, surveys=surveys)
    by_name = measure.sep_singleband_measure(batch, 0, meas_band_num="r", surveys=surveys)
    np.testing.assert_array_equal(by_index["catalog"]["x_peak"], by_name["catalog"]["x_peak"])
    u_band = measure.sep_singleband_measure(batch, 0, meas_band_num="u", surveys=surveys)
    mean = measure.sep_singleband_measure(batch, 0, use_mean=True)
    assert len(u_band["catalog"]) <= len(by_name["catalog"])  # u is the faintest, noisiest band
    assert len(mean["catalog"]) >= 1
    with pytest.raises(ValueError, match="'w'"):
        measure.sep_singleband_measure(batch, 0, meas_band_num="w", surveys=surveys)


def test_multiband_merges_detections(lsst_batch):
    _, batch = lsst_batch
    out = measure.sep_multiband_measure(batch, 1, matching_threshold=5.0)
    per_band = [measure.sep_singleband_measure(batch, 1, meas_band_num=b) for b in range(6)]
    cat = out["catalog"]
    # No two merged detections closer than the threshold, and none lost: every single-band
    # detection lies within the threshold of a merged one.
    d = np.hypot(np.subtract.outer(cat["x_peak"], cat["x_peak"]),
                 np.subtract.outer(cat["y_peak"], cat["y_peak"]))
    np.fill_diagonal(d, np.inf)
    assert np.all(d > 5.0)
    for single in per_band:
        for x, y in zip(single["catalog"]["x_peak"], single["catalog"]["y_peak"], strict=True):
            assert np.min(np.hypot(cat["x_peak"] - x, cat["y_peak"] - y)) <= 5.0
    assert len(cat) >= max(len(s["catalog"]) for s in per_band)


def test_channels_last_gives_the_same_measurements(lsst_batch):
    _, batch = lsst_batch
    last = dict(batch)
    last["blend_images"] = np.moveaxis(batch["blend_images"], 1, -1)
    last["isolated_images"] = np.moveaxis(batch["isolated_images"], 2, -1)
    surveys = [get_surveys("LSST")]
    _, first = next(measure.MeasureGenerator(measure.sep_singleband_measure,
                                             StubGenerator(batch, surveys)))
    gen_last = StubGenerator(last, surveys, channels_last=True)
    _, meas = next(measure.MeasureGenerator(measure.sep_singleband_measure, gen_last))
    name = "sep_singleband_measure"
    for i in range(BATCH):
        np.testing.assert_array_equal(meas["catalog"][name][i]["x_peak"],
                                      first["catalog"][name][i]["x_peak"])
        np.testing.assert_array_equal(np.moveaxis(meas["deblended_images"][name][i], -1, 1),
                                      first["deblended_images"][name][i])
    # Metrics agree too.
    mg = measure.MeasureGenerator(measure.sep_singleband_measure, gen_last)
    _, _, res = next(metrics.MetricsGenerator(mg))
    mg0 = measure.MeasureGenerator(measure.sep_singleband_measure, StubGenerator(batch, surveys))
    _, _, res0 = next(metrics.MetricsGenerator(mg0))
    np.testing.assert_allclose(res["galaxy_summary"][name]["ssim"],
                               res0["galaxy_summary"][name]["ssim"])


# -- the generator ------------------------------------------------------------------------------


def test_several_kwargs_name_results_and_thresholds_order(lsst_batch):
    _, batch = lsst_batch
    gen = StubGenerator(batch, [get_surveys("LSST")])
    mg = measure.MeasureGenerator([measure.sep_singleband_measure, measure.sep_multiband_measure],
                                  gen, measure_kwargs=[{"sigma_noise": 1.5}, {"sigma_noise": 5.0}])
    _, meas = next(mg)
    assert set(meas["catalog"]) == {"sep_singleband_measure0", "sep_singleband_measure1",
                                    "sep_multiband_measure0", "sep_multiband_measure1"}
    low = sum(len(c) for c in meas["catalog"]["sep_singleband_measure0"])
    high = sum(len(c) for c in meas["catalog"]["sep_singleband_measure1"])
    assert high < low  # a higher threshold detects fewer sources
    assert meas["segmentation"]["sep_multiband_measure0"] == [None] * BATCH


@pytest.mark.parametrize("function,error,text", [
    (returns_list, TypeError, "returns_list"),
    (returns_no_catalog, ValueError, "returns_no_catalog"),
    (returns_pixels_only, ValueError, "returns_pixels_only.*'ra', 'dec'"),
    (returns_bad_segmentation, ValueError, "segmentation.*returns_bad_segmentation.*shape"),
])
def test_bad_measure_functions_are_named(lsst_batch, function, error, text):
    _, batch = lsst_batch
    mg = measure.MeasureGenerator(function, StubGenerator(batch, [get_surveys("LSST")]))
    with pytest.raises(error, match=text):
        next(mg)


def test_bad_arguments():
    with pytest.raises(TypeError, match="measure_kwargs"):
        measure.MeasureGenerator(measure.sep_singleband_measure,
                                 StubGenerator({"blend_list": []}, []), measure_kwargs=[1])
    with pytest.raises(TypeError, match="picklable"):
        measure.MeasureGenerator(lambda b, i: None, StubGenerator({"blend_list": []}, []), cpus=2)


def test_process_pool_gives_the_same_results(lsst_batch):
    _, batch = lsst_batch
    surveys = [get_surveys("LSST")]
    serial = next(measure.MeasureGenerator(measure.sep_singleband_measure,
                                           StubGenerator(batch, surveys)))[1]
    mg = measure.MeasureGenerator(measure.sep_singleband_measure, StubGenerator(batch, surveys),
                                  cpus=2)
    try:
        parallel = next(mg)[1]
    finally:
        mg.close()
    name = "sep_singleband_measure"
    for a, b in zip(serial["catalog"][name], parallel["catalog"][name], strict=True):
        np.testing.assert_array_equal(a["x_peak"], b["x_peak"])
    for a, b in zip(serial["segmentation"][name], parallel["segmentation"][name], strict=True):
        np.testing.assert_array_equal(a, b)


def test_save_path_writes_when_utils_can(lsst_batch, tmp_path):
    _, batch = lsst_batch
    mg = measure.MeasureGenerator(measure.sep_singleband_measure,
                                  StubGenerator(batch, [get_surveys("LSST")]), save_path=tmp_path)
    next(metrics.MetricsGenerator(mg, save_path=tmp_path))
    from btkjax import utils  # noqa: F401  (the saver the generators call)
    assert len(os.listdir(tmp_path)) == 2  # one measure file, one metrics file
    loaded = utils.load_metrics_results(str(tmp_path))
    assert len(loaded["galaxy_summary"]["sep_singleband_measure"]) == sum(
        len(t) for t in batch["blend_list"])


# -- several surveys ------------------------------------------------------------------------------


def _two_survey_batch(batch):
    """LSST's batch served as LSST and as 'HSC' (bands g..y of the same images, same pixel grid),
    so every number of the second survey is known from the first."""
    lsst, hsc = get_surveys(["LSST", "HSC"])
    assert list(hsc.available_filters) == ["g", "r", "i", "z", "y"]
    shape = batch["blend_images"].shape[-2:]
    mr = {
        "blend_images": {"LSST": batch["blend_images"], "HSC": batch["blend_images"][:, 1:]},
        "isolated_images": {"LSST": batch["isolated_images"],
                            "HSC": batch["isolated_images"][:, :, 1:]},
        "blend_list": {"LSST": batch["blend_list"], "HSC": batch["blend_list"]},
        "psf": {"LSST": batch["psf"], "HSC": batch["psf"][1:]},
        "wcs": {"LSST": batch["wcs"], "HSC": make_wcs(0.2, shape)},
    }
    return mr, [lsst, hsc]


def test_multi_survey_measure_and_metrics(lsst_batch):
    _, batch = lsst_batch
    mr, surveys = _two_survey_batch(batch)
    mg = measure.MeasureGenerator(measure.sep_singleband_measure, StubGenerator(mr, surveys))
    mg_kw = {"meas_band_name": ("r", "r")}
    _, meas, res = next(metrics.MetricsGenerator(mg, **mg_kw))
    name = "sep_singleband_measure"
    cats = meas["catalog"][name]
    assert set(cats) == {"LSST", "HSC"} and len(cats["HSC"]) == BATCH
    for a, b in zip(cats["LSST"], cats["HSC"], strict=True):
        np.testing.assert_allclose(a["x_peak"], b["x_peak"], rtol=F64_SAME_RTOL)
    assert meas["segmentation"][name] == {"LSST": [None] * BATCH, "HSC": [None] * BATCH}
    det = res["detection"][name]
    assert det["LSST"]["recall"] == det["HSC"]["recall"] > 0.5
    summary = res["galaxy_summary"][name]
    # Same r-band images: identical blendedness; SNR differs only through the sky level.
    np.testing.assert_allclose(summary["LSST"]["blendedness"], summary["HSC"]["blendedness"])
    assert not np.allclose(summary["LSST"]["snr"], summary["HSC"]["snr"])
    with pytest.raises(ValueError, match="one band per survey"):
        metrics.MetricsGenerator(mg, meas_band_name=("r",))
    with pytest.raises(ValueError, match="'u' is not a band of survey HSC"):
        metrics.MetricsGenerator(mg, meas_band_name="u")


# -- metrics generator on real blends -------------------------------------------------------------


def test_metrics_generator_on_real_blends(lsst_batch):
    _, batch = lsst_batch
    gen = StubGenerator(batch, [get_surveys("LSST")])
    mg = measure.MeasureGenerator(measure.sep_singleband_measure, gen)
    target = {"ellipticity": metrics.meas_ksb_ellipticity, "flux": metrics.meas_fixed_aperture,
              "moments": metrics.meas_moments_ellipticity}
    _, meas, res = next(metrics.MetricsGenerator(mg, target_meas=target, meas_band_name="r"))
    name = "sep_singleband_measure"
    summary = res["galaxy_summary"][name]
    for col in ("ellipticity0", "ellipticity1", "flux0", "flux1", "moments0", "moments1"):
        assert col in summary.colnames and col + "_true" in summary.colnames
    # Per galaxy, recompute SNR, blendedness and the reconstruction metrics from the images.
    sky = btkjax.survey.get_mean_sky_level(gen.surveys[0], gen.surveys[0].get_filter("r"))
    row = 0
    for i, (table, match) in enumerate(zip(batch["blend_list"], res["matches"][name], strict=True)):
        iso = batch["isolated_images"][i, : len(table)].astype(float)
        noiseless = iso[:, 2].sum(axis=0)
        for j in range(len(table)):
            r = summary[row]
            s = iso[j, 2]
            assert r["blendedness"] == pytest.approx(1 - np.sum(s * s) / np.sum(s * noiseless))
            assert r["snr"] == pytest.approx(np.sqrt(np.sum(s * s / (sky + s))))
            k = match["match_detected_id"][j]
            assert r["detected"] == (k >= 0)
            if k >= 0:
                deb = meas["deblended_images"][name][i][k].astype(float)
                assert r["mse"] == pytest.approx(np.mean((iso[j] - deb) ** 2))
                assert r["ssim"] == pytest.approx(float(metrics.ssim(iso[j], deb)))
            row += 1
    assert row == len(summary)
    # The segmentation IoU is a real overlap, not BTK's identically-1 bug.
    ious = np.asarray(summary["iou"])[np.asarray(summary["detected"])]
    assert np.all((ious > 0) & (ious < 1))
