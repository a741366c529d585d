"""The generator end to end against the bare renderer and against BTK 1.0.9, in one run.

Job: LSST, 6 bands, 24 arcsec stamps, the embedded default catalog, DefaultSampling
(max_number 3, i <= 25.3, shifts up to 3 arcsec), noise "all", isolated images, batch 100.

- "renderer": the JAX path alone on blends sampled beforehand (sources, FFT-box routing,
  rendering, noise, copy to host) -- what bench_render.py times;
- "generator": ``next(CatsimGenerator(...))`` (sampling on device, the same rendering, and the
  blend tables);
- "BTK 1.0.9": ``next(btk.draw_blends.CatsimGenerator(...))`` of the blending-toolkit package
  (njobs=1) on the same catalog file, run in its own virtual environment (``make bench-btk``
  creates .bench-btk), timed in a subprocess during the same run.

    python benchmarks/bench_generator.py [--batch-size 100] [--batches 8] [--btk-python PATH]
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

from btkjax.catalog import CatsimCatalog  # noqa: E402
from btkjax.draw_blends import CatsimGenerator  # noqa: E402
from btkjax.sampling_functions import DefaultSampling  # noqa: E402
from btkjax.survey import get_surveys  # noqa: E402

BTK_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, warnings
    warnings.simplefilter("ignore")
    import btk, btk.catalog, btk.draw_blends, btk.sampling_functions, btk.survey
    path, batch, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    catalog = btk.catalog.CatsimCatalog.from_file(path)
    sf = btk.sampling_functions.DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0,
                                                seed=0, max_mag=25.3, mag_name="i_ab")
    gen = btk.draw_blends.CatsimGenerator(catalog, sf, btk.survey.get_surveys("LSST"),
                                          batch_size=batch, njobs=1, add_noise="all", seed=0)
    t0 = time.perf_counter(); next(gen); first = time.perf_counter() - t0
    times = []
    for _ in range(batches):
        t0 = time.perf_counter(); next(gen); times.append(time.perf_counter() - t0)
    print(json.dumps({"first_s": first, "best_s": min(times), "version": btk.__version__}))
    """
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--btk-batch-size", type=int, default=20)
    parser.add_argument("--btk-python", default=os.path.join(os.path.dirname(__file__), "..",
                                                             ".bench-btk", "bin", "python"))
    args = parser.parse_args(argv)

    catalog = CatsimCatalog.default()
    survey = get_surveys("LSST")
    sf = DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0, seed=0)
    gen = CatsimGenerator(catalog, sf, survey, batch_size=args.batch_size, add_noise="all",
                          seed=0, isolated=True)
    t0 = time.perf_counter()
    next(gen)
    gen_first = time.perf_counter() - t0
    gen_times = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        next(gen)
        gen_times.append(time.perf_counter() - t0)

    # the bare renderer on the blends of the generator's batch 0
    state = gen._states["LSST"]
    ids = np.arange(args.batch_size)
    blends, _ = gen._sample_tables(ids)
    ren_times = []
    for _ in range(args.batches):
        t0 = time.perf_counter()
        gen._draw_survey(state, blends, ids)
        ren_times.append(time.perf_counter() - t0)

    rows = [
        {"path": "btkjax renderer (JAX)", "blends_per_s": args.batch_size / min(ren_times),
         "first_batch_s": float("nan")},
        {"path": "btkjax CatsimGenerator (JAX)", "blends_per_s": args.batch_size / min(gen_times),
         "first_batch_s": gen_first},
    ]
    btk_info = None
    if os.path.exists(args.btk_python):
        with tempfile.TemporaryDirectory() as tmp:
            cat_path = os.path.join(tmp, "default_catalog.fits")
            catalog.get_raw_catalog().write(cat_path)
            script = os.path.join(tmp, "btk_bench.py")
            with open(script, "w") as f:
                f.write(BTK_SCRIPT)
            out = subprocess.run(
                [args.btk_python, script, cat_path, str(args.btk_batch_size), str(args.batches)],
                capture_output=True, text=True, check=True,
            )
            btk_info = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"path": f"BTK {btk_info['version']} (GalSim, njobs=1)",
                     "blends_per_s": args.btk_batch_size / btk_info["best_s"],
                     "first_batch_s": btk_info["first_s"]})
    else:
        print(f"(BTK not benchmarked: {args.btk_python} missing; run `make bench-btk`)")
    ratio = rows[1]["blends_per_s"] / rows[0]["blends_per_s"]
    for r in rows:
        r["vs_btk"] = (r["blends_per_s"] / rows[-1]["blends_per_s"]) if btk_info else float("nan")
    info = machine()
    print(f"Device: {info['devices']}, {info['cpu_count']} CPU cores; batch {args.batch_size} "
          f"(BTK batch {args.btk_batch_size}); generator / renderer = {ratio:.2f}")
    print(table(rows, ["path", "blends_per_s", "first_batch_s", "vs_btk"]))
    out_path = os.path.join(os.path.dirname(__file__), "results",
                            f"generator_{info['backend']}.json")
    write_json(out_path, {"machine": info, "rows": rows, "generator_over_renderer": ratio,
                          "batch_size": args.batch_size,
                          "when": time.strftime("%Y-%m-%d %H:%M")})
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
