"""Saving and loading results: exact round trips, atomic writes, clear errors on bad files."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from astropy.table import Table

import btkjax as btk
from btkjax import utils
from btkjax.lazy_tables import LazyBlendList
from btkjax.tolerances import PSF_RELOAD_RTOL_PEAK


def assert_same(a, b, where="value"):
    """Deep equality of nested results: same types, dtypes, shapes, values, table meta."""
    if isinstance(a, Table):
        assert isinstance(b, Table), where
        assert a.colnames == b.colnames, where
        assert dict(a.meta) == dict(b.meta), where
        for c in a.colnames:
            # same type and width; big-endian FITS columns come back in native byte order
            assert a[c].dtype.newbyteorder("=") == b[c].dtype.newbyteorder("="), f"{where}[{c}]"
            assert a[c].unit == b[c].unit, f"{where}[{c}]"
            same = np.array_equal(np.asarray(a[c]), np.asarray(b[c]),
                                  equal_nan=a[c].dtype.kind == "f")
            assert same, f"{where}[{c}]"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        # a generator's blend_list is a LazyBlendList (a list built on access): read back as list
        kind = list if isinstance(a, LazyBlendList) else type(a)
        assert kind is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), where
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, where


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One batch of draw + measure + metrics saved by the generators themselves."""
    path = tmp_path_factory.mktemp("run")
    catalog = btk.catalog.CatsimCatalog.default()
    sampler = btk.sampling_functions.DefaultSampling(max_number=3, stamp_size=24.0, max_shift=3.0)
    draw = btk.draw_blends.CatsimGenerator(catalog, sampler, btk.survey.get_surveys("LSST"),
                                           batch_size=4, save_path=path)
    meas = btk.measure.MeasureGenerator(btk.measure.sep_singleband_measure, draw, save_path=path)
    metrics = btk.metrics.MetricsGenerator(
        meas, target_meas={"ellipticity": btk.metrics.meas_ksb_ellipticity},
        meas_band_name="r", save_path=path)
    out = next(metrics)
    return path, out, draw.config()


@pytest.fixture(scope="module")
def multi_batch():
    catalog = btk.catalog.CatsimCatalog.default()
    sampler = btk.sampling_functions.DefaultSampling(max_number=2, stamp_size=12.0, max_shift=2.0)
    draw = btk.draw_blends.CatsimGenerator(catalog, sampler,
                                           btk.survey.get_surveys(["LSST", "HSC"]),
                                           batch_size=2, stamp_size=12.0)
    return next(draw), draw.config()


def test_round_trip_single_survey_all_stages(saved_run):
    path, (blend_results, meas_results, results), config = saved_run
    assert sorted(os.listdir(path)) == ["blends_000000.h5", "measure_000000.h5",
                                        "metrics_000000.h5"]
    b, m, r = utils.load_all_results(path, ["LSST"], ["sep_singleband_measure"], n_batch=4)
    for key in ("blend_images", "isolated_images", "psf_images", "blend_list"):
        assert_same(blend_results[key], b[key], key)
    assert b["wcs"].to_header_string() == blend_results["wcs"].to_header_string()
    assert_same(meas_results, m, "meas_results")
    assert_same(results, r, "results")
    # the default PSF comes back as images of the same PSF; psf="repr" gives the exact objects
    exact = utils.load_blend_results(path, "LSST", psf="repr")["psf"]
    assert [repr(p) for p in exact] == [repr(p) for p in blend_results["psf"]]
    im = b["psf"][2].drawImage(nx=31, ny=31, scale=0.2, method="no_pixel").array
    ref = blend_results["psf"][2].drawImage(nx=31, ny=31, scale=0.2).array
    assert np.abs(im - ref).max() < PSF_RELOAD_RTOL_PEAK * ref.max()
    # the configuration and versions that made them
    attrs = utils.read_attrs(utils.blend_file(path, 0))
    assert attrs["config"] == json.loads(json.dumps(config))
    assert attrs["versions"]["btkjax"] == btk.__version__
    assert attrs["versions"]["numpy"] == np.__version__
    assert "target_meas" in utils.read_attrs(utils.metrics_file(path, 0))["config"]


def test_files_readable_with_h5py_and_astropy_only(saved_run):
    path, (blend_results, _, results), _ = saved_run
    from astropy.io.misc.hdf5 import read_table_hdf5

    with h5py.File(path / "blends_000000.h5", "r") as f:
        assert np.array_equal(f["LSST/blend_images"][()], blend_results["blend_images"])
        table = read_table_hdf5(f["LSST/blend_list"], path="000001")
        assert list(table["x_peak"]) == list(blend_results["blend_list"][1]["x_peak"])
        assert "CRPIX1" in f["LSST"].attrs["wcs"]
    with h5py.File(path / "metrics_000000.h5", "r") as f:
        summary = read_table_hdf5(f["results/galaxy_summary"], path="sep_singleband_measure")
        assert len(summary) == len(results["galaxy_summary"]["sep_singleband_measure"])


def test_round_trip_multi_survey(multi_batch, tmp_path):
    batch, config = multi_batch
    utils.save_blend_batch(tmp_path, 3, batch, config)
    loaded = utils.load_blend_results(tmp_path, ["LSST", "HSC"], batch_index=3, n_batch=2)
    for key in ("blend_images", "isolated_images", "psf_images", "blend_list"):
        assert list(loaded[key]) == ["LSST", "HSC"]
        for name in ("LSST", "HSC"):
            assert_same(batch[key][name], loaded[key][name], f"{key}[{name}]")
    assert loaded["blend_images"]["HSC"].shape[-1] != loaded["blend_images"]["LSST"].shape[-1]
    only = utils.load_blend_results(tmp_path, "HSC", batch_index=3)
    assert list(only["blend_images"]) == ["HSC"]
    assert utils.saved_batches(tmp_path) == [3]


def test_generic_nested_values_round_trip(tmp_path):
    from btkjax.match import MatchResult

    masked = np.ma.MaskedArray([1.0, 2.0, 3.0], mask=[False, True, False])
    value = {
        "detection": {"m": {"precision": 0.5, "n": 3, "ok": True, "name": "sep",
                            "f1": float("nan"), "eff": np.eye(3), "np": np.float32(2.5)}},
        "matches": {"m": [MatchResult(np.array([0, -1]), np.array([0.1, 0.0]), 1), None]},
        "catalog": {"m": [Table({"a": [1, 2]}, meta={"k": "v"}), Table(), Table({"b": []})]},
        "segmentation": {"m": [np.zeros((2, 4, 4), bool), np.zeros((0, 4, 4), bool)]},
        "odd keys": {"a/b": (1, 2.0), 7: np.array(["x", "yz"]), "masked": masked},
    }
    utils.save_measure_batch(tmp_path, 0, value, {"generator": "test"})
    loaded = utils.load_measure_results(tmp_path)
    masked_back = loaded["odd keys"].pop("masked")
    value["odd keys"].pop("masked")
    assert_same(value, loaded)
    assert type(loaded["matches"]["m"][0]) is MatchResult
    assert np.array_equal(masked_back.mask, masked.mask)
    assert utils.load_measure_results(tmp_path, ["m"], n_batch=3)["catalog"]["m"][0]["a"][1] == 2
    with pytest.raises(utils.SavedResultsError, match=r"no measure named \['other'\]"):
        utils.load_measure_results(tmp_path, ["other"])


def test_interrupted_write_keeps_earlier_files(multi_batch, tmp_path, monkeypatch):
    batch, config = multi_batch
    utils.save_blend_batch(tmp_path, 0, batch, config)
    before = (tmp_path / "blends_000000.h5").read_bytes()
    calls = {"n": 0}
    real = utils._write_table

    def failing(group, name, table):
        calls["n"] += 1
        if calls["n"] == 2:  # after the images and one table of batch 1 are in the file
            raise KeyboardInterrupt("interrupted mid-write")
        return real(group, name, table)

    monkeypatch.setattr(utils, "_write_table", failing)
    with pytest.raises(KeyboardInterrupt):
        utils.save_blend_batch(tmp_path, 1, batch, config)
    # also overwriting an existing batch: the old file stays whole
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        utils.save_blend_batch(tmp_path, 0, batch, config)
    assert calls["n"] == 2
    assert sorted(os.listdir(tmp_path)) == ["blends_000000.h5"]  # no partial, no temp file
    assert (tmp_path / "blends_000000.h5").read_bytes() == before
    loaded = utils.load_blend_results(tmp_path, batch_index=0)
    assert np.array_equal(loaded["blend_images"]["LSST"], batch["blend_images"]["LSST"])


def test_killed_process_leaves_no_partial_file(tmp_path):
    """SIGKILL while a batch is being written: earlier batches load, the batch is absent."""
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np
        from astropy.table import Table
        from btkjax import utils
        batch = {{"blend_images": np.ones((2, 3, 8, 8), np.float32), "isolated_images": None,
                 "blend_list": [Table({{"x_peak": [1.0]}}), Table({{"x_peak": [2.0]}})],
                 "psf": None, "psf_images": np.ones((3, 8, 8)), "wcs": None}}
        utils.save_blend_batch({str(tmp_path)!r}, 0, batch, {{"surveys": ["LSST"]}})
        real = utils._write_table
        def slow(group, name, table):
            real(group, name, table)
            print("writing", flush=True)
            time.sleep(60)
        utils._write_table = slow
        utils.save_blend_batch({str(tmp_path)!r}, 1, batch, {{"surveys": ["LSST"]}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert utils.saved_batches(tmp_path) == [0]
    assert not (tmp_path / "blends_000001.h5").exists()
    loaded = utils.load_blend_results(tmp_path, "LSST", n_batch=2)
    assert loaded["blend_list"][1]["x_peak"][0] == 2.0
    with pytest.raises(FileNotFoundError, match=r"blends_000001\.h5 does not exist.*\[0\]"):
        utils.load_blend_results(tmp_path, batch_index=1)


def test_truncated_and_foreign_files_fail_clearly(multi_batch, tmp_path):
    batch, config = multi_batch
    good = utils.save_blend_batch(tmp_path, 0, batch, config)
    data = open(good, "rb").read()
    truncated = tmp_path / "blends_000001.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(utils.SavedResultsError,
                       match=r"blends_000001\.h5 is not a readable HDF5 file.*btkjax blends"):
        utils.load_blend_results(tmp_path, batch_index=1)
    with h5py.File(tmp_path / "blends_000002.h5", "w") as f:
        f["data"] = np.arange(3)
    with pytest.raises(utils.SavedResultsError,
                       match=r"blends_000002\.h5 is an HDF5 file but not a btkjax blends file"):
        utils.load_blend_results(tmp_path, batch_index=2)
    (tmp_path / "blends_000003.h5").write_text("not hdf5 at all")
    with pytest.raises(utils.SavedResultsError, match=r"blends_000003\.h5 is not a readable HDF5"):
        utils.load_blend_results(tmp_path, batch_index=3)
    os.replace(good, tmp_path / "measure_000000.h5")  # a blends file where measurements belong
    with pytest.raises(utils.SavedResultsError, match=r"measure_000000\.h5.*'btkjax\.blends'"):
        utils.load_measure_results(tmp_path)


def test_load_validates_names_and_batch_size(multi_batch, tmp_path):
    batch, config = multi_batch
    utils.save_blend_batch(tmp_path, 0, batch, config)
    with pytest.raises(utils.SavedResultsError, match=r"no survey \['Euclid_VIS'\].*LSST"):
        utils.load_blend_results(tmp_path, ["Euclid_VIS"])
    with pytest.raises(utils.SavedResultsError, match=r"holds 2 blends but n_batch=100"):
        utils.load_all_results(tmp_path, ["LSST"], [], n_batch=100)
    blends, meas, metrics = utils.load_all_results(tmp_path, ["LSST"], None, n_batch=2)
    assert meas is None and metrics is None and blends["blend_images"]["LSST"].shape[0] == 2
    with pytest.raises(FileNotFoundError, match=r"measure_000000\.h5 does not exist"):
        utils.load_all_results(tmp_path, ["LSST"], ["sep_singleband_measure"])


def test_tutorial_saving_cells(tmp_path, monkeypatch):
    """The tutorial's "Saving the results" cells, on btkjax (batch size 100 -> 4)."""
    from tutorial import code_cells

    cells = code_cells("Saving the results", "Using COSMOS galaxies")
    assert "load_all_results" in cells[-1]
    monkeypatch.setattr("tempfile.mkdtemp", lambda: str(tmp_path))
    ns = {
        "btk": btk,
        "catalog": btk.catalog.CatsimCatalog.default(),
        "sampling_function": btk.sampling_functions.DefaultSampling(max_number=3,
                                                                    stamp_size=24.0),
        "LSST": btk.survey.get_surveys("LSST"),
        "stamp_size": 24.0,
    }
    for cell in cells:
        exec(cell.replace("batch_size=100", "batch_size=4").replace("n_batch=100", "n_batch=4"),
             ns)
    assert sorted(os.listdir(tmp_path)) == ["blends_000000.h5", "measure_000000.h5",
                                            "metrics_000000.h5"]
    assert ns["blend_results"]["blend_images"].shape[0] == 4
    assert "ellipticity0" in ns["results"]["galaxy_summary"]["sep_singleband_measure"].colnames
