"""Test configuration: float64 available everywhere (float32 paths pass float32 arrays).

Tests that need float64 ask for the ``x64`` fixture (``jax.enable_x64(True)`` for the test), so
that they keep working once the suite runs with JAX's float32 default.
"""

from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)

DATA = Path(__file__).resolve().parent / "data"  # vendored inputs, see data/PROVENANCE.md
CATSIM_SAMPLE = DATA / "catsim" / "sample_input_catalog.fits"
COSMOS_DIR = DATA / "cosmos"


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
