"""Two runs of `bench_deblend.py` on the same blends, compared blend by blend.

    python benchmarks/compare_rows.py A_rows.json B_rows.json [--method-a btkjax] [--method-b btkjax]

The inputs are ``--rows-out`` files of two runs on the same seeds and number of blends (so row
``k`` of both is the same true galaxy). For each blendedness bin it prints both methods' matched
counts and median |dflux/flux|, and the difference of the medians (B - A) with its 68% and 95%
intervals over bootstrap resamplings of the *blends*, the same resampling for both: a paired
comparison, much narrower than the two medians' own intervals, since most of the scatter of a
bin's median is which galaxies fall in it, and that is common to both runs. It is the tool the
tuning variants of `btkjax.deblend.ForwardModelMeasure` are chosen with (on the tuning seeds
only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_deblend import BINS  # noqa: E402  (the bins of the rows compared)

BOOTSTRAP = 2000


def _arrays(rows):
    """(blendedness, matched, dflux, blend index) arrays of one method's rows."""
    bl = np.array([r["blendedness"] for r in rows], float)
    matched = np.array([r["matched"] for r in rows], bool)
    dflux = np.array([r["dflux"] for r in rows], float)
    blend = np.array([r["blend"] for r in rows], int)
    return bl, matched, dflux, blend


def _median_or_nan(v):
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def paired(rows_a, rows_b, n_boot=BOOTSTRAP, seed=0):
    """Per bin: n_true, each method's matched count and median dflux, and the paired bootstrap
    percentiles (2.5, 16, 84, 97.5) of median_B - median_A (blends resampled)."""
    a, b = _arrays(rows_a), _arrays(rows_b)
    if len(a[0]) != len(b[0]) or not np.allclose(a[0], b[0]) or not np.array_equal(a[3], b[3]):
        raise ValueError("the two row files are not of the same blends (different true "
                         "galaxies, blendedness or blend order): run both on the same --set "
                         "and --n.")
    bl, blend = a[0], a[3]
    blends = np.unique(blend)
    members = {k: np.flatnonzero(blend == k) for k in blends}
    rng = np.random.default_rng(seed)
    picks = [np.concatenate([members[k] for k in rng.choice(blends, len(blends))])
             for _ in range(n_boot)]
    out = {}
    for name, lo, hi in BINS:
        sel = (bl >= lo) & (bl < hi)  # bench_deblend.py's bins
        da = np.where(a[1] & sel, a[2], np.nan)
        db = np.where(b[1] & sel, b[2], np.nan)
        diffs = np.array([_median_or_nan(db[p]) - _median_or_nan(da[p]) for p in picks])
        n_empty = int(np.sum(~np.isfinite(diffs)))  # resamplings without a matched galaxy
        diffs = diffs[np.isfinite(diffs)]
        pct = np.percentile(diffs, [2.5, 16, 84, 97.5]) if len(diffs) else np.full(4, np.nan)
        out[name] = {"n_true": int(sel.sum()), "matched_a": int((a[1] & sel).sum()),
                     "matched_b": int((b[1] & sel).sum()), "median_a": _median_or_nan(da),
                     "median_b": _median_or_nan(db), "n_boot_empty": n_empty,
                     "diff_percentiles": [float(v) for v in pct]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--method-a", default="btkjax")
    ap.add_argument("--method-b", default="btkjax")
    args = ap.parse_args(argv)
    with open(args.a) as fh:
        rows_a = json.load(fh)["rows"][args.method_a]
    with open(args.b) as fh:
        rows_b = json.load(fh)["rows"][args.method_b]
    res = paired(rows_a, rows_b)
    print(f"{'bin':10s} {'n':>4s} {'matched A/B':>12s} {'median A':>9s} {'median B':>9s}  "
          f"B - A: 68% / 95% paired interval")
    for name, r in res.items():
        p = r["diff_percentiles"]
        print(f"{name:10s} {r['n_true']:4d} {r['matched_a']:5d}/{r['matched_b']:<6d} "
              f"{r['median_a']:9.4f} {r['median_b']:9.4f}  "
              f"[{p[1]:+.4f}, {p[2]:+.4f}] / [{p[0]:+.4f}, {p[3]:+.4f}]")


if __name__ == "__main__":
    main()
