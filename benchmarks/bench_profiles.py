"""Micro-benchmark of the galaxy profiles' kValue on the renderer's shapes (float32).

Evaluates each profile on G galaxies x (Ry x Cx) k-points, with one size (and Sersic index) per
galaxy broadcast against the k grid, as ``btkjax.render`` does. Prints the compile time and the
steady-state time per 1e6 k-points (best of several calls, jitted, after block_until_ready).
The one-off host table build (Sersic Mellin-Barnes tables) is timed separately.

Usage: python benchmarks/bench_profiles.py [--galaxies 300] [--ry 155] [--cx 196] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from btkjax import profiles as P


def _bench(name, fn, args, npts, repeat):
    f = jax.jit(fn)
    t0 = time.perf_counter()
    out = f(*args).block_until_ready()
    t_compile = time.perf_counter() - t0
    if out.dtype != jnp.float32:
        print(f"  warning: {name} returned {out.dtype}")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(
        f"{name:>14s}: first call (compile+run) {t_compile * 1e3:8.1f} ms | "
        f"run {best * 1e3:8.1f} ms | {best * 1e3 / npts * 1e6:7.2f} ms per 1e6 k-points"
    )
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--galaxies", type=int, default=300)
    ap.add_argument("--ry", type=int, default=155)
    ap.add_argument("--cx", type=int, default=196)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    jax.config.update("jax_enable_x64", False)

    rng = np.random.default_rng(0)
    dk = 2 * np.pi / (0.2 * 96)  # rad/arcsec: a 96-pixel FFT of 0.2 arcsec pixels
    ky = (np.arange(a.ry) - a.ry // 2) * dk
    kx = (np.arange(a.cx) - a.cx + 1) * dk
    q = rng.uniform(0.2, 1.0, (a.galaxies, 1, 1))
    ksq = (kx[None, None, :] ** 2 + ky[None, :, None] ** 2) / q  # [G, Ry, Cx], sheared-ish
    ksq = jnp.asarray(ksq, jnp.float32)
    hlr = jnp.asarray(rng.uniform(0.1, 3.0, (a.galaxies, 1, 1)), jnp.float32)
    n = jnp.asarray(rng.uniform(0.3, 6.2, (a.galaxies, 1, 1)), jnp.float32)
    npts = ksq.size
    t0 = time.perf_counter()
    P.devaucouleurs_kvalue(ksq[:1, :1, :1], hlr[:1])  # builds the host tables (cached) ...
    P.sersic_kvalue(ksq[:1, :1, :1], n[:1], hlr[:1])  # ... so that compile times exclude them
    print(f"host tables built in {(time.perf_counter() - t0) * 1e3:.0f} ms (once per process)")
    print(f"{a.galaxies} galaxies x {a.ry * a.cx} k-points = {npts / 1e6:.2f}e6 points, float32")

    _bench("jnp.exp", lambda k, h: jnp.exp(-k * h), (ksq, hlr), npts, a.repeat)
    _bench("exponential", P.exponential_kvalue, (ksq, hlr), npts, a.repeat)
    _bench("gaussian", P.gaussian_kvalue, (ksq, hlr), npts, a.repeat)
    _bench("devaucouleurs", P.devaucouleurs_kvalue, (ksq, hlr), npts, a.repeat)
    _bench("sersic", P.sersic_kvalue, (ksq, n, hlr), npts, a.repeat)


if __name__ == "__main__":
    main()
