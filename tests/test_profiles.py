"""Tests of btkjax.profiles against GalSim's kValue, finite differences, and jit/vmap."""

import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btkjax import profiles as P
from btkjax.tolerances import (
    F64_SAME_ATOL,
    F64_SAME_RTOL,
    FD_STEP_F64,
    GALSIM_SERSIC_B_RTOL,
    GRAD_RTOL_F64,
    IMAGE_RTOL_PEAK_F32,
    KVALUE_ATOL_F64,
    SERSIC_B_RTOL,
    SERSIC_EXACT_ATOL_F64,
)

pytestmark = pytest.mark.float64  # parity with GalSim / finite differences in float64

# Tight GalSim gsparams: GalSim's own kValue error is then ~1e-8 for the analytic profiles and
# ~3e-7 for its Sersic tables (measured against the exact transform).
GSP = galsim.GSParams(
    kvalue_accuracy=1e-10, maxk_threshold=1e-8, folding_threshold=1e-6, xvalue_accuracy=1e-10
)
# For the Sersic tables GalSim's build time grows steeply with kvalue_accuracy (5 s for n=6 at
# 1e-10); 1e-8 gives the same values to 1e-10 (measured: GalSim's residual against the exact
# transform, up to 3.7e-7, comes from elsewhere in its Sersic code), at a third of the time.
GSP_SERSIC = galsim.GSParams(
    kvalue_accuracy=1e-8, maxk_threshold=1e-8, folding_threshold=1e-6, xvalue_accuracy=1e-10
)
# k grid (rad/arcsec): 0, tiny, small, around the profile scale, and far in the tail.
K = np.concatenate([[0.0, 1e-6, 1e-3], np.geomspace(0.01, 500.0, 80)])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def galsim_k(obj, kx, ky=None):
    ky = np.zeros_like(kx) if ky is None else ky
    return np.array([obj.kValue(float(a), float(b)) for a, b in zip(kx, ky, strict=True)])


def assert_kclose(ours, ref, atol=KVALUE_ATOL_F64):
    ours = np.asarray(ours)
    assert ours.dtype in (np.float64, np.complex128)
    err = np.max(np.abs(ours - ref))
    assert err <= atol, f"max |ours - galsim| = {err:.3g} > {atol:.3g}"


# ----------------------------------------------------------------------------------------------
# Profiles against GalSim
# ----------------------------------------------------------------------------------------------

RADIAL_CASES = {
    "gaussian": (lambda ksq: P.gaussian_kvalue(ksq, 0.4), galsim.Gaussian(sigma=0.4, gsparams=GSP)),
    "exponential": (
        lambda ksq: P.exponential_kvalue(ksq, 0.6),
        galsim.Exponential(half_light_radius=0.6, gsparams=GSP),
    ),
    "point": (P.point_kvalue, galsim.DeltaFunction(gsparams=GSP)),
    "kolmogorov": (
        lambda ksq: P.kolmogorov_kvalue(ksq, 0.7),
        galsim.Kolmogorov(fwhm=0.7, gsparams=GSP),
    ),
    "airy_obs0": (
        lambda ksq: P.airy_kvalue(ksq, 0.1, 0.0),
        galsim.Airy(lam_over_diam=0.1, gsparams=GSP),
    ),
    "airy_obs0.3": (
        lambda ksq: P.airy_kvalue(ksq, 0.1, 0.3),
        galsim.Airy(lam_over_diam=0.1, obscuration=0.3, gsparams=GSP),
    ),
    "airy_obs0.6": (
        lambda ksq: P.airy_kvalue(ksq, 0.05, 0.6),
        galsim.Airy(lam_over_diam=0.05, obscuration=0.6, gsparams=GSP),
    ),
    "moffat_fwhm_b2.5": (
        lambda ksq: P.moffat_kvalue(ksq, 2.5, fwhm=0.7),
        galsim.Moffat(beta=2.5, fwhm=0.7, gsparams=GSP),
    ),
    "moffat_hlr_b4.765": (
        lambda ksq: P.moffat_kvalue(ksq, 4.765, hlr=0.5),
        galsim.Moffat(beta=4.765, half_light_radius=0.5, gsparams=GSP),
    ),
    "moffat_rd_b1.2": (
        lambda ksq: P.moffat_kvalue(ksq, 1.2, scale_radius=0.3),
        galsim.Moffat(beta=1.2, scale_radius=0.3, gsparams=GSP),
    ),
    "moffat_fwhm_b8": (
        lambda ksq: P.moffat_kvalue(ksq, 8.0, fwhm=1.1),
        galsim.Moffat(beta=8.0, fwhm=1.1, gsparams=GSP),
    ),
}


@pytest.mark.parametrize("name", sorted(RADIAL_CASES))
def test_radial_profiles_vs_galsim(x64, name):
    ours, obj = RADIAL_CASES[name]
    ref = galsim_k(obj, K).real
    assert_kclose(ours(jnp.asarray(K**2)), ref)


def test_airy_zero_beyond_cutoff(x64):
    kmax = 2 * np.pi / 0.1
    k = np.array([0.999 * kmax, kmax, 1.001 * kmax, 3 * kmax])
    val = np.asarray(P.airy_kvalue(k**2, 0.1, 0.3))
    assert val[0] > 0
    np.testing.assert_array_equal(val[1:], 0.0)


@pytest.mark.parametrize("n", [0.3, 0.5, 0.7, 1.0, 1.5, 2.5, 3.3, 4.0, 6.0, 6.2])
def test_sersic_vs_galsim(x64, n):
    hlr = 0.7
    ref = galsim_k(galsim.Sersic(n=n, half_light_radius=hlr, gsparams=GSP_SERSIC), K).real
    assert_kclose(P.sersic_kvalue(K**2, n, hlr), ref)


def test_devaucouleurs_vs_galsim(x64):
    ref = galsim_k(galsim.DeVaucouleurs(half_light_radius=1.3, gsparams=GSP_SERSIC), K).real
    ours = P.devaucouleurs_kvalue(K**2, 1.3)
    assert_kclose(ours, ref)
    # The general-n table agrees with the dedicated n=4 one.
    assert_kclose(P.sersic_kvalue(K**2, 4.0, 1.3), np.asarray(ours))


@pytest.mark.parametrize("n", [0.5, 1.0])
def test_sersic_exact_analytic_cases(x64, n):
    """Sersic n=0.5 is a Gaussian and n=1 an exponential: exact references, far beyond GalSim's
    accuracy, for the tables (both the Mellin-Barnes values and their interpolation)."""
    hlr = 0.9
    k = np.concatenate([[0.0], np.geomspace(1e-5, 1e4, 400)])
    if n == 0.5:
        sigma = hlr / np.sqrt(2 * np.log(2))
        ref = np.exp(-0.5 * k**2 * sigma**2)
    else:
        ref = (1 + (k * hlr / P.EXPONENTIAL_HLR_FACTOR) ** 2) ** -1.5
    err = np.max(np.abs(np.asarray(P.sersic_kvalue(k**2, n, hlr)) - ref))
    assert err <= SERSIC_EXACT_ATOL_F64


@pytest.mark.parametrize("n,k", [(0.77, 0.1546), (0.77, 1.0), (2.2, 0.4), (5.5, 0.05)])
def test_sersic_vs_direct_quadrature(x64, n, k):
    """Independent check by direct quadrature of the Hankel integral (valid at small k hlr).

    GalSim 2.8.5 itself is off by 5.7e-5 at n=0.77, hlr=0.7, k in [0.154, 0.34] even with tight
    gsparams (a glitch of its own table); this is why n=0.77 is checked here rather than against
    GalSim."""
    from scipy.integrate import quad
    from scipy.special import j0

    hlr = 0.7
    b = float(P._sersic_b_host(n))

    def f(r, k):
        return np.exp(-b * (r / hlr) ** (1 / n)) * j0(k * r) * r

    opts = dict(epsabs=1e-14, epsrel=1e-13, limit=2000, points=[hlr, 5 * hlr, 50 * hlr])
    rmax = hlr * (60.0 / b) ** n
    ref = (
        quad(lambda r: f(r, k), 0, rmax, **opts)[0] / quad(lambda r: f(r, 0.0), 0, rmax, **opts)[0]
    )
    err = abs(float(P.sersic_kvalue(k**2, n, hlr)) - ref)
    assert err <= SERSIC_EXACT_ATOL_F64


def test_devaucouleurs_exact(x64):
    """n = 4 against the exact (Mellin-Barnes, independent step size) Hankel transform."""
    big_l = 4.0 * np.log(P._sersic_b_host(4.0))
    k = np.geomspace(1e-5, 1e9, 500)
    ref = P._mellin_barnes_sersic(4.0, k * np.exp(-big_l), dt=0.03, delta=0.4)
    err = np.max(np.abs(np.asarray(P.devaucouleurs_kvalue(k**2, 1.0)) - ref))
    assert err <= SERSIC_EXACT_ATOL_F64


def test_sersic_b(x64):
    from scipy.special import gammaincinv

    for n in [0.3, 0.31, 1.0, 2.2, 4.0, 6.2]:
        # Exact (the spline of ln(hlr / r0) is within 2e-9) ...
        np.testing.assert_allclose(float(P.sersic_b(n)), gammaincinv(2 * n, 0.5),
                                   rtol=SERSIC_B_RTOL)
        # ... and GalSim's own root finder (good to 4e-8 at n = 0.3).
        s = galsim.Sersic(n=n, half_light_radius=1.0)
        b = (s.half_light_radius / s.scale_radius) ** (1.0 / n)
        np.testing.assert_allclose(float(P.sersic_b(n)), b, rtol=GALSIM_SERSIC_B_RTOL)


def test_pixel_vs_galsim(x64):
    rng = np.random.default_rng(3)
    kx, ky = rng.uniform(-40, 40, (2, 60))
    kx[0] = ky[0] = 0.0
    kx[1] = 0.0
    obj = galsim.Pixel(0.2, gsparams=GSP)
    assert_kclose(P.pixel_kvalue(kx, ky, 0.2), galsim_k(obj, kx, ky).real)


@pytest.mark.parametrize("shape", [(16, 16), (15, 21), (20, 13)])
def test_interpolated_image_vs_galsim(x64, shape):
    """GalSim's kValue interpolates the zero-padded DFT with a Quintic k-interpolant; its error
    against the exact sum falls as pad_factor^-5 (measured 1e-4 at the default pad_factor 4,
    4e-6 at 8, 1.2e-7 at 16), so the comparison uses pad_factor=16."""
    rng = np.random.default_rng(sum(shape))
    scale = 0.5
    arr = galsim.Gaussian(sigma=1.5).shift(0.3, -0.2).drawImage(
        nx=shape[1], ny=shape[0], scale=scale
    ).array + 0.01 * rng.normal(size=shape)
    obj = galsim.InterpolatedImage(galsim.Image(arr, scale=scale), pad_factor=16, gsparams=GSP)
    kx, ky = rng.uniform(-6, 6, (2, 100))
    kx[0] = ky[0] = 0.0
    ref = galsim_k(obj, kx, ky)
    raw = P.interpolated_image_kvalue(kx, ky, arr, scale, normalize=False)
    assert_kclose(raw, ref, atol=KVALUE_ATOL_F64 * arr.sum())
    assert_kclose(P.interpolated_image_kvalue(kx, ky, arr, scale), ref / arr.sum())
    # An asymmetric image has a complex transform: the phase convention matters.
    assert np.max(np.abs(ref.imag)) > 1e-3


def test_quintic_uval_vs_galsim(x64):
    u = np.linspace(-3, 3, 61)
    np.testing.assert_allclose(
        np.asarray(P.quintic_uval(u)), galsim.Quintic().kval(2 * np.pi * u), rtol=0,
        atol=F64_SAME_RTOL,  # order-one values
    )


# ----------------------------------------------------------------------------------------------
# Transformations
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q,beta", [(0.6, 0.7), (0.3, -1.2), (1.0, 0.4), (0.9, 2.5)])
def test_sheared_ksq_vs_galsim(x64, q, beta):
    rng = np.random.default_rng(5)
    kx, ky = rng.uniform(-8, 8, (2, 60))
    gal = galsim.Exponential(half_light_radius=0.8, gsparams=GSP)
    ref = galsim_k(gal.shear(q=q, beta=beta * galsim.radians), kx, ky).real
    assert_kclose(P.exponential_kvalue(P.sheared_ksq(kx, ky, q, beta), 0.8), ref)
    a = P.shear_matrix_q_beta(q, beta)
    np.testing.assert_allclose(
        np.asarray(P.transformed_ksq(kx, ky, a)),
        np.asarray(P.sheared_ksq(kx, ky, q, beta)),
        rtol=F64_SAME_RTOL,
    )


def test_combined_transform_vs_galsim(x64):
    rng = np.random.default_rng(6)
    kx, ky = rng.uniform(-8, 8, (2, 80))
    q, beta, theta, g1, g2 = 0.55, 0.7, 0.4, 0.03, -0.05
    gal = galsim.Sersic(n=1.5, half_light_radius=0.8, gsparams=GSP_SERSIC)
    obj = gal.shear(q=q, beta=beta * galsim.radians).rotate(theta * galsim.radians)
    obj = obj.shear(g1=g1, g2=g2)
    a = P.shear_matrix(g1, g2) @ P.rotation_matrix(theta) @ P.shear_matrix_q_beta(q, beta)
    assert_kclose(
        P.sersic_kvalue(P.transformed_ksq(kx, ky, a), 1.5, 0.8), galsim_k(obj, kx, ky).real
    )
    # A non-symmetric profile: the rotation's sign and transform_k's transpose matter.
    arr = np.zeros((9, 9))
    arr[4, 4], arr[4, 6], arr[7, 3] = 1.0, 0.5, 0.25
    img = galsim.InterpolatedImage(galsim.Image(arr, scale=0.3), pad_factor=16, gsparams=GSP)
    r = P.rotation_matrix(theta) @ P.shear_matrix(g1, g2)
    ref = galsim_k(img.shear(g1=g1, g2=g2).rotate(theta * galsim.radians), kx / 4, ky / 4)
    kxp, kyp = P.transform_k(kx / 4, ky / 4, r)
    assert_kclose(P.interpolated_image_kvalue(kxp, kyp, arr, 0.3, normalize=False), ref)
    assert np.max(np.abs(ref.imag)) > 1e-2


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

KG = np.array([0.3, 1.1, 2.7, 6.0])  # rad/arcsec, where every profile below varies (float64)


def _check_grad(f, p0, step=FD_STEP_F64):
    """d/dp sum_k w_k f(k; p) against a central finite difference."""
    w = jnp.array([1.0, 0.7, -0.4, 0.3])

    def s(p):
        return jnp.sum(w * f(p))

    g = float(jax.grad(s)(jnp.asarray(p0, dtype=jnp.float64)))
    h = step * max(abs(p0), 1.0)
    fd = (float(s(p0 + h)) - float(s(p0 - h))) / (2 * h)
    assert np.isfinite(g)
    assert abs(fd) > 1e-6  # the check is meaningful
    assert abs(g - fd) <= GRAD_RTOL_F64 * abs(fd), (g, fd)


GRAD_CASES = {
    "gaussian_sigma": (lambda p: P.gaussian_kvalue(KG**2, p), 0.4),
    "exponential_hlr": (lambda p: P.exponential_kvalue(KG**2, p), 0.6),
    "sersic_hlr": (lambda p: P.sersic_kvalue(KG**2, 2.3, p), 0.6),
    "sersic_n": (lambda p: P.sersic_kvalue(KG**2, p, 0.6), 2.3),
    "sersic_n_small": (lambda p: P.sersic_kvalue(KG**2, p, 0.6), 0.31),
    "sersic_n_large": (lambda p: P.sersic_kvalue(KG**2, p, 0.6), 6.19),
    # Low-k Taylor branch (k hlr < 1e-4): F - 1 ~ 1e-8 there, so the float64 rounding of F
    # (1e-16) over a 1e-5 step would be 1e-3 of the derivative; a 100x larger step keeps the
    # rounding at 1e-7 and the O(h^2) truncation at ~1e-6 relative, both below GRAD_RTOL_F64.
    "sersic_n_lowk": (lambda p: 1e8 * (P.sersic_kvalue((KG * 1.5e-5) ** 2, p, 0.6) - 1), 6.0),
    # High-k asymptotic branch (k r0 > 50): values ~1e-12, rescaled.
    "sersic_n_highk": (lambda p: 1e12 * P.sersic_kvalue((KG * 1e4) ** 2, p, 0.6), 1.7),
    "sersic_n_highk_large_n": (lambda p: 1e6 * P.sersic_kvalue((KG * 1e8) ** 2, p, 0.6), 5.5),
    "devaucouleurs_hlr": (lambda p: P.devaucouleurs_kvalue(KG**2, p), 0.6),
    # n = 4 high-k asymptotic branch (k hlr > 1.7e5) and low-k Taylor branch (k hlr < 1e-4).
    "devaucouleurs_hlr_highk": (lambda p: 1e11 * P.devaucouleurs_kvalue((KG * 1e6) ** 2, p), 0.6),
    "devaucouleurs_hlr_lowk": (
        lambda p: 1e8 * (P.devaucouleurs_kvalue((KG * 1.5e-5) ** 2, p) - 1),
        0.6,
    ),
    "kolmogorov_fwhm": (lambda p: P.kolmogorov_kvalue(KG**2, p), 0.7),
    "airy_lod": (lambda p: P.airy_kvalue(KG**2, p, 0.3), 0.45),
    "airy_obscuration": (lambda p: P.airy_kvalue(KG**2, 0.45, p), 0.3),
    "moffat_beta": (lambda p: P.moffat_kvalue(KG**2, p, fwhm=0.7), 3.5),
    "moffat_fwhm": (lambda p: P.moffat_kvalue(KG**2, 3.5, fwhm=p), 0.7),
    "moffat_hlr": (lambda p: P.moffat_kvalue(KG**2, 2.5, hlr=p), 0.7),
    "pixel_scale": (lambda p: P.pixel_kvalue(KG, KG[::-1], p), 0.2),
    "sheared_q": (lambda p: P.exponential_kvalue(P.sheared_ksq(KG, KG[::-1], p, 0.6), 0.5), 0.7),
    "sheared_beta": (
        lambda p: P.exponential_kvalue(P.sheared_ksq(KG, KG[::-1] - 1, 0.6, p), 0.5),
        0.6,
    ),
    "lensing_g1": (
        lambda p: P.exponential_kvalue(
            P.transformed_ksq(KG, KG[::-1], P.shear_matrix(p, 0.02)), 0.5
        ),
        0.05,
    ),
    "rotation_theta": (
        lambda p: P.exponential_kvalue(
            P.transformed_ksq(
                KG, KG[::-1] - 1, P.rotation_matrix(p) @ P.shear_matrix_q_beta(0.5, 0.3)
            ),
            0.5,
        ),
        0.4,
    ),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradient_vs_finite_difference(x64, name):
    f, p0 = GRAD_CASES[name]
    _check_grad(f, p0, step=FD_STEP_F64 * (100 if name.endswith("_lowk") else 1))


def test_gradients_finite_at_special_points(x64):
    """Finite gradients at k = 0, q = 1, obscuration = 0, the Airy cutoff and Sersic n edges."""
    k0 = jnp.array([0.0, 0.5])
    cutoff = 2 * jnp.pi / 0.45
    # (Sersic n at k = 0 is checked with the n edges below, in one vmapped gradient.)
    checks = {
        "sersic_hlr_k0": lambda p: P.sersic_kvalue(k0**2, 2.0, p),
        "kolmogorov_k0": lambda p: P.kolmogorov_kvalue(k0**2, p),
        "moffat_k0": lambda p: P.moffat_kvalue(k0**2, p, fwhm=0.7),
        "airy_k0_obs0": lambda p: P.airy_kvalue(k0**2, 0.45, p * 0.0),
        "airy_cutoff": lambda p: P.airy_kvalue(jnp.array([cutoff, 0.999 * cutoff]) ** 2, p, 0.2),
        "airy_obs0": lambda p: P.airy_kvalue(KG**2, 0.45, p - p),
        "sheared_q1": lambda p: P.exponential_kvalue(P.sheared_ksq(KG, KG, p / p, 0.3), 0.5),
        "devaucouleurs_k0": lambda p: P.devaucouleurs_kvalue(k0**2, p),
        "pixel_k0": lambda p: P.pixel_kvalue(k0, k0, p),
    }
    names = sorted(checks)
    # One jacobian (one trace/compile) for all checks: row i is d sum(check_i) / dp.
    grads = jax.jit(jax.jacrev(lambda p: jnp.stack([jnp.sum(checks[n](p)) for n in names])))(0.7)
    bad = [n for n, g in zip(names, np.asarray(grads), strict=True) if not np.isfinite(g)]
    assert not bad, bad
    # Derivative at q = 1 through q itself, and obscuration = 0 through obscuration itself.
    gq = jax.grad(lambda q: jnp.sum(P.exponential_kvalue(P.sheared_ksq(KG, KG, q, 0.3), 0.5)))(1.0)
    assert np.isfinite(float(gq)) and abs(float(gq)) > 1e-3
    geps = jax.grad(lambda e: jnp.sum(P.airy_kvalue(KG**2, 0.45, e)))(0.0)
    assert np.isfinite(float(geps))
    # Sersic n: at k = 0, tiny, mid and huge k, at n = 0.7 and at the table edges and beyond (a
    # finite gradient of the sum implies finite per-point gradients).
    ksq = jnp.array([0.0, 1e-10, 0.25, 1.0, 1e10])
    gn = jax.jit(jax.vmap(jax.grad(lambda n: jnp.sum(P.sersic_kvalue(ksq, n, 0.6)))))(
        jnp.array([0.27, 0.3, 0.7, 6.2, 6.6, 7.0])
    )
    assert np.all(np.isfinite(np.asarray(gn))), gn


def test_airy_gradient_at_cutoff_is_zero(x64):
    """Near the cutoff the MTF falls like (2 - t)^(3/2): its lam/D derivative tends to 0."""
    cutoff = 2 * np.pi / 0.45
    g = jax.grad(lambda p: P.airy_kvalue(cutoff**2, p, 0.2))(0.45)
    assert float(g) == 0.0
    g_in = jax.grad(lambda p: P.airy_kvalue((0.9 * cutoff) ** 2, p, 0.2))(0.45)
    assert np.isfinite(float(g_in)) and float(g_in) < 0


# ----------------------------------------------------------------------------------------------
# jit / vmap / dtype
# ----------------------------------------------------------------------------------------------


def test_jit_vmap_matches_loop(x64):
    rng = np.random.default_rng(9)
    ns = jnp.asarray(rng.uniform(0.3, 6.2, 7))
    hlrs = jnp.asarray(rng.uniform(0.2, 2.0, 7))
    betas = jnp.asarray(rng.uniform(1.5, 6.0, 7))
    k = jnp.asarray(np.geomspace(1e-3, 50, 30))

    batched = jax.jit(jax.vmap(lambda n, h: P.sersic_kvalue(k**2, n, h)))(ns, hlrs)
    loop = np.stack(
        [
            np.asarray(P.sersic_kvalue(k**2, float(n), float(h)))
            for n, h in zip(ns, hlrs, strict=True)
        ]
    )
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=0, atol=F64_SAME_ATOL)

    batched = jax.jit(jax.vmap(lambda b, h: P.moffat_kvalue(k**2, b, hlr=h)))(betas, hlrs)
    loop = np.stack(
        [
            np.asarray(P.moffat_kvalue(k**2, float(b), hlr=float(h)))
            for b, h in zip(betas, hlrs, strict=True)
        ]
    )
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=0, atol=F64_SAME_ATOL)

    # Broadcasting: parameters of shape (7, 1) against k of shape (30,).
    sersic_loop = np.stack(
        [
            np.asarray(P.sersic_kvalue(k**2, float(n), float(h)))
            for n, h in zip(ns, hlrs, strict=True)
        ]
    )
    bc = P.sersic_kvalue(k**2, ns[:, None], hlrs[:, None])
    assert bc.shape == (7, 30)
    np.testing.assert_allclose(np.asarray(bc), sersic_loop, rtol=0, atol=F64_SAME_ATOL)

    imgs = jnp.asarray(rng.normal(size=(4, 11, 12)) + 1.0)
    kx, ky = jnp.asarray(rng.uniform(-5, 5, (2, 25)))
    batched = jax.jit(jax.vmap(lambda im: P.interpolated_image_kvalue(kx, ky, im, 0.2)))(imgs)
    loop = np.stack([np.asarray(P.interpolated_image_kvalue(kx, ky, im, 0.2)) for im in imgs])
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=0, atol=F64_SAME_RTOL)

    qs = jnp.asarray(rng.uniform(0.2, 1.0, 7))
    bs = jnp.asarray(rng.uniform(-3, 3, 7))
    batched = jax.jit(jax.vmap(lambda q, b: P.sheared_ksq(kx, ky, q, b)))(qs, bs)
    loop = np.stack(
        [np.asarray(P.sheared_ksq(kx, ky, float(q), float(b))) for q, b in zip(qs, bs, strict=True)]
    )
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=F64_SAME_ATOL)


def test_float32_default():
    """Without x64 everything runs in float32 and stays close to the float64 values."""
    k = np.geomspace(1e-3, 50, 40)
    with jax.enable_x64(False):
        vals32 = {
            "sersic": P.sersic_kvalue(k**2, 2.5, 0.5),
            "dev": P.devaucouleurs_kvalue(k**2, 0.5),
            "moffat": P.moffat_kvalue(k**2, 3.0, fwhm=0.7),
            "airy": P.airy_kvalue(k**2, 0.1, 0.3),
            "kolmogorov": P.kolmogorov_kvalue(k**2, 0.7),
        }
    with jax.enable_x64(True):
        vals64 = {
            "sersic": P.sersic_kvalue(k**2, 2.5, 0.5),
            "dev": P.devaucouleurs_kvalue(k**2, 0.5),
            "moffat": P.moffat_kvalue(k**2, 3.0, fwhm=0.7),
            "airy": P.airy_kvalue(k**2, 0.1, 0.3),
            "kolmogorov": P.kolmogorov_kvalue(k**2, 0.7),
        }
    for name in vals32:
        assert vals32[name].dtype == jnp.float32, name
        assert vals64[name].dtype == jnp.float64, name
        err = np.max(np.abs(np.asarray(vals32[name], np.float64) - np.asarray(vals64[name])))
        assert err <= IMAGE_RTOL_PEAK_F32, (name, err)


def test_float32_inputs_stay_float32_under_x64(x64):
    """float32 inputs give float32 results even with x64 on (the tables follow the input dtype),
    in every branch of the Sersic evaluation (k = 0, Taylor, table, asymptotic)."""
    k = np.concatenate([[0.0, 1e-6], np.geomspace(1e-3, 1e7, 60)]).astype(np.float32)
    ksq32 = jnp.asarray(k) ** 2
    for n in (0.3, 1.7, 4.0, 6.2):
        v32 = P.sersic_kvalue(ksq32, np.float32(n), np.float32(0.5))
        assert v32.dtype == jnp.float32, n
        v64 = np.asarray(P.sersic_kvalue(ksq32.astype(jnp.float64), n, 0.5))
        assert np.max(np.abs(np.asarray(v32, np.float64) - v64)) <= IMAGE_RTOL_PEAK_F32, n
    v32 = P.devaucouleurs_kvalue(ksq32, np.float32(0.5))
    assert v32.dtype == jnp.float32
    v64 = np.asarray(P.devaucouleurs_kvalue(ksq32.astype(jnp.float64), 0.5))
    assert np.max(np.abs(np.asarray(v32, np.float64) - v64)) <= IMAGE_RTOL_PEAK_F32
    assert P.sersic_b(np.float32(2.0)).dtype == jnp.float32


def test_sersic_per_point_n_matches_per_galaxy(x64):
    """One n per k point (the per-point 2-D table lookup) agrees with one n per galaxy (the
    per-galaxy table row, the renderer's layout [G, 1, 1] against [G, Ry, Cx])."""
    rng = np.random.default_rng(11)
    ns = rng.uniform(0.3, 6.2, (5, 1, 1))
    hlrs = rng.uniform(0.2, 2.0, (5, 1, 1))
    ksq = rng.uniform(0.0, 40.0, (5, 3, 8)) ** 2
    ksq[0, 0, 0] = 0.0
    ksq[1, 0, 0] = 1e12  # asymptotic branch
    per_galaxy = np.asarray(P.sersic_kvalue(ksq, ns, hlrs))
    per_point = np.asarray(
        P.sersic_kvalue(ksq, np.broadcast_to(ns, ksq.shape), np.broadcast_to(hlrs, ksq.shape))
    )
    np.testing.assert_allclose(per_point, per_galaxy, rtol=0, atol=F64_SAME_ATOL)


def test_moffat_rejects_truncation():
    with pytest.raises(NotImplementedError):
        P.moffat_kvalue(1.0, 3.0, fwhm=0.7, trunc=2.0)
    with pytest.raises(ValueError):
        P.moffat_kvalue(1.0, 3.0, fwhm=0.7, hlr=0.5)
