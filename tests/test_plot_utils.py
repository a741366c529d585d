"""Each plot function on generated data: it writes a PNG with the expected panels."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from astropy.table import Table  # noqa: E402

import btkjax as btk  # noqa: E402
from btkjax import plot_utils  # noqa: E402


@pytest.fixture(scope="module")
def run():
    catalog = btk.catalog.CatsimCatalog.default()
    sampler = btk.sampling_functions.DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0)
    draw = btk.draw_blends.CatsimGenerator(catalog, sampler, btk.survey.get_surveys("LSST"),
                                           batch_size=4)
    meas = btk.measure.MeasureGenerator(btk.measure.sep_singleband_measure, draw)
    metrics = btk.metrics.MetricsGenerator(
        meas, target_meas={"ellipticity": btk.metrics.meas_ksb_ellipticity,
                           "flux": btk.metrics.meas_fixed_aperture}, meas_band_name="r")
    yield next(metrics)
    plt.close("all")


def _titled(fig):
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def _save(fig, path):
    fig.savefig(path)
    assert path.stat().st_size > 1000
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_blends(run, tmp_path):
    blend_results, meas_results, _ = run
    images, tables = blend_results["blend_images"], blend_results["blend_list"]
    figs = plot_utils.plot_blends(images[:3], tables[:3], limits=(30, 90), norm="asinh", Q=0.1)
    assert len(figs) == 3
    for fig, table in zip(figs, tables, strict=False):
        assert len(fig.axes) == 3
        assert _titled(fig) == ["RGB (bands 3, 2, 1)", "Sum of all bands",
                                f"{len(table)} objects with centers"]
        assert fig.axes[0].get_xlim() == (30, 90) and fig.axes[2].get_ylim() == (30, 90)
        x, y = fig.axes[2].lines[0].get_data()  # true centers
        assert np.allclose(x, table["x_peak"]) and np.allclose(y, table["y_peak"])
    _save(figs[0], tmp_path / "blends.png")
    # detections overlaid, Lupton stretch
    detections = meas_results["catalog"]["sep_singleband_measure"]
    fig = plot_utils.plot_blends(images[:1], tables[:1], detected_centers=detections[:1],
                                 norm="lupton", Q=8)[0]
    assert len(fig.axes[2].lines) == 2
    assert fig.axes[2].get_title() == f"{len(tables[0])} true, {len(detections[0])} detected"
    # the stretches differ and stay in range
    rgb = {n: plot_utils.get_rgb_image(images[0][[1, 2, 3]], norm=n, Q=0.1) for n in plot_utils.NORMS}
    assert all(v.dtype == np.uint8 and v.shape == (120, 120, 3) for v in rgb.values())
    assert not np.array_equal(rgb["asinh"], rgb["linear"])
    with pytest.raises(ValueError, match="norm must be one of"):
        plot_utils.plot_blends(images[:1], tables[:1], norm="log")
    with pytest.raises(ValueError, match="limits must be"):
        plot_utils.plot_blends(images[:1], tables[:1], limits=(90, 30))
    with pytest.raises(TypeError, match="multi-survey"):
        plot_utils.plot_blends({"LSST": images}, {"LSST": tables})
    plt.close("all")


def test_plot_gal_parameters(run, tmp_path):
    tables = run[0]["blend_list"]
    fig = plot_utils.plot_gal_parameters(tables)
    n_gal = sum(len(t) for t in tables)
    assert _titled(fig) == [f"Size ({n_gal} galaxies)", f"Magnitude ({n_gal} galaxies)"]
    counts = [sum(p.get_height() if hasattr(p, "get_height") else 0 for p in ax.patches)
              for ax in fig.axes]
    assert fig.axes[0].get_xlabel().startswith("btk_size")
    assert fig.axes[1].get_xlabel().startswith("ref_mag")
    assert len(counts) == 2
    _save(fig, tmp_path / "params.png")
    with pytest.raises(ValueError, match="lack column"):
        plot_utils.plot_gal_parameters([Table({"a": [1.0]})])
    plt.close("all")


def test_plot_metrics_summary(run, tmp_path):
    results = run[2]
    figs = plot_utils.plot_metrics_summary(results, interactive=False,
                                           target_meas_keys=["ellipticity0", "flux0"],
                                           target_meas_limits=[(-1, 1), (0, 100000)])
    assert list(figs) == ["efficiency", "recall", "reconstruction", "target_measures"]
    assert _titled(figs["efficiency"])[0].startswith("Efficiency matrix: sep_singleband_measure")
    assert _titled(figs["recall"]) == ["Recall vs snr", "Recall vs blendedness"]
    assert _titled(figs["reconstruction"]) == ["MSR", "MSE", "PSNR", "SSIM", "IoU (segmentation)"]
    assert _titled(figs["target_measures"]) == [
        "ellipticity0: measured vs true", "flux0: measured vs true",
        "ellipticity0: residual", "flux0: residual"]
    assert figs["target_measures"].axes[0].get_xlim() == (-1, 1)
    for name, fig in figs.items():
        _save(fig, tmp_path / f"{name}.png")
    with pytest.raises(ValueError, match=r"'ellipticity9'.*target measures there are"):
        plot_utils.plot_metrics_summary(results, target_meas_keys=["ellipticity9"])
    with pytest.raises(ValueError, match="target_meas_limits has 1 entries for 2"):
        plot_utils.plot_metrics_summary(results, target_meas_keys=["flux0", "flux1"],
                                        target_meas_limits=[(0, 1)])
    plt.close("all")


def test_plot_metrics_summary_hand_built():
    """On a hand-built results dict: the efficiency numbers and recall curve are the inputs'."""
    eff = np.array([[0, 0, 50], [0, 100, 0], [0, 0, 50], [0, 0, 0]], float)
    summary = Table({"snr": [5.0, 10.0, 20.0, 40.0], "blendedness": [0.0, 0.1, 0.5, 0.9],
                     "detected": [False, True, True, True], "msr": [np.nan, 1.0, 2.0, 3.0],
                     "flux": [np.nan, 10.0, 21.0, 29.0], "flux_true": [5.0, 10.0, 20.0, 30.0]})
    results = {"detection": {"m": {"precision": 1.0, "recall": 0.75, "f1": 0.857,
                                   "eff_matrix": eff}},
               "galaxy_summary": {"m": summary}}
    figs = plot_utils.plot_metrics_summary(results, n_bins=2)
    ax = figs["efficiency"].axes[0]
    assert [t.get_text() for t in ax.texts] == ["0", "50", "100", "0", "0", "50", "0", "0"]
    assert "precision 1.00, recall 0.75, f1 0.86" in ax.get_title()
    x, recall = figs["recall"].axes[0].lines[0].get_data()
    assert np.allclose(recall, [0.5, 1.0])  # snr bins [5, 14.1) and [14.1, 40]
    residuals = np.concatenate([p.get_path().vertices[:, 0] for p in
                                figs["target_measures"].axes[1].patches])
    assert residuals.min() == pytest.approx(-1.0) and residuals.max() == pytest.approx(1.0)
    plt.close("all")


def test_plot_with_deblended(run, tmp_path):
    blend_results, meas_results, results = run
    name = "sep_singleband_measure"
    figs = plot_utils.plot_with_deblended(
        blend_results["blend_images"], blend_results["isolated_images"],
        blend_results["blend_list"], meas_results["catalog"][name],
        meas_results["deblended_images"][name], results["matches"][name],
        indexes=[0, 1], band_indices=[1, 2, 3])
    assert len(figs) == 2
    for i, fig in enumerate(figs):
        n_true = len(blend_results["blend_list"][i])
        ids = np.asarray(results["matches"][name][i]["match_detected_id"])
        titles = _titled(fig)
        assert titles[:3] == [f"Blend {i}: {n_true} true, "
                              f"{len(meas_results['catalog'][name][i])} detected",
                              "Sum of deblended", "Blend - sum of deblended"]
        assert titles.count("True - deblended") == int((ids >= 0).sum())
        assert titles.count("Not detected") == int((ids < 0).sum())
        assert sum(t.startswith("True galaxy") for t in titles) == n_true
        _save(fig, tmp_path / f"deblended_{i}.png")
    with pytest.raises(IndexError, match="index 9 out of range"):
        plot_utils.plot_with_deblended(
            blend_results["blend_images"], blend_results["isolated_images"],
            blend_results["blend_list"], meas_results["catalog"][name],
            meas_results["deblended_images"][name], results["matches"][name], indexes=[9])
    plt.close("all")
