"""Make btkjax's embedded default CatSim-like catalog, deterministically.

    python data/make_default_catalog.py [output.fits]

writes ``btkjax/data/default_catalog.fits`` (or the given path) atomically: a temp file in the same
folder, then ``os.replace``. The same numpy seed gives the same bytes on the same platform.

The catalog has CatSim's columns (``galtileid, ra, dec, redshift, fluxnorm_bulge, fluxnorm_disk,
fluxnorm_agn, a_b, a_d, b_b, b_d, pa_bulge, pa_disk, u_ab .. y_ab``) and is built from published
relations; every number is listed with its source below and in ``data/README.md``. Numbers marked
[CatSim sample] are calibrated on the 100-galaxy CatSim sample catalog BTK ships, because they are
CatSim conventions rather than physics (e.g. the units of ``fluxnorm``).

1. i-band magnitudes: dN/dm proportional to 10^(ALPHA m), ALPHA = 0.31, over [17, 28]. The slope and
   the normalization N(<i) = 46 * 10^(0.31 (i - 25)) arcmin^-2 are the LSST Science Book's
   (LSST Science Collaboration 2009, arXiv:0912.0201, Sec. 3.7.2, eq. 3.7), from deep i-band counts
   (e.g. Capak et al. 2004; Metcalfe et al. 2001). Extrapolated to i = 28 like CatSim/DC catalogs.
2. Redshift: p(z | i) proportional to z^2 exp(-z / z0) with z0 = 0.0417 i - 0.744 (LSST Science
   Book Sec. 3.7.2, eq. 3.8, fitted to photo-z distributions for 21.5 < i < 25; median z = 2.67 z0),
   extrapolated to fainter i; z0 is floored at 0.04 for the few i < 19 galaxies.
3. Populations: red (quiescent) fraction falling with magnitude, 0.35 at i = 21 to 0.05 at i >= 26
   (deep-field type fractions: early types are ~30-40% of bright field galaxies and a small minority
   of faint ones, e.g. Ilbert et al. 2006, A&A 457, 841, their type-dependent counts).
4. Colors: each galaxy has a simple rest-frame SED in f_nu (AB mag per log wavelength), redshifted
   and averaged over LSST band passes (edges of the LSST Science Book Table 1.1 / SRD):
   - optical slope f_nu ~ lambda^s redward of 4000 A: red s = 1.7 +- 0.2, blue s = 0.8 +- 0.35
     (giving rest r - i ~ 0.35 for ellipticals, ~0.15 for star-forming; Fukugita et al. 1995);
   - 4000 A break of D4000 ~ 1.9 (red) and ~1.25 (blue) (Kauffmann et al. 2003, Balogh et al.
     1999), i.e. 0.70 and 0.24 mag, spread over 3750..4150 A;
   - UV slope f_lambda ~ lambda^beta: blue beta = -1.8 +- 0.25 (Bouwens et al. 2014 at z ~ 2-4),
     red galaxies steep (f_nu ~ lambda^4 +- 1, the UV-weak old populations, NUV - r ~ 5-6);
   - intergalactic Lyman-alpha forest transmission exp(-0.0036 (lambda_obs / 1216 A)^3.46) below
     rest 1216 A and a Lyman limit below 912 A (Madau 1995, ApJ 441, 18).
   Magnitudes are noise-free (CatSim's are true magnitudes).
5. Stellar mass: rest-frame i absolute magnitude (K-correction from the same SED, FlatLambdaCDM
   H0 = 70, Om0 = 0.3 as in van der Wel et al. 2014), M_sun,i = 4.53 AB (Willmer 2018, ApJS 236,
   47) and log10(M/L_i) = -0.152 + 0.518 (g - i)_rest (Bell et al. 2003, ApJS 149, 289, Table 7),
   minus 0.09 dex to go from their diet-Salpeter IMF to Chabrier (as van der Wel et al. use).
6. Sizes (semi-major half-light axis, as van der Wel et al. 2014, ApJ 788, 28, eq. 2 and Table 1):
   disks R = 10^0.86 kpc ((1+z)/1.25)^-0.75 (M/5e10)^0.22 (late types), spheroids/bulges
   R = 10^0.60 kpc ((1+z)/1.25)^-1.48 (M/5e10)^0.75 (early types) above 2e10 Msun, flattening to
   slope 0.1 below it (the low-mass flattening of quiescent galaxies, Mowla et al. 2019, ApJL 872,
   L13). Log-normal scatter 0.20 dex (disks) and 0.15 dex (spheroids) (van der Wel 2014: 0.16-0.19
   and 0.1-0.2). Bulges of composite galaxies are capped at 0.7 times their disk's size.
7. Axis ratios: a randomly inclined oblate body, q = sqrt(mu^2 + gamma^2 (1 - mu^2)), mu = cos(i)
   uniform in [0, 1]; disks are thin, gamma = 0.21 +- 0.05, spheroids thick, gamma = 0.6 +- 0.1
   (Padilla & Strauss 2008, MNRAS 388, 1321). A bulge shares its disk's inclination.
   Position angles uniform in [0, 360) deg, the same for bulge and disk; 0 for an absent component.
8. Bulge/disk/AGN: blue galaxies 70% pure disks, 30% disk + small bulge B/T ~ Beta(1, 12); red
   galaxies 25% pure bulges, 75% composite with B/T ~ Beta(4, 2) (B/T distributions of late and
   early types, Simard et al. 2011, ApJS 196, 11; the pure-disk fraction matches the CatSim
   sample's 70% [CatSim sample]). AGN (point source) in 2% of galaxies (a few per cent of deep
   field galaxies host an optically visible AGN; CatSim's AGN are ~1-3%), carrying a fraction of
   the total flux log-uniform in [0.05, 0.5].
9. fluxnorm (CatSim's SED normalization, no published units): total
   log10(fluxnorm) = -0.4 i - 7.405 + 0.294 log10(1 + z) + N(0, 0.20) [CatSim sample fit]; split
   between bulge, disk and AGN by the flux fractions above. BTK only uses their ratios.
10. Positions: uniform in a square patch centered on (ra, dec) = (0.43, 0) deg whose area makes the
   surface density that of eq. 3.7 above (46 arcmin^-2 at i < 25).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SEED = 20240611
N_GALAXIES = 20_000
I_MIN, I_MAX = 17.0, 28.0
ALPHA = 0.31  # LSST Science Book eq. 3.7
N_LT_25_PER_ARCMIN2 = 46.0  # LSST Science Book eq. 3.7
AGN_FRACTION = 0.02
RA_CENTER, DEC_CENTER = 0.43, 0.0

BANDS = ("u", "g", "r", "i", "z", "y")
# LSST band edges in nm (LSST Science Book Table 1.1; ~50% transmission points).
BAND_EDGES_NM = {
    "u": (320.0, 400.0),
    "g": (400.0, 552.0),
    "r": (552.0, 691.0),
    "i": (691.0, 818.0),
    "z": (818.0, 922.0),
    "y": (948.0, 1060.0),
}
# SDSS-like rest-frame g and i bands for the mass-to-light color (Bell et al. 2003 use SDSS g - i).
REST_G_NM, REST_I_NM = (400.0, 552.0), (691.0, 818.0)

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "btkjax" / "data" / "default_catalog.fits"
COLUMNS = (
    "galtileid", "ra", "dec", "redshift", "fluxnorm_bulge", "fluxnorm_disk", "fluxnorm_agn",
    "a_b", "a_d", "b_b", "b_d", "pa_bulge", "pa_disk", "u_ab", "g_ab", "r_ab", "i_ab", "z_ab",
    "y_ab",
)  # fmt: skip


def sample_magnitudes(rng, n, alpha=ALPHA, lo=I_MIN, hi=I_MAX):
    """Inverse-CDF draw from dN/dm proportional to 10^(alpha m) on [lo, hi]."""
    u = rng.uniform(size=n)
    b = alpha * np.log(10.0)
    return lo + np.log1p(u * np.expm1(b * (hi - lo))) / b


def redshift_scale(i):
    """z0 of p(z | i) ~ z^2 exp(-z / z0) (item 2): LSST Science Book eq. 3.8, extrapolated."""
    return np.maximum(0.0417 * i - 0.744, 0.04)


def red_fraction(i):
    """Red (quiescent) fraction: 0.35 at i = 21 falling to 0.05 at i >= 26 (item 3)."""
    return np.clip(0.35 - 0.06 * (i - 21.0), 0.05, 0.40)


def sed_mag(lam_rest_A, s_opt, dm_break, s_uv):
    """Rest-frame AB magnitude (arbitrary zero point) of the simple SED at lam_rest (Angstrom).

    All parameters broadcast (galaxy axis first, wavelength axis last).
    """
    x = np.log10(lam_rest_A / 4000.0)
    # optical: f_nu ~ lambda^s  =>  m = -2.5 s log10(lambda)
    m = -2.5 * s_opt * x
    # UV: f_nu ~ lambda^s_uv blueward of the break, plus the break itself (smooth 3750..4150 A)
    m = np.where(x < 0, -2.5 * s_uv * x, m)
    ramp = np.clip((4150.0 - lam_rest_A) / 400.0, 0.0, 1.0)
    return m + dm_break * ramp


def igm_transmission(lam_obs_A, z):
    """Madau (1995) Lyman-alpha forest below rest 1216 A and a Lyman limit below 912 A."""
    lam_rest = lam_obs_A / (1.0 + z)
    tau = np.where(lam_rest < 1216.0, 0.0036 * (lam_obs_A / 1216.0) ** 3.46, 0.0)
    tau = tau + np.where(lam_rest < 912.0, 8.0, 0.0)
    return np.exp(-tau)


def band_mag(edges_nm, z, s_opt, dm_break, s_uv, observed=True, n_lam=40):
    """Band-averaged AB magnitude (top-hat band, f_nu average) of the SED at redshift z."""
    lam = np.linspace(edges_nm[0], edges_nm[1], n_lam) * 10.0  # Angstrom, observed frame
    zz = z[:, None] if observed else np.zeros_like(z)[:, None]
    m = sed_mag(lam[None, :] / (1.0 + zz), s_opt[:, None], dm_break[:, None], s_uv[:, None])
    fnu = 10.0 ** (-0.4 * m)
    if observed:
        fnu = fnu * igm_transmission(lam[None, :], zz)
    return -2.5 * np.log10(np.mean(fnu, axis=1))


def _cosmology_tables(zmax):
    """Distance modulus and angular-diameter distance (kpc/arcsec) on a fixed grid."""
    from astropy.cosmology import FlatLambdaCDM

    cosmo = FlatLambdaCDM(H0=70.0, Om0=0.3)
    zg = np.linspace(0.005, zmax + 0.01, 2000)
    dm = np.asarray(cosmo.distmod(zg).value)
    kpc_per_arcsec = np.asarray(cosmo.angular_diameter_distance(zg).to("kpc").value) / 206264.806
    return zg, dm, kpc_per_arcsec


def oblate_q(rng, mu, gamma_mean, gamma_sigma):
    gamma = np.clip(rng.normal(gamma_mean, gamma_sigma, size=mu.shape), 0.05, 0.95)
    return np.sqrt(mu**2 + gamma**2 * (1.0 - mu**2))


def generate(n=N_GALAXIES, seed=SEED):
    """Returns the catalog as a dict of numpy arrays, in CatSim's column order."""
    rng = np.random.default_rng(seed)

    # 1. magnitudes
    i_mag = sample_magnitudes(rng, n)

    # 2. redshifts (LSST Science Book eq. 3.8): Gamma(3, z0)
    z0 = redshift_scale(i_mag)
    z = np.clip(rng.gamma(3.0, z0), 0.01, 6.0)

    # 3. populations
    red = rng.uniform(size=n) < red_fraction(i_mag)

    # 4. SED parameters and colors
    s_opt = np.where(red, rng.normal(1.7, 0.2, n), rng.normal(0.8, 0.35, n))
    d4000 = np.where(red, rng.normal(1.9, 0.1, n), rng.normal(1.25, 0.08, n))
    dm_break = 2.5 * np.log10(np.clip(d4000, 1.0, None))
    beta = rng.normal(-1.8, 0.25, n)
    s_uv = np.where(red, rng.normal(4.0, 1.0, n), beta + 2.0)
    obs = {b: band_mag(BAND_EDGES_NM[b], z, s_opt, dm_break, s_uv) for b in BANDS}
    mags = {b: i_mag + (obs[b] - obs["i"]) for b in BANDS}

    # 5. stellar masses
    zg, dmod, kpc_as = _cosmology_tables(float(z.max()))
    rest_g = band_mag(REST_G_NM, z, s_opt, dm_break, s_uv, observed=False)
    rest_i = band_mag(REST_I_NM, z, s_opt, dm_break, s_uv, observed=False)
    kcorr = -2.5 * np.log10(1.0 + z) + (obs["i"] - rest_i)
    abs_i = i_mag - np.interp(z, zg, dmod) - kcorr
    # Bell et al. 2003 use a "diet Salpeter" IMF; -0.09 dex converts to the Chabrier IMF of
    # van der Wel et al. 2014 (diet Salpeter = 0.7 Salpeter; Salpeter - Chabrier = 0.24 dex).
    log_ml = -0.152 + 0.518 * (rest_g - rest_i) - 0.09
    log_mass = -0.4 * (abs_i - 4.53) + log_ml

    # 8. components (drawn before sizes: bulges are sized relative to disks)
    u = rng.uniform(size=n)
    bt_blue = rng.beta(1.0, 12.0, n)
    bt_red = rng.beta(4.0, 2.0, n)
    bt = np.where(red, np.where(u < 0.25, 1.0, bt_red), np.where(u < 0.70, 0.0, bt_blue))
    has_agn = rng.uniform(size=n) < AGN_FRACTION
    agn_frac = np.where(has_agn, 10.0 ** rng.uniform(np.log10(0.05), np.log10(0.5), n), 0.0)

    # 6. sizes (kpc, semi-major half-light axes) -> arcsec
    m_rel = 10.0 ** (log_mass - np.log10(5e10))
    r_disk = 10.0**0.86 * ((1.0 + z) / 1.25) ** -0.75 * m_rel**0.22
    r_disk *= 10.0 ** rng.normal(0.0, 0.20, n)
    m_piv = 2e10 / 5e10
    slope_e = np.where(m_rel > m_piv, 0.75, 0.10)
    r_sph = 10.0**0.60 * ((1.0 + z) / 1.25) ** -1.48 * m_piv**0.75 * (m_rel / m_piv) ** slope_e
    r_sph *= 10.0 ** rng.normal(0.0, 0.15, n)
    composite = (bt > 0) & (bt < 1)
    r_sph = np.where(composite, np.minimum(r_sph, 0.7 * r_disk), r_sph)
    scale = np.interp(z, zg, kpc_as)
    a_d = r_disk / scale
    a_b = r_sph / scale

    # 7. axis ratios and position angles
    mu = rng.uniform(size=n)
    q_d = oblate_q(rng, mu, 0.21, 0.05)
    q_b = oblate_q(rng, mu, 0.60, 0.10)
    pa = rng.uniform(0.0, 360.0, n)

    # 9. fluxnorm
    log_total = -0.4 * i_mag - 7.405 + 0.294 * np.log10(1.0 + z) + rng.normal(0.0, 0.20, n)
    total = 10.0**log_total
    f_agn = total * agn_frac
    f_bulge = total * (1.0 - agn_frac) * bt
    f_disk = total * (1.0 - agn_frac) * (1.0 - bt)
    has_d, has_b = f_disk > 0, f_bulge > 0
    a_d, b_d = np.where(has_d, a_d, 0.0), np.where(has_d, a_d * q_d, 0.0)
    a_b, b_b = np.where(has_b, a_b, 0.0), np.where(has_b, a_b * q_b, 0.0)

    # 10. positions
    area_arcmin2 = n / (
        N_LT_25_PER_ARCMIN2 * (10.0 ** (ALPHA * (I_MAX - 25.0)) - 10.0 ** (ALPHA * (I_MIN - 25.0)))
    )
    side_deg = np.sqrt(area_arcmin2) / 60.0
    ra = RA_CENTER + side_deg * (rng.uniform(size=n) - 0.5)
    dec = DEC_CENTER + side_deg * (rng.uniform(size=n) - 0.5)

    f32 = np.float32
    cat = {
        "galtileid": 2_200_000_000 + np.arange(n, dtype=np.int64),
        "ra": ra.astype(np.float64),
        "dec": dec.astype(np.float64),
        "redshift": z.astype(f32),
        "fluxnorm_bulge": f_bulge.astype(f32),
        "fluxnorm_disk": f_disk.astype(f32),
        "fluxnorm_agn": f_agn.astype(f32),
        "a_b": a_b.astype(f32),
        "a_d": a_d.astype(f32),
        "b_b": b_b.astype(f32),
        "b_d": b_d.astype(f32),
        "pa_bulge": np.where(has_b, pa, 0.0).astype(f32),
        "pa_disk": np.where(has_d, pa, 0.0).astype(f32),
    }
    for b in BANDS:
        cat[f"{b}_ab"] = mags[b].astype(f32)
    # float32 rounding must not break a >= b
    for a, bb in (("a_b", "b_b"), ("a_d", "b_d")):
        cat[bb] = np.minimum(cat[bb], cat[a])
    return {c: cat[c] for c in COLUMNS}


def main(output: str | os.PathLike | None = None, n: int = N_GALAXIES, seed: int = SEED) -> Path:
    """Generates the catalog and writes it atomically to ``output`` (FITS). Returns the path."""
    from astropy.io import fits

    out = Path(output) if output is not None else DEFAULT_OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    cat = generate(n=n, seed=seed)
    cols = [fits.Column(name=c, format="K" if c == "galtileid" else
                        ("D" if cat[c].dtype == np.float64 else "E"), array=cat[c])
            for c in COLUMNS]  # fmt: skip
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["ORIGIN"] = "btkjax data/make_default_catalog.py"
    hdu.header["SEED"] = seed
    fd, tmp = tempfile.mkstemp(suffix=".fits.tmp", dir=out.parent)
    os.close(fd)
    try:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp, overwrite=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out


if __name__ == "__main__":
    path = main(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
