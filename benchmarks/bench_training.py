"""Training in the loop against training from streamed shards (notebook 05's job).

The job: the embedded default catalog, DefaultSampling (up to 3 galaxies, shifts up to 2"),
LSST (6 bands), 12" stamps (60 x 60 pixels), noise "all", float32, batches of ``--batch``
blends, notebook 05's detection network (five convolutions, 16 channels, heatmap target, MSE
loss from `btkjax.jax_metrics`, Adam).

Measured, each after its compilation (compile time reported apart):

- ``in_loop``: the jitted training step that simulates a fresh batch with the simulation step
  (`btkjax.simulation.make_step`, FFT box 128) and trains on it: steps/s and blends/s.
- ``simulate_only``: the same simulation step alone (images and truth), blends/s.
- ``train_only``: the training step on one batch already on the device (no simulation).
- ``shards_*``: the same number of blends written first with `btkjax.streaming.generate` (same
  catalog, sampling, survey, stamp, noise; shards of 4 batches, ``--compression``; generation
  time reported apart), then read back with `ShardReader` in batches of ``--batch`` and moved
  to the device (``jax.device_put`` + ``block_until_ready``): images only
  (``shards_read_images``), images and the truth tables needed to build the target
  (``shards_read_images_truth``: ``blend_list``, turned into padded x, y, mask arrays), and
  reading + the same training step fed from the shards (``shards_read_train``).

Timings are single passes (``--steps`` steps) on whatever machine runs this: on a shared
machine they vary run to run (the JSON records the load average before and after). Writes
``benchmarks/results/training_<backend>.json`` atomically.

    python benchmarks/bench_training.py                 # 50 steps of 16 blends
    python benchmarks/bench_training.py --steps 10      # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import machine, table, write_json  # noqa: E402

STAMP_SIZE = 12.0
MAX_NUMBER = 3
MAX_SHIFT = 2.0
FFT_SIZE = 128
TARGET_SIGMA = 2.0
CHANNELS = 16


def layers(n_bands):
    """(in, out, kernel, dilation) of notebook 05's network."""
    c = CHANNELS
    return [(n_bands, c, 3, 1), (c, c, 3, 1), (c, c, 3, 2), (c, c, 3, 4), (c, 1, 1, 1)]


def init_params(key, n_bands):
    params = []
    spec = layers(n_bands)
    for k, (c_in, c_out, size, _) in zip(jax.random.split(key, len(spec)), spec, strict=True):
        w = jax.random.normal(k, (c_out, c_in, size, size)) * np.sqrt(2.0 / (c_in * size * size))
        params.append({"w": w, "b": jnp.zeros(c_out, jnp.float32)})
    params[-1]["b"] = jnp.full(1, -4.0, jnp.float32)  # not weakly typed: one compilation
    return params


def network(params, x):
    dilations = [d for *_, d in layers(x.shape[1])]
    for i, (p, d) in enumerate(zip(params, dilations, strict=True)):
        x = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", rhs_dilation=(d, d),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        x = x + p["b"][None, :, None, None]
        x = jax.nn.relu(x) if i < len(params) - 1 else jax.nn.sigmoid(x)
    return x[:, 0]


def normalize(images, sky):
    return jnp.arcsinh(images / jnp.sqrt(sky)[..., None, None] / 3.0)


def heatmap(x, y, mask, size):
    yy, xx = jnp.mgrid[:size, :size].astype(jnp.float32)
    d2 = (xx - x[..., None, None]) ** 2 + (yy - y[..., None, None]) ** 2
    return (jnp.exp(-d2 / (2 * TARGET_SIGMA**2)) * mask[..., None, None]).max(axis=1)


def make_loss():
    from btkjax import jax_metrics

    def loss_fn(params, x, target):
        pred = network(params, x)
        return 100 * jnp.mean(jax_metrics.mse(target[:, None], pred[:, None]))

    return loss_fn


def _timed_loop(fn, n):
    """(seconds of the first call, steady seconds of the next n - 1 calls); fn(i) -> pytree."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(0))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = [fn(i) for i in range(1, n)]
    jax.block_until_ready(outs)
    return first, time.perf_counter() - t0


def truth_arrays(blend_list, max_number):
    """Padded (x, y, mask) [blend, slot] from BTK blend tables (x_peak, y_peak)."""
    n = len(blend_list)
    x = np.zeros((n, max_number), np.float32)
    y = np.zeros((n, max_number), np.float32)
    mask = np.zeros((n, max_number), bool)
    for b, t in enumerate(blend_list):
        k = len(t)
        x[b, :k], y[b, :k], mask[b, :k] = t["x_peak"], t["y_peak"], True
    return x, y, mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compression", default="gzip", choices=("gzip", "lzf", "none"))
    parser.add_argument("--results", default=None)
    args = parser.parse_args(argv)
    if args.steps < 2 or args.batch < 1:
        raise SystemExit(f"--steps must be >= 2 and --batch >= 1, got {args.steps}, {args.batch}.")

    import btkjax as btk
    from btkjax import streaming
    from btkjax.simulation import make_step

    load_before = os.getloadavg()
    B, n_steps = args.batch, args.steps
    n_blends = B * n_steps
    catalog = btk.catalog.CatsimCatalog.default()
    sampling = btk.sampling_functions.DefaultSampling(max_number=MAX_NUMBER, stamp_size=STAMP_SIZE,
                                                      max_shift=MAX_SHIFT, seed=0)
    survey = btk.survey.get_surveys("LSST")
    step = make_step(catalog, survey, sampling, noise="all", isolated=False, fft_size=FFT_SIZE)
    keys = step.keys(0)
    size = step.spec.render.stamp_pixels
    n_bands = len(step.bands)
    loss_fn = make_loss()
    optimizer = optax.adam(3e-3)
    params0 = init_params(jax.random.key(1), n_bands)
    sky0 = step.arrays.sky

    def update(params, opt_state, x, target):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def train_in_loop(params, opt_state, i):
        out = step(keys, i * B + jnp.arange(B))
        t = out.truth
        return update(params, opt_state, normalize(out.images, out.conditions.sky),
                      heatmap(t.x, t.y, t.mask, size))

    @jax.jit
    def train_on(params, opt_state, images, x, y, mask):
        return update(params, opt_state, normalize(images, sky0), heatmap(x, y, mask, size))

    @jax.jit
    def simulate(i):
        out = step(keys, i * B + jnp.arange(B))
        return out.images, out.truth.x, out.truth.y, out.truth.mask

    rows = []

    def record(name, first, steady, what):
        per_s = (n_steps - 1) / steady
        rows.append({"path": name, "what": what, "first_call_s": first,
                     "steps_per_s": per_s, "blends_per_s": per_s * B})
        print(f"{name}: first call {first:.1f} s, {per_s:.2f} steps/s, {per_s * B:.1f} blends/s",
              flush=True)

    # 1. in the loop: simulate + train, one compiled program
    state = {"p": params0, "o": optimizer.init(params0)}

    def in_loop(i):
        state["p"], state["o"], loss = train_in_loop(state["p"], state["o"], i)
        return loss

    record("in_loop", *_timed_loop(in_loop, n_steps),
           "simulate a fresh batch + forward + backward + Adam, one jit")
    # 2. the simulation alone
    record("simulate_only", *_timed_loop(simulate, n_steps), "the simulation step alone")
    # 3. training alone on one device batch
    batch = jax.block_until_ready(simulate(0))
    state = {"p": params0, "o": optimizer.init(params0)}

    def train_only(i):
        state["p"], state["o"], loss = train_on(state["p"], state["o"], *batch)
        return loss

    record("train_only", *_timed_loop(train_only, n_steps), "forward + backward + Adam on a device batch")

    # 4. the same number of blends from shards
    out_dir = tempfile.mkdtemp(prefix="btkjax_bench_training_")
    try:
        shard_dir = os.path.join(out_dir, "shards")
        t0 = time.perf_counter()
        streaming.generate(n_blends, shard_dir, catalog=catalog, sampling_function=sampling,
                           surveys=survey, shard_size=4 * B, batch_size=B, seed=0,
                           add_noise="all", stamp_size=STAMP_SIZE, max_number=MAX_NUMBER,
                           isolated=False,
                           compression=None if args.compression == "none" else args.compression)
        generate_s = time.perf_counter() - t0
        disk = sum(os.path.getsize(os.path.join(shard_dir, f)) for f in os.listdir(shard_dir))
        print(f"streaming.generate: {n_blends} blends in {generate_s:.1f} s "
              f"({n_blends / generate_s:.1f} blends/s, compilation included), {disk / 2**20:.1f} MiB",
              flush=True)

        def read(keys_, train):
            reader = streaming.ShardReader(shard_dir, batch_size=B, keys=keys_)
            st = {"p": params0, "o": optimizer.init(params0)}
            it = iter(reader)

            def one(i):
                b = next(it)
                images = jax.device_put(b["blend_images"])
                if "blend_list" not in b:
                    return images
                x, y, mask = (jax.device_put(a) for a in truth_arrays(b["blend_list"], MAX_NUMBER))
                if not train:
                    return images, x, y, mask
                st["p"], st["o"], loss = train_on(st["p"], st["o"], images, x, y, mask)
                return loss

            return _timed_loop(one, n_steps)

        record("shards_read_images", *read(("blend_images",), False),
               "ShardReader images + device_put")
        record("shards_read_images_truth", *read(("blend_images", "blend_list"), False),
               "ShardReader images + blend_list -> truth arrays + device_put")
        record("shards_read_train", *read(("blend_images", "blend_list"), True),
               "ShardReader images + truth + device_put + the training step")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)

    mach = machine()
    result = {
        "benchmark": "training",
        "job": {"catalog": "CatsimCatalog.default()", "survey": "LSST", "bands": list(step.bands),
                "stamp_pixels": size, "fft_size": FFT_SIZE, "max_number": MAX_NUMBER,
                "max_shift_arcsec": MAX_SHIFT, "noise": "all", "dtype": "float32",
                "network": f"5 convolutions, {CHANNELS} channels, heatmap MSE, Adam 3e-3"},
        "steps": n_steps, "batch": B, "blends": n_blends, "compression": args.compression,
        "generate_s": generate_s, "generate_blends_per_s": n_blends / generate_s,
        "shard_bytes": disk,
        "rows": rows,
        "in_loop_vs_shards_read_train": rows[0]["steps_per_s"] / rows[-1]["steps_per_s"],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "machine": mach,
    }
    path = args.results or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        f"training_{mach['backend']}.json")
    write_json(path, result)
    print(table(rows, ["path", "steps_per_s", "blends_per_s", "first_call_s", "what"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
