"""The deblending benchmark's own scoring and the flux error calibration (benchmarks/), which
the README's deblending tables and `FLUX_ERROR_MODEL` rest on."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from btkjax.deblend import FLUX_ERROR_MODEL
from btkjax.metrics import blendedness
from btkjax.tolerances import F64_SAME_RTOL, MAD_WIDTH_SE, NOISE_N_SIGMA

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_deblend  # noqa: E402
import calibrate_flux_errors as cal  # noqa: E402
import compare_rows  # noqa: E402


def test_bench_blendedness_is_btks():
    """bench_deblend's own blendedness (written apart from btkjax) equals btkjax.metrics'."""
    rng = np.random.default_rng(0)
    iso = rng.exponential(1.0, (4, 20, 20)) * (rng.random((4, 20, 20)) < 0.3)
    np.testing.assert_allclose(bench_deblend.blendedness(iso), blendedness(iso),
                               rtol=F64_SAME_RTOL)


def test_bench_matching_by_hand():
    """Hungarian matching on pixel distance: the pairing of least total distance, pairs beyond
    MATCH_PX rejected."""
    tx, ty = np.array([10.0, 13.0, 40.0]), np.array([10.0, 10.0, 40.0])
    dx = np.array([11.5, 8.0, 40.0 + bench_deblend.MATCH_PX + 0.1])
    dy = np.array([10.0, 10.0, 40.0])
    got = bench_deblend.match(tx, ty, dx, dy)
    # true 0 <- detection 1 (2.0 px) and true 1 <- detection 0 (1.5): 3.5 in all, against 6.5
    # for the nearest-first pairing (true 0 <- 0 at 1.5, true 1 <- 1 at 5.0); true 2's only
    # detection is beyond MATCH_PX
    np.testing.assert_array_equal(got, [1, 0, -1])


def test_bench_weighted_moments_of_an_elliptical_gaussian():
    """A Gaussian of covariance C weighted by a round one of sigma 3 px is a Gaussian of
    covariance (C^-1 + I / 9)^-1: its distortion by hand (sampled at 1.5 px or wider, the pixel
    sums equal the integrals to float64 rounding)."""
    c = np.array([[6.0, 1.5], [1.5, 3.0]])
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    d = np.stack([xx - 31.3, yy - 32.6], axis=-1)
    img = np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(c), d))
    cw = np.linalg.inv(np.linalg.inv(c) + np.eye(2) / 9.0)
    want = ((cw[0, 0] - cw[1, 1]) / np.trace(cw), 2 * cw[0, 1] / np.trace(cw))
    np.testing.assert_allclose(bench_deblend.moments_e(img, 31.3, 32.6), want,
                               rtol=F64_SAME_RTOL)


def test_bench_scores_by_hand():
    """One blend of two galaxies (flat squares), one detected: the matched galaxy's deblended
    image is 1.1x its isolated image in every band, so dflux = 0.1, mse = mean((0.1 I)^2) and
    the pull = 0.1 F / i_flux_err; the other is unmatched; a NaN pixel is counted."""
    from astropy.table import Table

    iso = np.zeros((2, 6, 20, 20))
    iso[0, :, 2:6, 2:6] = 10.0
    iso[1, :, 12:16, 12:16] = 5.0
    truth = Table({"x_peak": [3.5, 13.5], "y_peak": [3.5, 13.5]})
    cat = Table({"x_peak": [3.0], "y_peak": [4.0], "i_flux_err": [16.0]})
    out = {"catalog": cat, "deblended_images": 1.1 * iso[:1]}
    rows, bad = bench_deblend.score_blend(truth, iso, out)
    assert not bad and [r["matched"] for r in rows] == [True, False]
    assert rows[0]["dflux"] == pytest.approx(0.1, rel=F64_SAME_RTOL)
    assert rows[0]["mse"] == pytest.approx((1.0**2) * 16 / 400, rel=F64_SAME_RTOL)
    assert rows[0]["pull"] == pytest.approx(0.1 * 160.0 / 16.0, rel=F64_SAME_RTOL)
    assert rows[0]["blendedness"] == 0.0 and np.isnan(rows[1]["dflux"])
    out["deblended_images"] = out["deblended_images"].copy()
    out["deblended_images"][0, 2, 0, 0] = np.nan
    assert bench_deblend.score_blend(truth, iso, out)[1]


def test_bootstrap_interval_of_the_median():
    """One blend: every resampling is that blend, the interval is its median. Many blends of one
    Gaussian galaxy each: the interval holds the median and its half-width is near the median's
    standard error sqrt(pi / 2) / sqrt(n)."""
    v = np.array([0.3, 0.1, 0.7])
    assert bench_deblend.bootstrap_median(v, [5, 5, 5]) == [0.3, 0.3]
    n = 400
    x = np.random.default_rng(1).normal(0.0, 1.0, n)
    lo, hi = bench_deblend.bootstrap_median(x, np.arange(n))
    se = np.sqrt(np.pi / 2) / np.sqrt(n)
    assert lo < np.median(x) < hi
    assert 0.5 * se < (hi - lo) / 2 < 1.5 * se


def _synthetic(n, floor, blend, seed):
    """Galaxies whose flux errors follow `FluxErrorModel` (floor, blend) exactly."""
    rng = np.random.default_rng(seed)
    b = rng.uniform(0.0, 1.0, n)
    flux = 10 ** rng.uniform(4.0, 6.0, n)
    fisher = np.sqrt(flux)
    sigma = np.sqrt(fisher**2 + (floor * flux) ** 2 + (blend * b * flux) ** 2)
    return {"true_b": b, "b": b, "flux": flux, "fisher": fisher,
            "diff": rng.normal(0.0, 1.0, n) * sigma}


def test_calibration_brings_known_pulls_to_unit_width():
    """Pulls drawn with a known (floor, blend): the Fisher errors alone are too small in every
    bin; the fitted model brings each bin's robust width to 1 within the width's standard
    error (NOISE_N_SIGMA of MAD_WIDTH_SE / sqrt(n)). (The floor itself is weakly determined by
    three widths: the fit is judged by the widths, not by the numbers it returns.)"""
    d = _synthetic(3000, 0.03, 0.6, seed=2)
    fisher = cal.stats(d, 0.0, 0.0)
    assert all(s["width"] > 3 for s in fisher[:3])
    floor, blend = cal.fit(d, floors=np.arange(0.0, 0.1, 0.01), blends=np.arange(0.0, 1.5, 0.05))
    for s in cal.stats(d, floor, blend)[:3]:
        assert abs(s["width"] - 1) < NOISE_N_SIGMA * MAD_WIDTH_SE / np.sqrt(s["n"]), s
    # the by-hand statistics of one bin
    sel = d["true_b"] >= 0.5
    p = d["diff"][sel] / np.sqrt(d["fisher"][sel] ** 2 + (floor * d["flux"][sel]) ** 2 +
                                 (blend * d["b"][sel] * d["flux"][sel]) ** 2)
    s = cal.stats(d, floor, blend)[2]
    assert s["n"] == sel.sum()
    assert s["width"] == pytest.approx(1.4826 * np.median(np.abs(p - np.median(p))),
                                       rel=F64_SAME_RTOL)
    assert s["within_1"] == pytest.approx(np.mean(np.abs(p) < 1), rel=F64_SAME_RTOL)


def test_calibration_rows_with_nan_are_left_out_and_empty_bins_refused(tmp_path, capsys):
    """A galaxy with a NaN Fisher error is reported and left out, not allowed to make every
    objective NaN (which would fit (0, 0)); a bin with no galaxy is an error."""
    d = _synthetic(600, 0.03, 0.6, seed=3)
    rows = [{"matched": True, "blendedness": float(d["true_b"][i]),
             "flux": float(d["diff"][i] + 1e5), "flux_true": 1e5, "i_flux": float(d["flux"][i]),
             "i_flux_err_fisher": float(d["fisher"][i]), "i_blendedness": float(d["b"][i])}
            for i in range(600)]
    rows[0]["i_flux_err_fisher"] = float("nan")
    for r in rows:  # another band's columns: the i band's scaled by 2
        r["bands"] = {"r": {"flux": 2 * r["flux"], "flux_true": 2e5,
                            "flux_fit": 2 * r["i_flux"], "flux_err_fisher": 2 * r[
                                "i_flux_err_fisher"], "blendedness_fit": r["i_blendedness"],
                            "blendedness": r["blendedness"]}}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"summary": {}, "rows": {"btkjax": rows}}))
    got = cal.load(path)
    assert len(got["diff"]) == 599 and "1 of 600" in capsys.readouterr().out
    # (diff + 1e5) - 1e5 rounds at 1e5's float64 spacing
    np.testing.assert_allclose(got["diff"], d["diff"][1:], rtol=0, atol=1e5 * F64_SAME_RTOL)
    assert cal.fit(got, floors=np.arange(0.0, 0.1, 0.01),
                   blends=np.arange(0.0, 1.5, 0.05)) != (0.0, 0.0)
    got_r = cal.load(path, band="r")  # the same galaxies, pulls unchanged by the scale
    np.testing.assert_allclose(got_r["diff"], 2 * got["diff"], rtol=F64_SAME_RTOL)
    for a, b in zip(cal.stats(got_r, 0.03, 0.6), cal.stats(got, 0.03, 0.6), strict=True):
        assert a["width"] == pytest.approx(b["width"], rel=F64_SAME_RTOL)
    low = {k: v[got["true_b"] >= 0.1] for k, v in got.items()}
    with pytest.raises(ValueError, match="No matched galaxy in the blendedness bin < 0.1"):
        cal.stats(low, 0.0, 0.0)
    # two files (the two tuning sets): their rows concatenated, each file's NaN left out; a
    # method the rows do not have is refused by name
    path2 = tmp_path / "rows2.json"
    path2.write_text(json.dumps({"summary": {}, "rows": {"other": rows[:10], "btkjax": rows}}))
    both = cal.load([path, path2])
    assert len(both["diff"]) == 2 * 599
    np.testing.assert_array_equal(both["diff"], np.concatenate([got["diff"], got["diff"]]))
    assert len(cal.load(path2, method="other")["diff"]) == 9
    with pytest.raises(ValueError, match=r"has no rows of method 'btkjax_net'; it has \['btkjax'\]"):
        cal.load(path, method="btkjax_net")


def test_flux_error_model_is_the_calibration_on_record():
    """`FLUX_ERROR_MODEL` is what benchmarks/calibrate_flux_errors.py --fit wrote."""
    rec = json.loads((BENCH / "results" / "flux_error_calibration.json").read_text())
    assert rec["mode"] == "fit"
    assert (FLUX_ERROR_MODEL.floor, FLUX_ERROR_MODEL.blend) == (rec["floor"], rec["blend"])
    # the other bands' pairs, each fitted on its own pulls (--fit ROWS --band u,g,r,z,y)
    rec = json.loads((BENCH / "results" / "flux_error_calibration_bands.json").read_text())
    assert rec["mode"] == "fit"
    assert FLUX_ERROR_MODEL.bands == tuple((r["band"], r["floor"], r["blend"])
                                           for r in rec["per_band"])
    # a band it does not name (the i band) takes the top-level pair
    assert FLUX_ERROR_MODEL.coefficients("i") == (FLUX_ERROR_MODEL.floor, FLUX_ERROR_MODEL.blend)
    for r in rec["per_band"]:
        assert FLUX_ERROR_MODEL.coefficients(r["band"]) == (r["floor"], r["blend"])


def test_compare_rows_is_a_paired_bootstrap_of_the_bins_medians():
    """Two runs on the same blends: where run B's flux error is run A's less 0.05 for every
    matched galaxy of a bin, the difference of the bin's medians is -0.05 in every resampling
    (the same blends are drawn for both); a galaxy B matches that A did not counts in B's
    median only; rows of other blends are refused."""
    rng = np.random.default_rng(3)
    n = 60
    bl = np.concatenate([rng.uniform(0.0, 0.09, n), rng.uniform(0.6, 0.9, n)])
    blend = np.repeat(np.arange(n), 2)
    da = rng.uniform(0.1, 0.5, 2 * n)
    rows_a = [{"blendedness": float(b), "matched": True, "dflux": float(d), "blend": int(k)}
              for b, d, k in zip(bl, da, blend, strict=True)]
    rows_b = [dict(r, dflux=r["dflux"] - 0.05) for r in rows_a]
    out = compare_rows.paired(rows_a, rows_b, n_boot=200)
    for name in ("< 0.1", "> 0.5", "all"):
        np.testing.assert_allclose(out[name]["diff_percentiles"], -0.05, rtol=F64_SAME_RTOL)
        assert out[name]["matched_a"] == out[name]["matched_b"] == out[name]["n_true"]
    assert out["0.1 - 0.5"]["n_true"] == 0
    # one galaxy A missed, B matched with a huge error: B's median moves, A's does not
    rows_a[-1] = dict(rows_a[-1], matched=False, dflux=float("nan"))
    rows_b[-1] = dict(rows_b[-1], dflux=100.0)
    out = compare_rows.paired(rows_a, rows_b, n_boot=200)
    heavy = [r["dflux"] for r in rows_a if r["blendedness"] > 0.5 and r["matched"]]
    assert out["> 0.5"]["matched_b"] == out["> 0.5"]["matched_a"] + 1
    assert out["> 0.5"]["median_a"] == pytest.approx(float(np.median(heavy)), rel=F64_SAME_RTOL)
    with pytest.raises(ValueError, match="not of the same blends"):
        compare_rows.paired(rows_a, rows_b[:-1])


def test_tuning_and_reporting_seeds_are_disjoint():
    """No seed of one of bench_deblend.py's sets (tuning or reporting) is another set's, nor
    the project's other benchmarks' (sampler 1, draw 2), so no reporting blend was tuned on."""
    sets = {name: {s for pair in pairs for s in pair}
            for name, pairs in bench_deblend.SEEDS.items()}
    assert {"tune", "tune2", "report", "report2", "report3"} <= set(sets)
    names = sorted(sets)
    for i, a in enumerate(names):
        assert not sets[a] & {1, 2}, a
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b, sets[a] & sets[b])
