"""Test configuration.

The suite runs with JAX's defaults (float32; ``jax_enable_x64`` off), as users do. A test that
needs float64 says so: the ``x64`` fixture (``jax.enable_x64(True)`` around the test), or the
``float64`` mark on a module or test (``pytestmark = pytest.mark.float64``), which also covers
the fixtures set up for it (module-scoped references included).
"""

import os
from pathlib import Path

import jax
import pytest

# The persistent compilation cache, shared by the xdist workers and the subprocesses the tests
# start (CLI, streaming, notebooks: they read the environment variable), so that a program is
# compiled once per machine, not once per process; a rerun of the suite reuses it. Programs
# compiled in under half a second are not worth the disk round trip.
CACHE_DIR = Path(__file__).resolve().parents[1] / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

DATA = Path(__file__).resolve().parent / "data"  # vendored inputs, see data/PROVENANCE.md
CATSIM_SAMPLE = DATA / "catsim" / "sample_input_catalog.fits"
COSMOS_DIR = DATA / "cosmos"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Tests marked ``float64`` run, set-up and tear-down included, with x64 on."""
    if item.get_closest_marker("float64") is None:
        return (yield)
    with jax.enable_x64(True):
        return (yield)


@pytest.fixture
def x64():
    """float64 for one test, whatever the suite's default."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def catsim_sample():
    from btkjax.catalog import CatsimCatalog

    if not CATSIM_SAMPLE.exists():
        pytest.skip(f"the CatSim sample is not at {CATSIM_SAMPLE}")
    return CatsimCatalog.from_file(CATSIM_SAMPLE)
