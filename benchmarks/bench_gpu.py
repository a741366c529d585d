"""The simulation step and the generator on an accelerator: one command, under 5 minutes.

Job: LSST, 6 bands, 24 arcsec stamps, the embedded default catalog, DefaultSampling
(max_number 3, shifts up to 3 arcsec), noise "all", isolated images, float32.

- step: the jitted `btkjax.core.step.simulate` at call sizes 64, 128, ... (doubling) until the
  device runs out of memory, a call takes longer than ``--max-call-s``, or the time budget is
  spent: compile time (first call minus a steady call), steady blends/s (median of
  ``--repeat`` calls), peak device memory (``memory_stats()["peak_bytes_in_use"]`` where the
  backend reports it);
- generator: ``next(CatsimGenerator(..., pipeline="auto"))`` (the step pipeline on
  accelerators) at one batch size: blends/s, host microseconds per blend (calling-thread and
  process CPU time around ``next``, ``blend_list`` not touched), and its ratio to the bare step
  at the same call size.

Writes ``benchmarks/results/gpu_<backend>.json``. ``--tiny`` runs a few-second version on any
backend (call sizes 2 and 4, 6 arcsec stamps, faint galaxies) to check that the script works.

    python benchmarks/bench_gpu.py [--budget-s 240] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, write_json  # noqa: E402


def _peak_bytes(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return None if not stats else stats.get("peak_bytes_in_use")


def _is_oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--max-call-s", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import jax
    import jax.numpy as jnp

    from btkjax.catalog import CatsimCatalog
    from btkjax.core.step import simulate
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.simulation import make_step
    from btkjax.survey import get_surveys

    backend = jax.default_backend()
    device = jax.devices()[0]
    stamp = 6.0 if args.tiny else 24.0
    job = dict(max_number=3, stamp_size=stamp, max_shift=1.0 if args.tiny else 3.0, seed=0,
               **({"min_mag": 24.5} if args.tiny else {}))
    catalog = CatsimCatalog.default()
    survey = get_surveys("LSST")
    sizes = [2, 4] if args.tiny else [64 * 2**k for k in range(12)]
    rows, stop_reason = [], "all sizes run"
    for n in sizes:
        if time.perf_counter() - start > args.budget_s * 0.6:
            stop_reason = f"time budget before call size {n}"
            break
        inner = max(1, min(256, n // 8))
        try:
            step = make_step(catalog, survey, DefaultSampling(**job), noise="all",
                             isolated=True, chunk=inner, stamp_size=stamp)
            keys = step.keys(0)
            fn = jax.jit(lambda ids, step=step, keys=keys: simulate(step.arrays, keys, ids,
                                                                    step.spec))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jnp.arange(n)))
            first = time.perf_counter() - t0
            times = []
            for r in range(args.repeat):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(jnp.arange(n) + n * (r + 1)))
                times.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001 - an OOM ends the sweep, anything else raises
            if _is_oom(err):
                stop_reason = f"out of device memory at call size {n}"
                break
            raise
        steady = float(np.median(times))
        rows.append({"call_size": n, "inner_chunk": inner, "fft_size": step.spec.render.fft_size,
                     "compile_s": max(first - steady, 0.0), "steady_s": steady,
                     "blends_per_s": n / steady, "peak_device_bytes": _peak_bytes(device)})
        if steady > args.max_call_s:
            stop_reason = f"a call of {n} took {steady:.1f} s"
            break
    best = max(rows, key=lambda r: r["blends_per_s"])
    # the generator at the best call size (one batch = a few calls of that size)
    n_call = best["call_size"]
    gen = CatsimGenerator(catalog, DefaultSampling(**job), survey, batch_size=2 * n_call,
                          stamp_size=stamp, seed=0, add_noise="all", isolated=True,
                          chunk=n_call, use_bar=False, pipeline="auto")
    next(gen)
    gtimes = []
    for _ in range(args.repeat):
        w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
        next(gen)
        gtimes.append((time.perf_counter() - w, time.thread_time() - t, time.process_time() - p))
    wall, thread, proc = np.median(np.array(gtimes), axis=0)
    n_gen = 2 * n_call
    generator = {"pipeline": gen.pipeline, "batch_size": n_gen, "chunk": n_call,
                 "blends_per_s": n_gen / wall, "thread_cpu_us_per_blend": 1e6 * thread / n_gen,
                 "process_cpu_us_per_blend": 1e6 * proc / n_gen,
                 "over_bare_step": (n_gen / wall) / best["blends_per_s"]}
    payload = {"backend": backend, "device": str(device), "machine": machine(),
               "job": {"survey": "LSST", "catalog": "default", "noise": "all",
                       "isolated": True, "dtype": "float32", **job},
               "step": rows, "stop_reason": stop_reason, "generator": generator,
               "total_s": time.perf_counter() - start, "tiny": bool(args.tiny)}
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"gpu_{backend}{'_tiny' if args.tiny else ''}.json")
    write_json(out, payload)
    print(table(rows, ["call_size", "fft_size", "compile_s", "blends_per_s",
                       "peak_device_bytes"]))
    print(table([generator], list(generator)))
    print(f"stopped: {stop_reason}; wrote {out}")
    return payload


if __name__ == "__main__":
    main()
