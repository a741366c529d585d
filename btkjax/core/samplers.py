# ruff: noqa: F722  (jaxtyping shape strings such as "blend slot" are not Python expressions)
"""Array samplers: pure JAX functions of a PRNG key that draw whole batches of blends on device.

A batch of blends is a :class:`Blends` (a NamedTuple, hence a pytree) of ``[blend, slot]`` arrays
padded to ``max_number`` slots; occupied slots come first (``mask = arange(max_number) < n``) and
empty slots hold row 0, zero offsets, zero rotation and zero shear.

Reproducibility: blend ``i`` is drawn from ``jax.random.fold_in(key, i)`` where ``i`` is its GLOBAL
index (``blend_ids``), never its position in the batch. The same key and id give the same blend
whatever the batch size, the number of devices, or whether the run was resumed. Ids must be
non-negative and below 2**31 (they are cast to int32 for ``fold_in``).

The kernels are jitted with ``max_number`` static; everything else, including ``min_number``,
``max_shift``, ``augment`` and the shear, is traced, so a new batch of the same shape never
recompiles. The rows a galaxy may come from (``eligible_rows``) are computed on the host once per
catalog (``btkjax.sampling_functions.eligible_rows``) so that shapes stay static.

Table samplers (``btkjax.sampling_functions``) written by users run on the host;
``btkjax.sampling_functions.blends_from_tables`` converts their output into the same ``Blends``.
"""

from __future__ import annotations

import collections
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.keys import DEFAULT_SEED, as_key, blend_keys

try:  # annotations only
    from jaxtyping import Array, Bool, Float, Int
except ImportError:  # pragma: no cover
    Array = jax.Array

    class _Ann:
        def __class_getitem__(cls, item):
            return jax.Array

    Bool = Float = Int = _Ann

__all__ = [
    "DensityOverflowWarning",
    "rows_int32",
    "Blends",
    "as_key",
    "blend_keys",
    "default_sampler",
    "pair_sampler",
    "density_sampler",
    "poisson_cdf_table",
    "JaxDefaultSampler",
    "JaxPairSampler",
    "JaxDensitySampler",
    "trace_counts",
]

trace_counts: collections.Counter = collections.Counter()
"""How many times each kernel was traced (a Python side effect that runs only while tracing);
tests use it to check that repeated batches of one shape compile once."""


class DensityOverflowWarning(UserWarning):
    """A density sampler drew more galaxies than ``max_number`` (or fewer than ``min_number``)
    and the count was clipped."""


class Blends(NamedTuple):
    """A batch of blends, padded to ``max_number`` slots; occupied slots first."""

    index: Int[Array, "blend slot"]  # catalog row of each slot (0 in empty slots)
    mask: Bool[Array, "blend slot"]  # True where a galaxy is present
    dx: Float[Array, "blend slot"]  # arcsec, offset from the stamp center along +x (ra)
    dy: Float[Array, "blend slot"]  # arcsec, along +y (dec)
    rotation: Float[Array, "blend slot"]  # degrees, extra rotation (augment_data); 0 by default
    g1: Float[Array, "blend slot"]  # lensing shear, 0 by default
    g2: Float[Array, "blend slot"]

    @property
    def n_blends(self) -> int:
        return self.mask.shape[0]

    @property
    def max_number(self) -> int:
        return self.mask.shape[1]

    @property
    def n_galaxies(self):
        """Number of galaxies in each blend, ``[blend]``."""
        return self.mask.sum(axis=-1)


# ------------------------------------------------------------------------------------------------
# host helpers
# ------------------------------------------------------------------------------------------------


def rows_int32(rows) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0:
        raise ValueError(f"eligible rows must be a non-empty 1-d array, got shape {rows.shape}.")
    if rows.min() < 0 or rows.max() >= 2**31:
        raise ValueError("catalog rows must be in [0, 2**31).")
    return rows.astype(np.int32)


def _fill(mask, dx, dy, rotation, g1, g2, index):
    zero = jnp.zeros_like(dx)
    return Blends(
        index=jnp.where(mask, index, 0).astype(jnp.int32),
        mask=mask,
        dx=jnp.where(mask, dx, zero),
        dy=jnp.where(mask, dy, zero),
        rotation=jnp.where(mask, rotation, zero),
        g1=jnp.where(mask, g1, zero),
        g2=jnp.where(mask, g2, zero),
    )


def _uniform_ints(hi_bits, lo_bits, span):
    """Integers uniform in [0, span) from two uint32 words each (jax.random.randint's method:
    (hi mod span) * (2^32 mod span) + lo mod span, mod span; bias below span / 2^32)."""
    span = span.astype(jnp.uint32)
    mult = jax.lax.rem(jnp.uint32(2**16), span)
    mult = jax.lax.rem(mult * mult, span)  # 2^32 mod span
    off = jax.lax.rem(hi_bits, span) * mult + jax.lax.rem(lo_bits, span)
    return jax.lax.rem(off, span).astype(jnp.int32)


def _unit_uniform(bits):
    """Floats uniform in [0, 1) with 23-bit resolution from uint32 words (as jax.random.uniform)."""
    return (bits >> 9).astype(jnp.float32) * jnp.float32(2.0**-23)


def _draw(key, n_slots, int_lo, int_hi, max_shift, augment, n_extra=0):
    """One blend's random numbers from a single ``jax.random.bits`` draw (one random op keeps
    compilation ~2x faster than separate randint/uniform calls): integers uniform in
    [int_lo, int_hi) (one per entry of the bounds), and per slot dx, dy uniform in
    [-max_shift, max_shift) and a rotation uniform in [0, 360) if ``augment`` else 0; with
    ``n_extra`` also returns that many more uniforms in [0, 1)."""
    n_int = int_lo.shape[0]
    bits = jax.random.bits(key, (2 * n_int + 3 * n_slots + n_extra,), dtype=jnp.uint32)
    ints = int_lo + _uniform_ints(bits[:n_int], bits[n_int : 2 * n_int], int_hi - int_lo)
    u_all = _unit_uniform(bits[2 * n_int :])
    u = u_all[: 3 * n_slots].reshape(3, n_slots)
    dx = max_shift * (2.0 * u[0] - 1.0)
    dy = max_shift * (2.0 * u[1] - 1.0)
    rot = jnp.where(augment, 360.0 * u[2], 0.0)
    if n_extra:
        return ints, dx, dy, rot, u_all[3 * n_slots :]
    return ints, dx, dy, rot


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("max_number",))
def default_sampler(
    key: jax.Array,
    blend_ids: Int[Array, " blend"],
    eligible_rows: Int[Array, " row"],
    max_number: int,
    min_number=1,
    max_shift=2.4,
    augment=False,
    g1=0.0,
    g2=0.0,
) -> Blends:
    """BTK's DefaultSampling on arrays: per blend, n ~ U{min_number..max_number}, rows uniform with
    replacement over ``eligible_rows``, shifts uniform in [-max_shift, max_shift) arcsec on each
    axis; with ``augment`` a rotation uniform in [0, 360) degrees per galaxy; constant shear
    (g1, g2) on occupied slots. Only ``max_number`` is static. Requires
    ``0 <= min_number <= max_number`` (not checked here; ``JaxDefaultSampler`` checks it)."""
    trace_counts["default_sampler"] += 1
    rows = jnp.asarray(eligible_rows)
    n_rows = rows.shape[0]
    lo = jnp.zeros((max_number + 1,), jnp.int32).at[0].set(min_number)
    hi = jnp.full((max_number + 1,), n_rows, jnp.int32).at[0].set(max_number + 1)

    def one(k):
        ints, dx, dy, rot = _draw(k, max_number, lo, hi, max_shift, augment)
        mask = jnp.arange(max_number) < ints[0]
        ones = jnp.ones_like(dx)
        return _fill(mask, dx, dy, rot, g1 * ones, g2 * ones, rows[ints[1:]])

    return jax.vmap(one)(blend_keys(key, blend_ids))


@jax.jit
def pair_sampler(
    key: jax.Array,
    blend_ids: Int[Array, " blend"],
    bright_rows: Int[Array, " row"],
    dim_rows: Int[Array, " row2"],
    max_shift=2.4,
    augment=False,
) -> Blends:
    """BTK's PairSampling on arrays: slot 0 a bright galaxy at the center, slot 1 a dim galaxy
    shifted uniformly in [-max_shift, max_shift) arcsec on each axis (2 slots, both occupied)."""
    trace_counts["pair_sampler"] += 1
    bright, dim = jnp.asarray(bright_rows), jnp.asarray(dim_rows)
    hi = jnp.array([bright.shape[0], dim.shape[0]], jnp.int32)

    def one(k):
        ints, dx, dy, rot = _draw(k, 2, jnp.zeros((2,), jnp.int32), hi, max_shift, augment)
        index = jnp.stack([bright[ints[0]], dim[ints[1]]])
        shifted = jnp.array([False, True])  # slot 0 sits exactly at the center
        zeros = jnp.zeros_like(dx)
        dx, dy = jnp.where(shifted, dx, zeros), jnp.where(shifted, dy, zeros)
        return _fill(jnp.ones((2,), dtype=bool), dx, dy, rot, zeros, zeros, index)

    return jax.vmap(one)(blend_keys(key, blend_ids))


def poisson_cdf_table(exp_count: float, max_number: int) -> np.ndarray:
    """P(N <= k) for k = 0..max_number, N ~ Poisson(exp_count) (float64, host)."""
    from scipy.stats import poisson

    return poisson.cdf(np.arange(max_number + 1), exp_count)


@functools.partial(jax.jit, static_argnames=("max_number",))
def density_sampler(
    key: jax.Array,
    blend_ids: Int[Array, " blend"],
    eligible_rows: Int[Array, " row"],
    max_number: int,
    min_number=0,
    poisson_cdf=None,
    max_shift=12.0,
    augment=False,
) -> tuple[Blends, Int[Array, " blend"]]:
    """BTK's DensitySampling on arrays: n ~ Poisson(exp_count) clipped into
    [min_number, max_number].

    The Poisson count is drawn by inverting ``poisson_cdf`` (``poisson_cdf_table(exp_count,
    max_number)``: P(N <= k) for k = 0..max_number) at a uniform variate; a variate above
    P(N <= max_number) means the draw exceeded max_number. (Exact up to the float resolution of
    the uniform variate and the table, ~1e-7; compiles far faster than ``jax.random.poisson``.)

    Returns ``(blends, drawn)``: ``drawn`` is the unclipped count, or ``max_number + 1`` for any
    count above max_number, so that the caller sees (and decides about) every clipped blend."""
    trace_counts["density_sampler"] += 1
    rows = jnp.asarray(eligible_rows)
    cdf = jnp.asarray(poisson_cdf)
    lo = jnp.zeros((max_number,), jnp.int32)
    hi = jnp.full((max_number,), rows.shape[0], jnp.int32)

    def one(k):
        ints, dx, dy, rot, u = _draw(k, max_number, lo, hi, max_shift, augment, n_extra=1)
        drawn = jnp.sum(u[0] >= cdf).astype(jnp.int32)  # in 0..max_number+1
        n = jnp.clip(drawn, min_number, max_number)
        mask = jnp.arange(max_number) < n
        zeros = jnp.zeros_like(dx)
        return _fill(mask, dx, dy, rot, zeros, zeros, rows[ints]), drawn

    return jax.vmap(one)(blend_keys(key, blend_ids))


# ------------------------------------------------------------------------------------------------
# high-level samplers (what a generator holds)
# ------------------------------------------------------------------------------------------------


def _check_numbers(max_number, min_number):
    if int(max_number) < 1:
        raise ValueError(f"max_number must be >= 1, got {max_number}.")
    if not 0 <= int(min_number) <= int(max_number):
        raise ValueError(
            f"Need 0 <= min_number <= max_number, got min_number = {min_number}, "
            f"max_number = {max_number}."
        )


def _check_shift(max_shift):
    if not (np.isfinite(max_shift) and max_shift >= 0):
        raise ValueError(f"max_shift must be a finite number >= 0 arcsec, got {max_shift}.")


class JaxDefaultSampler:
    """Device version of ``DefaultSampling`` for one catalog: ``sample(key, blend_ids) -> Blends``.

    Usually built by ``DefaultSampling(...).jax_sampler(catalog.table)``.

    Args:
        eligible_rows: catalog rows passing the magnitude cut (see
            ``btkjax.sampling_functions.eligible_rows``).
        max_number, min_number, max_shift: as ``DefaultSampling``.
        augment: draw a rotation uniform in [0, 360) degrees per galaxy (BTK's augment_data).
        shear: constant (g1, g2) for every galaxy (``DefaultSamplingShear``).
        seed: the seed of ``self.key`` (used when ``sample`` gets ``key=None``).
    """

    def __init__(
        self,
        eligible_rows,
        max_number: int,
        min_number: int = 1,
        max_shift: float = 2.4,
        augment: bool = False,
        shear: tuple[float, float] = (0.0, 0.0),
        seed: int = DEFAULT_SEED,
    ):
        _check_numbers(max_number, min_number)
        _check_shift(max_shift)
        self.eligible_rows = jnp.asarray(rows_int32(eligible_rows))
        self.max_number, self.min_number = int(max_number), int(min_number)
        self.max_shift = float(max_shift)
        self.augment = bool(augment)
        self.shear = (float(shear[0]), float(shear[1]))
        self.seed = int(seed)
        self.key = jax.random.key(self.seed)

    def sample(self, key, blend_ids) -> Blends:
        """Blends with global ids ``blend_ids`` (int array [blend]); ``key`` a key, an int seed, or
        None for ``self.key``."""
        key = self.key if key is None else as_key(key)
        return default_sampler(
            key,
            jnp.asarray(blend_ids, dtype=jnp.int32),
            self.eligible_rows,
            max_number=self.max_number,
            min_number=self.min_number,
            max_shift=self.max_shift,
            augment=self.augment,
            g1=self.shear[0],
            g2=self.shear[1],
        )


class JaxPairSampler:
    """Device version of ``PairSampling``: ``sample(key, blend_ids) -> Blends`` with 2 slots."""

    max_number = 2
    min_number = 2

    def __init__(self, bright_rows, dim_rows, max_shift=2.4, augment=False, seed=DEFAULT_SEED):
        _check_shift(max_shift)
        self.bright_rows = jnp.asarray(rows_int32(bright_rows))
        self.dim_rows = jnp.asarray(rows_int32(dim_rows))
        self.max_shift = float(max_shift)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.key = jax.random.key(self.seed)

    def sample(self, key, blend_ids) -> Blends:
        key = self.key if key is None else as_key(key)
        return pair_sampler(
            key,
            jnp.asarray(blend_ids, dtype=jnp.int32),
            self.bright_rows,
            self.dim_rows,
            max_shift=self.max_shift,
            augment=self.augment,
        )


class JaxDensitySampler:
    """Device version of ``DensitySampling``: ``sample(key, blend_ids) -> Blends``.

    Poisson draws outside [min_number, max_number] are clipped on device; ``sample`` then checks
    the unclipped counts on the host (one small transfer) and applies ``on_overflow`` as
    ``DensitySampling`` does: "warn" (DensityOverflowWarning), "clip" (silent, by request) or
    "raise" (ValueError). ``n_clipped`` counts clipped blends.
    """

    def __init__(
        self,
        eligible_rows,
        max_number: int,
        min_number: int = 0,
        exp_count: float = 1.0,
        max_shift: float = 12.0,
        on_overflow: str = "warn",
        augment: bool = False,
        seed: int = DEFAULT_SEED,
    ):
        _check_numbers(max_number, min_number)
        _check_shift(max_shift)
        if on_overflow not in ("warn", "clip", "raise"):
            raise ValueError(f"on_overflow must be 'warn', 'clip' or 'raise', got {on_overflow!r}.")
        self.eligible_rows = jnp.asarray(rows_int32(eligible_rows))
        self.max_number, self.min_number = int(max_number), int(min_number)
        self.exp_count = float(exp_count)
        self.poisson_cdf = jnp.asarray(poisson_cdf_table(self.exp_count, self.max_number))
        self.max_shift = float(max_shift)
        self.on_overflow = on_overflow
        self.augment = bool(augment)
        self.seed = int(seed)
        self.key = jax.random.key(self.seed)
        self.n_clipped = 0

    def sample(self, key, blend_ids) -> Blends:
        key = self.key if key is None else as_key(key)
        blends, drawn = density_sampler(
            key,
            jnp.asarray(blend_ids, dtype=jnp.int32),
            self.eligible_rows,
            max_number=self.max_number,
            min_number=self.min_number,
            poisson_cdf=self.poisson_cdf,
            max_shift=self.max_shift,
            augment=self.augment,
        )
        if self.on_overflow != "clip":
            drawn = np.asarray(drawn)
            bad = (drawn < self.min_number) | (drawn > self.max_number)
            if bad.any():
                n_over = int((drawn > self.max_number).sum())
                msg = (
                    f"DensitySampling drew counts outside [min_number, max_number] = "
                    f"[{self.min_number}, {self.max_number}] for {int(bad.sum())} of "
                    f"{bad.size} blends ({n_over} above max_number; Poisson mean "
                    f"{self.exp_count:.3g})"
                )
                if self.on_overflow == "raise":
                    raise ValueError(
                        msg + "; increase max_number or use on_overflow='warn'/'clip'."
                    )
                self.n_clipped += int(bad.sum())
                warnings.warn(msg + "; clipped.", DensityOverflowWarning, stacklevel=2)
        return blends
