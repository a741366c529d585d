"""No silent garbage: every bad input found by issue 16 gets an error naming the value and what
was expected, raised before any image is drawn (catalog, sampling output, survey/PSF, generator,
measure boundary)."""

import time

import galsim
import numpy as np
import pytest
from astropy.table import Table

from btkjax.catalog import MAGNITUDE_RANGE, CatalogError, CatsimCatalog
from btkjax.draw_blends import CatsimGenerator
from btkjax.measure import MeasureGenerator, check_blend_images
from btkjax.sampling_functions import DefaultSampling, SamplingFunction
from btkjax.survey import SurveyError, check_survey, get_surveys


@pytest.fixture(scope="module")
def raw(catsim_sample):
    return catsim_sample.get_raw_catalog()


def _generator(catalog, sampler=None, survey=None, **kw):
    sampler = sampler or DefaultSampling(max_number=2, stamp_size=12.0, max_shift=1.0)
    return CatsimGenerator(catalog, sampler, survey or get_surveys("LSST"), batch_size=2,
                           stamp_size=12.0, add_noise="none", **kw)


# --- catalog ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sentinel", [-99.0, 99.0, np.nan])
def test_magnitude_sentinel_is_rejected(raw, sentinel):
    bad = raw.copy()
    bad["g_ab"][[2, 5]] = sentinel
    with pytest.raises(CatalogError, match=r"'g_ab' outside .* rows \[2, 5\]") as err:
        CatsimCatalog(bad)
    assert f"{sentinel:g}" in str(err.value)
    lo, hi = MAGNITUDE_RANGE  # the bounds are exclusive; the sample's range lies well inside
    mags = np.concatenate([np.asarray(raw[f"{b}_ab"]) for b in "ugrizy"])
    assert lo < mags.min() and mags.max() < hi


def test_string_column_is_rejected(raw):
    bad = raw.copy()
    bad["a_d"] = bad["a_d"].astype(str)
    with pytest.raises(CatalogError, match=r"column 'a_d' holds <U\d+ values, expected numbers"):
        CatsimCatalog(bad)


def test_non_fits_catalog_names_the_file(tmp_path):
    path = tmp_path / "catalog.fits"
    path.write_text("ra dec\n1 2\n")
    with pytest.raises(CatalogError, match=r"catalog\.fits' as a FITS table .*expected a FITS"):
        CatsimCatalog.from_file(path)


def test_standardized_table_has_btk_index(catsim_sample):
    np.testing.assert_array_equal(catsim_sample.table["btk_index"],
                                  np.arange(len(catsim_sample.table)))


# --- sampling output -------------------------------------------------------------------------


class _Returns(SamplingFunction):
    """A sampling function returning `edit(table[[0, 1]])`."""

    def __init__(self, edit):
        super().__init__(max_number=2, stamp_size=12.0, max_shift=1.0)
        self.edit = edit

    def __call__(self, table):
        out = table[[0, 1]]
        out["ra"], out["dec"] = [0.0, 0.5], [0.0, -0.5]
        return self.edit(out)


def _set(col, values):
    def edit(t):
        t[col] = values
        return t

    return edit


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (_set("ra", [np.nan, 0.0]), ValueError, r"blend 0 has non-finite 'ra' at rows \[0\]"),
        (_set("dec", [0.0, np.inf]), ValueError, r"non-finite 'dec' at rows \[1\]"),
        (_set("ra", ["a", "b"]), ValueError, r"column 'ra' of <U1 values"),
        (_set("i_ab", [-99.0, 22.0]), ValueError, r"'i_ab' outside \(-5, 90\) .*rows \[0\]: -99"),
        (_set("a_d", ["x", "y"]), ValueError, r"column 'a_d' of <U1 values"),
        (_set("b_d", [-1.0, 0.2]), ValueError, r"negative values in 'b_d'"),
        (_set("btk_index", [0, 10**9]), ValueError, r"'btk_index' values \[0, 1000000000\] outside"),
        (lambda t: np.asarray(t["ra"]), TypeError, r"returned a ndarray .* expected an astropy Table"),
        (lambda t: Table({"ra": [0.0], "dec": [0.0]}), ValueError,
         r"lacks the column\(s\) \['fluxnorm_bulge'.* no 'btk_index'"),
    ],
)
def test_bad_sampling_output_is_rejected(catsim_sample, edit, error, message):
    gen = _generator(catsim_sample, _Returns(edit))
    with pytest.raises(error, match=message):
        next(gen)


# --- survey and PSF --------------------------------------------------------------------------


@pytest.mark.parametrize("flux", [0.0, -1.0, np.nan])
def test_psf_flux_must_be_positive(catsim_sample, flux):
    with pytest.raises(SurveyError, match=rf"filter u has flux {flux}; expected a finite positive"):
        get_surveys("LSST", lambda s, f: galsim.Gaussian(fwhm=0.7).withFlux(flux))
    survey = get_surveys("LSST")
    survey.get_filter("r").psf = galsim.Gaussian(fwhm=0.7, flux=flux)
    start = time.perf_counter()  # a negative flux used to hang psf_fold_box
    with pytest.raises(SurveyError, match=rf"LSST filter r has flux {flux}"):
        _generator(catsim_sample, survey=survey)
    assert time.perf_counter() - start < 60
    # a PSF callable (evaluated once per batch) is checked when it is evaluated
    survey = get_surveys("LSST", lambda s, f: (lambda: galsim.Gaussian(fwhm=0.7, flux=flux)))
    with pytest.raises(SurveyError, match=rf"flux {flux}"):
        _generator(catsim_sample, survey=survey)


def test_pixel_scale_must_be_positive(catsim_sample):
    survey = get_surveys("LSST")
    survey.pixel_scale = 0 * survey.pixel_scale
    with pytest.raises(SurveyError, match=r"pixel_scale = <Quantity 0\. arcsec>; expected a fin"):
        check_survey(survey)
    with pytest.raises(SurveyError, match="pixel_scale"):
        _generator(catsim_sample, survey=survey)


# --- generator arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [-1, 0, 2.5])
def test_chunk_must_be_positive(catsim_sample, chunk):
    with pytest.raises(ValueError, match=rf"chunk must be a positive integer .*got {chunk}"):
        _generator(catsim_sample, chunk=chunk)


@pytest.mark.parametrize("seed", [2**63, 2**64 + 5, -1])
def test_seed_range(catsim_sample, seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, 2\*\*63\), got {seed}"):
        _generator(catsim_sample, seed=seed)
    with pytest.raises(ValueError, match=rf"got {seed}"):
        DefaultSampling(seed=seed)
    assert DefaultSampling(seed=2**63 - 1).seed == 2**63 - 1


# --- measure boundary ------------------------------------------------------------------------


class _Draw:
    """A draw generator whose blends are `images` (one survey)."""

    def __init__(self, images):
        self.images = images
        self.batch_size = len(images)
        self.surveys = get_surveys("LSST")
        self.channels_last = False

    def __next__(self):
        return {"blend_images": self.images, "blend_list": [Table()] * self.batch_size,
                "wcs": None}


def test_measure_functions_never_see_non_finite_images():
    images = np.zeros((3, 6, 20, 20))
    images[1] = np.nan  # an all-NaN blend
    images[2, 3, 4, 5] = np.inf
    calls = []

    def measure(batch, idx, **kwargs):
        calls.append(idx)
        return {"catalog": Table({"ra": [0.0], "dec": [0.0]})}

    with pytest.raises(ValueError, match=r"blend_images\[1\] has 2400 non-finite pixel\(s\)"):
        next(MeasureGenerator(measure, _Draw(images)))
    assert calls == []
    with pytest.raises(ValueError, match=r"blend_images\[2\] of survey 'HSC' has 1 non-finite"):
        check_blend_images({"blend_images": {"LSST": np.zeros((3, 6, 20, 20)), "HSC": images}}, 2)
    check_blend_images({"blend_images": images}, 0)  # finite: fine


def test_fluxes_refuse_magnitude_sentinels_in_any_catalog():
    """The generators' flux boundary (every catalog, COSMOS {survey}_{band} columns included)."""
    from btkjax.galaxies import band_fluxes

    hsc = get_surveys("HSC")
    table = Table({f"HSC_{b}": np.full(4, 22.0) for b in hsc.available_filters})
    good = band_fluxes(table, hsc, "{survey}_{band}")
    assert np.all(good > 0)
    table["HSC_r"][3] = 99.0
    with pytest.raises(CatalogError, match=r"HSC r-band fluxes: magnitudes in 'HSC_r' outside "
                                           r"\(-5, 90\) .*rows \[3\]: 99"):
        band_fluxes(table, hsc, "{survey}_{band}")
