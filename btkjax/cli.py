"""The ``btkjax`` command line.

``btkjax generate``: the main job from a config file (JSON, or YAML when PyYAML is installed)
with flag overrides: generate N blends, optionally measure and score them, and save every batch
under ``--out`` (HDF5, see `btkjax.utils`), with a progress bar and a summary at the end.

``btkjax stream``: stream many blends to HDF5 shards with a manifest, resumable
(`btkjax.streaming`): ``btkjax stream --n-blends 100000 --out DIR [--shard-size S] [--resume]``;
COSMOS galaxies with ``--cosmos CATALOG [FITS_CATALOG] [--gal-type parametric]``; one process per
host or GPU with ``--distributed`` (``jax.distributed.initialize()``, e.g. under SLURM).

``btkjax demo``: the main job on the embedded default catalog: generate a batch of LSST blends
on the JAX path, write a picture of the first ones, print a summary.

Config keys of ``generate`` (all optional; flags override them): see `CONFIG_KEYS`. Example::

    {"n_blends": 64, "batch_size": 32, "catalog": "default", "sampler": "default",
     "sampler_kwargs": {"max_number": 3, "max_shift": 3.0}, "surveys": ["LSST"],
     "noise": "all", "seed": 0, "backend": "jax", "stamp_size": 24.0, "out": "btkjax_output",
     "measure": ["sep_singleband_measure"], "metrics": true}
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

__all__ = ["main", "ConfigError", "CONFIG_KEYS", "SAMPLERS", "load_config", "validate_config"]

# sampler name in configs -> class name in btkjax.sampling_functions
SAMPLERS = {
    "default": "DefaultSampling",
    "default_shear": "DefaultSamplingShear",
    "basic": "BasicSampling",
    "pair": "PairSampling",
    "density": "DensitySampling",
    "random_square": "RandomSquareSampling",
    "friends_of_friends": "FriendsOfFriendsSampling",
}
NOISE_MODES = ("all", "background", "galaxy", "none")
BACKENDS = ("jax", "galsim")
DTYPES = ("float32", "float64")

# key -> (default, description)
CONFIG_KEYS = {
    "n_blends": (64, "number of blends to generate (a multiple of batch_size)"),
    "batch_size": (64, "blends per batch (and per saved file)"),
    "catalog": ("default", "'default' (the embedded catalog) or the path of a CatSim-like file"),
    "sampler": ("default", f"sampling function: one of {sorted(SAMPLERS)}"),
    "sampler_kwargs": ({}, "extra arguments of the sampling function (e.g. max_number)"),
    "stamp_size": (24.0, "stamp side in arcsec"),
    "surveys": (["LSST"], "survey name or list of names"),
    "noise": ("all", f"noise mode: one of {list(NOISE_MODES)}"),
    "seed": (0, "integer seed of sampling, noise and augmentation"),
    "backend": ("jax", f"renderer: one of {list(BACKENDS)}"),
    "dtype": ("float32", f"image dtype: one of {list(DTYPES)}"),
    "out": ("btkjax_output", "output folder (created if missing)"),
    "measure": ([], "names of measure functions of btkjax.measure to run"),
    "metrics": (False, "score the measurements (needs measure)"),
    "metrics_kwargs": ({}, "extra arguments of btkjax.metrics.MetricsGenerator"),
    "cpus": (1, "processes for CPU work (GalSim backend, measurement)"),
}


class ConfigError(ValueError):
    """A bad config file or flag: the message names the key and what is allowed."""


def _check_out(out: str, option: str, create: bool = True) -> str:
    """The output folder: created if missing (with `create`); ConfigError naming `option` if it
    is a file or cannot be created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{option} {out!r} is a file; expected a folder (existing or new).")
    if not create:
        return out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {out!r} cannot be created as a folder: "
                          f"{err.strerror or err}.") from None
    return out


def _load_catalog(path: str, option: str):
    """The CatSim catalog of `option` ('default' or a file); ConfigError naming the file if it
    cannot be read or drawn."""
    from btkjax.catalog import CatalogError, CatsimCatalog

    if path == "default":
        return CatsimCatalog.default()
    try:
        return CatsimCatalog.from_file(path)
    except (CatalogError, OSError) as err:
        raise ConfigError(f"{option} {path!r}: {err}") from None


def _build(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a ValueError/TypeError from it (a bad argument) becomes a
    ConfigError naming `what`."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{what}: {err}") from None


def _rgb(images, bands=(3, 2, 1), q=8.0, stretch=None):
    """An asinh-stretched RGB of [band, y, x] images (Lupton et al. 2004 style)."""
    import numpy as np

    rgb = np.stack([images[b] for b in bands], axis=-1).astype(float)
    if stretch is None:
        stretch = max(np.percentile(rgb, 99.5), 1e-12)
    intensity = rgb.mean(axis=-1, keepdims=True)
    scale = np.arcsinh(q * np.clip(intensity, 0, None) / stretch) / q
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(intensity > 0, rgb * scale / intensity, 0.0)
    return np.clip(out / max(out.max(), 1e-12), 0, 1)


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import btkjax as btk
    from btkjax.catalog import CatsimCatalog
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import get_surveys

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {args.batch_size}.")
    _check_out(args.out, "--out", create=False)
    t0 = time.perf_counter()
    catalog = CatsimCatalog.default()
    sampler = _build("--max-number/--max-shift/--stamp-size/--seed", DefaultSampling,
                     max_number=args.max_number, stamp_size=args.stamp_size,
                     max_shift=args.max_shift, seed=args.seed)
    survey = _build("--survey", get_surveys, args.survey)
    generator = _build("btkjax demo", CatsimGenerator, catalog, sampler, survey,
                       batch_size=args.batch_size, stamp_size=args.stamp_size,
                       add_noise=args.noise, seed=args.seed)
    _check_out(args.out, "--out")
    t1 = time.perf_counter()
    batch = next(generator)
    t2 = time.perf_counter()
    batch = next(generator)
    t3 = time.perf_counter()

    images = batch["blend_images"]
    n_show = min(4, len(images))
    fig, axes = plt.subplots(1, n_show, figsize=(3 * n_show, 3.2))
    axes = np.atleast_1d(axes)
    bands = survey.available_filters
    rgb_bands = tuple(bands.index(b) for b in ("i", "r", "g")) if set("irg") <= set(bands) else (0,) * 3
    for ax, img, table in zip(axes, images[:n_show], batch["blend_list"][:n_show], strict=False):
        ax.imshow(_rgb(img, rgb_bands), origin="lower")
        ax.scatter(table["x_peak"], table["y_peak"], marker="x", color="red", s=20)
        ax.set_title(f"{len(table)} galaxies")
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(args.out, "blends.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

    n_gal = np.array([len(t) for t in batch["blend_list"]])
    print(f"btkjax {btk.__version__}: {args.batch_size} {survey.name} blends "
          f"({len(bands)} bands, {images.shape[-1]} x {images.shape[-2]} pixels, "
          f"noise={args.noise!r}) from the embedded default catalog ({len(catalog)} galaxies)")
    print(f"  galaxies per blend: mean {n_gal.mean():.2f}, min {n_gal.min()}, max {n_gal.max()}")
    print(f"  set-up {t1 - t0:.2f} s; first batch (with compilation) {t2 - t1:.2f} s; "
          f"next batch {t3 - t2:.2f} s ({args.batch_size / (t3 - t2):.1f} blends/s)")
    print(f"  picture: {path}")
    return 0


def load_config(path) -> dict:
    """Reads a JSON or YAML (``.yaml``/``.yml``, needs PyYAML) config file into a dict."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist.")
    with open(path) as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path}: YAML configs need PyYAML (pip install pyyaml); or write it as JSON."
            ) from None
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(config).__name__}.")
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sampler_class(name):
    import btkjax.sampling_functions as sf

    return getattr(sf, SAMPLERS[name])


def validate_config(config: dict, source: str = "config") -> dict:
    """Checks every key and value of a config, before any work; returns it with defaults.

    Raises:
        ConfigError: naming the bad key or value and what is allowed.
    """
    unknown = [k for k in config if k not in CONFIG_KEYS]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r}; allowed keys are {sorted(CONFIG_KEYS)}."
        )
    c = {k: v[0] for k, v in CONFIG_KEYS.items()}
    c.update(config)

    def bad(key, expected):
        raise ConfigError(f"{source}: {key!r} must be {expected}, got {c[key]!r}.")

    for key in ("n_blends", "batch_size", "cpus"):
        if not _is_int(c[key]) or c[key] < 1:
            bad(key, "a positive integer")
    if not _is_int(c["seed"]) or not 0 <= c["seed"] < 2**63:
        bad("seed", "an integer in [0, 2**63)")
    if isinstance(c["stamp_size"], bool) or not isinstance(c["stamp_size"], (int, float)) \
            or not c["stamp_size"] > 0:
        bad("stamp_size", "a positive number (arcsec)")
    for key, allowed in (("noise", NOISE_MODES), ("backend", BACKENDS), ("dtype", DTYPES),
                         ("sampler", tuple(SAMPLERS))):
        if c[key] not in allowed:
            bad(key, f"one of {list(allowed)}")
    if not isinstance(c["metrics"], bool):
        bad("metrics", "true or false")
    if not isinstance(c["out"], str) or not c["out"]:
        bad("out", "a folder path")
    for key in ("sampler_kwargs", "metrics_kwargs"):
        if not isinstance(c[key], dict):
            bad(key, "a mapping of argument names to values")
    if c["batch_size"] > c["n_blends"]:
        c["batch_size"] = c["n_blends"]
    if c["n_blends"] % c["batch_size"]:
        raise ConfigError(
            f"{source}: 'n_blends' ({c['n_blends']}) must be a multiple of 'batch_size' "
            f"({c['batch_size']}): every batch has batch_size blends."
        )
    # catalog
    if not isinstance(c["catalog"], str):
        bad("catalog", "'default' or a file path")
    if c["catalog"] != "default" and not os.path.isfile(c["catalog"]):
        raise ConfigError(
            f"{source}: 'catalog' must be 'default' or an existing file, got {c['catalog']!r} "
            "(no such file)."
        )
    # surveys
    surveys = [c["surveys"]] if isinstance(c["surveys"], str) else c["surveys"]
    if not isinstance(surveys, list) or not surveys or not all(isinstance(s, str) for s in surveys):
        bad("surveys", "a survey name or a non-empty list of names")
    from btkjax.survey import available_surveys

    known = available_surveys()
    for s in surveys:
        if s not in known:
            raise ConfigError(f"{source}: 'surveys' has unknown survey {s!r}; allowed: {known}.")
    if len(set(surveys)) != len(surveys):
        bad("surveys", "a list of distinct names")
    c["surveys"] = surveys
    # sampler arguments
    params = inspect.signature(_sampler_class(c["sampler"])).parameters
    allowed = sorted(p for p in params if p not in ("stamp_size", "seed"))
    for k in c["sampler_kwargs"]:
        if k not in allowed:
            raise ConfigError(
                f"{source}: 'sampler_kwargs' has key {k!r}, which sampler {c['sampler']!r} "
                f"({SAMPLERS[c['sampler']]}) does not take; allowed: {allowed}."
            )
    # measure functions
    measure = [c["measure"]] if isinstance(c["measure"], str) else c["measure"]
    if not isinstance(measure, list) or not all(isinstance(m, str) for m in measure):
        bad("measure", "a name or a list of names of measure functions")
    c["measure"] = measure
    if measure:
        try:
            import btkjax.measure as meas
        except ImportError as err:
            raise ConfigError(f"{source}: 'measure' needs btkjax.measure ({err}).") from None
        for m in measure:
            if not callable(getattr(meas, m, None)) or m.startswith("_"):
                names = sorted(n for n in dir(meas) if n.endswith("_measure")
                               and callable(getattr(meas, n)))
                raise ConfigError(
                    f"{source}: 'measure' has unknown measure function {m!r}; allowed: {names}."
                )
    if c["metrics"] and not measure:
        raise ConfigError(f"{source}: 'metrics' is true but 'measure' is empty: metrics score "
                          "measurements; name at least one measure function.")
    return c


def _flag_overrides(args) -> dict:
    overrides = {}
    for key, attr in (("n_blends", "n_blends"), ("catalog", "catalog"), ("sampler", "sampler"),
                      ("surveys", "surveys"), ("noise", "noise"), ("seed", "seed"),
                      ("backend", "backend"), ("batch_size", "batch_size"), ("out", "out"),
                      ("measure", "measure"), ("stamp_size", "stamp_size"), ("cpus", "cpus")):
        value = getattr(args, attr)
        if value is not None:
            overrides[key] = value
    if args.metrics:
        overrides["metrics"] = True
    return overrides


def _generate(args) -> int:
    t0 = time.perf_counter()
    config = load_config(args.config) if args.config else {}
    source = args.config or "command line"
    config = validate_config({**config, **_flag_overrides(args)}, source)

    import numpy as np
    from tqdm.auto import tqdm

    import btkjax
    from btkjax import utils
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.survey import get_surveys

    c = config
    _check_out(c["out"], f"{source}: 'out'", create=False)
    cls = _sampler_class(c["sampler"])
    sampler = _build(f"{source}: 'sampler_kwargs' {c['sampler_kwargs']} of sampler "
                     f"{c['sampler']!r} ({cls.__name__})", cls, stamp_size=c["stamp_size"],
                     seed=c["seed"], **c["sampler_kwargs"])
    catalog = _load_catalog(c["catalog"], f"{source}: 'catalog'")
    _check_out(c["out"], f"{source}: 'out'")
    surveys = get_surveys(c["surveys"])
    draw = _build(f"{source}", CatsimGenerator,
        catalog, sampler, surveys, batch_size=c["batch_size"], stamp_size=c["stamp_size"],
        cpus=c["cpus"], add_noise=c["noise"], seed=c["seed"], save_path=c["out"],
        backend=c["backend"], dtype=c["dtype"], use_bar=False,
    )
    generator = draw
    if c["measure"]:
        import btkjax.measure as meas

        functions = [getattr(meas, m) for m in c["measure"]]
        generator = meas.MeasureGenerator(functions if len(functions) > 1 else functions[0],
                                          draw, save_path=c["out"])
        if c["metrics"]:
            import btkjax.metrics as metrics

            generator = metrics.MetricsGenerator(generator, save_path=c["out"],
                                                 **c["metrics_kwargs"])
    n_batches = c["n_blends"] // c["batch_size"]
    run = {"config": c, "versions": utils.package_versions(), "n_batches": n_batches}
    _write_json_atomic(os.path.join(c["out"], "run.json"), run)
    t1 = time.perf_counter()
    n_galaxies = []
    detection = {}
    for _ in tqdm(range(n_batches), desc="btkjax generate", unit="batch",
                  disable=args.no_progress):
        out = next(generator)
        blends = out[0] if isinstance(out, tuple) else out
        tables = blends["blend_list"]
        tables = next(iter(tables.values())) if isinstance(tables, dict) else tables
        n_galaxies.extend(len(t) for t in tables)
        if isinstance(out, tuple) and len(out) == 3:
            for name, scores in (out[2].get("detection") or {}).items():
                for key in ("precision", "recall", "f1"):
                    if isinstance(scores, dict) and key in scores:
                        detection.setdefault(name, {}).setdefault(key, []).append(
                            float(scores[key]))
    t2 = time.perf_counter()
    n_gal = np.array(n_galaxies)
    files = sorted(f for f in os.listdir(c["out"]) if f.endswith(".h5"))
    print(f"btkjax {btkjax.__version__} generate: {c['n_blends']} blends in {n_batches} "
          f"batch(es) of {c['batch_size']}, surveys {c['surveys']}, catalog {c['catalog']!r}, "
          f"sampler {c['sampler']!r}, noise {c['noise']!r}, backend {c['backend']!r}, "
          f"seed {c['seed']}")
    print(f"  galaxies per blend: mean {n_gal.mean():.2f}, min {n_gal.min()}, max {n_gal.max()}")
    if c["measure"]:
        print(f"  measured with {c['measure']}" + (" and scored" if c["metrics"] else ""))
    for name, scores in detection.items():
        text = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in scores.items())
        print(f"  detection ({name}): {text}")
    print(f"  set-up {t1 - t0:.2f} s; {n_batches} batch(es) {t2 - t1:.2f} s "
          f"({c['n_blends'] / max(t2 - t1, 1e-9):.1f} blends/s)")
    print(f"  saved {len(files)} HDF5 file(s) and run.json in {c['out']}; load them with "
          f"btkjax.utils.load_all_results({c['out']!r}, {c['surveys']}, {c['measure']}, "
          f"n_batch={c['batch_size']}, batch_index=i)")
    return 0


def _write_json_atomic(path, obj):
    from btkjax.utils import atomic_file

    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, default=repr)


def _add_generate_parser(sub):
    gen = sub.add_parser(
        "generate", help="generate blends from a config file, optionally measure and score, save",
        description="Generate N blends from a config file (JSON, or YAML with PyYAML) with flag "
                    "overrides; optionally measure and score them; save every batch as HDF5 "
                    "under --out. Config keys: " + "; ".join(
                        f"{k} ({v[1]}, default {v[0]!r})" for k, v in CONFIG_KEYS.items()),
    )
    gen.add_argument("--config", help="JSON or YAML config file (keys: see above)")
    gen.add_argument("--n-blends", type=int, help="number of blends")
    gen.add_argument("--catalog", help="'default' (embedded catalog) or a catalog file path")
    gen.add_argument("--sampler", help=f"one of {sorted(SAMPLERS)}")
    gen.add_argument("--surveys", nargs="+", help="survey names, e.g. LSST HSC")
    gen.add_argument("--noise", help=f"one of {list(NOISE_MODES)}")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--backend", help=f"one of {list(BACKENDS)}")
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--stamp-size", type=float, help="arcsec")
    gen.add_argument("--cpus", type=int)
    gen.add_argument("--out", help="output folder")
    gen.add_argument("--measure", nargs="+", help="measure functions of btkjax.measure")
    gen.add_argument("--metrics", action="store_true", help="score the measurements")
    gen.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return gen


def _add_stream_parser(sub):
    st = sub.add_parser(
        "stream", help="stream N blends to HDF5 shards with a manifest (resumable)",
        description="Draw N blends on the JAX path and write them, as they are made, to HDF5 "
                    "shards of a fixed number of blends under --out, with a manifest (config, "
                    "shard list, sizes, SHA-256). An interrupted run continues with --resume and "
                    "yields the same files. See btkjax.streaming.",
    )
    st.add_argument("--n-blends", type=int, required=True, help="number of blends")
    st.add_argument("--out", required=True, help="output folder")
    st.add_argument("--shard-size", type=int, default=128, help="blends per shard file "
                    "(default: %(default)s)")
    st.add_argument("--batch-size", type=int, default=32, help="blends per generator batch; "
                    "divides --shard-size (default: %(default)s)")
    st.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    st.add_argument("--surveys", nargs="+", default=["LSST"], help="survey names (default: LSST)")
    st.add_argument("--noise", default="all", choices=NOISE_MODES)
    st.add_argument("--catalog", default="default",
                    help="'default' (embedded catalog) or a catalog file path")
    st.add_argument("--cosmos", nargs="+", default=None, metavar="FILE",
                    help="draw COSMOS galaxies (CosmosGenerator) from GalSim's COSMOS catalog: "
                         "the real-galaxy catalog file [and its _fits file]; instead of --catalog")
    st.add_argument("--gal-type", default=None, choices=("real", "parametric"),
                    help="with --cosmos: HST images or parametric fits (default: real)")
    st.add_argument("--cosmos-exclusion", default="marginal",
                    choices=("none", "bad_stamp", "bad_fits", "marginal"),
                    help="with --cosmos: GalSim's exclusion level (default: %(default)s)")
    st.add_argument("--max-number", type=int, default=3, help="galaxies per blend at most")
    st.add_argument("--max-shift", type=float, default=None,
                    help="arcsec (default: stamp size / 10)")
    st.add_argument("--stamp-size", type=float, default=24.0, help="arcsec")
    st.add_argument("--no-isolated", action="store_true", help="do not save isolated images")
    st.add_argument("--dtype", default="float32", choices=DTYPES)
    st.add_argument("--compression", default="gzip", choices=("gzip", "lzf", "none"))
    st.add_argument("--devices", default=None,
                    help="shard the renderer over local devices: 'all' or a count "
                         "(default: the default device)")
    st.add_argument("--resume", action="store_true", help="continue the run in --out")
    st.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() first (one process per host)")
    st.add_argument("--process-index", type=int, default=None,
                    help="this process's index (default: jax.process_index())")
    st.add_argument("--process-count", type=int, default=None,
                    help="number of processes (default: jax.process_count())")
    st.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return st


def _stream(args) -> int:
    t0 = time.perf_counter()
    if args.n_blends is None or args.n_blends < 1:
        raise ConfigError(f"--n-blends must be a positive integer, got {args.n_blends!r}.")
    for option, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size),
                          ("--max-number", args.max_number)):
        if value < 1:
            raise ConfigError(f"{option} must be a positive integer, got {value}.")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be an integer in [0, 2**63), got {args.seed}.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out!r} is a file; expected a folder (existing or new).")
    if args.catalog != "default" and not os.path.isfile(args.catalog):
        raise ConfigError(f"--catalog must be 'default' or an existing file, got "
                          f"{args.catalog!r} (no such file).")
    if args.cosmos is not None:
        if args.catalog != "default":
            raise ConfigError("--cosmos and --catalog exclude each other (one catalog per run).")
        if len(args.cosmos) > 2:
            raise ConfigError(f"--cosmos takes the real-galaxy catalog and, optionally, its fits "
                              f"catalog: 1 or 2 files, got {len(args.cosmos)}.")
        for f in args.cosmos:
            if not os.path.isfile(f):
                raise ConfigError(f"--cosmos file {f!r} does not exist.")
    elif args.gal_type is not None:
        raise ConfigError(f"--gal-type {args.gal_type} needs --cosmos (CatSim galaxies have no "
                          "galaxy type).")
    from btkjax.survey import available_surveys

    for s in args.surveys:
        if s not in available_surveys():
            raise ConfigError(f"--surveys has unknown survey {s!r}; allowed: "
                              f"{available_surveys()}.")
    devices = args.devices
    if devices is not None and devices != "all":
        try:
            devices = int(devices)
        except ValueError:
            raise ConfigError(f"--devices must be 'all' or a count, got {devices!r}.") from None
    if args.distributed:
        import jax

        jax.distributed.initialize()

    import btkjax
    from btkjax import streaming
    from btkjax.catalog import CatalogError, CosmosCatalog

    if args.cosmos is not None:
        try:
            catalog = CosmosCatalog.from_file(
                args.cosmos[0] if len(args.cosmos) == 1 else args.cosmos,
                exclusion_level=args.cosmos_exclusion)
        except (OSError, ValueError, CatalogError) as err:
            raise ConfigError(f"--cosmos {args.cosmos}: cannot read the catalog: {err}") from None
    else:
        catalog = _load_catalog(args.catalog, "--catalog")
    try:
        manifest = streaming.generate(
            args.n_blends, args.out, catalog=catalog, surveys=args.surveys,
            shard_size=args.shard_size, batch_size=args.batch_size, seed=args.seed,
            add_noise=args.noise, stamp_size=args.stamp_size, max_number=args.max_number,
            max_shift=args.max_shift, isolated=not args.no_isolated, dtype=args.dtype,
            compression=None if args.compression == "none" else args.compression,
            devices=devices, resume=args.resume, process_index=args.process_index,
            process_count=args.process_count, progress=not args.no_progress,
            gal_type=args.gal_type,
        )
    except (streaming.ManifestError, FileExistsError, NotADirectoryError) as err:
        raise ConfigError(str(err)) from None
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    t1 = time.perf_counter()
    shards = manifest["shards"]
    n = sum(s["n_blends"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    print(f"btkjax {btkjax.__version__} stream: {n} blends in {len(shards)} shard(s) of up to "
          f"{manifest['shard_size']} (process {manifest['process_index']} of "
          f"{manifest['process_count']}), surveys {args.surveys}, noise {args.noise!r}, seed "
          f"{args.seed}; complete: {manifest['complete']}")
    print(f"  {t1 - t0:.2f} s in all, {size / 2**20:.1f} MiB in {args.out}; read them with "
          f"btkjax.streaming.ShardReader({args.out!r}, batch_size=...)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="btkjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate blends on the default catalog, plot, summarize")
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--max-number", type=int, default=3)
    demo.add_argument("--stamp-size", type=float, default=24.0, help="arcsec")
    demo.add_argument("--max-shift", type=float, default=3.0, help="arcsec")
    demo.add_argument("--survey", default="LSST")
    demo.add_argument("--noise", default="all", choices=("all", "background", "galaxy", "none"))
    demo.add_argument("--seed", type=int, default=0)
    _add_generate_parser(sub)
    _add_stream_parser(sub)
    args = parser.parse_args(argv)
    run = {"demo": _demo, "stream": _stream, "generate": _generate}[args.command]
    from btkjax.catalog import CatalogError
    from btkjax.survey import SurveyError

    try:
        return run(args)
    except (ConfigError, CatalogError, SurveyError) as err:
        message = " ".join(str(err).split())  # one line
        print(f"btkjax {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
