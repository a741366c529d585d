"""`ForwardModelMeasure`'s fit windows are each blend's own: a blend's catalog does not depend on
the other blends of its batch."""

import numpy as np

import btkjax
from btkjax import deblend as D


def _one_blend(batch, i):
    """The batch dict of blend ``i`` alone (arrays and lists over blends sliced, the rest as is)."""
    n = len(batch["blend_list"])
    out = {}
    for k, v in batch.items():
        if isinstance(v, list) and len(v) == n:
            out[k] = v[i:i + 1]
        elif hasattr(v, "shape") and np.ndim(v) and v.shape[0] == n:
            out[k] = v[i:i + 1]
        else:
            out[k] = v
    return out


def test_a_blend_measures_the_same_alone_and_in_its_batch():
    catalog = btkjax.catalog.CatsimCatalog.default()
    survey = btkjax.survey.get_surveys("LSST")
    # 12" stamps (60 pixels): with crop_margin 3.2" (16 pixels each side) a blend whose
    # detections span <= 15 pixels fits in a 48-pixel window, a wider one in the whole stamp
    sampler = btkjax.sampling_functions.DefaultSampling(max_number=2, min_number=1,
                                                        stamp_size=12.0, max_shift=2.5, seed=7)
    draw = btkjax.draw_blends.CatsimGenerator(catalog, sampler, survey, batch_size=4,
                                              stamp_size=12.0, add_noise="all", seed=8)
    batch = next(draw)
    # one blend per compiled call (chunk=1, the CPU default): with chunk > 1 a blend alone and
    # in a group run different (vmapped) programs
    kw = dict(max_sources=3, max_steps=40, model="exponential", ring_sources=0, chunk=1,
              multi_start=False, asymmetry_sources=0, split_sources=False, errors=False,
              merge_sources=False)
    fm = D.ForwardModelMeasure(**kw)
    together = [fm(batch, i, surveys=[survey])["catalog"] for i in range(4)]
    sizes = np.asarray(fm.last_fit_pixels)
    assert sizes.shape == (4,)
    # the batch holds blends of both window sizes, else the check below is empty
    assert set(sizes.tolist()) == {48, 60}, sizes
    # one blend of each size alone: the smaller window's (a batch-wide window would be the
    # stamp) and the stamp's (the parts of the batch gathered back in its order)
    for i in (int(np.argmax(sizes == 48)), int(np.argmax(sizes == 60))):
        alone_fm = D.ForwardModelMeasure(**kw)
        alone = alone_fm(_one_blend(batch, i), 0, surveys=[survey])["catalog"]
        assert alone_fm.last_fit_pixels.tolist() == [sizes[i]]
        assert alone.colnames == together[i].colnames
        for col in alone.colnames:
            np.testing.assert_array_equal(np.asarray(alone[col]), np.asarray(together[i][col]),
                                          err_msg=f"blend {i}, column {col}")
