"""Detection alone, per blendedness bin: SEP (i band), SEP on the coadd, the learned detector
(``network``: at its own threshold, its best F1 on its calibration blends; ``network_deblend``:
at `btkjax.deblend.NETWORK_DEBLEND_THRESHOLD`, where `ForwardModelMeasure`'s fit starts).

    python benchmarks/bench_detection.py [--set report] [--n 200] [--batch 50]

The blends of `benchmarks/bench_deblend.py` (same seeds, sets and stamps: up to 5 LSST galaxies
on 24" stamps, noise "all"). For each detector and blendedness bin (BTK's, i band, from the
noiseless isolated images, as bench_deblend.py bins): the true galaxies, those matched
(Hungarian within ``MATCH_PX`` = 3 pixels, the learned detector's calibration radius, and
within bench_deblend.py's 5 pixels), and the detections that match no galaxy. Detection time
per blend (the network's compilation left out: each batch shape is run once before it is
timed). Writes benchmarks/results/detection_<set>.json
atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, table, write_json  # noqa: E402
from bench_deblend import BAND, BINS, MATCH_PX, SEEDS, blendedness  # noqa: E402

import btkjax  # noqa: E402
from btkjax.deblend import (  # noqa: E402
    COADD_SEP_KWARGS,
    NETWORK_DEBLEND_THRESHOLD,
    coadd_detections,
    detect,
    load_detector,
)
from btkjax.measure import sep_singleband_measure  # noqa: E402

RADII = (3.0, MATCH_PX)


def matched(tx, ty, dx, dy, radius):
    """[n_true] bool: matched by a detection within ``radius`` (Hungarian on distance)."""
    out = np.zeros(len(tx), bool)
    if len(tx) and len(dx):
        d = np.hypot(np.subtract.outer(tx, dx), np.subtract.outer(ty, dy))
        r, c = linear_sum_assignment(d)
        out[r[d[r, c] <= radius]] = True
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", choices=tuple(SEEDS), default="report")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        f"detection_{args.set}.json")
    catalog = btkjax.catalog.CatsimCatalog.default()
    survey = btkjax.survey.get_surveys("LSST")
    sky = np.array([btkjax.survey.get_mean_sky_level(survey, survey.get_filter(b))
                    for b in survey.available_filters])
    det = load_detector()
    per_seed = max(1, args.n // len(SEEDS[args.set]))
    rows = {k: [] for k in ("sep", "coadd", "network", "network_deblend")}
    spurious = {k: {r: 0 for r in RADII} for k in rows}
    n_det = {k: 0 for k in rows}
    seconds = {k: 0.0 for k in rows}
    shapes = set()
    for s_seed, d_seed in SEEDS[args.set]:
        sampler = btkjax.sampling_functions.DefaultSampling(max_number=5, min_number=1,
                                                            stamp_size=24.0, seed=s_seed)
        draw = btkjax.draw_blends.CatsimGenerator(catalog, sampler, survey,
                                                  batch_size=args.batch, stamp_size=24.0,
                                                  add_noise="all", seed=d_seed)
        done = 0
        while done < per_seed:
            batch = next(draw)
            nb = min(args.batch, per_seed - done)
            images = np.asarray(batch["blend_images"])[:nb]
            if images.shape not in shapes:  # compile (timed apart: not per blend)
                shapes.add(images.shape)
                detect(det, images, sky)
            t0 = time.perf_counter()
            x, y, heat, mask = detect(det, images, sky)
            seconds["network"] += time.perf_counter() - t0
            # the deblender's detections: the same peaks above its threshold (strongest first,
            # so the same as detecting at it)
            mask2 = mask & (heat > NETWORK_DEBLEND_THRESHOLD)
            seconds["network_deblend"] = seconds["network"]
            for i in range(nb):
                truth = batch["blend_list"][i]
                tx, ty = np.asarray(truth["x_peak"], float), np.asarray(truth["y_peak"], float)
                bl = blendedness(np.asarray(batch["isolated_images"][i][:len(tx), BAND], float))
                t0 = time.perf_counter()
                cat = sep_singleband_measure(batch, i)["catalog"]
                seconds["sep"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                cat2 = coadd_detections(images[i], sky, **COADD_SEP_KWARGS)
                seconds["coadd"] += time.perf_counter() - t0
                found = {"sep": (np.asarray(cat["x_peak"], float), np.asarray(cat["y_peak"],
                                                                              float)),
                         "coadd": (np.asarray(cat2["x_peak"], float),
                                   np.asarray(cat2["y_peak"], float)),
                         "network": (x[i][mask[i]], y[i][mask[i]]),
                         "network_deblend": (x[i][mask2[i]], y[i][mask2[i]])}
                for k, (dx, dy) in found.items():
                    n_det[k] += len(dx)
                    m = {r: matched(tx, ty, dx, dy, r) for r in RADII}
                    for r in RADII:
                        spurious[k][r] += len(dx) - int(m[r].sum())
                    rows[k] += [{"blendedness": float(b), **{f"m{r:g}": bool(m[r][j])
                                                            for r in RADII}}
                                for j, b in enumerate(bl)]
            done += nb
    n_blends = per_seed * len(SEEDS[args.set])
    out = []
    for k, rs in rows.items():
        b = np.array([r["blendedness"] for r in rs])
        for label, lo, hi in BINS:
            sel = (b >= lo) & (b < hi)
            out.append({"detector": k, "blendedness": label, "n_true": int(sel.sum()),
                        **{f"matched_{r:g}px": int(np.sum([rs[j][f"m{r:g}"]
                                                           for j in np.flatnonzero(sel)]))
                           for r in RADII}})
        out[-1].update({"n_detected": n_det[k],
                        **{f"unmatched_{r:g}px": spurious[k][r] for r in RADII},
                        "ms_per_blend": 1e3 * seconds[k] / n_blends})
    cols = ["detector", "blendedness", "n_true", "matched_3px", "matched_5px", "n_detected",
            "unmatched_3px", "unmatched_5px", "ms_per_blend"]
    print(table(out, cols))
    write_json(out_path, {"machine": machine(), "set": args.set, "seeds": SEEDS[args.set],
                          "n_blends": n_blends, "threshold": det.threshold,
                          "deblend_threshold": NETWORK_DEBLEND_THRESHOLD, "rows": out})


if __name__ == "__main__":
    main()
