"""Sampling functions: which galaxies go into a blend, and where (table in, table out).

A ``SamplingFunction`` is called with a catalog's standardized ``table`` and returns one blend: the
sampled catalog rows (every column) with ``ra`` and ``dec`` overwritten by offsets in arcsec from
the stamp center, and an integer ``btk_index`` column giving each row's position in the catalog
table (kept as is if the input table already has one). This is BTK's interface; users write their
own sampling functions the same way.

The built-in samplers that have a pure-JAX equivalent (``DefaultSampling``,
``DefaultSamplingShear``, ``PairSampling``, ``DensitySampling``) expose it through
``jax_sampler(table)`` (see :mod:`btkjax.samplers`), so that a generator can sample on device.
Check ``has_jax_sampler`` first: it is False for a user subclass that overrides ``__call__``,
since the array version would then no longer describe what the subclass does.

Differences from BTK 1.0.9 (all deliberate, all documented on the class):

- Every sampler draws from its own ``np.random.Generator`` seeded at construction (BTK's
  ``PairSampling``, ``RandomSquareSampling`` and ``FriendsOfFriendsSampling`` used the global
  ``np.random`` and ignored their seed).
- ``mag_name`` defaults to ``"ref_mag"`` (present in every standardized btkjax table) and falls
  back to ``"i_ab"`` when the table has no ``ref_mag``.
- Bad parameters fail at construction with ``ValueError``/``TypeError`` naming the value; a
  magnitude cut that leaves no galaxy fails at call time naming the cut and the catalog's range.
- ``DensitySampling`` clips the Poisson count explicitly (``on_overflow``), never silently.
- ``RandomSquareSampling`` really enforces ``max_number`` (BTK's check compared the length of a
  tuple and never fired) and projects ra offsets with ``cos(dec)``.
- ``FriendsOfFriendsSampling`` uses scipy's cKDTree and connected components instead of
  ``fast3tree``.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
from astropy.table import Table

from btkjax.blend_tables import blends_from_tables
from btkjax.core.keys import DEFAULT_SEED
from btkjax.core.samplers import (
    DensityOverflowWarning,
    JaxDefaultSampler,
    JaxDensitySampler,
    JaxPairSampler,
    rows_int32,
)

__all__ = [
    "SamplingFunction",
    "DefaultSampling",
    "DefaultSamplingShear",
    "BasicSampling",
    "PairSampling",
    "DensitySampling",
    "RandomSquareSampling",
    "FriendsOfFriendsSampling",
    "DensityOverflowWarning",
    "resolve_mag_name",
    "magnitude_cut_rows",
    "eligible_rows",
    "blends_from_tables",
    "check_seed",
    "SEED_LIMIT",
]

_ARCSEC_PER_DEG = 3600.0


# ------------------------------------------------------------------------------------------------
# helpers shared by the samplers (and by the JAX samplers' set-up)
# ------------------------------------------------------------------------------------------------


def resolve_mag_name(table: Table, mag_name: str) -> str:
    """The magnitude column to use: ``mag_name``, or ``i_ab`` when ``mag_name`` is the default
    ``ref_mag`` and the table lacks it. Raises ValueError naming the column otherwise."""
    if mag_name in table.colnames:
        return mag_name
    if mag_name == "ref_mag" and "i_ab" in table.colnames:
        return "i_ab"
    raise ValueError(
        f"Catalog table has no magnitude column {mag_name!r} (available columns: "
        f"{list(table.colnames)}); pass mag_name= one of them."
    )


def magnitude_cut_rows(
    table: Table, min_mag: float, max_mag: float, mag_name: str, what: str = "magnitude cut"
) -> np.ndarray:
    """Rows (int64, increasing) with ``min_mag < mag <= max_mag``; ValueError if there are none.

    The error names the cut and the catalog's magnitude range, so the user sees which bound to move.
    """
    col = resolve_mag_name(table, mag_name)
    mag = np.asarray(table[col], dtype=float)
    rows = np.flatnonzero((mag > min_mag) & (mag <= max_mag)).astype(np.int64)
    if rows.size == 0:
        if mag.size:
            rng_txt = f"[{np.nanmin(mag):.4g}, {np.nanmax(mag):.4g}]"
        else:
            rng_txt = "(empty table)"
        raise ValueError(
            f"The {what} {min_mag} < {col} <= {max_mag} leaves no galaxy: the catalog's {col} "
            f"range is {rng_txt} over {mag.size} rows."
        )
    return rows


def eligible_rows(
    table: Table, min_mag: float = -np.inf, max_mag: float = 25.3, mag_name: str = "ref_mag"
) -> np.ndarray:
    """Catalog rows (int32, increasing) with ``min_mag < mag <= max_mag``; computed on the host once
    per catalog. ValueError naming the cut and the catalog's range if none pass. ``ref_mag`` falls
    back to ``i_ab`` when absent."""
    rows = magnitude_cut_rows(table, min_mag, max_mag, mag_name)
    return rows_int32(rows)


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    return int(value)


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}.")
    return float(value)


SEED_LIMIT = 2**63
"""Seeds are integers in [0, SEED_LIMIT): what both NumPy's and JAX's generators accept."""


def check_seed(value, name: str = "seed") -> int:
    """``value`` as an int seed; TypeError/ValueError naming it unless an integer in
    [0, 2**63)."""
    value = _check_int(name, value)
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {value}.")
    return value


def _check_max_shift(max_shift: float, stamp_size: float) -> float:
    max_shift = _check_real("max_shift", max_shift)
    if not np.isfinite(max_shift) or max_shift < 0:
        raise ValueError(f"max_shift must be a finite number >= 0 arcsec, got {max_shift}.")
    if max_shift > stamp_size / 2.0:
        raise ValueError(
            f"max_shift = {max_shift} arcsec would put galaxy centers outside the stamp of size "
            f"{stamp_size} arcsec: it must be at most stamp_size / 2 = {stamp_size / 2.0} arcsec."
        )
    return max_shift


def _check_mag_bounds(min_mag: float, max_mag: float, lo_name="min_mag", hi_name="max_mag"):
    if not float(min_mag) < float(max_mag):
        raise ValueError(
            f"{lo_name} = {min_mag} must be smaller than {hi_name} = {max_mag}: the cut "
            f"{lo_name} < mag <= {hi_name} would select nothing."
        )


def _blend_table(table: Table, rows: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> Table:
    """Rows of ``table`` with ra/dec replaced by offsets (arcsec) and a ``btk_index`` column."""
    rows = np.asarray(rows, dtype=np.int64)
    out = table[rows]
    if "btk_index" not in out.colnames:
        out["btk_index"] = rows
    out["ra"] = np.asarray(dx, dtype=np.float64)
    out["dec"] = np.asarray(dy, dtype=np.float64)
    return out


def _sky_offsets_arcsec(ra_deg, dec_deg, ra0_deg, dec0_deg):
    """Offsets (arcsec) of sky positions from a center on the local tangent plane (small angles):
    dx = wrapped(ra - ra0) cos(dec0), dy = dec - dec0."""
    dra = (np.asarray(ra_deg, float) - ra0_deg + 180.0) % 360.0 - 180.0
    dx = dra * math.cos(math.radians(dec0_deg)) * _ARCSEC_PER_DEG
    dy = (np.asarray(dec_deg, float) - dec0_deg) * _ARCSEC_PER_DEG
    return dx, dy


def _unwrapped_ra(ra_deg: np.ndarray) -> np.ndarray:
    """RA in degrees made continuous across 0/360 (centered on the circular mean)."""
    rad = np.radians(np.asarray(ra_deg, float))
    mean = math.degrees(math.atan2(np.mean(np.sin(rad)), np.mean(np.cos(rad))))
    return mean + (np.asarray(ra_deg, float) - mean + 180.0) % 360.0 - 180.0


# ------------------------------------------------------------------------------------------------
# base class
# ------------------------------------------------------------------------------------------------


class SamplingFunction:
    """Base class: a callable taking a catalog table and returning one blend's table.

    Both ways BTK users write ``super().__init__`` work:

    - BTK 1.0 (keywords, or positionally in BTK's order ``max_number, min_number, seed``):
      ``super().__init__(max_number=3, min_number=1, stamp_size=24.0, max_shift=2.0, seed=0)``;
    - the seed-era tutorial: ``super().__init__(max_number)``, then ``self.stamp_size = ...``.

    (btkjax's earlier order, ``stamp_size`` first, is still accepted when the first positional
    argument is not an integer or ``max_number`` is given by keyword.)

    Args:
        max_number: maximum number of galaxies in a blend (>= 1); the generator pads every blend
            to this many slots.
        min_number: minimum number of galaxies in a blend (0 <= min_number <= max_number).
        stamp_size: size of the stamp in arcsec (None: set by the subclass, or unchecked).
        max_shift: largest shift of a galaxy center from the stamp center, arcsec (None: the
            subclass sets it, or the generator assumes stamp_size / 2).
        seed: integer seed in [0, 2**63) of the sampler's ``np.random.Generator`` (``self.rng``).

    Subclasses implement ``__call__(table) -> Table``: rows of the catalog table (edited or not:
    every row is drawn as it is returned) with ``ra``, ``dec`` offsets in arcsec from the stamp
    center. A ``btk_index`` column (the catalog row, kept by ``table[rows]``) lets the generator
    skip recomputing rows that were not edited; it is optional.
    """

    def __init__(self, *args, max_number=None, min_number=None, stamp_size=None, max_shift=None,
                 seed=None):
        legacy = bool(args) and (
            max_number is not None
            or (isinstance(args[0], numbers.Real) and not isinstance(args[0], numbers.Integral))
        )
        names = (("stamp_size", "max_number", "min_number", "seed") if legacy
                 else ("max_number", "min_number", "seed"))
        if len(args) > len(names):
            raise TypeError(
                f"SamplingFunction.__init__ takes at most {len(names)} positional arguments "
                f"({', '.join(names)}), got {len(args)}: {args!r}."
            )
        given = {"max_number": max_number, "min_number": min_number, "stamp_size": stamp_size,
                 "seed": seed}
        for name, value in zip(names, args, strict=False):
            if given[name] is not None:
                raise TypeError(f"SamplingFunction.__init__ got two values for {name}.")
            given[name] = value
        if given["max_number"] is None:
            raise TypeError("SamplingFunction.__init__ needs max_number (galaxies per blend).")
        max_number = _check_int("max_number", given["max_number"])
        min_number = _check_int("min_number", 1 if given["min_number"] is None
                                else given["min_number"])
        seed = check_seed(DEFAULT_SEED if given["seed"] is None else given["seed"])
        if max_number < 1:
            raise ValueError(f"max_number must be >= 1 (galaxies per blend), got {max_number}.")
        if min_number < 0:
            raise ValueError(f"min_number must be >= 0, got {min_number}.")
        if min_number > max_number:
            raise ValueError(
                f"Need min_number <= max_number, got min_number = {min_number} > "
                f"max_number = {max_number}."
            )
        stamp_size = given["stamp_size"]
        if stamp_size is not None:
            stamp_size = _check_real("stamp_size", stamp_size)
            if not (np.isfinite(stamp_size) and stamp_size > 0):
                raise ValueError(
                    f"stamp_size must be a positive number of arcsec, got {stamp_size}.")
        self.stamp_size = stamp_size
        if max_shift is not None:
            max_shift = _check_max_shift(_check_real("max_shift", max_shift),
                                         np.inf if stamp_size is None else stamp_size)
        self.max_shift = max_shift
        self.max_number = max_number
        self.min_number = min_number
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def compatible_catalogs(self) -> tuple[str, ...]:
        """Names of the catalog classes this sampler can draw from."""
        return ("CatsimCatalog", "CosmosCatalog")

    def __call__(self, table: Table) -> Table:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(table).")

    # --- JAX path ------------------------------------------------------------------------------
    _jax_reference_call = None  # the __call__ whose behaviour jax_sampler reproduces

    @property
    def has_jax_sampler(self) -> bool:
        """True when ``jax_sampler`` reproduces this object's ``__call__`` (not overridden)."""
        ref = type(self)._jax_reference_call
        return ref is not None and type(self).__call__ is ref

    def jax_sampler(self, table: Table):
        """The equivalent on-device sampler (see :mod:`btkjax.samplers`), built for ``table``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no JAX array sampler; the generator must call it on the "
            "host and convert its tables with btkjax.sampling_functions.blends_from_tables."
        )


# ------------------------------------------------------------------------------------------------
# default sampling
# ------------------------------------------------------------------------------------------------


class DefaultSampling(SamplingFunction):
    """BTK's default: n ~ U{min_number..max_number} galaxies drawn uniformly, with replacement,
    among those with ``min_mag < mag <= max_mag``, each shifted uniformly in
    [-max_shift, max_shift] arcsec along x (ra) and y (dec) from the stamp center.

    Galaxy positions are not representative of real blends. The draws use ``self.rng`` in BTK's
    order (number, rows, dx, dy).

    Args:
        max_number, min_number, stamp_size, seed: see ``SamplingFunction``.
        max_shift: largest shift in arcsec (default ``stamp_size / 10``; at most stamp_size / 2).
        min_mag, max_mag: the magnitude cut (min_mag excluded, max_mag included).
        mag_name: magnitude column (default ``ref_mag``, falling back to ``i_ab``).
    """

    def __init__(
        self,
        max_number: int = 2,
        min_number: int = 1,
        stamp_size: float = 24.0,
        max_shift: float | None = None,
        min_mag: float = -np.inf,
        max_mag: float = 25.3,
        seed: int = DEFAULT_SEED,
        mag_name: str = "ref_mag",
    ):
        super().__init__(max_number=max_number, min_number=min_number, stamp_size=stamp_size, seed=seed)
        self.max_shift = _check_max_shift(
            self.stamp_size / 10.0 if max_shift is None else max_shift, self.stamp_size
        )
        _check_mag_bounds(min_mag, max_mag)
        self.min_mag, self.max_mag = float(min_mag), float(max_mag)
        self.mag_name = mag_name

    def eligible_rows(self, table: Table) -> np.ndarray:
        """Catalog rows passing the magnitude cut (ValueError if none)."""
        return magnitude_cut_rows(table, self.min_mag, self.max_mag, self.mag_name)

    def __call__(self, table: Table) -> Table:
        rows_ok = self.eligible_rows(table)
        n = int(self.rng.integers(self.min_number, self.max_number + 1))
        rows = self.rng.choice(rows_ok, size=n)
        dx = self.rng.uniform(-self.max_shift, self.max_shift, size=n)
        dy = self.rng.uniform(-self.max_shift, self.max_shift, size=n)
        return _blend_table(table, rows, dx, dy)

    def _shear(self) -> tuple[float, float]:
        return (0.0, 0.0)

    def jax_sampler(self, table: Table, augment: bool = False):
        """A :class:`btkjax.samplers.JaxDefaultSampler` drawing from this sampler's distribution
        (the JAX and table samplers share distributions, not random streams)."""
        return JaxDefaultSampler(
            eligible_rows=self.eligible_rows(table),
            max_number=self.max_number,
            min_number=self.min_number,
            max_shift=self.max_shift,
            augment=augment,
            shear=self._shear(),
            seed=self.seed,
        )


DefaultSampling._jax_reference_call = DefaultSampling.__call__


class DefaultSamplingShear(DefaultSampling):
    """``DefaultSampling`` plus constant ``g1``, ``g2`` columns (BTK's DefaultSamplingShear).

    Args:
        shear: the (g1, g2) reduced shear given to every galaxy; |g| must be < 1.
        others: see ``DefaultSampling``.
    """

    def __init__(
        self,
        max_number: int = 2,
        min_number: int = 1,
        stamp_size: float = 24.0,
        max_shift: float | None = None,
        min_mag: float = -np.inf,
        max_mag: float = 25.3,
        seed: int = DEFAULT_SEED,
        mag_name: str = "ref_mag",
        shear: tuple[float, float] = (0.0, 0.0),
    ):
        super().__init__(
            max_number, min_number, stamp_size, max_shift, min_mag, max_mag, seed, mag_name
        )
        g1, g2 = (float(g) for g in shear)
        if not math.hypot(g1, g2) < 1.0:
            raise ValueError(f"shear (g1, g2) = ({g1}, {g2}) must have |g| < 1.")
        self.shear = (g1, g2)

    def __call__(self, table: Table) -> Table:
        out = super().__call__(table)
        out["g1"] = np.full(len(out), self.shear[0])
        out["g2"] = np.full(len(out), self.shear[1])
        return out

    def _shear(self) -> tuple[float, float]:
        return self.shear


DefaultSamplingShear._jax_reference_call = DefaultSamplingShear.__call__


# ------------------------------------------------------------------------------------------------
# basic sampling
# ------------------------------------------------------------------------------------------------


class BasicSampling(SamplingFunction):
    """BTK's "basic" sampling: one bright galaxy plus fainter companions, packed at constant
    density.

    - n ~ U{min_number..max_number} galaxies (min_number >= 1).
    - Every galaxy has a size ``hypot(a_d, a_b)`` in (0.2, 2] arcsec.
    - The first is bright: mag <= ``bright_mag`` (24).
    - The n - 1 others come, for the whole blend, from mag <= ``max_mag`` (25.3) with probability
      0.9 and from mag < ``faint_mag`` (28) with probability 0.1.
    - Shifts are uniform in +/- stamp_size / 30 * sqrt(n) arcsec (constant number density). BTK's
      docstring says "N is the number of objects in the blend"; its code used n - 1 (a lone
      galaxy was always centered). btkjax follows the documented n.

    Requires the CatSim columns ``a_d`` and ``a_b``.
    """

    def __init__(
        self,
        stamp_size: float = 24.0,
        max_number: int = 4,
        min_number: int = 1,
        mag_name: str = "ref_mag",
        seed: int = DEFAULT_SEED,
        bright_mag: float = 24.0,
        max_mag: float = 25.3,
        faint_mag: float = 28.0,
        faint_probability: float = 0.1,
    ):
        super().__init__(max_number=max_number, min_number=min_number, stamp_size=stamp_size, seed=seed)
        if self.min_number < 1:
            raise ValueError(
                f"BasicSampling always adds 1 bright galaxy, so min_number must be >= 1, got "
                f"{self.min_number}."
            )
        limit = self.stamp_size / 30.0 * math.sqrt(self.max_number)
        if limit > self.stamp_size / 2.0:
            raise ValueError(
                f"BasicSampling shifts reach stamp_size / 30 * sqrt(max_number) = {limit} arcsec, "
                f"beyond stamp_size / 2 = {self.stamp_size / 2} arcsec: max_number = "
                f"{self.max_number} must be <= 225."
            )
        if not 0.0 <= faint_probability <= 1.0:
            raise ValueError(f"faint_probability must be in [0, 1], got {faint_probability}.")
        self.mag_name = mag_name
        self.bright_mag, self.max_mag, self.faint_mag = bright_mag, max_mag, faint_mag
        self.faint_probability = float(faint_probability)

    @property
    def compatible_catalogs(self):
        return ("CatsimCatalog",)

    def __call__(self, table: Table) -> Table:
        missing = [c for c in ("a_d", "a_b") if c not in table.colnames]
        if missing:
            raise ValueError(f"BasicSampling needs the CatSim size columns {missing}.")
        col = resolve_mag_name(table, self.mag_name)
        mag = np.asarray(table[col], dtype=float)
        a = np.hypot(np.asarray(table["a_d"], float), np.asarray(table["a_b"], float))
        size_ok = (a > 0.2) & (a <= 2.0)

        def rows_for(cond, what):
            rows = np.flatnonzero(size_ok & cond)
            if rows.size == 0:
                raise ValueError(
                    f"BasicSampling: no galaxy with 0.2 < hypot(a_d, a_b) <= 2 arcsec and {what}; "
                    f"the catalog's {col} range is [{mag.min():.4g}, {mag.max():.4g}]."
                )
            return rows

        n = int(self.rng.integers(self.min_number, self.max_number + 1))
        bright = rows_for(mag <= self.bright_mag, f"{col} <= {self.bright_mag}")
        if self.rng.random() < self.faint_probability:
            others = rows_for(mag < self.faint_mag, f"{col} < {self.faint_mag}")
        else:
            others = rows_for(mag <= self.max_mag, f"{col} <= {self.max_mag}")
        first = self.rng.choice(bright, size=1)
        rows = np.concatenate([first, self.rng.choice(others, size=n - 1)])
        shift = self.stamp_size / 30.0 * math.sqrt(n)
        dx = self.rng.uniform(-shift, shift, size=n)
        dy = self.rng.uniform(-shift, shift, size=n)
        return _blend_table(table, rows, dx, dy)


# ------------------------------------------------------------------------------------------------
# pair sampling
# ------------------------------------------------------------------------------------------------


class PairSampling(SamplingFunction):
    """Two galaxies: a bright one (mag <= bright_cut) at the stamp center and a dim one
    (bright_cut < mag <= dim_cut) shifted uniformly in [-max_shift, max_shift] arcsec on each axis.

    ``max_number`` = ``min_number`` = 2 (BTK 1.0 declared min_number = 1 but always returned 2).
    """

    def __init__(
        self,
        stamp_size: float = 24.0,
        max_shift: float | None = None,
        mag_name: str = "ref_mag",
        seed: int = DEFAULT_SEED,
        bright_cut: float = 25.3,
        dim_cut: float = 28.0,
    ):
        super().__init__(max_number=2, min_number=2, stamp_size=stamp_size, seed=seed)
        self.max_shift = _check_max_shift(
            self.stamp_size / 10.0 if max_shift is None else max_shift, self.stamp_size
        )
        _check_mag_bounds(bright_cut, dim_cut, "bright_cut", "dim_cut")
        self.mag_name = mag_name
        self.bright_cut, self.dim_cut = float(bright_cut), float(dim_cut)

    def bright_rows(self, table: Table) -> np.ndarray:
        return magnitude_cut_rows(table, -np.inf, self.bright_cut, self.mag_name, "bright cut")

    def dim_rows(self, table: Table) -> np.ndarray:
        return magnitude_cut_rows(table, self.bright_cut, self.dim_cut, self.mag_name, "dim cut")

    def __call__(self, table: Table) -> Table:
        bright, dim = self.bright_rows(table), self.dim_rows(table)
        rows = np.array([self.rng.choice(bright), self.rng.choice(dim)])
        dx = np.array([0.0, self.rng.uniform(-self.max_shift, self.max_shift)])
        dy = np.array([0.0, self.rng.uniform(-self.max_shift, self.max_shift)])
        return _blend_table(table, rows, dx, dy)

    def jax_sampler(self, table: Table, augment: bool = False):
        return JaxPairSampler(
            bright_rows=self.bright_rows(table),
            dim_rows=self.dim_rows(table),
            max_shift=self.max_shift,
            augment=augment,
            seed=self.seed,
        )


PairSampling._jax_reference_call = PairSampling.__call__


# ------------------------------------------------------------------------------------------------
# density sampling
# ------------------------------------------------------------------------------------------------


class DensitySampling(SamplingFunction):
    """A field of galaxies at a given surface density.

    The number of galaxies is Poisson with mean ``density * (2 max_shift / 60)^2`` (density in
    galaxies per arcmin^2; the area is the square where centers may fall). Galaxies are drawn
    uniformly with replacement among ``min_mag < mag <= max_mag`` and placed uniformly in
    [-max_shift, max_shift]^2 arcsec (default max_shift = stamp_size / 2).

    A Poisson draw outside [min_number, max_number] is handled by ``on_overflow``:

    - ``"warn"`` (default, BTK's semantics made visible): clip into the range and emit a
      ``DensityOverflowWarning``; the count of clipped blends is kept in ``n_clipped``;
    - ``"clip"``: clip without warning (the caller accepts the truncated distribution);
    - ``"raise"``: raise ValueError.

    At construction a ``DensityOverflowWarning`` is also emitted if the probability that a draw
    exceeds ``max_number`` is above 1e-3, with that probability.
    """

    def __init__(
        self,
        stamp_size: float = 24.0,
        max_number: int = 40,
        min_number: int = 0,
        density: float = 185.0,
        max_shift: float | None = None,
        seed: int = DEFAULT_SEED,
        max_mag: float = 27.3,
        min_mag: float = -np.inf,
        mag_name: str = "ref_mag",
        on_overflow: str = "warn",
    ):
        super().__init__(max_number=max_number, min_number=min_number, stamp_size=stamp_size, seed=seed)
        if not (np.isfinite(density) and density >= 0):
            raise ValueError(f"density must be >= 0 galaxies / arcmin^2, got {density}.")
        if on_overflow not in ("warn", "clip", "raise"):
            raise ValueError(f"on_overflow must be 'warn', 'clip' or 'raise', got {on_overflow!r}.")
        # BTK used `max_shift if max_shift else stamp/2`: a max_shift of 0 meant the default.
        self.max_shift = _check_max_shift(
            self.stamp_size / 2.0 if not max_shift else max_shift, self.stamp_size
        )
        _check_mag_bounds(min_mag, max_mag)
        self.min_mag, self.max_mag = float(min_mag), float(max_mag)
        self.mag_name = mag_name
        self.density = float(density)
        self.on_overflow = on_overflow
        self.exp_count = self.density * (2.0 * self.max_shift / 60.0) ** 2
        self.n_clipped = 0
        p_over = self.overflow_probability
        if p_over > 1e-3 and on_overflow == "warn":
            warnings.warn(
                f"DensitySampling: with mean {self.exp_count:.3g} galaxies per blend, a fraction "
                f"{p_over:.3g} of Poisson draws exceed max_number = {self.max_number} and will be "
                "clipped; increase max_number to keep the Poisson distribution.",
                DensityOverflowWarning,
                stacklevel=2,
            )

    @property
    def overflow_probability(self) -> float:
        """P(Poisson(exp_count) > max_number)."""
        from scipy.stats import poisson

        return float(poisson.sf(self.max_number, self.exp_count))

    def eligible_rows(self, table: Table) -> np.ndarray:
        return magnitude_cut_rows(table, self.min_mag, self.max_mag, self.mag_name)

    def __call__(self, table: Table) -> Table:
        rows_ok = self.eligible_rows(table)
        drawn = int(self.rng.poisson(self.exp_count))
        n = min(max(drawn, self.min_number), self.max_number)
        if n != drawn:
            msg = (
                f"DensitySampling drew {drawn} galaxies (Poisson mean {self.exp_count:.3g}), "
                f"outside [min_number, max_number] = [{self.min_number}, {self.max_number}]"
            )
            if self.on_overflow == "raise":
                raise ValueError(msg + "; increase max_number or pass on_overflow='warn'/'clip'.")
            self.n_clipped += 1
            if self.on_overflow == "warn":
                warnings.warn(msg + f"; clipped to {n}.", DensityOverflowWarning, stacklevel=2)
        rows = self.rng.choice(rows_ok, size=n)
        dx = self.rng.uniform(-self.max_shift, self.max_shift, size=n)
        dy = self.rng.uniform(-self.max_shift, self.max_shift, size=n)
        return _blend_table(table, rows, dx, dy)

    def jax_sampler(self, table: Table, augment: bool = False):
        return JaxDensitySampler(
            eligible_rows=self.eligible_rows(table),
            max_number=self.max_number,
            min_number=self.min_number,
            exp_count=self.exp_count,
            max_shift=self.max_shift,
            on_overflow=self.on_overflow,
            augment=augment,
            seed=self.seed,
        )


DensitySampling._jax_reference_call = DensitySampling.__call__


# ------------------------------------------------------------------------------------------------
# samplers using the catalog's sky positions
# ------------------------------------------------------------------------------------------------


class RandomSquareSampling(SamplingFunction):
    """A random square of side ``stamp_size`` cut from the catalog's sky: every galaxy passing the
    magnitude cut whose position (ra, dec in degrees in the catalog) falls inside it.

    The square's center is uniform over the positions where the square fits inside the catalog's
    bounding box (ra unwrapped across 0/360, projected with cos(dec) of the catalog's center).
    Returned ra/dec are offsets from the square's center in arcsec on the tangent plane. The
    number of galaxies may be 0 (min_number is 0). More than ``max_number`` raises ValueError.
    """

    def __init__(
        self,
        stamp_size: float = 24.0,
        max_number: int = 2,
        seed: int = DEFAULT_SEED,
        max_mag: float = 25.3,
        min_mag: float = -np.inf,
        mag_name: str = "ref_mag",
    ):
        super().__init__(max_number=max_number, min_number=0, stamp_size=stamp_size, seed=seed)
        _check_mag_bounds(min_mag, max_mag)
        self.min_mag, self.max_mag = float(min_mag), float(max_mag)
        self.mag_name = mag_name

    @property
    def compatible_catalogs(self):
        return ("CatsimCatalog",)

    def __call__(self, table: Table) -> Table:
        rows_ok = magnitude_cut_rows(table, self.min_mag, self.max_mag, self.mag_name)
        ra_all = _unwrapped_ra(np.asarray(table["ra"], float))
        dec_all = np.asarray(table["dec"], float)
        ra, dec = ra_all[rows_ok], dec_all[rows_ok]
        dec0 = 0.5 * (dec.min() + dec.max())
        cosd = math.cos(math.radians(dec0))
        half = self.stamp_size / 2.0 / _ARCSEC_PER_DEG  # degrees on the sky
        ra_span = (ra.max() - ra.min()) * cosd
        dec_span = dec.max() - dec.min()
        if 2 * half > min(ra_span, dec_span):
            raise ValueError(
                f"RandomSquareSampling: stamp_size = {self.stamp_size} arcsec exceeds the extent "
                f"of the catalog's galaxies passing the cut ({ra_span * 3600:.4g} x "
                f"{dec_span * 3600:.4g} arcsec)."
            )
        ra_c = self.rng.uniform(ra.min() + half / cosd, ra.max() - half / cosd)
        dec_c = self.rng.uniform(dec.min() + half, dec.max() - half)
        dx, dy = _sky_offsets_arcsec(ra, dec, ra_c, dec_c)
        inside = (np.abs(dx) < self.stamp_size / 2.0) & (np.abs(dy) < self.stamp_size / 2.0)
        if inside.sum() > self.max_number:
            raise ValueError(
                f"RandomSquareSampling found {int(inside.sum())} galaxies in a square of "
                f"{self.stamp_size} arcsec, more than max_number = {self.max_number}; decrease "
                "stamp_size or increase max_number."
            )
        return _blend_table(table, rows_ok[inside], dx[inside], dy[inside])


class FriendsOfFriendsSampling(SamplingFunction):
    """A random friends-of-friends group of the catalog's galaxies (BTK's FriendsOfFriendsSampling,
    with scipy's cKDTree + connected components instead of fast3tree).

    Galaxies are linked when closer than ``link_distance`` arcsec on the sky; groups are the
    connected components over the full catalog (read from a ``friends_of_friends_id`` column if
    the table has one, else computed once per table object and cached in the sampler; BTK wrote
    the column into the catalog table). A group with min_number..max_number members after
    the magnitude cut is chosen uniformly; offsets are from the group's mean position, in arcsec.
    ValueError if no group qualifies or the chosen group does not fit in the stamp.
    """

    def __init__(
        self,
        stamp_size: float = 24.0,
        max_number: int = 10,
        min_number: int = 2,
        link_distance: float = 2.5,
        seed: int = DEFAULT_SEED,
        min_mag: float = -np.inf,
        max_mag: float = 25.3,
        mag_name: str = "ref_mag",
    ):
        super().__init__(max_number=max_number, min_number=min_number, stamp_size=stamp_size, seed=seed)
        if not link_distance > 0:
            raise ValueError(f"link_distance must be > 0 arcsec, got {link_distance}.")
        _check_mag_bounds(min_mag, max_mag)
        self.link_distance = float(link_distance)
        self.min_mag, self.max_mag = float(min_mag), float(max_mag)
        self.mag_name = mag_name
        self._cache = None

    @property
    def compatible_catalogs(self):
        return ("CatsimCatalog",)

    def group_ids(self, table: Table) -> np.ndarray:
        """Friends-of-friends group id of every row of ``table`` (linking on the unit sphere)."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        ra = np.radians(np.asarray(table["ra"], float))
        dec = np.radians(np.asarray(table["dec"], float))
        xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)
        chord = 2.0 * math.sin(math.radians(self.link_distance / _ARCSEC_PER_DEG) / 2.0)
        pairs = cKDTree(xyz).query_pairs(chord, output_type="ndarray")
        n = len(table)
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, labels = connected_components(graph, directed=False)
        return labels.astype(np.int64)

    def __call__(self, table: Table) -> Table:
        if "friends_of_friends_id" in table.colnames:
            all_ids = np.asarray(table["friends_of_friends_id"])
        else:
            # cached per table object (BTK added the column to the catalog table in place)
            if self._cache is None or self._cache[0] is not table:
                self._cache = (table, self.group_ids(table))
            all_ids = self._cache[1]
        rows_ok = magnitude_cut_rows(table, self.min_mag, self.max_mag, self.mag_name)
        gid = all_ids[rows_ok]
        groups, counts = np.unique(gid, return_counts=True)
        good = groups[(counts >= self.min_number) & (counts <= self.max_number)]
        if good.size == 0:
            raise ValueError(
                f"FriendsOfFriendsSampling: no group with {self.min_number}..{self.max_number} "
                f"galaxies found with link_distance = {self.link_distance} arcsec."
            )
        rows = rows_ok[gid == self.rng.choice(good)]
        ra = _unwrapped_ra(np.asarray(table["ra"], float))[rows]
        dec = np.asarray(table["dec"], float)[rows]
        dec_c = dec.mean()
        dx, dy = _sky_offsets_arcsec(ra, dec, ra.mean(), dec_c)
        if np.ptp(dx) > self.stamp_size or np.ptp(dy) > self.stamp_size:
            raise ValueError(
                f"FriendsOfFriendsSampling: the sampled group spans {np.ptp(dx):.3g} x "
                f"{np.ptp(dy):.3g} arcsec, more than stamp_size = {self.stamp_size}; increase "
                "stamp_size or decrease max_number or link_distance."
            )
        return _blend_table(table, rows, dx, dy)
