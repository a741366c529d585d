"""Saving and loading generator results (HDF5), and small helpers.

Every batch a generator makes with ``save_path`` set is written to one HDF5 file per stage:

- ``{save_path}/blends_{batch:06d}.h5`` (`save_blend_batch`, from the draw generators);
- ``{save_path}/measure_{batch:06d}.h5`` (`save_measure_batch`, from the measure generator);
- ``{save_path}/metrics_{batch:06d}.h5`` (`save_metrics_batch`, from the metrics generator).

The files need nothing but h5py and astropy to read. Layout of a blends file::

    /                      attrs: btkjax_format="btkjax.blends", format_version, batch_index,
                                  surveys (JSON list), multi_survey, config (JSON), versions (JSON)
    /{survey}/blend_images       dataset [batch, band, y, x] (as the generator returned it)
    /{survey}/isolated_images    dataset [batch, max_number, band, y, x] (absent if not drawn)
    /{survey}/psf_images         dataset [band, y, x]
    /{survey}/blend_list/000000  one astropy table per blend (astropy's HDF5 writer, with meta)
    /{survey}                    attrs: wcs (FITS header string), psf_repr (JSON list of the
                                  GalSim reprs of the PSF objects), pixel_scale (arcsec), n_blends

Measure and metrics files hold nested results (dicts of lists of tables, arrays, scalars) in the
same generic encoding: a dict is a group (attr ``btkjax_kind="dict"`` and its keys, in order, as
JSON in ``keys``); a list or tuple is a group whose members are named ``000000``, ``000001``...;
an astropy table is written by astropy's HDF5 writer (``btkjax_kind="table"``); an array is a
dataset; a scalar is a 0-d dataset; ``None`` is an empty group (``btkjax_kind="none"``).

Each file is written atomically: to a hidden temporary file in the same folder, flushed and
fsynced, then renamed over the final name (`os.replace`). An interrupted run leaves the files of
earlier batches intact and never a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from importlib import metadata

import h5py
import numpy as np
from astropy.table import Table

__all__ = [
    "FORMAT_VERSION",
    "SavedResultsError",
    "package_versions",
    "blend_file",
    "measure_file",
    "metrics_file",
    "save_blend_batch",
    "save_measure_batch",
    "save_metrics_batch",
    "load_blend_results",
    "load_measure_results",
    "load_metrics_results",
    "load_all_results",
    "saved_batches",
    "read_attrs",
]

FORMAT_VERSION = 1
_KIND = "btkjax_kind"
_FORMATS = {"blends": "btkjax.blends", "measure": "btkjax.measure", "metrics": "btkjax.metrics"}
_PACKAGES = ("btkjax", "jax", "jaxlib", "galsim", "numpy", "astropy", "h5py", "sep")


class SavedResultsError(ValueError):
    """A saved results file is missing, truncated, foreign or does not hold what was asked."""


# -- file names --------------------------------------------------------------------------------


def _check_batch_index(batch_index) -> int:
    if isinstance(batch_index, bool) or not isinstance(batch_index, (int, np.integer)):
        raise TypeError(f"batch_index must be an int, got {batch_index!r}.")
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}.")
    return int(batch_index)


def _stage_file(stage: str, path, batch_index: int) -> str:
    return os.path.join(os.fspath(path), f"{stage}_{_check_batch_index(batch_index):06d}.h5")


def blend_file(path, batch_index: int = 0) -> str:
    """Path of the blends file of batch `batch_index` under `path`."""
    return _stage_file("blends", path, batch_index)


def measure_file(path, batch_index: int = 0) -> str:
    """Path of the measurements file of batch `batch_index` under `path`."""
    return _stage_file("measure", path, batch_index)


def metrics_file(path, batch_index: int = 0) -> str:
    """Path of the metrics file of batch `batch_index` under `path`."""
    return _stage_file("metrics", path, batch_index)


def saved_batches(path, stage: str = "blends") -> list[int]:
    """Sorted batch indices of the complete files of a stage ("blends", "measure", "metrics")."""
    if stage not in _FORMATS:
        raise ValueError(f"stage must be one of {list(_FORMATS)}, got {stage!r}.")
    pattern = re.compile(rf"^{stage}_(\d{{6,}})\.h5$")
    found = (pattern.match(n) for n in os.listdir(os.fspath(path)))
    return sorted(int(m.group(1)) for m in found if m)


def package_versions() -> dict:
    """Versions of the packages that shape the results (saved beside every batch)."""
    import platform

    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["btkjax"] is None:  # an uninstalled checkout
        from btkjax import __version__

        versions["btkjax"] = __version__
    return versions


# -- atomic writing ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(final_path: str, what: str = "path"):
    """Yields a temporary file name in ``final_path``'s folder for the caller to write; on
    success the file is fsynced and renamed to ``final_path`` (and the rename made durable); if
    anything fails before the rename the temporary file is removed and nothing is written."""
    folder = os.path.dirname(os.path.abspath(final_path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what} {folder!r} is not an existing folder.")
    tmp = os.path.join(folder, f".{os.path.basename(final_path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_file(final_path: str, mode: str = "wb"):
    """Yields a file opened with ``mode`` that becomes ``final_path`` atomically
    (`atomic_path`)."""
    with atomic_path(final_path) as tmp, open(tmp, mode) as fh:
        yield fh


@contextlib.contextmanager
def _atomic_h5(final_path: str):
    """Yields an open h5py File that becomes `final_path` atomically (`atomic_path`)."""
    with atomic_path(final_path, "save_path") as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            yield f
            f.flush()


def _write_header(f, stage: str, batch_index: int, config, extra: dict | None = None):
    f.attrs["btkjax_format"] = _FORMATS[stage]
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["batch_index"] = int(batch_index)
    f.attrs["config"] = json.dumps(_jsonable(config if config is not None else {}))
    f.attrs["versions"] = json.dumps(package_versions())
    for key, value in (extra or {}).items():
        f.attrs[key] = value


def _jsonable(obj):
    """A JSON-able copy of a config (numpy scalars and arrays to Python; others to str)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


# -- generic nested values ---------------------------------------------------------------------


def _member_name(key, i: int) -> str:
    if isinstance(key, str) and key and "/" not in key and not key.startswith(".") and key != "meta":
        return key
    return f"__key{i:06d}"


def _write_array(group, name: str, array: np.ndarray, compression=None):
    """One numpy array as a dataset (bool and fixed-width strings keep their dtype)."""
    array = np.asarray(array)
    if array.dtype.kind == "U":
        ds = group.create_dataset(name, data=np.char.encode(array, "utf-8"))
        ds.attrs["numpy_dtype"] = array.dtype.str
    elif array.dtype.kind == "O":
        raise TypeError(
            f"Cannot save {group.name}/{name}: an object array (dtype=object); save numeric, "
            "boolean or string arrays, or astropy Tables."
        )
    else:
        kwargs = {}
        if compression and array.ndim >= 2 and array.size >= 1024:
            kwargs = dict(compression=compression, shuffle=True)
        ds = group.create_dataset(name, data=array, **kwargs)
    return ds


def _read_array(ds) -> np.ndarray:
    data = ds[()]
    if "numpy_dtype" in ds.attrs:
        data = np.char.decode(np.asarray(data), "utf-8").astype(ds.attrs["numpy_dtype"])
    return np.asarray(data)


def _write_table(group, name: str, table: Table):
    from astropy.io.misc.hdf5 import write_table_hdf5

    if len(table.colnames) == 0:  # astropy cannot write a table without columns
        sub = group.create_group(name)
        sub.attrs[_KIND] = "empty_table"
        sub.attrs["meta"] = json.dumps(_jsonable(dict(table.meta)))
        return
    write_table_hdf5(table, group, path=name, serialize_meta=True, overwrite=True)
    group[name].attrs[_KIND] = "table"
    group[name].attrs["table_class"] = type(table).__name__


def read_table(group, name: str) -> Table:
    from astropy.io.misc.hdf5 import read_table_hdf5

    node = group[name]
    if node.attrs.get(_KIND) == "empty_table":
        return Table(meta=json.loads(node.attrs["meta"]))
    table = read_table_hdf5(group, path=name)
    if node.attrs.get("table_class") == "QTable":
        from astropy.table import QTable

        table = QTable(table)
    return table


def _namedtuple_class(qualified: str, fields: list[str]):
    """The saved NamedTuple class if it is btkjax's own (imported), else a look-alike."""
    import collections
    import importlib

    module_name, _, qualname = qualified.partition(":")
    if module_name == "btkjax" or module_name.startswith("btkjax."):
        try:
            cls = importlib.import_module(module_name)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            if list(getattr(cls, "_fields", ())) == fields:
                return cls
        except (ImportError, AttributeError):
            pass
    return collections.namedtuple(qualname.rsplit(".", 1)[-1], fields)


def _write_value(group, name: str, value, compression=None):
    """Writes a nested value (dict / list / tuple / Table / array / scalar / None)."""
    if isinstance(value, Table):
        _write_table(group, name, value)
    elif isinstance(value, dict):
        sub = group.create_group(name, track_order=True)
        sub.attrs[_KIND] = "dict"
        keys = list(value)
        for k in keys:
            if not isinstance(k, (str, int, np.integer)) or isinstance(k, bool):
                raise TypeError(f"Cannot save {sub.name}: dict keys must be str or int, got {k!r}.")
        sub.attrs["keys"] = json.dumps([[type(k).__name__ if isinstance(k, str) else "int",
                                         k if isinstance(k, str) else int(k)] for k in keys])
        for i, k in enumerate(keys):
            _write_value(sub, _member_name(k, i), value[k], compression)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        sub = group.create_group(name, track_order=True)
        sub.attrs[_KIND] = "namedtuple"
        sub.attrs["class"] = f"{type(value).__module__}:{type(value).__qualname__}"
        sub.attrs["fields"] = json.dumps(list(value._fields))
        for field, v in zip(value._fields, value, strict=False):
            _write_value(sub, _member_name(field, 0), v, compression)
    elif isinstance(value, (list, tuple)):
        sub = group.create_group(name, track_order=True)
        sub.attrs[_KIND] = "tuple" if isinstance(value, tuple) else "list"
        sub.attrs["length"] = len(value)
        for i, v in enumerate(value):
            _write_value(sub, f"{i:06d}", v, compression)
    elif value is None:
        sub = group.create_group(name)
        sub.attrs[_KIND] = "none"
    elif isinstance(value, np.ndarray):
        ds = _write_array(group, name, value, compression)
        ds.attrs[_KIND] = "masked" if isinstance(value, np.ma.MaskedArray) else "array"
        if isinstance(value, np.ma.MaskedArray):
            _write_array(group, name + "__mask", np.ma.getmaskarray(value))
    elif isinstance(value, (bool, int, float, str, np.generic)):
        if isinstance(value, str):
            ds = group.create_dataset(name, data=value, dtype=h5py.string_dtype())
        else:
            ds = group.create_dataset(name, data=value)
        ds.attrs[_KIND] = "scalar"
        ds.attrs["pytype"] = "numpy" if isinstance(value, np.generic) else type(value).__name__
    elif hasattr(value, "__array__"):  # jax arrays and the like
        _write_value(group, name, np.asarray(value), compression)
    else:
        raise TypeError(
            f"Cannot save {group.name}/{name}: values must be dicts, lists, tuples, astropy "
            f"Tables, arrays, numbers, strings or None; got {type(value).__name__}."
        )


def _read_value(group, name: str):
    node = group[name]
    kind = node.attrs.get(_KIND)
    if kind in ("table", "empty_table"):
        return read_table(group, name)
    if kind == "dict":
        keys = json.loads(node.attrs["keys"])
        out = {}
        for i, (ktype, k) in enumerate(keys):
            key = k if ktype == "str" else int(k)
            out[key] = _read_value(node, _member_name(key, i))
        return out
    if kind in ("list", "tuple"):
        items = [_read_value(node, f"{i:06d}") for i in range(int(node.attrs["length"]))]
        return tuple(items) if kind == "tuple" else items
    if kind == "namedtuple":
        fields = json.loads(node.attrs["fields"])
        values = [_read_value(node, _member_name(field, 0)) for field in fields]
        return _namedtuple_class(node.attrs["class"], fields)(*values)
    if kind == "none":
        return None
    if kind == "array":
        return _read_array(node)
    if kind == "masked":
        return np.ma.MaskedArray(_read_array(node), mask=_read_array(group[name + "__mask"]))
    if kind == "scalar":
        data = node[()]
        pytype = node.attrs["pytype"]
        if pytype == "str":
            return data.decode("utf-8") if isinstance(data, bytes) else str(data)
        if pytype in ("bool", "int", "float"):
            return {"bool": bool, "int": int, "float": float}[pytype](data)
        return data
    raise SavedResultsError(
        f"{node.file.filename}: node {node.name!r} has no btkjax encoding (btkjax_kind={kind!r})."
    )


# -- saving ------------------------------------------------------------------------------------


def _survey_names(batch: dict, config) -> tuple[list[str], bool]:
    """The surveys of a batch and whether the batch is a multi-survey one (dicts per key)."""
    images = batch["blend_images"]
    if isinstance(images, dict):
        return [str(k) for k in images], True
    names = (config or {}).get("surveys") or ["survey"]
    return [str(names[0])], False


def save_blend_batch(save_path, batch_index: int, batch: dict, config: dict | None = None,
                     compression: str | None = "gzip") -> str:
    """Writes one batch of a draw generator to ``{save_path}/blends_{batch_index:06d}.h5``.

    Args:
        save_path: an existing folder.
        batch_index: the batch number (from 0).
        batch: the dict ``next(generator)`` returned (single- or multi-survey).
        config: the generator's ``config()`` (JSON-able), saved with the package versions.
        compression: h5py compression of the image datasets ("gzip", "lzf" or None).

    Returns:
        The path of the file written.
    """
    path = blend_file(save_path, batch_index)
    names, multi = _survey_names(batch, config)

    def part(key, name):
        value = batch.get(key)
        return value[name] if multi and value is not None else value

    with _atomic_h5(path) as f:
        _write_header(f, "blends", batch_index, config, {
            "surveys": json.dumps(names), "multi_survey": multi,
        })
        for name in names:
            g = f.create_group(name, track_order=True)
            images = np.asarray(part("blend_images", name))
            g.attrs["n_blends"] = len(images)
            _write_array(g, "blend_images", images, compression)
            iso = part("isolated_images", name)
            g.attrs["has_isolated_images"] = iso is not None
            if iso is not None:
                _write_array(g, "isolated_images", np.asarray(iso), compression)
            psf_images = part("psf_images", name)
            if psf_images is not None:
                _write_array(g, "psf_images", np.asarray(psf_images))
            psfs = part("psf", name)
            g.attrs["psf_repr"] = json.dumps(None if psfs is None else [repr(p) for p in psfs])
            wcs = part("wcs", name)
            g.attrs["wcs"] = "" if wcs is None else wcs.to_header_string(relax=True)
            if wcs is not None:
                from astropy.wcs.utils import proj_plane_pixel_scales

                g.attrs["pixel_scale"] = float(proj_plane_pixel_scales(wcs)[0] * 3600)
            tables = g.create_group("blend_list", track_order=True)
            tables.attrs[_KIND] = "list"
            blend_list = part("blend_list", name)
            tables.attrs["length"] = len(blend_list)
            for i, table in enumerate(blend_list):
                _write_table(tables, f"{i:06d}", table)
    return path


def _save_nested(stage: str, save_path, batch_index: int, results: dict, config,
                 compression) -> str:
    if not isinstance(results, dict):
        raise TypeError(f"{stage} results must be a dict, got {type(results).__name__}.")
    path = _stage_file(stage, save_path, batch_index)
    with _atomic_h5(path) as f:
        _write_header(f, stage, batch_index, config)
        _write_value(f, "results", results, compression)
    return path


def save_measure_batch(save_path, batch_index: int, meas_results: dict,
                       config: dict | None = None, compression: str | None = "gzip") -> str:
    """Writes one batch of measurements to ``{save_path}/measure_{batch_index:06d}.h5``.

    Args:
        save_path: an existing folder.
        batch_index: the batch number (from 0).
        meas_results: ``{"catalog"|"segmentation"|"deblended_images"|...: {measure_name:
            [per-blend Table / array / None]}}``, any nesting of dicts, lists, tables, arrays
            and scalars.
        config: optional JSON-able settings of the measure generator (saved with the versions).
        compression: h5py compression of large arrays.

    Returns:
        The path of the file written.
    """
    return _save_nested("measure", save_path, batch_index, meas_results, config, compression)


def save_metrics_batch(save_path, batch_index: int, results: dict, config: dict | None = None,
                       compression: str | None = "gzip") -> str:
    """Writes one batch of metrics to ``{save_path}/metrics_{batch_index:06d}.h5``.

    Args:
        save_path: an existing folder.
        batch_index: the batch number (from 0).
        results: ``{"detection"|"segmentation"|"reconstruction"|"galaxy_summary"|"matches":
            {measure_name: ...}}``, any nesting of dicts, lists, tables, arrays and scalars.
        config: optional JSON-able settings of the metrics generator.
        compression: h5py compression of large arrays.

    Returns:
        The path of the file written.
    """
    return _save_nested("metrics", save_path, batch_index, results, config, compression)


# -- loading -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_saved(path: str, stage: str):
    """Opens a saved file for reading, checking that it is a complete btkjax file of `stage`."""
    what = (f"a btkjax {stage} file (format {_FORMATS[stage]!r}) written by "
            f"btkjax.utils.save_{'blend' if stage == 'blends' else stage}_batch")
    if not os.path.exists(path):
        folder = os.path.dirname(path) or "."
        have = saved_batches(folder, stage) if os.path.isdir(folder) else []
        raise FileNotFoundError(
            f"{path} does not exist: expected {what}. Batches of this stage saved in "
            f"{folder}: {have if have else 'none'}."
        )
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise SavedResultsError(
            f"{path} is not a readable HDF5 file (truncated or corrupt?): expected {what}. "
            f"h5py said: {err}"
        ) from None
    with f:
        fmt = f.attrs.get("btkjax_format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != _FORMATS[stage]:
            raise SavedResultsError(
                f"{path} is an HDF5 file but not {what}: its 'btkjax_format' attribute is "
                f"{fmt!r}, expected {_FORMATS[stage]!r}."
            )
        version = int(f.attrs.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise SavedResultsError(
                f"{path} has format_version {version}; this btkjax reads up to {FORMAT_VERSION}."
                " Upgrade btkjax."
            )
        try:
            yield f
        except (KeyError, OSError) as err:
            raise SavedResultsError(
                f"{path} is damaged or incomplete: expected {what}; reading it failed with "
                f"{type(err).__name__}: {err}"
            ) from err


def read_attrs(path) -> dict:
    """The header of a saved file: format, batch_index, config and versions (decoded)."""
    out = {}
    with h5py.File(os.fspath(path), "r") as f:
        for k, v in f.attrs.items():
            v = v.decode() if isinstance(v, bytes) else v
            if k in ("config", "versions", "surveys"):
                v = json.loads(v)
            out[k] = v.item() if isinstance(v, np.generic) else v
    return out


def _check_n_batch(n_batch, stored: int, path: str):
    if n_batch is None:
        return
    if isinstance(n_batch, bool) or not isinstance(n_batch, (int, np.integer)):
        raise TypeError(f"n_batch must be an int (the batch size) or None, got {n_batch!r}.")
    if int(n_batch) != stored:
        raise SavedResultsError(
            f"{path} holds {stored} blends but n_batch={n_batch}: n_batch is the number of "
            f"blends per batch (the generator's batch_size when the results were saved); pass "
            f"n_batch={stored} or None."
        )


def _names_list(names, what: str) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        return [names]
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a name or a list of names, got {names!r}.")
    return names


def _psf_from_repr(reprs: list[str]):
    import galsim

    namespace = {"galsim": galsim, "np": np, "numpy": np, "array": np.array,
                 "float32": np.float32, "float64": np.float64, "int32": np.int32,
                 "int64": np.int64, "uint16": np.uint16, "__builtins__": {}}
    return [eval(r, namespace) for r in reprs]  # noqa: S307 (opt-in, trusted files only)


def _psf_from_images(psf_images, pixel_scale):
    import galsim

    return [galsim.InterpolatedImage(galsim.Image(np.asarray(im, dtype=np.float64),
                                                  scale=pixel_scale)) for im in psf_images]


def load_blend_results(path, survey_names=None, batch_index: int = 0, n_batch: int | None = None,
                       psf: str = "image") -> dict:
    """Loads a batch saved by a draw generator, in the shape the generator returned it.

    Args:
        path: the generator's ``save_path``.
        survey_names: the surveys to load (a name or list; None: all saved). A batch saved from
            a single-survey generator comes back unwrapped (``blend_images`` an array), as the
            generator returned it; a multi-survey one as dicts keyed by survey name.
        batch_index: which batch (from 0).
        n_batch: the number of blends in the batch (the generator's batch size), checked against
            the file; None skips the check.
        psf: how to rebuild the ``psf`` entry, which GalSim objects cannot be stored as data:
            "image" (default): `galsim.InterpolatedImage` of the saved PSF images;
            "repr": evaluate the saved GalSim ``repr`` of each object (the exact objects; only for
            files you trust, as it evaluates text from the file); "none": None.

    Returns:
        The batch dict: blend_images, isolated_images, blend_list, psf, psf_images, wcs.
    """
    from astropy.io.fits import Header
    from astropy.wcs import WCS

    if psf not in ("image", "repr", "none"):
        raise ValueError(f"psf must be 'image', 'repr' or 'none', got {psf!r}.")
    file = blend_file(path, batch_index)
    wanted = _names_list(survey_names, "survey_names")
    with _open_saved(file, "blends") as f:
        saved = json.loads(f.attrs["surveys"])
        multi = bool(f.attrs["multi_survey"])
        if wanted is None:
            wanted = saved
        missing = [n for n in wanted if n not in saved]
        if missing:
            raise SavedResultsError(
                f"{file} has no survey {missing}: its surveys are {saved}."
            )
        out = {k: {} for k in ("blend_images", "isolated_images", "blend_list", "psf",
                               "psf_images", "wcs")}
        for name in wanted:
            g = f[name]
            n = int(g.attrs["n_blends"])
            _check_n_batch(n_batch, n, file)
            out["blend_images"][name] = _read_array(g["blend_images"])
            out["isolated_images"][name] = (_read_array(g["isolated_images"])
                                            if g.attrs["has_isolated_images"] else None)
            psf_images = _read_array(g["psf_images"]) if "psf_images" in g else None
            out["psf_images"][name] = psf_images
            header = g.attrs["wcs"]
            out["wcs"][name] = WCS(Header.fromstring(header)) if header else None
            tables = g["blend_list"]
            blend_list = [read_table(tables, f"{i:06d}") for i in range(int(tables.attrs["length"]))]
            if len(blend_list) != n:
                raise SavedResultsError(
                    f"{file}: survey {name} has {len(blend_list)} blend tables for {n} images."
                )
            out["blend_list"][name] = blend_list
            reprs = json.loads(g.attrs["psf_repr"])
            if psf == "none" or reprs is None:
                out["psf"][name] = None
            elif psf == "repr":
                out["psf"][name] = _psf_from_repr(reprs)
            else:
                out["psf"][name] = _psf_from_images(psf_images, float(g.attrs["pixel_scale"]))
    if not multi:
        out = {k: v[wanted[0]] for k, v in out.items()}
    return out


def _select_names(results: dict, names, file: str, what: str) -> dict:
    """Keeps, under each top-level key, only the requested measure names."""
    if names is None:
        return results
    seen = set()
    out = {}
    for key, value in results.items():
        if isinstance(value, dict):
            seen |= set(value)
            out[key] = {n: value[n] for n in names if n in value}
        else:
            out[key] = value
    missing = [n for n in names if n not in seen]
    if missing:
        raise SavedResultsError(
            f"{file} has no {what} named {missing}: it holds {sorted(map(str, seen))}."
        )
    return out


def _blend_count(results: dict, key: str) -> int | None:
    """The number of blends of nested results: the length of a per-blend list under `key`."""
    value = results.get(key)
    if isinstance(value, dict):
        for inner in value.values():
            if isinstance(inner, list):
                return len(inner)
    return None


def _load_nested(stage: str, path, names, batch_index, n_batch, what: str,
                 per_blend_key: str) -> dict:
    file = _stage_file(stage, path, batch_index)
    names = _names_list(names, what + "s")
    with _open_saved(file, stage) as f:
        if "results" not in f:
            raise SavedResultsError(f"{file} is incomplete: it has no 'results' group.")
        results = _read_value(f, "results")
    results = _select_names(results, names, file, what)
    count = _blend_count(results, per_blend_key)
    if count is not None:
        _check_n_batch(n_batch, count, file)
    return results


def load_measure_results(path, measure_names=None, batch_index: int = 0,
                         n_batch: int | None = None) -> dict:
    """Loads the measurements of one batch: ``meas_results`` as the measure generator returned it.

    Args:
        path: the ``save_path``.
        measure_names: the measure functions' names to keep (None: all).
        batch_index: which batch (from 0).
        n_batch: the number of blends per batch, checked against the file (None: no check).
    """
    return _load_nested("measure", path, measure_names, batch_index, n_batch, "measure",
                        "catalog")


def load_metrics_results(path, measure_names=None, batch_index: int = 0,
                         n_batch: int | None = None) -> dict:
    """Loads the metrics of one batch: ``results`` as the metrics generator returned it.

    Args: as `load_measure_results`.
    """
    return _load_nested("metrics", path, measure_names, batch_index, n_batch, "measure",
                        "matches")


def load_all_results(path, survey_names, measure_names, n_batch: int | None = None,
                     batch_index: int = 0, psf: str = "image"):
    """Loads one saved batch of the draw, measure and metrics generators.

    As in BTK's tutorial, ``load_all_results(save_path, ["LSST"], ["sep_singleband_measure"],
    n_batch=100)``: ``n_batch`` is the number of blends per batch (the generators' batch_size),
    checked against what the files hold (None: not checked). ``batch_index`` picks the batch
    (default 0, the first); `saved_batches` lists them.

    Args:
        path: the ``save_path`` given to the generators.
        survey_names: survey names (as saved); a single-survey run comes back unwrapped.
        measure_names: names of the measure functions.
        n_batch: blends per batch (validated), or None.
        batch_index: which batch.
        psf: see `load_blend_results`.

    Returns:
        ``(blend_results, meas_results, results)``. With ``measure_names`` empty or None only the
        blends are loaded (``meas_results`` and ``results`` are None); otherwise the measure file
        must exist, and ``results`` is None when no metrics were saved for the batch.
    """
    blend_results = load_blend_results(path, survey_names, batch_index, n_batch, psf=psf)
    meas_results = results = None
    if measure_names:
        meas_results = load_measure_results(path, measure_names, batch_index, n_batch)
        if os.path.exists(metrics_file(path, batch_index)):
            results = load_metrics_results(path, measure_names, batch_index, n_batch)
    return blend_results, meas_results, results
