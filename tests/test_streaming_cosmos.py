"""Streaming COSMOS blends (parametric and real): byte-identical shards over batch sizes,
devices and processes; kill + resume; the config names the COSMOS options.

The reference runs happen in this process (their compilations are shared by the tests); the
runs that must be in another process (2 devices: XLA_FLAGS before JAX starts; a SIGKILL) share
one subprocess per galaxy type, with the same JAX configuration (x64 as here), so that files
compare byte for byte.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest
from conftest import COSMOS_DIR

from btkjax import streaming

FILES = {
    "parametric": [COSMOS_DIR / "real_galaxy_catalog_23.5_example.fits",
                   COSMOS_DIR / "real_galaxy_catalog_23.5_example_fits.fits"],
    "real": [COSMOS_DIR / "real_galaxy_catalog_26_extension_example.fits",
             COSMOS_DIR / "real_galaxy_catalog_26_extension_example_fits.fits"],
}
pytestmark = pytest.mark.skipif(
    not all(p.exists() for files in FILES.values() for p in files),
    reason=f"COSMOS example data not found in {COSMOS_DIR}",
)

# 4 blends in shards of 2, small stamps: a few compilations.
KW = dict(n_blends=4, shard_size=2, seed=3, stamp_size=8.0, max_shift=1.0, max_number=2)
NAMES = ["blends_000000.h5", "blends_000001.h5", "manifest.json"]


def _catalog(gal_type):
    from btkjax.catalog import CosmosCatalog

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no exclusion files / per-band magnitudes: fallbacks
        return CosmosCatalog.from_file([str(p) for p in FILES[gal_type]], exclusion_level="none")


def _generate(gal_type, out, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # F814W magnitudes for every LSST band
        return streaming.generate(out_dir=out, catalog=_catalog(gal_type), gal_type=gal_type,
                                  **dict(KW, **kwargs))


def _run(gal_type, body, n_devices=1, timeout=420):
    """Runs `body` in a fresh Python with ``cat`` (the catalog) and ``KW`` defined."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_ENABLE_X64="1" if jax.config.jax_enable_x64 else "0")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if n_devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    code = textwrap.dedent(f"""
        import os, signal, warnings
        warnings.simplefilter("ignore")
        from btkjax import streaming
        from btkjax.catalog import CosmosCatalog
        cat = CosmosCatalog.from_file({[str(p) for p in FILES[gal_type]]!r},
                                      exclusion_level="none")
        KW = {KW!r}
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _same_files(a, b, names=NAMES):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module", params=["parametric", "real"])
def reference(request, tmp_path_factory):
    """An uninterrupted single-device, single-process run in batches of 1."""
    gal_type = request.param
    out = tmp_path_factory.mktemp("cosmos") / gal_type
    manifest = _generate(gal_type, out, batch_size=1)
    assert manifest["complete"] and sorted(os.listdir(out)) == NAMES
    return gal_type, out


def test_manifest_names_the_cosmos_options(reference):
    gal_type, out = reference
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["generator"] == "CosmosGenerator"
    assert config["catalog"]["class"] == "CosmosCatalog" and config["catalog"]["n_rows"] == 100
    assert config["cosmos"]["gal_type"] == gal_type
    assert config["cosmos"]["real_pad_factor"] == 4.0
    if gal_type == "real":  # the HST image and PSF files the catalog names, with their sizes
        folder = FILES["real"][0].parent
        files = config["cosmos"]["image_files"]
        assert [n for n, _ in files] == ["real_galaxy_PSF_images_extension.fits",
                                         "real_galaxy_images_extension.fits"]
        assert all(size == os.path.getsize(folder / n) for n, size in files)
    else:
        assert "image_files" not in config["cosmos"]
    # the shards hold COSMOS galaxies: catalog rows and their images
    batch = next(iter(streaming.ShardReader(out, 4, keys=("blend_images", "blend_list"))))
    assert np.abs(batch["blend_images"]).max() > 0
    rows = np.concatenate([np.asarray(t["btk_index"]) for t in batch["blend_list"]])
    assert len(rows) >= 4 and "IDENT" in batch["blend_list"][0].colnames


def test_resume_with_other_cosmos_options_is_refused(reference, tmp_path):
    gal_type, out = reference
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "manifest.json").read_bytes()
    other = "real" if gal_type == "parametric" else "parametric"
    with pytest.raises(streaming.ConfigMismatchError) as err:
        streaming.generate(out_dir=copy, catalog=_catalog(gal_type), gal_type=other,
                           resume=True, **KW)
    message = str(err.value)
    assert f"cosmos.gal_type: saved '{gal_type}', requested '{other}'" in message
    assert "seed" not in message and "catalog.sha256" not in message
    # the other example catalog (other rows): its digest differs
    with pytest.raises(streaming.ConfigMismatchError, match=r"catalog\.sha256"):
        streaming.generate(out_dir=copy, catalog=_catalog(other), gal_type=gal_type,
                           resume=True, **KW)
    # a CatSim run in a COSMOS folder
    from btkjax.catalog import CatsimCatalog

    with pytest.raises(streaming.ConfigMismatchError, match=r"catalog\.class.*generator"):
        streaming.generate(out_dir=copy, catalog=CatsimCatalog.default(), resume=True, **KW)
    assert (copy / "manifest.json").read_bytes() == before  # nothing was touched
    with pytest.raises(ValueError, match="gal_type='real' is an option of COSMOS catalogs"):
        streaming.generate(out_dir=tmp_path / "x", gal_type="real", **KW)
    with pytest.raises(ValueError, match="gal_type must be 'real' or 'parametric', got 'hst'"):
        streaming.generate(out_dir=tmp_path / "x", catalog=_catalog(gal_type), gal_type="hst",
                           **KW)


def test_other_batch_and_shard_sizes_give_the_same_blends(reference, tmp_path):
    """Batches of 2: the same files; one shard of 4 in batches of 4: the same blends."""
    gal_type, out = reference
    _generate(gal_type, tmp_path / "b2", batch_size=2)
    _same_files(out, tmp_path / "b2")
    _generate(gal_type, tmp_path / "s4", batch_size=4, shard_size=4)
    keys = ("blend_images", "isolated_images", "blend_ids")
    a = next(iter(streaming.ShardReader(out, 4, keys=keys)))
    b = next(iter(streaming.ShardReader(tmp_path / "s4", 4, keys=keys)))
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key])


def test_two_devices_two_processes_and_a_kill_give_the_same_files(reference, tmp_path):
    """In one 2-device subprocess (one compilation for both runs): (1) the blends split over a
    2-device mesh (CosmosGenerator devices="all") and the shards over 2 (simulated) processes;
    (2) a run SIGKILLed once its first shard is written, then resumed here, on one device, in
    other batches. Both give the files of the single-device run, byte for byte."""
    gal_type, out = reference
    two, killed = tmp_path / "two", tmp_path / "killed"
    run = _run(gal_type, f"""
        import jax
        from btkjax.engine.devices import sharded_mesh_sizes
        for p in (1, 0):
            streaming.generate(out_dir={str(two)!r}, catalog=cat, gal_type={gal_type!r},
                               batch_size=2, devices="all", process_index=p, process_count=2,
                               **KW)
        print("devices", len(jax.devices()), "mesh", max(sharded_mesh_sizes()), flush=True)

        def die(k, path):  # SIGKILL once the first shard is written and listed
            os.kill(os.getpid(), signal.SIGKILL)
        streaming.generate(out_dir={str(killed)!r}, catalog=cat, gal_type={gal_type!r},
                           batch_size=1, devices="all", on_shard=die, **KW)
    """, n_devices=2)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert "devices 2 mesh 2" in run.stdout  # the renderer really ran over 2 devices
    streaming.merge_manifests(two)
    _same_files(out, two)

    manifest = json.loads((killed / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0] and not manifest["complete"]
    with pytest.raises(streaming.ManifestError, match="not complete"):
        streaming.ShardReader(killed, batch_size=2)
    # resumed here, in batches of 2 (neither batch size nor devices are part of the config)
    resumed = _generate(gal_type, killed, batch_size=2, resume=True)
    assert resumed["complete"]
    assert sorted(os.listdir(killed)) == NAMES
    _same_files(out, killed)


def test_command_line_streams_cosmos(reference, tmp_path, capsys):
    """``btkjax stream --cosmos ... --gal-type ...``: the files of the Python run."""
    from btkjax.cli import main

    gal_type, out = reference
    cli = tmp_path / "cli"
    args = ["stream", "--cosmos", *map(str, FILES[gal_type]), "--gal-type", gal_type,
            "--cosmos-exclusion", "none", "--n-blends", "4", "--shard-size", "2",
            "--batch-size", "2", "--seed", "3", "--stamp-size", "8", "--max-shift", "1.0",
            "--max-number", "2", "--no-progress", "--out", str(cli)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    assert "4 blends in 2 shard(s) of up to 2" in capsys.readouterr().out
    _same_files(out, cli)
    # --gal-type without --cosmos, --cosmos with --catalog: exit 2, one line naming the option
    assert main(["stream", "--n-blends", "4", "--out", str(tmp_path / "x"), "--gal-type",
                 "real"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["btkjax stream: error: --gal-type real needs --cosmos (CatSim galaxies have "
                   "no galaxy type)."]
    assert main(["stream", "--n-blends", "4", "--out", str(tmp_path / "x"), "--cosmos",
                 str(FILES[gal_type][0]), "--catalog", str(FILES[gal_type][0])]) == 2
    assert "--cosmos and --catalog exclude each other" in capsys.readouterr().err
