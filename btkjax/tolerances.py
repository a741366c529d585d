"""Every numerical tolerance the tests and the renderer rely on, each with its source.

Tests import from here; nothing else hard-codes a tolerance. Never loosen a number to make a
test pass: find the cause.
"""

# --- Images against GalSim -------------------------------------------------------------------
# GalSim at its default gsparams is within ~2e-5 of the peak pixel of a tightly converged drawing
# of LSST CatSim blends (measured; see the project README). That is the accuracy users already
# accept, so float64 parity with a tightly converged GalSim drawing is held to it.
IMAGE_RTOL_PEAK_F64 = 2e-5
# float32 carries ~6e-8 relative rounding per operation; an FFT of N^2 ~ 3e4 points accumulates
# ~sqrt(log2 N^2) * N^2 * eps relative to the peak in the worst case. 1e-4 of peak covers it.
IMAGE_RTOL_PEAK_F32 = 1e-4

# --- Fourier profiles against GalSim's kValue ------------------------------------------------
# Profiles alone, in float64, against GalSim's own kValue (which is exact for analytic profiles
# and tabulated to GalSim's kvalue_accuracy = 1e-5 by default; the reference uses tightened
# gsparams so its own error is ~1e-8). Relative to the k=0 value (the flux).
KVALUE_ATOL_F64 = 1e-6

# --- Gradients against central finite differences ---------------------------------------------
# Central differences in float64 with step h have truncation error O(h^2 f''') and rounding
# error O(eps / h); with h ~ 1e-5 relative both are ~1e-10, so 1e-4 relative is loose enough to
# absorb table interpolation kinks and tight enough to catch a wrong derivative.
GRAD_RTOL_F64 = 1e-4
FD_STEP_F64 = 1e-5

# --- Renderer internals -----------------------------------------------------------------------
# Fourier-space folding: the PSF x pixel transfer function is evaluated out to the wavenumber
# where it falls below this fraction of its k=0 value, and everything beyond is dropped (GalSim's
# maxk_threshold plays the same role; its default is 1e-3, tightened here).
MAXK_THRESHOLD = 1e-7
# Real-space folding: the FFT box is chosen so that the flux of a profile that falls outside it
# is below this fraction (GalSim's folding_threshold, default 5e-3, tightened here).
FOLDING_THRESHOLD = 1e-5

# --- Noise statistics -------------------------------------------------------------------------
# Pixel mean and variance of Poisson noise are tested on n pixels: the standard error of the
# sample mean is sqrt(var / n) and of the sample variance about var * sqrt(2 / n); the tests
# assert within 5 standard errors (a false alarm rate ~ 6e-7).
NOISE_N_SIGMA = 5.0

# --- Sampling statistics ----------------------------------------------------------------------
# Distribution tests of the samplers (chi-square on counts, Kolmogorov-Smirnov on shifts, exact
# Poisson test on totals) pass when their p-value is above this floor. For a correct sampler the
# p-value is uniform on [0, 1], so each such test raises a false alarm with probability 1e-4 (the
# tests use fixed seeds, so a given seed either always passes or always fails; ~20 such tests in
# tests/test_sampling.py give a ~2e-3 chance that some seed choice trips one). Power, measured at
# the 4000 blends (~8000 galaxies) the tests draw: a shift range 10% too narrow gives a KS
# p-value ~1e-17; an off-by-one in the number of galaxies puts counts outside the support (the
# test fails outright).
SAMPLING_PVALUE_FLOOR = 1e-4

# --- Default catalog against the CatSim sample --------------------------------------------------
# The issue asks that the embedded default catalog's distributions be "close to the CatSim
# sample's (median size in magnitude bins within a factor 1.5, median colors within 0.3 mag)".
DEFAULT_CATALOG_SIZE_RATIO = 1.5
DEFAULT_CATALOG_COLOR_ATOL = 0.3

# --- Sersic tables against exact transforms (added by the profiles module) --------------------
# btkjax.profiles tabulates the exact Sersic Hankel transform (Mellin-Barnes integral, ~1e-13)
# and interpolates it; source: the project brief asks for DeVaucouleurs to ~1e-7 of F(0) in
# float64. Measured: <= 5e-8 for the general-n table over n in [0.3, 6.2] and all k (against the
# exact n=0.5 Gaussian and n=1 exponential, and Mellin-Barnes elsewhere), 5e-12 for the n=4 table.
SERSIC_EXACT_ATOL_F64 = 1e-7
