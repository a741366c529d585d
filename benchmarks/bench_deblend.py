"""SEP, btkjax's forward-model deblender and scarlet2 on the same LSST blends, per blendedness.

    python benchmarks/bench_deblend.py --set report [--n 200] [--batch 50] [--scarlet2-per-batch 5]

Blends: the embedded default CatSim-like catalog, DefaultSampling with up to 5 galaxies on 24"
stamps, noise "all", float32 images. Two disjoint sets of seeds: ``--set tune`` (the seeds any
tuning of the deblender was done on) and ``--set report`` (the seeds the README reports; never
used for tuning). Neither uses the seeds of the project's other benchmarks (sampler 1, draw 2).

Methods (SEP and scarlet2 from SEP's detections in the i band, `sep_singleband_measure`):

- ``sep``: SEP's segments (each detection's deblended image is the blend inside its segment);
- ``btkjax``: `btkjax.deblend.ForwardModelMeasure` as it comes: a free-index Sersic profile
  per galaxy with a prior on the index, its own detection (the learned detector,
  `btkjax.deblend.detector`, at ``NETWORK_DEBLEND_THRESHOLD``; until session 9 SEP on the
  SED-weighted multi-band coadd, `btkjax.deblend.coadd_detections`), a compact start, the joint
  fit, galaxies missed added from the multi-band residual, and model comparison both ways (a
  galaxy split in two, two merged into one, or the fainter of the two moved to the merged
  fit's residual peak, when the likelihood says so);
- ``btkjax_exp``: the same with exponential profiles (``--variant``, ``--variant-name``);
- ``scarlet2``: `btkjax.deblend.Scarlet2Measure` (scarlet2 0.5.1 as documented) on the first
  ``--scarlet2-per-batch`` blends of each batch (it takes seconds to minutes per blend), so the
  three-method table is over those blends only; SEP and btkjax are also scored on every blend.

Scoring, written here independently of the code scored (no btkjax.match / btkjax.metrics):

- matching: per blend, Hungarian assignment (scipy.optimize.linear_sum_assignment) of detections
  to true galaxies on the pixel distance, pairs farther than ``MATCH_PX`` pixels rejected;
- blendedness of each true galaxy (BTK's definition, i band, noiseless isolated images):
  ``1 - sum(I_j^2) / sum(I_j * sum_k I_k)``;
- ``dflux``: |sum(deblended) - sum(isolated)| / sum(isolated) in the i band; its median's 68%
  interval (``dflux_median_68``: the 16th and 84th percentiles over 1000 bootstrap resamplings
  of the blends, seed 0);
- ``mse``: mean over bands and pixels of (deblended - isolated)^2 (electrons^2);
- ``de``: |e - e_true| of Gaussian-weighted (sigma 3 pixels, at the true position) moment
  ellipticities (distortion) of the deblended and isolated i-band images;
- ``pull``: (sum(deblended) - sum(isolated)) / the method's own i-band flux error
  (``i_flux_err`` of its catalog; btkjax's Fisher errors), its median and robust width
  (1.4826 x the median absolute deviation; 1 when the errors are calibrated);
- ``nan_blends``: blends with detections whose deblended images hold a non-finite pixel.

Speed: wall and CPU (process: all threads) seconds per blend of each method; for btkjax over
the batches whose JAX compilation (jax.monitoring) was under 5% of their time, the batches that
compiled reported apart (``btkjax_compiled_batches``; with ``--retime`` each of them is run
again on a copy of its images, everything compiled, and that run timed instead, after checking
that it gives the same catalogs); SEP and btkjax time whole batches, the
same for the every-blend and the with-scarlet2 tables; scarlet2's time includes its own
compilations (one per scene structure), as a user sees it.
Writes benchmarks/results/deblend_compare_<set>.json atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

import jax
import numpy as np
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, table, write_json  # noqa: E402

import btkjax  # noqa: E402
from btkjax.deblend import ForwardModelMeasure, Prior, Scarlet2Measure  # noqa: E402
from btkjax.measure import sep_singleband_measure  # noqa: E402

# the tuning seeds: 11/12 and 13/14 until 2026-12-02 (100 blends), 15/16 and 17/18 added since
# (200 blends: the first 100 are the old set); "tune2", 200 more, added on 2026-12-02 (session 6)
# to choose between the ring search and none; "report2", a second reporting set (session 9),
# drawn after session 9's default was chosen and reported on "report", to see whether the
# reporting set's margins hold on other blends (never used for tuning either); "report3", a
# third (session 10), drawn after session 10's default was chosen on the tuning sets
SEEDS = {"tune": [(11, 12), (13, 14), (15, 16), (17, 18)],
         "tune2": [(23, 24), (25, 26), (27, 28), (29, 30)],
         "report": [(101, 102), (103, 104), (105, 106), (107, 108)],
         "report2": [(201, 202), (203, 204), (205, 206), (207, 208)],
         "report3": [(301, 302), (303, 304), (305, 306), (307, 308)]}
MATCH_PX = 5.0
BINS = (("< 0.1", -np.inf, 0.1), ("0.1 - 0.5", 0.1, 0.5), ("> 0.5", 0.5, np.inf),
        ("all", -np.inf, np.inf))
BAND = 3  # i
BANDS = "ugrizy"  # LSST's, in the images' order (the per-band rows of --rows-out)
BOOTSTRAP = 1000  # resamplings of the blends for the medians' 68% intervals
_COMPILE_S = [0.0]
# the variant of the "btkjax_exp" rows: the default setup with exponential profiles (2.3x
# cheaper)
VARIANT = '{"model": "exponential"}'


def _on_jax_event(name, seconds, **kwargs):
    if name in ("/jax/core/compile/jaxpr_trace_duration",
                "/jax/core/compile/jaxpr_to_mlir_module_duration",
                "/jax/core/compile/backend_compile_duration"):
        _COMPILE_S[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)


def blendedness(iso):
    """[n] BTK blendedness of each of ``iso`` [n, y, x] (noiseless isolated images)."""
    total = iso.sum(axis=0)
    own = np.einsum("nyx,nyx->n", iso, iso)
    cross = np.einsum("nyx,yx->n", iso, total)
    return np.where(cross > 0, 1 - own / np.where(cross > 0, cross, 1.0), 0.0)


def moments_e(img, x, y, sigma=3.0):
    """Distortion (e1, e2) of Gaussian-weighted second moments around (x, y) (pixels)."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(float)
    dx, dy = xx - x, yy - y
    w = np.exp(-0.5 * (dx * dx + dy * dy) / sigma**2) * img
    qxx, qyy, qxy = (w * dx * dx).sum(), (w * dy * dy).sum(), (w * dx * dy).sum()
    tr = qxx + qyy
    if not tr > 0:
        return np.nan, np.nan
    return (qxx - qyy) / tr, 2 * qxy / tr


def match(tx, ty, dx, dy):
    """Hungarian matching; returns [n_true] index of the matched detection or -1."""
    out = np.full(len(tx), -1)
    if len(tx) == 0 or len(dx) == 0:
        return out
    d = np.hypot(np.subtract.outer(tx, dx), np.subtract.outer(ty, dy))
    rows, cols = linear_sum_assignment(d)
    ok = d[rows, cols] <= MATCH_PX
    out[rows[ok]] = cols[ok]
    return out


def score_blend(truth, iso, out):
    """Rows (one per true galaxy) of one method on one blend, and whether it has NaN images."""
    tx, ty = np.asarray(truth["x_peak"], float), np.asarray(truth["y_peak"], float)
    n = len(tx)
    iso = np.asarray(iso[:n], float)
    cat = out["catalog"]
    deb = np.asarray(out["deblended_images"], float)
    dx, dy = np.asarray(cat["x_peak"], float), np.asarray(cat["y_peak"], float)
    has_nan = bool(len(dx) and not np.all(np.isfinite(deb)))
    m = match(tx, ty, dx, dy)
    bl = blendedness(iso[:, BAND])
    bl_bands = np.stack([blendedness(iso[:, b]) for b in range(iso.shape[1])], axis=1)
    rows = []
    for j in range(n):
        row = {"blendedness": float(bl[j]), "matched": bool(m[j] >= 0), "dflux": np.nan,
               "mse": np.nan, "de": np.nan, "pull": np.nan}
        if m[j] >= 0:
            d = deb[m[j]]
            f_true = iso[j, BAND].sum()
            row["dflux"] = abs(d[BAND].sum() - f_true) / f_true
            row["mse"] = float(np.mean((d - iso[j]) ** 2))
            e = moments_e(d[BAND], tx[j], ty[j])
            et = moments_e(iso[j, BAND], tx[j], ty[j])
            row["de"] = float(np.hypot(e[0] - et[0], e[1] - et[1]))
            if "i_flux_err" in cat.colnames:  # the method's own 1-sigma error of the i flux
                err = float(cat["i_flux_err"][m[j]])
                row["pull"] = (d[BAND].sum() - f_true) / err if err > 0 else np.nan
                # what benchmarks/calibrate_flux_errors.py needs to refit the error model
                row["flux"], row["flux_true"] = float(d[BAND].sum()), float(f_true)
                for col in ("i_flux", "i_flux_err_fisher", "i_blendedness"):
                    if col in cat.colnames:
                        row[col] = float(cat[col][m[j]])
                # the same in every band (calibrate_flux_errors.py --band)
                band_cols = [f"{b}_{c}" for b in BANDS[:len(d)]
                             for c in ("flux", "flux_err_fisher", "blendedness")]
                if all(c in cat.colnames for c in band_cols):
                    row["bands"] = {b: {
                        "flux": float(d[k].sum()), "flux_true": float(iso[j, k].sum()),
                        "flux_fit": float(cat[f"{b}_flux"][m[j]]),
                        "flux_err_fisher": float(cat[f"{b}_flux_err_fisher"][m[j]]),
                        "blendedness_fit": float(cat[f"{b}_blendedness"][m[j]]),
                        "blendedness": float(bl_bands[j, k])}
                        for k, b in enumerate(BANDS[:len(d)])}
        rows.append(row)
    return rows, has_nan


def _median(v):
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def _kwargs(text):
    """ForwardModelMeasure keyword arguments from JSON; a "prior" object becomes a `Prior`."""
    kw = json.loads(text)
    if isinstance(kw.get("prior"), dict):
        kw["prior"] = Prior(**kw["prior"])
    return kw


def _pull_stats(v):
    """Median and robust width (1.4826 MAD) of the i-band flux pulls (deblended - isolated) /
    error, where the method reports errors; a calibrated error gives a width near 1."""
    v = np.asarray(v, float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"pull_median": float("nan"), "pull_width": float("nan")}
    med = float(np.median(v))
    return {"pull_median": med, "pull_width": float(1.4826 * np.median(np.abs(v - med)))}


def bootstrap_median(values, blend, n_boot=BOOTSTRAP, seed=0):
    """The 16th and 84th percentiles of the median of ``values`` (finite ones) over
    ``n_boot`` resamplings of the blends with replacement (galaxies of one blend share its
    fit, so the blend is the unit resampled)."""
    values, blend = np.asarray(values, float), np.asarray(blend)
    ok = np.isfinite(values)
    values, blend = values[ok], blend[ok]
    if not len(values):
        return [float("nan"), float("nan")]
    ids, inverse = np.unique(blend, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    rng = np.random.default_rng(seed)
    meds = []
    for _ in range(n_boot):
        pick = np.concatenate([members[k] for k in rng.integers(0, len(ids), len(ids))])
        meds.append(np.median(values[pick]))
    return [float(v) for v in np.percentile(meds, [16, 84])]


def summarize(name, rows, nan_blends, wall, cpu, n_timed):
    """Table rows of one method: one per blendedness bin; ``wall``, ``cpu``: seconds over
    ``n_timed`` blends (for btkjax, the batches that did not compile)."""
    b = np.array([r["blendedness"] for r in rows])
    matched = np.array([r["matched"] for r in rows], bool)
    out = []
    for label, lo, hi in BINS:
        sel = (b >= lo) & (b < hi)
        sm = sel & matched
        picked = np.flatnonzero(sm)
        out.append({
            "method": name, "blendedness": label, "n_true": int(sel.sum()),
            "n_matched": int(sm.sum()),
            "dflux_median": _median([rows[i]["dflux"] for i in np.flatnonzero(sm)]),
            "dflux_median_68": bootstrap_median([rows[i]["dflux"] for i in picked],
                                                [rows[i]["blend"] for i in picked]),
            "mse_median": _median([rows[i]["mse"] for i in np.flatnonzero(sm)]),
            "de_median": _median([rows[i]["de"] for i in np.flatnonzero(sm)]),
            **_pull_stats([rows[i]["pull"] for i in np.flatnonzero(sm)]),
            "s_per_blend": wall / n_timed if n_timed else float("nan"),
            "cpu_s_per_blend": cpu / n_timed if n_timed else float("nan"),
            "nan_blends": int(nan_blends), "timed_blends": int(n_timed),
        })
    return out


def run_method(f, batch, idx, survey):
    """(outputs per blend, wall s, CPU s, compile s) of ``f`` on blends ``idx`` of ``batch``."""
    c0, t0, p0 = _COMPILE_S[0], time.perf_counter(), time.process_time()
    outs = [f(batch, i, surveys=[survey]) for i in idx]
    return outs, time.perf_counter() - t0, time.process_time() - p0, _COMPILE_S[0] - c0


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", choices=tuple(SEEDS), default="report")
    ap.add_argument("--n", type=int, default=200, help="blends in all (split over the seeds)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--stamp", type=float, default=24.0)
    ap.add_argument("--scarlet2-per-batch", type=int, default=5,
                    help="blends of each batch also deblended by scarlet2 (0: none)")
    ap.add_argument("--add-sources", type=int, default=None,
                    help="ForwardModelMeasure's add_sources (default: its own)")
    ap.add_argument("--fm", default="{}",
                    help="JSON of extra ForwardModelMeasure keyword arguments (tuning)")
    ap.add_argument("--variant", default=VARIANT,
                    help="JSON of the ForwardModelMeasure keyword arguments of the --variant-name "
                         "rows; '' for none")
    ap.add_argument("--variant-name", default="btkjax_exp",
                    help="the name of the --variant rows")
    ap.add_argument("--scarlet2-cache", default=None,
                    help="pickle of scarlet2's outputs and times per blend, reused when present "
                         "(its blends do not depend on the other methods)")
    ap.add_argument("--scarlet2-from", default=None,
                    help="a results JSON of an earlier run on the same --set, --n and --batch: "
                         "scarlet2 is not run, its rows on the same blends (the first "
                         "--scarlet2-per-batch of each batch) are taken from that file, after "
                         "checking that SEP's rows on them are that file's (the same blends)")
    ap.add_argument("--only-scarlet2", action="store_true",
                    help="fill --scarlet2-cache and stop (no other method, no scoring)")
    ap.add_argument("--retime", action="store_true",
                    help="time btkjax's batches that compiled again, on a copy of the batch "
                         "(steady state; every batch is then timed; the rerun must give the "
                         "same catalogs)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows-out", default=None,
                    help="JSON of every method's per-galaxy rows (every blend), for "
                         "benchmarks/calibrate_flux_errors.py")
    args = ap.parse_args(argv)
    out_path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        f"deblend_compare_{args.set}.json")
    seeds = SEEDS[args.set]
    per_seed = max(1, args.n // len(seeds))
    catalog = btkjax.catalog.CatsimCatalog.default()
    survey = btkjax.survey.get_surveys("LSST")
    fm_kwargs = {} if args.add_sources is None else {"add_sources": args.add_sources}
    fm_kwargs.update(_kwargs(args.fm))
    fm = ForwardModelMeasure(**fm_kwargs)
    stored = None
    if args.scarlet2_from:
        with open(args.scarlet2_from) as fh:
            stored = json.load(fh)
        same = {k: stored["summary"].get(k) for k in ("set", "n_blends", "batch",
                                                       "n_blends_scarlet2")}
        want = {"set": args.set, "n_blends": per_seed * len(seeds), "batch": args.batch,
                "n_blends_scarlet2": min(args.scarlet2_per_batch, args.batch) * len(seeds) *
                -(-per_seed // args.batch)}
        if same != want:
            raise ValueError(f"--scarlet2-from {args.scarlet2_from!r} is of another run: "
                             f"{same}, this run's {want}.")
    s2 = Scarlet2Measure() if args.scarlet2_per_batch > 0 and stored is None else None
    methods = {"sep": sep_singleband_measure, "btkjax": fm}
    if args.variant:
        methods[args.variant_name] = ForwardModelMeasure(**{**fm_kwargs, **_kwargs(args.variant)})
    if args.only_scarlet2:
        methods = {}
    rows = {k: [] for k in methods}  # every blend
    # blends scarlet2 also ran on
    rows3 = {k: [] for k in (*methods, *(() if stored else ("scarlet2",)))}
    nan = {k: 0 for k in (*rows3, "scarlet2")}
    nan3 = {k: 0 for k in (*rows3, "scarlet2")}
    wall = {k: 0.0 for k in (*rows3, "scarlet2")}
    cpu = {k: 0.0 for k in (*rows3, "scarlet2")}
    compile_s = []
    compiled_batches = []
    timed = {k: 0 for k in (*rows3, "scarlet2")}  # blends whose time is in wall / cpu
    s2_cache = {}
    if args.scarlet2_cache and os.path.exists(args.scarlet2_cache):
        with open(args.scarlet2_cache, "rb") as fh:
            s2_cache = pickle.load(fh)
    n_blends = n3 = 0
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    dtype = None
    for s_seed, d_seed in seeds:
        sampler = btkjax.sampling_functions.DefaultSampling(
            max_number=5, min_number=1, stamp_size=args.stamp, seed=s_seed)
        draw = btkjax.draw_blends.CatsimGenerator(
            catalog, sampler, survey, batch_size=args.batch, stamp_size=args.stamp,
            add_noise="all", seed=d_seed)
        done = 0
        while done < per_seed:
            batch = next(draw)
            dtype = str(np.asarray(batch["blend_images"]).dtype)
            nb = min(args.batch, per_seed - done)
            idx = list(range(nb))
            k3 = min(args.scarlet2_per_batch, nb) if (s2 is not None or stored) else 0
            results = {}
            for name, f in methods.items():
                outs, w, c, comp = run_method(f, batch, idx, survey)
                results[name] = outs
                if name.startswith("btkjax"):
                    compile_s.append(comp)
                    if comp > 0.05 * w:
                        # a batch that compiled: its time is reported apart, not per blend
                        compiled_batches.append({"blends": nb, "wall_s": w, "cpu_s": c,
                                                 "compile_s": comp})
                        if not args.retime:
                            continue
                        # the same batch again (a copy of its images: the measure's cache
                        # misses), every program compiled now: steady state; its catalogs
                        # must be the first run's
                        again, w, c, comp2 = run_method(
                            f, dict(batch, blend_images=np.array(batch["blend_images"])),
                            idx, survey)
                        same = all(np.array_equal(np.asarray(a["catalog"][k]),
                                                  np.asarray(b["catalog"][k]))
                                   for a, b in zip(outs, again, strict=True)
                                   for k in ("x_peak", "y_peak", "i_flux"))
                        compiled_batches[-1].update(retime_wall_s=w, retime_cpu_s=c,
                                                    retime_compile_s=comp2, retime_same=same)
                        if not same:
                            raise SystemExit(f"{name}: a rerun of a batch of seeds "
                                             f"{s_seed}/{d_seed} gave other catalogs.")
                wall[name] += w
                cpu[name] += c
                timed[name] += nb
            if k3 and stored is None:
                key = (s_seed, d_seed, args.batch, done, k3)
                if key not in s2_cache:
                    s2_cache[key] = run_method(s2, batch, idx[:k3], survey)[:3]
                    if args.scarlet2_cache:
                        with open(args.scarlet2_cache + ".tmp", "wb") as fh:
                            pickle.dump(s2_cache, fh)
                        os.replace(args.scarlet2_cache + ".tmp", args.scarlet2_cache)
                outs, w, c = s2_cache[key]
                results["scarlet2"] = outs + [None] * (nb - k3)
                wall["scarlet2"] += w
                cpu["scarlet2"] += c
                timed["scarlet2"] += k3
            if args.only_scarlet2:
                done += nb
                print(f"scarlet2 on seeds {s_seed}/{d_seed}: {done}/{per_seed}", flush=True)
                continue
            for i in idx:
                truth = batch["blend_list"][i]
                iso = np.asarray(batch["isolated_images"][i])
                for name in results:
                    if results[name][i] is None:
                        continue
                    r, bad = score_blend(truth, iso, results[name][i])
                    for row in r:
                        row["blend"] = n_blends + i  # the blend's number in this run
                    if name in rows:
                        rows[name] += r
                        nan[name] += bad
                    if i < k3:
                        rows3[name] += r
                        nan3[name] += bad
            n_blends += nb
            n3 += k3
            done += nb
            print(f"seeds {s_seed}/{d_seed}: {done}/{per_seed} blends, btkjax compile "
                  f"{compile_s[-1]:.1f}s, elapsed {time.perf_counter() - t_start:.0f}s",
                  flush=True)
    if args.only_scarlet2:
        return
    table_all = []
    for name in rows:
        table_all += summarize(name, rows[name], nan[name], wall[name], cpu[name], timed[name])
    table3 = []
    mismatch = None
    if n3:
        for name in rows3:
            table3 += summarize(name, rows3[name], nan3[name], wall[name], cpu[name],
                                timed[name])
        if stored:  # scarlet2's rows of the earlier run, on the same blends (SEP's say so)
            old3 = stored["same_blends_with_scarlet2"]
            for row in old3:
                if row["method"] != "sep" or row["blendedness"].startswith("all, matched"):
                    continue
                new = next(r for r in table3 if r["method"] == "sep" and
                           r["blendedness"] == row["blendedness"])
                for k in ("n_true", "n_matched", "dflux_median", "mse_median"):
                    if not np.isclose(new[k], row[k], rtol=1e-9, equal_nan=True):
                        mismatch = (f"--scarlet2-from: SEP's {k} in bin {row['blendedness']!r} "
                                    f"is {new[k]} here and {row[k]} there: not the same blends "
                                    f"(results written without scarlet2's rows).")
            if mismatch is None:
                table3 += [dict(r, method="scarlet2", note="from " + args.scarlet2_from)
                           for r in old3 if r["method"] == "scarlet2" and
                           not r["blendedness"].startswith("all, matched")]
        # like for like: the galaxies every method matched (rows3 lists the same galaxies in
        # the same order for every method)
        both = np.all([[r["matched"] for r in rows3[k]] for k in rows3], axis=0)
        for name in rows3:
            sel = np.flatnonzero(both)
            table3.append({
                "method": name, "blendedness": "all, matched by every method" + (
                    " run here" if stored else ""),
                "n_true": int(len(both)), "n_matched": int(both.sum()),
                "dflux_median": _median([rows3[name][i]["dflux"] for i in sel]),
                "dflux_median_68": bootstrap_median([rows3[name][i]["dflux"] for i in sel],
                                                    [rows3[name][i]["blend"] for i in sel]),
                "mse_median": _median([rows3[name][i]["mse"] for i in sel]),
                "de_median": _median([rows3[name][i]["de"] for i in sel]),
                **_pull_stats([rows3[name][i]["pull"] for i in sel]),
                "s_per_blend": float("nan"), "cpu_s_per_blend": float("nan"),
                "nan_blends": int(nan3[name]), "timed_blends": 0})
    cols = ["method", "blendedness", "n_true", "n_matched", "dflux_median", "dflux_median_68",
            "mse_median", "de_median", "pull_median", "pull_width", "s_per_blend", "cpu_s_per_blend",
            "nan_blends"]
    print(f"SEP and btkjax, {n_blends} blends ({args.set} seeds {seeds}):")
    print(table(table_all, cols))
    if n3:
        print(f"SEP, btkjax and scarlet2 on the same {n3} blends:")
        print(table(table3, cols))
    summary = {
        "set": args.set, "seeds": seeds, "n_blends": n_blends, "n_blends_scarlet2": n3,
        "batch": args.batch, "stamp_arcsec": args.stamp, "dtype": dtype,
        "match_px": MATCH_PX, "band": "i", "btkjax_compile_s": compile_s,
        "btkjax_compiled_batches": compiled_batches,
        "btkjax_add_sources": fm.add_sources, "btkjax_kwargs": fm_kwargs,
        "scarlet2_from": args.scarlet2_from, "scarlet2_from_mismatch": mismatch,
        "scarlet2_init_labels": [str(lab) for v in s2_cache.values() for o in v[0]
                                 for lab in o["catalog"]["init"]],
        "wall_s": time.perf_counter() - t_start,
        "loadavg_1min_start_end": [load_start[0], os.getloadavg()[0]],
    }
    print(summary)
    write_json(out_path, {"machine": machine(), "summary": summary, "all_blends": table_all,
                          "same_blends_with_scarlet2": table3})
    if args.rows_out:
        write_json(args.rows_out, {"summary": summary, "rows": rows})
    if mismatch:
        raise SystemExit(mismatch)


if __name__ == "__main__":
    main()
