"""COSMOS galaxies: GalSim's COSMOS catalog format, parametric fits and real HST images.

`CosmosCatalog` reads the two files of GalSim's COSMOS format (the real-galaxy catalog, with the
image and PSF file names, and its ``_fits`` companion with the parametric fits) and keeps a
`galsim.COSMOSCatalog` for the GalSim backend. `CosmosGenerator` draws its galaxies as BTK's
``CosmosGenerator`` does, ``gal_type="parametric"`` or ``"real"``, on the JAX path or with GalSim.

Parametric galaxies
    Exactly GalSim's ``COSMOSCatalog.makeGalaxy(gal_type="parametric")`` (``_buildParametric``,
    non-chromatic): when ``use_bulgefit`` a de Vaucouleurs bulge (``hlr[1]``, ``flux[1]``,
    ``q = bulgefit[11]``, ``beta = bulgefit[15]``) plus an exponential disk (``hlr[2]``,
    ``flux[2]``, ``q = bulgefit[3]``, ``beta = bulgefit[7]``); otherwise a Sersic profile with
    ``n = sersicfit[2]`` clipped to [0.3, 6] and rounded to the nearest 0.05 (GalSim's default
    ``sersic_prec``), ``hlr[0]``, ``q = sersicfit[3]``, ``beta = sersicfit[7]``. The ``hlr``
    column is already in arcsec (the 0.03" pixel values of the raw ``sersicfit`` / ``bulgefit``
    radii converted by GalSim's catalog makers); angles are radians; a shear is applied only
    where ``q < 1``. ``.withFlux(flux)`` with ``flux`` galcheat's ``mag2counts`` of the band's
    magnitude keeps the components' flux ratio. They become renderer `Sources` with kinds
    ("sersic", "devaucouleurs", "exponential") and go through `btkjax.render.render`.

Real galaxies
    GalSim's ``RealGalaxy`` is ``Convolve(InterpolatedImage(HST image), Deconvolve(
    InterpolatedImage(HST PSF, flux=1)))`` with quintic x-interpolants; its transform is
    ``G(k) u(k) / (P(k) u(k))`` with ``G``, ``P`` the pixel sums of the images (pixel centers
    about each image's true center) and ``u`` the quintic's transform; where
    ``|P(k) u(k)| < kvalue_accuracy`` (1e-5) the inverse is replaced by ``1 / kvalue_accuracy``,
    and ``Deconvolve`` sets the transform to zero beyond the HST PSF's ``maxk`` (its band limit,
    ~105 rad/arcsec for ACS's 0.03" pixels). btkjax computes, once per catalog row on the host,
    exactly this ratio (exact pixel-sum DFTs, no zero padding, normalized so that the value at
    k = 0 is 1) on a regular k-grid of spacing ``2 pi / (pad_factor L)`` (L the largest image
    side of the catalog in arcsec, ``pad_factor`` 4 as GalSim's), over ``|k| <= K`` where K is
    the largest wavenumber the generator's surveys can ask for (the renderer's k-grid corner,
    times the stretch of a |g| = 0.3 shear when shears are applied) or the HST PSF's maxk if
    smaller. Only the half plane kx >= 0 is stored (the images are real, so
    ``F(-k) = conj(F(k))``). On the device each galaxy's transform is interpolated at the
    transformed points ``A^T k`` (A = shear x rotation) with GalSim's quintic kernel in k (6 x 6
    taps), set to zero beyond min(HST PSF maxk, K), scaled by the band flux, shifted (phase),
    multiplied by the survey's PSF x pixel, folded and inverse FFT'd as `btkjax.render` does.

    Where btkjax differs from GalSim: GalSim evaluates each InterpolatedImage by quintic
    k-interpolation of the zero-padded image's FFT (pad_factor 4 of that image) and divides;
    btkjax interpolates the ratio, tabulated exactly, on a grid set by the largest image of the
    catalog (so small images are oversampled more). Both are approximations of the same exact
    transform; measured against the exact DFT ratio the table is within ~1e-4 of F(0) for the
    largest (190 pixel) stamp of the example catalog and ~4e-7 for a typical one; the images
    agree with GalSim's within `REAL_GALAXY_RTOL_PEAK` of the peak (tests/test_cosmos.py).
    Beyond K the table holds nothing: the survey's PSF x pixel is below 1e-7 there
    (`MAXK_THRESHOLD`), unless a shear stretches k by more than sqrt(2) x (1.36 with shears).

Noise of real galaxies
    The HST images carry HST noise. As BTK (``noise_pad_size=0``) btkjax neither pads the
    stamps with noise nor whitens: the original noise, deconvolved by the HST PSF and
    reconvolved by the survey PSF, stays in the images (correlated, far below the survey's sky
    noise for LSST/HSC depths), and the survey noise is then added as for any generator.

Limitations
    The per-row tables live in device memory: rows x (2 K / dk) x (K / dk) complex values (about
    0.5 MB per row in float64 for LSST with the example catalog), fine for thousands of rows,
    not for the full 87k-galaxy COSMOS sample at once (subset the catalog). The HST PSF maxk is
    computed with GalSim's default GSParams.
"""

from __future__ import annotations

import math
import os
import warnings

import galsim
import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from btkjax.blend_tables import extend_rows
from btkjax.catalog import (
    COSMOS_PIXEL_SCALE,
    EXCLUSION_LEVELS,
    FIT_COLUMNS,
    CatalogError,
    CosmosCatalog,
)
from btkjax.core.keys import stream_key
from btkjax.core.realgal import (
    RealSources,
    RealTables,
    RealTableSpec,
    make_real_sources,
    quintic_kernel,
    quintic_uval,
    real_pipeline,
    render_real,
)
from btkjax.core.render import RenderSpec
from btkjax.engine import map_chunks
from btkjax.galaxies import CatalogArrays
from btkjax.galsim_backend import render_cosmos_galsim
from btkjax.generator import DrawBlendsGenerator

__all__ = [
    "COSMOS_PIXEL_SCALE",
    "COSMOS_KINDS",
    "REAL_PAD_FACTOR",
    "EXCLUSION_LEVELS",
    "CosmosCatalog",
    "CosmosGenerator",
    "cosmos_parametric_arrays",
    "RealTableSpec",
    "RealTables",
    "RealSources",
    "real_galaxy_tables",
    "make_real_sources",
    "render_real",
    "render_cosmos_galsim",
    "quintic_kernel",
]

COSMOS_KINDS = ("sersic", "devaucouleurs", "exponential")
"""Components of a parametric COSMOS galaxy: single Sersic, or bulge + disk."""

_KVALUE_ACCURACY = galsim.GSParams().kvalue_accuracy  # GalSim's Deconvolve threshold (1e-5)
REAL_PAD_FACTOR = 4.0
"""Default oversampling of the real-galaxy k-tables (GalSim's InterpolatedImage pad_factor)."""
SHEAR_MARGIN = 0.3  # |g| whose stretch the real-galaxy tables cover when shears are applied


# ----------------------------------------------------------------------------------------------
# Parametric galaxies
# ----------------------------------------------------------------------------------------------
# Parametric galaxies
# ----------------------------------------------------------------------------------------------


def _round_sersic(n, prec=0.05):
    return np.floor(np.asarray(n) / prec + 0.5) * prec


def cosmos_parametric_arrays(table) -> CatalogArrays:
    """The COSMOS fits as renderer components [row, (sersic, devaucouleurs, exponential)].

    Follows GalSim's ``COSMOSCatalog._buildParametric`` (see the module docstring).
    """
    missing = [c for c in FIT_COLUMNS if c not in table.colnames]
    if missing:
        raise CatalogError(
            f"Parametric COSMOS galaxies need the fit columns {list(FIT_COLUMNS)}; this catalog "
            f"lacks {missing} (use gal_type='real', or a catalog with parametric fits)."
        )
    s = np.asarray(table["sersicfit"], dtype=float)
    b = np.asarray(table["bulgefit"], dtype=float)
    hlr = np.asarray(table["hlr"], dtype=float)
    flux = np.asarray(table["flux"], dtype=float)
    use_bulge = np.asarray(table["use_bulgefit"]).astype(bool)
    nrow = len(table)
    bulge_flux, disk_flux = flux[:, 1], flux[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        bfrac = bulge_flux / (bulge_flux + disk_flux)
    bad = np.flatnonzero(use_bulge & ~((bfrac >= 0) & (bfrac <= 1)))
    if len(bad):
        raise CatalogError(f"bulge-to-total flux ratio outside [0, 1] at rows {bad[:10].tolist()}.")
    ones = np.ones(nrow)
    frac = np.where(use_bulge[:, None], np.stack([0 * ones, bfrac, 1 - np.nan_to_num(bfrac)], 1),
                    np.stack([ones, 0 * ones, 0 * ones], 1))
    n_ser = _round_sersic(np.clip(s[:, 2], 0.3, 6.0))

    def q_of(q):  # GalSim shears only where q < 1
        return np.where(q < 1, q, 1.0)

    hlr_arr = np.stack([np.where(use_bulge, 1.0, hlr[:, 0]), np.where(use_bulge, hlr[:, 1], 1.0),
                        np.where(use_bulge, hlr[:, 2], 1.0)], 1)
    q_arr = np.stack([np.where(use_bulge, 1.0, q_of(s[:, 3])), np.where(use_bulge, q_of(b[:, 11]), 1.0),
                      np.where(use_bulge, q_of(b[:, 3]), 1.0)], 1)
    beta = np.stack([s[:, 7], b[:, 15], b[:, 7]], 1)
    n_arr = np.stack([np.where(use_bulge, 1.0, n_ser), 4 * ones, ones], 1)
    # components without flux get neutral shapes (the renderer ignores them)
    hlr_arr = np.where(frac > 0, hlr_arr, 1.0)
    bad = np.flatnonzero(((frac > 0) & ~(hlr_arr > 0)).any(axis=1))
    if len(bad):
        raise CatalogError(f"non-positive fit half-light radius at rows {bad[:10].tolist()}.")
    return CatalogArrays(frac=frac, hlr=hlr_arr, q=q_arr, beta=beta, n=n_arr)



# ----------------------------------------------------------------------------------------------
# Real galaxies: k-space tables (host, once per catalog)
# ----------------------------------------------------------------------------------------------


def _dft_matrix(n, scale, k):
    pos = (np.arange(n) - 0.5 * (n - 1)) * scale
    return np.exp(-1j * k[:, None] * pos[None, :])


def real_galaxy_tables(galsim_catalog, kmax: float, pad_factor: float = REAL_PAD_FACTOR,
                       rows=None):
    """Tabulates GalSim's RealGalaxy transform (image / HST PSF) per catalog row, on the host.

    Args:
        galsim_catalog: a `galsim.COSMOSCatalog` with real images (``getRealParams``).
        kmax: the largest |k| (rad/arcsec) that will be asked for.
        pad_factor: the grid spacing is ``2 pi / (pad_factor L)``, L the largest image side.
        rows: catalog indices (default all).

    Returns:
        (`RealTableSpec`, values [row, Ty, Tx] complex128 numpy, maxk [row] numpy).
    """
    rows = np.arange(galsim_catalog.getNObjects()) if rows is None else np.asarray(rows)
    params = []
    for i in rows:
        gal, psf, _, scale, _ = galsim_catalog.getRealParams(int(i))
        params.append((np.asarray(gal.array, dtype=float), np.asarray(psf.array, dtype=float),
                       float(gal.scale if gal.scale else scale), float(psf.scale or scale)))
    side = max(max(g.shape) * s for g, _, s, _ in params)
    dk = 2 * math.pi / (pad_factor * side)
    psf_maxk = np.array([
        galsim.InterpolatedImage(galsim.Image(p, scale=ps), flux=1.0).maxk
        for _, p, _, ps in params
    ])
    kmax = float(min(kmax, psf_maxk.max()))
    m = int(math.ceil(kmax / dk))
    n_neg, n_half = 3, m + 3
    spec = RealTableSpec(dk=dk, n_neg_x=n_neg, n_half_y=n_half, n_x=n_neg + m + 4, kmax=kmax)
    kx = (np.arange(spec.n_x) - n_neg) * dk
    ky = (np.arange(2 * n_half + 1) - n_half) * dk
    values = np.empty((len(rows),) + spec.shape, np.complex128)
    bad = []
    for r, (g, p, gs, ps) in enumerate(params):
        gk = _dft_matrix(g.shape[0], gs, ky) @ g @ _dft_matrix(g.shape[1], gs, kx).T
        pk = _dft_matrix(p.shape[0], ps, ky) @ p @ _dft_matrix(p.shape[1], ps, kx).T
        g0, p0 = g.sum(), p.sum()
        if not g0 > 0:
            bad.append(int(rows[r]))
            g0 = 1.0
        ug = quintic_uval(ky * gs / (2 * np.pi))[:, None] * quintic_uval(
            kx * gs / (2 * np.pi))[None, :]
        up = quintic_uval(ky * ps / (2 * np.pi))[:, None] * quintic_uval(
            kx * ps / (2 * np.pi))[None, :]
        orig_psf = pk * up / p0
        small = np.abs(orig_psf) < _KVALUE_ACCURACY
        inv = np.where(small, 1.0 / _KVALUE_ACCURACY, 1.0 / np.where(small, 1.0, orig_psf))
        values[r] = gk * ug / g0 * inv
    if bad:
        raise CatalogError(
            f"COSMOS rows {bad[:10]} have images whose pixels sum to <= 0: their flux cannot be "
            "set (GalSim's 'bad_stamp' exclusion removes such rows)."
        )
    return spec, values, psf_maxk


# ----------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------


def _base_spec(state) -> RenderSpec:
    """The survey's base render spec (the smallest box of its FFT-size ladder)."""
    spec = state.spec
    return spec(state.ladder[0]) if callable(spec) else spec


class _BandColumns(str):
    """A magnitude-column 'format string' that maps each band to its own column."""

    def __new__(cls, mapping: dict):
        obj = super().__new__(cls, "{survey}_{band}")
        obj.mapping = dict(mapping)
        return obj

    def format(self, *args, band=None, **kwargs):  # noqa: A003 - mimics str.format
        return self.mapping[band]


class CosmosGenerator(DrawBlendsGenerator):
    """Draws COSMOS galaxies, parametric fits or real HST images, as BTK's CosmosGenerator.

    Args:
        catalog: a `CosmosCatalog` (from `CosmosCatalog.from_file`).
        sampling_function, surveys, batch_size, stamp_size, cpus, verbose, add_noise, seed,
            save_path, backend, isolated, apply_shear, augment_data, channels_last, use_bar,
            dtype, chunk, devices: as `btkjax.draw_blends.DrawBlendsGenerator`. With
            ``devices``, parametric galaxies are sharded as CatSim's are; real galaxies run the
            single-device program on ``chunk`` blends per device (the k-tables replicated on
            every device), so the images are bit-identical to a single-device run.
        gal_type: "real" (default, BTK's) or "parametric".
        galsim_gsparams: GSParams of the GalSim backend (default GalSim's).
        real_pad_factor: oversampling of the real-galaxy k-tables (see the module docstring).

    Fluxes: galcheat's ``mag2counts`` of the ``{survey}_{band}`` column where the catalog has
    it, else of ``MAG`` (F814W), with a warning (once per catalog and survey).
    """

    compatible_catalogs = ("CosmosCatalog",)
    component_kinds = COSMOS_KINDS
    # As BTK: each galaxy is its catalog row's (makeGalaxy(btk_index)), with the flux of the
    # table's magnitude: edited magnitudes are drawn, btk_index is required.
    drawn_shape_columns = ()
    rows_need_index = True

    def __init__(self, catalog, sampling_function, surveys, batch_size: int = 8,
                 stamp_size: float = 24.0, cpus: int = 1, verbose: bool = False,
                 add_noise: str = "all", seed=None, save_path=None, backend: str = "jax",
                 isolated: bool = True, apply_shear: bool = False, augment_data: bool = False,
                 channels_last: bool = False, use_bar=None, dtype: str = "float32",
                 chunk: int = 32, gal_type: str = "real", galsim_gsparams=None,
                 real_pad_factor: float = REAL_PAD_FACTOR, devices=None):
        if gal_type not in ("real", "parametric"):
            raise ValueError(f"gal_type must be 'real' or 'parametric', got {gal_type!r}.")
        self.gal_type = gal_type
        self.galsim_gsparams = galsim_gsparams
        self.real_pad_factor = float(real_pad_factor)
        kwargs = {} if seed is None else {"seed": seed}
        super().__init__(catalog, sampling_function, surveys, batch_size=batch_size,
                         stamp_size=stamp_size, cpus=cpus, verbose=verbose, add_noise=add_noise,
                         save_path=save_path, backend=backend, isolated=isolated,
                         apply_shear=apply_shear, augment_data=augment_data,
                         channels_last=channels_last, use_bar=use_bar, dtype=dtype, chunk=chunk,
                         devices=devices, **kwargs)
        self._tables = None
        self._mesh_tables = None  # the k-tables replicated over the mesh (built once)
        if gal_type == "real" and backend == "jax":
            self._build_tables()

    # -- hooks of DrawBlendsGenerator -------------------------------------------------------

    def _mag_column(self, survey):
        mapping = self.catalog.band_magnitude_columns(survey)
        fallback = [b for b, c in mapping.items() if c == "ref_mag"]
        if fallback and survey.name not in self.catalog._warned_surveys:
            self.catalog._warned_surveys.add(survey.name)
            warnings.warn(
                f"The COSMOS catalog has no '{survey.name}_{{band}}' magnitude column for band(s) "
                f"{fallback} of {survey.name}: the F814W magnitude (MAG) is used for them.",
                stacklevel=4,
            )
        return _BandColumns(mapping)

    def _check_catalog_columns(self):
        catalog = self.catalog
        catalog.get_galsim_catalog()
        if self.gal_type == "parametric":
            cosmos_parametric_arrays(catalog.table[:1])
        else:
            real_cat = Table.read(catalog.real_file)
            folder = os.path.dirname(os.path.abspath(catalog.real_file))
            for col in ("GAL_FILENAME", "PSF_FILENAME"):
                for name in sorted(set(str(x).strip() for x in real_cat[col])):
                    if not os.path.exists(os.path.join(folder, name)):
                        raise FileNotFoundError(
                            f"Real COSMOS galaxies need {name!r} ({col}) beside "
                            f"{catalog.real_file}; it is missing (gal_type='parametric' needs "
                            "only the catalogs)."
                        )

    def _rows_arrays(self, rows) -> CatalogArrays:
        return CatalogArrays(*[np.asarray(a)[rows.source] for a in self.arrays])

    def _rows_extent(self, state, rows):
        return None if state.row_extent is None else state.row_extent[rows.source]

    def _set_rows(self, rows, start: int):
        super()._set_rows(rows, start)
        if self._tables is not None:
            n_extra = len(self._source_rows) - self._tables.maxk.shape[0]
            if n_extra > 0:  # room for edited rows, made at the first edit (~0.5 MB per row)
                self._tables = RealTables(*[extend_rows(a, n_extra) for a in self._tables])
            stop, src = start + rows.n_edited, jnp.asarray(rows.source)
            self._tables = RealTables(
                values=self._tables.values.at[start:stop].set(self._tables.values[src]),
                maxk=self._tables.maxk.at[start:stop].set(self._tables.maxk[src]))

    def _catalog_arrays(self) -> CatalogArrays:
        if self.gal_type == "parametric":
            return cosmos_parametric_arrays(self.catalog.table)
        n = len(self.catalog.table)
        ones = np.ones((n, len(COSMOS_KINDS)))
        return CatalogArrays(frac=ones / len(COSMOS_KINDS), hlr=ones, q=ones, beta=0 * ones,
                             n=ones)

    # -- real galaxies ------------------------------------------------------------------------

    def _build_tables(self):
        kmax = 0.0
        stretch = math.sqrt((1 + SHEAR_MARGIN) / (1 - SHEAR_MARGIN)) if self.apply_shear else 1
        for state in self._states.values():
            spec = _base_spec(state)
            # Larger boxes of the ladder have a finer dk: their grid's last index lies within
            # one base dk of the base grid's.
            kx = np.abs(spec.x_indices).max() * spec.dk + spec.dk
            ky = np.abs(spec.y_indices).max() * spec.dk + spec.dk
            kmax = max(kmax, math.hypot(kx, ky) * stretch)
        gcat = self.catalog.get_galsim_catalog()
        tspec, values, maxk = real_galaxy_tables(gcat, kmax, self.real_pad_factor)
        cdtype = jnp.complex128 if self.dtype == jnp.float64 else jnp.complex64
        self._tspec = tspec
        self._tables = RealTables(values=jnp.asarray(values, cdtype),
                                  maxk=jnp.asarray(maxk, self.dtype))
        # Folding: a real galaxy's light reaches the corner of its HST stamp (plus the PSF).
        half_diag = np.array([
            0.5 * math.hypot(*gcat.getRealParams(i)[0].array.shape) * COSMOS_PIXEL_SCALE
            for i in range(gcat.getNObjects())
        ])
        n_extra = len(self._source_rows) - len(half_diag)  # room for edited rows
        for state in self._states.values():
            if hasattr(state, "row_extent"):
                fwhm = max(float(state.survey.get_filter(b).psf_fwhm.to_value("arcsec"))
                           for b in state.bands)
                state.row_extent = extend_rows(half_diag + fwhm, n_extra)

    def _draw_survey(self, state, blends, blend_ids):
        if self.gal_type != "real" or self.backend != "jax":
            return super()._draw_survey(state, blends, blend_ids)
        psfs = state.new_batch()
        noise_key = stream_key(self._noise_key, state.stream)
        sky = jnp.asarray(state.sky, self.dtype)
        blends = jax.tree.map(np.asarray, blends)
        blend_ids = np.asarray(blend_ids)
        sizes = state.box_sizes(blends)
        n, s, n_band = len(blend_ids), state.stamp_pixels, len(state.bands)
        np_dtype = np.dtype(self.dtype)
        images = np.empty((n, n_band, s, s), np_dtype)
        iso = np.empty((n, self.max_number, n_band, s, s), np_dtype) if self.isolated else None
        chunk = self.chunk
        mesh = self._mesh
        tables, fluxes = self._tables, state.fluxes
        if mesh is not None:  # placed on the mesh once (replicated), sharded calls below
            fluxes, psf_ks, sky, noise_key, tables = self._replicated(
                mesh, state, sky, noise_key, [int(x) for x in np.unique(sizes)])
        with self._bar(state.name) as bar:
            for size in np.unique(sizes):
                rows = np.flatnonzero(sizes == size)
                spec = state.spec(int(size))
                psf_k = state.psf_k(int(size)) if mesh is None else psf_ks[int(size)]

                def write(task, out, rows=rows):
                    img, iso_part = out
                    images[rows[task.start:task.stop]] = img
                    if self.isolated:
                        iso[rows[task.start:task.stop]] = iso_part

                # `chunk` blends per call (per device with a mesh: the single-device program
                # on each, so the images do not depend on the number of devices)
                map_chunks(real_pipeline, len(rows), chunk,
                           (jax.tree.map(lambda a, r=rows: a[r], blends), blend_ids[rows]),
                           (tables, fluxes, psf_k, sky, noise_key),
                           (("tspec", self._tspec), ("spec", spec), ("mode", self.add_noise),
                            ("isolated", self.isolated), ("chunk", chunk)),
                           mesh=mesh, consume=write, on_progress=bar.update)
        return images, iso, psfs

    def _replicated(self, mesh, state, sky, noise_key, sizes):
        """The inputs every device needs whole, placed once on the mesh (replicated): the
        k-tables (built once per generator), the fluxes, the PSFs of the FFT `sizes`."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        replicated = NamedSharding(mesh, P())
        if self._mesh_tables is None:
            self._mesh_tables = jax.device_put(self._tables, replicated)
        psf_ks = {n: jax.device_put(state.psf_k(n), replicated) for n in sizes}
        fluxes, sky, noise_key = jax.device_put((state.fluxes, sky, noise_key), replicated)
        return fluxes, psf_ks, sky, noise_key, self._mesh_tables

    # -- GalSim backend -------------------------------------------------------------------------

    def _render_galsim(self, state, blends, psfs):
        blends = jax.tree.map(np.asarray, blends)
        gcat = self.catalog.get_galsim_catalog()
        args = (state.fluxes_host, psfs, _base_spec(state), self.gal_type, self.isolated,
                self.galsim_gsparams, np.float64, self._source_rows)
        if self.cpus == 1 or self.batch_size == 1:
            return render_cosmos_galsim(gcat, blends, *args)
        pool = self._process_pool()
        parts = np.array_split(np.arange(self.batch_size), self.cpus)
        futures = [
            pool.submit(render_cosmos_galsim, gcat, jax.tree.map(lambda a, p=p: a[p], blends),
                        *args)
            for p in parts if len(p)
        ]
        results = [f.result() for f in futures]
        images = np.concatenate([r[0] for r in results])
        iso = np.concatenate([r[1] for r in results]) if self.isolated else None
        return images, iso

    def config(self) -> dict:
        out = super().config()
        out["gal_type"] = self.gal_type
        return out
