"""Streaming generation of large data sets: HDF5 shards, a manifest, resume, and a reader.

`generate` draws ``n_blends`` blends with a `CatsimGenerator` (a `CatsimCatalog`) or a
`CosmosGenerator` (a `CosmosCatalog`, ``gal_type`` "real" or "parametric") and writes them, as
they are made, to shards of ``shard_size`` blends under ``out_dir``; `ShardReader` iterates the
shards as numpy or JAX batches for training loops. The command line is ``btkjax stream`` (`btkjax.cli`).

Files under ``out_dir``::

    blends_000000.h5, blends_000001.h5, ...   one shard each: shard k holds the blends with
                                               global ids [k * shard_size, min((k+1) * shard_size,
                                               n_blends)), in order, in the layout of
                                               `btkjax.utils.save_blend_batch` (batch_index = k),
                                               so `btkjax.utils.load_blend_results(out_dir,
                                               batch_index=k)` reads one back
    manifest.json                              the manifest (one process), or
    manifest-00000-of-00004.json, ...          one per process (several processes; merged into
                                               manifest.json by `merge_manifests`)

The manifest (JSON, rewritten atomically after every shard, no timestamps)::

    {"format": "btkjax.stream", "format_version": 1,
     "config": {...},          # everything the blends depend on (see `stream_config`)
     "n_blends": N, "shard_size": S, "n_shards": K,
     "process_index": p, "process_count": P,
     "complete": true|false,   # every shard of this manifest's process(es) is written
     "shards": [{"index": k, "file": "blends_00000k.h5", "first_blend": .., "stop_blend": ..,
                 "n_blends": .., "bytes": .., "sha256": ".."}, ...],   # sorted by index
     "versions": {...}}        # btkjax.utils.package_versions()

Guarantees:

- Each shard is written atomically (temporary file in the same folder, flush, fsync,
  ``os.replace``; `btkjax.utils.save_blend_batch`), and listed in the manifest only after it is
  on disk. A crash leaves complete shards and a manifest listing a subset of them.
- Blend ``i`` depends only on the seed and ``i`` (`btkjax.draw_blends`), not on the batch size,
  the number of devices or processes, or on resuming; the HDF5 writer is deterministic (h5py
  writes no timestamps: ``track_times`` is off by default, default libver, fixed chunking and
  gzip level), so a shard's bytes are the same in every run with the same config and package
  versions. The tests compare the files byte for byte.
- Memory is bounded by about two shards (one being filled, one being written by the background
  writer thread), whatever ``n_blends``.
- ``resume=True`` reads the manifest(s), refuses one whose config differs from the requested
  one (`ConfigMismatchError`, naming the keys), verifies each listed shard's size and SHA-256
  (regenerating, with a warning, any that fails), and draws only the missing shards.

Several devices and hosts: ``devices`` shards the blend axis of the renderer over this process's
devices (`jax.sharding`, see `btkjax.draw_blends.DrawBlendsGenerator`). Several processes (one
per host, started by the user, joined with ``jax.distributed.initialize()`` before calling
`generate`) split the shards: process p of P writes the shards with ``index % P == p`` and its
own manifest ``manifest-{p:05d}-of-{P:05d}.json``; when all are done, process 0 merges them into
``manifest.json`` (after a barrier through the ``jax.distributed`` coordinator, `barrier`, which
needs no cross-process collectives, when ``jax.distributed`` is initialized; otherwise call
`merge_manifests` — `ShardReader` also merges per-process manifests on the fly). Processes share
no work and exchange no arrays, so each renders on its local devices only. ``process_index`` and
``process_count`` may also be given explicitly (e.g. from a batch scheduler, without
``jax.distributed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from btkjax import DEFAULT_SEED

__all__ = [
    "STREAM_FORMAT",
    "STREAM_FORMAT_VERSION",
    "MANIFEST",
    "PER_BLEND_KEYS",
    "ManifestError",
    "ConfigMismatchError",
    "generate",
    "stream_config",
    "shards_of_process",
    "shard_file",
    "manifest_file",
    "read_manifest",
    "merge_manifests",
    "barrier",
    "ShardReader",
]

STREAM_FORMAT = "btkjax.stream"
STREAM_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PER_BLEND_KEYS = ("blend_images", "isolated_images", "blend_list", "blend_ids")
_RUNS = 0  # multi-process runs of this process (names their barriers)
_PER_PROCESS = re.compile(r"^manifest-(\d{5})-of-(\d{5})\.json$")


class ManifestError(ValueError):
    """A manifest that is missing, foreign, inconsistent, or does not match the shards."""


class ConfigMismatchError(ManifestError):
    """Resuming with a config that differs from the one of the existing manifest."""


# -- names -------------------------------------------------------------------------------------


def shard_file(out_dir, shard_index: int) -> str:
    """Path of shard `shard_index` (the layout of `btkjax.utils.save_blend_batch`)."""
    from btkjax.utils import blend_file

    return blend_file(out_dir, shard_index)


def manifest_file(out_dir, process_index: int = 0, process_count: int = 1) -> str:
    """``manifest.json`` for one process, ``manifest-{p:05d}-of-{P:05d}.json`` for several."""
    if process_count == 1:
        return os.path.join(os.fspath(out_dir), MANIFEST)
    return os.path.join(os.fspath(out_dir),
                        f"manifest-{process_index:05d}-of-{process_count:05d}.json")


def shards_of_process(n_shards: int, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` writes: ``index % P == p``
    (round robin, so that every process gets about as many, and a partial last shard)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    return range(process_index, n_shards, process_count)


# -- config ------------------------------------------------------------------------------------


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "inf", "-inf", "nan": portable JSON
    return value


def _simple_params(obj) -> dict:
    """The JSON-able scalar attributes of an object (a sampling function's parameters)."""
    out = {}
    for k, v in sorted(vars(obj).items()):
        if k.startswith("_") or k == "rng":
            continue
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, (bool, int, float, str)) or v is None:
            out[k] = _finite(v)
        elif isinstance(v, tuple) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = [_finite(x) for x in v]
    return out


def _catalog_digest(catalog) -> dict:
    """The catalog's class, size and a SHA-256 of its columns (names, dtypes, values)."""
    table = catalog.table
    h = hashlib.sha256()
    for name in table.colnames:
        col = np.ascontiguousarray(np.asarray(table[name]))
        h.update(name.encode())
        h.update(col.dtype.str.encode())
        h.update(col.tobytes())
    return {"class": type(catalog).__name__, "n_rows": len(table), "sha256": h.hexdigest()}


def _survey_digest(survey) -> dict:
    """The survey's name and a SHA-256 of its pixel scale and filters (PSFs included)."""
    parts = [str(survey.pixel_scale)]
    for band in survey.available_filters:
        filt = survey.get_filter(band)
        fields = {f.name: str(getattr(filt, f.name)) for f in dataclasses.fields(filt)}
        parts.append(json.dumps(fields, sort_keys=True))
        parts.append(repr(getattr(filt, "psf", None)))
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return {"name": survey.name, "bands": list(survey.available_filters), "sha256": digest}


def _cosmos_digest(catalog, gal_type: str, real_pad_factor: float) -> dict:
    """What a COSMOS run depends on beyond the catalog's table: the galaxy type, the real-galaxy
    tables' oversampling and, for real galaxies, the image and PSF files the catalog names
    (names and sizes: hashing GBs of HST images at every resume would cost more than it
    guards)."""
    out = {"gal_type": gal_type, "real_pad_factor": float(real_pad_factor)}
    if gal_type == "real" and getattr(catalog, "real_file", None):
        from astropy.table import Table

        folder = os.path.dirname(os.path.abspath(catalog.real_file))
        table = Table.read(catalog.real_file)
        names = sorted({str(x).strip() for col in ("GAL_FILENAME", "PSF_FILENAME")
                        if col in table.colnames for x in table[col]})
        sizes = [os.path.getsize(os.path.join(folder, n))
                 if os.path.exists(os.path.join(folder, n)) else None for n in names]
        out["image_files"] = [[n, size] for n, size in zip(names, sizes, strict=True)]
    return out


def stream_config(catalog, sampling_function, surveys, n_blends, shard_size, seed, add_noise,
                  stamp_size, isolated, dtype, compression, cosmos: dict | None = None) -> dict:
    """Everything the shards' contents depend on (and nothing they do not: the batch size, the
    devices and the processes are left out, so that a run may resume with other ones).

    ``cosmos`` (COSMOS runs only): the `CosmosGenerator` options (`_cosmos_digest`), stored
    under the "cosmos" key; a CatSim config has no such key."""
    import jax

    config = {
        "generator": "CatsimGenerator" if cosmos is None else "CosmosGenerator",
        "n_blends": int(n_blends),
        "shard_size": int(shard_size),
        "seed": int(seed),
        "add_noise": add_noise,
        "stamp_size": float(stamp_size),
        "isolated": bool(isolated),
        "dtype": dtype,
        "compression": compression,
        "surveys": [s.name for s in surveys],
        "survey_digests": [_survey_digest(s) for s in surveys],
        "catalog": _catalog_digest(catalog),
        "sampling_function": {"class": type(sampling_function).__name__,
                              "params": _simple_params(sampling_function)},
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
    }
    if cosmos is not None:
        config["cosmos"] = cosmos
    return config


def _diff_keys(old, new, prefix="") -> list[str]:
    """Dotted paths of the keys whose values differ between two JSON-like dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        if k not in old or k not in new:
            out.append(path)
        elif isinstance(old[k], dict) and isinstance(new[k], dict):
            out.extend(_diff_keys(old[k], new[k], path + "."))
        elif old[k] != new[k]:
            out.append(path)
    return out


def _short(value, limit=80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(d, dotted):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return "<absent>"
        d = d[part]
    return d


def _check_config(path, saved: dict, wanted: dict):
    keys = _diff_keys(saved, wanted)
    if keys:
        details = "; ".join(f"{k}: saved {_short(_get(saved, k))}, requested "
                            f"{_short(_get(wanted, k))}" for k in keys)
        raise ConfigMismatchError(
            f"cannot resume: {path} was written with a different config; differing key(s): "
            f"{', '.join(keys)} ({details}). Resume with the original settings, or write to "
            f"another folder."
        )


# -- manifests ---------------------------------------------------------------------------------


def _write_json_atomic(path: str, obj) -> None:
    from btkjax.utils import atomic_file

    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path} is not valid JSON ({err}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != STREAM_FORMAT:
        raise ManifestError(f"{path} is not a btkjax stream manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r},"
                            f" expected {STREAM_FORMAT!r}).")
    if int(manifest.get("format_version", -1)) > STREAM_FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {manifest['format_version']}; this "
                            f"btkjax reads up to {STREAM_FORMAT_VERSION}. Upgrade btkjax.")
    return manifest


def _manifest_paths(out_dir) -> list[str]:
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        return []
    names = sorted(os.listdir(out_dir))
    paths = [os.path.join(out_dir, n) for n in names if n == MANIFEST or _PER_PROCESS.match(n)]
    return paths


def _merged(manifests: list[dict], sources: list[str]) -> dict:
    """One manifest from several with the same config (shards united by index)."""
    first = manifests[0]
    for m, path in zip(manifests[1:], sources[1:], strict=True):
        _check_config(path, m["config"], first["config"])
    shards = {}
    for m in manifests:
        for s in m["shards"]:
            if s["index"] in shards and shards[s["index"]]["sha256"] != s["sha256"]:
                raise ManifestError(f"shard {s['index']} is listed with two different checksums "
                                    f"in the manifests {sources}.")
            shards[s["index"]] = s
    merged = dict(first)
    merged["shards"] = [shards[k] for k in sorted(shards)]
    merged["process_index"], merged["process_count"] = 0, 1
    merged["complete"] = len(shards) == first["n_shards"]
    return merged


def read_manifest(out_dir) -> dict:
    """The manifest of a streamed folder: ``manifest.json``, or the per-process manifests
    merged (in memory). Raises `ManifestError` if there is none."""
    paths = _manifest_paths(out_dir)
    if not paths:
        raise ManifestError(f"{os.fspath(out_dir)!r} has no {MANIFEST} (nor per-process "
                            f"manifests): not a folder written by btkjax.streaming.generate.")
    main = os.path.join(os.fspath(out_dir), MANIFEST)
    if main in paths:
        manifest = _load_json(main)
        if manifest.get("complete") or len(paths) == 1:
            return manifest
    return _merged([_load_json(p) for p in paths], paths)


def merge_manifests(out_dir) -> str:
    """Writes ``manifest.json`` from the per-process manifests of a multi-process run (all
    must be complete); returns its path."""
    paths = [p for p in _manifest_paths(out_dir) if os.path.basename(p) != MANIFEST]
    if not paths:
        raise ManifestError(f"{os.fspath(out_dir)!r} has no per-process manifests to merge.")
    manifests = [_load_json(p) for p in paths]
    merged = _merged(manifests, paths)
    if not merged["complete"]:
        have = {s["index"] for s in merged["shards"]}
        missing = [k for k in range(merged["n_shards"]) if k not in have]
        more = "..." if len(missing) > 10 else ""
        raise ManifestError(f"cannot merge: shards {missing[:10]}{more} of {merged['n_shards']} "
                            "are not written yet (resume the processes that own them).")
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    _write_json_atomic(path, merged)
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verified(out_dir: str, entry: dict) -> bool:
    path = os.path.join(out_dir, entry["file"])
    return (os.path.isfile(path) and os.path.getsize(path) == entry["bytes"]
            and _sha256(path) == entry["sha256"])


# -- generation --------------------------------------------------------------------------------


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _new_shard(batch: dict, n: int, multi: bool) -> dict:
    """An empty shard of `n` blends shaped like `batch` (preallocated, filled batch by batch)."""
    def arrays(images):
        return None if images is None else np.empty((n,) + images.shape[1:], images.dtype)

    shard = {"psf": batch["psf"], "psf_images": batch["psf_images"], "wcs": batch["wcs"]}
    if multi:
        shard["blend_images"] = {k: arrays(v) for k, v in batch["blend_images"].items()}
        shard["isolated_images"] = {k: arrays(v) for k, v in batch["isolated_images"].items()}
        shard["blend_list"] = {k: [] for k in batch["blend_list"]}
    else:
        shard["blend_images"] = arrays(batch["blend_images"])
        shard["isolated_images"] = arrays(batch["isolated_images"])
        shard["blend_list"] = []
    return shard


def _fill(shard: dict, batch: dict, start: int, take: int, multi: bool):
    names = list(batch["blend_images"]) if multi else [None]
    for name in names:
        def pick(d, name=name):
            return d[name] if multi else d

        pick(shard["blend_images"])[start:start + take] = pick(batch["blend_images"])[:take]
        iso = pick(batch["isolated_images"])
        if iso is not None:
            pick(shard["isolated_images"])[start:start + take] = iso[:take]
        pick(shard["blend_list"]).extend(pick(batch["blend_list"])[:take])


def generate(
    n_blends: int,
    out_dir,
    catalog=None,
    sampling_function=None,
    surveys="LSST",
    shard_size: int = 128,
    batch_size: int = 32,
    seed: int = DEFAULT_SEED,
    add_noise: str = "all",
    stamp_size: float = 24.0,
    max_number: int = 3,
    max_shift: float | None = None,
    isolated: bool = True,
    dtype: str = "float32",
    compression: str | None = "gzip",
    devices=None,
    resume: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    chunk: int = 8,
    progress: bool = False,
    background_write: bool = True,
    on_shard=None,
    gal_type: str | None = None,
) -> dict:
    """Streams `n_blends` blends to HDF5 shards under `out_dir` (see the module's doc).

    Args:
        n_blends: number of blends (global ids 0 .. n_blends - 1).
        out_dir: output folder (created if missing).
        catalog: a `CatsimCatalog` (default: `CatsimCatalog.default()`), drawn by
            `CatsimGenerator`, or a `CosmosCatalog` (from `CosmosCatalog.from_file`), drawn by
            `CosmosGenerator` with `gal_type`.
        sampling_function: a sampling function with a JAX sampler (built-in ones), whose blends
            depend only on their global index (default: ``DefaultSampling(max_number,
            stamp_size=stamp_size, max_shift=max_shift, seed=seed)``).
        surveys: a survey name, a list of names, a `Survey` or a list of them.
        shard_size: blends per shard file (the last shard may be smaller).
        batch_size: blends per generator batch; must divide `shard_size`. Does not change the
            blends (it is not part of the config: a run may resume with another one).
        seed: the seed of the generator (noise, rotations) and of the default sampler.
        add_noise, stamp_size, isolated, dtype, chunk: as `CatsimGenerator`.
        max_number, max_shift: of the default sampling function.
        compression: of the image datasets ("gzip", "lzf" or None).
        devices: shard the renderer over local devices: None, "all", an int or a list of
            devices (`DrawBlendsGenerator`). Not part of the config.
        resume: continue the run whose manifest is in `out_dir` (otherwise a folder that holds a
            manifest or shards is refused).
        process_index, process_count: this process's slice of the shards (default: from
            `jax.process_index()` and `jax.process_count()`).
        progress: show a progress bar over this process's shards.
        background_write: write shards in a background thread while the next one is drawn.
        on_shard: optional callback ``on_shard(shard_index, path)`` after each shard is written
            and listed in the manifest.
        gal_type: COSMOS catalogs only: "real" (default, HST images) or "parametric" (the
            fits), as `CosmosGenerator`. Part of the config.

    Returns:
        This process's manifest (a dict, as written).

    Raises:
        ConfigMismatchError: resuming with settings that differ from the manifest's.
        FileExistsError: `out_dir` holds a run and `resume` is False.
    """
    import jax

    from btkjax.catalog import CatsimCatalog, CosmosCatalog
    from btkjax.cosmos import REAL_PAD_FACTOR, CosmosGenerator
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.noise import check_noise_mode
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import Survey, get_surveys
    from btkjax.utils import package_versions, save_blend_batch

    n_blends = _check_positive("n_blends", n_blends)
    shard_size = _check_positive("shard_size", shard_size)
    batch_size = _check_positive("batch_size", min(batch_size, shard_size))
    if shard_size % batch_size:
        raise ValueError(f"batch_size ({batch_size}) must divide shard_size ({shard_size}): "
                         "each shard is made of whole batches.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    add_noise = check_noise_mode(add_noise)
    if compression not in ("gzip", "lzf", None):
        raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}.")
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count), got {process_index} of "
                         f"{process_count}.")

    catalog = CatsimCatalog.default() if catalog is None else catalog
    cosmos = None
    if isinstance(catalog, CosmosCatalog):
        gal_type = "real" if gal_type is None else gal_type
        if gal_type not in ("real", "parametric"):
            raise ValueError(f"gal_type must be 'real' or 'parametric', got {gal_type!r}.")
        cosmos = _cosmos_digest(catalog, gal_type, REAL_PAD_FACTOR)
    elif not isinstance(catalog, CatsimCatalog):
        raise TypeError(f"catalog must be a CatsimCatalog or a CosmosCatalog, got "
                        f"{type(catalog).__name__}.")
    elif gal_type is not None:
        raise ValueError(f"gal_type={gal_type!r} is an option of COSMOS catalogs; this catalog "
                         "is a CatsimCatalog.")
    if sampling_function is None:
        sampling_function = DefaultSampling(max_number=max_number, stamp_size=stamp_size,
                                            max_shift=max_shift, seed=seed)
    if not getattr(sampling_function, "has_jax_sampler", False):
        raise ValueError(
            f"{type(sampling_function).__name__} has no JAX sampler: its blends come from a "
            "NumPy random stream that depends on the order of the calls, so a streamed run could "
            "not resume or split over processes reproducibly. Use a built-in sampling function "
            "(DefaultSampling, PairSampling, ...)."
        )
    if isinstance(surveys, (str, Survey)):
        surveys = [surveys]
    surveys = [get_surveys(s) if isinstance(s, str) else s for s in surveys]
    config = stream_config(catalog, sampling_function, surveys, n_blends, shard_size, seed,
                           add_noise, stamp_size, isolated, dtype, compression, cosmos)
    n_shards = math.ceil(n_blends / shard_size)
    mine = list(shards_of_process(n_shards, process_index, process_count))

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    done = {}  # index -> verified manifest entry (of this process's shards)
    mine_set = set(mine)
    own = manifest_file(out_dir, process_index, process_count)
    existing = _manifest_paths(out_dir)
    if not resume:
        # Other processes of the same run write their own manifests concurrently: only this
        # process's manifest, or a single-process one, means an earlier run.
        blocking = [p for p in existing if p in (own, os.path.join(out_dir, MANIFEST))]
        if blocking:
            raise FileExistsError(
                f"{out_dir!r} already holds a streamed run ({os.path.basename(blocking[0])}): "
                "pass resume=True (--resume) to continue it, or choose another folder."
            )
        stray = [n for n in os.listdir(out_dir) if re.match(r"^blends_\d{6,}\.h5$", n)
                 and int(n[7:-3]) in mine_set]
        if stray:
            raise FileExistsError(
                f"{out_dir!r} holds shard files ({stray[0]}, ...) but no manifest lists them: "
                "they cannot be verified. Remove them or choose another folder."
            )
    for path in existing:
        manifest = _load_json(path)
        _check_config(path, manifest["config"], config)
        versions = manifest.get("versions", {})
        now = package_versions()
        changed = sorted(k for k in set(versions) | set(now) if versions.get(k) != now.get(k))
        if changed:
            diffs = ", ".join(f"{k} {versions.get(k)} -> {now.get(k)}" for k in changed)
            warnings.warn(
                f"{path} was written with other package versions ({diffs}): the shards drawn "
                "now may not be bit-identical to those of the first run.", stacklevel=2,
            )
        for entry in manifest["shards"]:
            k = entry["index"]
            if k in done or k not in mine_set:
                continue
            if _verified(out_dir, entry):
                done[k] = entry
            else:
                warnings.warn(f"{os.path.join(out_dir, entry['file'])} is missing or fails its "
                              f"size/SHA-256 check: shard {k} is drawn again.", stacklevel=2)
    # Leftovers of writes killed before their rename (hidden temporary files).
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), ".blends_*.h5.*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(tmp)

    manifest = {
        "format": STREAM_FORMAT,
        "format_version": STREAM_FORMAT_VERSION,
        "config": config,
        "n_blends": n_blends,
        "shard_size": shard_size,
        "n_shards": n_shards,
        "process_index": process_index,
        "process_count": process_count,
        "complete": False,
        "shards": [],
        "versions": package_versions(),
    }
    manifest_path = own

    def publish():
        manifest["shards"] = [done[k] for k in sorted(done)]
        manifest["complete"] = all(k in done for k in mine)
        _write_json_atomic(manifest_path, manifest)

    publish()
    todo = [k for k in mine if k not in done]
    generator = None
    if todo:
        if cosmos is None:
            generator = CatsimGenerator(
                catalog, sampling_function, surveys, batch_size=batch_size, stamp_size=stamp_size,
                add_noise=add_noise, seed=seed, isolated=isolated, dtype=dtype, chunk=chunk,
                devices=devices, use_bar=False,
            )
        else:
            generator = CosmosGenerator(
                catalog, sampling_function, surveys, batch_size=batch_size, stamp_size=stamp_size,
                add_noise=add_noise, seed=seed, isolated=isolated, dtype=dtype, chunk=chunk,
                devices=devices, use_bar=False, gal_type=cosmos["gal_type"],
                real_pad_factor=cosmos["real_pad_factor"],
            )
        if not all(state.static_psf for state in generator._states.values()):
            raise ValueError("streaming needs fixed PSFs: a survey has a callable (random) PSF, "
                             "drawn once per batch, so shards would depend on the batch size.")
    multi = len(surveys) > 1

    def write(k: int, shard: dict):
        path = save_blend_batch(out_dir, k, shard, config, compression=compression)
        first = k * shard_size
        done[k] = {
            "index": k, "file": os.path.basename(path), "first_blend": first,
            "stop_blend": min(first + shard_size, n_blends),
            "n_blends": min(first + shard_size, n_blends) - first,
            "bytes": os.path.getsize(path), "sha256": _sha256(path),
        }
        publish()
        if on_shard is not None:
            on_shard(k, path)

    from tqdm.auto import tqdm

    pending = None
    with ThreadPoolExecutor(1, thread_name_prefix="btkjax-shard-writer") as pool, \
            tqdm(total=len(todo), desc="btkjax stream", unit="shard",
                 disable=not progress) as bar:
        try:
            for k in todo:
                first = k * shard_size
                n = min(first + shard_size, n_blends) - first
                generator.batch_index = first // batch_size
                shard = None
                for start in range(0, n, batch_size):
                    batch = next(generator)
                    if shard is None:
                        shard = _new_shard(batch, n, multi)
                    _fill(shard, batch, start, min(batch_size, n - start), multi)
                    del batch
                if pending is not None:
                    pending.result()  # at most one shard waits to be written
                    bar.update(1)
                if background_write:
                    pending = pool.submit(write, k, shard)
                else:
                    write(k, shard)
                    bar.update(1)
                del shard
            if pending is not None:
                pending.result()
                bar.update(1)
        finally:
            if pending is not None and not pending.done():
                with contextlib.suppress(BaseException):
                    pending.result()
    publish()
    if process_count > 1 and jax.process_count() == process_count:
        # A real multi-process run (jax.distributed): wait for every process, then merge.
        global _RUNS
        _RUNS += 1  # every process calls generate as many times: the barriers' names agree
        barrier(f"btkjax.streaming.generate.{_RUNS}")
        if process_index == 0:
            merge_manifests(out_dir)
    return manifest


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """Waits until every process of a ``jax.distributed`` run has called ``barrier(name)``.

    Uses the distributed runtime's key-value store (``wait_at_barrier``, through the
    coordinator), so that it needs no cross-process collectives: it works on CPU whatever
    ``jax_cpu_collectives_implementation`` is (``multihost_utils.sync_global_devices`` needs
    gloo or MPI there, and raises "Multiprocess computations aren't implemented on the CPU
    backend" without). Falls back to ``sync_global_devices`` if the client is not reachable.
    A no-op in a single process."""
    import jax

    if jax.process_count() == 1:
        return
    try:
        from jax._src import distributed  # the client has no public accessor in jax 0.10
        client = distributed.global_state.client
    except (ImportError, AttributeError):  # pragma: no cover (another jax)
        client = None
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(name, int(timeout_s * 1000))
        return
    from jax.experimental import multihost_utils  # pragma: no cover

    multihost_utils.sync_global_devices(name)  # pragma: no cover


# -- reading -----------------------------------------------------------------------------------


class ShardReader:
    """Iterates a streamed folder's blends in batches, as numpy or JAX arrays.

    Each epoch yields every blend exactly once. With ``shuffle=False`` blends come in global id
    order. With ``shuffle=True`` the order is a function of ``(seed, epoch)`` only: the shards'
    order is permuted, then blends are shuffled within a window of ``buffer_shards`` consecutive
    shards (blends left over from one window join the next), so that memory stays bounded by
    about ``buffer_shards`` shards whatever the size of the data set. The epoch counter starts
    at 0 and grows by one at each ``iter()``; `set_epoch` sets it.

    Args:
        out_dir: a folder written by `generate` (``manifest.json`` or per-process manifests).
        batch_size: blends per batch.
        shuffle: shuffle (see above).
        seed: the shuffling seed.
        as_jax: yield ``jax.Array`` instead of numpy arrays (``blend_list`` stays a list).
        keys: what each batch holds, among `PER_BLEND_KEYS`: "blend_images" [batch, band, y, x],
            "isolated_images" [batch, slot, band, y, x], "blend_list" (a list of astropy
            tables), "blend_ids" (the global ids, int64).
        drop_remainder: drop the last, smaller batch of an epoch.
        survey: which survey (default: the first saved).
        buffer_shards: shards shuffled together.
        verify: check every shard's SHA-256 against the manifest when the reader is made.
        allow_incomplete: read a folder whose run is not finished (only its written shards).
    """

    def __init__(self, out_dir, batch_size: int, shuffle: bool = False, seed: int = 0,
                 as_jax: bool = False, keys=("blend_images", "blend_ids"),
                 drop_remainder: bool = False, survey: str | None = None,
                 buffer_shards: int = 4, verify: bool = False, allow_incomplete: bool = False):
        self.out_dir = os.fspath(out_dir)
        self.batch_size = _check_positive("batch_size", batch_size)
        self.buffer_shards = _check_positive("buffer_shards", buffer_shards)
        self.shuffle = bool(shuffle)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}.")
        self.seed = int(seed)
        self.as_jax = bool(as_jax)
        self.drop_remainder = bool(drop_remainder)
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        bad = [k for k in keys if k not in PER_BLEND_KEYS]
        if bad or not keys:
            raise ValueError(f"keys must be a non-empty subset of {PER_BLEND_KEYS}, got {keys}.")
        self.keys = keys
        self.manifest = read_manifest(self.out_dir)
        shards = self.manifest["shards"]
        if not self.manifest.get("complete") and not allow_incomplete:
            have = {s["index"] for s in shards}
            missing = [k for k in range(self.manifest["n_shards"]) if k not in have]
            raise ManifestError(
                f"{self.out_dir!r}: the run is not complete (shards {missing[:10]}"
                f"{'...' if len(missing) > 10 else ''} of {self.manifest['n_shards']} missing); "
                "resume it, or pass allow_incomplete=True to read the written shards."
            )
        if verify:
            bad = [s["file"] for s in shards if not _verified(self.out_dir, s)]
            if bad:
                raise ManifestError(f"{self.out_dir!r}: shard(s) {bad} fail their SHA-256 check.")
        self.shards = shards
        surveys = self.manifest["config"]["surveys"]
        self.survey = surveys[0] if survey is None else survey
        if self.survey not in surveys:
            raise ValueError(f"survey {self.survey!r} is not in this run; its surveys are "
                             f"{surveys}.")
        if "isolated_images" in keys and not self.manifest["config"]["isolated"]:
            raise ValueError("keys has 'isolated_images' but the run was made with "
                             "isolated=False.")
        self.n_blends = sum(s["n_blends"] for s in shards)
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_remainder:
            return self.n_blends // self.batch_size
        return math.ceil(self.n_blends / self.batch_size)

    def set_epoch(self, epoch: int):
        """Sets the epoch whose order the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def _load(self, entry: dict) -> dict:
        import h5py

        from btkjax.utils import read_table

        path = os.path.join(self.out_dir, entry["file"])
        out = {}
        with h5py.File(path, "r") as f:
            g = f[self.survey]
            for key in self.keys:
                if key == "blend_ids":
                    out[key] = np.arange(entry["first_blend"], entry["stop_blend"], dtype=np.int64)
                elif key == "blend_list":
                    tables = g["blend_list"]
                    out[key] = [read_table(tables, f"{i:06d}")
                                for i in range(int(tables.attrs["length"]))]
                else:
                    out[key] = g[key][()]
        return out

    def _emit(self, parts: dict) -> dict:
        batch = {}
        for key, value in parts.items():
            if key == "blend_list":
                batch[key] = value
            elif self.as_jax:
                import jax.numpy as jnp

                batch[key] = jnp.asarray(value)
            else:
                batch[key] = value
        return batch

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        rng = np.random.default_rng([self.seed, epoch])
        order = list(range(len(self.shards)))
        if self.shuffle:
            order = list(rng.permutation(len(self.shards)))
        carry = None  # blends left over from the previous window: {key: array or list}
        window = self.buffer_shards if self.shuffle else 1
        for w in range(0, len(order), window):
            loaded = [self._load(self.shards[i]) for i in order[w:w + window]]
            if carry is not None:
                loaded.insert(0, carry)
            pool = {k: _concat([d[k] for d in loaded]) for k in self.keys}
            del loaded
            n = _length(pool[self.keys[0]])
            perm = rng.permutation(n) if self.shuffle else np.arange(n)
            full = n - n % self.batch_size
            for start in range(0, full, self.batch_size):
                idx = perm[start:start + self.batch_size]
                yield self._emit({k: _take(v, idx) for k, v in pool.items()})
            rest = perm[full:]
            carry = {k: _take(v, rest) for k, v in pool.items()} if len(rest) else None
        if carry is not None and not self.drop_remainder:
            yield self._emit(carry)


def _concat(values):
    if isinstance(values[0], list):
        return [x for v in values for x in v]
    return np.concatenate(values) if len(values) > 1 else values[0]


def _take(value, idx):
    if isinstance(value, list):
        return [value[i] for i in idx]
    return value[idx]


def _length(value) -> int:
    return len(value)
