"""Blends per second of the JAX renderer and of the GalSim backend, in the same run.

Job: LSST, 6 bands, 24 arcsec stamps (120 x 120 pixels), the embedded default catalog,
DefaultSampling (i <= 25.3, shifts up to 3 arcsec), up to 3 and up to 10 galaxies per blend,
noise "all", with and without isolated images. Both backends draw the SAME blends (sampled
once on the device); the JAX path includes source building, FFT-box routing, rendering, noise
and the copy of the images to host memory; the GalSim backend draws each galaxy with GalSim
(default gsparams, one process) and adds the same noise. Compile time (first call minus a
steady call) is reported apart. Wall-clock rates are the best of repeated calls; CPU time per
blend (all threads) is reported too, as the ratio a shared, loaded machine distorts least.

    python benchmarks/bench_render.py [--jax-blends 256] [--galsim-blends 24] [--quick]

Prints a markdown table and writes benchmarks/results/render_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, timed, write_json  # noqa: E402

from btkjax.catalog import CatsimCatalog  # noqa: E402
from btkjax.draw_blends import CatsimGenerator  # noqa: E402
from btkjax.sampling_functions import DefaultSampling  # noqa: E402
from btkjax.survey import get_surveys  # noqa: E402


def run_job(catalog, max_number, isolated, n_jax, n_galsim, dtype="float32"):
    survey = get_surveys("LSST")
    sf = DefaultSampling(max_number=max_number, stamp_size=24.0, max_shift=3.0, seed=0)
    common = dict(stamp_size=24.0, add_noise="all", seed=0, isolated=isolated, dtype=dtype)
    gen = CatsimGenerator(catalog, sf, survey, batch_size=n_jax, **common)
    state = gen._states["LSST"]
    ids = np.arange(n_jax)
    blends, _ = gen._sample_tables(ids)
    blends = jax.tree.map(np.asarray, blends)
    n_gal = float(np.asarray(blends.mask).sum(axis=1).mean())

    first, steady = timed(lambda: gen._draw_survey(state, blends, ids)[0], repeat=3)
    c0 = time.process_time()
    gen._draw_survey(state, blends, ids)
    jax_cpu = time.process_time() - c0
    sizes = np.unique(state.box_sizes(blends), return_counts=True)

    gen_gs = CatsimGenerator(catalog, sf, survey, batch_size=n_galsim, backend="galsim",
                             **common)
    gs_state = gen_gs._states["LSST"]
    sub = jax.tree.map(lambda a: a[:n_galsim], blends)
    # warm up (GalSim builds profile tables on first use; the noise step compiles for this
    # shape), then time two identical calls and keep the faster (as for the JAX path)
    gen_gs._draw_survey(gs_state, sub, ids[:n_galsim])
    galsim_s, galsim_cpu = float("inf"), float("inf")
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        gen_gs._draw_survey(gs_state, sub, ids[:n_galsim])
        galsim_s = min(galsim_s, time.perf_counter() - t0)
        galsim_cpu = min(galsim_cpu, time.process_time() - c0)

    jax_rate = n_jax / steady
    galsim_rate = n_galsim / galsim_s
    return {
        "max_number": max_number,
        "isolated": isolated,
        "mean_galaxies": round(n_gal, 2),
        "jax_blends_per_s": jax_rate,
        "jax_compile_s": max(first - steady, 0.0),
        "galsim_blends_per_s": galsim_rate,
        "speedup": jax_rate / galsim_rate,
        # CPU seconds per blend (all threads): the ratio a loaded machine distorts least
        "jax_cpu_ms_per_blend": 1e3 * jax_cpu / n_jax,
        "galsim_cpu_ms_per_blend": 1e3 * galsim_cpu / n_galsim,
        "cpu_speedup": (galsim_cpu / n_galsim) / (jax_cpu / n_jax),
        "fft_sizes": {int(k): int(v) for k, v in zip(*sizes, strict=False)},
        "jax_batch": n_jax,
        "galsim_blends": n_galsim,
        "dtype": dtype,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jax-blends", type=int, default=256)
    parser.add_argument("--galsim-blends", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="max_number 3 only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    catalog = CatsimCatalog.default()
    rows = []
    for max_number in (3,) if args.quick else (3, 10):
        for isolated in (True, False):
            row = run_job(catalog, max_number, isolated, args.jax_blends, args.galsim_blends)
            rows.append(row)
            print(row, flush=True)
    info = machine()
    device = info["backend"]
    print(f"\nDevice: {info['devices']}, {info['cpu_count']} CPU cores, jax {info['jax']}")
    print(table(rows, ["max_number", "isolated", "mean_galaxies", "jax_blends_per_s",
                       "jax_compile_s", "galsim_blends_per_s", "speedup", "jax_cpu_ms_per_blend",
                       "galsim_cpu_ms_per_blend", "cpu_speedup"]))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"render_{device}.json")
    write_json(out, {"machine": info, "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
