"""COSMOS catalog and generator: GalSim's format, exclusion, magnitudes, parity with GalSim."""

import warnings

import galsim
import numpy as np
import pytest
from astropy.table import Table
from conftest import COSMOS_DIR

from btkjax.cosmos import CosmosCatalog, CosmosGenerator, cosmos_parametric_arrays
from btkjax.galsim_backend import tight_gsparams
from btkjax.sampling_functions import DefaultSampling, SamplingFunction
from btkjax.survey import get_flux, get_surveys
from btkjax.tolerances import (
    IMAGE_RTOL_PEAK_F64,
    REAL_GALAXY_RTOL_PEAK,
    STAMP_PSF_WING_LOSS_RTOL,
)

PARAM_FILES = [
    COSMOS_DIR / "real_galaxy_catalog_23.5_example.fits",
    COSMOS_DIR / "real_galaxy_catalog_23.5_example_fits.fits",
]
REAL_FILES = [
    COSMOS_DIR / "real_galaxy_catalog_26_extension_example.fits",
    COSMOS_DIR / "real_galaxy_catalog_26_extension_example_fits.fits",
]

pytestmark = [
    pytest.mark.float64,  # parity with GalSim in float64
    pytest.mark.skipif(not all(p.exists() for p in PARAM_FILES + REAL_FILES),
                       reason=f"COSMOS example data not found in {COSMOS_DIR}"),
]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def param_catalog():
    return CosmosCatalog.from_file(PARAM_FILES, exclusion_level="bad_fits")


@pytest.fixture(scope="module")
def real_catalog():
    return _quiet(CosmosCatalog.from_file, REAL_FILES, exclusion_level="none")


class FixedSampling(SamplingFunction):
    """Always the same blend(s): given catalog rows, shifts and (optionally) shears."""

    def __init__(self, rows, dx, dy, g1=None, g2=None, stamp_size=24.0):
        super().__init__(stamp_size, max_number=len(rows))
        self.rows, self.dx, self.dy, self.g1, self.g2 = rows, dx, dy, g1, g2

    def __call__(self, table):
        out = table[list(self.rows)]
        out["ra"], out["dec"] = self.dx, self.dy
        if self.g1 is not None:
            out["g1"], out["g2"] = self.g1, self.g2
        return out


def _draw_both(catalog, sampling, survey, **kwargs):
    out = {}
    for backend in ("jax", "galsim"):
        gen = _quiet(CosmosGenerator, catalog, sampling(), survey, backend=backend,
                     add_noise="none", dtype="float64", galsim_gsparams=tight_gsparams(),
                     **kwargs)
        out[backend] = next(gen)
    return out


# --------------------------------------------------------------------------------------------
# Catalog


def test_catalog_table_is_standardized(param_catalog):
    table = param_catalog.table
    raw = Table.read(PARAM_FILES[0])
    fits_raw = Table.read(PARAM_FILES[1])
    ref = galsim.COSMOSCatalog(str(PARAM_FILES[0]), exclusion_level="bad_fits")
    # GalSim's own selection of rows, and its row order
    np.testing.assert_array_equal(param_catalog.get_galsim_catalog().orig_index, ref.orig_index)
    rows = ref.orig_index
    np.testing.assert_array_equal(table["IDENT"], raw["IDENT"][rows])
    np.testing.assert_allclose(table["ra"], raw["RA"][rows])
    np.testing.assert_allclose(table["dec"], raw["DEC"][rows])
    np.testing.assert_array_equal(table["btk_index"], np.arange(len(rows)))
    np.testing.assert_allclose(table["ref_mag"], raw["MAG"][rows])
    np.testing.assert_allclose(table["btk_size"], 0.03 * fits_raw["flux_radius"][rows])
    # flux_radius in 0.03" pixels: close to the Sersic fit's hlr (arcsec) for most galaxies
    ratio = np.median(table["btk_size"] / np.asarray(table["hlr"])[:, 0])
    assert 0.8 < ratio < 1.25, ratio
    assert "RA" not in table.colnames and "IDENT_2" not in table.colnames
    assert isinstance(param_catalog.get_raw_catalog(), Table)
    # the btk_index is the index GalSim's makeGalaxy takes
    gal = param_catalog.get_galsim_catalog().makeGalaxy(3, gal_type="parametric")
    assert gal.index == rows[3]


def test_exclusion_fallback_warns():
    # 23.5 example: no _selection.fits file, so 'marginal' cannot be applied
    with pytest.warns(UserWarning, match="selection file"):
        cat = CosmosCatalog.from_file(PARAM_FILES)
    assert len(cat) == 100
    # 26 extension: no fit columns, so 'bad_fits' cannot be applied (no KeyError)
    with pytest.warns(UserWarning, match="fit_status"):
        cat = CosmosCatalog.from_file(REAL_FILES, exclusion_level="bad_fits")
    assert len(cat) == 100
    with pytest.raises(ValueError, match="exclusion_level"):
        CosmosCatalog.from_file(PARAM_FILES, exclusion_level="strict")


def test_f814w_fallback_warns_once(real_catalog):
    cat = _quiet(CosmosCatalog.from_file, REAL_FILES, exclusion_level="none")
    lsst = get_surveys("LSST")
    kwargs = dict(batch_size=2, backend="galsim", add_noise="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen = CosmosGenerator(cat, DefaultSampling(stamp_size=24.0), lsst, **kwargs)
        CosmosGenerator(cat, DefaultSampling(stamp_size=24.0), lsst, **kwargs)
    msgs = [str(w.message) for w in caught if "F814W" in str(w.message)]
    assert len(msgs) == 1, msgs
    # every LSST band gets the F814W magnitude's flux
    state = gen._states["LSST"]
    for b, band in enumerate(state.bands):
        np.testing.assert_array_equal(
            state.fluxes_host[:, b], get_flux(cat.table["ref_mag"], lsst, lsst.get_filter(band))
        )
    # HSC has HSC_{band} columns: no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        CosmosGenerator(cat, DefaultSampling(stamp_size=24.0), get_surveys("HSC"), **kwargs)
    assert not [w for w in caught if "F814W" in str(w.message)]


def test_parametric_arrays_follow_galsim(param_catalog):
    arrays = cosmos_parametric_arrays(param_catalog.table)
    gcat = param_catalog.get_galsim_catalog()
    for i in (0, 4):  # a Sersic and a bulge + disk galaxy
        rec = gcat.getParametricRecord(i)
        gal = gcat.makeGalaxy(i, gal_type="parametric")
        if rec["use_bulgefit"]:
            assert arrays.frac[i, 0] == 0
            np.testing.assert_allclose(arrays.frac[i, 1], rec["flux"][1] / gal.flux)
            np.testing.assert_allclose(arrays.hlr[i, 1:], rec["hlr"][1:3])
        else:
            assert arrays.frac[i, 0] == 1
            np.testing.assert_allclose(arrays.n[i, 0], gal.original.n)
            np.testing.assert_allclose(arrays.hlr[i, 0], gal.original.half_light_radius)


# --------------------------------------------------------------------------------------------
# Images against GalSim (float64)


def test_parametric_matches_galsim(param_catalog):
    table = param_catalog.table
    bulge = np.flatnonzero(np.asarray(table["use_bulgefit"]) == 1)
    sersic = np.flatnonzero(np.asarray(table["use_bulgefit"]) == 0)
    rows = [int(bulge[0]), int(sersic[0]), int(sersic[1])]
    assert np.asarray(table["sersicfit"])[rows[1:], 2].min() < 2.5  # non-integer Sersic n
    lsst = get_surveys("LSST")
    out = _draw_both(
        param_catalog, lambda: FixedSampling(rows, [0.3, -1.1, 1.7], [-0.4, 0.9, 1.2],
                                             g1=[0.05] * 3, g2=[-0.03] * 3),
        lsst, batch_size=1, gal_type="parametric", augment_data=True, apply_shear=True,
    )
    ours, ref = out["jax"]["blend_images"], out["galsim"]["blend_images"]
    assert np.abs(out["jax"]["blend_list"][0]["btk_rotation"]).max() > 0
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= IMAGE_RTOL_PEAK_F64, err
    # fluxes are galcheat's mag2counts of MAG in every band
    blend = out["jax"]["blend_list"][0]
    for band in lsst.available_filters:
        np.testing.assert_array_equal(
            blend[f"{band}_flux"], get_flux(table["MAG"][rows], lsst, lsst.get_filter(band))
        )


def test_real_matches_galsim_and_hsc_magnitudes(real_catalog):
    table = real_catalog.table
    rows = [5, 40, 17]  # 40 is the largest (190 pixel) HST stamp of the example
    hsc = get_surveys("HSC")
    out = _draw_both(
        real_catalog, lambda: FixedSampling(rows, [0.2, -1.5, 2.1], [0.7, 0.4, -1.9],
                                            g1=[0.04] * 3, g2=[0.02] * 3),
        hsc, batch_size=1, gal_type="real", augment_data=True, apply_shear=True,
    )
    ours, ref = out["jax"]["blend_images"], out["galsim"]["blend_images"]
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= REAL_GALAXY_RTOL_PEAK, err
    iso_err = np.abs(out["jax"]["isolated_images"] - out["galsim"]["isolated_images"]).max()
    assert iso_err <= REAL_GALAXY_RTOL_PEAK * np.abs(ref).max()
    # per-band fluxes from the HSC_{band} columns (not the F814W MAG)
    blend = out["jax"]["blend_list"][0]
    iso = out["jax"]["isolated_images"][0]
    for b, band in enumerate(hsc.available_filters):
        expected = get_flux(table[f"HSC_{band}"][rows], hsc, hsc.get_filter(band))
        np.testing.assert_array_equal(blend[f"{band}_flux"], expected)
        assert not np.allclose(expected, get_flux(table["MAG"][rows], hsc, hsc.get_filter(band)))
        # drawn flux: all but the PSF wings beyond the stamp (measured 9.5e-4 of it for HSC)
        np.testing.assert_allclose(iso[:, b].sum(axis=(-2, -1)), expected,
                                   rtol=STAMP_PSF_WING_LOSS_RTOL)


def test_real_needs_images(param_catalog):
    # the 23.5 example ships no real_galaxy_images.fits
    with pytest.raises(FileNotFoundError, match="real_galaxy_images.fits"):
        _quiet(CosmosGenerator, param_catalog, DefaultSampling(stamp_size=24.0),
               get_surveys("LSST"), gal_type="real")
    with pytest.raises(ValueError, match="gal_type"):
        _quiet(CosmosGenerator, param_catalog, DefaultSampling(stamp_size=24.0),
               get_surveys("LSST"), gal_type="cartoon")


# --------------------------------------------------------------------------------------------
# The tutorial's COSMOS cells, pointed at the example files that have real images


def test_tutorial_cosmos_cells(monkeypatch):
    import btkjax as btk

    COSMOS_CATALOG_PATHS = [str(p) for p in REAL_FILES]
    stamp_size = 24.0
    batch_size = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        catalog = btk.catalog.CosmosCatalog.from_file(COSMOS_CATALOG_PATHS)
        sampling_function = btk.sampling_functions.DefaultSampling(stamp_size=stamp_size)
        draw_generator = btk.draw_blends.CosmosGenerator(
            catalog,
            sampling_function,
            btk.survey.get_surveys("LSST"),
            batch_size=batch_size,
            stamp_size=stamp_size,
            cpus=1,
            add_noise="all",
            verbose=False,
        )
    batch = next(draw_generator)
    blend_images = batch["blend_images"]
    blend_list = batch["blend_list"]
    assert blend_images.shape == (8, 6, 120, 120)
    assert len(blend_list) == 8 and all(1 <= len(t) <= 2 for t in blend_list)
    assert np.isfinite(blend_images).all()
    # noise was added: the sky dominates empty pixels, and galaxies stand out above it
    assert blend_images.std() > 0
    plot_utils = getattr(btk, "plot_utils", None)
    if plot_utils is not None and hasattr(plot_utils, "plot_blends"):
        import matplotlib

        matplotlib.use("Agg")
        plot_utils.plot_blends(blend_images, blend_list, limits=(30, 90))
