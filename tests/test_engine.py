"""The execution engine (padded chunks, host threads, devices, sharded cache), the lazy
blend_list, and the generator's two pipelines."""

import os
import pickle
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import CATSIM_SAMPLE

from btkjax import tolerances as tol
from btkjax.draw_blends import CatsimGenerator
from btkjax.engine import HostThreads, local_devices, map_chunks, padded_take, pieces, plan
from btkjax.engine import devices as engine_devices
from btkjax.lazy_tables import LazyBlendList
from btkjax.sampling_functions import DefaultSampling
from btkjax.survey import get_surveys


@jax.jit
def _affine(x, y, scale, offset=0.0):
    return x * scale + y[:, None] + offset, y * 2


def test_pieces_and_padding_rule():
    assert pieces(5, 4, 2) == [4, 4] and pieces(5, 3, 2) == [2, 2, 2] and pieces(1, 1) == [1]
    tasks = plan(5, 2)
    assert [(t.start, t.stop, t.size) for t in tasks] == [(0, 2, 2), (2, 4, 2), (4, 5, 2)]
    np.testing.assert_array_equal(padded_take(tasks[-1]), [4, 4])


@pytest.mark.parametrize("threads", [None, 2])
def test_map_chunks_equals_one_call_and_consume_writes_in_place(threads):
    x = np.arange(21.0, dtype=np.float32).reshape(7, 3)
    y = np.arange(7.0, dtype=np.float32)
    pool = None if threads is None else HostThreads(threads)
    full = _affine(x, y, 3.0, offset=1.0)
    got = map_chunks(_affine, 7, 3, (x, y), (3.0,), (("offset", 1.0),), threads=pool)
    for a, b in zip(got, full, strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))
    out = np.zeros((7, 3), np.float32)
    seen = []

    def write(task, res):
        out[task.start:task.stop] = res[0]

    assert map_chunks(_affine, 7, 3, (x, y), (3.0,), (("offset", 1.0),), threads=pool,
                      consume=write, on_progress=seen.append) is None
    np.testing.assert_array_equal(out, np.asarray(full[0]))
    assert sorted(seen) == [1, 3, 3]
    if pool is not None:
        pool.close()
        assert not pool.running


def test_sharded_map_matches_single_device_and_cache_is_bounded(monkeypatch):
    mesh = engine_devices.blend_mesh(local_devices(1))
    x = np.arange(12.0).reshape(4, 3)
    y = np.arange(4.0)
    got = map_chunks(_affine, 4, 3, (x, y), (2.0,), (("offset", 0.5),), mesh=mesh)
    np.testing.assert_array_equal(got[0], np.asarray(_affine(x, y, 2.0, offset=0.5)[0]))
    monkeypatch.setattr(engine_devices, "SHARDED_CACHE_SIZE", 2)
    for off in (1.0, 2.0, 3.0):
        engine_devices.sharded(_affine, mesh, 2, 1, (("offset", off),))
    assert engine_devices.sharded_cache_size() <= 2


def test_local_devices_rejects_bad_values():
    with pytest.raises(ValueError, match="local device"):
        local_devices(len(jax.local_devices()) + 1)
    with pytest.raises(ValueError, match="'all'"):
        local_devices("some")
    with pytest.raises(TypeError, match="jax.Device"):
        local_devices(["cpu"])


def _gen(catalog, pipeline, batch_size=4, chunk=2, noise="none", stamp=12.0, devices=None):
    sf = DefaultSampling(max_number=3, stamp_size=stamp, max_shift=2.0, seed=3)
    return CatsimGenerator(catalog, sf, get_surveys("LSST"), batch_size=batch_size,
                           stamp_size=stamp, seed=8, add_noise=noise, isolated=True,
                           chunk=chunk, pipeline=pipeline, devices=devices)


def test_lazy_blend_list_is_the_eager_list(catsim_sample):
    gen = _gen(catsim_sample, "boxes")
    batch = next(gen)
    lazy = batch["blend_list"]
    assert isinstance(lazy, list) and isinstance(lazy, LazyBlendList)
    assert len(lazy) == 4 and lazy.state == "unbuilt"  # length without building a table
    second = lazy[1]  # one item, from the batch's vectorized table
    assert lazy.state == "partial"
    eager = list(lazy)
    assert lazy.state == "built" and len(eager) == 4
    assert second.colnames == eager[1].colnames and np.all(second == eager[1])
    mask = sum(len(t) for t in eager)
    assert mask == sum(len(lazy[i]) for i in range(4))
    back = pickle.loads(pickle.dumps(batch["blend_list"]))
    assert type(back) is list and all(np.all(a == b) for a, b in zip(back, eager, strict=True))


def test_step_pipeline_draws_the_boxes_pipelines_blends(catsim_sample):
    boxes = next(_gen(catsim_sample, "boxes"))
    step = next(_gen(catsim_sample, "step"))
    for a, b in zip(boxes["blend_list"], step["blend_list"], strict=True):
        assert a.colnames == b.colnames and np.all(a == b)
    peak = np.abs(boxes["blend_images"]).max(axis=(1, 2, 3))
    err = np.abs(boxes["blend_images"] - step["blend_images"]).max(axis=(1, 2, 3)) / peak
    assert np.all(err < tol.IMAGE_RTOL_PEAK_F32), err
    err_iso = np.abs(boxes["isolated_images"] - step["isolated_images"]).max()
    assert err_iso < tol.IMAGE_RTOL_PEAK_F32 * peak.max()


def test_step_pipeline_blend_independent_of_batch_size(catsim_sample):
    whole = next(_gen(catsim_sample, "step", batch_size=4, noise="all"))
    halves = _gen(catsim_sample, "step", batch_size=2, noise="all")
    next(halves)
    second = next(halves)
    np.testing.assert_array_equal(whole["blend_images"][2:], second["blend_images"])


def test_step_pipeline_under_shard_map_is_the_single_device_run(catsim_sample):
    one = next(_gen(catsim_sample, "step", noise="all"))
    sharded = next(_gen(catsim_sample, "step", noise="all", devices=1))
    np.testing.assert_array_equal(one["blend_images"], sharded["blend_images"])
    np.testing.assert_array_equal(one["isolated_images"], sharded["isolated_images"])


def test_step_pipeline_refuses_what_it_cannot_draw(catsim_sample):
    sf = DefaultSampling(max_number=3, stamp_size=12.0, seed=3)
    with pytest.raises(ValueError, match="pipeline='step' cannot be used: backend='galsim'"):
        CatsimGenerator(catsim_sample, sf, get_surveys("LSST"), stamp_size=12.0,
                        backend="galsim", pipeline="step")
    with pytest.raises(ValueError, match="pipeline must be one of"):
        CatsimGenerator(catsim_sample, sf, get_surveys("LSST"), stamp_size=12.0,
                        pipeline="fast")


def test_step_pipeline_on_two_devices_is_the_one_device_run(tmp_path):
    """The step under shard_map over 2 (simulated CPU) devices, against 1 device: the same
    padded per-device calls, so the same bits."""
    if not CATSIM_SAMPLE.exists():
        pytest.skip(f"the CatSim sample is not at {CATSIM_SAMPLE}")
    code = textwrap.dedent(f"""
        import numpy as np
        from btkjax.catalog import CatsimCatalog
        from btkjax.generator import CatsimGenerator
        from btkjax.sampling_functions import DefaultSampling
        from btkjax.survey import get_surveys
        from btkjax.engine.devices import sharded_mesh_sizes
        out = {{}}
        for devices in (None, "all"):
            sf = DefaultSampling(max_number=2, stamp_size=6.0, max_shift=1.0, seed=3)
            gen = CatsimGenerator(CatsimCatalog.from_file({str(CATSIM_SAMPLE)!r}), sf,
                                  get_surveys("LSST"), batch_size=6, stamp_size=6.0, seed=2,
                                  chunk=2, isolated=False, pipeline="step", devices=devices)
            out[devices] = next(gen)["blend_images"]
        np.save({str(tmp_path / "one.npy")!r}, out[None])
        np.save({str(tmp_path / "two.npy")!r}, out["all"])
        print("mesh", max(sharded_mesh_sizes()))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.pop("JAX_ENABLE_X64", None)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    assert "mesh 2" in run.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy"))
