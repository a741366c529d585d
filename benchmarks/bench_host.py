"""Host cost of the generator, and its two pipelines against the bare compiled step, in one run.

Job (small, for a shared 2-core machine): LSST, 6 bands, 24 arcsec stamps, the embedded default
catalog, DefaultSampling (max_number 3, shifts up to 3 arcsec), noise "all", isolated images,
float32, batch ``--batch-size`` (default 32), ``--batches`` timed batches after ``--warmup``
batches (compilation: the box ladder compiles one program per box size as it meets it).

Rows (medians over the timed batches; ``blend_list`` is NOT touched unless said):

- ``step (bare)``: the jitted `btkjax.core.step.simulate` on the generator's padded calls,
  results left on the device (``block_until_ready``): the floor for the step pipeline;
- ``generator, pipeline="step"``: ``next(CatsimGenerator(..., pipeline="step"))``;
- ``generator, pipeline="boxes"``: the box-ladder pipeline (the CPU default);
- ``generator, pipeline="boxes", blend_list read``: the same, every table built (what every
  batch cost before blend_list became lazy);
- ``main (old code)`` with ``--old-ref REF``: ``next(CatsimGenerator(...))`` of the git ref
  REF (``git archive``), in a subprocess, on the same job: the code before this change.

Columns: wall-clock blends/s; calling-thread CPU microseconds per blend (``time.thread_time``
around ``next``: the host work of the caller; on the CPU backend XLA computes on its own
threads); process CPU microseconds per blend (``time.process_time``: everything, rendering
included on CPU).

    python benchmarks/bench_host.py [--batch-size 32] [--batches 5] [--old-ref main]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine, table, write_json  # noqa: E402

JOB = dict(max_number=3, stamp_size=24.0, max_shift=3.0, seed=0)

TIMER = textwrap.dedent(
    """
    import json, sys, time, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    from btkjax.catalog import CatsimCatalog
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import get_surveys
    batch, batches, chunk, warmup = (int(a) for a in sys.argv[1:5])
    sf = DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0, seed=0)
    gen = CatsimGenerator(CatsimCatalog.default(), sf, get_surveys("LSST"), batch_size=batch,
                          stamp_size=24.0, seed=0, add_noise="all", isolated=True,
                          chunk=chunk, use_bar=False)
    for _ in range(warmup):
        next(gen)
    rows = []
    for _ in range(batches):
        w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
        next(gen)
        rows.append((time.perf_counter() - w, time.thread_time() - t, time.process_time() - p))
    print(json.dumps(np.median(np.array(rows), axis=0).tolist()))
    """
)


def _median_times(fn, batches, warmup):
    for _ in range(warmup):  # compilation (the box ladder compiles a program per new box size)
        fn()
    rows = []
    for _ in range(batches):
        w, t, p = time.perf_counter(), time.thread_time(), time.process_time()
        fn()
        rows.append((time.perf_counter() - w, time.thread_time() - t, time.process_time() - p))
    return np.median(np.array(rows), axis=0)


def _row(name, times, n):
    wall, thread, proc = times
    return {"path": name, "blends_per_s": n / wall, "thread_cpu_us_per_blend": 1e6 * thread / n,
            "process_cpu_us_per_blend": 1e6 * proc / n, "wall_s_per_batch": float(wall)}


def _old_ref(ref, batch, batches, chunk, warmup):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", repo, "archive", ref], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        env = dict(os.environ, PYTHONPATH=tmp)
        out = subprocess.run([sys.executable, "-c", TIMER, str(batch), str(batches), str(chunk),
                              str(warmup)],
                             capture_output=True, text=True, env=env, cwd=tmp, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--old-ref", default=None, help="git ref of the old code (e.g. main)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "host_cpu.json"))
    args = parser.parse_args(argv)

    import jax

    from btkjax.catalog import CatsimCatalog
    from btkjax.core.step import simulate
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.engine import padded_take, plan
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import get_surveys

    n = args.batch_size
    catalog = CatsimCatalog.default()
    survey = get_surveys("LSST")

    def generator(pipeline):
        return CatsimGenerator(catalog, DefaultSampling(**JOB), survey, batch_size=n,
                               stamp_size=24.0, seed=0, add_noise="all", isolated=True,
                               chunk=args.chunk, use_bar=False, pipeline=pipeline)

    rows = []
    gen_step = generator("step")
    step, keys = next(iter(gen_step.simulation_steps.values()))
    batch_no = [0]

    def bare():
        ids = np.arange(n) + n * batch_no[0]
        batch_no[0] += 1
        outs = [simulate(step.arrays, keys, jax.numpy.asarray(ids[padded_take(t)]), step.spec)
                for t in plan(n, args.chunk)]
        jax.block_until_ready(outs)

    rows.append(_row("step (bare)", _median_times(bare, args.batches, args.warmup), n))
    rows.append(_row('generator, pipeline="step"',
                     _median_times(lambda: next(gen_step), args.batches, args.warmup), n))
    gen_boxes = generator("boxes")
    rows.append(_row('generator, pipeline="boxes"',
                     _median_times(lambda: next(gen_boxes), args.batches, args.warmup), n))
    rows.append(_row('generator, pipeline="boxes", blend_list read',
                     _median_times(lambda: list(next(gen_boxes)["blend_list"]), args.batches,
                                   args.warmup), n))
    if args.old_ref:
        rows.append(_row(f"{args.old_ref} (old code), eager blend_list",
                         _old_ref(args.old_ref, n, args.batches, args.chunk, args.warmup), n))
    ratio = rows[1]["blends_per_s"] / rows[0]["blends_per_s"]
    payload = {
        "job": {"survey": "LSST", "catalog": "default", "batch_size": n, "chunk": args.chunk,
                "batches": args.batches, "noise": "all", "isolated": True, "dtype": "float32",
                **JOB, "step_fft_size": step.spec.render.fft_size},
        "machine": machine(),
        "rows": rows,
        "generator_step_over_bare_step": ratio,
        "note": "medians over the timed batches; shared machine",
    }
    write_json(args.out, payload)
    print(table(rows, ["path", "blends_per_s", "thread_cpu_us_per_blend",
                       "process_cpu_us_per_blend"]))
    print(f"generator (step pipeline) / bare step blends/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
