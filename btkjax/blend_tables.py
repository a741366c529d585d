"""From the tables a sampling function returns to the rows the renderer draws (interface side).

BTK draws every row of a blend table as it is: a sampling function may return catalog rows
unchanged (``table[rows]``), or edit them (brighter magnitudes for an SNR study, larger disks,
rotated position angles), or build rows that never were in the catalog. btkjax draws each row
from the values the table holds, with a fast path for the common case:

- a row with a ``btk_index`` (kept by ``table[rows]``, since the standardized catalog table has
  one) whose drawing columns all equal, exactly, the catalog's at that row is drawn from the
  catalog's precomputed arrays (index = ``btk_index``);
- any other row (edited values, no ``btk_index``) is "edited": its drawing columns (those absent
  from the table are taken from the catalog row at ``btk_index``) are validated like catalog rows,
  and it is drawn from them, at index ``first_free + k`` past the catalog's rows, where the
  generator writes its arrays.

The comparison touches only the drawing columns of at most ``batch_size * max_number`` rows.
Every bad value (non-finite or non-numeric position, too many rows, a magnitude sentinel...)
raises a ValueError naming the blend, the column and the value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from btkjax.catalog import CATSIM_SHAPE_COLUMNS, magnitude_problems
from btkjax.core.samplers import Blends
from btkjax.core.sources import CatalogArrays
from btkjax.galaxies import catsim_arrays

__all__ = ["TableRows", "EditedRows", "rows_from_tables", "blends_from_tables", "extend_rows"]

_POSITION_COLUMNS = ("ra", "dec")
_OPTIONAL_COLUMNS = ("btk_rotation", "g1", "g2")


class TableRows(NamedTuple):
    """A batch of blend tables as the renderer's input.

    Attributes:
        blends: host ``Blends``; ``index`` is the catalog row for unedited rows and
            ``first_free + k`` for the k-th edited row.
        edited: the edited rows' drawing columns (a Table of ``n_edited`` rows, in index order),
            or None when every row is a catalog row.
        source: [n_edited] the catalog row (``btk_index``) each edited row came from, -1 where
            the table had no ``btk_index``.
    """

    blends: Blends
    edited: Table | None
    source: np.ndarray

    @property
    def n_edited(self) -> int:
        return 0 if self.edited is None else len(self.edited)


def extend_rows(a, n_rows: int):
    """`a` (numpy or JAX) with `n_rows` more rows along axis 0, copies of row 0: the room a
    generator keeps for edited rows (harmless until overwritten)."""
    if isinstance(a, np.ndarray) or not hasattr(a, "at"):
        a = np.asarray(a)
        return np.concatenate([a, np.repeat(a[:1], n_rows, axis=0)])
    return jnp.concatenate([a, jnp.repeat(a[:1], n_rows, axis=0)])


def _blend_name(blend_ids, b: int) -> str:
    return f"blend {int(blend_ids[b])}" if blend_ids is not None else f"blend table {b}"


def _numbers(table, col: str, where: str) -> np.ndarray:
    values = np.asarray(table[col])
    if values.dtype.kind not in "biuf":
        raise ValueError(
            f"The sampling function's {where} has a column '{col}' of {values.dtype} values "
            f"({values[:3].tolist()}...); expected numbers."
        )
    return values


def _check_finite(table, col: str, where: str, what: str) -> np.ndarray:
    values = _numbers(table, col, where).astype(float)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(
            f"The sampling function's {where} has non-finite '{col}' at rows {bad.tolist()}: "
            f"{values[bad].tolist()}; expected {what}."
        )
    return values


def rows_from_tables(
    tables: Sequence[Table],
    catalog_table: Table,
    max_number: int,
    columns: Sequence[str],
    row_problems: Callable[[Table], list[str]] | None = None,
    first_free: int | None = None,
    blend_ids=None,
    require_index: bool = False,
) -> TableRows:
    """The renderer's rows for a batch of blend tables (see the module docstring).

    Args:
        tables: one astropy Table per blend, as the sampling function returned them.
        catalog_table: the catalog's standardized table (with its ``btk_index``).
        max_number: slots per blend.
        columns: the columns a galaxy is drawn from (shapes and band magnitudes).
        row_problems: ``f(table) -> list of problems`` validating drawing columns (the catalog's
            ``row_problems``); run on edited tables only.
        first_free: index of the first edited row (default: the catalog's length).
        blend_ids: global blend ids, for error messages.
        require_index: every table must have ``btk_index`` (catalogs whose galaxies are drawn
            from their catalog row, such as COSMOS images).

    Returns:
        `TableRows`.
    """
    n_catalog = len(catalog_table)
    first_free = n_catalog if first_free is None else int(first_free)
    columns = list(dict.fromkeys(columns))
    catalog_columns = {c: np.asarray(catalog_table[c]) for c in columns}
    index_list, edited_parts, sources = [], {c: [] for c in columns}, []
    checked = []  # (where, drawing columns) of the tables with edited rows
    n_edited = 0
    for b, table in enumerate(tables):
        where = f"table for {_blend_name(blend_ids, b)}"
        if not isinstance(table, Table):
            raise TypeError(
                f"The sampling function returned a {type(table).__name__} for "
                f"{_blend_name(blend_ids, b)}; expected an astropy Table (one row per galaxy)."
            )
        k = len(table)
        if k > max_number:
            raise ValueError(
                f"The sampling function returned {k} galaxies for {_blend_name(blend_ids, b)}, "
                f"more than its max_number={max_number}."
            )
        missing = [c for c in _POSITION_COLUMNS if c not in table.colnames]
        if missing:
            raise ValueError(
                f"The sampling function's {where} lacks column(s) {missing}; it must set ra, dec "
                "(arcsec from the stamp center)."
            )
        for col in _POSITION_COLUMNS:
            _check_finite(table, col, where, "offsets in arcsec from the stamp center")
        for col in _OPTIONAL_COLUMNS:
            if col in table.colnames:
                _check_finite(table, col, where, "finite numbers")
        source = None
        if "btk_index" in table.colnames:
            source = _numbers(table, "btk_index", where)
            if source.dtype.kind == "f" and not np.array_equal(source, np.round(source)):
                raise ValueError(
                    f"The sampling function's {where} has non-integer 'btk_index' values "
                    f"{source.tolist()}; expected catalog rows."
                )
            source = source.astype(np.int64)
            if k and (source.min() < 0 or source.max() >= n_catalog):
                raise ValueError(
                    f"The sampling function's {where} has 'btk_index' values {source.tolist()} "
                    f"outside the catalog's rows [0, {n_catalog})."
                )
        if require_index and source is None:
            raise ValueError(
                f"The sampling function's {where} has no 'btk_index': this catalog's galaxies are "
                "drawn from their catalog row (keep the column: table[rows] keeps it)."
            )
        absent = [c for c in columns if c not in table.colnames]
        if absent and source is None:
            raise ValueError(
                f"The sampling function's {where} lacks the column(s) {absent} its galaxies are "
                "drawn from, and has no 'btk_index' to take them from the catalog."
            )
        unchanged = np.ones(k, bool) if source is not None else np.zeros(k, bool)
        values = {}
        for col in columns:
            if col in table.colnames:
                values[col] = _numbers(table, col, where)
                if source is not None:
                    unchanged &= values[col] == catalog_columns[col][source]
            else:
                values[col] = catalog_columns[col][source]
        index = source.copy() if source is not None else np.zeros(k, np.int64)
        if not unchanged.all():
            checked.append((where, values))
            edited = np.flatnonzero(~unchanged)
            index[edited] = first_free + n_edited + np.arange(len(edited))
            n_edited += len(edited)
            sources.append(source[edited] if source is not None else np.full(len(edited), -1))
            for col in columns:
                edited_parts[col].append(np.asarray(values[col])[edited])
        index_list.append(index)
    blends = blends_from_tables(tables, max_number, rows=index_list)
    edited_table = None
    if n_edited:
        edited_table = Table({c: np.concatenate(v) for c, v in edited_parts.items()}, copy=False)
        # validated at once; on a problem, table by table to name the blend and its rows
        if row_problems is not None and row_problems(edited_table):
            for where, values in checked:
                problems = row_problems(Table(values, copy=False))
                if problems:
                    raise ValueError(
                        f"The sampling function's {where} has rows that cannot be drawn: "
                        + "; ".join(problems) + "."
                    )
    source = np.concatenate(sources).astype(np.int64) if sources else np.zeros(0, np.int64)
    return TableRows(blends=blends, edited=edited_table, source=source)


class EditedRows:
    """Generator methods that draw the rows host sampling functions return (a mixin of
    `btkjax.generator.DrawBlendsGenerator`, which provides ``catalog``, ``surveys``,
    ``_mag_column``, ``arrays``/``arrays_device`` (`CatalogArrays`), ``dtype``, ``max_number``,
    ``_states`` (per survey: ``reserve_rows``, ``set_rows``, ``row_extent``), ``_n_catalog`` and
    ``_source_rows``).

    The generator keeps ``batch_size * max_number`` rows past the catalog's in its arrays and
    fluxes (`_reserve_rows`); each batch's edited rows are written there (`_set_rows`) and the
    blends index them, so that the compiled programs see the same shapes every batch.
    """

    drawn_shape_columns = CATSIM_SHAPE_COLUMNS
    rows_need_index = False  # galaxies drawn from their columns: btk_index is optional

    def _drawn_columns(self) -> list[str]:
        """The columns each galaxy is drawn from: its shapes and its band magnitudes."""
        cols = list(self.drawn_shape_columns)
        for s in self.surveys:
            cols += [self._mag_column(s).format(band=b, survey=s.name)
                     for b in s.available_filters]
        return cols

    def _row_problems(self, table) -> list[str]:
        """Why rows (their drawing columns) cannot be drawn: the catalog's checks, and every
        magnitude column of the surveys within MAGNITUDE_RANGE."""
        problems = self.catalog.row_problems(table)
        mags = [c for c in self._drawn_columns() if c not in self.drawn_shape_columns]
        return problems + [p for p in magnitude_problems(table, mags) if p not in problems]

    def _rows_arrays(self, rows) -> CatalogArrays:
        """`CatalogArrays` of the edited rows of a `btkjax.blend_tables.TableRows`, from their
        columns."""
        return catsim_arrays(rows.edited)

    def _rows_extent(self, state, rows):
        """Extents of the edited rows in a survey (None: computed from their arrays)."""
        return None

    def _set_rows(self, rows, start: int):
        """Writes the edited rows of `rows` (`TableRows`) at `start`...: arrays and, per survey,
        fluxes and extents."""
        stop = start + rows.n_edited
        arrays = self._rows_arrays(rows)
        for host, new in zip(self.arrays, arrays, strict=True):
            host[start:stop] = new
        self.arrays_device = CatalogArrays(*[
            d.at[start:stop].set(jnp.asarray(new, self.dtype))
            for d, new in zip(self.arrays_device, arrays, strict=True)])
        self._source_rows[start:stop] = rows.source
        for state in self._states.values():
            state.set_rows(start, rows.edited, self._rows_extent(state, rows), arrays)

    def _reserve_rows(self, n_rows: int):
        self.arrays = CatalogArrays(*[extend_rows(a, n_rows) for a in self.arrays])
        self.arrays_device = CatalogArrays(*[jnp.asarray(a, self.dtype) for a in self.arrays])
        for state in self._states.values():
            state.reserve_rows(n_rows)

    def _host_blends(self, tables, blend_ids) -> Blends:
        """The sampling function's tables as `Blends`; edited rows (see
        `btkjax.blend_tables`) written past the catalog's rows, where the renderer reads them."""
        rows = rows_from_tables(tables, self.catalog.table, self.max_number,
                                self._drawn_columns(), self._row_problems,
                                self._n_catalog, blend_ids, require_index=self.rows_need_index)
        if rows.n_edited:
            self._set_rows(rows, self._n_catalog)
        return rows.blends


def blends_from_tables(
    tables: Sequence[Table], max_number: int, catalog_size: int | None = None, rows=None
) -> Blends:
    """Converts blend tables from a table sampler into padded numpy ``Blends`` (on the host).

    Reads ``btk_index`` (catalog row), ``ra`` -> ``dx``, ``dec`` -> ``dy`` (arcsec), and optional
    ``btk_rotation``, ``g1``, ``g2`` (0 when absent). Index is int32, mask bool, the rest float64.

    Raises ValueError, naming the blend, if a table has more rows than ``max_number``, lacks
    ``ra``/``dec``/``btk_index``, or (when ``catalog_size`` is given) has a ``btk_index`` outside
    [0, catalog_size).

    ``rows`` (one int array per table) gives each row's index instead of ``btk_index`` (as
    :func:`rows_from_tables` does, mapping edited rows past the catalog's).
    """
    max_number = int(max_number)
    if max_number < 1:
        raise ValueError(f"max_number must be >= 1, got {max_number}.")
    tables = list(tables)
    n = len(tables)
    index = np.zeros((n, max_number), dtype=np.int32)
    mask = np.zeros((n, max_number), dtype=bool)
    out = {name: np.zeros((n, max_number)) for name in ("dx", "dy", "rotation", "g1", "g2")}
    for b, table in enumerate(tables):
        missing = [c for c in ("ra", "dec") if c not in table.colnames]
        if missing:
            raise ValueError(
                f"Blend table {b} lacks column(s) {missing}: a sampling function must return "
                "'ra' and 'dec' offsets from the stamp center in arcsec."
            )
        if rows is None and "btk_index" not in table.colnames:
            raise ValueError(
                f"Blend table {b} lacks the 'btk_index' column (each row's position in the "
                "catalog table): keep it from the catalog table, or add it, e.g. "
                "table[rows] followed by out['btk_index'] = rows."
            )
        k = len(table)
        if k > max_number:
            raise ValueError(
                f"Blend table {b} has {k} rows, more than max_number = {max_number}: the "
                "sampling function returned too many galaxies."
            )
        if rows is not None:
            index[b, :k] = np.asarray(rows[b], dtype=np.int64)
        else:
            given = np.asarray(table["btk_index"], dtype=np.int64)
            if catalog_size is not None and k and (given.min() < 0 or given.max() >= catalog_size):
                raise ValueError(
                    f"Blend table {b} has btk_index values {given.tolist()} outside the "
                    f"catalog's rows [0, {catalog_size})."
                )
            index[b, :k] = given
        mask[b, :k] = True
        out["dx"][b, :k] = np.asarray(table["ra"], dtype=float)
        out["dy"][b, :k] = np.asarray(table["dec"], dtype=float)
        for col, name in (("btk_rotation", "rotation"), ("g1", "g1"), ("g2", "g2")):
            if col in table.colnames:
                out[name][b, :k] = np.asarray(table[col], dtype=float)
    return Blends(index=index, mask=mask, **out)
