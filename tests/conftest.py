"""Test configuration: float64 available everywhere (float32 paths pass float32 arrays)."""

from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CATSIM_SAMPLE = SHARED_DATA / "catsim" / "sample_input_catalog.fits"
COSMOS_DIR = SHARED_DATA / "cosmos"


@pytest.fixture(scope="session")
def catsim_sample():
    from btkjax.catalog import CatsimCatalog

    if not CATSIM_SAMPLE.exists():
        pytest.skip(f"the CatSim sample is not at {CATSIM_SAMPLE}")
    return CatsimCatalog.from_file(CATSIM_SAMPLE)
