"""The ``btkjax`` command line.

``btkjax demo``: the main job on the embedded default catalog: generate a batch of LSST blends
on the JAX path, write a picture of the first ones, print a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]


def _rgb(images, bands=(3, 2, 1), q=8.0, stretch=None):
    """An asinh-stretched RGB of [band, y, x] images (Lupton et al. 2004 style)."""
    import numpy as np

    rgb = np.stack([images[b] for b in bands], axis=-1).astype(float)
    if stretch is None:
        stretch = max(np.percentile(rgb, 99.5), 1e-12)
    intensity = rgb.mean(axis=-1, keepdims=True)
    scale = np.arcsinh(q * np.clip(intensity, 0, None) / stretch) / q
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(intensity > 0, rgb * scale / intensity, 0.0)
    return np.clip(out / max(out.max(), 1e-12), 0, 1)


def _demo(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import btkjax as btk
    from btkjax.catalog import CatsimCatalog
    from btkjax.draw_blends import CatsimGenerator
    from btkjax.sampling_functions import DefaultSampling
    from btkjax.survey import get_surveys

    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    catalog = CatsimCatalog.default()
    sampler = DefaultSampling(max_number=args.max_number, stamp_size=args.stamp_size,
                              max_shift=args.max_shift, seed=args.seed)
    survey = get_surveys(args.survey)
    generator = CatsimGenerator(catalog, sampler, survey, batch_size=args.batch_size,
                                stamp_size=args.stamp_size, add_noise=args.noise, seed=args.seed)
    t1 = time.perf_counter()
    batch = next(generator)
    t2 = time.perf_counter()
    batch = next(generator)
    t3 = time.perf_counter()

    images = batch["blend_images"]
    n_show = min(4, len(images))
    fig, axes = plt.subplots(1, n_show, figsize=(3 * n_show, 3.2))
    axes = np.atleast_1d(axes)
    bands = survey.available_filters
    rgb_bands = tuple(bands.index(b) for b in ("i", "r", "g")) if set("irg") <= set(bands) else (0,) * 3
    for ax, img, table in zip(axes, images[:n_show], batch["blend_list"][:n_show]):
        ax.imshow(_rgb(img, rgb_bands), origin="lower")
        ax.scatter(table["x_peak"], table["y_peak"], marker="x", color="red", s=20)
        ax.set_title(f"{len(table)} galaxies")
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(args.out, "blends.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

    n_gal = np.array([len(t) for t in batch["blend_list"]])
    print(f"btkjax {btk.__version__}: {args.batch_size} {survey.name} blends "
          f"({len(bands)} bands, {images.shape[-1]} x {images.shape[-2]} pixels, "
          f"noise={args.noise!r}) from the embedded default catalog ({len(catalog)} galaxies)")
    print(f"  galaxies per blend: mean {n_gal.mean():.2f}, min {n_gal.min()}, max {n_gal.max()}")
    print(f"  set-up {t1 - t0:.2f} s; first batch (with compilation) {t2 - t1:.2f} s; "
          f"next batch {t3 - t2:.2f} s ({args.batch_size / (t3 - t2):.1f} blends/s)")
    print(f"  picture: {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="btkjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate blends on the default catalog, plot, summarize")
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--max-number", type=int, default=3)
    demo.add_argument("--stamp-size", type=float, default=24.0, help="arcsec")
    demo.add_argument("--max-shift", type=float, default=3.0, help="arcsec")
    demo.add_argument("--survey", default="LSST")
    demo.add_argument("--noise", default="all", choices=("all", "background", "galaxy", "none"))
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
