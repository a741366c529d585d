"""Trains the learned galaxy detector (`btkjax.deblend.detector`) with the simulation step.

    python benchmarks/train_detector.py [--steps 3000] [--batch 16] [--out btkjax/data/detector_lsst.npz]

Every training step draws ``--batch`` fresh LSST blends with `btkjax.simulation.make_step`
inside the same ``jax.jit`` as the forward pass, the focal loss's gradient and the Adam update
(no files). The blends are those of `benchmarks/bench_deblend.py` but for the stamp: the
embedded default catalog, `DefaultSampling` with 1 to 5 galaxies within 2.4" of the centre (24"
stamps' default shift), noise "all", float32, on 12" stamps (the network is convolutional: it
runs on any stamp size; the galaxies of a blend spread over 24 x 24 pixels either way). The
seeing and the sky vary per blend (`UniformConditions`: FWHM x 0.85 - 1.2, sky x 0.9 - 1.1)
so that the detector does not learn one PSF.

Seeds: the sampler's ``TRAIN_SAMPLE_SEED`` and the draw's ``TRAIN_DRAW_SEED`` (no other
benchmark, test or tuning set uses them), training on blend ids 0 .. steps x batch - 1; the
threshold is chosen on blend ids from ``CAL_START`` (never trained on): the heat that
maximizes F1 of detections matched to true centres within ``MATCH_PX`` (Hungarian), and the
same score is reported for SEP on the SED-weighted coadd (`coadd_detections`, the deblender's
default detection) on the same blends.

Writes the detector atomically (`save_detector`, with its provenance in ``info``) and
benchmarks/results/train_detector.json (losses, scores, time after compilation).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine, write_json  # noqa: E402

import btkjax  # noqa: E402
from btkjax.core.step import UniformConditions  # noqa: E402
from btkjax.deblend.detector import (  # noqa: E402
    DETECTOR_FILE,
    DILATIONS,
    Detector,
    detect,
    focal_loss,
    init_weights,
    load_detector,
    logits,
    normalize,
    save_detector,
    target,
)
from btkjax.deblend.measure import COADD_SEP_KWARGS, coadd_detections  # noqa: E402
from btkjax.simulation import make_step  # noqa: E402

TRAIN_SAMPLE_SEED = 9001
TRAIN_DRAW_SEED = 9002
CAL_START = 2**30  # calibration blend ids start here
MATCH_PX = 3.0  # a detection within 3 pixels (0.6" on LSST) of a true centre finds it
TARGET_SIGMA = 1.0  # pixels: CenterNet's Gaussian at each centre
STAMP = 12.0
FWHM_SCALE = (0.85, 1.2)
SKY_SCALE = (0.9, 1.1)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_training_step(batch: int):
    catalog = btkjax.catalog.CatsimCatalog.default()
    survey = btkjax.survey.get_surveys("LSST")
    sampling = btkjax.sampling_functions.DefaultSampling(
        max_number=5, min_number=1, stamp_size=STAMP, max_shift=2.4, seed=TRAIN_SAMPLE_SEED)
    step = make_step(catalog, survey, sampling, noise="all", isolated=False, fft_size=128,
                     conditions=UniformConditions(fwhm_scale=FWHM_SCALE, sky_scale=SKY_SCALE))
    return step, step.keys(TRAIN_DRAW_SEED), survey


def match_counts(det_x, det_y, tx, ty):
    """(true positives, detections, true galaxies) of one blend, Hungarian within MATCH_PX."""
    if len(det_x) == 0 or len(tx) == 0:
        return 0, len(det_x), len(tx)
    d = np.hypot(np.subtract.outer(det_x, tx), np.subtract.outer(det_y, ty))
    r, c = linear_sum_assignment(d)
    return int((d[r, c] <= MATCH_PX).sum()), len(det_x), len(tx)


def f1(counts):
    tp, nd, nt = np.sum(counts, axis=0)
    return {"f1": 2 * tp / max(nd + nt, 1), "precision": tp / max(nd, 1), "recall": tp / max(nt, 1),
            "n_true": int(nt), "n_detected": int(nd), "n_matched": int(tp)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-cal", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="the weights' initialization key")
    ap.add_argument("--symmetrize", action="store_true",
                    help="the detector's heatmap is the mean over the image's 8 rotations and "
                         "reflections (Detector.symmetrize): its threshold is chosen for it")
    ap.add_argument("--calibrate", default=None, metavar="DETECTOR",
                    help="no training: the weights of this detector file (with their training "
                         "provenance), calibrated again (with --symmetrize or without)")
    ap.add_argument("--out", default=DETECTOR_FILE)
    ap.add_argument("--results", default=None,
                    help="default benchmarks/results/train_detector.json, or "
                         "train_detector_calibrated.json with --calibrate")
    args = ap.parse_args(argv)
    step, keys, survey = make_training_step(args.batch)
    bands = tuple(step.bands)
    pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
    size = step.spec.render.stamp_pixels
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(200, args.steps // 10),
                                                  args.steps, args.lr * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

    def loss_fn(weights, images, sky, truth):
        lg = logits(weights, DILATIONS, normalize(images, sky))
        return jnp.mean(focal_loss(lg, target(truth.x, truth.y, truth.mask, size, TARGET_SIGMA)))

    @jax.jit
    def train_step(weights, opt_state, i):
        out = step(keys, i * args.batch + jnp.arange(args.batch))
        loss, grads = jax.value_and_grad(loss_fn)(weights, out.images, out.conditions.sky,
                                                  out.truth)
        updates, opt_state = opt.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    if args.calibrate:
        old = load_detector(args.calibrate)
        if tuple(old.bands) != bands or not np.isclose(old.pixel_scale, pixel_scale):
            raise SystemExit(f"--calibrate {args.calibrate!r}: a detector of bands "
                             f"{old.bands} at {old.pixel_scale}\"/px, not LSST's {bands} at "
                             f"{pixel_scale}\"/px.")
        # the training's own losses and provenance stay in the detector's info
        weights, trained = old.weights, old.info
        losses, compile_s, train_s, steps_per_s = [], None, None, None
    else:
        weights = init_weights(jax.random.key(args.seed), len(bands))
        opt_state = opt.init(weights)
        t0 = time.perf_counter()
        weights, opt_state, loss = train_step(weights, opt_state, 0)
        loss.block_until_ready()
        compile_s = time.perf_counter() - t0
        losses = [float(loss)]
        t0 = time.perf_counter()
        for i in range(1, args.steps):
            weights, opt_state, loss = train_step(weights, opt_state, i)
            if i % 100 == 0 or i == args.steps - 1:
                losses.append(float(loss))
                print(f"step {i}: loss {losses[-1]:.3f}, "
                      f"{(i) / (time.perf_counter() - t0):.2f} steps/s", flush=True)
        jax.block_until_ready(weights)
        train_s = time.perf_counter() - t0
        steps_per_s = (args.steps - 1) / train_s
        trained = None

    # calibration blends (never trained on): the heat threshold of the best F1
    draw_cal = jax.jit(lambda ids: step(keys, ids))
    images, sky, tx, ty = [], [], [], []
    for k in range(0, args.n_cal, args.batch):
        out = draw_cal(CAL_START + k + jnp.arange(args.batch))
        m = np.asarray(out.truth.mask)
        images.append(np.asarray(out.images))
        sky.append(np.asarray(out.conditions.sky))
        tx += [np.asarray(out.truth.x)[b][m[b]] for b in range(len(m))]
        ty += [np.asarray(out.truth.y)[b][m[b]] for b in range(len(m))]
    images, sky = np.concatenate(images), np.concatenate(sky)
    thresholds = np.round(np.arange(0.05, 0.951, 0.05), 2)
    det = Detector(tuple(weights), DILATIONS, bands, pixel_scale, 0.5, {},
                   symmetrize=args.symmetrize)
    x, y, score, mask = detect(det, images, sky, max_peaks=16, threshold=0.0)
    scores = {}
    for t in thresholds:
        counts = [match_counts(x[b][mask[b] & (score[b] > t)], y[b][mask[b] & (score[b] > t)],
                               tx[b], ty[b]) for b in range(len(tx))]
        scores[float(t)] = f1(counts)
    best = max(scores, key=lambda t: scores[t]["f1"])
    sep_counts = []
    for b in range(len(tx)):
        cat = coadd_detections(images[b], sky[b], **COADD_SEP_KWARGS)
        sep_counts.append(match_counts(np.asarray(cat["x_peak"]), np.asarray(cat["y_peak"]),
                                       tx[b], ty[b]))
    sep = f1(sep_counts)
    info = dict(trained, calibrated_by="benchmarks/train_detector.py --calibrate") if trained \
        else {
        "trained_by": "benchmarks/train_detector.py", "survey": "LSST",
        "catalog": "CatsimCatalog.default()", "sampling": {
            "DefaultSampling": {"max_number": 5, "min_number": 1, "stamp_size": STAMP,
                                "max_shift": 2.4, "seed": TRAIN_SAMPLE_SEED}},
        "draw_seed": TRAIN_DRAW_SEED, "noise": "all", "fwhm_scale": FWHM_SCALE,
        "sky_scale": SKY_SCALE, "target_sigma_px": TARGET_SIGMA, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "init_seed": args.seed,
        "train_ids": [0, args.steps * args.batch - 1],
        "loss_first": losses[0], "loss_last": losses[-1]}
    info.update({"cal_ids": [CAL_START, CAL_START + len(tx) - 1], "match_px": MATCH_PX,
                 "symmetrize": args.symmetrize, "cal_network": scores[best],
                 "cal_coadd_sep": sep})
    det = det._replace(threshold=float(best), info=info)
    save_detector(args.out, det)
    print(f"threshold {best}: {scores[best]}; coadd SEP: {sep}")
    results = args.results or os.path.join(
        RESULTS, "train_detector_calibrated.json" if args.calibrate else "train_detector.json")
    write_json(results, {"machine": machine(), "info": info, "losses_every_100": losses,
                              "compile_s": compile_s, "train_s": train_s,
                              "steps_per_s": steps_per_s,
                              "blends_per_s": steps_per_s and steps_per_s * args.batch,
                              "cal_by_threshold": scores})


if __name__ == "__main__":
    main()
