"""Matching true galaxies to detections.

A matcher is called on one blend, ``matcher(true_table, detected_table)``, and returns a
`MatchResult`: for every true galaxy the index of its detection (-1 if none) and the distance.
Matchers work on lists of blends with `match_catalogs`. Three are provided:

- `PixelHungarianMatcher` (the default of `btkjax.metrics.MetricsGenerator`): the assignment that
  minimizes the summed pixel distance between ``x_peak``, ``y_peak`` (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment``), pairs farther than ``pixel_max_sep`` dropped. It is
  one-to-one and global: unlike a greedy nearest-neighbour pass it does not let one detection
  steal another's only partner.
- `SkyClosestNeighbourMatcher`: each true galaxy takes its nearest detection on the sky (``ra``,
  ``dec`` in arcsec) within ``arcsec_max_sep``; a detection claimed by several true galaxies
  stays with the closest (BTK's rule), the others go unmatched.
- `IdentityMatcher`: row i with row i (catalogs already aligned).

Any callable ``f(true_table, detected_table) -> (true_indices, detected_indices)`` works too; wrap
it with `as_matcher`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from astropy.table import Table
from scipy.optimize import linear_sum_assignment

__all__ = [
    "MatchResult",
    "Matcher",
    "PixelHungarianMatcher",
    "SkyClosestNeighbourMatcher",
    "IdentityMatcher",
    "as_matcher",
    "match_catalogs",
    "pixel_distance_matrix",
    "sky_distance_matrix",
]


class MatchResult(NamedTuple):
    """Matching of one blend.

    Attributes:
        match_detected_id: [n_true] int, the detected row matched to each true galaxy, or -1.
        dist: [n_true] distance of each match (pixels or arcsec, per the matcher; 0 if none).
        n_detected: number of detections in the blend.
    """

    match_detected_id: np.ndarray
    dist: np.ndarray
    n_detected: int

    @property
    def n_true(self) -> int:
        return len(self.match_detected_id)

    @property
    def n_matched(self) -> int:
        return int(np.sum(self.match_detected_id >= 0))

    def to_table(self) -> Table:
        """BTK's per-blend match table: one row per true galaxy, ``match_detected_id``, ``dist``."""
        return Table({"match_detected_id": np.asarray(self.match_detected_id, dtype=int),
                      "dist": np.asarray(self.dist, dtype=float)})


def _columns(table, names, role):
    missing = [n for n in names if n not in table.colnames]
    if missing:
        raise KeyError(f"The {role} catalog has no column(s) {missing}; it has {table.colnames}.")
    return [np.asarray(table[n], dtype=float) for n in names]


def pixel_distance_matrix(true_table: Table, detected_table: Table) -> np.ndarray:
    """[n_true, n_detected] Euclidean distances in pixels between ``x_peak``, ``y_peak``."""
    x1, y1 = _columns(true_table, ("x_peak", "y_peak"), "true")
    x2, y2 = _columns(detected_table, ("x_peak", "y_peak"), "detected")
    return np.hypot(x1[:, None] - x2[None, :], y1[:, None] - y2[None, :])


def _wrap_arcsec(delta):
    # ra offsets may come wrapped to [0, 360) degrees (astropy's pixel_to_world_values).
    full = 360.0 * 3600.0
    return (delta + full / 2) % full - full / 2


def sky_distance_matrix(true_table: Table, detected_table: Table) -> np.ndarray:
    """[n_true, n_detected] separations in arcsec between ``ra``, ``dec`` (arcsec offsets; the
    small-angle flat-sky distance, exact to ~1e-9 relative on a stamp)."""
    ra1, dec1 = _columns(true_table, ("ra", "dec"), "true")
    ra2, dec2 = _columns(detected_table, ("ra", "dec"), "detected")
    cos_dec = np.cos(np.deg2rad(0.5 * (dec1[:, None] + dec2[None, :]) / 3600.0))
    dra = _wrap_arcsec(ra1[:, None] - ra2[None, :]) * cos_dec
    return np.hypot(dra, dec1[:, None] - dec2[None, :])


class Matcher:
    """Base class: subclasses implement ``match_indices(true, detected) -> (ti, di, dist)``."""

    def match_indices(self, true_table: Table, detected_table: Table):  # pragma: no cover
        raise NotImplementedError(
            f"{type(self).__name__} must implement match_indices(true_table, detected_table) "
            f"-> (true indices, detected indices, distances); Matcher is a base class.")

    def __call__(self, true_table: Table, detected_table: Table) -> MatchResult:
        n_true, n_det = len(true_table), len(detected_table)
        match = np.full(n_true, -1, dtype=int)
        dist = np.zeros(n_true)
        if n_true and n_det:
            ti, di, d = self.match_indices(true_table, detected_table)
            ti, di = np.asarray(ti, dtype=int), np.asarray(di, dtype=int)
            if len(ti) != len(di):
                raise ValueError(
                    f"{type(self).__name__} returned {len(ti)} true and {len(di)} detected "
                    "indices; they must pair up one to one."
                )
            if len(set(di.tolist())) != len(di) or len(set(ti.tolist())) != len(ti):
                raise ValueError(f"{type(self).__name__} matched an object twice.")
            match[ti] = di
            dist[ti] = np.asarray(d, dtype=float) if d is not None else 0.0
        return MatchResult(match, dist, n_det)


class PixelHungarianMatcher(Matcher):
    """Optimal one-to-one matching on pixel distance, pairs beyond ``pixel_max_sep`` dropped.

    Args:
        pixel_max_sep: largest distance in pixels for a match (inclusive; BTK's default 5).
    """

    def __init__(self, pixel_max_sep: float = 5.0):
        if not pixel_max_sep > 0:
            raise ValueError(f"pixel_max_sep must be positive, got {pixel_max_sep!r}.")
        self.max_sep = float(pixel_max_sep)

    def match_indices(self, true_table, detected_table):
        dist = pixel_distance_matrix(true_table, detected_table)
        # Pairs that may not match cost more than any admissible assignment can save, so the
        # optimum over admissible pairs is found first (a plain assignment followed by a cut could
        # trade an admissible pair for an inadmissible one).
        big = self.max_sep * (min(dist.shape) + 1) + 1.0
        cost = np.where(dist <= self.max_sep, dist, big)
        ti, di = linear_sum_assignment(cost)
        keep = dist[ti, di] <= self.max_sep
        return ti[keep], di[keep], dist[ti[keep], di[keep]]

    def __repr__(self):
        return f"PixelHungarianMatcher(pixel_max_sep={self.max_sep})"


class SkyClosestNeighbourMatcher(Matcher):
    """Nearest detection on the sky, within ``arcsec_max_sep``; ties resolved by distance.

    Args:
        arcsec_max_sep: largest separation in arcsec for a match (inclusive; BTK's default 2).
    """

    def __init__(self, arcsec_max_sep: float = 2.0):
        if not arcsec_max_sep > 0:
            raise ValueError(f"arcsec_max_sep must be positive, got {arcsec_max_sep!r}.")
        self.max_sep = float(arcsec_max_sep)

    def match_indices(self, true_table, detected_table):
        dist = sky_distance_matrix(true_table, detected_table)
        nearest = np.argmin(dist, axis=1)
        d_near = dist[np.arange(len(nearest)), nearest]
        ti, di = [], []
        for det in np.unique(nearest):
            claimants = np.where((nearest == det) & (d_near <= self.max_sep))[0]
            if claimants.size:
                winner = claimants[np.argmin(d_near[claimants])]
                ti.append(winner)
                di.append(det)
        ti, di = np.asarray(ti, dtype=int), np.asarray(di, dtype=int)
        return ti, di, dist[ti, di]

    def __repr__(self):
        return f"SkyClosestNeighbourMatcher(arcsec_max_sep={self.max_sep})"


class IdentityMatcher(Matcher):
    """Row i of the true catalog with row i of the detections (same lengths required)."""

    def match_indices(self, true_table, detected_table):
        if len(true_table) != len(detected_table):
            raise ValueError(
                f"IdentityMatcher needs catalogs of equal length, got {len(true_table)} true and "
                f"{len(detected_table)} detected rows."
            )
        idx = np.arange(len(true_table))
        return idx, idx, None


class _FunctionMatcher(Matcher):
    def __init__(self, function: Callable):
        self.function = function

    def match_indices(self, true_table, detected_table):
        out = self.function(true_table, detected_table)
        if not (isinstance(out, tuple) and len(out) in (2, 3)):
            name = getattr(self.function, "__name__", repr(self.function))
            raise TypeError(
                f"Match function {name} must return (true_indices, detected_indices[, dist]), "
                f"got {type(out).__name__}."
            )
        return out if len(out) == 3 else (out[0], out[1], None)


def as_matcher(match_function) -> Matcher:
    """A `Matcher` from a matcher, a callable ``f(true, detected) -> (ti, di[, dist])``, or
    None (the default `PixelHungarianMatcher`)."""
    if match_function is None:
        return PixelHungarianMatcher()
    if isinstance(match_function, Matcher):
        return match_function
    if callable(match_function):
        return _FunctionMatcher(match_function)
    raise TypeError(
        f"match_function must be a btkjax.match.Matcher or a callable, got "
        f"{type(match_function).__name__}."
    )


def match_catalogs(true_catalogs, detected_catalogs, matcher=None) -> list[MatchResult]:
    """Matches every blend: lists of true and detected tables -> list of `MatchResult`."""
    matcher = as_matcher(matcher)
    if len(true_catalogs) != len(detected_catalogs):
        raise ValueError(
            f"{len(true_catalogs)} true catalogs but {len(detected_catalogs)} detected ones."
        )
    return [matcher(t, d) for t, d in zip(true_catalogs, detected_catalogs, strict=True)]
