"""Fourier-space (k-space) surface-brightness profiles in JAX, matching GalSim's ``kValue``.

Conventions (identical to GalSim's ``GSObject.kValue``):

* Wavenumbers ``k`` are in radians per arcsec: the transform is
  ``F(k) = int f(x) exp(-i k.x) d^2x`` with ``x`` in arcsec.
* Every profile is normalized to unit flux, ``F(0) = 1`` (multiply by the flux yourself).
* Radially symmetric profiles take ``ksq = kx**2 + ky**2`` in (rad/arcsec)^2, evaluated *after*
  any linear transformation of ``k`` (see :func:`transform_k` / :func:`sheared_ksq`), so that a
  renderer can reuse them for sheared, rotated and lensed objects.
* Lengths (``sigma``, ``hlr``, ``fwhm``, ``scale_radius``, ``lam_over_diam``, pixel ``scale``)
  are in arcsec; angles in radians.
* Every function works in the dtype of its inputs (float32 by default, float64 with
  ``jax_enable_x64``), is pure, jittable, vmappable, broadcasts array-valued parameters, and is
  differentiable in every float parameter with finite gradients over the whole valid domain
  (k = 0, q = 1, obscuration = 0, Sersic n at the table edges, the Airy cutoff...).

Sersic profiles use a host-built (numpy/scipy) table of the exact Hankel transform of the
unit-half-light-radius Sersic profile, computed by a Mellin-Barnes contour integral (exact to
~1e-14), interpolated by a C2 tensor-product cubic spline in (ln n, ln k), with the exact Taylor
series at low k and the exact asymptotic series at high k (the expansions GalSim's SersicInfo
uses too). The tables are built lazily on first use and cached in memory.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

__all__ = [
    "gaussian_kvalue",
    "exponential_kvalue",
    "sersic_kvalue",
    "devaucouleurs_kvalue",
    "point_kvalue",
    "kolmogorov_kvalue",
    "airy_kvalue",
    "moffat_kvalue",
    "pixel_kvalue",
    "quintic_uval",
    "interpolated_image_kvalue",
    "shear_matrix",
    "shear_matrix_q_beta",
    "rotation_matrix",
    "transform_k",
    "transformed_ksq",
    "sheared_ksq",
    "sersic_b",
    "SERSIC_N_MIN",
    "SERSIC_N_MAX",
]

# GalSim's Exponential: half_light_radius = 1.6783469900166605 * scale_radius.
EXPONENTIAL_HLR_FACTOR = 1.6783469900166605
# GalSim's Kolmogorov constants (galsim/kolmogorov.py): fwhm = 0.9758634299 lam_over_r0 and
# k0 = 2.992939911888651 / lam_over_r0, with MTF exp(-(k/k0)^(5/3)).
KOLMOGOROV_FWHM_FACTOR = 0.9758634299
KOLMOGOROV_K0_FACTOR = 2.992939911888651
# GalSim's allowed Sersic range.
SERSIC_N_MIN = 0.3
SERSIC_N_MAX = 6.2


def _float_dtype(*xs):
    return jnp.result_type(float, *xs)


def _asf(*xs):
    dt = _float_dtype(*xs)
    return [jnp.asarray(x, dtype=dt) for x in xs]


# ----------------------------------------------------------------------------------------------
# Simple analytic profiles
# ----------------------------------------------------------------------------------------------


def gaussian_kvalue(ksq, sigma):
    """Fourier transform of a unit-flux Gaussian (GalSim ``Gaussian(sigma=sigma)``).

    Args:
        ksq: Squared wavenumber kx^2 + ky^2, (rad/arcsec)^2.
        sigma: Gaussian standard deviation, arcsec.

    Returns:
        ``exp(-ksq sigma^2 / 2)``, dimensionless, broadcast shape of the inputs.
    """
    ksq, sigma = _asf(ksq, sigma)
    return jnp.exp(-0.5 * ksq * sigma * sigma)


def exponential_kvalue(ksq, hlr):
    """Fourier transform of a unit-flux exponential disk (GalSim ``Exponential``).

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.
        hlr: Half-light radius, arcsec (scale radius r0 = hlr / 1.6783469900166605).

    Returns:
        ``(1 + ksq r0^2)^(-3/2)``, dimensionless.
    """
    ksq, hlr = _asf(ksq, hlr)
    r0 = hlr / EXPONENTIAL_HLR_FACTOR
    t = 1.0 + ksq * r0 * r0
    return jax.lax.rsqrt(t) / t  # t^(-3/2) without pow (several times faster on CPU)


def point_kvalue(ksq):
    """Fourier transform of a unit-flux point source (GalSim ``DeltaFunction``).

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.

    Returns:
        Ones with the shape and float dtype of ``ksq``.
    """
    (ksq,) = _asf(ksq)
    return jnp.ones_like(ksq)


def kolmogorov_kvalue(ksq, fwhm):
    """Kolmogorov atmospheric PSF transfer function (GalSim ``Kolmogorov(fwhm=fwhm)``).

    ``lam_over_r0 = fwhm / 0.9758634299``, ``k0 = 2.992939911888651 / lam_over_r0`` and
    ``F(k) = exp(-(k / k0)^(5/3))``.

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.
        fwhm: Full width at half maximum, arcsec.

    Returns:
        The MTF, dimensionless. Gradients are finite at k = 0 (where they vanish).
    """
    ksq, fwhm = _asf(ksq, fwhm)
    lor0 = fwhm / KOLMOGOROV_FWHM_FACTOR
    k0 = KOLMOGOROV_K0_FACTOR / lor0
    x = ksq / (k0 * k0)
    pos = x > 0
    x_safe = jnp.where(pos, x, 1.0)
    return jnp.where(pos, jnp.exp(-(x_safe ** (5.0 / 6.0))), 1.0)


def pixel_kvalue(kx, ky, scale):
    """Fourier transform of a unit-flux square pixel (GalSim ``Pixel(scale)``).

    Args:
        kx: x wavenumber, rad/arcsec.
        ky: y wavenumber, rad/arcsec.
        scale: Pixel side length, arcsec.

    Returns:
        ``sinc(kx scale / 2 pi) * sinc(ky scale / 2 pi)`` with ``sinc(u) = sin(pi u) / (pi u)``.
    """
    kx, ky, scale = _asf(kx, ky, scale)
    return jnp.sinc(kx * scale / (2 * jnp.pi)) * jnp.sinc(ky * scale / (2 * jnp.pi))


# ----------------------------------------------------------------------------------------------
# Airy
# ----------------------------------------------------------------------------------------------


def _disc_self_overlap(r, t):
    """Area of the intersection of two discs of radius r whose centres are t apart (t >= 0)."""
    inside = t < 2.0 * r
    r_s = jnp.where(inside, r, 1.0)
    t_s = jnp.where(inside, t, 0.5)
    h = t_s / (2.0 * r_s)
    a = 2.0 * r_s * r_s * jnp.arccos(h) - 0.5 * t_s * jnp.sqrt(4.0 * r_s * r_s - t_s * t_s)
    return jnp.where(inside, a, 0.0)


def _disc_cross_overlap(eps, t):
    """Area of the intersection of a unit disc and a disc of radius eps <= 1, t apart."""
    full = t <= 1.0 - eps
    none = t >= 1.0 + eps
    lens = ~(full | none)
    e = jnp.where(lens, eps, 0.5)
    d = jnp.where(lens, t, 0.75)
    c1 = jnp.clip((d * d + e * e - 1.0) / (2.0 * d * e), -1.0, 1.0)
    c2 = jnp.clip((d * d + 1.0 - e * e) / (2.0 * d), -1.0, 1.0)
    prod = (-d + e + 1.0) * (d + e - 1.0) * (d - e + 1.0) * (d + e + 1.0)
    area = e * e * jnp.arccos(c1) + jnp.arccos(c2) - 0.5 * jnp.sqrt(jnp.maximum(prod, 0.0))
    return jnp.where(full, jnp.pi * eps * eps, jnp.where(none, 0.0, area))


@jax.jit
def airy_kvalue(ksq, lam_over_diam, obscuration=0.0):
    """Airy PSF transfer function (GalSim ``Airy(lam_over_diam, obscuration)``).

    The autocorrelation of an annular pupil (outer radius 1, inner radius ``obscuration``),
    normalized to 1 at k = 0; it vanishes for k >= 2 pi / lam_over_diam.

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.
        lam_over_diam: lambda / D, arcsec.
        obscuration: Linear central obscuration fraction, in [0, 1).

    Returns:
        The MTF, dimensionless. Gradients are finite at k = 0, at the cutoff and at
        obscuration = 0.
    """
    ksq, lam_over_diam, obscuration = _asf(ksq, lam_over_diam, obscuration)
    # Separation of the two pupils in units of the pupil radius: t = k lam/D / pi in [0, 2].
    tsq = ksq * (lam_over_diam / jnp.pi) ** 2
    pos = tsq > 0
    t = jnp.where(pos, jnp.sqrt(jnp.where(pos, tsq, 1.0)), 0.0)
    eps = obscuration
    area = (
        _disc_self_overlap(jnp.ones_like(eps), t)
        - 2.0 * _disc_cross_overlap(eps, t)
        + _disc_self_overlap(eps, t)
    )
    return area / (jnp.pi * (1.0 - eps * eps))


# ----------------------------------------------------------------------------------------------
# Moffat
# ----------------------------------------------------------------------------------------------

_MOFFAT_NQUAD = 128


@jax.jit
def _xnu_knu_normalized(nu, x):
    """x^nu K_nu(x) / (2^(nu-1) Gamma(nu)) for nu > 0, x >= 0 (equals 1 at x = 0).

    Uses K_nu(x) = int_0^inf exp(-x cosh t) cosh(nu t) dt, integrated by the trapezoidal rule on
    [0, T(x)] (the integrand is even and entire in t, so the rule converges like
    exp(-pi^2 / h)); everything stays in log space, so no overflow for tiny x or large nu.
    Differentiable in both nu and x.
    """
    pos = x > 0
    xs = jnp.where(pos, x, 1.0)
    lx = jnp.log(xs)
    lnorm = (nu - 1.0) * math.log(2.0) + gammaln(nu)
    # Integration range: where x (cosh t - 1) - nu t exceeds ~45 past the peak.
    t1 = jnp.log(2.0 * (nu + 45.0) / xs + 2.0)
    big_t = jnp.arccosh(1.0 + (45.0 + nu * t1) / xs)
    j = jnp.arange(_MOFFAT_NQUAD + 1, dtype=xs.dtype)
    h = big_t / _MOFFAT_NQUAD
    tt = h[..., None] * j
    w = jnp.where(j == 0, 0.5, 1.0)
    base = -xs[..., None] * jnp.cosh(tt) - lnorm[..., None]
    f = 0.5 * (
        jnp.exp(nu[..., None] * (lx[..., None] + tt) + base)
        + jnp.exp(nu[..., None] * (lx[..., None] - tt) + base)
    )
    val = h * jnp.sum(w * f, axis=-1)
    return jnp.where(pos, val, 1.0)


def moffat_kvalue(ksq, beta, scale_radius=None, hlr=None, fwhm=None, trunc=0.0):
    """Fourier transform of a unit-flux untruncated Moffat profile (GalSim ``Moffat``).

    ``I(r) ~ (1 + (r / rd)^2)^(-beta)`` has ``F(k) = x^nu K_nu(x) / (2^(nu-1) Gamma(nu))`` with
    ``x = k rd`` and ``nu = beta - 1``. Exactly one of ``scale_radius``, ``hlr``, ``fwhm`` must be
    given (GalSim's conventions: ``fwhm = 2 rd sqrt(2^(1/beta) - 1)``,
    ``hlr = rd sqrt(2^(1/(beta-1)) - 1)`` for the untruncated profile).

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.
        beta: Moffat index, > 1 (GalSim requires > 1.1 when untruncated).
        scale_radius: Scale radius rd, arcsec.
        hlr: Half-light radius, arcsec.
        fwhm: Full width at half maximum, arcsec.
        trunc: Truncation radius; only 0 (untruncated) is implemented.

    Returns:
        The transform, dimensionless; differentiable in beta and the size.
    """
    if isinstance(trunc, (int, float)) and trunc == 0.0:
        pass
    else:
        raise NotImplementedError("Only the untruncated Moffat (trunc=0) is implemented.")
    given = [v is not None for v in (scale_radius, hlr, fwhm)]
    if sum(given) != 1:
        raise ValueError("Give exactly one of scale_radius, hlr, fwhm.")
    size = scale_radius if given[0] else (hlr if given[1] else fwhm)
    ksq, beta, size = _asf(ksq, beta, size)
    if given[0]:
        rd = size
    elif given[1]:
        rd = size / jnp.sqrt(2.0 ** (1.0 / (beta - 1.0)) - 1.0)
    else:
        rd = size / (2.0 * jnp.sqrt(2.0 ** (1.0 / beta) - 1.0))
    ksq, beta, rd = jnp.broadcast_arrays(ksq, beta, rd)
    pos = ksq > 0
    k = jnp.where(pos, jnp.sqrt(jnp.where(pos, ksq, 1.0)), 0.0)
    return _xnu_knu_normalized(beta - 1.0, k * rd)


# ----------------------------------------------------------------------------------------------
# Sersic: host-side exact Hankel transform and tables
# ----------------------------------------------------------------------------------------------

# Table layout (all for unit half-light radius):
#   v = ln n in [ln _N_LO, ln _N_HI] (slightly wider than GalSim's [0.3, 6.2] so the allowed range
#     is away from the spline's end conditions);
#   w in [0, 1] maps linearly onto ln(k) in [ln _K_LO, ln(_KAPPA_HI) + L(n)], where
#     L(n) = n ln b(n) = ln(hlr / r0), i.e. up to k r0 = _KAPPA_HI.
#   Below _K_LO the exact Taylor series (3 terms) is used; above, the exact asymptotic series.
_N_LO = 0.27
_N_HI = 6.6
_K_LO = 1e-4
_KAPPA_HI = 50.0
_N_ASYMP = 12  # terms of the high-k series
_V_SHIFT = 0.5  # table axis v = ln(n + _V_SHIFT): balances the error at small and large n
_SERSIC_NV = 160
_SERSIC_NW = 512
_DEV_NW = 2048


def _mellin_barnes_sersic(n, kappa, dt=0.05, delta=0.3):
    """Exact normalized Hankel transform of exp(-r^(1/n)) at k r0 = kappa (numpy, host).

    F(kappa) = 1/(2 pi i) int n Gamma(n (2 - s)) 2^(s-1) Gamma(s/2) / Gamma(1 - s/2) kappa^-s ds
    / (n Gamma(2n)) along Re s = c, with c chosen per kappa at the saddle of the integrand
    (c < 0 picks up the residue 1 of the pole at s = 0). The integrand decays like
    exp(-pi n |t| / 2), and the trapezoidal rule converges like exp(-2 pi delta / dt).
    """
    from scipy.special import gammaln as sgammaln
    from scipy.special import loggamma

    lk = np.log(np.asarray(kappa, dtype=np.float64))
    cgrid = np.concatenate(
        [np.linspace(-2 + delta, -delta, 24), np.linspace(delta, 2 + 1 / n - delta, 48)]
    )
    sc = cgrid.astype(complex)
    lgc = (
        loggamma(n * (2 - sc)) + (sc - 1) * np.log(2) + loggamma(sc / 2) - loggamma(1 - sc / 2)
    ).real
    ic = np.argmin(-cgrid[None, :] * lk[:, None] + lgc[None, :], axis=1)
    t = np.arange(0.0, 72.0 / (np.pi * n) + 5.0, dt)
    wt = np.full(t.shape, dt)
    wt[0] = 0.5 * dt
    used = np.unique(ic)  # only the contours some kappa uses
    s = cgrid[used][:, None] + 1j * t[None, :]
    lg = (
        loggamma(n * (2 - s))
        - sgammaln(2 * n)
        + (s - 1) * np.log(2)
        + loggamma(s / 2)
        - loggamma(1 - s / 2)
    )  # (n_used, nt)
    out = np.empty(lk.shape)
    for r, j in enumerate(used):
        sel = ic == j
        vals = np.exp(lg[r][None, :] - s[r][None, :] * lk[sel][:, None]).real
        out[sel] = vals @ wt / np.pi + (cgrid[j] < 0)
    return out


def _sersic_b_host(n):
    from scipy.special import gammaincinv

    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def _ppoly1d(x, y):
    """Not-a-knot cubic spline through (x, y) (x uniform) -> coefficients (len(x)-1, 4, ...)."""
    from scipy.interpolate import CubicSpline

    cs = CubicSpline(x, y, axis=0)
    return np.moveaxis(cs.c, 0, 1)  # (nint, 4, ...), highest power first


def _n_to_v(n):
    return jnp.log(n + _V_SHIFT)


@functools.cache
def _sersic_tables(nv=None, nw=None):
    """Build (once) the 2-D Sersic table and the 1-D L(n) = ln(hlr / r0) spline."""
    nv = nv or _SERSIC_NV
    nw = nw or _SERSIC_NW
    v = np.linspace(np.log(_N_LO + _V_SHIFT), np.log(_N_HI + _V_SHIFT), nv)
    n_nodes = np.exp(v) - _V_SHIFT
    big_l = n_nodes * np.log(_sersic_b_host(n_nodes))
    w = np.linspace(0.0, 1.0, nw)
    x_lo = np.log(_K_LO)
    vals = np.empty((nv, nw))
    for i, n in enumerate(n_nodes):
        x = x_lo + w * (np.log(_KAPPA_HI) + big_l[i] - x_lo)
        vals[i] = _mellin_barnes_sersic(n, np.exp(x - big_l[i]), dt=0.1)
    # Tensor-product spline: along w for each n, then along v of the coefficients.
    cw = _ppoly1d(w, vals.T)  # (nw-1, 4, nv)
    cvw = _ppoly1d(v, np.moveaxis(cw, 2, 0))  # (nv-1, 4, nw-1, 4)
    table = np.ascontiguousarray(np.transpose(cvw, (0, 2, 1, 3)))  # (nv-1, nw-1, 4v, 4w)
    lcoef = _ppoly1d(v, big_l)  # (nv-1, 4)
    return dict(v0=v[0], hv=v[1] - v[0], nv=nv, hw=w[1] - w[0], nw=nw, table=table, lcoef=lcoef)


@functools.cache
def _devaucouleurs_table():
    """1-D table for n = 4 (finer): F at ln k uniform on [ln _K_LO, ln(_KAPPA_HI hlr/r0)]."""
    n = 4.0
    big_l = float(n * np.log(_sersic_b_host(n)))
    x = np.linspace(np.log(_K_LO), np.log(_KAPPA_HI) + big_l, _DEV_NW)
    vals = _mellin_barnes_sersic(n, np.exp(x - big_l))
    return dict(x0=x[0], hx=x[1] - x[0], nx=_DEV_NW, coef=_ppoly1d(x, vals), big_l=big_l)


# Fast evaluation. Everything that depends only on n (the spline row along ln k, L(n), the series
# coefficients) is computed at the parameters' own shape; per k point there is one log, one
# 4-coefficient table lookup (the only gather), one exp and one division for the high-k series,
# and a few polynomial steps (measured with benchmarks/bench_profiles.py).
#   Table:      F = c0 d^3 + c1 d^2 + c2 d + c3, u = (ln(k hlr) - x_lo) (nw - 1) / (x_hi - x_lo),
#               i = floor(u), d = u - i (the host coefficients are rescaled to d in [0, 1]).
#   Taylor:     F = 1 + T1 kk + T2 kk^2 + T3 kk^3, kk = (k hlr)^2.
#   Asymptotic: F = (kk_hi / kk) sum_j B_j z^j, z = (kk_hi / kk)^(1 / 2n) <= 1, kk_hi = exp(2 x_hi).


def _series_coefs(n, big_l, x_hi, lib, lgam):
    """Taylor (T1..T3) and asymptotic (B_1.._N_ASYMP) coefficients and kk_hi, for a given n.

    ``lib`` is numpy or jax.numpy and ``lgam`` the matching log-gamma; the coefficients are lists
    of arrays of n's shape. They are built in log space (the Gamma ratios overflow float32 for
    large n), with a single vectorized log-gamma call (one expansion to compile, not 16).
    """
    n1 = lib.asarray(n)[..., None]
    bl1 = lib.asarray(big_l)[..., None]
    m = lib.arange(1.0, 4.0, dtype=n1.dtype)
    j = lib.arange(1.0, _N_ASYMP + 1.0, dtype=n1.dtype)
    mu = j / n1  # (..., _N_ASYMP)
    lg = lgam(lib.concatenate([2.0 * n1 * (m + 1.0), 1.0 + 0.5 * mu, 2.0 * n1], axis=-1))
    g2n = lg[..., -1:]
    # Taylor: sum_m (-1)^m Gamma(2n(m+1)) / Gamma(2n) (kappa/2)^(2m) / (m!)^2, kappa = kk e^-L.
    lfact_m = lib.asarray([math.lgamma(a + 1.0) for a in range(1, 4)], dtype=n1.dtype)
    lt = lg[..., :3] - g2n - m * math.log(4.0) - 2.0 * lfact_m - 2.0 * m * bl1
    taylor = (-1.0) ** m * lib.exp(lt)
    # Asymptotic: exp(-r^(1/n)) = sum_j (-1)^j r^(j/n) / j!, and the Hankel transform of r^mu is
    # -2^(mu+1) sin(pi mu / 2) Gamma(1 + mu/2)^2 / pi * kappa^(-mu-2), with kappa = kappa_hi t.
    lfact_j = lib.asarray([math.lgamma(a + 1.0) for a in range(1, _N_ASYMP + 1)], dtype=n1.dtype)
    lmag = (
        (mu + 1.0) * math.log(2.0)
        + 2.0 * lg[..., 3:-1]
        - lfact_j
        - lib.log(n1)
        - g2n
        - (mu + 2.0) * math.log(_KAPPA_HI)
    )
    asym = (-1.0) ** (j + 1.0) * lib.sin(0.5 * math.pi * mu) / math.pi * lib.exp(lmag)
    return (
        [taylor[..., i] for i in range(3)],
        [asym[..., i] for i in range(_N_ASYMP)],
        lib.exp(2.0 * x_hi),
    )


def _rescale_ppoly(coef, h):
    """Coefficients in powers of (x - x_i) (last axis, highest first) -> powers of (x - x_i)/h."""
    return coef * (h ** np.arange(3, -1, -1.0))


@functools.cache
def _dev_host():
    """Host constants of the n = 4 evaluation (Python floats and a float64 table)."""
    tab = _devaucouleurs_table()
    x0, hx, nx = float(tab["x0"]), float(tab["hx"]), int(tab["nx"])
    x_hi = x0 + (nx - 1) * hx
    taylor, asym, kk_hi = _series_coefs(4.0, tab["big_l"], x_hi, np, _host_gammaln)
    return dict(
        x0=x0,
        inv_h=1.0 / hx,
        nx=nx,
        x_hi=x_hi,
        coef=_rescale_ppoly(tab["coef"], hx),  # (nx - 1, 4)
        taylor=[float(t) for t in taylor],
        asym=[float(b) for b in asym],
        kk_hi=float(kk_hi),
    )


def _host_gammaln(x):
    from scipy.special import gammaln as sgammaln

    return sgammaln(x)


@functools.cache
def _device_tables(dtype_name):
    """The Sersic host tables as JAX arrays of the given dtype (once per dtype, outside traces).

    Returns (Sersic table (nv-1, nw-1, 4v, 4w) with the w powers rescaled to d = u - floor(u),
    L(n) spline coefficients (nv-1, 4)).
    """
    dt = np.dtype(dtype_name)
    ser = _sersic_tables()
    table = _rescale_ppoly(ser["table"], ser["hw"])
    with jax.ensure_compile_time_eval():
        return jnp.asarray(table.astype(dt)), jnp.asarray(ser["lcoef"].astype(dt))


@functools.cache
def _dev_device_table(dtype_name):
    """The n = 4 table (nx-1, 4), rescaled to d = u - floor(u), as a JAX array of that dtype."""
    with jax.ensure_compile_time_eval():
        return jnp.asarray(_dev_host()["coef"].astype(np.dtype(dtype_name)))


def _eval_ppoly1d(coef, x0, h, nx, x):
    i = jnp.clip(jnp.floor((x - x0) / h).astype(jnp.int32), 0, nx - 2)
    d = x - (x0 + i * h)
    cc = coef[i]  # (..., 4)
    return ((cc[..., 0] * d + cc[..., 1]) * d + cc[..., 2]) * d + cc[..., 3]


def _cubic_lookup(coef, idx, d):
    """sum_a coef[idx, a] d^(3-a): one gather per coefficient column (faster on CPU than one
    gather of 4-vectors), the index already clipped to the table."""
    c = [coef[:, a].at[idx].get(mode="promise_in_bounds") for a in range(4)]
    return ((c[0] * d + c[1]) * d + c[2]) * d + c[3]


def _sersic_assemble(kk, x, low, high, table_val, taylor, asym, x_hi, kk_hi, inv_n):
    """Selects the Taylor, table or asymptotic value; each branch is cheap and evaluated at safe
    arguments (so that values and gradients are finite everywhere)."""
    kl = jnp.where(low, kk, 0.0)
    t1, t2, t3 = taylor
    tay = 1.0 + kl * (t1 + kl * (t2 + kl * t3))
    kh = jnp.where(high, kk, kk_hi)
    xh = jnp.where(high, x, x_hi)
    z = jnp.exp((x_hi - xh) * inv_n)
    p = asym[-1]
    for b in asym[-2::-1]:
        p = p * z + b
    asy = (kk_hi / kh) * (p * z)
    return jnp.where(low, tay, jnp.where(high, asy, table_val))


def _log_khlr(ksq, hlr):
    """kk = (k hlr)^2, masks low (k hlr < _K_LO) and x = ln(k hlr) (x = ln _K_LO where low)."""
    kk = ksq * (hlr * hlr)
    low = kk < _K_LO**2
    x = 0.5 * jnp.log(jnp.where(low, _K_LO**2, kk))
    return kk, low, x


def sersic_b(n):
    """GalSim's Sersic ``b(n) = (hlr / r0)^(1/n)`` (table-interpolated, differentiable).

    Args:
        n: Sersic index in [0.3, 6.2].

    Returns:
        b(n), dimensionless (solves gamma(2n, b) = Gamma(2n) / 2).
    """
    (n,) = _asf(n)
    tab = _sersic_tables()
    _, lcoef = _device_tables(n.dtype.name)
    v = jnp.clip(_n_to_v(n), math.log(_N_LO + _V_SHIFT), math.log(_N_HI + _V_SHIFT))
    big_l = _eval_ppoly1d(lcoef, float(tab["v0"]), float(tab["hv"]), int(tab["nv"]), v)
    return jnp.exp(big_l / n)


def sersic_kvalue(ksq, n, hlr):
    """Fourier transform of a unit-flux untruncated Sersic profile (GalSim ``Sersic``).

    ``I(r) ~ exp(-b (r / hlr)^(1/n))`` with GalSim's half-light-radius convention. Accurate to
    ~1e-8 of F(0) in float64 against the exact Hankel transform over all k.

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.
        n: Sersic index in [0.3, 6.2] (clamped to the table range [0.27, 6.6]).
        hlr: Half-light radius, arcsec.

    Returns:
        The transform, dimensionless. Differentiable in n and hlr (finite everywhere).
    """
    ksq, n, hlr = _asf(ksq, n, hlr)
    table, lcoef = _device_tables(ksq.dtype.name)
    return _sersic_core(ksq, n, hlr, table, lcoef)


@jax.jit
def _sersic_core(ksq, n, hlr, table, lcoef):
    tab = _sersic_tables()
    v0, hv, nv, nw = float(tab["v0"]), float(tab["hv"]), int(tab["nv"]), int(tab["nw"])
    shape = jnp.broadcast_shapes(ksq.shape, n.shape, hlr.shape)
    # Everything that depends on n only, at n's own shape.
    v = jnp.clip(_n_to_v(n), math.log(_N_LO + _V_SHIFT), math.log(_N_HI + _V_SHIFT))
    nc = jnp.exp(v) - _V_SHIFT
    big_l = _eval_ppoly1d(lcoef, v0, hv, nv, v)
    x_lo = math.log(_K_LO)
    x_hi = math.log(_KAPPA_HI) + big_l
    scale = (nw - 1) / (x_hi - x_lo)
    taylor, asym, kk_hi = _series_coefs(nc, big_l, x_hi, jnp, gammaln)
    iv = jnp.clip(jnp.floor((v - v0) / hv).astype(jnp.int32), 0, nv - 2)
    dv = v - (v0 + iv * hv)
    pv = jnp.stack([dv**3, dv**2, dv, jnp.ones_like(dv)], axis=-1)  # n.shape + (4,)
    # Per k point.
    kk, low, x = _log_khlr(ksq, hlr)
    high = x >= x_hi
    u = jnp.clip((x - x_lo) * scale, 0.0, nw - 1.0)
    iw = jnp.minimum(jnp.floor(u).astype(jnp.int32), nw - 2)
    d = u - iw.astype(u.dtype)
    npts = math.prod(shape)
    if n.size == 1 or n.size * (nw - 1) <= 32 * npts:
        # Interpolate the table along n once per distinct n: a row of nw - 1 cubics in u, then a
        # 1-D lookup (4 coefficients) per k point.
        row = jnp.einsum("...wab,...a->...wb", table[iv], pv).reshape(-1, 4)
        offset = (jnp.arange(n.size, dtype=jnp.int32) * (nw - 1)).reshape(n.shape)
        idx = jnp.broadcast_to(iw + offset, shape)
        table_val = _cubic_lookup(row, idx, jnp.broadcast_to(d, shape))
    else:
        # As many distinct n as k points: the 4 x 4 tensor-product cubic per point.
        cc = table[iv, iw]  # shape + (4v, 4w)
        pw = jnp.stack([d**3, d**2, d, jnp.ones_like(d)], axis=-1)
        table_val = jnp.einsum("...ab,...a,...b->...", cc, pv, pw)
    return _sersic_assemble(kk, x, low, high, table_val, taylor, asym, x_hi, kk_hi, 1.0 / nc)


def devaucouleurs_kvalue(ksq, hlr):
    """Fourier transform of a unit-flux de Vaucouleurs profile (GalSim ``DeVaucouleurs``, n=4).

    Uses a dedicated, finer 1-D table; accurate to ~1e-9 of F(0) in float64 over all k.

    Args:
        ksq: Squared wavenumber, (rad/arcsec)^2.
        hlr: Half-light radius, arcsec.

    Returns:
        The transform, dimensionless; differentiable in hlr.
    """
    ksq, hlr = _asf(ksq, hlr)
    coef = _dev_device_table(ksq.dtype.name)
    return _devaucouleurs_core(ksq, hlr, coef)


@jax.jit
def _devaucouleurs_core(ksq, hlr, coef):
    h = _dev_host()
    kk, low, x = _log_khlr(ksq, hlr)
    high = x >= h["x_hi"]
    u = jnp.clip((x - h["x0"]) * h["inv_h"], 0.0, h["nx"] - 1.0)
    i = jnp.minimum(jnp.floor(u).astype(jnp.int32), h["nx"] - 2)
    table_val = _cubic_lookup(coef, i, u - i.astype(u.dtype))
    return _sersic_assemble(
        kk, x, low, high, table_val, h["taylor"], h["asym"], h["x_hi"], h["kk_hi"], 0.25
    )


# ----------------------------------------------------------------------------------------------
# Interpolated image
# ----------------------------------------------------------------------------------------------


def quintic_uval(u):
    """Fourier transform of GalSim's Quintic interpolant at u cycles per pixel (uval(0) = 1)."""
    (u,) = _asf(u)
    s = jnp.sinc(u)
    piu = jnp.pi * u
    c = jnp.cos(piu)
    ssq = s * s
    piusq = piu * piu
    return s * ssq * ssq * (s * (55.0 - 19.0 * piusq) + 2.0 * c * (piusq - 27.0))


def _lanczos_free_uval(name):
    if name == "quintic":
        return quintic_uval
    if name in ("nearest", "box"):
        return lambda u: jnp.sinc(u)
    if name == "linear":
        return lambda u: jnp.sinc(u) ** 2
    raise ValueError(f"unsupported x_interpolant {name!r}")


@functools.partial(jax.jit, static_argnames=("x_interpolant", "normalize"))
def interpolated_image_kvalue(kx, ky, image, scale, x_interpolant="quintic", normalize=True):
    """Fourier transform of GalSim's ``InterpolatedImage(Image(image, scale=scale))``.

    Evaluated exactly, ``sum_ij a_ij exp(-i (kx x_j + ky y_i)) uval(kx s / 2pi) uval(ky s / 2pi)``,
    which GalSim's kValue approximates (GalSim goes through the zero-padded image's DFT and a
    k-space interpolant). Pixel centres are GalSim's: the image's true centre is the origin, so
    pixel (row i, column j) of an (ny, nx) array sits at x = (j - (nx - 1) / 2) scale,
    y = (i - (ny - 1) / 2) scale, for even and odd sizes alike.

    Args:
        kx: x wavenumber(s), rad/arcsec, any shape.
        ky: y wavenumber(s), rad/arcsec, broadcastable with kx.
        image: Pixel values, shape (ny, nx) as ``galsim.Image.array`` (row index = y).
        scale: Pixel scale, arcsec.
        x_interpolant: "quintic" (GalSim's default), "linear" or "nearest" (static).
        normalize: If True (default) divide by the image sum so F(0) = 1; if False return
            GalSim's kValue (F(0) = sum of the pixels, GalSim's normalization='flux').

    Returns:
        Complex transform with the broadcast shape of (kx, ky).
    """
    kx, ky, image, scale = _asf(kx, ky, image, scale)
    kx, ky = jnp.broadcast_arrays(kx, ky)
    ny, nx = image.shape[-2:]
    xs = (jnp.arange(nx, dtype=kx.dtype) - 0.5 * (nx - 1)) * scale
    ys = (jnp.arange(ny, dtype=kx.dtype) - 0.5 * (ny - 1)) * scale
    ex = jnp.exp(-1j * kx[..., None] * xs)  # (..., nx)
    ey = jnp.exp(-1j * ky[..., None] * ys)  # (..., ny)
    img = image.astype(ex.dtype)
    f = jnp.einsum("...y,yx,...x->...", ey, img, ex)
    uval = _lanczos_free_uval(x_interpolant)
    f = f * uval(kx * scale / (2 * jnp.pi)) * uval(ky * scale / (2 * jnp.pi))
    if normalize:
        f = f / jnp.sum(image)
    return f


# ----------------------------------------------------------------------------------------------
# Linear transformations
# ----------------------------------------------------------------------------------------------


def shear_matrix(g1, g2):
    """Real-space matrix of GalSim's ``.shear(g1=g1, g2=g2)`` (reduced shear, det 1).

    ``S = [[1 + g1, g2], [g2, 1 - g1]] / sqrt(1 - g1^2 - g2^2)``; a point x of the original
    profile moves to S x.

    Args:
        g1: First reduced-shear component.
        g2: Second reduced-shear component.

    Returns:
        Array of shape (..., 2, 2).
    """
    g1, g2 = _asf(g1, g2)
    g1, g2 = jnp.broadcast_arrays(g1, g2)
    f = 1.0 / jnp.sqrt(1.0 - g1 * g1 - g2 * g2)
    return f[..., None, None] * jnp.stack(
        [jnp.stack([1.0 + g1, g2], -1), jnp.stack([g2, 1.0 - g1], -1)], -2
    )


def shear_matrix_q_beta(q, beta):
    """Real-space matrix of GalSim's ``.shear(q=q, beta=beta * galsim.radians)``.

    ``g = (1 - q) / (1 + q)``, ``g1 = g cos 2 beta``, ``g2 = g sin 2 beta``: the major axis
    (axis ratio q = b / a <= 1) lies at position angle beta, counter-clockwise from +x.

    Args:
        q: Axis ratio b / a in (0, 1].
        beta: Position angle of the major axis, radians.

    Returns:
        Array of shape (..., 2, 2).
    """
    q, beta = _asf(q, beta)
    g = (1.0 - q) / (1.0 + q)
    return shear_matrix(g * jnp.cos(2 * beta), g * jnp.sin(2 * beta))


def rotation_matrix(theta):
    """Real-space matrix of GalSim's ``.rotate(theta * galsim.radians)`` (counter-clockwise).

    Args:
        theta: Rotation angle, radians.

    Returns:
        ``[[cos, -sin], [sin, cos]]``, shape (..., 2, 2).
    """
    (theta,) = _asf(theta)
    c, s = jnp.cos(theta), jnp.sin(theta)
    return jnp.stack([jnp.stack([c, -s], -1), jnp.stack([s, c], -1)], -2)


def transform_k(kx, ky, a):
    """Wavenumbers at which to evaluate the original profile for a real-space linear map A.

    For ``f'(x) = f(A^-1 x)`` (GalSim ``obj.transform(*A.ravel())`` with det A = 1, or compose
    GalSim operations by matrix product: ``obj.shear(q, beta).rotate(theta).shear(g1, g2)`` is
    ``A = shear_matrix(g1, g2) @ rotation_matrix(theta) @ shear_matrix_q_beta(q, beta)``),
    ``F'(k) = |det A| F(A^T k)``. This returns ``A^T k``; multiply by |det A| yourself if A is
    not area-preserving.

    Args:
        kx: x wavenumber, rad/arcsec.
        ky: y wavenumber, rad/arcsec.
        a: Matrix, shape (..., 2, 2), broadcastable against kx, ky.

    Returns:
        (kx', ky') = A^T (kx, ky).
    """
    kx, ky, a = _asf(kx, ky, a)
    kxp = a[..., 0, 0] * kx + a[..., 1, 0] * ky
    kyp = a[..., 0, 1] * kx + a[..., 1, 1] * ky
    return kxp, kyp


def transformed_ksq(kx, ky, a):
    """``|A^T k|^2``: the ``ksq`` to feed a round profile transformed by A (see transform_k)."""
    kxp, kyp = transform_k(kx, ky, a)
    return kxp * kxp + kyp * kyp


def sheared_ksq(kx, ky, q, beta):
    """``ksq'`` such that ``F_sheared(k) = F(ksq')`` for GalSim ``.shear(q=q, beta=beta)``.

    Closed form of ``|S^T k|^2`` for the shear of :func:`shear_matrix_q_beta` (smooth at q = 1):
    ``ksq' = (1+q^2)/(2q) |k|^2 + (1-q^2)/(2q) [cos 2beta (kx^2 - ky^2) + 2 sin 2beta kx ky]``.

    Args:
        kx: x wavenumber, rad/arcsec.
        ky: y wavenumber, rad/arcsec.
        q: Axis ratio b / a in (0, 1].
        beta: Position angle of the major axis, radians, counter-clockwise from +x.

    Returns:
        Squared wavenumber, (rad/arcsec)^2.
    """
    kx, ky, q, beta = _asf(kx, ky, q, beta)
    a = (1.0 + q * q) / (2.0 * q)
    b = (1.0 - q * q) / (2.0 * q)
    return a * (kx * kx + ky * ky) + b * (
        jnp.cos(2 * beta) * (kx * kx - ky * ky) + 2.0 * jnp.sin(2 * beta) * kx * ky
    )
