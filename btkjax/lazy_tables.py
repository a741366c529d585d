"""``blend_list`` built lazily: a list whose tables are made on first access.

A generator's batch holds one astropy Table per blend. Building them costs ~1.5 ms per blend
(astropy's per-table column copies), more than drawing the blend on an accelerator, so
`LazyBlendList` keeps the batch's arrays and builds the tables only when they are read: item
``i`` alone on ``blend_list[i]`` (from one vectorized table of the batch, built once), all of
them on anything else (iteration, comparison, slicing, pickling). It is a ``list`` (code that
checks ``isinstance(x, list)`` keeps working) and its items are the same tables as an eager
list's.
"""

from __future__ import annotations

import operator

import numpy as np
from astropy.table import Table, vstack

__all__ = ["LazyBlendList", "lazy_blend_list"]


class LazyBlendList(list):
    """A list of `n` blend tables made by ``build()`` -> ``(table, starts, stops)`` on first
    access: item i is ``table[starts[i]:stops[i]]``.

    Length needs no build. Once every item is built it is a plain list in all but name.
    """

    def __init__(self, n: int, build):
        super().__init__()
        self._n = int(n)
        self._build = build
        self._big = None
        self._items = {}
        self._loaded = False

    # -- building ---------------------------------------------------------------------------

    def _table(self):
        if self._big is None:
            self._big = self._build()
        return self._big

    def _item(self, i: int):
        if i not in self._items:
            big, starts, stops = self._table()
            self._items[i] = big[int(starts[i]):int(stops[i])]
        return self._items[i]

    def _load(self):
        if not self._loaded:
            items = [self._item(i) for i in range(self._n)]
            super().extend(items)
            self._loaded = True
            self._items = {}
            self._big = self._build = None
        return self

    @property
    def state(self) -> str:
        """"unbuilt" (no table made), "partial" (some items made by indexing) or "built"."""
        if self._loaded:
            return "built"
        return "partial" if self._big is not None else "unbuilt"

    # -- read access --------------------------------------------------------------------------

    def __len__(self):
        return self._n if not self._loaded else super().__len__()

    def __getitem__(self, i):
        if not self._loaded and not isinstance(i, slice):
            j = operator.index(i)
            if j < 0:
                j += self._n
            if not 0 <= j < self._n:
                raise IndexError(f"blend_list index {i} out of range for {self._n} blends.")
            return self._item(j)
        self._load()
        out = super().__getitem__(i)
        return list(out) if isinstance(i, slice) else out

    def __iter__(self):
        return super(LazyBlendList, self._load()).__iter__()

    def __reversed__(self):
        return super(LazyBlendList, self._load()).__reversed__()

    def __contains__(self, x):
        return super(LazyBlendList, self._load()).__contains__(x)

    def __eq__(self, other):
        self._load()
        if isinstance(other, LazyBlendList):
            other._load()
        return list.__eq__(self, other)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None

    def __repr__(self):
        if not self._loaded:
            return f"<LazyBlendList of {self._n} blend tables (built on access)>"
        return super().__repr__()

    def __add__(self, other):
        return list(self._load()) + list(other)

    def __radd__(self, other):
        return list(other) + list(self._load())

    def __mul__(self, k):
        return list(self._load()) * k

    __rmul__ = __mul__

    def __reduce__(self):
        return (list, (list(self._load()),))

    def copy(self):
        return list(self._load())

    def index(self, *args):
        return super(LazyBlendList, self._load()).index(*args)

    def count(self, x):
        return super(LazyBlendList, self._load()).count(x)


def _mutator(name):
    method = getattr(list, name)

    def wrapped(self, *args, **kwargs):
        self._load()
        return method(self, *args, **kwargs)

    wrapped.__name__ = name
    return wrapped


for _name in ("append", "extend", "insert", "pop", "remove", "sort", "reverse", "clear",
              "__setitem__", "__delitem__", "__iadd__", "__imul__"):
    setattr(LazyBlendList, _name, _mutator(_name))


def lazy_blend_list(blends, catalog_table, tables, wcs, fluxes, bands, shear=None) -> LazyBlendList:
    """A generator's ``blend_list`` for one survey, built on first access: per blend, its
    catalog rows (or the sampling function's `tables`, stacked) with ``ra``, ``dec``,
    ``btk_index``, ``btk_rotation``, ``x_peak``, ``y_peak`` (from `wcs`) and ``{band}_flux``
    (from `fluxes` [row, band]); ``g1``, ``g2`` from a sampler's constant `shear` if given.

    The batch's arrays (and its rows' fluxes) are copied to the host now (a few small arrays);
    the tables are made from them only when read."""
    index, mask = np.asarray(blends.index), np.asarray(blends.mask)
    dx, dy = np.asarray(blends.dx), np.asarray(blends.dy)
    rotation = np.asarray(blends.rotation, dtype=float)
    counts = mask.sum(axis=1)
    stops = np.cumsum(counts)
    starts = stops - counts
    rows = index[mask]
    flux = np.asarray(fluxes)[rows]  # now: a generator may rewrite its edited rows' arrays

    def build():
        if tables is None:
            big = catalog_table[rows]
            big["ra"] = dx[mask]
            big["dec"] = dy[mask]
            big["btk_index"] = rows
            if shear is not None:
                big["g1"] = np.asarray(shear[0] + 0 * big["ra"])
                big["g2"] = np.asarray(shear[1] + 0 * big["ra"])
        else:
            big = (vstack([t for t in tables if len(t)], metadata_conflicts="silent")
                   if rows.size else Table())
        big["btk_rotation"] = rotation[mask]
        if rows.size:
            x, y = wcs.world_to_pixel_values(np.asarray(big["ra"], dtype=float) / 3600,
                                             np.asarray(big["dec"], dtype=float) / 3600)
            big["x_peak"], big["y_peak"] = x, y
            for b, band in enumerate(bands):
                big[f"{band}_flux"] = flux[:, b]
        return big, starts, stops

    return LazyBlendList(len(counts), build)
