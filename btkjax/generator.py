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
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table, vstack
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
from btkjax.core.keys import DEFAULT_SEED
from btkjax.core.kinds import get_kind
from btkjax.core.render import CATSIM_KINDS, RenderSpec, render
from btkjax.core.samplers import Blends
from btkjax.galaxies import CatalogArrays, band_fluxes, catsim_arrays, make_sources
from btkjax.galsim_backend import render_galsim
from btkjax.noise import add_noise, check_noise_mode
from btkjax.optics import make_render_spec, psf_fold_box, psf_kimage_from_galsim
from btkjax.sampling_functions import SamplingFunction, check_seed
from btkjax.survey import Survey, check_survey, evaluate_psf, get_mean_sky_level, make_wcs

__all__ = ["DrawBlendsGenerator", "CatsimGenerator", "BACKENDS"]

BACKENDS = ("jax", "galsim")

# Stream tags folded into the seed so that sampling, rotation and noise never share randomness.
_NOISE_STREAM = 1
_ROTATION_STREAM = 2


def _survey_stream(name: str) -> int:
    """A stable integer per survey name (Python's hash() is salted per process)."""
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2**31 - 1)


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
        self.stream = _survey_stream(self.name)
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
        """Evaluates PSF callables once per batch (static PSFs are kept)."""
        if not self.static_psf and not self._psfs_fresh:
            self._psfs = self.batch_psfs()
            self._psf_k = {}
        self._psfs_fresh = False
        return self._psfs

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
        self.devices = _local_devices(devices)
        self._mesh = (None if self.devices is None
                      else jax.sharding.Mesh(np.array(self.devices), ("blend",)))
        self.batch_index = 0
        self._pool = None

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
        self._noise_key = jax.random.fold_in(jax.random.key(self.seed), _NOISE_STREAM)
        self._rotation_key = jax.random.fold_in(jax.random.key(self.seed), _ROTATION_STREAM)

    # -- set-up ------------------------------------------------------------------------------

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
        keys = jax.vmap(lambda i: jax.random.fold_in(self._rotation_key, i))(jnp.asarray(blend_ids))
        rot = jax.vmap(lambda k: jax.random.uniform(k, (mask.shape[1],), minval=0, maxval=360))(keys)
        return jnp.where(mask, rot, 0.0)

    def _draw_survey(self, state: _SurveyState, blends: Blends, blend_ids):
        psfs = state.new_batch()
        noise_key = jax.random.fold_in(self._noise_key, state.stream)
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
                img, _ = _render_batch(
                    sub, ids, self.arrays_device, state.fluxes, state.psf_k(int(size)), sky,
                    noise_key, state.spec(int(size)), self.add_noise, False,
                    self._chunk_for(state, int(size)), bar, mesh=self._mesh,
                )
                images[rows] = np.asarray(img)
        return images, None, psfs

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
                iso[b_idx, s_idx], _ = _render_batch(
                    galaxies, blend_ids[b_idx], self.arrays_device, state.fluxes,
                    state.psf_k(size), sky, noise_key, state.spec(size, comps), "none", False,
                    per_call, _NoBar(), mesh=self._mesh, components=comps,
                )
            images = _sum_slots(iso)
            return _noise_batch(noise_key, blend_ids, images, sky, self.add_noise,
                                self.chunk), iso
        # Single device: calls run concurrently on the host threads, each copying its galaxies
        # into `iso` (disjoint slots); the blends are then the sums over slots, in slot order,
        # and their noise.
        tasks = []
        for size, comps, b_idx, s_idx, galaxies, per_call in groups:
            unit, start = _unit(per_call), 0
            for piece in _pieces(len(b_idx), per_call, unit):
                stop = min(start + piece, len(b_idx))
                tasks.append((size, comps, galaxies, b_idx, s_idx, start, stop, piece, unit))
                start = stop

        def run(task):
            size, comps, galaxies, b_idx, s_idx, start, stop, piece, unit = task
            take = np.arange(start, start + piece).clip(max=stop - 1)  # padded: repeats
            part = jax.tree.map(lambda a, t=take: a[t], galaxies)
            img, _ = _pipeline(part, blend_ids[b_idx[take]], self.arrays_device, state.fluxes,
                               state.psf_k(size), sky, noise_key, state.spec(size, comps),
                               "none", False, piece, unit, comps)
            iso[b_idx[start:stop], s_idx[start:stop]] = np.asarray(img)[: stop - start]

        _run_tasks(run, tasks)
        images = _sum_slots(iso)
        return _noise_batch(noise_key, blend_ids, images, sky, self.add_noise, self.chunk), iso

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
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.cpus, mp_context=get_context("spawn"))
        parts = np.array_split(np.arange(self.batch_size), self.cpus)
        futures = [
            self._pool.submit(
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
        """One astropy table per blend with x_peak, y_peak and per-band fluxes for a survey."""
        index = np.asarray(blends.index)
        mask = np.asarray(blends.mask)
        counts = mask.sum(axis=1)
        rows = index[mask]
        if tables is None:
            big = self.catalog.table[rows]
            big["ra"] = np.asarray(blends.dx)[mask]
            big["dec"] = np.asarray(blends.dy)[mask]
            big["btk_index"] = rows
            if self._has_shear_columns:
                big["g1"] = np.asarray(self._jax_sampler.shear[0] + 0 * big["ra"])
                big["g2"] = np.asarray(self._jax_sampler.shear[1] + 0 * big["ra"])
        else:
            big = vstack([t for t in tables if len(t)], metadata_conflicts="silent") if rows.size else Table()
        big["btk_rotation"] = np.asarray(blends.rotation, dtype=float)[mask]
        if rows.size:
            x, y = state.wcs.world_to_pixel_values(
                np.asarray(big["ra"], dtype=float) / 3600, np.asarray(big["dec"], dtype=float) / 3600
            )
            big["x_peak"], big["y_peak"] = x, y
            fluxes = state.fluxes_host[rows]
            for b, band in enumerate(state.bands):
                big[f"{band}_flux"] = fluxes[:, b]
        ends = np.cumsum(counts)
        starts = ends - counts
        return [big[s:e] for s, e in zip(starts, ends, strict=False)]

    def __next__(self) -> dict:
        blend_ids = np.arange(self.batch_size) + self.batch_index * self.batch_size
        blends, tables = self._sample_tables(blend_ids)
        out = {k: {} for k in ("blend_images", "isolated_images", "blend_list", "psf",
                               "psf_images", "wcs")}
        for state in self._states.values():
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
            out["psf_images"][state.name] = np.stack([
                p.drawImage(nx=state.stamp_pixels, ny=state.stamp_pixels,
                            scale=state.pixel_scale).array for p in psfs
            ])
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
        }

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


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


def _local_devices(devices):
    """The devices of the `devices` option of a generator (None: no sharding)."""
    if devices is None:
        return None
    local = jax.local_devices()
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices must be None, 'all', an int or a list of devices, got "
                             f"{devices!r}.")
        return list(local)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices} but this process has {len(local)} local "
                             f"device(s): {local}.")
        return list(local[: int(devices)])
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be None, 'all', an int or a non-empty list of "
                        f"jax.Device, got {devices!r}.")
    return devices


_SHARDED = {}


def _sharded_pipeline(mesh, spec, mode, isolated, chunk, inner=None, components=None):
    """`_pipeline` with its blend axis split over `mesh` ("blend"): each device runs the
    single-device program on its own `chunk` blends (shard_map), so results do not depend on
    the number of devices."""
    key = (mesh, spec, mode, isolated, chunk, inner, components)
    if key not in _SHARDED:
        from jax.sharding import PartitionSpec as P

        def body(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key):
            return _pipeline(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key, spec,
                             mode, isolated, chunk, inner, components)

        blend = P("blend")
        _SHARDED[key] = jax.jit(jax.shard_map(
            body, mesh=mesh, in_specs=(blend, blend, P(), P(), P(), P(), P()),
            out_specs=blend, check_vma=False))
    return _SHARDED[key]


_CPU_INNER = 2
"""Items (blends or galaxies) a compiled call renders at once inside its loop on CPU: the
k-images, transforms and images of two galaxies (~1.4 MB in 6 bands) stay in the core's cache,
where a vmap over a whole call streams through memory (2.3x the time per galaxy, measured:
LSST, 120-pixel boxes)."""

_POOL = None


def _host_threads() -> int:
    """Calls run concurrently from this many host threads on the CPU backend: one per core, so
    that each call runs on one core, in cache, instead of splitting every small operation over
    the cores, plus one, so that no core idles while a thread dispatches a call or copies its
    images out (+7% over one per core, measured on 2 cores); one on accelerators."""
    if jax.default_backend() != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        cores = os.cpu_count() or 1
    return max(1, cores) + 1


def _unit(chunk: int) -> int:
    """The batch of the loop body of the compiled calls of `chunk` items: `_CPU_INNER` on CPU
    (cache-sized), an eighth of the call on accelerators (which want wide batches)."""
    if jax.default_backend() == "cpu":
        return min(_CPU_INNER, chunk)
    return max(1, chunk // 8)


def _run_tasks(fn, tasks):
    """``[fn(t) for t in tasks]``, on `_host_threads` threads (results in order; the first
    exception is raised). The results do not depend on the threads: each task is a pure
    compiled call on its own items."""
    global _POOL
    threads = _host_threads()
    if threads == 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    if _POOL is None or _POOL._max_workers != threads:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(threads, thread_name_prefix="btkjax-render")
    return list(_POOL.map(fn, tasks))


def _pieces(n: int, chunk: int, unit: int = 1) -> list[int]:
    """Sizes of the compiled calls that cover `n` items: calls of `chunk` (a multiple of `unit`),
    the last one padded. One shape per FFT size: a galaxy's image is then computed by the very
    same program whatever the batch (XLA's code, hence its last-bit rounding, can depend on the
    shapes), so blend i is bit-identical in a batch of 1 or 1000. `_chunk_for` keeps the
    padding small by shrinking calls in proportion to the box's area."""
    chunk = max(unit, chunk // unit * unit)
    return [chunk] * (-(-n // chunk))


def _render_batch(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key, spec, mode,
                  isolated, chunk, bar, mesh=None, components=None):
    """Runs the jitted pipeline over blends in `_pieces` of at most `chunk` (the last one
    padded, so that a few compilations per FFT size serve every batch), updating the progress
    bar. Returns host (numpy) arrays.

    With a `mesh`, pieces hold ``chunk`` blends per device (padded likewise), laid out over the
    mesh's "blend" axis."""
    unit = _unit(chunk)
    if mesh is not None:
        return _render_batch_sharded(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key,
                                     spec, mode, isolated, chunk, bar, mesh, unit, components)
    n = len(blend_ids)
    blends = jax.tree.map(np.asarray, blends)
    blend_ids = np.asarray(blend_ids)
    tasks, start = [], 0
    for piece in _pieces(n, chunk, unit):
        stop = min(start + piece, n)
        tasks.append((start, stop, piece))
        start = stop

    def run(task):
        start, stop, piece = task
        take = np.arange(start, start + piece).clip(max=stop - 1)  # pad with the last blend
        part = jax.tree.map(lambda a, t=take: a[t], blends)
        img, iso = _pipeline(part, blend_ids[take], arrays, fluxes, psf_k, sky, noise_key, spec,
                             mode, isolated, piece, unit, components)
        img = np.asarray(img)[: stop - start]
        iso = np.asarray(iso)[: stop - start] if isolated else None
        return img, iso

    outs = _run_tasks(run, tasks)
    bar.update(n)
    images = np.concatenate([img for img, _ in outs])
    iso = np.concatenate([i for _, i in outs]) if isolated else None
    return images, iso


def _render_batch_sharded(blends, blend_ids, arrays, fluxes, psf_k, sky, noise_key, spec, mode,
                          isolated, chunk, bar, mesh, inner=None, components=None):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = len(blend_ids)
    piece = chunk * mesh.size
    blends = jax.tree.map(np.asarray, blends)
    blend_ids = np.asarray(blend_ids)
    replicated = NamedSharding(mesh, P())
    by_blend = NamedSharding(mesh, P("blend"))
    arrays, fluxes, psf_k, sky, noise_key = jax.device_put(
        (arrays, fluxes, psf_k, sky, noise_key), replicated)
    fn = _sharded_pipeline(mesh, spec, mode, isolated, chunk, inner, components)
    images, isos = [], []
    for start in range(0, n, piece):
        stop = min(start + piece, n)
        take = np.arange(start, start + piece).clip(max=stop - 1)  # pad with the last blend
        part = jax.device_put(jax.tree.map(lambda a, t=take: a[t], blends), by_blend)
        ids = jax.device_put(blend_ids[take], by_blend)
        img, iso = fn(part, ids, arrays, fluxes, psf_k, sky, noise_key)
        images.append((img, stop - start))
        if isolated:
            isos.append((iso, stop - start))
        bar.update(stop - start)
    images = np.concatenate([np.asarray(a)[:k] for a, k in images])
    iso = np.concatenate([np.asarray(a)[:k] for a, k in isos]) if isolated else None
    return images, iso


def _sum_slots(iso):
    """The blends: sums of their isolated images over slots (in slot order), [blend, band, y,
    x], computed on the host threads (numpy releases the GIL in reductions)."""
    n = iso.shape[0]
    out = np.empty((n,) + iso.shape[2:], iso.dtype)
    parts = max(1, min(_host_threads(), n))
    bounds = np.linspace(0, n, parts + 1).astype(int)

    def run(k):
        lo, hi = bounds[k], bounds[k + 1]
        np.sum(iso[lo:hi], axis=1, out=out[lo:hi])

    _run_tasks(run, list(range(parts)))
    return out


class _NoBar:
    def update(self, n):
        pass


def _noise_batch(noise_key, blend_ids, images, sky, mode, chunk):
    """`add_noise` over host images in pieces of `chunk` blends (the last padded: one
    compilation), run on the host threads; returns a new host array."""
    if mode == "none":
        return images
    n = len(blend_ids)
    blend_ids = np.asarray(blend_ids)
    out = np.empty_like(images)

    def run(start):
        stop = min(start + chunk, n)
        take = np.arange(start, start + chunk).clip(max=stop - 1)
        noisy = add_noise(noise_key, blend_ids[take], images[take], sky, mode)
        out[start:stop] = np.asarray(noisy)[: stop - start]

    _run_tasks(run, list(range(0, n, chunk)))
    return out


class CatsimGenerator(DrawBlendsGenerator):
    """Draws CatSim-like galaxies (disk + bulge + AGN) as BTK does. See `DrawBlendsGenerator`."""

    compatible_catalogs = ("CatsimCatalog",)


