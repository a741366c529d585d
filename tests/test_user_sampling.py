"""Sampling functions as BTK users write them: the seed tutorial's class, BTK 1.0's keywords,
tables without ``btk_index``, and edited rows drawn as they are (against GalSim)."""

import warnings

import galcheat.utilities
import galsim
import numpy as np
import pytest
from astropy.table import Table

import btkjax
from btkjax import tolerances as tol
from btkjax.blend_tables import rows_from_tables
from btkjax.catalog import CATSIM_SHAPE_COLUMNS
from btkjax.draw_blends import CatsimGenerator
from btkjax.galsim_backend import tight_gsparams, with_gsparams
from btkjax.sampling_functions import SamplingFunction
from btkjax.survey import get_surveys

BANDS = "ugrizy"
DRAWN = list(CATSIM_SHAPE_COLUMNS) + [f"{b}_ab" for b in BANDS]


def _get_random_center_shift(num_objects, max_shift):
    """BTK's helper the tutorial's class calls: shifts uniform in [-max_shift, max_shift]."""
    x_peak = np.random.uniform(-max_shift, max_shift, size=(num_objects,))
    y_peak = np.random.uniform(-max_shift, max_shift, size=(num_objects,))
    return x_peak, y_peak


def _tutorial_class():
    """The tutorial's DefaultSampling, exactly as its code cell writes it (imports rewritten)."""
    from tutorial import TUTORIAL, code_cells, to_btkjax

    if not TUTORIAL.exists():
        pytest.skip(f"the seed tutorial is not at {TUTORIAL} (the seed's files are absent)")
    cells = [c for c in code_cells("Sampling function", "Survey")
             if "class DefaultSampling(btk.sampling_functions.SamplingFunction)" in c]
    assert len(cells) == 1
    namespace = {"np": np, "warnings": warnings, "btk": btkjax,
                 "_get_random_center_shift": _get_random_center_shift}
    exec(compile(to_btkjax(cells[0]), "<tutorial>", "exec"), namespace)
    return namespace["DefaultSampling"]


def test_tutorial_sampling_class_drives_the_generator(catsim_sample):
    cls = _tutorial_class()
    sampler = cls(max_number=3, stamp_size=24.0, max_shift=3.0)  # super().__init__(max_number)
    assert sampler.max_number == 3 and sampler.stamp_size == 24.0
    np.random.seed(3)  # the tutorial's class draws from the global numpy generator
    gen = CatsimGenerator(catsim_sample, sampler, get_surveys("LSST"), batch_size=6,
                          stamp_size=24.0, add_noise="none")
    batch = next(gen)
    tables = batch["blend_list"]
    assert len(tables) == 6
    for table in tables:
        assert 1 <= len(table) <= 3 and np.all(table["ref_mag"] <= 25.3)
        # the rows are catalog rows, unchanged: drawn from the catalog's arrays (fast path)
        assert rows_from_tables([table], catsim_sample.table, 3, DRAWN).n_edited == 0
        rows = np.asarray(table["btk_index"])
        for col in DRAWN:
            np.testing.assert_array_equal(table[col], catsim_sample.table[col][rows])
        for band in BANDS:
            expected = galcheat.utilities.mag2counts(np.array(table[f"{band}_ab"]), "LSST", band)
            np.testing.assert_array_equal(table[f"{band}_flux"], expected.value)
        x, y = gen._states["LSST"].wcs.world_to_pixel_values(table["ra"] / 3600,
                                                            table["dec"] / 3600)
        np.testing.assert_allclose(table["x_peak"], x)
        np.testing.assert_allclose(table["y_peak"], y)


def test_base_class_accepts_btk_signatures():
    class Seed(SamplingFunction):
        def __init__(self, max_number=2):
            super().__init__(max_number)

    class Btk10(SamplingFunction):
        def __init__(self):
            super().__init__(max_number=4, min_number=2, stamp_size=20.0, max_shift=3.0, seed=7)

    class Positional(SamplingFunction):  # BTK's positional order: max_number, min_number, seed
        def __init__(self):
            super().__init__(5, 0, 11)

    class OldBtkjax(SamplingFunction):  # btkjax's earlier order, stamp_size first
        def __init__(self):
            super().__init__(24.0, max_number=3)

    s = Seed(3)
    assert (s.max_number, s.min_number, s.stamp_size, s.max_shift) == (3, 1, None, None)
    b = Btk10()
    assert (b.max_number, b.min_number, b.stamp_size, b.max_shift, b.seed) == (4, 2, 20.0, 3.0, 7)
    p = Positional()
    assert (p.max_number, p.min_number, p.seed) == (5, 0, 11)
    o = OldBtkjax()
    assert (o.stamp_size, o.max_number) == (24.0, 3)
    with pytest.raises(TypeError, match="max_number"):
        SamplingFunction()
    with pytest.raises(ValueError, match="max_shift"):
        SamplingFunction(max_number=2, stamp_size=10.0, max_shift=6.0)
    with pytest.raises(TypeError, match="two values for max_number"):
        SamplingFunction(24.0, 3, max_number=3)


class _Edit(SamplingFunction):
    """Tutorial-style: catalog rows, edited (-1.5 mag in every band, disks x1.4 in size, position
    angles +30 degrees), optionally without btk_index."""

    def __init__(self, max_number=3, keep_index=True, edit=True):
        super().__init__(max_number)
        self.stamp_size = 24.0
        self.max_shift = 3.0
        self.keep_index, self.edit = keep_index, edit
        self.rng = np.random.default_rng(5)

    def __call__(self, table):
        n = int(self.rng.integers(1, self.max_number + 1))
        (q,) = np.where(table["ref_mag"] <= 25.3)
        out = table[self.rng.choice(q, size=n)]
        out["ra"] = self.rng.uniform(-self.max_shift, self.max_shift, n)
        out["dec"] = self.rng.uniform(-self.max_shift, self.max_shift, n)
        if self.edit:
            for band in BANDS:
                out[f"{band}_ab"] -= 1.5
            out["a_d"] *= 1.4
            out["b_d"] *= 1.4
            out["pa_disk"] += 30.0
            out["pa_bulge"] += 30.0
        if not self.keep_index:
            out.remove_column("btk_index")
        return out


def _btk_galaxy(row, band, gsparams):
    """BTK 1.0's get_catsim_galaxy, written from its source, on one table row."""
    total = galcheat.utilities.mag2counts(float(row[f"{band}_ab"]), "LSST", band).value
    norm = row["fluxnorm_disk"] + row["fluxnorm_bulge"] + row["fluxnorm_agn"]
    comps = []
    for kind, fcol, a, b, pa in (("disk", "fluxnorm_disk", "a_d", "b_d", "pa_disk"),
                                 ("bulge", "fluxnorm_bulge", "a_b", "b_b", "pa_bulge")):
        flux = row[fcol] / norm * total
        if flux > 0:
            cls = galsim.Exponential if kind == "disk" else galsim.DeVaucouleurs
            prof = cls(flux=flux, half_light_radius=np.sqrt(row[a] * row[b]), gsparams=gsparams)
            comps.append(prof.shear(q=row[b] / row[a], beta=np.radians(row[pa]) * galsim.radians))
    agn = row["fluxnorm_agn"] / norm * total
    if agn > 0:
        comps.append(galsim.Gaussian(flux=agn, sigma=1e-8, gsparams=gsparams))
    return galsim.Add(comps, gsparams=gsparams) if len(comps) > 1 else comps[0]


def _galsim_isolated(tables, psfs, stamp, scale, bands):
    gsp = tight_gsparams()
    out = np.zeros((len(tables), 3, len(bands), stamp, stamp))
    for i, table in enumerate(tables):
        for g, row in enumerate(table):
            for j, band in enumerate(bands):
                psf = with_gsparams(psfs[BANDS.index(band)], gsp)
                conv = galsim.Convolve(_btk_galaxy(row, band, gsp), psf, gsparams=gsp)
                conv = conv.shift(float(row["ra"]), float(row["dec"]))
                out[i, g, j] = conv.drawImage(nx=stamp, ny=stamp, scale=scale).array
    return out


@pytest.mark.parametrize("keep_index", [True, False])
def test_edited_rows_are_drawn_as_galsim_draws_them(catsim_sample, x64, keep_index):
    n_blends = 24 if keep_index else 6
    sampler = _Edit(keep_index=keep_index)
    gen = CatsimGenerator(catsim_sample, sampler, get_surveys("LSST"), batch_size=n_blends,
                          stamp_size=24.0, add_noise="none", dtype="float64")
    batch = next(gen)
    tables = batch["blend_list"]
    if keep_index:  # the edited values are what the tables (and their fluxes) say
        for table in tables:
            rows = np.asarray(table["btk_index"])
            np.testing.assert_allclose(table["i_ab"], catsim_sample.table["i_ab"][rows] - 1.5)
            expected = galcheat.utilities.mag2counts(np.array(table["i_ab"]), "LSST", "i")
            np.testing.assert_array_equal(table["i_flux"], expected.value)
    bands = ("u", "i", "y")  # GalSim at tight gsparams is slow: the bluest, a middle, the reddest
    ref = _galsim_isolated(tables, batch["psf"], 120, 0.2, bands)
    iso = batch["isolated_images"][:, :, [BANDS.index(b) for b in bands]]
    peak = ref.sum(axis=1).max(axis=(2, 3))  # [blend, band]: the stamp's peak
    err = np.abs(iso - ref).max(axis=(1, 3, 4)) / peak
    assert err.max() <= tol.IMAGE_RTOL_PEAK_F64, err.max()
    # ... and the catalog's own values would be far off (the failure the issue found)
    if keep_index:
        plain = [catsim_sample.table[np.asarray(t["btk_index"])] for t in tables[:4]]
        for p, t in zip(plain, tables[:4], strict=True):
            p["ra"], p["dec"] = t["ra"], t["dec"]
        cat_ref = _galsim_isolated(plain, batch["psf"], 120, 0.2, ("i",))
        off = np.abs(cat_ref[:, :, 0] - ref[:4, :, 1]).max(axis=(1, 2, 3)) / peak[:4, 1]
        assert off.min() > 0.1, off


def test_unchanged_and_edited_rows_are_told_apart_exactly(catsim_sample):
    table = catsim_sample.table
    rows = np.array([3, 7, 11])
    t = table[rows]
    t["ra"], t["dec"] = [0.0, 1.0, -1.0], [0.0, 0.5, 2.0]
    same = rows_from_tables([t], table, 3, DRAWN)
    assert same.n_edited == 0 and same.blends.index[0].tolist() == rows.tolist()
    t2 = t.copy()
    t2["a_d"][1] = np.nextafter(t2["a_d"][1], np.inf)  # one ulp: edited
    t3 = Table(t, copy=True)
    t3.remove_column("btk_index")
    out = rows_from_tables([t2, t3], table, 3, DRAWN, first_free=len(table))
    n = len(table)
    assert out.blends.index[0].tolist() == [3, n, 11]
    assert out.blends.index[1].tolist() == [n + 1, n + 2, n + 3]
    assert out.n_edited == 4
    np.testing.assert_array_equal(out.edited["a_d"], [t2["a_d"][1], *t["a_d"]])


# --- COSMOS: galaxies are their catalog row's (makeGalaxy(btk_index)), magnitudes the table's --

COSMOS_PARAM = ["real_galaxy_catalog_23.5_example.fits",
                "real_galaxy_catalog_23.5_example_fits.fits"]
COSMOS_REAL = ["real_galaxy_catalog_26_extension_example.fits",
               "real_galaxy_catalog_26_extension_example_fits.fits"]


class _CosmosEdit(SamplingFunction):
    """Fixed rows of a COSMOS table, every magnitude column `columns` edited by `delta`."""

    def __init__(self, rows, columns, delta=-1.5):
        super().__init__(max_number=len(rows), stamp_size=24.0, max_shift=3.0)
        self.rows, self.columns, self.delta = rows, columns, delta

    def __call__(self, table):
        out = table[list(self.rows)]
        out["ra"] = np.linspace(-1.5, 1.5, len(self.rows))
        out["dec"] = np.linspace(1.0, -1.0, len(self.rows))
        for col in self.columns:
            out[col] = out[col] + self.delta
        return out


def _cosmos_catalog(files):
    from conftest import COSMOS_DIR

    from btkjax.cosmos import CosmosCatalog

    paths = [COSMOS_DIR / f for f in files]
    if not all(p.exists() for p in paths):
        pytest.skip(f"COSMOS example data not found in {COSMOS_DIR}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CosmosCatalog.from_file(paths, exclusion_level="none")


def _galsim_cosmos(catalog, table, survey, psfs, gal_type, mag_of, stamp):
    """BTK's CosmosGenerator, written out: makeGalaxy(btk_index) with the row's flux."""
    gsp = tight_gsparams()
    gcat = catalog.get_galsim_catalog()
    scale = survey.pixel_scale.to_value("arcsec")
    out = np.zeros((len(table), len(psfs), stamp, stamp))
    for g, row in enumerate(table):
        gal = gcat.makeGalaxy(int(row["btk_index"]), gal_type=gal_type, noise_pad_size=0,
                              gsparams=gsp)
        for j, band in enumerate(survey.available_filters):
            flux = galcheat.utilities.mag2counts(float(row[mag_of(band)]), survey.name, band).value
            conv = galsim.Convolve(gal.withFlux(flux), with_gsparams(psfs[j], gsp), gsparams=gsp)
            conv = conv.shift(float(row["ra"]), float(row["dec"]))
            out[g, j] = conv.drawImage(nx=stamp, ny=stamp, scale=scale).array
    return out


@pytest.mark.parametrize("gal_type", ["parametric", "real"])
def test_cosmos_edited_magnitudes_are_drawn(x64, gal_type):
    from btkjax.cosmos import CosmosGenerator

    if gal_type == "parametric":
        catalog, survey, rows = _cosmos_catalog(COSMOS_PARAM), get_surveys("LSST"), [0, 3, 8]
        columns, rtol = ["MAG", "ref_mag"], tol.IMAGE_RTOL_PEAK_F64

        def mag_of(band):
            return "MAG"
    else:
        catalog, survey, rows = _cosmos_catalog(COSMOS_REAL), get_surveys("HSC"), [5, 17, 2]
        columns = [f"HSC_{b}" for b in survey.available_filters]
        rtol = tol.REAL_GALAXY_RTOL_PEAK

        def mag_of(band):
            return f"HSC_{band}"
    images = {}
    for backend in ("jax", "galsim"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = CosmosGenerator(catalog, _CosmosEdit(rows, columns), survey, batch_size=1,
                                  stamp_size=24.0, add_noise="none", dtype="float64",
                                  gal_type=gal_type, backend=backend,
                                  galsim_gsparams=tight_gsparams())
            batch = next(gen)
        images[backend] = batch["isolated_images"][0]
        table = batch["blend_list"][0]
        for band in survey.available_filters:  # fluxes of the edited magnitudes
            expected = galcheat.utilities.mag2counts(np.array(table[mag_of(band)]),
                                                     survey.name, band).value
            np.testing.assert_array_equal(table[f"{band}_flux"], expected)
    stamp = images["jax"].shape[-1]
    ref = _galsim_cosmos(catalog, table, survey, batch["psf"], gal_type, mag_of, stamp)
    peak = ref.sum(axis=0).max()
    for backend in ("jax", "galsim"):
        err = np.abs(images[backend] - ref).max() / peak
        assert err <= rtol, (backend, err)
    # (the catalog's magnitudes, 1.5 mag fainter, would be off by 1 - 10**-0.6 = 75% of peak)


def test_rows_drawn_from_the_catalog_need_btk_index(catsim_sample):
    t = catsim_sample.table[[1, 2]]
    t["ra"], t["dec"] = 0.0, 0.0
    t.remove_column("btk_index")
    with pytest.raises(ValueError, match=r"blend 7 has no 'btk_index': this catalog's galaxies"):
        rows_from_tables([t], catsim_sample.table, 2, ["i_ab"], blend_ids=[7],
                         require_index=True)


def test_rows_without_btk_index_draw_the_same_images_as_catalog_rows(catsim_sample):
    """The same values through the edited-row path (no btk_index: drawn from the columns,
    written past the catalog's rows) and through the catalog's arrays: bit-identical images."""
    images = []
    for keep_index in (True, False):
        gen = CatsimGenerator(catsim_sample, _Edit(edit=False, keep_index=keep_index),
                              get_surveys("LSST"), batch_size=4, stamp_size=24.0,
                              add_noise="all", seed=3)
        images.append([next(gen)["blend_images"] for _ in range(2)])
        n_catalog = len(catsim_sample.table)
        assert (gen._source_rows[n_catalog:] >= 0).all() == keep_index  # nothing edited
    for a, b in zip(*images, strict=True):
        np.testing.assert_array_equal(a, b)
