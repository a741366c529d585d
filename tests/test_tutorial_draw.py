"""Every code cell of the BTK tutorial's setup and "Draw some blends" sections, on btkjax.

Only the imports (btk -> btkjax) and the catalog path change; batch_size stays the tutorial's
100. Then the outputs are checked: shapes, fluxes against galcheat, positions.
"""

import galcheat.utilities
import matplotlib
import numpy as np
from conftest import CATSIM_SAMPLE
from tutorial import code_cells, to_btkjax

matplotlib.use("Agg")


def test_draw_some_blends_cells_run():
    cells = code_cells("Setup", "Measurement")
    assert len(cells) >= 12
    namespace = {}
    for cell in cells:
        code = to_btkjax(cell, {"../data/sample_input_catalog.fits": str(CATSIM_SAMPLE)})
        exec(compile(code, "<tutorial>", "exec"), namespace)
    batch = namespace["batch"]
    images, tables = namespace["blend_images"], namespace["blend_list"]
    assert images.shape == (100, 6, 120, 120)
    assert batch["isolated_images"].shape == (100, 3, 6, 120, 120)
    assert len(tables) == 100 and len(batch["psf"]) == 6
    assert {len(t) for t in tables} <= {1, 2, 3}
    for table in tables[:10]:
        assert np.all(np.abs(table["ra"]) <= 3.0) and np.all(np.abs(table["dec"]) <= 3.0)
        assert np.all(table["ref_mag"] <= 25.3)
        for band in "ugrizy":
            expected = galcheat.utilities.mag2counts(np.array(table[f"{band}_ab"]), "LSST", band)
            np.testing.assert_array_equal(table[f"{band}_flux"], expected.value)
    # noise "all": the background-subtracted sky has zero mean and Poisson variance
    sky = galcheat.utilities.mean_sky_level("LSST", "r").value
    corner = images[:, 2, :10, :10]
    assert abs(corner.mean()) < 5 * np.sqrt(sky / corner.size)
    assert abs(corner.var() / sky - 1) < 0.05
    # the tutorial's custom PSF surveys were built
    assert namespace["LSST_custom"].get_filter("r").psf is not None
