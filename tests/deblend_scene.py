"""The two-band scene of the deblender's tests: Kolmogorov PSFs of FWHM 0.7" and 0.8" at 0.2"
pixels, and a fit `RenderSpec` with the PSF x pixel transforms on its grid."""

import galsim
import jax.numpy as jnp
import numpy as np

from btkjax import deblend as D
from btkjax.render import psf_kimage_from_galsim

PIXEL = 0.2
PSFS = (galsim.Kolmogorov(fwhm=0.7), galsim.Kolmogorov(fwhm=0.8))


def fit_scene(stamp_pixels: int, model: str = "exponential", **spec_kwargs):
    """(spec, psf_k) of a ``stamp_pixels`` stamp fitted with ``model`` (`D.fit_spec`)."""
    spec = D.fit_spec(stamp_pixels, PIXEL, list(PSFS), model, **spec_kwargs)
    return spec, jnp.asarray(np.stack([psf_kimage_from_galsim(p, spec) for p in PSFS]))
