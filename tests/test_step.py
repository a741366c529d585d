"""The simulation step (btkjax.core.step) against GalSim, finite differences, the generator,
BTK's metric definitions and its own compile-once contract."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import btkjax as btk
from btkjax import tolerances as tol
from btkjax.core.step import Conditions, StepOutput, UniformConditions, simulate, trace_counts
from btkjax.galaxies import make_sources
from btkjax.galsim_backend import render_galsim, tight_gsparams
from btkjax.metrics import blendedness as np_blendedness
from btkjax.metrics import snr as np_snr
from btkjax.simulation import make_step
from btkjax.survey import default_psf_params


@pytest.fixture(scope="module")
def lsst():
    return btk.survey.get_surveys("LSST")


def _sampling(max_number=3, stamp=12.0, shift=2.0, seed=5):
    return btk.sampling_functions.DefaultSampling(max_number=max_number, stamp_size=stamp,
                                                  max_shift=shift, seed=seed)


def _galsim_reference(step, out: StepOutput, lsst, psf="kolmogorov_airy", beta=None):
    """The step's noiseless blends drawn by GalSim (tight gsparams), per-blend PSFs."""
    src = make_sources(jax.tree.map(np.asarray, out.blends),
                       jax.tree.map(lambda a: np.asarray(a, np.float64), step.arrays.catalog),
                       np.asarray(step.arrays.fluxes, np.float64))
    src = jax.tree.map(np.asarray, src)
    params = [default_psf_params(lsst, lsst.get_filter(b)) for b in lsst.available_filters]
    fwhm = np.asarray(out.conditions.fwhm, np.float64)
    psfs = []
    for b in range(fwhm.shape[0]):
        row = []
        for j, p in enumerate(params):
            if psf == "moffat":
                row.append(galsim.Moffat(beta=beta, fwhm=float(fwhm[b, j])))
            else:
                row.append(galsim.Convolve(
                    galsim.Kolmogorov(fwhm=float(fwhm[b, j])),
                    galsim.Airy(lam_over_diam=p["lam_over_diam"], obscuration=p["obscuration"])))
        psfs.append(row)
    ref, _ = render_galsim(src, psfs, step.spec.render, gsparams=tight_gsparams())
    return ref


def _assert_parity(images, ref, rtol):
    images = np.asarray(images)
    for b in range(ref.shape[0]):
        err = np.abs(images[b] - ref[b]).max() / ref[b].max()
        assert err < rtol, f"blend {b}: max |step - galsim| / peak = {err:.3g} > {rtol}"


@pytest.mark.parametrize("which", ["sample", "default"])
def test_float32_noiseless_parity_with_galsim_per_blend_fwhm(which, catsim_sample, lsst):
    catalog = catsim_sample if which == "sample" else btk.catalog.CatsimCatalog.default()
    step = make_step(catalog, lsst, _sampling(stamp=12.0 if which == "sample" else 24.0),
                     noise="none", isolated=False, chunk=2,
                     conditions=UniformConditions((0.7, 1.4), (1.0, 1.0)))
    out = step(step.keys(3), jnp.arange(4))
    assert out.images.dtype == jnp.float32
    fwhm = np.asarray(out.conditions.fwhm)
    assert np.ptp(fwhm[:, 0]) > 0.05  # the batch mixes seeing
    _assert_parity(out.images, _galsim_reference(step, out, lsst), tol.IMAGE_RTOL_PEAK_F32)


def test_moffat_per_blend_fwhm_parity_with_galsim(catsim_sample, lsst):
    step = make_step(catsim_sample, lsst, _sampling(stamp=8.0, shift=1.0), noise="none",
                     psf="moffat", moffat_beta=3.5, isolated=False, chunk=2,
                     conditions=UniformConditions((0.8, 1.3), (1.0, 1.0)))
    out = step(step.keys(4), jnp.arange(2))
    _assert_parity(out.images, _galsim_reference(step, out, lsst, "moffat", 3.5),
                   tol.IMAGE_RTOL_PEAK_F32)


def test_compiled_once_and_vmap_over_keys(catsim_sample, lsst):
    step = make_step(catsim_sample, lsst, _sampling(stamp=6.0, shift=1.0), noise="all",
                     isolated=True, chunk=2, conditions=UniformConditions((0.8, 1.2), (0.9, 1.1)))
    keys = step.keys(0)
    fn = jax.jit(lambda ids: step(keys, ids))
    fn(jnp.arange(4))
    before = trace_counts["simulate"]
    outs = [fn(jnp.arange(4) + 4 * i) for i in range(1, 10)]  # 2nd .. 10th batch
    assert trace_counts["simulate"] == before
    assert not np.array_equal(np.asarray(outs[0].images), np.asarray(outs[1].images))
    # vmap over keys: each row is the step called with that key alone
    seeds = jnp.arange(3)

    def one(seed):
        return simulate(step.arrays, step.keys(0)._replace(sample=jax.random.key(seed)),
                        jnp.arange(2), step.spec).images

    stacked = jax.vmap(one)(seeds)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(stacked[i]), np.asarray(one(seeds[i])),
                                   rtol=0,
                                   atol=tol.IMAGE_RTOL_PEAK_F32 * float(jnp.abs(stacked[i]).max()))
    assert not np.allclose(np.asarray(stacked[0]), np.asarray(stacked[1]))


def test_same_blend_at_any_batch_size(catsim_sample, lsst):
    step = make_step(catsim_sample, lsst, _sampling(stamp=6.0, shift=1.0), noise="all",
                     isolated=False, chunk=2)
    keys = step.keys(7)
    big = step(keys, jnp.arange(10, 16))
    # same call shape, other neighbours and positions: bit-identical (what the engine's padded
    # calls rely on)
    other = step(keys, jnp.asarray([12, 13, 40, 41, 42, 43]))
    np.testing.assert_array_equal(np.asarray(big.images[2:4]), np.asarray(other.images[:2]))
    # another call shape: the same blends, within float32 rounding (a Poisson deviate may
    # round to the next integer)
    small = step(keys, jnp.arange(12, 14))
    np.testing.assert_array_equal(np.asarray(big.truth.index[2:4]), np.asarray(small.truth.index))
    diff = np.abs(np.asarray(big.images[2:4]) - np.asarray(small.images))
    assert diff.max() <= 1.0  # Poisson deviates are integers: at most one count apart


def test_gradients_match_central_differences(catsim_sample, lsst, x64):
    step = make_step(catsim_sample, lsst, _sampling(max_number=2, stamp=6.0, shift=1.0),
                     noise="none", isolated=False, dtype="float64", chunk=1)
    keys = step.keys(2)
    ids = jnp.arange(1)
    out = step(keys, ids)
    row = int(out.truth.index[0, 0])
    w = jnp.asarray(np.random.default_rng(0).random(out.images.shape))
    fwhm0 = out.conditions.fwhm

    def of_hlr(h):
        cat = step.arrays.catalog
        arrays = step.arrays._replace(catalog=cat._replace(hlr=cat.hlr.at[row, 0].set(h)))
        return jnp.sum(simulate(arrays, keys, ids, step.spec).images * w)

    def of_fwhm(f):
        cond = Conditions(fwhm0.at[0, 2].set(f), out.conditions.sky)
        return jnp.sum(simulate(step.arrays, keys, ids, step.spec, cond).images * w)

    for fun, x0 in ((of_hlr, float(step.arrays.catalog.hlr[row, 0])), (of_fwhm, float(fwhm0[0, 2]))):
        h = tol.FD_STEP_F64 * x0
        fd = (fun(x0 + h) - fun(x0 - h)) / (2 * h)
        g = jax.grad(fun)(x0)
        assert float(fd) != 0
        np.testing.assert_allclose(float(g), float(fd), rtol=tol.GRAD_RTOL_F64)


def test_truth_matches_btk_definitions_and_generator(catsim_sample, lsst):
    sf = _sampling(stamp=12.0, shift=2.0, seed=9)
    step = make_step(catsim_sample, lsst, sf, noise="none", isolated=True, chunk=2)
    out = step(step.keys(11), jnp.arange(4))
    gen = btk.draw_blends.CatsimGenerator(catsim_sample, _sampling(stamp=12.0, shift=2.0, seed=9),
                                          lsst, batch_size=4, stamp_size=12.0, seed=11,
                                          add_noise="none", isolated=True)
    batch = next(gen)
    iso = np.asarray(out.isolated, np.float64)
    sky = np.asarray(out.conditions.sky)
    peak = np.abs(batch["blend_images"]).max(axis=(1, 2, 3))
    for b in range(4):
        n = int(np.asarray(out.truth.mask[b]).sum())
        table = batch["blend_list"][b]
        assert n == len(table)
        np.testing.assert_array_equal(np.asarray(out.truth.index[b, :n]), table["btk_index"])
        np.testing.assert_allclose(np.asarray(out.truth.x[b, :n]), table["x_peak"],
                                   atol=tol.STEP_PIXEL_ATOL_F32)
        np.testing.assert_allclose(np.asarray(out.truth.y[b, :n]), table["y_peak"],
                                   atol=tol.STEP_PIXEL_ATOL_F32)
        for j, band in enumerate(lsst.available_filters):
            np.testing.assert_allclose(np.asarray(out.truth.flux[b, :n, j]), table[f"{band}_flux"],
                                       rtol=tol.STEP_SUM_RTOL_F32)
            np.testing.assert_allclose(np.asarray(out.truth.blendedness[b, :n, j]),
                                       np_blendedness(iso[b, :n, j]),
                                       atol=tol.STEP_SUM_RTOL_F32)
            np.testing.assert_allclose(np.asarray(out.truth.snr[b, :n, j]),
                                       np_snr(iso[b, :n, j], sky[b, j]),
                                       rtol=tol.STEP_SUM_RTOL_F32)
        # the generator's images of the same seeds: the same blends within float32 rounding
        err = np.abs(np.asarray(out.images[b]) - batch["blend_images"][b]).max() / peak[b]
        assert err < tol.IMAGE_RTOL_PEAK_F32, err


def test_conditions_out_of_bounds_are_flagged(catsim_sample, lsst):
    step = make_step(catsim_sample, lsst, _sampling(stamp=6.0, shift=1.0), noise="none",
                     isolated=False, chunk=2, conditions=UniformConditions((0.9, 1.1), (1, 1)))
    out = step(step.keys(0), jnp.arange(2))
    assert bool(out.truth.fwhm_in_bounds.all())
    wide = Conditions(out.conditions.fwhm.at[1, 0].multiply(1.5), out.conditions.sky)
    flagged = step(step.keys(0), jnp.arange(2), wide)
    assert np.asarray(flagged.truth.fwhm_in_bounds).tolist() == [True, False]


def test_bad_set_up_raises(catsim_sample, lsst):
    with pytest.raises(ValueError, match="fwhm_scale"):
        UniformConditions((1.2, 0.8))
    with pytest.raises(ValueError, match="psf must be one of"):
        make_step(catsim_sample, lsst, _sampling(), psf="gaussian")
    with pytest.raises(ValueError, match="moffat_beta"):
        make_step(catsim_sample, lsst, _sampling(), psf="moffat", moffat_beta=1.0)
