"""Writes the benchmark tables of README.md from benchmarks/results/*.json.

    python benchmarks/report.py    # rewrites the part of README.md between the bench markers
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _common import table  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "..", "README.md")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(name):
    path = os.path.join(HERE, "results", name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def section() -> str:
    out = []
    render = _load("render_cpu.json")
    if render:
        m = render["machine"]
        out.append(f"Renderer against the GalSim backend on the same blends "
                   f"(`benchmarks/bench_render.py`; {m['cpu_count']} CPU cores, {m['devices']}, "
                   f"jax {m['jax']}, float32, JAX batch {render['rows'][0]['jax_batch']}, "
                   f"noise \"all\", LSST 6 bands, 24\" stamps, embedded default catalog; "
                   f"measured {render.get('when', '')}):\n")
        out.append(table(render["rows"], ["max_number", "isolated", "mean_galaxies",
                                          "jax_blends_per_s", "jax_compile_s",
                                          "galsim_blends_per_s", "speedup", "jax_cpu_ms_per_blend",
                                          "galsim_cpu_ms_per_blend", "cpu_speedup"]))
        out.append("")
    gen = _load("generator_cpu.json")
    if gen:
        out.append(f"The generator end to end against the bare renderer and BTK 1.0.9 on the same "
                   f"job (`benchmarks/bench_generator.py`; max 3 galaxies, isolated images, noise "
                   f"\"all\", batch {gen['batch_size']}; generator / renderer = "
                   f"{gen['generator_over_renderer']:.2f}):\n")
        out.append(table(gen["rows"], ["path", "blends_per_s", "first_batch_s", "vs_btk"]))
        out.append("")
    cosmos = _load("cosmos.json")
    if cosmos:
        out.append("COSMOS galaxies (`benchmarks/bench_cosmos.py`, LSST):\n")
        out.append(table(cosmos["rows"], ["gal_type", "backend", "dtype", "batch_size",
                                          "blends_per_s", "compile_s", "speedup_vs_galsim"]))
        out.append("")
    stream = _load("stream.json")
    if stream:
        row = {k: stream[k] for k in ("n_blends", "shard_size", "blends_per_s",
                                      "blends_per_s_after_first_shard", "cpu_count")}
        row["peak_rss_GiB"] = stream["peak_rss_bytes"] / 2**30
        row["memory_ok"] = stream["memory_ok"]
        out.append("Streaming to HDF5 shards (`benchmarks/bench_stream.py`; LSST, isolated "
                   "images, gzip):\n")
        out.append(table([row], list(row)))
        out.append("")
    # The deblender comparison (benchmarks/bench_deblend.py) has its own README section.
    return "\n".join(out)


def main():
    with open(README) as f:
        text = f.read()
    if START not in text:
        raise SystemExit(f"README.md has no {START} marker")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + section() + "\n" + END + tail
    tmp = README + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, README)


if __name__ == "__main__":
    main()
