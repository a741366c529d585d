"""Tests of the table sampling functions and the JAX array samplers.

Distribution tests draw N_BLENDS blends with each sampler on the CatSim sample catalog and compare
with the exact distributions (chi-square, KS) at the p-value floor of ``tolerances``.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.table import Table
from conftest import CATSIM_SAMPLE
from scipy import stats

from btkjax import DEFAULT_SEED
from btkjax import samplers as S
from btkjax import sampling_functions as sf
from btkjax.catalog import CatsimCatalog
from btkjax.tolerances import F32_SAME_RTOL, SAMPLING_PVALUE_FLOOR

CATSIM_FILE = CATSIM_SAMPLE

N_BLENDS = 4000
MAX_NUMBER = 3
MAX_SHIFT = 3.0
MIN_MAG, MAX_MAG = 22.0, 25.3  # both bounds active on the sample catalog


@pytest.fixture(scope="module")
def table() -> Table:
    if not CATSIM_FILE.exists():
        pytest.skip(f"CatSim sample catalog not found at {CATSIM_FILE}")
    return CatsimCatalog.from_file(CATSIM_FILE).table


def _default(**kw):
    args = dict(
        max_number=MAX_NUMBER,
        stamp_size=24.0,
        max_shift=MAX_SHIFT,
        min_mag=MIN_MAG,
        max_mag=MAX_MAG,
        seed=DEFAULT_SEED,
    )
    args.update(kw)
    return sf.DefaultSampling(**args)


@pytest.fixture(scope="module")
def eligible(table):
    mag = np.asarray(table["ref_mag"])
    return np.flatnonzero((mag > MIN_MAG) & (mag <= MAX_MAG))


@pytest.fixture(scope="module")
def table_draws(table):
    """N_BLENDS blends from the table sampler, as padded arrays. The sampler reads only ra, dec
    and ref_mag, so it is fed those columns (astropy copies every column of every sampled row:
    1.3 ms per blend with the full table, 0.45 ms with three); the output format on the full
    table is tested separately."""
    sampler = _default()
    slim = table["ra", "dec", "ref_mag"]
    return S.blends_from_tables([sampler(slim) for _ in range(N_BLENDS)], MAX_NUMBER)


@pytest.fixture(scope="module")
def jax_draws(table):
    sampler = _default().jax_sampler(table)
    return jax.tree.map(np.asarray, sampler.sample(jax.random.key(1), np.arange(N_BLENDS)))


def _uniform_count_pvalue(counts, lo, hi):
    n = np.asarray(counts)
    observed = np.array([(n == k).sum() for k in range(lo, hi + 1)])
    assert observed.sum() == n.size, f"counts outside [{lo}, {hi}]: {np.unique(n)}"
    return stats.chisquare(observed).pvalue


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(max_number=0), ValueError, ["max_number", ">= 1", "0"]),
        (dict(max_number=2, min_number=3), ValueError, ["min_number = 3", "max_number = 2"]),
        (dict(min_number=-1), ValueError, ["min_number", "-1"]),
        (dict(seed=1.5), TypeError, ["seed", "1.5", "int"]),
        (dict(seed="0"), TypeError, ["seed", "int"]),
        (dict(max_number=2.0), TypeError, ["max_number", "int"]),
        (
            dict(stamp_size=24.0, max_shift=12.5),
            ValueError,
            ["12.5", "24.0", "stamp_size / 2", "12.0"],
        ),
        (dict(min_mag=26.0, max_mag=25.0), ValueError, ["min_mag = 26.0", "max_mag = 25.0"]),
    ],
)
def test_bad_parameters_raise_named_errors(kwargs, exc, words):
    with pytest.raises(exc) as info:
        sf.DefaultSampling(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_max_shift_at_half_stamp_is_allowed():
    assert sf.DefaultSampling(stamp_size=24.0, max_shift=12.0).max_shift == 12.0


def test_empty_magnitude_cut_names_cut_and_range(table):
    sampler = sf.DefaultSampling(max_mag=10.0)
    with pytest.raises(ValueError) as info:
        sampler(table)
    msg = str(info.value)
    lo, hi = float(np.min(table["ref_mag"])), float(np.max(table["ref_mag"]))
    assert "ref_mag <= 10.0" in msg and f"{lo:.4g}" in msg and f"{hi:.4g}" in msg, msg
    with pytest.raises(ValueError, match="leaves no galaxy"):
        sampler.jax_sampler(table)
    with pytest.raises(ValueError, match="leaves no galaxy"):
        S.eligible_rows(table, min_mag=28.0, max_mag=30.0)


def test_missing_magnitude_column(table):
    with pytest.raises(ValueError, match="'r_mag'"):
        sf.DefaultSampling(mag_name="r_mag")(table)


def test_ref_mag_falls_back_to_i_ab(table):
    t = table.copy()
    t.remove_column("ref_mag")
    out = sf.DefaultSampling(max_number=4, min_number=4, seed=3)(t)
    assert len(out) == 4 and np.all(np.asarray(out["i_ab"]) <= 25.3)
    rows = S.eligible_rows(t, max_mag=25.3)
    assert np.array_equal(rows, np.flatnonzero(np.asarray(table["i_ab"]) <= 25.3))


def test_blends_from_tables_errors(table):
    good = sf.DefaultSampling(max_number=3, min_number=3)(table)
    with pytest.raises(ValueError) as info:
        S.blends_from_tables([good], max_number=2)
    assert "3 rows" in str(info.value) and "max_number = 2" in str(info.value)
    no_ra = good.copy()
    no_ra.remove_column("ra")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ra'\]"):
        S.blends_from_tables([good, no_ra], max_number=3)
    no_index = good.copy()
    no_index.remove_column("btk_index")
    with pytest.raises(ValueError, match="btk_index"):
        S.blends_from_tables([no_index], max_number=3)
    with pytest.raises(ValueError, match="outside the catalog"):
        S.blends_from_tables([good], max_number=3, catalog_size=int(good["btk_index"].min()))


def test_jax_sampler_bad_parameters():
    with pytest.raises(ValueError, match="min_number = 4"):
        S.JaxDefaultSampler(np.arange(5), max_number=3, min_number=4)
    with pytest.raises(ValueError, match="max_number must be >= 1"):
        S.JaxDefaultSampler(np.arange(5), max_number=0, min_number=0)
    with pytest.raises(ValueError, match="non-empty"):
        S.JaxDefaultSampler(np.arange(0), max_number=3)


# ------------------------------------------------------------------------------------------------
# the table sampler's output format
# ------------------------------------------------------------------------------------------------


def test_table_output_keeps_columns_and_indexes_catalog(table):
    out = sf.DefaultSampling(max_number=4, min_number=4, max_shift=2.0, seed=5)(table)
    assert set(table.colnames) <= set(out.colnames) and "btk_index" in out.colnames
    assert out["btk_index"].dtype.kind == "i"
    rows = np.asarray(out["btk_index"])
    for col in ("i_ab", "a_d", "fluxnorm_bulge", "galtileid"):
        assert np.array_equal(np.asarray(out[col]), np.asarray(table[col])[rows])
    assert np.all(np.abs(out["ra"]) <= 2.0) and np.all(np.abs(out["dec"]) <= 2.0)
    # the catalog table itself is untouched (ra/dec still in degrees)
    assert np.all(np.abs(np.asarray(table["ra"]) - 0.43) < 0.02)


def test_existing_btk_index_is_kept(table):
    t = table[10:40]
    t["btk_index"] = np.arange(10, 40)
    out = sf.DefaultSampling(max_number=5, min_number=5, max_mag=30)(t)
    rows = np.asarray(out["btk_index"])
    assert np.array_equal(np.asarray(out["galtileid"]), np.asarray(table["galtileid"])[rows])


def test_blends_from_tables_round_trip(table):
    sampler = sf.DefaultSamplingShear(max_number=3, shear=(0.02, -0.01), seed=2)
    tabs = [sampler(table) for _ in range(50)]
    tabs[3]["btk_rotation"] = np.arange(len(tabs[3])) * 10.0 + 5.0
    b = S.blends_from_tables(tabs, 3)
    n = np.array([len(t) for t in tabs])
    assert np.array_equal(b.mask.sum(1), n)
    assert np.array_equal(b.mask, np.arange(3)[None] < n[:, None])
    for i, t in enumerate(tabs):
        k = len(t)
        assert np.array_equal(b.index[i, :k], t["btk_index"]) and np.all(b.index[i, k:] == 0)
        assert np.array_equal(b.dx[i, :k], t["ra"]) and np.array_equal(b.dy[i, :k], t["dec"])
        assert np.all(b.g1[i, :k] == 0.02) and np.all(b.g2[i, :k] == -0.01)
        assert np.all(b.g1[i, k:] == 0) and np.all(b.dx[i, k:] == 0)
    assert np.array_equal(b.rotation[3, : n[3]], np.arange(n[3]) * 10.0 + 5.0)
    assert np.all(b.rotation[np.arange(50) != 3] == 0)


# ------------------------------------------------------------------------------------------------
# distributions: JAX sampler and table sampler against the exact law and each other
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["table", "jax"])
def test_number_per_blend_is_uniform(which, table_draws, jax_draws):
    b = table_draws if which == "table" else jax_draws
    p = _uniform_count_pvalue(b.mask.sum(1), 1, MAX_NUMBER)
    assert p > SAMPLING_PVALUE_FLOOR, p
    # occupied slots first
    assert np.array_equal(b.mask, np.arange(MAX_NUMBER)[None] < b.mask.sum(1)[:, None])


def test_number_per_blend_same_in_both(table_draws, jax_draws):
    cont = np.array(
        [
            [(b.mask.sum(1) == k).sum() for k in range(1, MAX_NUMBER + 1)]
            for b in (table_draws, jax_draws)
        ]
    )
    p = stats.chi2_contingency(cont).pvalue
    assert p > SAMPLING_PVALUE_FLOOR, (p, cont)


@pytest.mark.parametrize("which", ["table", "jax"])
def test_shifts_uniform_within_max_shift(which, table_draws, jax_draws):
    b = table_draws if which == "table" else jax_draws
    for d in (b.dx[b.mask], b.dy[b.mask]):
        assert np.max(np.abs(d)) <= MAX_SHIFT
        p = stats.kstest(d, stats.uniform(-MAX_SHIFT, 2 * MAX_SHIFT).cdf).pvalue
        assert p > SAMPLING_PVALUE_FLOOR, p
    assert np.all(b.dx[~b.mask] == 0) and np.all(b.dy[~b.mask] == 0)


def test_shift_test_has_power(jax_draws):
    """The KS test above rejects a shift range 10% too narrow by a wide margin: it can fail."""
    d = jax_draws.dx[jax_draws.mask]
    p = stats.kstest(d, stats.uniform(-0.9 * MAX_SHIFT, 1.8 * MAX_SHIFT).cdf).pvalue
    assert p < SAMPLING_PVALUE_FLOOR * 1e-6, p


def test_shifts_same_in_both(table_draws, jax_draws):
    for a, b in ((table_draws.dx, jax_draws.dx), (table_draws.dy, jax_draws.dy)):
        p = stats.ks_2samp(a[table_draws.mask], b[jax_draws.mask]).pvalue
        assert p > SAMPLING_PVALUE_FLOOR, p
    # x and y shifts independent (no correlation between the two axes)
    r = stats.pearsonr(jax_draws.dx[jax_draws.mask], jax_draws.dy[jax_draws.mask])
    assert r.pvalue > SAMPLING_PVALUE_FLOOR


@pytest.mark.parametrize("which", ["table", "jax"])
def test_magnitude_cut_exact_and_rows_uniform(which, table, eligible, table_draws, jax_draws):
    b = table_draws if which == "table" else jax_draws
    rows = b.index[b.mask]
    mag = np.asarray(table["ref_mag"])[rows]
    assert np.all(mag > MIN_MAG) and np.all(mag <= MAX_MAG)
    assert set(np.unique(rows)) == set(eligible)  # every eligible row is reached
    counts = np.array([(rows == r).sum() for r in eligible])
    p = stats.chisquare(counts).pvalue
    assert p > SAMPLING_PVALUE_FLOOR, (p, counts)
    assert np.all(b.index[~b.mask] == 0)


def test_row_choice_same_in_both(eligible, table_draws, jax_draws):
    cont = np.array(
        [[(b.index[b.mask] == r).sum() for r in eligible] for b in (table_draws, jax_draws)]
    )
    p = stats.chi2_contingency(cont).pvalue
    assert p > SAMPLING_PVALUE_FLOOR, p


def test_magnitude_cut_bounds_are_exclusive_inclusive(table):
    mags = np.sort(np.unique(np.asarray(table["ref_mag"])))
    lo, hi = mags[10], mags[12]  # exactly three rows: mags[10] excluded, mags[11], mags[12] kept
    rows = S.eligible_rows(table, lo, hi)
    assert np.array_equal(np.sort(np.asarray(table["ref_mag"])[rows]), mags[11:13])
    out = sf.DefaultSampling(max_number=10, min_number=10, min_mag=lo, max_mag=hi)(table)
    assert set(out["ref_mag"]) <= set(mags[11:13])


# ------------------------------------------------------------------------------------------------
# reproducibility, batch invariance, compilation
# ------------------------------------------------------------------------------------------------


def _table_run(table, seed, n=20):
    sampler = _default(seed=seed)
    return S.blends_from_tables([sampler(table) for _ in range(n)], MAX_NUMBER)


def test_table_sampler_same_seed_same_blends(table):
    a, b, c = _table_run(table, 7), _table_run(table, 7), _table_run(table, 8)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.dx, c.dx) and not np.array_equal(a.index, c.index)


def test_jax_sampler_same_key_same_blends(table):
    s = _default().jax_sampler(table)
    ids = np.arange(100)  # shapes shared with other tests: compiled once
    a, b = s.sample(jax.random.key(3), ids), s.sample(jax.random.key(3), ids)
    c = s.sample(jax.random.key(4), ids)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.dx, c.dx) and not np.array_equal(a.index, c.index)
    # an int seed is the same as jax.random.key(seed); None uses the sampler's seed
    assert np.array_equal(s.sample(3, ids).dx, a.dx)
    assert np.array_equal(s.sample(None, ids).dx, s.sample(DEFAULT_SEED, ids).dx)
    # different blends of one batch differ
    assert len(np.unique(np.asarray(a.dx[:, 0]))) == 100


@pytest.mark.parametrize("batch", [1, 7, 100])
def test_jax_sampler_batch_size_invariance(table, batch):
    s = _default().jax_sampler(table)
    key = jax.random.key(11)
    ref = jax.tree.map(np.asarray, s.sample(key, np.arange(100)))
    # fixed-size batches; the ragged tail is padded with the next ids and cut (as a generator does)
    parts = [s.sample(key, np.arange(i, i + batch)) for i in range(0, 100, batch)]
    got = jax.tree.map(lambda *x: np.concatenate([np.asarray(y) for y in x])[:100], *parts)
    for name, x, y in zip(S.Blends._fields, ref, got, strict=True):
        assert np.array_equal(x, y), name
    # ids, not positions: a shuffled batch gives the same blends, shuffled
    perm = np.random.default_rng(0).permutation(100)
    shuffled = s.sample(key, perm)
    assert np.array_equal(np.asarray(shuffled.index), ref.index[perm])


def test_jit_compiles_once_per_shape(table):
    rows = S.eligible_rows(table, MIN_MAG, MAX_MAG)
    s = S.JaxDefaultSampler(rows, max_number=MAX_NUMBER, min_number=2, max_shift=1.5)
    before = S.trace_counts["default_sampler"]
    for start in (0, 13, 26, 1000):
        jax.block_until_ready(s.sample(jax.random.key(start), np.arange(start, start + 13)))
    assert S.trace_counts["default_sampler"] - before == 1
    s.sample(0, np.arange(14))  # a new batch shape traces again: the counter does count
    assert S.trace_counts["default_sampler"] - before == 2
    # a different max_shift or min_number (traced values) does not retrace
    other = S.JaxDefaultSampler(rows, MAX_NUMBER, min_number=1, max_shift=2.5, augment=True)
    other.sample(0, np.arange(14))
    assert S.trace_counts["default_sampler"] - before == 2


def test_default_sampler_under_outer_jit_and_vmap_shapes(table):
    s = _default().jax_sampler(table)
    rows = s.eligible_rows
    f = jax.jit(lambda k, ids: S.default_sampler(k, ids, rows, MAX_NUMBER, 1, MAX_SHIFT))
    b = f(jax.random.key(0), jnp.arange(100))
    assert b.index.shape == (100, MAX_NUMBER) and b.mask.dtype == jnp.bool_
    assert b.dx.shape == (100, MAX_NUMBER) and b.index.dtype == jnp.int32
    direct = s.sample(jax.random.key(0), np.arange(100))
    assert np.allclose(np.asarray(b.dx), np.asarray(direct.dx), rtol=F32_SAME_RTOL, atol=F32_SAME_RTOL)
    assert np.array_equal(np.asarray(b.index), np.asarray(direct.index))


def test_augment_rotation(table):
    s = _default().jax_sampler(table, augment=True)  # augment is traced: no new compilation
    b = jax.tree.map(np.asarray, s.sample(0, np.arange(N_BLENDS)))
    rot = b.rotation[b.mask]
    assert np.all((rot >= 0) & (rot < 360)) and np.all(b.rotation[~b.mask] == 0)
    assert stats.kstest(rot, stats.uniform(0, 360).cdf).pvalue > SAMPLING_PVALUE_FLOOR
    plain = _default().jax_sampler(table).sample(0, np.arange(N_BLENDS))
    assert np.all(np.asarray(plain.rotation) == 0)
    assert np.array_equal(np.asarray(plain.dx), b.dx)  # rotation draws do not move the rest


# ------------------------------------------------------------------------------------------------
# the other samplers
# ------------------------------------------------------------------------------------------------


def test_shear_sampler_table_and_jax(table):
    sampler = sf.DefaultSamplingShear(
        max_number=MAX_NUMBER, shear=(0.05, -0.02), seed=1, min_mag=MIN_MAG, max_mag=MAX_MAG
    )
    out = sampler(table)
    assert np.all(out["g1"] == 0.05) and np.all(out["g2"] == -0.02)
    assert sampler.has_jax_sampler
    b = sampler.jax_sampler(table).sample(0, np.arange(100))
    g1, g2, m = np.asarray(b.g1), np.asarray(b.g2), np.asarray(b.mask)
    assert np.allclose(g1[m], 0.05) and np.allclose(g2[m], -0.02)
    assert np.all(g1[~m] == 0) and (~m).any()
    with pytest.raises(ValueError, match=r"\|g\| < 1"):
        sf.DefaultSamplingShear(shear=(0.8, 0.8))


def test_has_jax_sampler_false_for_overridden_call(table):
    class Custom(sf.DefaultSampling):
        def __call__(self, table):
            return super().__call__(table)[:1]

    assert sf.DefaultSampling().has_jax_sampler and not Custom().has_jax_sampler
    assert not sf.BasicSampling().has_jax_sampler
    with pytest.raises(NotImplementedError, match="blends_from_tables"):
        sf.BasicSampling().jax_sampler(table)


def test_basic_sampling(table):
    sampler = sf.BasicSampling(max_number=4, seed=0)
    mag = np.asarray(table["ref_mag"])
    size = np.hypot(np.asarray(table["a_d"]), np.asarray(table["a_b"]))
    tabs = [sampler(table) for _ in range(600)]
    n = np.array([len(t) for t in tabs])
    assert _uniform_count_pvalue(n, 1, 4) > SAMPLING_PVALUE_FLOOR
    n_faint_pool = 0
    for t in tabs:
        rows = np.asarray(t["btk_index"])
        assert mag[rows[0]] <= 24.0
        assert np.all((size[rows] > 0.2) & (size[rows] <= 2.0))
        shift = 24.0 / 30.0 * np.sqrt(len(t))
        assert np.all(np.abs(t["ra"]) <= shift) and np.all(np.abs(t["dec"]) <= shift)
        assert np.all(mag[rows[1:]] < 28.0)
        n_faint_pool += np.any(mag[rows[1:]] > 25.3)
    assert n_faint_pool > 0  # the 10% faint branch is taken
    with pytest.raises(ValueError, match="min_number must be >= 1"):
        sf.BasicSampling(min_number=0)
    assert sf.BasicSampling().compatible_catalogs == ("CatsimCatalog",)


def test_pair_sampling_table_and_jax(table):
    mag = np.asarray(table["ref_mag"])
    sampler = sf.PairSampling(max_shift=2.0, seed=4)
    assert sampler.max_number == 2 and sampler.min_number == 2
    slim = table["ra", "dec", "ref_mag"]  # see table_draws
    tb = S.blends_from_tables([sampler(slim) for _ in range(500)], 2)
    jb = jax.tree.map(np.asarray, sampler.jax_sampler(table).sample(0, np.arange(2000)))
    for b in (tb, jb):
        assert b.mask.all()
        assert np.all(b.dx[:, 0] == 0) and np.all(b.dy[:, 0] == 0)
        assert np.all(mag[b.index[:, 0]] <= 25.3)
        assert np.all((mag[b.index[:, 1]] > 25.3) & (mag[b.index[:, 1]] <= 28.0))
        assert np.max(np.abs(b.dx[:, 1])) <= 2.0
        p = stats.kstest(b.dx[:, 1], stats.uniform(-2.0, 4.0).cdf).pvalue
        assert p > SAMPLING_PVALUE_FLOOR
    assert stats.ks_2samp(tb.dy[:, 1], jb.dy[:, 1]).pvalue > SAMPLING_PVALUE_FLOOR
    with pytest.raises(ValueError, match="bright_cut = 28.0"):
        sf.PairSampling(bright_cut=28.0, dim_cut=25.0)


def test_density_sampling_counts_poisson(table):
    # density 20 / arcmin^2 on a 12 x 12 arcsec square: mean 0.8 galaxies
    sampler = sf.DensitySampling(max_number=12, density=20.0, max_shift=6.0, seed=0)
    assert sampler.exp_count == pytest.approx(0.8)
    slim = table["ra", "dec", "ref_mag"]  # see table_draws
    n_tab = np.array([len(sampler(slim)) for _ in range(1000)])
    n_jax = np.asarray(sampler.jax_sampler(table).sample(0, np.arange(N_BLENDS)).mask.sum(1))
    for n in (n_tab, n_jax):
        total = int(n.sum())
        mu = n.size * sampler.exp_count
        p = 2 * min(stats.poisson.cdf(total, mu), stats.poisson.sf(total - 1, mu))
        assert p > SAMPLING_PVALUE_FLOOR, (total, mu)
        assert (n == 0).any()  # min_number = 0: empty stamps occur
    assert sampler.n_clipped == 0


def test_density_sampling_overflow_is_explicit(table):
    with pytest.warns(sf.DensityOverflowWarning, match="exceed max_number"):
        warned = sf.DensitySampling(max_number=2, density=185.0)  # mean 29.6
    with pytest.warns(sf.DensityOverflowWarning, match="clipped to 2"):
        assert len(warned(table)) == 2
    assert warned.n_clipped == 1
    with pytest.raises(ValueError, match="outside"):
        sf.DensitySampling(max_number=2, on_overflow="raise")(table)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper = sf.DensitySampling(max_number=2, on_overflow="clip")
        assert len(clipper(table)) == 2 and clipper.n_clipped == 1
        b = clipper.jax_sampler(table).sample(0, np.arange(10))
        assert np.all(np.asarray(b.mask.sum(1)) == 2)
    with pytest.warns(sf.DensityOverflowWarning, match="10 of"):
        warned.jax_sampler(table).sample(0, np.arange(10))
    with pytest.raises(ValueError, match="outside"):
        sf.DensitySampling(max_number=2, on_overflow="raise").jax_sampler(table).sample(
            0, np.arange(10)
        )
    with pytest.raises(ValueError, match="on_overflow"):
        sf.DensitySampling(on_overflow="ignore")


def test_random_square_sampling(table):
    sampler = sf.RandomSquareSampling(stamp_size=24.0, max_number=20, seed=0)
    mag = np.asarray(table["ref_mag"])
    ra, dec = np.asarray(table["ra"], float), np.asarray(table["dec"], float)
    sizes = []
    for _ in range(30):
        out = sampler(table)
        sizes.append(len(out))
        if not len(out):
            continue
        rows = np.asarray(out["btk_index"])
        assert np.all(mag[rows] <= 25.3)
        assert np.all(np.abs(out["ra"]) < 12.0) and np.all(np.abs(out["dec"]) < 12.0)
        # offsets are catalog positions minus one common center, in arcsec
        dec_c = dec[rows[0]] - out["dec"][0] / 3600.0
        cosd = np.cos(np.radians(dec_c))
        ra_c = ra[rows[0]] - out["ra"][0] / 3600.0 / cosd
        assert np.allclose((ra[rows] - ra_c) * 3600 * cosd, out["ra"], atol=F32_SAME_RTOL)
        assert np.allclose((dec[rows] - dec_c) * 3600, out["dec"], atol=F32_SAME_RTOL)
        # and the square holds exactly these eligible galaxies
        inside = (
            (np.abs((ra - ra_c) * 3600 * cosd) < 12.0)
            & (np.abs((dec - dec_c) * 3600) < 12.0)
            & (mag <= 25.3)
        )
        assert set(np.flatnonzero(inside)) == set(rows)
    assert max(sizes) > 0
    with pytest.raises(ValueError, match="more than max_number = 1"):
        s = sf.RandomSquareSampling(stamp_size=60.0, max_number=1, max_mag=28.0)
        s(table)
    with pytest.raises(ValueError, match="exceeds the extent"):
        sf.RandomSquareSampling(stamp_size=200.0)(table)


def test_friends_of_friends_sampling(table):
    sampler = sf.FriendsOfFriendsSampling(link_distance=2.5, max_mag=28.0, seed=0)
    ra, dec = np.radians(table["ra"]), np.radians(table["dec"])
    xyz = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)
    sep = np.degrees(np.arccos(np.clip(xyz @ xyz.T, -1, 1))) * 3600  # arcsec
    linked = sep < 2.5
    seen = set()
    for _ in range(20):
        out = sampler(table)
        rows = np.asarray(out["btk_index"])
        seen.add(tuple(rows))
        assert 2 <= len(rows) <= 10
        assert abs(np.mean(out["ra"])) < F32_SAME_RTOL and abs(np.mean(out["dec"])) < F32_SAME_RTOL
        # closed under linking (a whole group) and connected (a single group)
        others = np.setdiff1d(np.arange(len(table)), rows)
        assert not linked[np.ix_(rows, others)].any()
        reached, frontier = {rows[0]}, [rows[0]]
        while frontier:
            r = frontier.pop()
            for q in rows[linked[r, rows]]:
                if q not in reached:
                    reached.add(q)
                    frontier.append(q)
        assert reached == set(rows)
    assert len(seen) > 1
    with pytest.raises(ValueError, match="no group"):
        sf.FriendsOfFriendsSampling(link_distance=0.01)(table)
