"""Detections in, fitted galaxies and their errors out (`fit_blends`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core.render import RenderSpec
from btkjax.deblend.chunks import apply_chunked, check_chunk, pad_mask
from btkjax.deblend.errors import fisher_errors
from btkjax.deblend.fit import fit, to_physical_batch, to_unconstrained_batch
from btkjax.deblend.init import init_galaxies
from btkjax.deblend.model import (
    STATUS_ADDED,
    STATUS_BAD_ERRORS,
    STATUS_NO_DETECTIONS,
    STATUS_OUTSIDE_STAMP,
    STATUS_TOO_MANY,
    FitResult,
    Galaxies,
    check_spec,
    n_params,
    spec_model,
)
from btkjax.deblend.residual import (
    asymmetry_peaks,
    merge_candidates,
    residual_peaks,
    split_candidates,
)

__all__ = ["PaddedDetections", "pad_detections", "fit_blends", "ring_threshold", "check_penalty"]


class PaddedDetections(NamedTuple):
    """What `pad_detections` returns (numpy arrays [blend, slot], and [blend])."""

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    too_many: np.ndarray


def ring_threshold(ring_penalty, n_par: int, n_data: int) -> float:
    """The drop of -log L the ring search's best fit must exceed (`fit_blends`'s
    ``ring_penalty``): "aic", ``n_par``; "bic", ``0.5 n_par ln(n_data)``; a number, itself."""
    if isinstance(ring_penalty, str):
        return float(n_par) if ring_penalty == "aic" else 0.5 * n_par * float(np.log(n_data))
    return float(ring_penalty)


def check_penalty(name: str, value):
    """Raises a ValueError naming ``name`` unless ``value`` is a model-comparison penalty of
    `ring_threshold`: "aic", "bic" or a finite number >= 0."""
    if not ((isinstance(value, str) and value in ("aic", "bic")) or (
            not isinstance(value, bool | str) and
            isinstance(value, int | float | np.integer | np.floating) and
            np.isfinite(value) and value >= 0)):
        raise ValueError(f"{name} must be 'aic', 'bic' or a finite number >= 0 (-log L), "
                         f"got {value!r}.")


def pad_detections(detections, max_sources: int | None = None, fluxes=None):
    """Ragged detections -> `PaddedDetections` (x, y, mask, too_many) numpy arrays.

    Args:
        detections: list over blends of [n_i, 2] (x, y) pixel arrays (or tables with
            ``x_peak``, ``y_peak``).
        max_sources: slots per blend (default the largest n_i, at least 1).
        fluxes: optional list over blends of [n_i] brightness used to keep the brightest when
            a blend has more than ``max_sources`` detections (default: the first ones).
    """
    rows = []
    for d in detections:
        if hasattr(d, "colnames"):
            d = np.stack([np.asarray(d["x_peak"], float), np.asarray(d["y_peak"], float)], -1)
        d = np.asarray(d, dtype=float).reshape(-1, 2)
        rows.append(d)
    k = max_sources or max([1] + [len(r) for r in rows])
    n = len(rows)
    x = np.zeros((n, k))
    y = np.zeros((n, k))
    mask = np.zeros((n, k), bool)
    too_many = np.zeros(n, bool)
    for i, r in enumerate(rows):
        order = np.arange(len(r))
        if len(r) > k:
            too_many[i] = True
            if fluxes is not None:
                order = np.argsort(-np.asarray(fluxes[i], float))
            order = np.sort(order[:k])
        r = r[order]
        x[i, : len(r)], y[i, : len(r)] = r[:, 0], r[:, 1]
        mask[i, : len(r)] = True
    return PaddedDetections(x, y, mask, too_many)


def fit_blends(images, detections, psf_k, spec: RenderSpec, sky, *, max_sources=None,
               init: Galaxies | None = None, errors: bool = True, chunk: int | None = None,
               add_sources: int = 0, residual_kwargs: dict | None = None,
               residual_rounds: int = 1, split_sources: bool = False,
               split_min_excess: float = 25.0, split_rounds: int = 1,
               merge_sources: bool = False, merge_max_separation: float = 1.5,
               merge_rounds: int = 1, move_sources: bool = False,
               asymmetry_sources: int = 0, asymmetry_kwargs: dict | None = None,
               ring_sources: int = 0, ring_radius: float = 3.0,
               ring_penalty: float | str = "bic", penalty: float | str = "aic",
               concentric_sources: int = 0, multi_start: bool = False,
               start_hlr: float | None = None, candidates=None,
               **fit_kwargs) -> FitResult:
    """Detections in, fitted galaxies and their errors out, for a whole batch (the high-level
    entry point).

    Args:
        images: [blend, band, S, S] background-subtracted images (electrons).
        detections: ``(x, y, mask)`` arrays [blend, slot] in pixels, or a list over blends of
            [n_i, 2] (x, y) arrays or tables with ``x_peak``, ``y_peak``.
        psf_k: [band, Ry, Cx] PSF x pixel on ``spec``'s grid (`btkjax.core.render.psf_kimage_from_galsim`
            or `default_psf_kimage`), or [blend, band, Ry, Cx].
        spec: the fit's `RenderSpec` (`fit_spec`), one component kind: the model.
        sky: [band] sky electrons per pixel.
        max_sources: slots per blend for ragged detections.
        init: initial `Galaxies` (default `init_galaxies` with ``start_hlr``).
        errors: compute the Fisher errors (`fisher_errors`) at the fit.
        chunk: blends per compiled call (`default_chunk`).
        add_sources: after the fit, look for up to this many sources per blend that the
            detection missed (`residual_peaks` of the residual, ``residual_kwargs``), put them
            in free slots, and fit those blends again from `init_galaxies`; the refit is kept
            (status `STATUS_ADDED`, ``FitResult.added``) when -log L drops by more than
            ``penalty`` per new galaxy.
        residual_kwargs: ``snr_threshold``, ``min_distance``, ``mismatch``, ``colour`` of
            `residual_peaks`.
        residual_rounds: rounds of residual detection (each looks at the residual of the fit
            kept by the previous one; it stops early when nothing significant is found or
            kept).
        asymmetry_sources: before the residual rounds, look for up to this many sources per
            blend hidden in the fitted galaxies' light (`asymmetry_peaks`: the antisymmetric
            part of each galaxy's light about its fitted centre, ``asymmetry_kwargs``), put
            them in free slots and fit again; kept by the same test as ``add_sources``.
        asymmetry_kwargs: ``snr_threshold``, ``min_distance``, ``mismatch`` of
            `asymmetry_peaks`.
        split_sources: model comparison on the joint fit: in each blend with a free slot, the
            fitted galaxy with the largest excess chi-square of the residual near it
            (`split_candidates`, above ``split_min_excess``) is replaced by two galaxies on its
            major axis, and the blend fitted again; the two are kept when -log L drops by more
            than ``penalty``, as for ``add_sources``.
        ring_sources: after the splits, in each blend with a free slot, the fitted galaxy with
            the largest residual excess (as ``split_sources``') gets a new galaxy beside it,
            ``ring_radius`` pixels away in each of ``ring_sources`` directions (from its major
            axis) in turn; the blend is fitted for each, and the best fit kept when -log L drops
            by more than ``ring_penalty``. 0: none.
        ring_radius: see ``ring_sources`` (pixels).
        ring_penalty: the drop of -log L the ring's best fit must exceed: "bic" (the default:
            Schwarz's, half the new galaxy's parameters times the log of the number of pixel
            values fitted, bands included: ~57 for 12 parameters on a 48-pixel, 6-band window),
            "aic" (Akaike's, the new galaxy's parameters), or a number >= 0. The best of
            ``ring_sources`` non-linear fits also gains from a single profile's misfit of a
            bright galaxy (a bulge, colour gradients). On the tuning seeds of
            ``benchmarks/bench_deblend.py`` (an offline scan of session 5's setup: batch-wide
            fit windows, the residual additions' peak bug) Akaike's threshold took the ring's
            galaxy in 67 of 200 blends, a threshold of 60 in 38: 2 fewer galaxies of blendedness
            > 0.5 matched (79 of 133), their median flux error 0.408 -> 0.361. `ring_threshold`
            computes it.
        penalty: the drop of -log L per new galaxy that the additions (``asymmetry_sources``,
            ``add_sources``) and splits must exceed, and the rise per removed galaxy below which
            a merge is kept (and the moves' criterion, -log L plus it per galaxy): "aic" (the
            default: Akaike's, the galaxy's parameters), "bic" (Schwarz's, as ``ring_penalty``)
            or a number >= 0 (`ring_threshold`).
        concentric_sources: rounds of a second profile at the fitted centre of the galaxy of
            largest residual excess of each blend with a free slot (as ``split_sources``'
            candidates), before any addition: a bulge, a core or a colour gradient that one
            profile misfits and that offset pieces (residual peaks, splits, the ring) would
            otherwise absorb. Kept by ``penalty``, as an addition; the rounds stop early when
            none is kept. With it (> 0), the splits and the ring search also propose the
            concentric profile beside their own proposals, and keep the best of them by their
            own threshold (``penalty`` for the splits, ``ring_penalty`` for the ring).
            `ForwardModelMeasure` reports a concentric pair as one galaxy (``join_pixels``).
        multi_start: every refit of the model comparisons (additions, splits, merges, moves)
            runs twice, from `init_galaxies` and from the fit as it is (the galaxies that stay
            where they were at their fitted parameters); the lower -log L is kept.
        split_rounds: rounds of ``split_sources`` (each on the fit kept by the previous one;
            it stops early when no split is kept).
        merge_sources: the reverse model comparison, after the splits: in each blend, the
            fainter of the two fitted galaxies closest in units of their half-light radii
            (`merge_candidates`, closer than ``merge_max_separation``) is removed and the blend
            fitted again; the fit with one galaxy fewer is kept unless -log L rises by more
            than ``penalty``. ``merge_rounds`` rounds at most: each
            proposes in each blend the closest pair not proposed since the blend last changed
            (it stops early when no pair is left).
        move_sources: with ``merge_sources``, a third model of each merge candidate's blend:
            the galaxy moved instead of removed, to the most significant peak of the merged
            fit's residual (`residual_peaks`, ``residual_kwargs``), and the blend fitted again;
            of the three (as it is, merged, moved) the one of least information criterion
            (-log L plus ``penalty`` per galaxy) is kept. A
            bright galaxy fitted as two pieces while a faint neighbour went undetected is a
            local minimum that neither a merge (the neighbour's light is lost) nor a residual
            detection (the piece holds it) leaves. Needs one PSF for the batch.
        start_hlr: `init_galaxies`'s compact start (arcsec), also for the refits of
            ``add_sources`` and ``split_sources``; None: the moments' shapes.
        candidates: None or ``(x, y, mask)`` [blend, k] arrays (pixels): positions that a
            detector found too weak to start from, tried after the first fit and before any
            other addition, one per round (round j: each blend's j-th candidate, in a free
            slot), each kept when -log L drops by more than ``penalty`` (as an addition).
            Candidates outside the stamp are not tried (a proposal, not a detection).
        **fit_kwargs: passed to `fit` (optimizer, max_steps, rtol, prior, ...).

    Returns:
        `FitResult`.
    """
    check_spec(spec)
    for name, value, least, what in (("split_rounds", split_rounds, 1, "rounds"),
                                     ("merge_rounds", merge_rounds, 1, "rounds"),
                                     ("add_sources", add_sources, 0, "galaxies"),
                                     ("asymmetry_sources", asymmetry_sources, 0, "galaxies"),
                                     ("ring_sources", ring_sources, 0, "directions"),
                                     ("concentric_sources", concentric_sources, 0, "rounds"),
                                     ("residual_rounds", residual_rounds, 1, "rounds")):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise ValueError(f"{name} must be a number of {what} >= {least}, got {value!r}.")
    if isinstance(ring_radius, bool) or not isinstance(ring_radius, int | float | np.floating) \
            or not (np.isfinite(ring_radius) and ring_radius > 0):
        raise ValueError(f"ring_radius must be a finite number of pixels > 0, got "
                         f"{ring_radius!r}.")
    check_penalty("ring_penalty", ring_penalty)
    check_penalty("penalty", penalty)
    needs_one_psf = [name for name, on in (("add_sources", add_sources),
                                           ("asymmetry_sources", asymmetry_sources),
                                           ("ring_sources", ring_sources),
                                           ("concentric_sources", concentric_sources),
                                           ("split_sources", split_sources),
                                           ("move_sources", move_sources and merge_sources))
                     if on]
    if needs_one_psf and np.ndim(psf_k) != 3:
        raise ValueError(f"{needs_one_psf[0]} needs one PSF for the batch ([band, Ry, Cx]).")
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != spec.stamp_pixels or images.shape[-2] != \
            spec.stamp_pixels:
        raise ValueError(f"images must be [blend, band, {spec.stamp_pixels}, "
                         f"{spec.stamp_pixels}] (the spec's stamp), got {images.shape}.")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    if jax.config.jax_enable_x64 and images.dtype == jnp.float32 and \
            fit_kwargs.get("optimizer", "lbfgs") == "lbfgs":
        # optax's L-BFGS line search differentiates its value function with a float64
        # cotangent under x64, which fails on float32 parameters: fit in float64 (the sharp bit
        # is optax's).
        images = images.astype(jnp.float64)
    psf_k = jnp.asarray(psf_k)
    if psf_k.dtype != (jnp.complex128 if images.dtype == jnp.float64 else jnp.complex64):
        psf_k = psf_k.astype(jnp.complex128 if images.dtype == jnp.float64 else jnp.complex64)
    n_band = images.shape[1]
    sky_arr = np.asarray(sky, dtype=float)
    if sky_arr.shape[-1] != n_band or np.any(~(sky_arr > 0)):
        raise ValueError(f"sky must hold {n_band} positive levels (one per band), got {sky}.")
    if psf_k.ndim not in (3, 4) or psf_k.shape[-3] != n_band:
        raise ValueError(f"psf_k must be [band, Ry, Cx] or [blend, band, Ry, Cx] with {n_band} "
                         f"bands, got shape {psf_k.shape}.")
    too_many = np.zeros(images.shape[0], bool)
    if isinstance(detections, tuple) and len(detections) == 3:
        x, y, mask = (np.asarray(a) for a in detections)
        mask = mask.astype(bool)
        if not (x.shape == y.shape == mask.shape and x.ndim == 2 and len(x) == len(images)):
            raise ValueError(f"detections (x, y, mask) must be [blend, slot] arrays with "
                             f"{len(images)} blends, got shapes {x.shape}, {y.shape}, "
                             f"{mask.shape}.")
    else:
        if len(detections) != images.shape[0]:
            raise ValueError(f"detections has {len(detections)} blends, images "
                             f"{images.shape[0]}.")
        x, y, mask, too_many = pad_detections(detections, max_sources)
    s = spec.stamp_pixels
    inside = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x <= s - 0.5) & (y >= -0.5) & \
        (y <= s - 0.5)
    outside = (mask & ~inside).any(axis=1)
    mask = mask & inside
    x = np.where(mask, x, (s - 1) / 2)
    y = np.where(mask, y, (s - 1) / 2)
    dtype = images.dtype
    model = spec_model(spec)
    max_offset = float(fit_kwargs.get("max_offset", 4.0))
    chunk = check_chunk(chunk)
    ax, ay = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    jmask = jnp.asarray(mask)
    sky_init = jnp.asarray(sky_arr if sky_arr.ndim == 1 else sky_arr[0], dtype)
    if init is None:
        psf_shared = psf_k if psf_k.ndim == 3 else psf_k[0]
        init = apply_chunked(lambda img, x1, y1, m1: init_galaxies(
            img, x1, y1, m1, psf_shared, spec, sky_init, start_hlr=start_hlr),
                        images.shape[0], chunk, (images, ax, ay, pad_mask(jmask, chunk)))
    params = to_unconstrained_batch(init, ax, ay, chunk, model, max_offset)
    out = fit(params, ax, ay, jmask, images, psf_k, spec, sky_arr, chunk=chunk, **fit_kwargs)
    status, n_steps, loss, chi2 = out.status, out.n_steps, out.loss, out.chi2
    galaxies = to_physical_batch(out.params, ax, ay, chunk, model, max_offset)
    added = np.zeros(mask.shape, bool)
    n_par_one = n_params(model, n_band)
    # the pixel values fitted, bands included
    n_data = int(np.prod(images.shape[1:]))
    per_galaxy = ring_threshold(penalty, n_par_one, n_data)

    def refit(redo, x2, y2, m2):
        """Fits blends ``redo`` again from the detections (x2, y2, m2): (output of `fit`,
        initial and fitted `Galaxies`)."""
        img2 = np.asarray(images)[redo]  # numpy: no gather compiled per len(redo)
        ax2, ay2, jm2 = jnp.asarray(x2, dtype), jnp.asarray(y2, dtype), jnp.asarray(m2)
        init2 = apply_chunked(lambda img, x1, y1, m1: init_galaxies(
            img, x1, y1, m1, psf_k, spec, sky_init, start_hlr=start_hlr),
                              len(redo), chunk, (img2, ax2, ay2, pad_mask(jm2, chunk)))
        sky2 = sky_arr if sky_arr.ndim == 1 else sky_arr[redo]
        out2 = fit(to_unconstrained_batch(init2, ax2, ay2, chunk, model, max_offset),
                   ax2, ay2, jm2, img2, psf_k, spec, sky2, chunk=chunk, **fit_kwargs)
        if multi_start:
            # also from the fit as it is: the galaxies that stay where they were start at their
            # fitted parameters, the new ones as above; the lower -log L of the two is kept
            same = m2 & mask[redo] & (x2 == x[redo]) & (y2 == y[redo])
            cur = jax.tree.map(lambda a: np.asarray(a)[redo], galaxies)

            def warm(a, b):
                w = same.reshape(same.shape + (1,) * (np.ndim(a) - 2))
                return jnp.asarray(np.where(w, np.asarray(b), np.asarray(a)))

            init_w = jax.tree.map(warm, init2, cur)
            out_w = fit(to_unconstrained_batch(init_w, ax2, ay2, chunk, model, max_offset),
                        ax2, ay2, jm2, img2, psf_k, spec, sky2, chunk=chunk, **fit_kwargs)
            lw, lc = np.asarray(out_w.loss), np.asarray(out2.loss)
            better = np.isfinite(lw) & ~(lc <= lw)

            def pick(a, b):
                w = better.reshape(better.shape + (1,) * (np.ndim(a) - 1))
                return jnp.asarray(np.where(w, np.asarray(b), np.asarray(a)))

            out2 = jax.tree.map(pick, out2, out_w)
            init2 = jax.tree.map(pick, init2, init_w)
        return out2, init2, to_physical_batch(out2.params, ax2, ay2, chunk, model, max_offset)

    def keep(redo, keep_, x2, y2, m2, a2, fitted):
        """Takes the refits ``fitted`` (`refit`'s) of the blends ``redo[keep_]``."""
        nonlocal galaxies, init, status, n_steps, loss, chi2, ax, ay, jmask
        out2, init2, gal2 = fitted
        k, kr = redo[keep_], np.flatnonzero(keep_)
        if not len(k):
            return

        def merge(a, b):  # on the host: eager scatters would compile for every len(k)
            a = np.array(a)
            a[k] = np.asarray(b)[kr]
            return jnp.asarray(a)

        galaxies = jax.tree.map(merge, galaxies, gal2)
        init = jax.tree.map(merge, init, init2)
        status = merge(status, np.asarray(out2.status) | STATUS_ADDED)
        n_steps = merge(n_steps, np.asarray(out2.n_steps) + np.asarray(n_steps)[redo])
        loss, chi2 = merge(loss, out2.loss), merge(chi2, out2.chi2)
        mask[k], added[k] = m2[kr], a2[kr]
        x[k], y[k] = x2[kr], y2[kr]
        ax, ay, jmask = jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(mask)

    def attempt(redo, x2, y2, m2, a2, n_new):
        """Refits blends ``redo`` from the detections (x2, y2, m2) and keeps each refit whose
        -log L drops by more than ``penalty`` for each of its ``n_new`` galaxies (negative:
        removed); returns which were kept ([len(redo)] bool)."""
        fitted = refit(redo, x2, y2, m2)
        new_loss = np.asarray(fitted[0].loss)
        ok = np.isfinite(new_loss) & (new_loss < np.asarray(loss)[redo] - n_new * per_galaxy)
        keep(redo, ok, x2, y2, m2, a2, fitted)
        return ok

    def attempt_best(redo, proposals, threshold):
        """Refits blends ``redo`` from each of ``proposals`` (a list of (x2, y2, m2, a2)) and
        keeps each blend's best refit when its -log L drops by more than ``threshold``;
        returns which were kept ([len(redo)] bool)."""
        fits = [refit(redo, *p[:3]) for p in proposals]
        losses = np.stack([np.where(np.isfinite(np.asarray(f[0].loss)), np.asarray(f[0].loss),
                                    np.inf) for f in fits])
        best = np.argmin(losses, axis=0)
        ok = losses[best, np.arange(len(redo))] < np.asarray(loss, float)[redo] - threshold
        for k, (p, fitted) in enumerate(zip(proposals, fits, strict=True)):
            keep(redo, ok & (best == k), *p, fitted)
        return ok

    def concentric(redo, slot):
        """The proposal of a second profile at the fitted centre of each blend's galaxy
        ``slot`` (a quarter pixel along its major axis, so that the two starts differ): a
        bulge and a disk, or a colour gradient, rather than two galaxies."""
        g = jax.tree.map(np.asarray, galaxies)
        axis = 0.5 * np.arctan2(g.g2, g.g1)[redo, slot]
        x2, y2, m2, a2 = x[redo].copy(), y[redo].copy(), mask[redo].copy(), added[redo].copy()
        rows, new = np.arange(len(redo)), np.argmax(~m2, axis=1)  # each blend's first free slot
        x2[rows, new] = np.clip(g.x[redo, slot] + 0.25 * np.cos(axis), 0, s - 1)
        y2[rows, new] = np.clip(g.y[redo, slot] + 0.25 * np.sin(axis), 0, s - 1)
        m2[rows, new] = a2[rows, new] = True
        return x2, y2, m2, a2

    def add_peaks(peaks):
        """Puts each blend's significant ``peaks`` (`ResidualPeaks`) in its free slots and
        keeps the refits that pass `attempt`; returns whether any was kept."""
        px, py, found = np.asarray(peaks.x), np.asarray(peaks.y), np.asarray(peaks.found)
        free = (~mask).sum(axis=1)
        found = found & (np.cumsum(found, axis=1) <= free[:, None])
        redo = np.flatnonzero(found.any(axis=1))
        if not len(redo):
            return False
        x2, y2, m2, a2 = x[redo].copy(), y[redo].copy(), mask[redo].copy(), added[redo].copy()
        for r, b in enumerate(redo):  # r: the row of the refit, b: the blend of the batch
            slots = np.flatnonzero(~m2[r])[:found[b].sum()]
            x2[r, slots], y2[r, slots] = px[b][found[b]], py[b][found[b]]
            m2[r, slots] = a2[r, slots] = True
        return bool(attempt(redo, x2, y2, m2, a2, found[redo].sum(axis=1)).any())

    if candidates is not None:
        cx, cy, cm = (np.asarray(a) for a in candidates)
        if not (cx.shape == cy.shape == cm.shape and cx.ndim == 2 and len(cx) == len(x)):
            raise ValueError(f"candidates (x, y, mask) must be [blend, k] arrays with {len(x)} "
                             f"blends, got shapes {cx.shape}, {cy.shape}, {cm.shape}.")
        cm = cm.astype(bool) & np.isfinite(cx) & np.isfinite(cy) & (cx >= -0.5) & \
            (cx <= s - 0.5) & (cy >= -0.5) & (cy <= s - 0.5)
        for j in range(cx.shape[1]):
            redo = np.flatnonzero(cm[:, j] & (~mask).any(axis=1))
            if not len(redo):
                continue
            x2, y2, m2, a2 = x[redo].copy(), y[redo].copy(), mask[redo].copy(), \
                added[redo].copy()
            rows, new = np.arange(len(redo)), np.argmax(~m2, axis=1)  # first free slot
            x2[rows, new], y2[rows, new] = cx[redo, j], cy[redo, j]
            m2[rows, new] = a2[rows, new] = True
            attempt(redo, x2, y2, m2, a2, np.ones(len(redo)))
    for _ in range(int(concentric_sources)):
        cand = split_candidates(galaxies, mask, images, psf_k, spec, sky_init,
                                min_excess=float(split_min_excess))
        redo = np.flatnonzero(cand.slot >= 0)
        if not len(redo) or not attempt_best(redo, [concentric(redo, cand.slot[redo])],
                                             per_galaxy).any():
            break
    if asymmetry_sources:
        add_peaks(asymmetry_peaks(galaxies, jmask, images, psf_k, spec, sky_init,
                                  n_add=int(asymmetry_sources), chunk=chunk,
                                  **(asymmetry_kwargs or {})))
    for _ in range(int(residual_rounds) if add_sources else 0):
        if not add_peaks(residual_peaks(galaxies, jmask, images, psf_k, spec, sky_init,
                                        n_add=int(add_sources), chunk=chunk,
                                        **(residual_kwargs or {}))):
            break
    for _ in range(int(split_rounds) if split_sources else 0):
        cand = split_candidates(galaxies, mask, images, psf_k, spec, sky_init,
                                min_excess=float(split_min_excess))
        redo = np.flatnonzero(cand.slot >= 0)
        if not len(redo):
            break
        x2, y2, m2, a2 = x[redo].copy(), y[redo].copy(), mask[redo].copy(), added[redo].copy()
        for r, b in enumerate(redo):
            new = np.flatnonzero(~m2[r])[0]
            x2[r, cand.slot[b]], y2[r, cand.slot[b]] = cand.x1[b], cand.y1[b]
            x2[r, new], y2[r, new] = cand.x2[b], cand.y2[b]
            m2[r, new] = a2[r, new] = True
        proposals = [(x2, y2, m2, a2)]
        if concentric_sources:
            proposals.append(concentric(redo, cand.slot[redo]))
        if not attempt_best(redo, proposals, per_galaxy).any():
            break
    if ring_sources:
        # a neighbour within ~1 PSF FWHM of a bright galaxy whose one profile has absorbed it:
        # no residual peak is left, nor a linear (score) test's, but the likelihood of a fit
        # with a galaxy beside it is far lower. Propose one in each of ring_sources directions
        # around the galaxy with the largest residual excess, fit each, keep the best if it passes
        # ring_penalty.
        cand = split_candidates(galaxies, mask, images, psf_k, spec, sky_init,
                                min_excess=float(split_min_excess))
        redo = np.flatnonzero(cand.slot >= 0)
        if len(redo):
            g = jax.tree.map(np.asarray, galaxies)
            cx, cy = g.x[redo, cand.slot[redo]], g.y[redo, cand.slot[redo]]
            axis = 0.5 * np.arctan2(g.g2, g.g1)[redo, cand.slot[redo]]
            proposals = []
            for k in range(int(ring_sources)):
                theta = axis + 2 * np.pi * k / int(ring_sources)
                x2, y2 = x[redo].copy(), y[redo].copy()
                m2, a2 = mask[redo].copy(), added[redo].copy()
                for r in range(len(redo)):
                    new = np.flatnonzero(~m2[r])[0]
                    x2[r, new] = np.clip(cx[r] + ring_radius * np.cos(theta[r]), 0, s - 1)
                    y2[r, new] = np.clip(cy[r] + ring_radius * np.sin(theta[r]), 0, s - 1)
                    m2[r, new] = a2[r, new] = True
                proposals.append((x2, y2, m2, a2))
            if concentric_sources:
                proposals.append(concentric(redo, cand.slot[redo]))
            attempt_best(redo, proposals, ring_threshold(ring_penalty, n_par_one, n_data))
    tried = np.zeros(mask.shape + mask.shape[1:], bool)  # [blend, slot, slot] pairs proposed
    for _ in range(int(merge_rounds) if merge_sources else 0):
        cand = merge_candidates(galaxies, mask, spec.pixel_scale,
                                max_separation=float(merge_max_separation), exclude=tried)
        redo = np.flatnonzero(cand.slot >= 0)
        if not len(redo):
            break
        tried[redo, cand.slot[redo], cand.partner[redo]] = True
        x2, y2, m2, a2 = x[redo].copy(), y[redo].copy(), mask[redo].copy(), added[redo].copy()
        rows, slots = np.arange(len(redo)), cand.slot[redo]
        m2[rows, slots] = a2[rows, slots] = False
        if not move_sources:
            kept = attempt(redo, x2, y2, m2, a2, -np.ones(len(redo)))
            tried[redo[kept]] = False  # a new configuration: every pair may be proposed
            continue
        # the least information criterion (-log L + penalty per galaxy) among three models of
        # each blend: as it is, merged (one galaxy fewer), and
        # moved (the merged fit's most significant residual peak in the freed slot)
        merged = refit(redo, x2, y2, m2)
        aic_old = np.asarray(loss)[redo]
        aic_merged = np.asarray(merged[0].loss) - per_galaxy
        aic_merged = np.where(np.isfinite(aic_merged), aic_merged, np.inf)
        img2 = np.asarray(images)[redo]
        peaks = residual_peaks(merged[2], jnp.asarray(m2), img2, psf_k, spec, sky_init, n_add=1,
                               chunk=chunk, **(residual_kwargs or {}))
        found = np.asarray(peaks.found)[:, 0]
        aic_moved = np.full(len(redo), np.inf)
        x3, y3, m3, a3 = x2.copy(), y2.copy(), m2.copy(), a2.copy()
        x3[rows, slots] = np.where(found, np.asarray(peaks.x)[:, 0], x3[rows, slots])
        y3[rows, slots] = np.where(found, np.asarray(peaks.y)[:, 0], y3[rows, slots])
        m3[rows, slots] = a3[rows, slots] = found
        moved = None
        if found.any():
            f = np.flatnonzero(found)
            moved = refit(redo[f], x3[f], y3[f], m3[f])
            lm = np.asarray(moved[0].loss)
            aic_moved[f] = np.where(np.isfinite(lm), lm, np.inf)
        take_m = (aic_merged < aic_old) & (aic_merged <= aic_moved)
        take_r = (aic_moved < aic_old) & (aic_moved < aic_merged)
        keep(redo, take_m, x2, y2, m2, a2, merged)
        if moved is not None:
            keep(redo[f], take_r[f], x3[f], y3[f], m3[f], a3[f], moved)
        tried[redo[take_m | take_r]] = False
    status = np.asarray(status) | (np.where(~mask.any(axis=1), STATUS_NO_DETECTIONS, 0)
                                   | np.where(outside, STATUS_OUTSIDE_STAMP, 0)
                                   | np.where(too_many, STATUS_TOO_MANY, 0)).astype(np.int32)
    errs = None
    if errors:
        fe = fisher_errors(galaxies, jmask, images, psf_k, spec, sky_arr, chunk=chunk,
                           prior=fit_kwargs.get("prior"), weight=fit_kwargs.get("weight"),
                           noise=fit_kwargs.get("noise", "poisson"))
        errs = fe.errors
        status = status | np.where(np.asarray(fe.ok), 0, STATUS_BAD_ERRORS).astype(np.int32)
    return FitResult(galaxies=galaxies, init=init, mask=jmask, status=jnp.asarray(status),
                     n_steps=n_steps, loss=loss, chi2=chi2,
                     n_pixels=int(np.prod(images.shape[1:])), errors=errs,
                     added=jnp.asarray(added))
