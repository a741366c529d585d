"""The JAX renderer against GalSim, finite differences, and its own invariants."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btkjax import tolerances as tol
from btkjax.galaxies import CatalogArrays, band_fluxes, catsim_arrays, make_sources
from btkjax.galsim_backend import render_galsim, tight_gsparams
from btkjax.render import (
    CATSIM_KINDS,
    Sources,
    default_psf_kimage,
    make_render_spec,
    psf_kimage_from_galsim,
    render,
    source_reach,
)
from btkjax.samplers import Blends
from btkjax.survey import default_psf_params, get_surveys

pytestmark = pytest.mark.float64  # parity with GalSim / finite differences in float64


def _single(kind_params, n_band=1, dtype=np.float64, **kw):
    """Sources for one blend of one galaxy with one component."""
    d = dict(
        flux=np.full((1, 1, n_band, 1), 1000.0), hlr=np.full((1, 1, 1), 0.5),
        q=np.ones((1, 1, 1)), beta=np.zeros((1, 1, 1)), n=np.ones((1, 1, 1)),
        dx=np.zeros((1, 1)), dy=np.zeros((1, 1)), rotation=np.zeros((1, 1)),
        g1=np.zeros((1, 1)), g2=np.zeros((1, 1)), mask=np.ones((1, 1), bool),
    )
    d.update(kind_params)
    d.update(kw)
    return Sources(**{k: np.asarray(v, bool if k == "mask" else dtype) for k, v in d.items()})


def _compare(sources, psfs, spec, rtol):
    psf_k = jnp.asarray(np.stack([psf_kimage_from_galsim(p.withGSParams(tight_gsparams()), spec)
                                  for p in psfs]))
    if sources.flux.dtype == np.float32:
        psf_k = psf_k.astype(jnp.complex64)
    img, iso = render(jax.tree.map(jnp.asarray, sources), psf_k, spec, isolated=True)
    ref, _ = render_galsim(sources, psfs, spec, gsparams=tight_gsparams())
    img = np.asarray(img)
    assert img.dtype == sources.flux.dtype
    for b in range(ref.shape[0]):
        err = np.abs(img[b] - ref[b]).max() / ref[b].max()
        assert err < rtol, f"blend {b}: max |jax - galsim| / peak = {err:.3g} > {rtol}"
    np.testing.assert_allclose(np.asarray(iso).sum(axis=1), img, atol=1e-10 * ref.max() if
                               img.dtype == np.float64 else 1e-5 * ref.max())
    return img, ref


def _spec_for(src, stamp, psf, kinds, fwhm):
    reach = source_reach(kinds, src.hlr.reshape(-1, len(kinds)), src.n.reshape(-1, len(kinds)),
                         max_shift=float(np.abs([src.dx, src.dy]).max()), psf_fwhm=fwhm,
                         q=src.q.reshape(-1, len(kinds)),
                         max_shear=float(np.hypot(src.g1, src.g2).max()), psfs=[psf],
                         pixel_scale=0.2)
    return make_render_spec(stamp, 0.2, [psf], kinds=kinds, reach_arcsec=reach)


@pytest.fixture(scope="module")
def lsst():
    return get_surveys("LSST")


@pytest.fixture(scope="module")
def lsst_spec(lsst, catsim_sample):
    psfs = [lsst.get_filter(b).psf for b in lsst.available_filters]
    arrays = catsim_arrays(catsim_sample.table)
    fwhm = max(lsst.get_filter(b).psf_fwhm.value for b in lsst.available_filters)
    reach = source_reach(CATSIM_KINDS, arrays.hlr, arrays.n, max_shift=3.0, psf_fwhm=fwhm,
                         q=arrays.q, psfs=psfs, pixel_scale=0.2, has_flux=arrays.frac > 0)
    return make_render_spec(120, 0.2, psfs, reach_arcsec=reach)


def _catsim_batch(catalog, survey, n_blend=2, n_slot=3, seed=3, dtype=np.float64):
    rng = np.random.default_rng(seed)
    blends = Blends(
        index=rng.integers(0, len(catalog.table), (n_blend, n_slot)).astype(np.int32),
        mask=np.arange(n_slot)[None, :] < rng.integers(1, n_slot + 1, (n_blend, 1)),
        dx=rng.uniform(-3, 3, (n_blend, n_slot)), dy=rng.uniform(-3, 3, (n_blend, n_slot)),
        rotation=np.zeros((n_blend, n_slot)), g1=np.zeros((n_blend, n_slot)),
        g2=np.zeros((n_blend, n_slot)),
    )
    arrays = CatalogArrays(*[jnp.asarray(a, dtype) for a in catsim_arrays(catalog.table)])
    fluxes = jnp.asarray(band_fluxes(catalog.table, survey), dtype)
    src = make_sources(jax.tree.map(jnp.asarray, blends), arrays, fluxes)
    return Sources(*[np.asarray(x) for x in src])


def test_catsim_blends_match_galsim_float64(catsim_sample, lsst, lsst_spec):
    """Full CatSim blends of the sample catalog, default LSST PSF, all six bands."""
    psfs = [lsst.get_filter(b).psf for b in lsst.available_filters]
    src = _catsim_batch(catsim_sample, lsst, n_blend=2)
    assert src.mask.sum() >= 3
    _compare(src, psfs, lsst_spec, tol.IMAGE_RTOL_PEAK_F64)


def test_catsim_blends_match_galsim_float32(catsim_sample, lsst, lsst_spec):
    import jax.numpy as jnp  # noqa: F401

    psfs = [lsst.get_filter(b).psf for b in lsst.available_filters][:2]
    src = _catsim_batch(catsim_sample, lsst, n_blend=2, seed=5)
    src = Sources(*[x[..., :2, :] if i == 0 else x for i, x in enumerate(src)])
    src = Sources(*[np.asarray(x, np.float32) if x.dtype == np.float64 else x for x in src])
    _compare(src, psfs, lsst_spec, tol.IMAGE_RTOL_PEAK_F32)


@pytest.mark.parametrize(
    "kind,params",
    [
        ("exponential", dict(hlr=[[[0.8]]], q=[[[0.4]]], beta=[[[0.7]]])),
        ("devaucouleurs", dict(hlr=[[[0.6]]], q=[[[0.7]]], beta=[[[-0.4]]])),
        ("sersic", dict(hlr=[[[0.5]]], n=[[[2.5]]], q=[[[0.6]]], beta=[[[1.2]]])),
        ("sersic", dict(hlr=[[[0.4]]], n=[[[0.5]]])),
        ("gaussian", dict(hlr=[[[0.3]]], q=[[[0.5]]])),
        ("point", {}),
    ],
)
def test_each_profile_matches_galsim(kind, params):
    psf = galsim.Moffat(beta=3.0, fwhm=0.7)
    src = _single(params, dx=[[0.37]], dy=[[-0.81]])
    spec = _spec_for(src, 41, psf, (kind,), fwhm=0.7)
    _compare(src, [psf], spec, tol.IMAGE_RTOL_PEAK_F64)


@pytest.mark.parametrize("stamp", [40, 41])
def test_rotation_shear_and_odd_even_stamps(stamp):
    psf = galsim.Kolmogorov(fwhm=0.6)
    src = _single({}, hlr=[[[0.7]]], q=[[[0.5]]], beta=[[[0.3]]], rotation=[[0.9]],
                  g1=[[0.05]], g2=[[-0.08]], dx=[[0.5]], dy=[[0.25]])
    spec = _spec_for(src, stamp, psf, ("exponential",), fwhm=0.6)
    _compare(src, [psf], spec, tol.IMAGE_RTOL_PEAK_F64)


def test_interpolated_image_and_airy_psfs():
    """PSFs given as arbitrary GalSim objects: an InterpolatedImage and an obscured Airy."""
    base = galsim.Convolve(galsim.Kolmogorov(fwhm=0.7), galsim.Airy(lam_over_diam=0.05,
                                                                    obscuration=0.3))
    arr = base.drawImage(nx=33, ny=33, scale=0.2).array
    interp = galsim.InterpolatedImage(galsim.Image(arr, scale=0.2)).withFlux(1.0)
    for psf in (interp, base):
        src = _single({}, hlr=[[[0.6]]], dx=[[0.3]])
        spec = _spec_for(src, 40, psf, ("exponential",), fwhm=0.7)
        _compare(src, [psf], spec, tol.IMAGE_RTOL_PEAK_F64)


def test_default_psf_in_jax_matches_galsim_psf(lsst, lsst_spec):
    f = lsst.get_filter("r")
    p = default_psf_params(lsst, f)
    jk = np.asarray(default_psf_kimage(lsst_spec, p["fwhm"], p["lam_over_diam"], p["obscuration"]))
    gk = psf_kimage_from_galsim(f.psf, lsst_spec, fold_wings=False)  # the analytic transfer
    assert np.abs(jk - gk).max() < tol.KVALUE_ATOL_F64


# ---------------------------------------------------------------------------------------------
# gradients


def _fd_check(fun, x0, name):
    x0 = float(x0)
    h = tol.FD_STEP_F64 * max(abs(x0), 1.0)
    grad = float(jax.grad(fun)(x0))
    fd = (fun(x0 + h) - fun(x0 - h)) / (2 * h)
    assert np.isfinite(grad), name
    assert abs(grad - fd) <= tol.GRAD_RTOL_F64 * max(abs(fd), 1e-8), (name, grad, fd)


@pytest.fixture(scope="module")
def grad_setup():
    psf = galsim.Kolmogorov(fwhm=0.7)
    spec = make_render_spec(24, 0.2, [psf], kinds=("sersic", "point"), reach_arcsec=5.0)
    psf_k = jnp.asarray(psf_kimage_from_galsim(psf, spec))[None]
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(24, 24)))
    return spec, psf_k, weights


# Each parameter the renderer is differentiated in, where it sits in `Sources`, and its value at
# two points: a generic one and special ones (round q = 1, n = 4, a galaxy on a pixel centre).
_GRAD_FIELDS = (
    ("flux", (0, 0, 0, 0), 1000.0, 1000.0),
    ("hlr", (0, 0, 0), 0.6, 0.6),
    ("q", (0, 0, 0), 0.55, 1.0),
    ("beta", (0, 0, 0), 0.4, 0.4),
    ("n", (0, 0, 0), 1.7, 4.0),
    ("dx", (0, 0), 0.3, 0.0),
    ("dy", (0, 0), -0.2, -0.2),
    ("g1", (0, 0), 0.05, 0.05),
    ("rotation", (0, 0), 0.3, 0.3),
)


@pytest.mark.parametrize("point", [0, 1], ids=["generic", "special"])
def test_gradients_match_finite_differences(grad_setup, point):
    """jax.grad of a weighted sum of the image with respect to every galaxy parameter at once
    (one compiled gradient, one compiled forward for the differences) against central
    differences, parameter by parameter."""
    spec, psf_k, weights = grad_setup
    base = _single({}, hlr=[[[0.6, 1.0]]], q=[[[0.55, 1.0]]], beta=[[[0.4, 0.0]]],
                   n=[[[1.7, 1.0]]], flux=np.array([[[[1000.0, 200.0]]]]), dx=[[0.3]],
                   dy=[[-0.2]])
    base = jax.tree.map(jnp.asarray, base)
    x0 = np.array([f[2 + point] for f in _GRAD_FIELDS])

    @jax.jit
    def fun(x):
        src = base
        for i, (field, index, *_) in enumerate(_GRAD_FIELDS):
            src = src._replace(**{field: getattr(src, field).at[index].set(x[i])})
        img, _ = render(src, psf_k, spec)
        return jnp.sum(img[0, 0] * weights)

    grad = np.asarray(jax.jit(jax.grad(fun))(jnp.asarray(x0)))
    assert np.all(np.isfinite(grad)), grad
    f0 = abs(float(fun(jnp.asarray(x0))))
    for i, (field, *_) in enumerate(_GRAD_FIELDS):
        h = tol.FD_STEP_F64 * max(abs(x0[i]), 1.0)
        up, down = x0.copy(), x0.copy()
        up[i] += h
        down[i] -= h
        fd = (float(fun(jnp.asarray(up))) - float(fun(jnp.asarray(down)))) / (2 * h)
        # central differences carry a rounding error of a few eps |f| / h: a derivative that is
        # zero (rotating a round galaxy) is checked to that level.
        rounding = 4 * np.finfo(np.float64).eps * f0 / h
        assert abs(grad[i] - fd) <= tol.GRAD_RTOL_F64 * abs(fd) + rounding, (field, grad[i], fd)


def test_gradient_wrt_psf_fwhm(grad_setup):
    spec, _, weights = grad_setup
    src = jax.tree.map(jnp.asarray, _single({}, hlr=[[[0.6, 1.0]]], flux=np.array([[[[1e3, 0.0]]]])))

    def fun(fwhm):
        psf_k = default_psf_kimage(spec, fwhm, 0.0154, 0.63)[None]
        img, _ = render(src, psf_k, spec)
        return jnp.sum(img[0, 0] * weights)

    _fd_check(jax.jit(fun), 0.7, "fwhm")  # one compiled program, not the PSF's ops one by one


# ---------------------------------------------------------------------------------------------
# compilation and batching


def test_no_retrace_between_batches(grad_setup):
    spec, psf_k, _ = grad_setup
    rng = np.random.default_rng(1)

    def batch():
        s = _single({}, hlr=[[[0.6, 1.0]]], flux=np.array([[[[1e3, 10.0]]]]))
        return jax.tree.map(lambda a: jnp.asarray(np.repeat(a, 5, 0) * (1 + 0.1 * rng.random())
                                                  if a.dtype != bool else np.repeat(a, 5, 0)), s)

    render(batch(), psf_k, spec)
    before = render._cache_size()
    outs = [render(batch(), psf_k, spec)[0] for _ in range(3)]
    assert render._cache_size() == before
    assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))


def test_blend_independent_of_batch_and_chunk(catsim_sample, lsst, lsst_spec):
    psfs = [lsst.get_filter(b).psf for b in lsst.available_filters]
    src = _catsim_batch(catsim_sample, lsst, n_blend=7, seed=11)
    psf_k = jnp.asarray(np.stack([psf_kimage_from_galsim(p, lsst_spec) for p in psfs]))
    full, _ = render(jax.tree.map(jnp.asarray, src), psf_k, lsst_spec, chunk=4)
    one, _ = render(jax.tree.map(lambda a: jnp.asarray(a[3:4]), src), psf_k, lsst_spec, chunk=1)
    np.testing.assert_array_equal(np.asarray(full)[3], np.asarray(one)[0])


def test_empty_slots_are_masked(grad_setup):
    spec, psf_k, _ = grad_setup
    src = _single({}, hlr=[[[0.6, 1.0]]], flux=np.array([[[[1e3, 10.0]]]]), mask=[[False]])
    img, iso = render(jax.tree.map(jnp.asarray, src), psf_k, spec, isolated=True)
    assert np.all(np.asarray(img) == 0) and np.all(np.asarray(iso) == 0)
