"""Streaming benchmark: N LSST blends to HDF5 shards, blends/s and peak resident memory.

Default catalog, DefaultSampling with at most 3 galaxies, noise "all", isolated images,
shards of 128 blends (batches of 32). Reports the peak resident memory (``ru_maxrss`` and
``VmHWM``), checks it stays below 2 GB, the resident memory after every shard (it must not grow
with N), throughput (all in, and after the first shard, which pays the compilations), the CPU
count and devices, then reads the data set back once with `ShardReader`. Writes
``benchmarks/results/stream.json`` atomically. The shards go to a temporary folder removed at
the end (``--keep`` keeps them; 20,000 blends take about 14 GB with gzip).

    python benchmarks/bench_stream.py                   # 20,000 blends
    python benchmarks/bench_stream.py --n-blends 2048   # a shorter run
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine, write_json  # noqa: E402

from btkjax.tolerances import STREAM_PEAK_RSS_BYTES as LIMIT_BYTES  # noqa: E402


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-blends", type=int, default=20_000)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", default=None, help="'all' or a count (default: one)")
    parser.add_argument("--compression", default="gzip", choices=("gzip", "lzf", "none"))
    parser.add_argument("--out", default=None, help="shard folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the shards")
    parser.add_argument("--no-read", action="store_true", help="skip the read-back pass")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(
        os.path.abspath(__file__)), "results", "stream.json"))
    args = parser.parse_args(argv)
    devices = args.devices
    if devices not in (None, "all"):
        devices = int(devices)

    from btkjax import streaming
    from btkjax.catalog import CatsimCatalog

    out = args.out or tempfile.mkdtemp(prefix="btkjax_bench_stream_")
    if args.out and os.path.exists(out):
        raise SystemExit(f"{out} exists: give a new folder (the benchmark does not resume).")
    t0 = time.perf_counter()
    per_shard = []

    def on_shard(k, path):
        per_shard.append({"shard": k, "t": time.perf_counter() - t0,
                          "rss_bytes": _status_bytes("VmRSS"), "file_bytes": os.path.getsize(path)})
        print(f"  shard {k}: {per_shard[-1]['t']:.1f} s, RSS "
              f"{(per_shard[-1]['rss_bytes'] or 0) / 2**20:.0f} MiB", flush=True)

    try:
        catalog = CatsimCatalog.default()
        manifest = streaming.generate(
            args.n_blends, out, catalog=catalog, surveys="LSST", shard_size=args.shard_size,
            batch_size=args.batch_size, seed=0, add_noise="all", max_number=3, isolated=True,
            compression=None if args.compression == "none" else args.compression,
            devices=devices, on_shard=on_shard,
        )
        t1 = time.perf_counter()
        assert manifest["complete"]
        n = sum(s["n_blends"] for s in manifest["shards"])
        disk = sum(s["bytes"] for s in manifest["shards"])
        read = None
        if not args.no_read:
            reader = streaming.ShardReader(out, batch_size=256, shuffle=True, seed=0,
                                           keys=("blend_images", "blend_ids"))
            t2 = time.perf_counter()
            seen = sum(len(b["blend_ids"]) for b in reader)
            read = {"blends": seen, "seconds": time.perf_counter() - t2,
                    "blends_per_s": seen / (time.perf_counter() - t2)}
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)

    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    vm_hwm = _status_bytes("VmHWM")
    peak = max(ru_maxrss, vm_hwm or 0)
    total = t1 - t0
    steady = None
    if len(per_shard) >= 2:
        first = per_shard[0]
        blends_after = n - min(args.shard_size, n)
        steady = blends_after / (per_shard[-1]["t"] - first["t"])
    rss = [s["rss_bytes"] for s in per_shard if s["rss_bytes"]]
    mach = machine()
    result = {
        "benchmark": "stream",
        "n_blends": n,
        "default_n_blends": 20_000,
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "survey": "LSST",
        "max_number": 3,
        "add_noise": "all",
        "isolated": True,
        "compression": args.compression,
        "devices_option": args.devices,
        "cpu_count": os.cpu_count(),
        "devices": mach["devices"],
        "seconds_total": total,
        "blends_per_s": n / total,
        "blends_per_s_after_first_shard": steady,
        "disk_bytes": disk,
        "disk_bytes_per_blend": disk / n,
        "peak_rss_bytes": peak,
        "ru_maxrss_bytes": ru_maxrss,
        "vm_hwm_bytes": vm_hwm,
        "rss_after_first_shard_bytes": rss[0] if rss else None,
        "rss_after_last_shard_bytes": rss[-1] if rss else None,
        "memory_limit_bytes": LIMIT_BYTES,
        "memory_ok": peak < LIMIT_BYTES,
        "read_back": read,
        "per_shard": per_shard,
        "machine": mach,
    }
    write_json(args.results, result)
    print(f"{n} LSST blends in {total:.1f} s: {n / total:.1f} blends/s "
          f"({steady or float('nan'):.1f} after the first shard), {os.cpu_count()} CPUs, "
          f"devices {mach['devices']}")
    print(f"peak RSS {peak / 2**20:.0f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB): "
          f"{'OK' if peak < LIMIT_BYTES else 'TOO HIGH'}; RSS after first/last shard "
          f"{(rss[0] if rss else 0) / 2**20:.0f} / {(rss[-1] if rss else 0) / 2**20:.0f} MiB; "
          f"{disk / n / 1e3:.0f} kB per blend on disk")
    if read:
        print(f"read back: {read['blends']} blends in {read['seconds']:.1f} s "
              f"({read['blends_per_s']:.0f} blends/s, shuffled, blend_images only)")
    print(f"wrote {args.results}")
    return 0 if peak < LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
