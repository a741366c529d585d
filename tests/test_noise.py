"""Noise: Poisson statistics per mode, reproducibility, batch invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from btkjax.noise import (
    POISSON_EXACT_BELOW,
    _poisson,
    add_noise,
    check_noise_mode,
    normal,
    threefry_bits,
)
from btkjax.tolerances import NOISE_N_SIGMA

pytestmark = pytest.mark.float64  # float64 references (jax.random bits, Poisson tails)


def _check_moments(samples, mean, var):
    """Sample mean and variance within NOISE_N_SIGMA standard errors of the expectation."""
    n = samples.size
    assert abs(samples.mean() - mean) < NOISE_N_SIGMA * np.sqrt(var / n), (samples.mean(), mean)
    # standard error of the sample variance of a Poisson: sqrt((mu4 - var^2) / n),
    # mu4 = var (1 + 3 var) for a Poisson of mean var.
    se_var = np.sqrt((var * (1 + 3 * var) - var**2) / n)
    assert abs(samples.var() - var) < NOISE_N_SIGMA * se_var, (samples.var(), var)


@pytest.fixture(scope="module")
def images():
    # 4 blends, 2 bands, 64 x 64; band 0 faint (exact sampler), band 1 bright (normal branch).
    img = np.zeros((4, 2, 64, 64), np.float64)
    img[:, 0] = 3.0
    img[:, 1] = 400.0
    return jnp.asarray(img)


@pytest.mark.parametrize("mode", ["all", "background", "galaxy", "none"])
def test_pixel_moments_match_poisson(images, mode):
    sky = jnp.asarray([20.0, 1.0e4])
    noisy = np.asarray(add_noise(jax.random.key(3), jnp.arange(4), images, sky, mode))
    img = np.asarray(images)
    for band in range(2):
        x = noisy[:, band].ravel()
        level = img[0, band, 0, 0]
        s = float(sky[band])
        if mode == "none":
            np.testing.assert_array_equal(x, img[:, band].ravel())
        elif mode == "all":
            _check_moments(x, level, level + s)
        elif mode == "background":
            _check_moments(x, level, s)
        else:
            _check_moments(x, level, level)
            assert np.all(x == np.round(x)) and np.all(x >= 0)


def test_sampler_cdf_close_to_poisson():
    """Both branches of the sampler against scipy's Poisson CDF (KS distance)."""
    for rate in (0.7, 12.0, POISSON_EXACT_BELOW - 1, POISSON_EXACT_BELOW, 3e3, 1e5):
        x = np.asarray(_poisson(jax.random.key(7)[None], jnp.full((1, 200_000), rate),
                                jnp.float64))[0]
        values, counts = np.unique(x, return_counts=True)
        emp = np.cumsum(counts) / x.size
        dist = np.abs(emp - stats.poisson.cdf(values, rate)).max()
        # KS critical value at p = 1e-4 for n = 200000: sqrt(-ln(1e-4 / 2) / (2 n)) = 4.6e-3
        assert dist < 4.6e-3, (rate, dist)


def test_same_key_same_noise_and_batch_invariance():
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.uniform(0, 50, (100, 2, 16, 16)))
    sky = jnp.asarray([100.0, 5.0])
    key = jax.random.key(11)
    full = np.asarray(add_noise(key, jnp.arange(100), img, sky, "all"))
    again = np.asarray(add_noise(key, jnp.arange(100), img, sky, "all"))
    np.testing.assert_array_equal(full, again)
    one = np.asarray(add_noise(key, jnp.arange(42, 43), img[42:43], sky, "all"))
    seven = np.asarray(add_noise(key, jnp.arange(40, 47), img[40:47], sky, "all"))
    np.testing.assert_array_equal(one[0], full[42])
    np.testing.assert_array_equal(seven[2], full[42])
    other = np.asarray(add_noise(jax.random.key(12), jnp.arange(100), img, sky, "all"))
    assert not np.array_equal(other, full)


def test_bad_mode():
    with pytest.raises(ValueError, match=r"add_noise must be one of .*'al'"):
        check_noise_mode("al")


@pytest.mark.parametrize("count", [1, 2, 7, 1000, 86_401])
def test_threefry_normals_are_jax_random_bit_for_bit(count):
    """The unrolled Threefry is JAX's hash: the same words and normals as jax.random (default,
    partitionable layout), in float32 and float64, for odd and even counts."""
    key = jax.random.fold_in(jax.random.key(5), count)
    with jax.threefry_partitionable(True):
        ref_bits = np.asarray(jax.random.bits(key, (count,), jnp.uint32))
        refs = {dt: np.asarray(jax.random.normal(key, (count,), dt))
                for dt in (jnp.float32, jnp.float64)}
    np.testing.assert_array_equal(np.asarray(threefry_bits(key, count)), ref_bits)
    for dt, ref in refs.items():
        np.testing.assert_array_equal(np.asarray(normal(key, (count,), dt)), ref)
