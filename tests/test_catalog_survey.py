"""Catalogs and surveys: loading, validation errors, galcheat's numbers, PSFs, WCS."""

import os

import astropy.units as u
import galcheat
import galcheat.utilities
import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from conftest import CATSIM_SAMPLE

import btkjax
from btkjax.catalog import CatalogError, CatsimCatalog
from btkjax.survey import (
    SurveyError,
    available_surveys,
    default_psf_params,
    evaluate_psf,
    get_flux,
    get_mean_sky_level,
    get_psf_from_file,
    get_surveys,
    make_wcs,
)
from btkjax.tolerances import F32_SAME_RTOL, F64_SAME_ATOL, F64_SAME_RTOL, PIXEL_ATOL


def test_default_seed_at_top():
    assert isinstance(btkjax.DEFAULT_SEED, int)


def test_catsim_sample_loads_fits_and_ascii(tmp_path, catsim_sample):
    raw = Table.read(CATSIM_SAMPLE)
    assert len(catsim_sample) == len(raw) == 100
    np.testing.assert_array_equal(catsim_sample.table["ref_mag"], raw["i_ab"])
    # BTK 0.9's size: hypot(a_d sqrt(1-f) 4.66, a_b sqrt(f) 1.46), f the bulge fraction.
    row = catsim_sample.table[7]
    f = row["fluxnorm_bulge"] / (row["fluxnorm_bulge"] + row["fluxnorm_disk"])
    expected = np.hypot(row["a_d"] * np.sqrt(1 - f) * 4.66, row["a_b"] * np.sqrt(f) * 1.46)
    assert row["btk_size"] == pytest.approx(expected, rel=F64_SAME_RTOL)
    assert catsim_sample.get_raw_catalog() is not catsim_sample.table
    assert "btk_size" not in catsim_sample.get_raw_catalog().colnames

    path = tmp_path / "catalog.txt"
    raw.write(path, format="ascii.basic")
    ascii_cat = CatsimCatalog.from_file(path)
    np.testing.assert_allclose(ascii_cat.table["r_ab"], raw["r_ab"], rtol=F64_SAME_RTOL)
    from_table = CatsimCatalog(raw)
    np.testing.assert_array_equal(from_table.table["btk_size"], catsim_sample.table["btk_size"])


def test_missing_column_is_named():
    raw = Table.read(CATSIM_SAMPLE)
    raw.remove_column("a_d")
    with pytest.raises(CatalogError, match=r"missing required column\(s\) \['a_d'\]"):
        CatsimCatalog(raw)


def test_nan_magnitudes_name_column_and_rows():
    raw = Table.read(CATSIM_SAMPLE)
    raw["g_ab"][[3, 17]] = np.nan
    raw["a_b"][5] = np.inf
    with pytest.raises(CatalogError) as err:
        CatsimCatalog(raw)
    message = str(err.value)
    assert "'g_ab'" in message and "rows [3, 17]" in message
    assert "'a_b'" in message and "rows [5]" in message


def test_component_with_flux_but_no_size_rejected():
    raw = Table.read(CATSIM_SAMPLE)
    row = int(np.flatnonzero(raw["fluxnorm_disk"] > 0)[0])
    raw["b_d"][row] = 0.0
    with pytest.raises(CatalogError, match=rf"disk has flux.*rows \[{row}\]"):
        CatsimCatalog(raw)


def test_not_a_table_and_missing_file():
    with pytest.raises(TypeError, match="astropy.table.Table"):
        CatsimCatalog({"ra": [0.0]})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CatsimCatalog.from_file("/nonexistent/catalog.fits")


@pytest.mark.parametrize("name", available_surveys())
def test_every_survey_loads_with_galcheat_numbers(name):
    survey = get_surveys(name)
    assert survey.name == name
    codex = galcheat.get_survey(name) if name in galcheat.available_surveys else None
    for band in survey.available_filters:
        filt = survey.get_filter(band)
        psf = evaluate_psf(survey, filt)
        assert psf.flux == pytest.approx(1.0)
        if codex is not None:
            # exactly galcheat's electrons, through galcheat's own functions
            expected = galcheat.utilities.mag2counts(24.0, name, band).value
            assert get_flux([24.0], survey, filt)[0] == expected
            sky = galcheat.utilities.mean_sky_level(name, band).value
            assert get_mean_sky_level(survey, filt) == pytest.approx(sky, rel=F64_SAME_RTOL)


def test_surveycodex_only_surveys_are_accepted():
    extra = [s for s in ("Roman_WFI", "Euclid_NISP", "SDSS", "PanSTARRS") if s in available_surveys()]
    assert len(extra) == 4
    surveys = get_surveys(extra)
    assert [s.name for s in surveys] == extra


def test_unknown_survey_and_filter_list_valid_names():
    with pytest.raises(SurveyError) as err:
        get_surveys("LSTT")
    assert "'LSTT'" in str(err.value) and "LSST" in str(err.value) and "HSC" in str(err.value)
    lsst = get_surveys("LSST")
    with pytest.raises(SurveyError, match=r"'q'.*\['u', 'g', 'r', 'i', 'z', 'y'\]"):
        lsst.get_filter("q")


def test_default_psf_is_btk_model():
    lsst = get_surveys("LSST")
    filt = lsst.get_filter("i")
    params = default_psf_params(lsst, filt)
    # obscuration from effective over mirror area, lambda/D from the effective wavelength
    mirror = np.pi * (0.5 * 8.36) ** 2
    ratio = lsst.effective_area.to_value("m2") / mirror
    assert params["obscuration"] == pytest.approx(np.sqrt(1 - ratio))
    lam = filt.effective_wavelength.to_value("m")
    assert params["lam_over_diam"] == pytest.approx(np.degrees(lam / 8.36) * 3600)
    ref = galsim.Convolve(
        galsim.Kolmogorov(fwhm=filt.psf_fwhm.value),
        galsim.Airy(lam_over_diam=params["lam_over_diam"], obscuration=params["obscuration"]),
    )
    a = filt.psf.drawImage(nx=31, ny=31, scale=0.2).array
    b = ref.drawImage(nx=31, ny=31, scale=0.2).array
    np.testing.assert_allclose(a, b, atol=F64_SAME_ATOL)


def test_surveys_are_modifiable_and_custom_psfs():
    lsst = get_surveys("LSST")
    lsst.pixel_scale = 0.3 * u.arcsec
    lsst.get_filter("r").psf_fwhm = 1.1 * u.arcsec
    assert lsst.pixel_scale.value == 0.3 and lsst.get_filter("r").psf_fwhm.value == 1.1

    def custom(survey, filtr):
        return galsim.Kolmogorov(fwhm=filtr.psf_fwhm.to_value("arcsec"))

    custom_lsst = get_surveys("LSST", custom)
    assert custom_lsst.get_filter("g").psf.fwhm == pytest.approx(0.86)

    calls = []

    def random_psf(survey, filtr):
        def draw():
            calls.append(filtr.name)
            return galsim.Kolmogorov(fwhm=filtr.psf_fwhm.value + np.random.uniform(-0.1, 0.1))
        return draw

    rnd = get_surveys("LSST", random_psf)
    f = rnd.get_filter("u")
    p1, p2 = evaluate_psf(rnd, f), evaluate_psf(rnd, f)
    assert calls == ["u", "u"] and p1.fwhm != p2.fwhm

    with pytest.raises(TypeError, match="expected a GalSim or JAX-GalSim object"):
        get_surveys("LSST", lambda s, f: 3.0)


def test_get_psf_from_file(tmp_path):
    arr = galsim.Moffat(beta=3, fwhm=0.7).drawImage(nx=25, ny=25, scale=0.2).array
    for i in range(3):
        fits.writeto(tmp_path / f"psf{i}.fits", arr * (i + 1))
    psf = get_psf_from_file(tmp_path, get_surveys("LSST").pixel_scale,
                            rng=np.random.default_rng(0))
    assert psf.flux == pytest.approx(1.0)
    np.testing.assert_allclose(psf.drawImage(nx=25, ny=25, scale=0.2, method="no_pixel").array,
                               arr / arr.sum(), atol=F32_SAME_RTOL)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="No PSF FITS"):
        get_psf_from_file(tmp_path / "empty", 0.2)


@pytest.mark.parametrize("size", [120, 121])
def test_make_wcs_center_and_scale(size):
    wcs = make_wcs(0.2, (size, size))
    x, y = wcs.world_to_pixel_values(0.0, 0.0)
    assert x == pytest.approx((size - 1) / 2) and y == pytest.approx((size - 1) / 2)
    x2, y2 = wcs.world_to_pixel_values(1.0 / 3600, 0.5 / 3600)  # 1" east, 0.5" north
    assert x2 - x == pytest.approx(5.0, abs=PIXEL_ATOL)
    assert y2 - y == pytest.approx(2.5, abs=PIXEL_ATOL)
