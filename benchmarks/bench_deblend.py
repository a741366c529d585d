"""Forward-model deblender against SEP on LSST blends: flux, ellipticity, reconstruction, speed.

    python benchmarks/bench_deblend.py [--n 1000] [--batch 100] [--stamp 24] [--max-steps 200]

Blends: the embedded default CatSim-like catalog, DefaultSampling with up to 5 galaxies, noise
"all". Both methods use SEP's detections (sep_singleband_measure), so the comparison isolates
deblending. Scored with MetricsGenerator (matching, reconstruction MSE of the deblended images
against the isolated ones, target measures fixed-aperture flux and moments ellipticity on the
deblended vs isolated images, in the r band); the forward model's own fitted r flux is also
compared with the catalog's true r flux. Writes benchmarks/results/deblend.json atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, table, write_json  # noqa: E402

import btkjax  # noqa: E402
from btkjax import deblend as D  # noqa: E402
from btkjax.measure import MeasureGenerator, sep_singleband_measure  # noqa: E402
from btkjax.metrics import MetricsGenerator, meas_fixed_aperture, meas_moments_ellipticity  # noqa: E402,E501


class _TimedForwardModel(D.ForwardModelMeasure):
    """Records the wall time of each batched fit (the cache misses)."""

    def _fit_batch(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = super()._fit_batch(*args, **kwargs)
        self.times = getattr(self, "times", []) + [time.perf_counter() - t0]
        return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--stamp", type=float, default=24.0)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "deblend.json"))
    args = ap.parse_args(argv)
    n_batches = max(1, args.n // args.batch)
    catalog = btkjax.catalog.CatsimCatalog.default()
    sampler = btkjax.sampling_functions.DefaultSampling(max_number=5, min_number=1,
                                                        stamp_size=args.stamp, seed=1)
    survey = btkjax.survey.get_surveys("LSST")
    draw = btkjax.draw_blends.CatsimGenerator(catalog, sampler, survey, batch_size=args.batch,
                                              stamp_size=args.stamp, add_noise="all", seed=2)
    fm = _TimedForwardModel(max_sources=6, max_steps=args.max_steps, deblended="model")
    meas = MeasureGenerator([sep_singleband_measure, fm], draw)
    metrics = MetricsGenerator(meas, meas_band_name="r",
                               target_meas={"flux": meas_fixed_aperture,
                                            "ellipticity": meas_moments_ellipticity})
    rows = {"sep_singleband_measure": [], "forward_model": []}
    fm_flux = []
    fit_times, sep_times, statuses = [], [], []
    for b in range(n_batches):
        batch, meas_results, results = next(metrics)
        t0 = time.perf_counter()
        for i in range(args.batch):
            sep_singleband_measure(batch, i, surveys=[survey])
        sep_times.append(time.perf_counter() - t0)
        fit_times.append(fm.times[-1])
        for name in rows:
            rows[name].append(results["galaxy_summary"][name])
        for cat in meas_results["catalog"]["forward_model"]:
            statuses.extend(np.unique(np.asarray(cat["status"])).tolist() if len(cat) else [])
        matched = results["matches"]["forward_model"]
        for i, m in enumerate(matched):
            cat = meas_results["catalog"]["forward_model"][i]
            truth = batch["blend_list"][i]
            ids = np.asarray(m["match_detected_id"] if hasattr(m, "colnames") else m.match_detected_id)
            for j, d in enumerate(ids):
                if d >= 0 and d < len(cat):
                    fm_flux.append((float(cat["r_flux"][d]), float(truth["r_flux"][j])))
        print(f"batch {b}: fit {fit_times[-1]:.1f}s, SEP {sep_times[-1]:.2f}s", flush=True)
    out = []
    for name, parts in rows.items():
        from astropy.table import vstack

        gs = vstack(parts)
        det = np.asarray(gs["detected"], bool)
        f, ft = np.asarray(gs["flux0"], float)[det], np.asarray(gs["flux0_true"], float)[det]
        e = np.stack([gs["ellipticity0"], gs["ellipticity1"]], -1)[det].astype(float)
        et = np.stack([gs["ellipticity0_true"], gs["ellipticity1_true"]], -1)[det].astype(float)
        ok = np.isfinite(f) & np.isfinite(ft) & (ft > 0)
        oke = np.all(np.isfinite(e) & np.isfinite(et), axis=1)
        rel = (f[ok] - ft[ok]) / ft[ok]
        de = np.hypot(*(e[oke] - et[oke]).T)
        mse = np.asarray(gs["mse"], float)[det]
        out.append({
            "method": name, "n_galaxies": len(gs), "n_detected": int(det.sum()),
            "aperture_flux_rel_median": float(np.median(rel)),
            "aperture_flux_rel_mad": float(np.median(np.abs(rel - np.median(rel)))),
            "ellipticity_abs_median": float(np.median(de)),
            "mse_median": float(np.nanmedian(mse)),
        })
    ff = np.array(fm_flux).reshape(-1, 2)
    relf = (ff[:, 0] - ff[:, 1]) / ff[:, 1]
    n_blends = n_batches * args.batch
    steady = fit_times[1:] or fit_times
    summary = {
        "n_blends": n_blends, "batch": args.batch, "stamp_arcsec": args.stamp,
        "max_steps": args.max_steps, "dtype": "float64" if fm.dtype is None else str(fm.dtype),
        "fit_first_batch_s": fit_times[0],
        "fit_blends_per_s_steady": args.batch / float(np.mean(steady)),
        "sep_blends_per_s": n_blends / float(np.sum(sep_times)),
        "fitted_r_flux_rel_median": float(np.median(relf)) if len(relf) else None,
        "fitted_r_flux_rel_mad": float(np.median(np.abs(relf - np.median(relf))))
        if len(relf) else None,
        "status_values": sorted(set(int(s) for s in statuses)),
    }
    print(table(out, list(out[0])))
    print(summary)
    write_json(args.out, {"machine": machine(), "summary": summary, "methods": out})


if __name__ == "__main__":
    main()
