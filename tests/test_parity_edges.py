"""GalSim parity at the edges (issue 16): undersampled PSFs, flat sheared Sersic galaxies near
the edge, galaxies centred off the stamp, stamp sums; and the k-grid folding they rely on."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btkjax.core import tolerances as tol
from btkjax.core.boxes import (
    box_size,
    box_sizes,
    galaxy_reach,
    good_fft_size,
    row_shapes,
)
from btkjax.core.render import RenderSpec, Sources, grid_blocks, render
from btkjax.galsim_backend import render_galsim, tight_gsparams, with_gsparams
from btkjax.optics import make_render_spec, psf_kimage_from_galsim, source_reach


def _single(kind, flux=1000.0, hlr=0.5, q=1.0, beta=0.0, n=1.0, dx=0.0, dy=0.0, g1=0.0, g2=0.0):
    """One blend of one galaxy of one component."""
    d = dict(flux=[[[[flux]]]], hlr=[[[hlr]]], q=[[[q]]], beta=[[[beta]]], n=[[[n]]],
             dx=[[dx]], dy=[[dy]], rotation=[[0.0]], g1=[[g1]], g2=[[g2]], mask=[[True]])
    return Sources(**{k: np.asarray(v, bool if k == "mask" else np.float64) for k, v in d.items()})


def _spec(src, stamp, pixel_scale, psf, fwhm, kinds):
    """The spec the box rule gives (source_reach: shear, flatness, off-stamp distance)."""
    c = len(kinds)
    reach = source_reach(kinds, src.hlr.reshape(-1, c), src.n.reshape(-1, c),
                         max_shift=float(np.abs([src.dx, src.dy]).max()), psf_fwhm=fwhm,
                         q=src.q.reshape(-1, c), max_shear=float(np.hypot(src.g1, src.g2).max()),
                         psfs=[psf], pixel_scale=pixel_scale, stamp_size=stamp * pixel_scale)
    return make_render_spec(stamp, pixel_scale, [psf], kinds=kinds, reach_arcsec=reach)


def _ours(src, psfs, spec, dtype):
    psf_k = np.stack([psf_kimage_from_galsim(with_gsparams(p, tight_gsparams()), spec)
                      for p in psfs])
    cdtype = np.complex128 if dtype == np.float64 else np.complex64
    src = Sources(*[np.asarray(x, dtype) if x.dtype == np.float64 else x for x in src])
    img, _ = render(jax.tree.map(jnp.asarray, src), jnp.asarray(psf_k, cdtype), spec)
    img = np.asarray(img)
    assert img.dtype == dtype
    return img


def _peak_err(img, ref):
    return float(np.abs(img - ref).max() / np.abs(ref).max())


def _both_dtypes(src, psf, spec):
    """float64 (x64) within IMAGE_RTOL_PEAK_F64 and float32 within IMAGE_RTOL_PEAK_F32 of the
    stamp's own peak, against GalSim at tight gsparams."""
    ref, _ = render_galsim(src, [psf], spec, gsparams=tight_gsparams())
    with jax.enable_x64(True):
        err64 = _peak_err(_ours(src, [psf], spec, np.float64), ref)
    err32 = _peak_err(_ours(src, [psf], spec, np.float32), ref)
    assert err64 <= tol.IMAGE_RTOL_PEAK_F64, err64
    assert err32 <= tol.IMAGE_RTOL_PEAK_F32, err32
    return ref


# ---------------------------------------------------------------------------------------------
# the k grid: every evaluated k lands on the rfft bin it aliases to, exactly once


@pytest.mark.parametrize("n,mx,my", [(40, 0, 20), (40, 33, 33), (40, 61, 61), (40, 95, 130)])
def test_grid_blocks_fold_every_k_once(n, mx, my):
    spec = RenderSpec(stamp_pixels=30, fft_size=n, pixel_scale=0.1, kinds=("point",),
                      n_alias_x=mx, n_alias_y=my)
    half = n // 2
    seen = np.zeros((n, half + 1), int)
    expected = np.zeros((n, half + 1), int)
    e, m = spec.y_extent, max(mx, half)
    for ky in range(-e, e + 1):
        for kx in range(-m, m + 1):
            if kx % n <= half and (mx > half or 0 <= kx <= half):
                expected[ky % n, kx % n] += 1
    for yp, xp, rows, cols in grid_blocks(spec):
        ky, kx = spec.y_indices[yp], spec.x_indices[xp]
        r = np.arange(n)[rows]
        c = np.arange(half + 1)[cols]
        np.testing.assert_array_equal(np.mod(ky, n), r)  # each block row lands on its alias
        np.testing.assert_array_equal(np.mod(kx, n), c)
        seen[np.ix_(r, c)] += 1
    np.testing.assert_array_equal(seen, expected)
    assert seen.min() >= 1


# ---------------------------------------------------------------------------------------------
# undersampled PSF: Euclid VIS pixels, Moffat FWHM 0.17"


@pytest.mark.parametrize("beta", [2.0, 3.0])
@pytest.mark.parametrize("kind,dx,dy", [("point", 0.0, 0.0), ("exponential", 0.033, -0.021)])
def test_undersampled_psf_matches_galsim(beta, kind, dx, dy):
    psf = galsim.Moffat(beta=beta, fwhm=0.17)
    src = _single(kind, hlr=0.05, dx=dx, dy=dy)
    spec = _spec(src, 41, 0.1, psf, 0.17, (kind,))
    # the transfer function is still above the cut beyond 2 pi / p: more than one alias
    assert spec.n_alias_x > spec.fft_size and spec.n_alias_y > spec.fft_size
    _both_dtypes(src, psf, spec)


# ---------------------------------------------------------------------------------------------
# very flat, sheared Sersic galaxies near the edge


def test_flat_sheared_sersic_near_edge_matches_galsim():
    psf = galsim.Moffat(beta=3.0, fwhm=0.7)
    src = _single("sersic", hlr=0.8, n=4.0, q=0.08, beta=0.0, g1=0.15, g2=-0.1, dx=3.0, dy=-1.0)
    spec = _spec(src, 41, 0.2, psf, 0.7, ("sersic",))
    _both_dtypes(src, psf, spec)


# ---------------------------------------------------------------------------------------------
# galaxies centred off the stamp


@pytest.mark.parametrize("kind,hlr,dx,dy", [("exponential", 1.0, 6.0, 0.3),
                                             ("exponential", 2.0, 9.0, -7.0),
                                             ("sersic", 1.0, 5.5, 5.5)])
def test_off_stamp_galaxy_matches_galsim(kind, hlr, dx, dy):
    """Only the wings are on the 8.2" stamp: parity against their own peak."""
    psf = galsim.Moffat(beta=3.0, fwhm=0.7)
    src = _single(kind, hlr=hlr, n=4.0 if kind == "sersic" else 1.0, q=0.6, beta=0.3, dx=dx,
                  dy=dy)
    spec = _spec(src, 41, 0.2, psf, 0.7, (kind,))
    _both_dtypes(src, psf, spec)


def test_far_galaxy_beside_the_stamp_does_not_alias_in():
    """A galaxy 100" from a 12" stamp: the box holds its reach (no copy on the stamp)."""
    psf = galsim.Moffat(beta=3.0, fwhm=0.7)
    kinds = ("exponential",)
    d = dict(flux=[[[[1000.0]], [[5000.0]]]], hlr=[[[0.6], [1.5]]], q=[[[0.7], [0.5]]],
             beta=[[[0.2], [1.0]]], n=[[[1.0], [1.0]]], dx=[[0.4, 100.0]], dy=[[-0.3, 2.0]],
             rotation=[[0.0, 0.0]], g1=[[0.0, 0.0]], g2=[[0.0, 0.0]], mask=[[True, True]])
    src = Sources(**{k: np.asarray(v, bool if k == "mask" else np.float64) for k, v in d.items()})
    shapes = row_shapes(kinds, src.hlr[0], src.q[0], src.n[0], np.ones((2, 1), bool))
    reach = galaxy_reach(shapes, np.arange(2)[None], src.mask, src.dx, src.dy, src.g1, src.g2,
                         0.7, 60 * 0.2)
    size = int(box_sizes(reach.max(axis=1), 60, 0.2)[0])
    assert size * 0.2 > 2 * 100.0  # the copy of the far galaxy lands beyond the stamp
    spec = make_render_spec(60, 0.2, [psf], kinds=kinds, fft_size=size)
    ref, _ = render_galsim(src, [psf], spec, gsparams=tight_gsparams())
    with jax.enable_x64(True):
        err = _peak_err(_ours(src, [psf], spec, np.float64), ref)
    assert err <= tol.IMAGE_RTOL_PEAK_F64, err


# ---------------------------------------------------------------------------------------------
# stamp sums: the PSF's folded wings taken out


def test_reference_psf_forgets_gsparams_caches():
    """GalSim's withGSParams keeps a stepk computed at the old gsparams (copy.copy): the
    reference backend must draw with the new one (a star's 24" stamp sum moves by 1e-3)."""
    from btkjax.survey import get_surveys

    fresh = get_surveys("LSST").get_filter("r").psf
    used = get_surveys("LSST").get_filter("r").psf
    used.drawImage(nx=16, ny=16, scale=0.2)  # caches stepk at the default folding_threshold
    gs = tight_gsparams()
    assert with_gsparams(used, gs).stepk == pytest.approx(fresh.withGSParams(gs).stepk)


def test_star_stamp_sum_matches_galsim(x64):
    """LSST's Kolmogorov x Airy PSF: 1.5e-3 of a star's flux lies outside a 24" stamp; the
    periodic box used to fold it all back in."""
    from btkjax.survey import get_surveys

    psf = get_surveys("LSST").get_filter("y").psf
    src = _single("point", dx=1.3, dy=-0.7)
    for fft_size in (good_fft_size(120 + 14), 240):
        spec = make_render_spec(120, 0.2, [psf], kinds=("point",), fft_size=fft_size)
        ref, _ = render_galsim(src, [psf], spec, gsparams=tight_gsparams())
        img = _ours(src, [psf], spec, np.float64)
        assert ref.sum() < 0.9990 * 1000  # light beyond the stamp, which must stay out
        assert abs(img.sum() / ref.sum() - 1) <= tol.STAMP_SUM_RTOL
        assert _peak_err(img, ref) <= tol.IMAGE_RTOL_PEAK_F64


@pytest.mark.xfail(strict=True, reason=(
    "known gap: de Vaucouleurs bulges keep ~1e-3 of their flux beyond the brightness extent "
    "(FOLDING_THRESHOLD of the core); on blend 2 (a 65,000 e- bulge, hlr 0.3\") part of it folds "
    "onto the stamp: +2.4e-5 (u) to +1.4e-5 (i) in a 192-pixel box, 5e-7 in a 300-pixel one. "
    "Blends 0 and 1: <= 9.5e-6. Before the PSF-wing fix: +1.5e-4 to +4.5e-4."))
def test_catsim_stamp_sums_match_galsim(x64, catsim_sample):
    """Blends of the CatSim sample drawn by the generator (its box rule and PSF k-images) in
    all six LSST bands: stamp sums and pixels against tight GalSim."""
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.galaxies import make_sources
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import get_surveys

    n = 3
    sf = DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0, seed=0)
    gen = CatsimGenerator(catsim_sample, sf, get_surveys("LSST"), batch_size=n, stamp_size=24.0,
                          add_noise="none", dtype="float64", isolated=False, seed=0)
    state = gen._states["LSST"]
    ids = np.arange(n)
    blends, _ = gen._sample_tables(ids)
    blends = jax.tree.map(np.asarray, blends)
    img, _, psfs = gen._draw_survey(state, blends, ids)
    src = jax.tree.map(np.asarray, make_sources(jax.tree.map(jnp.asarray, blends),
                                                gen.arrays_device, state.fluxes))
    spec = state.spec(int(state.box_sizes(blends).max()))
    ref, _ = render_galsim(src, psfs, spec, gsparams=tight_gsparams())
    rel = np.asarray(img).sum((-1, -2)) / ref.sum((-1, -2)) - 1
    assert np.abs(rel).max() <= tol.STAMP_SUM_RTOL, rel
    for b in range(n):
        assert _peak_err(np.asarray(img)[b], ref[b]) <= tol.IMAGE_RTOL_PEAK_F64


def test_box_sizes_match_box_size_and_rule():
    """Vectorized box lookup equals the scalar rule L >= reach + S p / 2 (fast sizes)."""
    reach = np.concatenate([np.random.default_rng(0).uniform(0, 100, 500), [0.0, 12.0, 30.0]])
    got = box_sizes(reach, 120, 0.2)
    np.testing.assert_array_equal(got, [box_size(r, 120, 0.2) for r in reach])
    need = np.maximum(120, np.ceil((reach + 12.0) / 0.2 - 1e-9))
    assert np.all(got >= need) and np.all(got % 2 == 0)
    assert all(good_fft_size(int(g)) == g for g in got)
    assert np.all([good_fft_size(int(m)) for m in need] == got)


@pytest.mark.xfail(strict=True, reason=(
    "known gap, as for CatSim bulges: the Sersic tails (n up to ~6) beyond the brightness extent "
    "fold onto the stamp: measured +1.5e-5 to +1.6e-5 in every band (issue 16 saw +2e-4 to "
    "+4e-4 before the PSF-wing fix); pixels within 2e-5 of the peak."))
def test_cosmos_parametric_stamp_sums_match_galsim(x64):
    """COSMOS parametric galaxies (bulge + disk and single Sersic fits) drawn by
    CosmosGenerator and by its GalSim backend at tight gsparams, LSST: sums and pixels."""
    import warnings

    from conftest import COSMOS_DIR

    from btkjax.cosmos import CosmosCatalog, CosmosGenerator
    from btkjax.sampling_functions import SamplingFunction
    from btkjax.survey import get_surveys

    files = [COSMOS_DIR / "real_galaxy_catalog_23.5_example.fits",
             COSMOS_DIR / "real_galaxy_catalog_23.5_example_fits.fits"]
    if not all(f.exists() for f in files):
        pytest.skip(f"COSMOS example data not found in {COSMOS_DIR}")
    catalog = CosmosCatalog.from_file(files, exclusion_level="bad_fits")
    table = catalog.table
    bulge = np.flatnonzero(np.asarray(table["use_bulgefit"]) == 1)
    sersic = np.flatnonzero(np.asarray(table["use_bulgefit"]) == 0)
    rows = [int(bulge[0]), int(sersic[0]), int(sersic[1])]

    class Fixed(SamplingFunction):
        def __init__(self):
            super().__init__(24.0, max_number=3)

        def __call__(self, table):
            out = table[rows]
            out["ra"], out["dec"] = [0.3, -1.1, 1.7], [-0.4, 0.9, 1.2]
            return out

    out = {}
    for backend in ("jax", "galsim"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = CosmosGenerator(catalog, Fixed(), get_surveys("LSST"), batch_size=1,
                                  backend=backend, add_noise="none", dtype="float64",
                                  galsim_gsparams=tight_gsparams(), gal_type="parametric")
            out[backend] = np.asarray(next(gen)["blend_images"])
    ours, ref = out["jax"], out["galsim"]
    rel = ours.sum((-1, -2)) / ref.sum((-1, -2)) - 1
    assert np.abs(rel).max() <= tol.STAMP_SUM_RTOL, rel
    assert _peak_err(ours, ref) <= tol.IMAGE_RTOL_PEAK_F64
