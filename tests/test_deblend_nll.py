"""The deblender's float32 likelihood is the float64 one (a bright galaxy's pixels included)."""

import jax.numpy as jnp
import numpy as np

from btkjax.deblend.model import nll_terms
from btkjax.tolerances import DEBLEND_NLL_F32_ATOL


def _deviance64(model, image, sky):
    """Half the Poisson deviance of `nll_terms`, textbook form, float64 numpy."""
    m, d = np.asarray(model, np.float64), np.asarray(image, np.float64)
    s = np.asarray(sky, np.float64)[:, None, None]
    r = np.maximum(m + s, 1e-3 * s)
    c = np.maximum(d + s, 0.0)
    safe = np.where(c > 0, c, 1.0)
    return float(np.sum((r - c) - np.where(c > 0, c * np.log(r / safe), 0.0)))


def _scene(shift=0.0):
    """A 3e6-electron round Gaussian (sigma 3 px) on 6 bands of 64 x 64 pixels, sky 800."""
    y, x = np.mgrid[:64, :64]
    g = np.exp(-((x - 31.3 - shift) ** 2 + (y - 32.6) ** 2) / 18.0)
    g = 3e6 * g / g.sum()
    return np.stack([g * w for w in (0.3, 0.6, 1.0, 1.1, 1.2, 0.9)])


def test_float32_deviance_is_the_float64_one():
    rng = np.random.default_rng(5)
    sky = np.full(6, 800.0)
    truth = _scene()
    image = (rng.poisson(truth + sky[:, None, None]) - sky[:, None, None]).astype(np.float32)
    image[0, :3, :3] = -900.0  # counts below zero: the deviance is the rate there
    for model in (truth, _scene(0.3), 0.97 * truth):
        want = _deviance64(model.astype(np.float32), image, sky)
        got = float(nll_terms(jnp.asarray(model, jnp.float32), jnp.asarray(image),
                              jnp.asarray(sky, jnp.float32), 1.0).nll)
        assert abs(got - want) < DEBLEND_NLL_F32_ATOL, (got, want)
    # a shift of 1e-4 pixel changes -log L by what float64 says (it once jumped by ~5)
    a, b = (float(nll_terms(jnp.asarray(_scene(s), jnp.float32), jnp.asarray(image),
                            jnp.asarray(sky, jnp.float32), 1.0).nll) for s in (0.0, 1e-4))
    want = _deviance64(_scene(1e-4).astype(np.float32), image, sky) - _deviance64(
        _scene(0.0).astype(np.float32), image, sky)
    assert abs((b - a) - want) < DEBLEND_NLL_F32_ATOL, (b - a, want)


def test_the_textbook_float32_form_is_not():
    # what the test above guards against: c log r - c log c in float32 on the same scene
    rng = np.random.default_rng(5)
    sky = np.full(6, 800.0, np.float32)
    truth = _scene().astype(np.float32)
    image = (rng.poisson(truth + sky[:, None, None]) - sky[:, None, None]).astype(np.float32)
    s = sky[:, None, None]
    r, c = truth + s, image + s
    naive = float(jnp.sum((r - c) - c * (jnp.log(r) - jnp.log(c))))
    assert abs(naive - _deviance64(truth, image, sky)) > 10 * DEBLEND_NLL_F32_ATOL
