"""Calibrates (``--fit``) or checks (``--check``) `btkjax.deblend.FLUX_ERROR_MODEL`.

    python benchmarks/bench_deblend.py --set tune --n 100 --scarlet2-per-batch 0 --variant '' \
        --rows-out tune_rows.json
    python benchmarks/calibrate_flux_errors.py --fit tune_rows.json [tune2_rows.json ...]
    python benchmarks/bench_deblend.py --set report ... --rows-out report_rows.json
    python benchmarks/calibrate_flux_errors.py --check report_rows.json

The rows are bench_deblend.py's per-galaxy scores of ``ForwardModelMeasure`` (method
``btkjax``): for each true galaxy matched to a fitted one, the i-band flux of its deblended
image and of its isolated image, the fitted flux ``F``, its Fisher error and its blendedness in
the fitted models ``b`` (catalog columns ``i_flux_err_fisher``, ``i_blendedness``). The pull of
a galaxy is (deblended - isolated) / sigma, with

    sigma^2 = fisher^2 + (floor * F)^2 + (blend * b * F)^2      (`FluxErrorModel`).

``--band b``: another band's pulls instead of the i band's (the rows' ``bands``; binned by that
band's true blendedness), or a comma list of bands: ``--fit`` fits each band on its own pulls
(``FluxErrorModel.bands``; the record's ``per_band``), ``--check`` checks each with its own
coefficients (`btkjax.deblend.FluxErrorModel.coefficients`).

``--fit``: the (floor, blend) on a grid (steps 0.0025 and 0.01) that minimizes the sum over the
blendedness bins < 0.1, 0.1 - 0.5 and > 0.5 (the true blendedness, as bench_deblend.py bins) of
ln(robust width)^2, robust width = 1.4826 x the median absolute deviation of the pulls (1 when
the errors are calibrated; robust, since a galaxy matched to the wrong fit is an outlier that
no error model should chase). ``--check``: the same statistics for the model in btkjax (or
``--model floor,blend``). Both print, per bin, the robust width, the median and the fraction of
pulls within 1 and 2 (0.683 and 0.954 for Gaussian pulls) and the 68.3% and 95.4% quantiles of
|pull| (1 and 2 for Gaussian pulls), with the Fisher errors alone beside,
and write the JSON ``--out`` (default benchmarks/results/flux_error_calibration.json for
``--fit``) atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, table, write_json  # noqa: E402

from btkjax.deblend import FLUX_ERROR_MODEL  # noqa: E402

BINS = (("< 0.1", -np.inf, 0.1), ("0.1 - 0.5", 0.1, 0.5), ("> 0.5", 0.5, np.inf),
        ("all", -np.inf, np.inf))
FLOORS = np.arange(0.0, 0.15, 0.0025)
BLENDS = np.arange(0.0, 3.0, 0.01)


def load(path, method="btkjax", band="i"):
    """Arrays of the matched galaxies with finite values in bench rows ``path`` (a file, or a
    list of files whose rows are concatenated): the i band's columns (binned by the i band's
    true blendedness), or with ``band`` another band's (``bands`` of each row; binned by that
    band's true blendedness). ``method``: the rows' method (bench_deblend.py's name)."""
    rows = []
    for one in [path] if isinstance(path, str | os.PathLike) else path:
        with open(one) as fh:
            by_method = json.load(fh)["rows"]
        if method not in by_method:
            raise ValueError(f"{one} has no rows of method {method!r}; it has "
                             f"{sorted(by_method)}.")
        rows += by_method[method]
    if band == "i":
        rows = [r for r in rows if r["matched"] and "i_flux_err_fisher" in r]
        get = lambda k: np.array([r[k] for r in rows], float)  # noqa: E731
        # ("flux_fit": the fitted i flux in rows written before 2026-12-02 07:40 UTC)
        keys = {"true_b": "blendedness",
                "flux": "i_flux" if rows and "i_flux" in rows[0] else "flux_fit",
                "fisher": "i_flux_err_fisher", "b": "i_blendedness"}
    else:
        rows = [r["bands"][band] for r in rows if r["matched"] and band in r.get("bands", {})]
        get = lambda k: np.array([r[k] for r in rows], float)  # noqa: E731
        keys = {"true_b": "blendedness", "flux": "flux_fit", "fisher": "flux_err_fisher",
                "b": "blendedness_fit"}
    if not rows:
        raise ValueError(f"{path} has no matched {method} galaxy with {band}-band errors; "
                         f"run bench_deblend.py with --rows-out on this version.")
    d = {k: get(v) for k, v in keys.items()}
    d["diff"] = get("flux") - get("flux_true")
    finite = np.all([np.isfinite(v) for v in d.values()], axis=0)
    if not finite.all():
        # a galaxy with a NaN error (a Hessian not positive definite) or a non-finite image:
        # said, and left out
        print(f"{path}: {int((~finite).sum())} of {len(finite)} matched galaxies have a "
              f"non-finite value and are left out.")
    return {k: v[finite] for k, v in d.items()}


def pulls(d, floor, blend):
    sigma = np.sqrt(d["fisher"] ** 2 + (floor * d["flux"]) ** 2 + (blend * d["b"] * d["flux"]) ** 2)
    return d["diff"] / sigma


def stats(d, floor, blend):
    """Per bin: n, robust width, median, fraction within 1 and within 2."""
    p = pulls(d, floor, blend)
    out = []
    for label, lo, hi in BINS:
        v = p[(d["true_b"] >= lo) & (d["true_b"] < hi)]
        if not len(v):
            raise ValueError(f"No matched galaxy in the blendedness bin {label}: the rows cannot "
                             f"calibrate or check it.")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"Non-finite pulls in the blendedness bin {label} (floor={floor}, "
                             f"blend={blend}).")
        med = float(np.median(v))
        out.append({"blendedness": label, "n": int(len(v)),
                    "width": float(1.4826 * np.median(np.abs(v - med))), "median": med,
                    "within_1": float(np.mean(np.abs(v) < 1)),
                    "within_2": float(np.mean(np.abs(v) < 2)),
                    "abs_q68": float(np.quantile(np.abs(v), 0.683)),
                    "abs_q95": float(np.quantile(np.abs(v), 0.954))})
    return out


def objective(d, floor, blend):
    return sum(np.log(s["width"]) ** 2 for s in stats(d, floor, blend)[:3])


def fit(d, floors=FLOORS, blends=BLENDS):
    """The (floor, blend) of the grid ``floors`` x ``blends`` of least `objective`."""
    best = min((objective(d, a, c), a, c) for a in floors for c in blends)
    return float(round(best[1], 4)), float(round(best[2], 4))


def main(argv=None):
    ap = argparse.ArgumentParser()
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--fit", metavar="ROWS", nargs="+", help="rows files (concatenated)")
    what.add_argument("--check", metavar="ROWS", nargs="+", help="rows files (concatenated)")
    ap.add_argument("--method", default="btkjax", help="the rows' method (default btkjax)")
    ap.add_argument("--model", default=None, help="floor,blend to check (default btkjax's)")
    ap.add_argument("--band", default="i",
                    help="the band whose pulls are fitted or checked, or a comma list (e.g. "
                         "u,g,r,i,z,y): each band fitted on its own pulls, or checked with its "
                         "own coefficients (`FluxErrorModel.coefficients`)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    path = args.fit or args.check
    bands = args.band.split(",")
    data = {band: load(path, method=args.method, band=band) for band in bands}
    if args.fit:
        coef = {band: fit(data[band]) for band in bands}
    elif args.model:
        floor, blend = (float(v) for v in args.model.split(","))
        coef = {band: (floor, blend) for band in bands}
    else:
        coef = {band: FLUX_ERROR_MODEL.coefficients(band) for band in bands}
    rows = []
    for band in bands:
        floor, blend = coef[band]
        rows += ([{"band": band, "errors": "fisher", **s} for s in stats(data[band], 0.0, 0.0)] +
                 [{"band": band, "errors": f"floor {floor:g}, blend {blend:g}", **s}
                  for s in stats(data[band], floor, blend)])
    print(f"{'fitted on' if args.fit else 'checked on'} {' '.join(path)} ({args.method}): " +
          ", ".join(f"{band} floor={f:g}, blend={b:g}" for band, (f, b) in coef.items()))
    print(table(rows, ["band", "errors", "blendedness", "n", "width", "median", "within_1",
                       "within_2", "abs_q68", "abs_q95"]))
    out = args.out or (os.path.join(os.path.dirname(__file__), "results",
                                    "flux_error_calibration.json") if args.fit else None)
    if out:
        summaries = []
        for one in path:
            with open(one) as fh:
                summaries.append(json.load(fh)["summary"])
        record = {"machine": machine(),
                  "rows_file": os.path.basename(path[0]) if len(path) == 1 else
                  [os.path.basename(p) for p in path], "method": args.method, "bands": bands,
                  "bench_summary": summaries[0] if len(path) == 1 else summaries,
                  "mode": "fit" if args.fit else "check",
                  "per_band": [{"band": band, "floor": f, "blend": b}
                               for band, (f, b) in coef.items()], "stats": rows}
        if len(bands) == 1:  # one band: its pair at the top level, as the i band's record has
            record["floor"], record["blend"] = coef[bands[0]]
        write_json(out, record)

if __name__ == "__main__":
    main()
