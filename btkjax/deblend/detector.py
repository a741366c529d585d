"""A learned galaxy detector: a small convolutional network trained with the simulation step.

The network maps a blend's bands (each divided by its sky noise, ``arcsinh``-compressed,
`normalize`) to a heatmap of galaxy centres: a dilated 3x3 convolution stack (ReLU), then a 1x1
convolution and a sigmoid (`heatmap`). It is trained (``benchmarks/train_detector.py``) on
fresh blends drawn inside the training step by `btkjax.simulation.make_step`, against
CenterNet's target (a Gaussian of ``sigma`` pixels at each true centre's pixel, `target`) with
CenterNet's penalty-reduced focal loss (`focal_loss`; Zhou, Wang & Kraehenbuehl 2019,
"Objects as Points"). Detections are the heatmap's local maxima above a threshold
(`heatmap_peaks`), placed at the heat-weighted centroid of their 3x3 neighbourhood.

Pure JAX (arrays in, arrays out, jittable and vmappable); `Detector` holds the weights with
what they were trained on (survey, bands, pixel scale) and how (``info``); `load_detector`
reads the shipped LSST detector (``btkjax/data/detector_lsst.npz``), `save_detector` writes one
atomically. `ForwardModelMeasure(detection="network")` starts its fit from these detections.
"""

from __future__ import annotations

import json
import os
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.utils import atomic_file

__all__ = ["Detector", "DETECTOR_FILE", "DILATIONS", "init_weights", "normalize", "logits",
           "heatmap", "target", "focal_loss", "heatmap_peaks", "detect", "load_detector",
           "save_detector", "check_detector_inputs"]

# the shipped detector (trained by benchmarks/train_detector.py; provenance in its "info")
DETECTOR_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "data", "detector_lsst.npz")
# the 3x3 layers' dilations: receptive field 1 + 2 * sum = 41 pixels (8.2" on LSST), wider than
# the 24 x 24 pixels the galaxies of a default-sampled LSST blend spread over
DILATIONS = (1, 1, 2, 4, 8, 2, 1, 1)
CHANNELS = 32
# the arcsinh's knee, in sigmas of the sky noise
SOFTENING = 3.0


class Detector(NamedTuple):
    """A trained detector.

    Attributes:
        weights: ((w [out, in, k, k], b [out]), ...) float32, the 3x3 layers then the 1x1 one.
        dilations: the 3x3 layers' dilations.
        bands: the band names of the images it takes, in order.
        pixel_scale: arcsec per pixel of the images it was trained on.
        threshold: heatmap level of a detection (chosen on calibration blends).
        info: provenance (survey, catalog, sampling, seeds, steps, losses, scores): a dict of
            JSON values.
        symmetrize: the heatmap is the mean of the network's over the 8 rotations and
            reflections of the image (`heatmap`'s ``symmetrize``); ``threshold`` is then that
            mean's.
    """

    weights: tuple
    dilations: tuple
    bands: tuple
    pixel_scale: float
    threshold: float
    info: dict
    symmetrize: bool = False


def init_weights(key, n_bands: int, channels: int = CHANNELS, dilations=DILATIONS):
    """He-normal 3x3 layers of ``channels`` and a 1x1 output layer whose bias starts the
    heatmap at sigmoid(-4) ~ 0.018 (CenterNet's prior: centres are rare)."""
    shapes = [(channels, n_bands, 3)] + [(channels, channels, 3)] * (len(dilations) - 1) + [
        (1, channels, 1)]
    out = []
    for k, (c_out, c_in, size) in zip(jax.random.split(key, len(shapes)), shapes, strict=True):
        w = jax.random.normal(k, (c_out, c_in, size, size), jnp.float32) * np.sqrt(
            2.0 / (c_in * size * size))
        out.append((w, jnp.zeros(c_out, jnp.float32)))
    out[-1] = (out[-1][0] * 0.1, jnp.full(1, -4.0, jnp.float32))
    return tuple(out)


def normalize(images, sky):
    """[blend, band, y, x] background-subtracted electrons and sky [band] or [blend, band]
    electrons per pixel -> the network's input: ``arcsinh(image / sqrt(sky) / 3)``."""
    images = jnp.asarray(images)
    sky = jnp.broadcast_to(jnp.asarray(sky, images.dtype), images.shape[:2])
    return jnp.arcsinh(images / jnp.sqrt(sky)[..., None, None] / SOFTENING)


def _conv(x, w, b, dilation):
    y = jax.lax.conv_general_dilated(x, w, window_strides=(1, 1), padding="SAME",
                                     rhs_dilation=(dilation, dilation),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + b[None, :, None, None]


def logits(weights, dilations, x):
    """[blend, band, y, x] normalized images -> [blend, y, x] logits of the heatmap (zero
    padding at the edges)."""
    if len(weights) != len(dilations) + 1:
        raise ValueError(f"{len(weights)} layers of weights for {len(dilations)} dilations; "
                         f"expected {len(dilations) + 1}.")
    x = jnp.asarray(x, weights[0][0].dtype)  # the weights' dtype (float32 as trained)
    for (w, b), d in zip(weights[:-1], dilations, strict=True):
        x = jax.nn.relu(_conv(x, w, b, int(d)))
    w, b = weights[-1]
    return _conv(x, w, b, 1)[:, 0]


def _dihedral(a, k: int, flip: bool):
    """``a`` [..., y, x] rotated by ``k`` quarter turns, then mirrored in x if ``flip``."""
    a = jnp.rot90(a, k, axes=(-2, -1))
    return a[..., ::-1] if flip else a


def _undo_dihedral(a, k: int, flip: bool):
    """The inverse of `_dihedral`."""
    return jnp.rot90(a[..., ::-1] if flip else a, -k, axes=(-2, -1))


def heatmap(weights, dilations, images, sky, symmetrize: bool = False):
    """The heatmap in (0, 1) [blend, y, x] of images [blend, band, y, x] with sky [band].

    ``symmetrize``: the mean of the heatmaps of the 8 rotations by quarter turns and
    reflections of the images, each turned back (test-time augmentation). Blends have no
    preferred orientation, but a network trained on a finite sample is not exactly equivariant;
    the mean keeps what the 8 views agree on. Square images only (the transforms map the pixel
    grid onto itself, so the mean is exact on it)."""
    x = normalize(images, sky)
    if not symmetrize:
        return jax.nn.sigmoid(logits(weights, dilations, x))
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"symmetrize needs square images, got {x.shape[-2]} x {x.shape[-1]}.")
    views = [(k, f) for k in range(4) for f in (False, True)]
    n = x.shape[0]
    heat = jax.nn.sigmoid(logits(weights, dilations, jnp.concatenate(
        [_dihedral(x, k, f) for k, f in views])))  # the 8 views in one call
    return sum(_undo_dihedral(heat[j * n:(j + 1) * n], k, f)
               for j, (k, f) in enumerate(views)) / len(views)


def target(x, y, mask, size: int, sigma: float):
    """CenterNet's target [blend, size, size]: at each pixel the largest of the Gaussians of
    ``sigma`` pixels centred on the pixels nearest the true centres ``x``, ``y`` [blend, slot]
    (pixels; ``mask`` the real slots), so it is exactly 1 at those pixels."""
    grid = jnp.arange(size, dtype=jnp.float32)
    cx = jnp.round(jnp.asarray(x, jnp.float32))[..., None, None]
    cy = jnp.round(jnp.asarray(y, jnp.float32))[..., None, None]
    d2 = (grid[None, None, None, :] - cx) ** 2 + (grid[None, None, :, None] - cy) ** 2
    bumps = jnp.exp(-d2 / (2.0 * sigma**2)) * jnp.asarray(mask, jnp.float32)[..., None, None]
    return bumps.max(axis=1)


def focal_loss(logit, tgt, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's penalty-reduced focal loss of logits against `target`, per blend [blend]:
    ``-(1/N) sum [(1-p)^a log p  where t = 1;  (1-t)^b p^a log(1-p)  elsewhere]``, N the
    number of centres (at least 1)."""
    log_p = jax.nn.log_sigmoid(logit)
    log_q = jax.nn.log_sigmoid(-logit)
    p = jnp.exp(log_p)
    pos = tgt >= 1.0
    loss = jnp.where(pos, (1 - p) ** alpha * log_p,
                     (1 - tgt) ** beta * p**alpha * log_q)
    n = jnp.maximum(pos.sum(axis=(-2, -1)), 1)
    return -loss.sum(axis=(-2, -1)) / n


def heatmap_peaks(heat, threshold, max_peaks: int):
    """The heatmap's local maxima (3x3) above ``threshold``, strongest first.

    Args:
        heat: [blend, y, x].
        threshold: the heat of a detection (scalar).
        max_peaks: peaks kept per blend (static).

    Returns:
        (x, y, score, mask), each [blend, max_peaks]: the 3x3 heat-weighted centroid of each
        peak (pixels), its heat, and which are real.
    """
    heat = jnp.asarray(heat, jnp.float32)
    n, h, w = heat.shape
    # ties of a plateau: the first pixel in raster order wins (a ramp far below float32's
    # resolution of a heat of order 1 would vanish, so the comparison uses an integer rank)
    flat_heat = heat.reshape(n, -1)
    rank = jnp.argsort(jnp.argsort(-flat_heat, axis=1, stable=True), axis=1, stable=True)
    rank = (-rank).reshape(n, h, w).astype(jnp.int32)  # larger is stronger, no two equal
    local = jax.lax.reduce_window(rank, jnp.iinfo(jnp.int32).min, jax.lax.max, (1, 3, 3),
                                  (1, 1, 1), "SAME")
    peak = (rank >= local) & (heat > threshold)
    cand = jnp.where(peak, heat, -jnp.inf).reshape(n, -1)
    k = min(int(max_peaks), h * w)
    score, flat = jax.lax.top_k(cand, k)
    mask = jnp.isfinite(score)
    py, px = flat // w, flat % w
    padded = jnp.pad(heat, ((0, 0), (1, 1), (1, 1)))
    offs = jnp.arange(-1, 2)
    rows = py[..., None, None] + 1 + offs[:, None]  # [blend, k, 3, 1]
    cols = px[..., None, None] + 1 + offs[None, :]  # [blend, k, 1, 3]
    patch = padded[jnp.arange(n)[:, None, None, None], rows, cols]  # [blend, k, 3, 3]
    tot = patch.sum(axis=(-2, -1))
    cx = px + (patch.sum(axis=-2) * offs).sum(-1) / tot
    cy = py + (patch.sum(axis=-1) * offs).sum(-1) / tot
    heat_at = jnp.take_along_axis(heat.reshape(n, -1), flat, axis=1)
    return (jnp.where(mask, cx, 0.0), jnp.where(mask, cy, 0.0), jnp.where(mask, heat_at, 0.0),
            mask)


@partial(jax.jit, static_argnames=("dilations", "max_peaks", "symmetrize"))
def _detect_jit(weights, images, sky, threshold, *, dilations, max_peaks, symmetrize):
    return heatmap_peaks(heatmap(weights, dilations, images, sky, symmetrize), threshold,
                         max_peaks)


def check_detector_inputs(detector: Detector, bands, pixel_scale: float):
    """A ValueError unless the images' ``bands`` and ``pixel_scale`` are the detector's."""
    if tuple(bands) != tuple(detector.bands):
        raise ValueError(f"the detector was trained on bands {list(detector.bands)}; the images "
                         f"have {list(bands)}.")
    if not np.isclose(float(pixel_scale), detector.pixel_scale, rtol=1e-6):
        raise ValueError(f"the detector was trained on {detector.pixel_scale} arcsec pixels; the "
                         f"images have {pixel_scale}.")


def detect(detector: Detector, images, sky, max_peaks: int = 16, threshold=None):
    """Detections of a batch: `heatmap_peaks` of the detector's `heatmap` (symmetrized when
    the detector says so).

    Args:
        detector: a `Detector`.
        images: [blend, band, y, x] background-subtracted electrons, the detector's bands.
        sky: [band] (or [blend, band]) sky electrons per pixel.
        max_peaks: peaks kept per blend.
        threshold: default the detector's.

    Returns:
        numpy (x, y, score, mask), each [blend, max_peaks].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != len(detector.bands):
        raise ValueError(f"images must be [blend, {len(detector.bands)} bands, y, x], got shape "
                         f"{images.shape}.")
    if not np.all(np.isfinite(images)):
        raise ValueError("images hold non-finite pixels.")
    sky = np.asarray(sky, np.float32)
    if not np.all(sky > 0):
        raise ValueError(f"sky must be > 0 electrons per pixel, got {sky}.")
    thr = detector.threshold if threshold is None else float(threshold)
    out = _detect_jit(detector.weights, jnp.asarray(images, jnp.float32), jnp.asarray(sky),
                      jnp.float32(thr), dilations=tuple(int(d) for d in detector.dilations),
                      max_peaks=int(max_peaks), symmetrize=bool(detector.symmetrize))
    return tuple(np.asarray(a) for a in out)


def save_detector(path: str, detector: Detector) -> None:
    """Writes ``detector`` to ``path`` (.npz) atomically: a temporary file in the same folder,
    fsynced, then renamed."""
    arrays = {}
    for i, (w, b) in enumerate(detector.weights):
        arrays[f"w{i}"] = np.asarray(w, np.float32)
        arrays[f"b{i}"] = np.asarray(b, np.float32)
    meta = {"dilations": [int(d) for d in detector.dilations], "bands": list(detector.bands),
            "pixel_scale": float(detector.pixel_scale), "threshold": float(detector.threshold),
            "n_layers": len(detector.weights), "info": detector.info,
            "symmetrize": bool(detector.symmetrize)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with atomic_file(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_detector(path: str | None = None) -> Detector:
    """The `Detector` saved at ``path`` (default the shipped LSST one, `DETECTOR_FILE`)."""
    path = DETECTOR_FILE if path is None else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"no detector at {path!r} (benchmarks/train_detector.py writes "
                                f"one).")
    with np.load(path) as f:
        meta = json.loads(bytes(f["meta"]).decode())
        weights = tuple((jnp.asarray(f[f"w{i}"]), jnp.asarray(f[f"b{i}"]))
                        for i in range(meta["n_layers"]))
    return Detector(weights, tuple(meta["dilations"]), tuple(meta["bands"]),
                    float(meta["pixel_scale"]), float(meta["threshold"]), meta["info"],
                    bool(meta.get("symmetrize", False)))
