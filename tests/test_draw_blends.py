"""The BTK generator interface on the JAX path (and the GalSim backend)."""

import galcheat.utilities
import matplotlib
import numpy as np
import pytest
from astropy.table import Table
from conftest import CATSIM_SAMPLE

import btkjax as btk
from btkjax import tolerances as tol
from btkjax.draw_blends import CatsimGenerator
from btkjax.generator import _pipeline
from btkjax.sampling_functions import DefaultSampling, DefaultSamplingShear, SamplingFunction
from btkjax.survey import get_surveys

matplotlib.use("Agg")


def _generator(catalog, batch_size=6, seed=0, sampler_seed=0, **kw):
    sf = DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0, seed=sampler_seed)
    return CatsimGenerator(catalog, sf, kw.pop("surveys", get_surveys("LSST")),
                           batch_size=batch_size, stamp_size=24.0, seed=seed, **kw)


def test_outputs_fluxes_and_isolated_sum(catsim_sample):
    gen = _generator(catsim_sample, add_noise="none")
    batch = next(gen)
    images, iso, tables = batch["blend_images"], batch["isolated_images"], batch["blend_list"]
    assert images.shape == (6, 6, 120, 120) and iso.shape == (6, 3, 6, 120, 120)
    assert len(tables) == 6 and batch["psf_images"].shape == (6, 120, 120)
    # the blend image is the sum of the isolated images (float32 rounding of a 3-term sum)
    np.testing.assert_allclose(iso.sum(axis=1), images,
                               atol=tol.F32_FEW_TERM_SUM_RTOL * np.abs(images).max())
    for b, table in enumerate(tables):
        assert 1 <= len(table) <= 3
        assert np.all(iso[b, len(table):] == 0)
        for band in "ugrizy":
            expected = galcheat.utilities.mag2counts(np.array(table[f"{band}_ab"]), "LSST",
                                                     band).value
            np.testing.assert_array_equal(table[f"{band}_flux"], expected)
        # x_peak, y_peak: the stamp center (59.5, 59.5) plus the shift in pixels
        np.testing.assert_allclose(table["x_peak"], 59.5 + table["ra"] / 0.2,
                                   atol=tol.PIXEL_ATOL)
        np.testing.assert_allclose(table["y_peak"], 59.5 + table["dec"] / 0.2,
                                   atol=tol.PIXEL_ATOL)
        # each galaxy's image holds its flux (minus the light beyond the stamp)
        for g in range(len(table)):
            total = iso[b, g, 3].sum()
            assert 0.9 * table["i_flux"][g] < total <= table["i_flux"][g] * (1 + 1e-5)


def test_same_seed_same_batches_and_different_seed_differs(catsim_sample):
    a = [next(_generator(catsim_sample, seed=4, batch_size=4)) for _ in range(1)][0]
    gen_b = _generator(catsim_sample, seed=4, batch_size=4)
    b = next(gen_b)
    np.testing.assert_array_equal(a["blend_images"], b["blend_images"])
    np.testing.assert_array_equal(a["isolated_images"], b["isolated_images"])
    for ta, tb in zip(a["blend_list"], b["blend_list"], strict=False):
        assert ta.colnames == tb.colnames and np.all(ta == tb)
    c = next(_generator(catsim_sample, seed=5, batch_size=4))
    assert not np.array_equal(a["blend_images"], c["blend_images"])
    # blends are indexed globally: batch 2 of size 2 holds blends 2 and 3 of one batch of 4
    gen_small = _generator(catsim_sample, seed=4, batch_size=2)
    next(gen_small)
    second = next(gen_small)
    np.testing.assert_array_equal(second["blend_images"], a["blend_images"][2:4])
    # bit for bit, isolated images too (each galaxy size and kind has one program)
    np.testing.assert_array_equal(second["isolated_images"], a["isolated_images"][2:4])
    np.testing.assert_array_equal(second["blend_list"][1]["ra"], a["blend_list"][3]["ra"])


def test_no_recompilation_between_batches(catsim_sample):
    """One compilation per FFT box size (and blends per call), whatever the batch contents."""
    gen = _generator(catsim_sample, batch_size=3)
    state = gen._states["LSST"]
    seen = set()
    before = _pipeline._cache_size()
    for i in range(4):
        blends, _ = gen._sample_tables(np.arange(3) + 3 * i)
        seen |= {(int(n), gen._chunk_for(state, int(n))) for n in state.box_sizes(blends)}
        next(gen)
        assert _pipeline._cache_size() - before <= len(seen)
    # a repeated batch compiles nothing
    gen.batch_index = 0
    size = _pipeline._cache_size()
    next(gen)
    assert _pipeline._cache_size() == size


def test_galsim_backend_matches_jax(catsim_sample):
    jax_batch = next(_generator(catsim_sample, batch_size=2, add_noise="none"))
    gs_batch = next(_generator(catsim_sample, batch_size=2, add_noise="none", backend="galsim"))
    for ta, tb in zip(jax_batch["blend_list"], gs_batch["blend_list"], strict=False):
        assert np.all(ta == tb)
    ref = gs_batch["blend_images"]
    err = np.abs(jax_batch["blend_images"] - ref).max(axis=(1, 2, 3)) / ref.max(axis=(1, 2, 3))
    # GalSim at its default gsparams is itself within ~2e-5 of converged; float32 within 1e-4
    assert np.all(err < tol.IMAGE_RTOL_PEAK_F32 + tol.IMAGE_RTOL_PEAK_F64), err
    iso_err = np.abs(jax_batch["isolated_images"] - gs_batch["isolated_images"]).max()
    assert iso_err < (tol.IMAGE_RTOL_PEAK_F32 + tol.IMAGE_RTOL_PEAK_F64) * ref.max()


def test_multi_survey_shapes_scales_and_fluxes():
    raw = Table.read(CATSIM_SAMPLE)
    raw["IE_ab"] = (raw["r_ab"] + raw["i_ab"] + raw["z_ab"]) / 3  # Euclid's broad VIS band
    catalog = btk.catalog.CatsimCatalog(raw)
    surveys = get_surveys(["LSST", "HSC", "Euclid_VIS"])
    batch = next(_generator(catalog, batch_size=2, surveys=surveys, add_noise="none"))
    pixels = {"LSST": (0.2, 6, 120), "HSC": (0.168, 5, 142), "Euclid_VIS": (0.1, 1, 240)}
    lsst_tables = batch["blend_list"]["LSST"]
    for name, (scale, n_band, n_pix) in pixels.items():
        images = batch["blend_images"][name]
        assert images.shape == (2, n_band, n_pix, n_pix)
        assert batch["isolated_images"][name].shape == (2, 3, n_band, n_pix, n_pix)
        assert batch["wcs"][name].wcs.pc[0, 0] * 3600 == pytest.approx(scale)
        for table, ref in zip(batch["blend_list"][name], lsst_tables, strict=False):
            np.testing.assert_array_equal(table["btk_index"], ref["btk_index"])
            np.testing.assert_array_equal(table["ra"], ref["ra"])
            band = surveys[list(pixels).index(name)].available_filters[0]
            expected = galcheat.utilities.mag2counts(np.array(table[f"{band}_ab"]), name, band)
            np.testing.assert_array_equal(table[f"{band}_flux"], expected.value)
            np.testing.assert_allclose(table["x_peak"], (n_pix - 1) / 2 + table["ra"] / scale,
                                       atol=tol.PIXEL_ATOL)
    # same galaxies, same total light in each survey's i-like band, up to light off the stamp
    lsst_i = batch["isolated_images"]["LSST"][:, :, 3].sum(axis=(-1, -2))
    hsc_i = batch["isolated_images"]["HSC"][:, :, 2].sum(axis=(-1, -2))
    ratio = np.array([galcheat.utilities.mag2counts(20.0, "HSC", "i").value /
                      galcheat.utilities.mag2counts(20.0, "LSST", "i").value])
    mask = lsst_i > 0
    np.testing.assert_allclose(hsc_i[mask] / lsst_i[mask], ratio[0],
                               rtol=tol.SURVEY_I_BAND_RATIO_RTOL)


def test_channels_last_and_shear_and_augment(catsim_sample):
    sf = DefaultSamplingShear(max_number=2, stamp_size=24.0, max_shift=2.0, shear=(0.05, -0.02))
    gen = CatsimGenerator(catsim_sample, sf, get_surveys("LSST"), batch_size=2,
                          channels_last=True, apply_shear=True, augment_data=True, seed=1)
    batch = next(gen)
    assert batch["blend_images"].shape == (2, 120, 120, 6)
    assert batch["isolated_images"].shape == (2, 2, 120, 120, 6)
    rot = np.concatenate([t["btk_rotation"] for t in batch["blend_list"]])
    assert np.all((rot >= 0) & (rot < 360)) and len(np.unique(rot)) == len(rot)
    assert np.all(np.concatenate([t["g1"] for t in batch["blend_list"]]) == 0.05)


class _TooMany(SamplingFunction):
    def __init__(self):
        super().__init__(stamp_size=24.0, max_number=2)

    def __call__(self, table):
        t = table[:3]
        t["ra"], t["dec"] = 0.0, 0.0
        t["btk_index"] = np.arange(3)
        return t


class _NoRa(SamplingFunction):
    def __init__(self):
        super().__init__(stamp_size=24.0, max_number=2)

    def __call__(self, table):
        t = table[:1].copy()
        t.remove_columns(["ra", "dec"])
        return t


def test_bad_inputs_fail_before_drawing(catsim_sample):
    lsst = get_surveys("LSST")
    sf = DefaultSampling(max_number=2, stamp_size=24.0)
    with pytest.raises(TypeError, match="CatsimCatalog"):
        CatsimGenerator(object(), sf, lsst)
    raw = Table.read(CATSIM_SAMPLE)
    raw.remove_column("y_ab")
    with pytest.raises(ValueError, match="'y'.*'y_ab'"):
        CatsimGenerator(btk.catalog.CatsimCatalog(raw), sf, lsst)
    with pytest.raises(ValueError, match="returned 3 galaxies.*max_number=2"):
        next(CatsimGenerator(catsim_sample, _TooMany(), lsst, batch_size=2))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ra', 'dec'\]"):
        next(CatsimGenerator(catsim_sample, _NoRa(), lsst, batch_size=2))
    with pytest.raises(ValueError, match="add_noise must be one of"):
        CatsimGenerator(catsim_sample, sf, lsst, add_noise="loud")
    with pytest.raises(ValueError, match="backend must be one of"):
        CatsimGenerator(catsim_sample, sf, lsst, backend="torch")


def test_psf_callables_evaluated_once_per_batch(catsim_sample):
    import galsim

    calls = []
    rng = np.random.default_rng(0)

    def random_psf(survey, filtr):
        def draw():
            calls.append(filtr.name)
            return galsim.Kolmogorov(fwhm=filtr.psf_fwhm.value + rng.uniform(-0.1, 0.1))
        return draw

    survey = get_surveys("LSST", random_psf)
    assert calls == []
    gen = _generator(catsim_sample, batch_size=2, surveys=survey, add_noise="none")
    first = next(gen)  # the PSFs drawn when the generator was made serve batch 0
    assert sorted(calls) == sorted("ugrizy")
    calls.clear()
    second = next(gen)
    assert sorted(calls) == sorted("ugrizy")
    assert len(first["psf"]) == 6 and first["psf_images"].shape == (6, 120, 120)
    assert not np.allclose(first["psf_images"], second["psf_images"], rtol=1e-3, atol=0)


def test_galsim_backend_process_pool_matches_one_process(catsim_sample):
    one = next(_generator(catsim_sample, batch_size=4, add_noise="none", backend="galsim"))
    gen = _generator(catsim_sample, batch_size=4, add_noise="none", backend="galsim", cpus=2)
    two = next(gen)
    np.testing.assert_array_equal(one["blend_images"], two["blend_images"])
    np.testing.assert_array_equal(one["isolated_images"], two["isolated_images"])


def test_generator_boxes_hold_off_stamp_and_flat_galaxies(catsim_sample):
    """The generator routes each blend to a box holding every galaxy's reach (core.boxes), also
    for a galaxy 100" beside the stamp (its copy must land beyond the stamp, not on it: no
    silent aliasing) and for a very flat, sheared one; a reach beyond MAX_FFT_SIZE is an error."""
    from btkjax.core.boxes import MAX_FFT_SIZE, box_sizes, galaxy_reach
    from btkjax.core.samplers import Blends

    state = _generator(catsim_sample, batch_size=2)._states["LSST"]
    side = state.stamp_pixels * state.pixel_scale
    blends = Blends(index=np.array([[0, 1], [2, 3]]), mask=np.ones((2, 2), bool),
                    dx=np.array([[0.5, 100.0], [1.0, -2.0]]), dy=np.array([[0.0, 3.0], [0.0, 1.0]]),
                    rotation=np.zeros((2, 2)), g1=np.array([[0.0, 0.0], [0.0, 0.3]]),
                    g2=np.zeros((2, 2)))
    sizes = state.box_sizes(blends)
    reach = galaxy_reach(state.shapes, blends.index, blends.mask, blends.dx, blends.dy,
                         blends.g1, blends.g2, state.psf_fwhm, side)
    assert sizes[0] * state.pixel_scale >= 2 * 100.0 + side / 2  # the far copy is off the stamp
    np.testing.assert_array_less(box_sizes(reach.max(axis=1), state.stamp_pixels,
                                           state.pixel_scale) - 1, sizes)
    per_galaxy = state.box_sizes(blends, per_galaxy=True)
    assert per_galaxy[0, 0] < per_galaxy[0, 1]  # the central galaxy keeps its small box
    far = blends._replace(dx=np.array([[0.5, 1e4], [1.0, -2.0]]))
    with pytest.raises(ValueError, match="MAX_FFT_SIZE"):
        state.box_sizes(far)
    assert MAX_FFT_SIZE * state.pixel_scale < 2e4
