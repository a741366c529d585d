"""Plots of blends, galaxy parameters, deblending results and metrics (matplotlib).

Every function returns what it draws (a figure, or a list or dict of figures) and leaves showing
them to the caller (Jupyter shows the figures of a cell; scripts call ``plt.show()`` or save
them). Images are [band, y, x] arrays as the generators return them (``channels_last=False``);
pixel coordinates are 0-based, x to the right and y up (``origin="lower"``), as ``x_peak``,
``y_peak`` in the blend tables.

RGB images take three bands, ``band_indices``, ordered from blue to red (BTK's default (1, 2, 3)
is g, r, i for LSST's u, g, r, i, z, y): the last goes to the red channel. ``norm`` picks the
stretch:

- ``"linear"``: each channel scaled from its minimum to its maximum (BTK's ``get_rgb``);
- ``"asinh"``: Lupton et al. (2004) asinh stretch of the three bands together, softening ``Q``,
  from the image minimum over the full range (BTK's asinh normalization);
- ``"lupton"``: `astropy.visualization.make_lupton_rgb` with ``Q`` and ``stretch`` (default: the
  99.5th percentile of the pixel mean above its median) and ``minimum`` (default: the median).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
from astropy.table import Table, vstack

__all__ = [
    "NORMS",
    "get_rgb",
    "get_rgb_image",
    "plot_blends",
    "plot_gal_parameters",
    "plot_efficiency_matrix",
    "plot_metrics_summary",
    "plot_with_deblended",
]

NORMS = ("linear", "asinh", "lupton")
_RECONSTRUCTION_METRICS = ("msr", "mse", "psnr", "ssim", "iou", "chi2")
_DETECTED_COLUMNS = ("is_matched", "detected", "matched")


# -- RGB ---------------------------------------------------------------------------------------


def get_rgb(image: np.ndarray, min_val=None, max_val=None) -> np.ndarray:
    """Per-channel linear scaling of a [3, y, x] image to a uint8 [y, x, 3] RGB (BTK's)."""
    image = np.asarray(image, dtype=float)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"get_rgb needs a [3, y, x] image, got shape {image.shape}.")
    lo = image.min(axis=(1, 2)) if min_val is None else np.broadcast_to(min_val, (3,))
    hi = image.max(axis=(1, 2)) if max_val is None else np.broadcast_to(max_val, (3,))
    span = np.where(hi > lo, hi - lo, 1.0)
    rgb = (np.moveaxis(image, 0, -1) - lo) / span * 255
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _asinh_rgb(rgb_bands: np.ndarray, minimum: float, stretch: float, Q: float) -> np.ndarray:
    """Lupton asinh mapping of [3, y, x] (red first) to uint8 [y, x, 3]."""
    from astropy.visualization import make_lupton_rgb

    stretch = float(stretch) if stretch > 0 else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):  # zero-intensity pixels map to 0
        return make_lupton_rgb(rgb_bands[0], rgb_bands[1], rgb_bands[2],
                               minimum=float(minimum), stretch=stretch, Q=float(Q))


def get_rgb_image(image: np.ndarray, norm: str = "asinh", Q: float = 0.1, stretch=None,
                  minimum=None) -> np.ndarray:
    """A uint8 [y, x, 3] RGB picture of three bands [3, y, x] ordered blue, green, red.

    Args:
        image: [3, y, x], bluest band first.
        norm: "linear", "asinh" or "lupton" (see the module docstring).
        Q: asinh softening ("asinh", "lupton").
        stretch: linear range of the asinh ("asinh": default max - min; "lupton": default the
            99.5th percentile of the band mean minus its median).
        minimum: black level (default: the image minimum for "asinh", the median for "lupton").
    """
    image = np.asarray(image, dtype=float)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"An RGB needs three bands [3, y, x]; got shape {image.shape}.")
    _check_norm(norm)
    red_first = image[::-1]
    if norm == "linear":
        return get_rgb(red_first)
    if norm == "asinh":
        lo = float(image.min()) if minimum is None else float(minimum)
        span = float(image.max()) - lo if stretch is None else float(stretch)
        return _asinh_rgb(red_first, lo, span, Q)
    mean = image.mean(axis=0)
    lo = float(np.median(mean)) if minimum is None else float(minimum)
    span = float(np.percentile(mean, 99.5) - lo) if stretch is None else float(stretch)
    return _asinh_rgb(red_first, lo, span, Q)


def _check_norm(norm):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


# -- input checks ------------------------------------------------------------------------------


def _single_survey(value, what: str):
    if isinstance(value, Mapping):
        raise TypeError(
            f"{what} is a dict keyed by survey ({list(value)}): this is a multi-survey batch; "
            f"pass one survey's entry, e.g. {what}[{next(iter(value))!r}]."
        )
    return value


def _check_images(blend_images, what="blend_images") -> np.ndarray:
    images = np.asarray(_single_survey(blend_images, what))
    if images.ndim != 4:
        raise ValueError(
            f"{what} must be [blend, band, y, x] (channels_last=False), got shape {images.shape}."
        )
    return images


def _check_band_indices(band_indices, n_bands: int) -> list[int]:
    band_indices = [int(b) for b in band_indices]
    if len(band_indices) != 3:
        raise ValueError(f"band_indices must hold 3 band indices, got {band_indices}.")
    bad = [b for b in band_indices if not -n_bands <= b < n_bands]
    if bad:
        raise ValueError(f"band_indices {bad} out of range for images with {n_bands} bands.")
    return band_indices


def _check_limits(limits):
    if limits is None:
        return None
    if len(limits) != 2 or not float(limits[0]) < float(limits[1]):
        raise ValueError(
            f"limits must be (start, end) pixel coordinates with start < end, got {limits!r}."
        )
    return float(limits[0]), float(limits[1])


def _apply_limits(ax, limits):
    if limits is not None:
        ax.set_xlim(limits)
        ax.set_ylim(limits)


def _centers(obj) -> np.ndarray:
    """[n, 2] pixel centers (x, y) from a table with x_peak, y_peak or an [n, 2] array."""
    if obj is None:
        return np.zeros((0, 2))
    if isinstance(obj, Table):
        if len(obj) == 0:
            return np.zeros((0, 2))
        if not {"x_peak", "y_peak"} <= set(obj.colnames):
            raise ValueError(
                f"A detection table needs 'x_peak' and 'y_peak' columns (pixels); it has "
                f"{obj.colnames}."
            )
        return np.column_stack([np.asarray(obj["x_peak"], float), np.asarray(obj["y_peak"], float)])
    arr = np.asarray(obj, dtype=float)
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"detected centers must be [n, 2] (x, y) pixels, got shape {arr.shape}.")
    return arr


# -- blends ------------------------------------------------------------------------------------


def plot_blends(blend_images, blend_list, detected_centers=None, limits=None,
                band_indices=(1, 2, 3), norm: str = "linear", Q: float = 0.1, stretch=None,
                minimum=None, band_names=None, figsize=(12, 4)) -> list:
    """One figure per blend: the RGB image, the sum over bands, and the RGB with centers.

    The third panel marks the true centers (``x_peak``, ``y_peak`` of the blend table, red
    crosses) and, when given, the detections (green circles).

    Args:
        blend_images: [blend, band, y, x] images (one survey).
        blend_list: one astropy table per blend with ``x_peak``, ``y_peak``.
        detected_centers: per blend, an [n, 2] array of (x, y) pixel centers or a table with
            ``x_peak``, ``y_peak``; None: no detections shown.
        limits: (start, end) pixel coordinates shown, applied to both x and y (BTK's meaning:
            ``limits=(30, 90)`` zooms on pixels 30 to 90 of a 120-pixel stamp); None: all.
        band_indices: the three bands of the RGB, bluest first.
        norm, Q, stretch, minimum: the RGB stretch (`get_rgb_image`).
        band_names: names of the bands, for the titles (default: their indices).
        figsize: size of each figure (inches).

    Returns:
        The list of figures, one per blend.
    """
    images = _check_images(blend_images)
    blend_list = list(_single_survey(blend_list, "blend_list"))
    if len(blend_list) != len(images):
        raise ValueError(
            f"blend_images has {len(images)} blends but blend_list has {len(blend_list)}."
        )
    if detected_centers is not None and len(detected_centers) != len(images):
        raise ValueError(
            f"detected_centers has {len(detected_centers)} entries for {len(images)} blends."
        )
    bands = _check_band_indices(band_indices, images.shape[1])
    _check_norm(norm)
    limits = _check_limits(limits)
    names = [str(band_names[b]) if band_names is not None else str(b) for b in bands]
    figures = []
    for i, (image, table) in enumerate(zip(images, blend_list, strict=False)):
        rgb = get_rgb_image(image[bands], norm=norm, Q=Q, stretch=stretch, minimum=minimum)
        fig, axes = plt.subplots(1, 3, figsize=figsize)
        axes[0].imshow(rgb, origin="lower")
        axes[0].set_title(f"RGB (bands {', '.join(names[::-1])})")
        axes[1].imshow(image.sum(axis=0), origin="lower", cmap="gray")
        axes[1].set_title("Sum of all bands")
        axes[2].imshow(rgb, origin="lower")
        true = _centers(table)
        axes[2].plot(true[:, 0], true[:, 1], "rx", ms=8, mew=2, label="true")
        title = f"{len(table)} objects with centers"
        if detected_centers is not None:
            det = _centers(detected_centers[i])
            axes[2].plot(det[:, 0], det[:, 1], "go", fillstyle="none", ms=12, mew=2,
                         label="detected")
            title = f"{len(table)} true, {len(det)} detected"
        axes[2].set_title(title)
        for ax in axes:
            _apply_limits(ax, limits)
            ax.axis("off")
        fig.tight_layout()
        figures.append(fig)
    return figures


def plot_gal_parameters(blend_list, size_column: str = "btk_size", mag_column: str = "ref_mag",
                        n_bins: int = 20, figsize=(10, 4)):
    """Histograms of the size and magnitude of every galaxy of a batch.

    Args:
        blend_list: one astropy table per blend (or one table, or a dict keyed by survey: the
            first survey's tables are used, sizes and magnitudes do not depend on the survey).
        size_column: the size column (arcsec; BTK's ``btk_size``).
        mag_column: the magnitude column (BTK's ``ref_mag``).
        n_bins: histogram bins.

    Returns:
        The figure (two axes: size, magnitude).
    """
    if isinstance(blend_list, Mapping):
        blend_list = next(iter(blend_list.values()))
    tables = [blend_list] if isinstance(blend_list, Table) else [t for t in blend_list if len(t)]
    table = vstack(tables, metadata_conflicts="silent") if tables else Table()
    missing = [c for c in (size_column, mag_column) if c not in table.colnames]
    if missing:
        raise ValueError(
            f"The blend tables lack column(s) {missing}; they have {table.colnames}."
        )
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    for ax, column, label in ((axes[0], size_column, "size (arcsec)"),
                              (axes[1], mag_column, "magnitude")):
        values = np.asarray(table[column], dtype=float)
        ax.hist(values[np.isfinite(values)], bins=n_bins, histtype="step", lw=2)
        ax.set_xlabel(f"{column}: {label}")
        ax.set_ylabel("galaxies")
        ax.set_title(f"{label.split(' ')[0].capitalize()} ({len(values)} galaxies)")
    fig.tight_layout()
    return fig


# -- metrics -----------------------------------------------------------------------------------


def plot_efficiency_matrix(eff_matrix, ax=None, skip_zero: bool = True, title=None):
    """Draws a detection efficiency matrix: column j (j true galaxies in the blend) gives the
    percentage of blends with i correct detections (row i); columns sum to 100.

    Args:
        eff_matrix: [n_detected, n_true] array of percentages (or counts).
        ax: axes to draw on (default: a new figure).
        skip_zero: leave out the column of blends with no true galaxy.
        title: the axes title.

    Returns:
        The axes.
    """
    eff = np.asarray(eff_matrix, dtype=float)
    if eff.ndim != 2:
        raise ValueError(f"eff_matrix must be 2-D [detected, true], got shape {eff.shape}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    first = 1 if skip_zero and eff.shape[1] > 1 else 0
    shown = eff[:, first:]
    ax.imshow(shown, origin="lower", cmap="Blues", aspect="auto",
              extent=(first - 0.5, eff.shape[1] - 0.5, -0.5, eff.shape[0] - 0.5))
    for i in range(shown.shape[0]):
        for j in range(shown.shape[1]):
            value = shown[i, j]
            ax.text(j + first, i, f"{value:.0f}", ha="center", va="center",
                    color="white" if value > 0.6 * max(shown.max(), 1e-12) else "black")
    ax.set_xlabel("number of true galaxies")
    ax.set_ylabel("number of correct detections")
    ax.set_xticks(range(first, eff.shape[1]))
    ax.set_yticks(range(eff.shape[0]))
    ax.set_title(title or "Efficiency matrix")
    return ax


def _measure_names(results: Mapping) -> list[str]:
    for key in ("galaxy_summary", "detection", "matches"):
        value = results.get(key)
        if isinstance(value, Mapping) and value:
            return list(value)
    raise ValueError(
        "metrics_results has no 'galaxy_summary' or 'detection' entries keyed by measure name; "
        f"its keys are {list(results)}."
    )


def _detected_mask(summary: Table) -> np.ndarray | None:
    for col in _DETECTED_COLUMNS:
        if col in summary.colnames:
            return np.asarray(summary[col]).astype(bool)
    return None


def _target_keys(summaries: Mapping[str, Table], keys) -> list[str]:
    available = sorted({c for s in summaries.values() for c in s.colnames
                        if f"{c}_true" in s.colnames})
    if keys is None:
        return available
    keys = [keys] if isinstance(keys, str) else list(keys)
    for key in keys:
        for name, summary in summaries.items():
            if key not in summary.colnames or f"{key}_true" not in summary.colnames:
                raise ValueError(
                    f"target_meas_keys: {key!r} needs columns {key!r} and {key + '_true'!r} in "
                    f"the galaxy_summary of {name!r}; the target measures there are {available}."
                )
    return keys


def _recall_curve(values, detected, n_bins, log):
    finite = np.isfinite(values)
    values, detected = values[finite], detected[finite]
    if log:
        positive = values > 0
        values, detected = values[positive], detected[positive]
    if values.size == 0:
        return np.array([]), np.array([])
    lo, hi = values.min(), values.max()
    if hi <= lo:
        hi = lo + 1.0
    edges = np.geomspace(lo, hi, n_bins + 1) if log else np.linspace(lo, hi, n_bins + 1)
    total, _ = np.histogram(values, edges)
    found, _ = np.histogram(values[detected], edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(total > 0, found / np.maximum(total, 1), np.nan)
    centers = np.sqrt(edges[:-1] * edges[1:]) if log else 0.5 * (edges[:-1] + edges[1:])
    return centers, recall


def _per_survey(value, survey_name, what):
    """One survey's entry of a multi-survey metrics value (dict keyed by survey name)."""
    if not isinstance(value, Mapping) or "eff_matrix" in value or "precision" in value:
        return value
    if survey_name is None:
        survey_name = next(iter(value))
    if survey_name not in value:
        raise ValueError(f"{what} has no survey {survey_name!r}; it has {list(value)}.")
    return value[survey_name]


def _metrics_figures(results, names, target_keys, target_limits, n_bins, survey_name=None):
    results = {k: ({n: _per_survey(v, survey_name, f"metrics_results[{k!r}][{n!r}]")
                    for n, v in d.items()} if isinstance(d, Mapping) else d)
               for k, d in results.items() if k in ("detection", "galaxy_summary")}
    summaries = {}
    for name in names:
        summary = results.get("galaxy_summary", {}).get(name)
        if summary is None:
            raise ValueError(f"metrics_results['galaxy_summary'] has no entry {name!r}.")
        summaries[name] = summary if isinstance(summary, Table) else Table(summary)
    target_keys = _target_keys(summaries, target_keys)
    if target_limits is not None and len(target_limits) != len(target_keys):
        raise ValueError(
            f"target_meas_limits has {len(target_limits)} entries for {len(target_keys)} "
            f"target_meas_keys {target_keys}; give one (low, high) per key or None."
        )
    figures = {}

    # 1. efficiency matrices
    detection = results.get("detection", {})
    with_eff = [n for n in names if isinstance(detection.get(n), Mapping)
                and detection[n].get("eff_matrix") is not None]
    if with_eff:
        fig, axes = plt.subplots(1, len(with_eff), figsize=(5 * len(with_eff), 4.5),
                                 squeeze=False)
        for ax, name in zip(axes[0], with_eff, strict=False):
            d = detection[name]
            scores = ", ".join(f"{k} {float(d[k]):.2f}" for k in ("precision", "recall", "f1")
                               if k in d)
            plot_efficiency_matrix(d["eff_matrix"], ax=ax,
                                   title=f"Efficiency matrix: {name}\n{scores}")
        fig.tight_layout()
        figures["efficiency"] = fig

    # 2. recall against SNR and blendedness
    panels = [(c, log) for c, log in (("snr", True), ("blendedness", False))
              if any(c in s.colnames for s in summaries.values())]
    if panels and any(_detected_mask(s) is not None for s in summaries.values()):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (column, log) in zip(axes[0], panels, strict=False):
            for name, summary in summaries.items():
                detected = _detected_mask(summary)
                if detected is None or column not in summary.colnames:
                    continue
                x, recall = _recall_curve(np.asarray(summary[column], float), detected, n_bins,
                                          log)
                ax.plot(x, recall, "o-", ms=3, label=name)
            if log:
                ax.set_xscale("log")
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel(column)
            ax.set_ylabel("recall (fraction detected)")
            ax.set_title(f"Recall vs {column}")
            ax.legend(fontsize="small")
        fig.tight_layout()
        figures["recall"] = fig

    # 3. reconstruction and segmentation metrics of the matched galaxies
    metrics = [m for m in _RECONSTRUCTION_METRICS if any(m in s.colnames for s in summaries.values())]
    if metrics:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=False):
            for name, summary in summaries.items():
                if metric not in summary.colnames:
                    continue
                values = np.asarray(summary[metric], float)
                detected = _detected_mask(summary)
                if detected is not None:
                    values = values[detected]
                values = values[np.isfinite(values)]
                if values.size:
                    ax.hist(values, bins=n_bins, histtype="step", lw=2, label=name)
            ax.set_xlabel(metric)
            ax.set_ylabel("matched galaxies")
            ax.set_title(metric.upper() if metric != "iou" else "IoU (segmentation)")
            ax.legend(fontsize="small")
        fig.tight_layout()
        figures["reconstruction"] = fig

    # 4. target measures: measured against true, and residuals
    if target_keys:
        fig, axes = plt.subplots(2, len(target_keys), figsize=(4.5 * len(target_keys), 8),
                                 squeeze=False)
        for j, key in enumerate(target_keys):
            limits = None if target_limits is None else target_limits[j]
            top, bottom = axes[0, j], axes[1, j]
            for name, summary in summaries.items():
                true = np.asarray(summary[f"{key}_true"], float)
                meas = np.asarray(summary[key], float)
                keep = np.isfinite(true) & np.isfinite(meas)
                detected = _detected_mask(summary)
                if detected is not None:
                    keep &= detected
                if limits is not None:
                    keep &= (true >= limits[0]) & (true <= limits[1])
                top.scatter(true[keep], meas[keep], s=6, alpha=0.6, label=name)
                residual = meas[keep] - true[keep]
                if residual.size:
                    bottom.hist(residual, bins=n_bins, histtype="step", lw=2, label=name)
            if limits is not None:
                top.set_xlim(limits)
                top.set_ylim(limits)
            lo, hi = top.get_xlim()
            top.plot([lo, hi], [lo, hi], "k--", lw=1)
            top.set_xlabel(f"{key} (true)")
            top.set_ylabel(f"{key} (measured)")
            top.set_title(f"{key}: measured vs true")
            top.legend(fontsize="small")
            bottom.set_xlabel(f"{key} measured - true")
            bottom.set_ylabel("matched galaxies")
            bottom.set_title(f"{key}: residual")
        fig.tight_layout()
        figures["target_measures"] = fig
    return figures


def plot_metrics_summary(metrics_results, target_meas_keys=None, target_meas_limits=None,
                         n_bins: int = 30, interactive: bool = False, measure_names=None,
                         survey_name=None):
    """Summary plots of the metrics of one or several measure functions.

    Figures (each drawn when its inputs exist):

    - ``"efficiency"``: the detection efficiency matrix per measure function
      (``results["detection"][name]["eff_matrix"]``, with its precision, recall and F1);
    - ``"recall"``: the fraction of true galaxies detected against their SNR (``snr``) and
      blendedness (``blendedness``) columns of ``galaxy_summary``;
    - ``"reconstruction"``: histograms of the reconstruction and segmentation metrics of the
      matched galaxies (``msr``/``mse``, ``psnr``, ``ssim``, ``iou``);
    - ``"target_measures"``: per target measure key, the measured value (column ``key``) against
      the true one (``key_true``), and the residuals.

    Args:
        metrics_results: the ``results`` dict of the metrics generator.
        target_meas_keys: target-measure columns to plot (e.g. ``["ellipticity0", "flux0"]``);
            None: every column ``c`` with a ``c_true`` partner.
        target_meas_limits: one (low, high) range of true values per key, or None.
        n_bins: histogram bins.
        interactive: with ipywidgets, return a widget that redraws for a chosen measure
            function and number of bins.
        measure_names: the measure functions to show (default: all).
        survey_name: with multi-survey metrics (entries keyed by survey name), the survey shown
            (default: the first).

    Returns:
        A dict of figures keyed as above (``interactive=True``: the ipywidgets widget).
    """
    if not isinstance(metrics_results, Mapping):
        raise TypeError(f"metrics_results must be the metrics dict, got {type(metrics_results)}.")
    names = list(measure_names) if measure_names is not None else _measure_names(metrics_results)
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    if target_meas_limits is not None:
        for lim in target_meas_limits:
            if lim is not None and (len(lim) != 2 or not lim[0] < lim[1]):
                raise ValueError(f"target_meas_limits entries must be (low, high), got {lim!r}.")
    if not interactive:
        return _metrics_figures(metrics_results, names, target_meas_keys, target_meas_limits,
                                int(n_bins), survey_name)
    try:
        import ipywidgets
    except ImportError:
        raise ImportError(
            "plot_metrics_summary(interactive=True) needs ipywidgets (pip install ipywidgets); "
            "use interactive=False for static figures."
        ) from None

    def draw(measure, bins):
        figs = _metrics_figures(metrics_results, [measure], target_meas_keys,
                                target_meas_limits, bins, survey_name)
        plt.show()
        return figs

    return ipywidgets.interactive(draw, measure=names,
                                  bins=ipywidgets.IntSlider(value=int(n_bins), min=5, max=100))


# -- deblended images --------------------------------------------------------------------------


def _match_ids(match, n_true: int) -> np.ndarray:
    """For each true galaxy, the index of its detection or -1, from BTK-like match records."""
    if isinstance(match, Table):
        ids = match["match_detected_id"]
    elif isinstance(match, Mapping):
        ids = match["match_detected_id"]
    elif hasattr(match, "match_detected_id"):
        ids = match.match_detected_id
    else:
        ids = match
    ids = np.asarray(ids, dtype=int).reshape(-1)
    if len(ids) != n_true:
        raise ValueError(f"The match of a blend has {len(ids)} entries for {n_true} galaxies.")
    return ids


def plot_with_deblended(blend_images, isolated_images, blend_list, detection_catalogs,
                        deblended_images, matches, indexes=(0,), band_indices=(1, 2, 3),
                        norm: str = "asinh", Q: float = 0.1, limits=None):
    """True isolated galaxies next to their matched deblended images, with residuals.

    One figure per blend in ``indexes``. First row: the blend (true centers as red crosses,
    detections as green circles), the sum of the deblended images, and the blend minus that sum
    (summed over ``band_indices``). Then one row per true galaxy: its isolated image, the
    deblended image matched to it (blank if undetected), and isolated minus deblended. The
    isolated and the deblended image of a galaxy share one stretch, so their colours compare.

    Args:
        blend_images: [blend, band, y, x].
        isolated_images: [blend, max_number, band, y, x].
        blend_list: per blend, the true table (``x_peak``, ``y_peak``).
        detection_catalogs: per blend, the detection table (``x_peak``, ``y_peak``) or None.
        deblended_images: per blend, [n_detected, band, y, x] (or None).
        matches: per blend, the match of the metrics (a record with ``match_detected_id``: for
            each true galaxy, the index of its detection or -1).
        indexes: the blends to plot.
        band_indices, norm, Q: the RGB (`get_rgb_image`).
        limits: (start, end) pixel coordinates shown (both axes).

    Returns:
        The list of figures.
    """
    images = _check_images(blend_images)
    iso_all = np.asarray(_single_survey(isolated_images, "isolated_images"))
    if iso_all.ndim != 5:
        raise ValueError(
            f"isolated_images must be [blend, max_number, band, y, x], got shape {iso_all.shape}."
        )
    blend_list = _single_survey(blend_list, "blend_list")
    bands = _check_band_indices(band_indices, images.shape[1])
    _check_norm(norm)
    limits = _check_limits(limits)
    figures = []
    for idx in indexes:
        if not 0 <= idx < len(images):
            raise IndexError(f"index {idx} out of range for {len(images)} blends.")
        table = blend_list[idx]
        n_true = len(table)
        ids = _match_ids(matches[idx], n_true)
        deblended = deblended_images[idx]
        deblended = None if deblended is None else np.asarray(deblended)
        detections = detection_catalogs[idx] if detection_catalogs is not None else None
        blend = images[idx]
        fig, axes = plt.subplots(n_true + 1, 3, figsize=(10, 3.3 * (n_true + 1)), squeeze=False)
        lo, span = float(blend[bands].min()), float(np.ptp(blend[bands]))
        rgb = get_rgb_image(blend[bands], norm=norm, Q=Q, minimum=lo, stretch=span)
        axes[0, 0].imshow(rgb, origin="lower")
        true = _centers(table)
        axes[0, 0].plot(true[:, 0], true[:, 1], "rx", ms=8, mew=2)
        det = _centers(detections)
        axes[0, 0].plot(det[:, 0], det[:, 1], "go", fillstyle="none", ms=12, mew=2)
        axes[0, 0].set_title(f"Blend {idx}: {n_true} true, {len(det)} detected")
        total = (np.zeros_like(blend) if deblended is None or len(deblended) == 0
                 else deblended.sum(axis=0))
        axes[0, 1].imshow(get_rgb_image(total[bands], norm=norm, Q=Q, minimum=lo, stretch=span),
                          origin="lower")
        axes[0, 1].set_title("Sum of deblended")
        _residual(axes[0, 2], (blend - total)[bands].sum(axis=0), "Blend - sum of deblended")
        for j in range(n_true):
            iso = iso_all[idx, j]
            g_lo, g_span = float(iso[bands].min()), float(np.ptp(iso[bands]))
            axes[j + 1, 0].imshow(get_rgb_image(iso[bands], norm=norm, Q=Q, minimum=g_lo,
                                                stretch=g_span), origin="lower")
            axes[j + 1, 0].set_title(f"True galaxy {j}")
            k = ids[j]
            if k >= 0 and deblended is not None and k < len(deblended):
                deb = deblended[k]
                axes[j + 1, 1].imshow(get_rgb_image(deb[bands], norm=norm, Q=Q, minimum=g_lo,
                                                    stretch=g_span), origin="lower")
                axes[j + 1, 1].set_title(f"Deblended (detection {k})")
                _residual(axes[j + 1, 2], (iso - deb)[bands].sum(axis=0), "True - deblended")
            else:
                axes[j + 1, 1].set_title("Not detected")
                axes[j + 1, 2].set_title("No residual")
        for ax in axes.ravel():
            _apply_limits(ax, limits)
            ax.axis("off")
        fig.tight_layout()
        figures.append(fig)
    return figures


def _residual(ax, residual, title):
    bound = float(np.abs(residual).max()) or 1.0
    im = ax.imshow(residual, origin="lower", cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
