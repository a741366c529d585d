"""Forward-model deblender against SEP on LSST blends: flux, ellipticity, reconstruction, speed.

    python benchmarks/bench_deblend.py [--n 1000] [--batch 100] [--stamp 24] [--max-steps 200]

Blends: the embedded default CatSim-like catalog, DefaultSampling with up to 5 galaxies, noise
"all", float32 images. Methods, all on SEP's detections (sep_singleband_measure, i band):

- ``sep_singleband_measure``: SEP's segments (the blend inside each segment);
- ``forward_model``: `btkjax.deblend.ForwardModelMeasure` as it comes: SEP's detections plus
  up to 2 galaxies per blend that SEP missed, found in the residual of the fit
  (``add_sources=2``, matched-filter S/N > 5) and kept when -log L drops by more than their
  number of parameters;
- ``forward_model_sep_only``: the same on exactly SEP's detections (``add_sources=0``: the
  comparison that isolates deblending).

Scored with MetricsGenerator in the r band (Hungarian matching within 5 pixels; every number
below is over matched galaxies):

- ``flux_rel_abs_median``: median |F - F_true| / F_true of the total r flux of the deblended
  image (SEP: the blend inside the galaxy's segment; forward model: its model) against the
  isolated image's;
- ``aperture_flux_rel_abs_median``: the same in a circular aperture of radius the PSF FWHM at
  the true position (BTK's `meas_fixed_aperture`);
- ``e_abs_median``: median |e - e_true| of the Gaussian-weighted moment ellipticities
  (sigma 3 pixels) of the deblended and isolated images;
- ``mse_median``: median reconstruction MSE of the deblended images (all bands);
- the forward model's own fitted r flux against the catalog's (``fitted_flux_rel_abs_median``).

Each method gets four rows: all matched galaxies; those with blendedness > 0.1 (BTK's
blendedness in r, from the isolated images); those with blendedness > 0.1 matched by every
method (the same galaxies for all); and those with blendedness > 0.1 in blends where SEP
detected every galaxy (no undetected neighbour's light to absorb). Speed: the forward models'
per-batch wall time (SEP detection, fit with Fisher errors, models on the whole stamp), the
JAX compilation time within it (jax.monitoring) and the steady state without it, and SEP's.
Writes benchmarks/results/deblend.json atomically.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, table, write_json  # noqa: E402

import btkjax  # noqa: E402
from btkjax import deblend as D  # noqa: E402
from btkjax.measure import MeasureGenerator, sep_singleband_measure  # noqa: E402
from btkjax.metrics import MetricsGenerator, meas_fixed_aperture, meas_moments_ellipticity  # noqa: E402,E501

BLENDED = 0.1  # blendedness threshold of the "blended" rows


_COMPILE_S = [0.0]  # JAX's tracing, lowering and XLA compilation time, summed


def _on_jax_event(name, seconds, **kwargs):
    if name in ("/jax/core/compile/jaxpr_trace_duration",
                "/jax/core/compile/jaxpr_to_mlir_module_duration",
                "/jax/core/compile/backend_compile_duration"):
        _COMPILE_S[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


class _TimedForwardModel(D.ForwardModelMeasure):
    """Records the wall time of each batched fit (the cache misses) and the JAX compilation
    time within it."""

    def _fit_batch(self, *args, **kwargs):
        c0, t0 = _COMPILE_S[0], time.perf_counter()
        out = super()._fit_batch(*args, **kwargs)
        self.times = getattr(self, "times", []) + [time.perf_counter() - t0]
        self.compile = getattr(self, "compile", []) + [_COMPILE_S[0] - c0]
        self.windows = getattr(self, "windows", []) + [self.last_fit_pixels]
        return out


def meas_total_flux(image, additional_params):
    """Sum of the image in the measure band (electrons)."""
    return float(np.asarray(image)[additional_params.get("meas_band_num", 0)].sum())


def _median_abs(v):
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(np.median(np.abs(v))) if len(v) else float("nan")


def _rows(name, gs, fitted=None, common=None, full=None):
    """Table rows of one method: all matched galaxies, blendedness > BLENDED, blendedness >
    BLENDED among the galaxies matched by every method (``common``), and among those whose
    blend SEP detected completely (``full``)."""
    det = np.asarray(gs["detected"], bool)
    blend = np.asarray(gs["blendedness"], float)
    tot, tot_t = np.asarray(gs["total_flux"], float), np.asarray(gs["total_flux_true"], float)
    ap, ap_t = np.asarray(gs["flux0"], float), np.asarray(gs["flux0_true"], float)
    e = np.stack([gs["ellipticity0"], gs["ellipticity1"]], -1).astype(float)
    et = np.stack([gs["ellipticity0_true"], gs["ellipticity1_true"]], -1).astype(float)
    mse = np.asarray(gs["mse"], float)
    out = []
    subsets = (("all", det, len(det)),
               (f"blendedness > {BLENDED}", det & (blend > BLENDED), np.sum(blend > BLENDED)),
               (f"blendedness > {BLENDED}, matched by all", common & (blend > BLENDED),
                np.sum(blend > BLENDED)),
               (f"blendedness > {BLENDED}, blend fully detected by SEP", det & full
                & (blend > BLENDED), np.sum(full & (blend > BLENDED))))
    for subset, sel, n_true in subsets:
        with np.errstate(invalid="ignore", divide="ignore"):
            row = {
                "method": name, "galaxies": subset, "n_true": int(n_true),
                "n_matched": int(sel.sum()),
                "flux_rel_abs_median": _median_abs(((tot - tot_t) / tot_t)[sel]),
                "aperture_flux_rel_abs_median": _median_abs(((ap - ap_t) / ap_t)[sel]),
                "e_abs_median": _median_abs(np.hypot(*(e - et).T)[sel]),
                "mse_median": float(np.nanmedian(mse[sel])) if sel.any() else float("nan"),
                "fitted_flux_rel_abs_median": (_median_abs(fitted[sel]) if fitted is not None
                                               else float("nan")),
            }
        out.append(row)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--stamp", type=float, default=24.0)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--fit-pixels", default="auto", help="'auto', an int, or 'none'")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "deblend.json"))
    args = ap.parse_args(argv)
    fit_pixels = {"auto": "auto", "none": None}.get(args.fit_pixels, None)
    if args.fit_pixels not in ("auto", "none"):
        fit_pixels = int(args.fit_pixels)
    n_batches = max(1, args.n // args.batch)
    catalog = btkjax.catalog.CatsimCatalog.default()
    sampler = btkjax.sampling_functions.DefaultSampling(max_number=5, min_number=1,
                                                        stamp_size=args.stamp, seed=1)
    survey = btkjax.survey.get_surveys("LSST")
    draw = btkjax.draw_blends.CatsimGenerator(catalog, sampler, survey, batch_size=args.batch,
                                              stamp_size=args.stamp, add_noise="all", seed=2)
    fm = _TimedForwardModel(max_sources=6, max_steps=args.max_steps, deblended="model",
                            fit_pixels=fit_pixels)
    fm_sep = _TimedForwardModel(max_sources=6, max_steps=args.max_steps, deblended="model",
                                fit_pixels=fit_pixels, add_sources=0,
                                name="forward_model_sep_only")
    fms = {"forward_model": fm, "forward_model_sep_only": fm_sep}
    meas = MeasureGenerator([sep_singleband_measure, fm, fm_sep], draw)
    metrics = MetricsGenerator(meas, meas_band_name="r",
                               target_meas={"flux": meas_fixed_aperture,
                                            "ellipticity": meas_moments_ellipticity,
                                            "total_flux": meas_total_flux})
    names = ("sep_singleband_measure",) + tuple(fms)
    parts = {name: [] for name in names}
    fitted = {name: [] for name in fms}
    statuses = {name: collections.Counter() for name in fms}
    n_added = {name: 0 for name in fms}
    unusual = {name: [] for name in fms}
    sep_times, dtype = [], None
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    for b in range(n_batches):
        batch, meas_results, results = next(metrics)
        dtype = str(np.asarray(batch["blend_images"]).dtype)
        t0 = time.perf_counter()
        for i in range(args.batch):
            sep_singleband_measure(batch, i, surveys=[survey])
        sep_times.append(time.perf_counter() - t0)
        for name, f in fms.items():
            statuses[name].update(int(s) for s in f._cache["status"])
            n_added[name] += int(f._cache["added"].sum())
            unusual[name] += [(b * args.batch + i, int(s)) for i, s in enumerate(f._cache["status"])
                              if s not in (D.STATUS_CONVERGED, D.STATUS_ADDED)]
        for name in names:
            parts[name].append(results["galaxy_summary"][name])
        # each forward model's fitted r flux of each true galaxy (NaN if unmatched)
        for name in fms:
            for i, m in enumerate(results["matches"][name]):
                cat = meas_results["catalog"][name][i]
                truth = batch["blend_list"][i]
                for j, d in enumerate(np.asarray(m["match_detected_id"])):
                    ok = 0 <= d < len(cat)
                    fitted[name].append((float(cat["r_flux"][d]) - float(truth["r_flux"][j]))
                                        / float(truth["r_flux"][j]) if ok else np.nan)
        print(f"batch {b}: " + ", ".join(f"{k} {f.times[-1]:.1f}s (compile {f.compile[-1]:.1f}s)"
                                         for k, f in fms.items())
              + f" (window {fm.windows[-1]} px), SEP {sep_times[-1]:.2f}s, "
              f"elapsed {time.perf_counter() - t_start:.0f}s", flush=True)
    from astropy.table import vstack

    tables = {name: vstack(parts[name]) for name in names}
    common = np.all([np.asarray(t["detected"], bool) for t in tables.values()], axis=0)
    sep = tables["sep_singleband_measure"]
    blend_key = np.asarray(sep["blend_id"]) + np.concatenate(
        [np.full(len(t), k * args.batch) for k, t in enumerate(parts["sep_singleband_measure"])])
    missed = np.bincount(blend_key, weights=~np.asarray(sep["detected"], bool))
    full = missed[blend_key] == 0  # every galaxy of the blend detected by SEP
    rows = []
    for name in names:
        rows += _rows(name, tables[name], np.asarray(fitted[name]) if name in fitted else None,
                      common, full)
    n_blends = n_batches * args.batch
    summary = {
        "n_blends": n_blends, "batch": args.batch, "stamp_arcsec": args.stamp,
        "max_steps": args.max_steps, "dtype": dtype, "model": fm.model,
        "fit_pixels": args.fit_pixels, "fit_windows_px": sorted(set(fm.windows)),
        "chunk": D.default_chunk(),
        "sep_blends_per_s": n_blends / float(np.sum(sep_times)),
        "blendedness_threshold": BLENDED,
    }
    for name, f in fms.items():
        # steady state: every batch after the first, less any compilation in them
        steady = np.array(f.times[1:] or f.times) - np.array(f.compile[1:] or f.compile)
        key = "" if name == "forward_model" else "sep_only_"
        summary.update({
            f"fit_{key}first_batch_s": f.times[0],
            f"fit_{key}compile_s": float(np.sum(f.compile)),
            f"fit_{key}compile_s_first_batch": f.compile[0],
            f"fit_{key}steady_batch_s_median": float(np.median(steady)),
            f"fit_{key}blends_per_s_steady": args.batch * len(steady) / float(np.sum(steady)),
            f"fit_{key}blends_per_s_overall": n_blends / float(np.sum(f.times)),
            f"fit_{key}status_counts": {str(k): v for k, v in sorted(statuses[name].items())},
            f"fit_{key}unusual_status": unusual[name],
            f"fit_{key}n_added": n_added[name],
        })
    summary["wall_s"] = time.perf_counter() - t_start
    summary["loadavg_1min_start_end"] = [load_start[0], os.getloadavg()[0]]
    print(table(rows, list(rows[0])))
    print(summary)
    write_json(args.out, {"machine": machine(), "summary": summary, "methods": rows})


if __name__ == "__main__":
    main()
