"""The notebooks under notebooks/ execute top to bottom (nbclient, the running interpreter)."""

import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
KERNEL = "btkjax-test-python"


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that runs this interpreter, visible only to these tests (JUPYTER_PATH)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "btkjax tests", "language": "python",
    }))
    return root


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert {"00-intro.ipynb", "01-custom.ipynb", "02-multi-resolution.ipynb",
            "03-cosmos.ipynb"} <= set(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("BTKJAX_NOTEBOOK_QUICK", "1")  # notebooks that read it run at a tiny size
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, timeout=240, kernel_name=KERNEL,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # the kernel was this interpreter
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in code for o in c.get("outputs", [])), "no figure was shown"
    check = CHECKS.get(path.stem)
    if check is not None:
        check(code)


def _printed_json(cell) -> dict:
    """The JSON object printed on the last line of a cell's stdout."""
    text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")
    return json.loads(text.strip().splitlines()[-1])


def _check_training(code):
    """05: the loss falls on held-out blends, ids are held out, both methods' metrics are real."""
    s = _printed_json(code[-1])
    assert s["n_steps"] >= 2 and s["steps_per_s"] > 0
    assert s["train_step_traces"] == 1  # the steady-state rate excludes compilation
    # the trained network fits the same held-out blends better than the untrained one
    assert s["val_loss_trained"] < s["val_loss_untrained"], s
    # held out: validation and calibration ids never overlap the training ids
    train_lo, train_hi = s["train_ids"]
    assert train_lo == 0 and train_hi == s["n_steps"] * s["batch"] - 1
    for ids, n in (("cal_ids", "n_cal"), ("val_ids", "n_val")):
        lo, hi = s[ids]
        assert lo > train_hi and hi - lo + 1 == s[n]
    assert s["val_ids"][0] > s["cal_ids"][1]
    results = s["results"]
    assert {k.split(" (")[0].split(",")[0] for k in results} == {
        "network", "untrained network", "SEP i band"}
    for name, r in results.items():
        assert r["n_true"] > 0 and r["n_matched"] <= min(r["n_true"], r["n_detected"]), (name, r)
        for m in ("recall", "f1"):
            assert 0.0 <= r[m] <= 1.0, (name, r)
        assert r["f1"] == pytest.approx(2 * r["n_matched"] / (r["n_true"] + r["n_detected"]))
    # SEP at its default threshold finds most galaxies where the truth says they are (pixel
    # conventions of the truth and of the measurement agree)
    sep = results["SEP i band, 1.5 sigma (default)"]
    assert sep["precision"] > 0.5 and sep["recall"] > 0.3, sep


CHECKS = {"05-training-in-the-loop": _check_training}
