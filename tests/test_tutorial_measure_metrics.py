"""The tutorial's Measurement and Metrics sections, run cell by cell on btkjax.

Set-up cells (imports, seed, catalog, sampling function) come from the tutorial too; the survey
is ``get_surveys("LSST")`` and the batches hold 8 blends instead of 100.
"""

import importlib.util

import matplotlib
import numpy as np
import pytest
from tutorial import code_cells, to_btkjax

matplotlib.use("Agg")

from conftest import CATSIM_SAMPLE  # noqa: E402

BATCH = 8
HAS_PLOT_UTILS = importlib.util.find_spec("btkjax.plot_utils") is not None


def _prepare(cell):
    code = to_btkjax(cell, {"../data/sample_input_catalog.fits": str(CATSIM_SAMPLE)})
    code = code.replace("batch_size=100", f"batch_size={BATCH}")
    code = code.replace("n_batch=100", f"n_batch={BATCH}")
    if not HAS_PLOT_UTILS:
        code = "\n".join(
            "pass" if "plot_utils" in line else line for line in code.splitlines()
        )
    return code


def _run(cells, namespace):
    for cell in cells:
        exec(compile(_prepare(cell), "<tutorial>", "exec"), namespace)


@pytest.fixture(scope="module")
def tutorial_namespace(catsim_sample):
    import matplotlib.pyplot as plt
    import sep

    # The tutorial's example measure function uses SEP without importing it (a notebook user
    # imports it); everything else comes from the tutorial's own cells.
    ns = {"__name__": "tutorial", "sep": sep}
    _run(code_cells("Setup", "Draw some blends"), ns)
    catalog_cells = code_cells("Catalog", "Sampling function")
    sampling_cells = code_cells("Sampling function", "Survey")[:1]
    _run(catalog_cells + sampling_cells, ns)
    exec("LSST = btk.survey.get_surveys('LSST')", ns)
    draw_cell = [c for c in code_cells("Drawing the blends", "Measurement")
                 if "CatsimGenerator(" in c]
    _run(draw_cell, ns)
    _run(code_cells("Measurement", "Metrics"), ns)
    _run(code_cells("Metrics", "Saving the results"), ns)
    plt.close("all")
    first = {k: ns[k] for k in ("blend_results", "meas_results", "results")}
    _run(code_cells("Saving the results", "Using COSMOS galaxies"), ns)
    ns["saved_run"] = {k: ns[k] for k in ("blend_results", "meas_results", "results")}
    ns.update(first)
    return ns


def test_measure_cells(tutorial_namespace):
    ns = tutorial_namespace
    meas = ns["meas_results"]
    blend_results = ns["blend_results"]
    cats = meas["catalog"]["sep_singleband_measure"]
    assert len(cats) == BATCH
    assert all({"ra", "dec", "x_peak", "y_peak"} <= set(c.colnames) for c in cats)
    # Most true galaxies have a detection within 3 pixels.
    found = 0
    for cat, true in zip(cats, blend_results["blend_list"], strict=True):
        if len(cat):
            d = np.hypot(np.asarray(cat["x_peak"])[:, None] - np.asarray(true["x_peak"])[None],
                         np.asarray(cat["y_peak"])[:, None] - np.asarray(true["y_peak"])[None])
            found += int(np.sum(d.min(axis=0) < 3.0))
    assert found >= 0.6 * sum(len(t) for t in blend_results["blend_list"])
    segs = meas["segmentation"]["sep_singleband_measure"]
    debl = meas["deblended_images"]["sep_singleband_measure"]
    for cat, seg, deb, img in zip(cats, segs, debl, blend_results["blend_images"], strict=True):
        assert seg.shape == (len(cat), *img.shape[1:]) and seg.dtype == bool
        np.testing.assert_array_equal(deb, img[None] * seg[:, None])

    # The tutorial's own example function runs on the batch too.
    out = ns["sep_measure"](blend_results, 0)
    assert len(out["catalog"]) == len(out["segmentation"]) == len(out["deblended_images"])


def test_metrics_cells(tutorial_namespace):
    ns = tutorial_namespace
    results = ns["results"]
    name = "sep_singleband_measure"
    summary = results["galaxy_summary"][name]
    for col in ("ellipticity0", "ellipticity0_true", "ellipticity1", "flux0", "flux0_true",
                "blendedness", "snr", "iou", "mse", "psnr", "ssim", "detected"):
        assert col in summary.colnames, col
    det = results["detection"][name]
    n_true = sum(len(t) for t in ns["blend_results"]["blend_list"])
    n_det = sum(len(c) for c in ns["meas_results"]["catalog"][name])
    assert det["n_true"] == n_true == len(summary)
    assert det["precision"] == pytest.approx(int(np.sum(summary["detected"])) / n_det)
    assert det["recall"] == pytest.approx(np.mean(summary["detected"]))
    assert len(results["matches"][name]) == BATCH
    # Matched galaxies have finite metrics, unmatched ones NaN.
    detected = np.asarray(summary["detected"])
    assert np.all(np.isfinite(summary["ssim"][detected]))
    assert np.all(np.isnan(summary["ssim"][~detected]))
    # SEP's segments are cut at 1.5 sigma, so a deblended image holds less flux than the true
    # galaxy within the PSF-sized aperture, yet follows it closely from galaxy to galaxy.
    flux, flux_true = (np.asarray(summary[k][detected]) for k in ("flux0", "flux0_true"))
    assert 0.4 < np.median(flux / flux_true) < 1.1
    assert np.corrcoef(np.log(np.clip(flux, 1, None)), np.log(flux_true))[0, 1] > 0.8


def test_saving_cells(tutorial_namespace):
    ns = tutorial_namespace
    # The tutorial's last cell replaced the run's results by what load_all_results read back.
    loaded = ns["saved_run"]["results"]["galaxy_summary"]["sep_singleband_measure"]
    assert "ellipticity0" in loaded.colnames and "flux0" not in loaded.colnames
    assert len(loaded) == sum(len(t) for t in ns["saved_run"]["blend_results"]["blend_list"])
