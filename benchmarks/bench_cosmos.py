"""Throughput of CosmosGenerator: parametric and real COSMOS galaxies, JAX and GalSim backends.

Each row builds a generator on the example COSMOS catalogs (parametric: the 23.5 example with
its fits; real: the 26 extension example with its HST images) for one survey, draws a first
batch (compilation included for JAX: "first_s") and then `--repeat` more batches; throughput is
blends per second of the best of those batches (a batch that first meets a new FFT box size of
the ladder compiles it; the best batch is the steady state). The GalSim backend is the reference drawing
(default GSParams, as BTK, one process). Prints a table and writes
benchmarks/results/cosmos.json (atomically: a temporary file renamed over it).

Usage: python benchmarks/bench_cosmos.py [--survey LSST] [--batch-size 32] [--galsim-batch 8]
       [--repeat 3] [--dtype float32] [--data tests/data/cosmos]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent / "tests" / "data" / "cosmos"


def _catalog(data: Path, gal_type: str):
    from btkjax.cosmos import CosmosCatalog

    if gal_type == "parametric":
        files = [data / "real_galaxy_catalog_23.5_example.fits",
                 data / "real_galaxy_catalog_23.5_example_fits.fits"]
        return CosmosCatalog.from_file(files, exclusion_level="bad_fits")
    files = [data / "real_galaxy_catalog_26_extension_example.fits",
             data / "real_galaxy_catalog_26_extension_example_fits.fits"]
    return CosmosCatalog.from_file(files, exclusion_level="none")


def run_row(data, survey_name, gal_type, backend, batch_size, repeat, dtype):
    from btkjax.cosmos import CosmosGenerator
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import get_surveys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        catalog = _catalog(data, gal_type)
        t0 = time.perf_counter()
        gen = CosmosGenerator(catalog, DefaultSampling(max_number=3, stamp_size=24.0, seed=1),
                              get_surveys(survey_name), batch_size=batch_size, stamp_size=24.0,
                              add_noise="all", backend=backend, gal_type=gal_type, dtype=dtype)
        init_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        np.asarray(next(gen)["blend_images"])
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            np.asarray(next(gen)["blend_images"])
            times.append(time.perf_counter() - t0)
    batch_s = float(np.min(times))  # best batch: later box sizes of the ladder compile once
    return {
        "survey": survey_name, "gal_type": gal_type, "backend": backend,
        "dtype": dtype if backend == "jax" else "float64", "batch_size": batch_size,
        "init_s": init_s, "first_s": first_s,
        "compile_s": max(first_s - batch_s, 0.0) if backend == "jax" else 0.0,
        "batch_s": batch_s, "blends_per_s": batch_size / batch_s,
    }


def _write_atomic(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--survey", default="LSST")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--galsim-batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cosmos.json")
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    rows = []
    for gal_type in ("parametric", "real"):
        for backend in ("jax", "galsim"):
            batch = args.batch_size if backend == "jax" else args.galsim_batch
            rows.append(run_row(args.data, args.survey, gal_type, backend, batch, args.repeat,
                                args.dtype))
    print(f"{'gal_type':>10s} {'backend':>7s} {'batch':>5s} {'init s':>7s} {'compile s':>9s} "
          f"{'batch s':>8s} {'blends/s':>9s} {'vs galsim':>9s}")
    ref = {r["gal_type"]: r["blends_per_s"] for r in rows if r["backend"] == "galsim"}
    for r in rows:
        r["speedup_vs_galsim"] = r["blends_per_s"] / ref[r["gal_type"]]
        print(f"{r['gal_type']:>10s} {r['backend']:>7s} {r['batch_size']:5d} {r['init_s']:7.2f} "
              f"{r['compile_s']:9.2f} {r['batch_s']:8.3f} {r['blends_per_s']:9.1f} "
              f"{r['speedup_vs_galsim']:9.1f}")
    payload = {
        "benchmark": "cosmos",
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "rows": rows,
    }
    _write_atomic(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
