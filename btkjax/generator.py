"""Generators of batches of blends: BTK's interface over the JAX renderer.

``next(generator)`` returns the tutorial's dict:

- ``blend_images``: [batch, band, y, x] (``channels_last=True``: [batch, y, x, band]);
- ``isolated_images``: [batch, max_number, band, y, x] (or [batch, max_number, y, x, band]);
- ``blend_list``: one astropy Table per blend, as the sampling function returned it, plus
  ``x_peak``, ``y_peak`` (pixels, 0-based), ``btk_rotation`` (degrees) and ``{band}_flux``
  (electrons) for every band of the survey;
- ``psf``: per band, the PSF object (GalSim) of the batch; ``psf_images``: [band, y, x] those
  PSFs drawn at the survey's pixel scale on the stamp;
- ``wcs``: the astropy WCS of the stamps.

With several surveys, each of these keys holds a dict keyed by survey name.

With the built-in samplers, a batch stays on the device from sampling to images: one jitted
function samples, gathers sources, renders and adds noise. Blend ``i`` (global index over all
batches) has its own keys, derived from the seeds and ``i``, so it is the same whatever the
batch size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table
from tqdm.auto import tqdm

from btkjax.blend_tables import EditedRows, extend_rows
from btkjax.catalog import Catalog
from btkjax.core.boxes import (
    MAX_FFT_SIZE,
    RowShapes,
    box_ladder,
    box_sizes,
    galaxy_reach,
    row_shapes,
)
from btkjax.core.keys import (
    DEFAULT_SEED,
    NOISE_STREAM,
    ROTATION_STREAM,
    blend_uniform,
    stream_key,
    survey_stream,
)
from btkjax.core.kinds import get_kind
from btkjax.core.noise import add_noise, check_noise_mode
from btkjax.core.render import CATSIM_KINDS, RenderSpec, render
from btkjax.core.samplers import Blends
from btkjax.core.step import simulate
from btkjax.engine import (
    HostThreads,
    blend_mesh,
    inner_batch,
    local_devices,
    map_chunks,
    padded_take,
    pieces,
    plan,
)
from btkjax.galaxies import CatalogArrays, band_fluxes, catsim_arrays, make_sources
from btkjax.galsim_backend import render_galsim
from btkjax.lazy_tables import lazy_blend_list
from btkjax.optics import make_render_spec, psf_fold_box, psf_kimage_from_galsim
from btkjax.sampling_functions import SamplingFunction, check_seed
from btkjax.simulation import make_step
from btkjax.survey import Survey, check_survey, evaluate_psf, get_mean_sky_level, make_wcs

__all__ = ["DrawBlendsGenerator", "CatsimGenerator", "BACKENDS", "PIPELINES"]

BACKENDS = ("jax", "galsim")
PIPELINES = ("auto", "boxes", "step")


class _SurveyState:
    """Everything a generator precomputes once per survey.

    FFT boxes: each blend is drawn in the smallest box of a ladder of fast sizes (N_0, ~1.25 N_0,
    ...) that keeps its galaxies' light (`btkjax.core.boxes.galaxy_reach`: flattened, sheared,
    off the stamp) and the PSF's wings (`btkjax.optics.psf_fold_box`) from folding back into the
    stamp above FOLDING_THRESHOLD. N_0 fits the PSF wings; larger galaxies get larger boxes, up
    to `btkjax.core.boxes.MAX_FFT_SIZE`. Each size compiles once; a blend's image depends only
    on its own galaxies.
    """

    def __init__(self, survey, catalog_table, arrays, stamp_size, kinds, dtype, mag_column,
                 max_shift):
        self.survey = survey
        self.name = survey.name
        self.bands = list(survey.available_filters)
        self.kinds = tuple(kinds)
        self.pixel_scale = float(survey.pixel_scale.to_value("arcsec"))
        self.stamp_pixels = int(stamp_size / self.pixel_scale)
        if self.stamp_pixels < 1:
            raise ValueError(
                f"stamp_size={stamp_size} arcsec is smaller than one {self.name} pixel "
                f"({self.pixel_scale} arcsec)."
            )
        self.wcs = make_wcs(self.pixel_scale, (self.stamp_pixels, self.stamp_pixels))
        self.mag_column = mag_column
        self.fluxes_host = band_fluxes(catalog_table, survey, mag_column)
        self.fluxes = jnp.asarray(self.fluxes_host, dtype)
        self.sky = np.array([get_mean_sky_level(survey, survey.get_filter(b)) for b in self.bands])
        self.static_psf = all(
            hasattr(survey.get_filter(b).psf, "drawKImage") for b in self.bands
        )
        self.dtype = dtype
        self.stream = survey_stream(self.name)
        self._psfs = self.batch_psfs()
        self._psfs_fresh = True
        fwhm = max(float(survey.get_filter(b).psf_fwhm.to_value("arcsec")) for b in self.bands)
        # Callable (random) PSFs may be wider than the first draw: allow 20% more.
        slack = 1.0 if self.static_psf else 1.2
        self.psf_fwhm = slack * fwhm
        self.shapes = row_shapes(kinds, arrays.hlr, arrays.q, arrays.n, arrays.frac > 0)
        self.row_extent = None  # fixed per-row extents, for real galaxies (btkjax.cosmos)
        psfs = self._psfs
        if slack != 1.0:  # random PSFs: size the box for a PSF 20% wider than the first draw
            psfs = [p.dilate(slack) if hasattr(p, "dilate") else p for p in psfs]
        self.base_box = psf_fold_box(psfs, self.stamp_pixels, self.pixel_scale, max_shift)
        self.ladder = [int(s) for s in box_ladder(self.base_box, 2 * self.stamp_pixels)]
        self._specs = {}
        self._psf_k = {}
        self._psf_images = None

    def reserve_rows(self, n_rows: int):
        """Room for `n_rows` rows past the catalog's: the rows sampling functions edit."""
        self.fluxes_host = extend_rows(self.fluxes_host, n_rows)
        self.fluxes = jnp.asarray(self.fluxes_host, self.dtype)
        self.shapes = RowShapes(*[extend_rows(a, n_rows) for a in self.shapes])
        if self.row_extent is not None:
            self.row_extent = extend_rows(self.row_extent, n_rows)

    def set_rows(self, start: int, table, extent=None, arrays: CatalogArrays | None = None):
        """Fluxes (from `table`'s magnitudes), box shapes (from `arrays`) and fixed extents (if
        the survey has them) of edited rows, from row `start` on."""
        stop = start + len(table)
        fluxes = band_fluxes(table, self.survey, self.mag_column)
        self.fluxes_host[start:stop] = fluxes
        self.fluxes = self.fluxes.at[start:stop].set(jnp.asarray(fluxes, self.dtype))
        new = row_shapes(self.kinds, arrays.hlr, arrays.q, arrays.n, arrays.frac > 0)
        for host, value in zip(self.shapes, new, strict=True):
            host[start:stop] = value
        if self.row_extent is not None and extent is not None:
            self.row_extent[start:stop] = extent

    def batch_psfs(self):
        return [evaluate_psf(self.survey, self.survey.get_filter(b)) for b in self.bands]

    def spec(self, fft_size: int, components=None) -> RenderSpec:
        """The render spec of a box size (of some of the components only, if given)."""
        key = (fft_size, components)
        if key not in self._specs:
            if components is None:
                self._specs[key] = make_render_spec(
                    self.stamp_pixels, self.pixel_scale, self._psfs, kinds=self.kinds,
                    fft_size=fft_size,
                )
            else:
                full = self.spec(fft_size)
                self._specs[key] = dataclasses.replace(
                    full, kinds=tuple(self.kinds[c] for c in components))
        return self._specs[key]

    def new_batch(self):
        """Evaluates PSF callables once per batch (static PSFs, their k-images and their
        images are kept)."""
        if not self.static_psf and not self._psfs_fresh:
            self._psfs = self.batch_psfs()
            self._psf_k = {}
            self._psf_images = None
        self._psfs_fresh = False
        return self._psfs

    def psf_images(self) -> np.ndarray:
        """The batch's PSFs drawn on the stamp [band, y, x] (cached while the PSFs are; each
        batch gets its own copy)."""
        if self._psf_images is None:
            self._psf_images = np.stack([
                p.drawImage(nx=self.stamp_pixels, ny=self.stamp_pixels,
                            scale=self.pixel_scale).array for p in self._psfs
            ])
        return self._psf_images.copy()

    def psf_k(self, fft_size: int):
        if fft_size not in self._psf_k:
            spec = self.spec(fft_size)
            cdtype = jnp.complex128 if self.dtype == jnp.float64 else jnp.complex64
            kimage = np.stack([psf_kimage_from_galsim(p, spec) for p in self._psfs])
            if np.all(kimage.imag == 0):  # centered, symmetric PSFs: real arithmetic
                self._psf_k[fft_size] = jnp.asarray(kimage.real, self.dtype)
            else:
                self._psf_k[fft_size] = jnp.asarray(kimage, cdtype)
        return self._psf_k[fft_size]

    def box_sizes(self, blends, per_galaxy: bool = False) -> np.ndarray:
        """The FFT size of each blend of a batch ([blend]), or of each galaxy ([blend, slot],
        0 in empty slots) with `per_galaxy` (host): the smallest ladder size that holds every
        galaxy's reach (the ladder grows as needed)."""
        mask = np.asarray(blends.mask)
        reach = galaxy_reach(self.shapes, blends.index, mask, blends.dx, blends.dy, blends.g1,
                             blends.g2, self.psf_fwhm, self.stamp_pixels * self.pixel_scale,
                             self.row_extent)
        if not per_galaxy:
            reach = reach.max(axis=1)
        need = np.maximum(box_sizes(reach, self.stamp_pixels, self.pixel_scale), self.base_box)
        if need.size and need.max() > MAX_FFT_SIZE:
            at = np.unravel_index(int(np.argmax(need)), need.shape)
            raise ValueError(
                f"{self.name}: the galaxies of blend {at[0]} of the batch reach "
                f"{float(reach[at]):.4g} arcsec from the stamp centre (shifts dx, dy up to "
                f"{float(np.abs(np.asarray(blends.dx)[at[0]]).max()):.4g}, "
                f"{float(np.abs(np.asarray(blends.dy)[at[0]]).max()):.4g} arcsec): holding their "
                f"light needs an FFT box of {int(need.max())} pixels, more than MAX_FFT_SIZE="
                f"{MAX_FFT_SIZE}. Keep galaxies within a few stamp sides of the stamp."
            )
        while need.size and self.ladder[-1] < need.max():
            self.ladder.extend(int(s) for s in box_ladder(self.ladder[-1], int(need.max()))[1:])
        ladder = np.asarray(self.ladder)
        sizes = ladder[np.searchsorted(ladder, need)]
        return np.where(mask, sizes, 0) if per_galaxy else sizes


class DrawBlendsGenerator(EditedRows):
    """Generates batches of blends: sampling, rendering, noise; BTK's interface.

    Args:
        catalog: a btkjax `Catalog`.
        sampling_function: a `SamplingFunction` (table in, table out); the built-in ones run on
            the device.
        surveys: a `Survey` or a list of them (multi-resolution: one output per survey).
        batch_size: blends per batch.
        stamp_size: stamp side in arcsec (shared by every survey).
        cpus: processes for host-side work (the GalSim backend).
        verbose: print what is done.
        add_noise: "all", "background", "galaxy" or "none" (BTK's semantics, `btkjax.noise`).
        seed: seed of the noise and of the augmentation rotations.
        save_path: folder where each batch is written (HDF5), or None.
        backend: "jax" (default) or "galsim" (the reference, on CPU).
        isolated: also draw each galaxy alone (``isolated_images``).
        apply_shear: shear galaxies by the blend tables' ``g1``, ``g2`` columns.
        augment_data: rotate each galaxy by a random angle, stored in ``btk_rotation``.
        channels_last: images as [.., y, x, band].
        use_bar: show a progress bar (default: for batches of 1000 blends or more).
        dtype: "float32" (default) or "float64" (needs ``jax_enable_x64``).
        chunk: blends rendered per compiled call (memory bound). Images agree to float
            rounding for any chunk and are bit-identical, blend by blend, for a given one.
        devices: shard the blend axis of the JAX pipeline over devices (`jax.sharding`): None
            (default: the default device, no sharding), "all" (every local device), an int (the
            first n local devices) or a sequence of `jax.Device`. Each device renders ``chunk``
            blends per call, with the same per-device program as a single-device run, and every
            blend's keys come from the seed and its global index: the images are bit-identical
            to a single-device run.
    """

    compatible_catalogs = ("Catalog",)
    component_kinds = CATSIM_KINDS

    def __init__(
        self,
        catalog: Catalog,
        sampling_function: SamplingFunction,
        surveys,
        batch_size: int = 8,
        stamp_size: float = 24.0,
        cpus: int = 1,
        verbose: bool = False,
        add_noise: str = "all",
        seed: int = DEFAULT_SEED,
        save_path: str | os.PathLike | None = None,
        backend: str = "jax",
        isolated: bool = True,
        apply_shear: bool = False,
        augment_data: bool = False,
        channels_last: bool = False,
        use_bar: bool | None = None,
        dtype: str = "float32",
        chunk: int = 8,
        devices=None,
        pipeline: str = "auto",
    ):
        if not isinstance(catalog, Catalog) or type(catalog).__name__ not in self.compatible_catalogs:
            raise TypeError(
                f"{type(self).__name__} needs a catalog of type {self.compatible_catalogs}, got "
                f"{type(catalog).__name__}."
            )
        if not callable(sampling_function):
            raise TypeError(
                f"sampling_function must be a SamplingFunction (callable table -> table), got "
                f"{type(sampling_function).__name__}."
            )
        self.surveys = self._check_surveys(surveys)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not stamp_size > 0:
            raise ValueError(f"stamp_size must be positive (arcsec), got {stamp_size!r}.")
        if not isinstance(cpus, (int, np.integer)) or cpus < 1:
            raise ValueError(f"cpus must be a positive integer, got {cpus!r}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        check_seed(seed)
        if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer (blends per compiled call), got "
                             f"{chunk!r}.")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}.")
        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                "dtype='float64' needs jax_enable_x64: call "
                "jax.config.update('jax_enable_x64', True) first."
            )
        sf_stamp = getattr(sampling_function, "stamp_size", stamp_size)
        if sf_stamp is not None and not math.isclose(float(sf_stamp), float(stamp_size)):
            raise ValueError(
                f"The sampling function's stamp_size ({sf_stamp}) differs from the generator's "
                f"({stamp_size}); give both the same value."
            )
        self.catalog = catalog
        self.sampling_function = sampling_function
        self.max_number = int(sampling_function.max_number)
        self.batch_size = int(batch_size)
        self.stamp_size = float(stamp_size)
        self.cpus = int(cpus)
        self.verbose = verbose
        self.add_noise = check_noise_mode(add_noise)
        self.seed = int(seed)
        self.save_path = None if save_path is None else os.fspath(save_path)
        if self.save_path is not None and not os.path.isdir(self.save_path):
            raise FileNotFoundError(f"save_path {self.save_path!r} is not an existing folder.")
        self.backend = backend
        self.isolated = bool(isolated)
        self.apply_shear = bool(apply_shear)
        self.augment_data = bool(augment_data)
        self.channels_last = bool(channels_last)
        self.use_bar = use_bar
        self.dtype = jnp.float64 if dtype == "float64" else jnp.float32
        self.chunk = int(chunk)
        self.devices = local_devices(devices)
        self._mesh = blend_mesh(self.devices)
        self.batch_index = 0
        self._pool = None  # GalSim backend processes, started on first use (close() stops them)
        self._threads = HostThreads(name="btkjax-render")

        self._check_catalog_columns()
        self.arrays = self._catalog_arrays()
        self.arrays_device = CatalogArrays(*[jnp.asarray(a, self.dtype) for a in self.arrays])
        self._jax_sampler = None
        # Built-in samplers sample on the device, for either backend (so that both backends
        # draw the same blends from the same seed).
        self._has_shear_columns = hasattr(sampling_function, "shear")
        if getattr(sampling_function, "has_jax_sampler", False):
            if self.apply_shear and not self._has_shear_columns:
                raise ValueError(
                    f"apply_shear=True needs a sampling function that sets 'g1' and 'g2' "
                    f"columns; {type(sampling_function).__name__} does not (use "
                    "DefaultSamplingShear or a custom one)."
                )
            self._jax_sampler = sampling_function.jax_sampler(catalog.table)
        self._states = {
            s.name: _SurveyState(
                s, catalog.table, self.arrays, self.stamp_size, self.component_kinds, self.dtype,
                self._mag_column(s), self._max_shift(),
            )
            for s in self.surveys
        }
        # Sampling functions run on the host may edit rows: room for a batch of them.
        self._n_catalog = len(catalog.table)
        if self._jax_sampler is None:
            self._reserve_rows(self.batch_size * self.max_number)
        # the catalog row each row of the arrays was made from (edited rows: their btk_index)
        self._source_rows = np.arange(len(self.arrays.frac))
        self._noise_key = stream_key(jax.random.key(self.seed), NOISE_STREAM)
        self._rotation_key = stream_key(jax.random.key(self.seed), ROTATION_STREAM)
        self.pipeline = self._choose_pipeline(pipeline)
        self._steps = {}
        if self.pipeline == "step":
            for s in self.surveys:
                step = make_step(catalog, s, sampling_function, noise=self.add_noise,
                                 psf="survey", isolated=self.isolated,
                                 augment=self.augment_data, apply_shear=self.apply_shear,
                                 dtype=dtype, chunk=inner_batch(self.chunk),
                                 stamp_size=self.stamp_size)
                self._steps[s.name] = (step, step.keys(self.seed))

    # -- set-up ------------------------------------------------------------------------------

    def _choose_pipeline(self, pipeline: str) -> str:
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}.")
        why_not = None
        if self.backend != "jax":
            why_not = f"backend={self.backend!r}"
        elif self._jax_sampler is None:
            why_not = f"{type(self.sampling_function).__name__} has no JAX sampler"
        elif (tuple(self.component_kinds) != CATSIM_KINDS
              or type(self)._catalog_arrays is not DrawBlendsGenerator._catalog_arrays):
            why_not = f"{type(self).__name__} does not draw CatSim galaxies"
        elif not all(st.static_psf for st in self._states.values()):
            why_not = "a survey's PSF is a callable (evaluated per batch)"
        if pipeline == "step" and why_not is not None:
            raise ValueError(f"pipeline='step' cannot be used: {why_not}; use 'boxes'.")
        if pipeline == "auto":
            return "step" if why_not is None and jax.default_backend() != "cpu" else "boxes"
        return pipeline

    @staticmethod
    def _check_surveys(surveys) -> list[Survey]:
        if isinstance(surveys, Survey):
            surveys = [surveys]
        if not isinstance(surveys, (list, tuple)) or not surveys:
            raise TypeError(f"surveys must be a Survey or a non-empty list of them, got {surveys!r}.")
        for s in surveys:
            if not isinstance(s, Survey):
                raise TypeError(
                    f"surveys must hold btkjax.survey.Survey objects (from get_surveys), got "
                    f"{type(s).__name__}."
                )
            check_survey(s)  # pixel scale, PSF fluxes
        names = [s.name for s in surveys]
        if len(set(names)) != len(names):
            raise ValueError(f"Each survey may appear once; got {names}.")
        return list(surveys)

    def _max_shift(self) -> float:
        """Largest |dx|, |dy| the sampling function may produce (arcsec)."""
        shift = getattr(self.sampling_function, "max_shift", None)
        return float(shift) if shift is not None else self.stamp_size / 2

    def _mag_column(self, survey) -> str:
        return "{band}_ab"

    def _check_catalog_columns(self):
        for s in self.surveys:
            for band in s.available_filters:
                col = self._mag_column(s).format(band=band, survey=s.name)
                if col not in self.catalog.table.colnames:
                    raise ValueError(
                        f"Band {band!r} of survey {s.name} has no magnitude column {col!r} in "
                        f"the catalog (its magnitude columns are "
                        f"{[c for c in self.catalog.table.colnames if c.endswith('_ab')]})."
                    )

    def _catalog_arrays(self) -> CatalogArrays:
        return catsim_arrays(self.catalog.table)

    def __iter__(self):
        return self

    # -- one batch -----------------------------------------------------------------------------

    def _sample_tables(self, blend_ids):
        """Blends from the sampling function: on device if it has a JAX sampler."""
        if self._jax_sampler is not None:
            blends = self._jax_sampler.sample(None, jnp.asarray(blend_ids))
            if not self.apply_shear:
                blends = blends._replace(g1=jnp.zeros_like(blends.g1), g2=jnp.zeros_like(blends.g2))
            if self.augment_data:
                blends = blends._replace(rotation=self._rotations(blend_ids, blends.mask))
            return blends, None
        tables = []
        for i in range(len(blend_ids)):
            table = self.sampling_function(self.catalog.table)
            if (self.apply_shear and isinstance(table, Table)
                    and not {"g1", "g2"} <= set(table.colnames)):
                raise ValueError(
                    "apply_shear=True needs 'g1' and 'g2' columns in the sampling function's "
                    f"tables; blend {int(blend_ids[i])} has {table.colnames}."
                )
            tables.append(table)
        blends = self._host_blends(tables, blend_ids)
        if not self.apply_shear:
            blends = blends._replace(g1=np.zeros_like(blends.g1), g2=np.zeros_like(blends.g2))
        if self.augment_data:
            blends = blends._replace(
                rotation=np.asarray(self._rotations(blend_ids, jnp.asarray(blends.mask)))
            )
        return blends, tables

    def _rotations(self, blend_ids, mask):
        rot = blend_uniform(self._rotation_key, blend_ids, (mask.shape[1],), 0.0, 360.0)
        return jnp.where(mask, rot, 0.0)

    def _draw_survey(self, state: _SurveyState, blends: Blends, blend_ids):
        psfs = state.new_batch()
        noise_key = stream_key(self._noise_key, state.stream)
        sky = jnp.asarray(state.sky, self.dtype)
        if self.backend == "galsim":
            images, iso = self._render_galsim(state, blends, psfs)
            images = np.asarray(add_noise(noise_key, jnp.asarray(blend_ids),
                                          jnp.asarray(images, self.dtype), sky, self.add_noise))
            return images, iso, psfs
        s = state.stamp_pixels
        n_band = len(state.bands)
        np_dtype = np.dtype(self.dtype)
        if self.isolated:
            with self._bar(state.name) as bar:
                images, iso = self._render_galaxies(state, blends, blend_ids, sky, noise_key)
                bar.update(len(blend_ids))
            return images, iso, psfs
        sizes = state.box_sizes(blends)
        images = np.empty((len(blend_ids), n_band, s, s), np_dtype)
        with self._bar(state.name) as bar:
            for size in np.unique(sizes):
                rows = np.flatnonzero(sizes == size)
                sub = jax.tree.map(lambda a, r=rows: np.asarray(a)[r], blends)
                ids = np.asarray(blend_ids)[rows]
                img, _ = _render_calls(
                    sub, ids, self.arrays_device, state.fluxes, state.psf_k(int(size)), sky,
                    noise_key, state.spec(int(size)), self.add_noise, False,
                    self._chunk_for(state, int(size)), self._threads, mesh=self._mesh,
                )
                bar.update(len(rows))
                images[rows] = img
        return images, None, psfs

    @property
    def simulation_steps(self) -> dict:
        """With ``pipeline="step"``: per survey name, the (`btkjax.simulation.SimulationStep`,
        `btkjax.core.step.StepKeys`) this generator draws with (call them in your own jit to
        get its blends on the device); empty otherwise."""
        return dict(self._steps)

    def _draw_step(self, state, blend_ids):
        """A batch of one survey by the simulation step, in the engine's padded calls of
        `chunk` blends (per device with `devices`): images, iso, PSFs and the sampled blends."""
        step, keys = self._steps[state.name]
        psfs = state.new_batch()
        with self._bar(state.name) as bar:
            images, iso, blends = map_chunks(
                _step_call, len(blend_ids), self.chunk, (np.asarray(blend_ids),),
                (step.arrays, keys), (("spec", step.spec),), mesh=self._mesh,
                on_progress=bar.update)
        return images, iso, psfs, blends

    def _render_galaxies(self, state, blends, blend_ids, sky, noise_key):
        """Isolated images of the occupied slots only, each galaxy in the FFT box its own light
        needs (``chunk * max_number`` galaxies per compiled call), then each blend as the sum
        of its galaxies and its noise. Empty slots cost nothing; a galaxy's image depends only
        on the galaxy."""
        mask = np.asarray(blends.mask)
        n_rows, n_slot = mask.shape
        s = state.stamp_pixels
        n_band = len(state.bands)
        dtype = np.dtype(self.dtype)
        sizes = state.box_sizes(blends, per_galaxy=True)
        host = [np.asarray(a) for a in blends]
        blend_ids = np.asarray(blend_ids)
        iso = np.zeros((n_rows, n_slot, n_band, s, s), dtype)
        # Galaxies without flux in their costly components (a de Vaucouleurs or Sersic bulge:
        # the table lookups) are drawn by a program without them.
        costly = tuple(c for c, k in enumerate(state.kinds) if get_kind(k).costly)
        cheap = tuple(c for c in range(len(state.kinds)) if c not in costly)
        lacks = np.zeros(mask.shape, bool)
        if costly and cheap:
            frac = np.asarray(self.arrays.frac)[host[0]]  # [blend, slot, comp]
            lacks = np.all(frac[..., list(costly)] == 0, axis=-1)
        groups = []  # (size, components, rows, slots, galaxies, galaxies per call)
        for size in np.unique(sizes[mask]):
            for reduced in (False, True):
                b_idx, s_idx = np.nonzero(mask & (sizes == size) & (lacks == reduced))
                if len(b_idx):
                    comps = cheap if reduced else None
                    state.spec(int(size), comps), state.psf_k(int(size))  # once, on this thread
                    groups.append((int(size), comps, b_idx, s_idx,
                                   Blends(*[a[b_idx, s_idx][:, None] for a in host]),
                                   self._chunk_for(state, int(size),
                                                   self.chunk * self.max_number)))
        if self._mesh is not None:
            for size, comps, b_idx, s_idx, galaxies, per_call in groups:
                iso[b_idx, s_idx], _ = _render_calls(
                    galaxies, blend_ids[b_idx], self.arrays_device, state.fluxes,
                    state.psf_k(size), sky, noise_key, state.spec(size, comps), "none", False,
                    per_call, self._threads, mesh=self._mesh, components=comps,
                )
            images = _sum_slots(iso, self._threads)
            return _noise_calls(noise_key, blend_ids, images, sky, self.add_noise,
                                self.chunk, self._threads), iso
        # Single device: every group's calls run concurrently on the host threads (one task
        # list), each copying its galaxies into `iso` (disjoint slots); the blends are then
        # the sums over slots, in slot order, and their noise.
        tasks = []
        for size, comps, b_idx, s_idx, galaxies, per_call in groups:
            unit = inner_batch(per_call)
            tasks += [(size, comps, galaxies, b_idx, s_idx, task, unit)
                      for task in plan(len(b_idx), per_call, unit)]

        def run(item):
            size, comps, galaxies, b_idx, s_idx, task, unit = item
            take = padded_take(task)
            part = jax.tree.map(lambda a, t=take: a[t], galaxies)
            img, _ = _pipeline(part, blend_ids[b_idx[take]], self.arrays_device, state.fluxes,
                               state.psf_k(size), sky, noise_key, state.spec(size, comps),
                               "none", False, task.size, unit, comps)
            k = task.stop - task.start
            iso[b_idx[task.start:task.stop], s_idx[task.start:task.stop]] = np.asarray(img)[:k]

        self._threads.run(run, tasks)
        images = _sum_slots(iso, self._threads)
        return _noise_calls(noise_key, blend_ids, images, sky, self.add_noise, self.chunk,
                            self._threads), iso

    def _chunk_for(self, state, fft_size: int, per_call: int | None = None) -> int:
        """Items per compiled call for an FFT size: `per_call` (default `chunk` blends) for the
        smallest box, fewer for larger ones in proportion to the box's area (bounded memory and
        work per call), rounded down to a power of two."""
        per_call = self.chunk if per_call is None else per_call
        ratio = (state.ladder[0] / fft_size) ** 2
        return max(1, 2 ** int(math.floor(math.log2(max(per_call * ratio, 1)))))

    def _bar(self, name):
        show = self.use_bar if self.use_bar is not None else self.batch_size >= 1000
        return tqdm(total=self.batch_size, desc=f"Generating blends for {name} survey",
                    disable=not show)


    def _render_galsim(self, state, blends, psfs):
        sources = make_sources(jax.tree.map(jnp.asarray, blends), self.arrays_device, state.fluxes)
        sources = jax.tree.map(np.asarray, sources)
        if self.cpus == 1 or self.batch_size == 1:
            return render_galsim(sources, psfs, state.spec(state.ladder[0]), isolated=self.isolated)
        pool = self._process_pool()
        parts = np.array_split(np.arange(self.batch_size), self.cpus)
        futures = [
            pool.submit(
                render_galsim, jax.tree.map(lambda a, p=p: a[p], sources), psfs,
                state.spec(state.ladder[0]),
                self.isolated,
            )
            for p in parts if len(p)
        ]
        results = [f.result() for f in futures]
        images = np.concatenate([r[0] for r in results])
        iso = np.concatenate([r[1] for r in results]) if self.isolated else None
        return images, iso

    def _blend_tables(self, blends: Blends, tables, state: _SurveyState):
        """One astropy table per blend with x_peak, y_peak and per-band fluxes for a survey, as
        a `LazyBlendList` (built on first access; `btkjax.lazy_tables.lazy_blend_list`)."""
        shear = self._jax_sampler.shear if self._has_shear_columns and tables is None else None
        return lazy_blend_list(blends, self.catalog.table, tables, state.wcs, state.fluxes_host,
                            state.bands, shear)

    def __next__(self) -> dict:
        blend_ids = np.arange(self.batch_size) + self.batch_index * self.batch_size
        blends = tables = None
        if self.pipeline != "step":  # the step samples on the device itself
            blends, tables = self._sample_tables(blend_ids)
        out = {k: {} for k in ("blend_images", "isolated_images", "blend_list", "psf",
                               "psf_images", "wcs")}
        for state in self._states.values():
            if self.pipeline == "step":
                images, iso, psfs, blends = self._draw_step(state, blend_ids)
            else:
                images, iso, psfs = self._draw_survey(state, blends, blend_ids)
            images = np.asarray(images)
            iso = None if iso is None else np.asarray(iso)
            if self.channels_last:
                images = np.moveaxis(images, 1, -1)
                iso = None if iso is None else np.moveaxis(iso, 2, -1)
            out["blend_images"][state.name] = images
            out["isolated_images"][state.name] = iso
            out["blend_list"][state.name] = self._blend_tables(blends, tables, state)
            out["psf"][state.name] = psfs
            out["psf_images"][state.name] = state.psf_images()
            out["wcs"][state.name] = state.wcs
        self.batch_index += 1
        if len(self._states) == 1:
            out = {k: next(iter(v.values())) for k, v in out.items()}
        if self.save_path is not None:
            from btkjax.utils import save_blend_batch

            save_blend_batch(self.save_path, self.batch_index - 1, out, self.config())
        return out

    def config(self) -> dict:
        """The generator's settings (saved beside every batch)."""
        return {
            "generator": type(self).__name__,
            "catalog": type(self.catalog).__name__,
            "sampling_function": type(self.sampling_function).__name__,
            "surveys": [s.name for s in self.surveys],
            "batch_size": self.batch_size,
            "stamp_size": self.stamp_size,
            "add_noise": self.add_noise,
            "seed": self.seed,
            "backend": self.backend,
            "isolated": self.isolated,
            "apply_shear": self.apply_shear,
            "augment_data": self.augment_data,
            "channels_last": self.channels_last,
            "dtype": np.dtype(self.dtype).name,
            "pipeline": self.pipeline,
        }

    def close(self):
        """Stops the generator's host threads and GalSim processes (started on first use; a
        later batch starts them again). Also on leaving a ``with`` block."""
        self._threads.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _process_pool(self):
        """The GalSim backend's process pool (spawned on first use; stopped by `close`, or by a
        finalizer when the generator is collected)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.cpus, mp_context=get_context("spawn"))
            weakref.finalize(self, _shutdown_pool, self._pool)
        return self._pool


@partial(jax.jit, static_argnames=("spec", "mode", "isolated", "chunk", "inner", "components"))
def _pipeline(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key, spec, mode, isolated,
              chunk, inner=None, components=None):
    sources = make_sources(blends, arrays, fluxes)
    if components is not None:  # only these components (the others have no flux)
        comps = np.asarray(components)
        sources = sources._replace(
            flux=sources.flux[..., comps], hlr=sources.hlr[..., comps],
            q=sources.q[..., comps], beta=sources.beta[..., comps], n=sources.n[..., comps])
    images, iso = render(sources, psf_k, spec, isolated=isolated,
                         chunk=chunk if inner is None else inner)
    images = add_noise(noise_key, blend_ids, images, sky, mode)
    return images, iso


def _step_call(blend_ids, arrays, keys, spec):
    """The generator's use of the step: images, isolated images and the sampled blends."""
    out = simulate(arrays, keys, blend_ids, spec)
    return out.images, out.isolated, out.blends


def _shutdown_pool(pool):
    pool.shutdown(wait=False, cancel_futures=True)


def _render_calls(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key, spec, mode,
                  isolated, chunk, threads, mesh=None, components=None, consume=None,
                  on_progress=None):
    """`_pipeline` over `blends` in the engine's padded calls of `chunk` items (a multiple of
    `inner_batch`; with a `mesh`, per device): one compiled shape per FFT size serves every batch, so
    an item is bit-identical in any batch. Returns host (numpy) (images, iso or None)."""
    unit = inner_batch(chunk)
    piece = pieces(1, chunk, unit)[0]
    static = (("spec", spec), ("mode", mode), ("isolated", isolated), ("chunk", piece),
              ("inner", unit), ("components", components))
    return map_chunks(_pipeline, len(blend_ids), piece, (blends, np.asarray(blend_ids)),
                      (arrays, fluxes, psf_k, sky, noise_key), static, unit=1,
                      threads=threads, mesh=mesh, consume=consume, on_progress=on_progress)


def _sum_slots(iso, threads):
    """The blends: sums of their isolated images over slots (in slot order), [blend, band, y,
    x], computed on the host threads (numpy releases the GIL in reductions)."""
    n = iso.shape[0]
    out = np.empty((n,) + iso.shape[2:], iso.dtype)
    parts = max(1, min(threads.threads, n))
    bounds = np.linspace(0, n, parts + 1).astype(int)

    def run(k):
        lo, hi = bounds[k], bounds[k + 1]
        np.sum(iso[lo:hi], axis=1, out=out[lo:hi])

    threads.run(run, list(range(parts)))
    return out


def _noise_calls(noise_key, blend_ids, images, sky, mode, chunk, threads):
    """`add_noise` over host images in the engine's padded calls of `chunk` blends, on the host
    threads; returns a new host array."""
    if mode == "none":
        return images
    out = np.empty_like(images)

    def write(task, noisy):
        out[task.start:task.stop] = noisy

    map_chunks(_noise, len(blend_ids), chunk, (np.asarray(blend_ids), images),
               (noise_key, sky), (("mode", mode),), threads=threads, consume=write)
    return out


def _noise(blend_ids, images, key, sky, mode):
    return add_noise(key, blend_ids, images, sky, mode)


class CatsimGenerator(DrawBlendsGenerator):
    """Draws CatSim-like galaxies (disk + bulge + AGN) as BTK does. See `DrawBlendsGenerator`."""

    compatible_catalogs = ("CatsimCatalog",)


