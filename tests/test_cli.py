"""The ``btkjax`` command line, end to end in subprocesses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from btkjax import utils

CLI = [sys.executable, "-m", "btkjax.cli"]


def _run(args, cwd, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(CLI + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_help(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0 and "generate" in out.stdout and "demo" in out.stdout
    out = _run(["generate", "--help"], tmp_path)
    assert out.returncode == 0
    for flag in ("--config", "--n-blends", "--catalog", "--sampler", "--surveys", "--noise",
                 "--seed", "--backend", "--batch-size", "--out", "--measure", "--metrics"):
        assert flag in out.stdout


def test_generate_measure_metrics_and_load_back(tmp_path):
    config = {"n_blends": 6, "batch_size": 8, "sampler": "default",
              "sampler_kwargs": {"max_number": 3, "max_shift": 3.0}, "surveys": "LSST",
              "noise": "all", "seed": 3, "measure": ["sep_singleband_measure"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = _run(["generate", "--config", "config.json", "--n-blends", "4", "--batch-size", "2",
                "--metrics", "--out", "results", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "4 blends in 2 batch(es) of 2" in out.stdout
    assert "detection (sep_singleband_measure): precision" in out.stdout
    results = tmp_path / "results"
    assert sorted(os.listdir(results)) == [
        "blends_000000.h5", "blends_000001.h5", "measure_000000.h5", "measure_000001.h5",
        "metrics_000000.h5", "metrics_000001.h5", "run.json"]
    run = json.loads((results / "run.json").read_text())
    assert run["config"]["seed"] == 3 and run["config"]["n_blends"] == 4 and run["n_batches"] == 2
    blends, meas, metrics = utils.load_all_results(results, ["LSST"], ["sep_singleband_measure"],
                                                   n_batch=2, batch_index=1)
    assert blends["blend_images"].shape == (2, 6, 120, 120)
    assert max(len(t) for t in blends["blend_list"]) <= 3
    assert len(meas["catalog"]["sep_singleband_measure"]) == 2
    summary = metrics["galaxy_summary"]["sep_singleband_measure"]
    assert len(summary) == sum(len(t) for t in blends["blend_list"])
    assert utils.read_attrs(utils.blend_file(results, 1))["config"]["seed"] == 3
    # batches are different blends
    first = utils.load_blend_results(results, batch_index=0)["blend_images"]
    assert not np.array_equal(first, blends["blend_images"])


@pytest.mark.parametrize("config, flags, message", [
    ({"n_blends": 4, "batchsize": 2}, [],
     r"config\.json: unknown key 'batchsize'; allowed keys are \[.*'batch_size'"),
    ({"noise": "loud"}, [], r"'noise' must be one of \['all', 'background', 'galaxy', 'none'\], "
                            r"got 'loud'"),
    ({"sampler_kwargs": {"max_nmber": 3}}, [], r"'sampler_kwargs' has key 'max_nmber'.*max_number"),
    ({}, ["--surveys", "LSST", "Rubin"], r"unknown survey 'Rubin'; allowed: \[.*'LSST'"),
    ({}, ["--measure", "nope_measure"], r"unknown measure function 'nope_measure'; allowed: \[.*"
                                        r"sep_singleband_measure"),
    ({"n_blends": 5, "batch_size": 2}, [], r"'n_blends' \(5\) must be a multiple of 'batch_size'"),
])
def test_bad_config_fails_before_any_work(tmp_path, config, flags, message):
    import re

    (tmp_path / "config.json").write_text(json.dumps(config))
    out = _run(["generate", "--config", "config.json", "--out", "results"] + flags, tmp_path,
               timeout=120)
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "results").exists()  # nothing was done


def test_yaml_config(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "config.yaml").write_text("n_blends: 4\nbackend: cuda\n")
    out = _run(["generate", "--config", "config.yaml"], tmp_path, timeout=120)
    assert out.returncode == 2 and "'backend' must be one of ['jax', 'galsim'], got 'cuda'" in out.stderr


def test_demo_still_works(tmp_path):
    out = _run(["demo", "--out", "demo_output", "--batch-size", "4"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "4 LSST blends" in out.stdout
    png = tmp_path / "demo_output" / "blends.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, files, message", [
    (["generate", "--config", "config.json", "--out", "results"],
     {"config.json": json.dumps({"sampler_kwargs": {"max_number": -1}})},
     r"^btkjax generate: error: config\.json: 'sampler_kwargs' \{'max_number': -1\} of sampler "
     r"'default' \(DefaultSampling\): max_number must be >= 1 .*got -1\.$"),
    (["generate", "--config", "config.json", "--out", "results"],
     {"config.json": json.dumps({"sampler_kwargs": {"max_shift": 50.0}})},
     r"^btkjax generate: error: config\.json: 'sampler_kwargs' .*max_shift = 50\.0 arcsec"),
    (["generate", "--catalog", "catalog.fits", "--out", "results", "--n-blends", "2"],
     {"catalog.fits": "ra dec\n1 2\n"},
     r"^btkjax generate: error: command line: 'catalog' 'catalog\.fits': Cannot read the CatSim "
     r"catalog file 'catalog\.fits' as a FITS table"),
    (["generate", "--out", "results", "--n-blends", "2"], {"results": "a file"},
     r"^btkjax generate: error: command line: 'out' 'results' is a file; expected a folder"),
    (["generate", "--batch-size", "0", "--out", "results"], {},
     r"^btkjax generate: error: command line: 'batch_size' must be a positive integer, got 0\.$"),
    (["stream", "--n-blends", "4", "--batch-size", "0", "--out", "results"], {},
     r"^btkjax stream: error: --batch-size must be a positive integer, got 0\.$"),
    (["stream", "--n-blends", "4", "--out", "results"], {"results": "a file"},
     r"^btkjax stream: error: --out 'results' is a file; expected a folder"),
    (["stream", "--n-blends", "4", "--catalog", "catalog.fits", "--out", "results"],
     {"catalog.fits": "not fits"}, r"^btkjax stream: error: --catalog 'catalog\.fits': Cannot read"),
    (["demo", "--batch-size", "0", "--out", "results"], {},
     r"^btkjax demo: error: --batch-size must be a positive integer, got 0\.$"),
    (["demo", "--out", "results"], {"results": "a file"},
     r"^btkjax demo: error: --out 'results' is a file; expected a folder"),
    (["demo", "--max-number", "0", "--out", "results"], {},
     r"^btkjax demo: error: --max-number.*max_number must be >= 1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, files, message):
    import re

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    out = _run(args, tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.search(message, lines[0]), lines[0]
    if "results" not in files:
        assert not (tmp_path / "results").exists()  # nothing was written
