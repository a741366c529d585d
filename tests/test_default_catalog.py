"""The embedded default catalog: loads, validates, regenerates identically, resembles CatSim."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table
from conftest import CATSIM_SAMPLE

from btkjax.catalog import CATSIM_BANDS, CatsimCatalog
from btkjax.tolerances import DEFAULT_CATALOG_COLOR_ATOL, DEFAULT_CATALOG_SIZE_RATIO

REPO = Path(__file__).resolve().parents[1]
SAMPLE = CATSIM_SAMPLE
# Magnitude bins holding 18, 28, 26 and 28 of the sample's 100 galaxies.
SIZE_BINS = (17.0, 25.0, 26.0, 27.0, 28.0)


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "make_default_catalog", REPO / "data" / "make_default_catalog.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def default():
    return CatsimCatalog.default()


@pytest.fixture(scope="module")
def sample():
    if not SAMPLE.exists():
        pytest.skip(f"CatSim sample catalog not found at {SAMPLE}")
    return CatsimCatalog.from_file(SAMPLE)


def test_default_loads_and_validates(default, sample):
    t = default.table
    assert len(t) >= 10_000
    np.testing.assert_array_equal(t["ref_mag"], t["i_ab"])
    # same columns as CatSim's, in CatSim's order
    assert default.get_raw_catalog().colnames == sample.get_raw_catalog().colnames
    # validation passed (construction), and re-validation finds nothing
    assert CatsimCatalog._check_components(default.get_raw_catalog()) == []
    assert len(np.unique(t["galtileid"])) == len(t)


def test_regenerates_identically(script, tmp_path):
    out = script.main(tmp_path / "regen.fits")
    shipped = REPO / "btkjax" / "data" / "default_catalog.fits"
    new, old = Table.read(out), Table.read(shipped)
    assert new.colnames == old.colnames
    for c in old.colnames:
        assert new[c].dtype == old[c].dtype, c
        np.testing.assert_array_equal(np.asarray(new[c]), np.asarray(old[c]), err_msg=c)
    assert out.read_bytes() == shipped.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["regen.fits"]  # no temp file left behind


def test_median_size_in_magnitude_bins(default, sample):
    d, s = default.table, sample.table
    for lo, hi in zip(SIZE_BINS[:-1], SIZE_BINS[1:], strict=True):
        ms = (s["i_ab"] >= lo) & (s["i_ab"] < hi)
        md = (d["i_ab"] >= lo) & (d["i_ab"] < hi)
        assert ms.sum() >= 10 and md.sum() >= 100
        ratio = np.median(d["btk_size"][md]) / np.median(s["btk_size"][ms])
        assert 1 / DEFAULT_CATALOG_SIZE_RATIO < ratio < DEFAULT_CATALOG_SIZE_RATIO, (lo, hi, ratio)


def test_median_colors(default, sample):
    d, s = default.table, sample.table
    lo, hi = float(np.min(s["i_ab"])), float(np.max(s["i_ab"]))
    md = (d["i_ab"] >= lo) & (d["i_ab"] <= hi)
    for b1, b2 in zip(CATSIM_BANDS[:-1], CATSIM_BANDS[1:], strict=True):
        c_d = np.median(d[f"{b1}_ab"][md] - d[f"{b2}_ab"][md])
        c_s = np.median(s[f"{b1}_ab"] - s[f"{b2}_ab"])
        assert abs(c_d - c_s) < DEFAULT_CATALOG_COLOR_ATOL, (b1, b2, c_d, c_s)


def test_number_count_slope(default, script):
    """Maximum-likelihood slope of dN/dm ~ 10^(alpha m) on [I_MIN, I_MAX] within 3 sigma."""
    from scipy.optimize import brentq

    m = np.asarray(default.table["i_ab"], dtype=float)
    lo, hi = script.I_MIN, script.I_MAX
    assert m.min() >= lo and m.max() <= hi

    def mean_exact(b):
        e = np.exp(b * (hi - lo))
        return lo + (hi - lo) * e / (e - 1) - 1 / b

    b_hat = brentq(lambda b: mean_exact(b) - m.mean(), 0.05, 3.0)
    # Fisher information per galaxy for the natural parameter b is Var_b(m)
    e = np.exp(b_hat * (hi - lo))
    var = 1 / b_hat**2 - (hi - lo) ** 2 * e / (e - 1) ** 2
    sigma_alpha = 1 / np.sqrt(len(m) * var) / np.log(10)
    alpha_hat = b_hat / np.log(10)
    assert abs(alpha_hat - script.ALPHA) < 3 * sigma_alpha, (alpha_hat, sigma_alpha)


def test_agn_fraction_and_axes(default):
    t = default.table
    agn = np.mean(np.asarray(t["fluxnorm_agn"]) > 0)
    assert 0.01 <= agn <= 0.03
    assert np.all(t["a_d"] >= t["b_d"]) and np.all(t["a_b"] >= t["b_b"])
    for comp, a in (("disk", "a_d"), ("bulge", "a_b")):
        no_flux = np.asarray(t[f"fluxnorm_{comp}"]) == 0
        assert np.all(np.asarray(t[a])[no_flux] == 0)
    both = (np.asarray(t["fluxnorm_disk"]) > 0) & (np.asarray(t["fluxnorm_bulge"]) > 0)
    np.testing.assert_array_equal(t["pa_bulge"][both], t["pa_disk"][both])
    pa = np.asarray(t["pa_disk"])
    assert pa.min() >= 0 and pa.max() < 360
