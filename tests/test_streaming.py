"""Streaming to HDF5 shards: sharding over devices, processes, kill + resume, the reader.

The runs that produce shards happen in subprocesses: the 2-device one needs XLA_FLAGS set before
JAX starts, and every run must see the same JAX configuration (this test session enables x64,
which changes the sampler's draws), so that their files can be compared byte for byte.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from btkjax import streaming, utils

# A small run: 10 blends in shards of 4 (the last holds 2), small stamps to compile fast.
N, SHARD, SEED = 10, 4, 3
KW = dict(n_blends=N, shard_size=SHARD, seed=SEED, stamp_size=8.0, max_shift=1.0)
CLI_ARGS = ["--n-blends", str(N), "--shard-size", str(SHARD), "--seed", str(SEED),
            "--stamp-size", "8", "--max-shift", "1.0", "--no-progress"]
FILES = ["blends_000000.h5", "blends_000001.h5", "blends_000002.h5", "manifest.json"]


def _env(n_devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("JAX_ENABLE_X64", None)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if n_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _cli(args, n_devices=1, timeout=300):
    return subprocess.run([sys.executable, "-m", "btkjax.cli", "stream"] + args,
                          capture_output=True, text=True, timeout=timeout, env=_env(n_devices))


def _script(body: str, n_devices=1, timeout=300):
    code = f"from btkjax import streaming\nKW = {KW!r}\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=_env(n_devices))


def _same_files(a, b, names=FILES):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-device run through the command line (batches of 2)."""
    out = tmp_path_factory.mktemp("stream") / "reference"
    run = _cli(CLI_ARGS + ["--out", str(out), "--batch-size", "2"])
    assert run.returncode == 0, run.stderr
    assert "10 blends in 3 shard(s) of up to 4" in run.stdout and "complete: True" in run.stdout
    assert sorted(os.listdir(out)) == FILES
    return out


def test_manifest_describes_the_shards(reference):
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_shards"] == 3
    assert [(s["first_blend"], s["stop_blend"]) for s in manifest["shards"]] == [
        (0, 4), (4, 8), (8, 10)]
    for s in manifest["shards"]:
        data = (reference / s["file"]).read_bytes()
        assert len(data) == s["bytes"]
        assert streaming._sha256(str(reference / s["file"])) == s["sha256"]
    assert manifest["config"]["seed"] == SEED and manifest["config"]["n_blends"] == N
    assert "batch_size" not in manifest["config"]  # blends do not depend on it
    assert manifest["versions"]["jax"] and manifest["versions"]["h5py"]
    # shards are save_blend_batch files: the utils loader reads them
    last = utils.load_blend_results(reference, batch_index=2)
    assert last["blend_images"].shape == (2, 6, 40, 40)
    assert last["isolated_images"].shape == (2, 3, 6, 40, 40)
    assert len(last["blend_list"]) == 2 and all(1 <= len(t) <= 3 for t in last["blend_list"])
    assert np.abs(last["blend_images"]).max() > 0


def test_two_devices_and_two_processes_give_the_same_files(reference, tmp_path):
    """The blend axis split over a 2-device mesh, and the shards split over 2 (simulated)
    processes, each with its own manifest: the files are those of the 1-device run."""
    out = tmp_path / "two"
    run = _script(f"""
        import jax
        from btkjax.engine.devices import sharded_mesh_sizes
        for p in (1, 0):  # two "processes" of one run, one after the other
            streaming.generate(out_dir={str(out)!r}, batch_size=4, devices="all",
                               process_index=p, process_count=2, **KW)
        print("devices", len(jax.devices()), "mesh", max(sharded_mesh_sizes()))
    """, n_devices=2)
    assert run.returncode == 0, run.stderr
    assert "devices 2 mesh 2" in run.stdout  # the renderer really ran over a 2-device mesh
    per = {p: json.loads((out / f"manifest-0000{p}-of-00002.json").read_text()) for p in (0, 1)}
    assert [s["index"] for s in per[0]["shards"]] == [0, 2]
    assert [s["index"] for s in per[1]["shards"]] == [1]
    assert per[0]["complete"] and per[1]["complete"]
    # the reader merges per-process manifests on the fly
    ids = np.concatenate([b["blend_ids"] for b in streaming.ShardReader(out, 3)])
    np.testing.assert_array_equal(ids, np.arange(N))
    streaming.merge_manifests(out)
    # bit for bit: every shard file and the (merged) manifest
    _same_files(reference, out)
    a = utils.load_blend_results(reference, batch_index=1)
    b = utils.load_blend_results(out, batch_index=1)
    np.testing.assert_array_equal(a["blend_images"], b["blend_images"])
    np.testing.assert_array_equal(a["isolated_images"], b["isolated_images"])
    assert np.abs(a["isolated_images"]).max() > 0
    for ta, tb in zip(a["blend_list"], b["blend_list"], strict=True):
        assert ta.colnames == tb.colnames and np.all(ta == tb)


def test_killed_run_resumes_to_the_same_files(reference, tmp_path):
    out = tmp_path / "killed"
    code = f"from btkjax import streaming\nimport time\nKW = {KW!r}\n" + textwrap.dedent(f"""
        def slow(k, path):
            time.sleep(30)  # the test kills the run here, after the first shard
        streaming.generate(out_dir={str(out)!r}, batch_size=2, on_shard=slow, **KW)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    manifest_path = out / "manifest.json"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if manifest_path.exists() and json.loads(manifest_path.read_text())["shards"]:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    killed = json.loads(manifest_path.read_text())
    assert [s["index"] for s in killed["shards"]] == [0] and not killed["complete"]
    with pytest.raises(streaming.ManifestError, match="not complete"):
        streaming.ShardReader(out, batch_size=2)
    assert len(list(streaming.ShardReader(out, 2, allow_incomplete=True))) == 2
    # A leftover temporary file and a damaged listed shard: resume cleans and redraws.
    (out / ".blends_000001.h5.deadbeef.tmp").write_bytes(b"partial")
    damaged = bytearray((out / "blends_000000.h5").read_bytes())
    damaged[-100] ^= 0xFF
    (out / "blends_000000.h5").write_bytes(bytes(damaged))
    # Resumed with another batch size (not part of the config), the run completes.
    run = _cli(CLI_ARGS + ["--out", str(out), "--batch-size", "4", "--resume"])
    assert run.returncode == 0, run.stderr
    assert "shard 0 is drawn again" in run.stderr
    assert sorted(os.listdir(out)) == FILES  # no temporary file left
    _same_files(reference, out)


def test_shards_of_process_partition():
    for n_shards, count in ((10, 3), (2, 4), (7, 1)):
        slices = [list(streaming.shards_of_process(n_shards, p, count)) for p in range(count)]
        merged = sorted(k for s in slices for k in s)
        assert merged == list(range(n_shards))
        assert all(k % count == p for p, s in enumerate(slices) for k in s)
    with pytest.raises(ValueError, match="process_index"):
        streaming.shards_of_process(4, 2, 2)


def test_resume_with_another_config_is_refused(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = (out / "manifest.json").read_bytes()
    kw = dict(KW, seed=4, add_noise="none")
    with pytest.raises(streaming.ConfigMismatchError) as err:
        streaming.generate(out_dir=out, resume=True, **kw)
    message = str(err.value)
    assert "differing key(s): add_noise, " in message
    for key in ("seed", "sampling_function.params.seed", "add_noise: saved 'all', requested "
                "'none'"):
        assert key in message
    assert "n_blends" not in message and "shard_size" not in message
    assert (out / "manifest.json").read_bytes() == before  # nothing was touched
    with pytest.raises(FileExistsError, match=r"pass resume=True \(--resume\)"):
        streaming.generate(out_dir=out, **KW)
    refused = _cli(CLI_ARGS + ["--out", str(out), "--seed", "5", "--resume"], timeout=120)
    assert refused.returncode == 2
    assert "btkjax stream: error: cannot resume" in refused.stderr and "seed" in refused.stderr


def test_reader_order_batches_and_values(reference):
    reader = streaming.ShardReader(reference, batch_size=4,
                                   keys=("blend_images", "blend_ids", "blend_list"))
    assert len(reader) == 3
    batches = list(reader)
    assert [len(b["blend_ids"]) for b in batches] == [4, 4, 2]
    ids = np.concatenate([b["blend_ids"] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(N))
    images = np.concatenate([b["blend_images"] for b in batches])
    saved = np.concatenate([utils.load_blend_results(reference, batch_index=k)["blend_images"]
                            for k in range(3)])
    np.testing.assert_array_equal(images, saved)
    tables = [t for b in batches for t in b["blend_list"]]
    saved_tables = utils.load_blend_results(reference, batch_index=2)["blend_list"]
    assert np.all(tables[9] == saved_tables[1]) and len(tables) == N
    dropped = streaming.ShardReader(reference, batch_size=4, drop_remainder=True)
    assert len(dropped) == 2 and [len(b["blend_ids"]) for b in dropped] == [4, 4]


def _order(reader):
    return np.concatenate([b["blend_ids"] for b in reader])


def test_reader_shuffles_reproducibly(reference):
    a = _order(streaming.ShardReader(reference, 3, shuffle=True, seed=0, keys="blend_ids"))
    b = _order(streaming.ShardReader(reference, 3, shuffle=True, seed=0, keys="blend_ids"))
    c = _order(streaming.ShardReader(reference, 3, shuffle=True, seed=1, keys="blend_ids"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(N))
    for order in (a, c):
        np.testing.assert_array_equal(np.sort(order), np.arange(N))  # each blend once
    # the next epoch has another order; set_epoch replays one
    reader = streaming.ShardReader(reference, 3, shuffle=True, seed=0, keys="blend_ids")
    first, second = _order(reader), _order(reader)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(second), np.arange(N))
    reader.set_epoch(0)
    np.testing.assert_array_equal(_order(reader), first)
    # a window of one shard still yields every blend once, with full batches but the last
    small = streaming.ShardReader(reference, 3, shuffle=True, seed=5, buffer_shards=1,
                                  keys=("blend_ids", "blend_images"))
    batches = list(small)
    assert [len(b["blend_ids"]) for b in batches] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate([b["blend_ids"] for b in batches])),
                                  np.arange(N))
    # images travel with their ids
    saved = np.concatenate([utils.load_blend_results(reference, batch_index=k)["blend_images"]
                            for k in range(3)])
    for b in batches:
        np.testing.assert_array_equal(b["blend_images"], saved[b["blend_ids"]])


def test_reader_as_jax_and_bad_keys(reference):
    import jax

    batch = next(iter(streaming.ShardReader(reference, 4, as_jax=True,
                                            keys=("isolated_images",))))
    assert isinstance(batch["isolated_images"], jax.Array)
    assert batch["isolated_images"].shape == (4, 3, 6, 40, 40)
    with pytest.raises(ValueError, match="keys must be a non-empty subset"):
        streaming.ShardReader(reference, 4, keys=("psf",))


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_processes_with_jax_distributed(reference, tmp_path):
    """Two processes joined by ``jax.distributed`` (CPU, coordinator on 127.0.0.1), started as
    SLURM would start them (one task each: SLURM_PROCID, SLURM_NTASKS, ...) and running the
    command line with ``--distributed``, whose ``jax.distributed.initialize()`` takes its
    settings from those variables. Each writes its shards and manifest; process 0 merges the
    manifests after the coordinator's barrier. The files are the one-process run's, byte for
    byte."""
    out = tmp_path / "distributed"
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for p in range(2):
        env = {k: v for k, v in _env().items()  # gRPC would send 127.0.0.1 through a proxy
               if "_proxy" not in k.lower()}
        env.update(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                   SLURM_PROCID=str(p), SLURM_LOCALID=str(p), SLURM_STEP_NUM_NODES="1",
                   JAX_COORDINATOR_ADDRESS=address,  # instead of the node name SLURM gives
                   JAX_COORDINATOR_BIND_ADDRESS=address)  # listen on 127.0.0.1 only
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "btkjax.cli", "stream", "--distributed", "--out", str(out),
             "--batch-size", "4"] + CLI_ARGS,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            results.append(proc.communicate(timeout=420))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
    assert "(process 0 of 2)" in results[0][0] and "(process 1 of 2)" in results[1][0]
    per = {p: json.loads((out / f"manifest-0000{p}-of-00002.json").read_text()) for p in (0, 1)}
    assert [s["index"] for s in per[0]["shards"]] == [0, 2]
    assert [s["index"] for s in per[1]["shards"]] == [1]
    names = sorted(os.listdir(out))
    assert names == sorted(FILES + [f"manifest-0000{p}-of-00002.json" for p in (0, 1)])
    _same_files(reference, out)  # the shards, and manifest.json merged by process 0
