"""The batched, jit-compiled, differentiable renderer.

Galaxies are sums of elliptical components (exponential, de Vaucouleurs, general Sersic, point
source), each transformed (component ellipticity, rotation, lensing shear), shifted, convolved
with the band's PSF and the square pixel. Everything is evaluated in Fourier space:

    image_k[band] = psf_pixel_k[band] * sum_galaxies sum_components flux * profile(A^T k) * phase

folded onto the Nyquist grid (the aliasing that sampling at pixel centers implies, as GalSim's
``drawFFT`` does), then one inverse real FFT per blend and band (per galaxy only for isolated
images), then the stamp is cut out of the FFT box.

Conventions are GalSim's: k in radians per arcsec; a component of half-light radius ``hlr`` and
axis ratio ``q`` is ``Profile(half_light_radius=hlr).shear(q=q, beta=beta)`` (area preserving);
then ``.rotate(rotation)``, ``.shear(g1=g1, g2=g2)``, convolution with the PSF, ``.shift(dx, dy)``
in arcsec from the stamp's true center (between the two central pixels of an even stamp, on the
central pixel of an odd one), drawn with ``drawImage(nx=S, ny=S, scale=pixel_scale)``.

Shapes are static (`RenderSpec` is hashable and marked static); everything else is a traced leaf
and differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from btkjax.core import profiles
from btkjax.core.kinds import KINDS, get_kind
from btkjax.core.tolerances import FOLDING_THRESHOLD, MAXK_THRESHOLD

__all__ = [
    "COMPONENT_KINDS",
    "CATSIM_KINDS",
    "RenderSpec",
    "Sources",
    "make_render_spec",
    "source_reach",
    "psf_extent",
    "psf_wings",
    "psf_fold_box",
    "row_extents",
    "box_size",
    "sersic_extent",
    "kgrid",
    "psf_kimage_from_galsim",
    "default_psf_kimage",
    "render",
    "render_blends",
    "good_fft_size",
    "shift_phases",
]

COMPONENT_KINDS = tuple(KINDS)  # the registry of btkjax.core.kinds
CATSIM_KINDS = ("exponential", "devaucouleurs", "point")
"""CatSim galaxies: disk, bulge, AGN, in this order (flux columns follow it)."""


class Sources(NamedTuple):
    """Everything the renderer needs about the galaxies of a batch of blends.

    Attributes:
        flux: [blend, slot, band, comp] electrons per component (0 in empty slots).
        hlr: [blend, slot, comp] half-light radius in arcsec (ignored for point components).
        q: [blend, slot, comp] axis ratio b/a in (0, 1].
        beta: [blend, slot, comp] component position angle in radians.
        n: [blend, slot, comp] Sersic index (used by "sersic" components only).
        dx: [blend, slot] arcsec from the stamp's true center along +x.
        dy: [blend, slot] arcsec along +y.
        rotation: [blend, slot] radians, rotation applied to the whole galaxy.
        g1: [blend, slot] reduced shear applied after the rotation.
        g2: [blend, slot]
        mask: [blend, slot] True where a galaxy is present.
    """

    flux: jax.Array
    hlr: jax.Array
    q: jax.Array
    beta: jax.Array
    n: jax.Array
    dx: jax.Array
    dy: jax.Array
    rotation: jax.Array
    g1: jax.Array
    g2: jax.Array
    mask: jax.Array


def good_fft_size(n: int) -> int:
    """The smallest even integer >= n whose prime factors are 2, 3 and 5 (fast for XLA's FFT)."""
    m = max(int(n), 2)
    while True:
        if m % 2 == 0:
            r = m
            for p in (2, 3, 5):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


@dataclass(frozen=True)
class RenderSpec:
    """Static (shape-defining) description of a render: hashable, so jit caches on it.

    Attributes:
        stamp_pixels: S, the side of the output stamp in pixels.
        fft_size: N >= S, the side of the real-space FFT box (even).
        pixel_scale: arcsec per pixel.
        kinds: component kinds, one per component axis of `Sources`.
        n_alias_x: Mx >= 0, the largest |kx| index (in units of dk = 2 pi / (N p)) evaluated;
            columns beyond N/2 are folded back (aliasing).
        n_alias_y: the largest |ky| index evaluated (>= N/2).
    """

    stamp_pixels: int
    fft_size: int
    pixel_scale: float
    kinds: tuple = CATSIM_KINDS
    n_alias_x: int = 0
    n_alias_y: int = 0

    def __post_init__(self):
        if self.fft_size < self.stamp_pixels or self.fft_size % 2:
            raise ValueError(
                f"fft_size must be even and >= stamp_pixels={self.stamp_pixels}, got "
                f"{self.fft_size}."
            )
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"Unknown component kinds {unknown}; expected {tuple(KINDS)}.")
        half = self.fft_size // 2
        if not half <= max(self.n_alias_y, half) < self.fft_size:
            raise ValueError(f"n_alias_y={self.n_alias_y} must be < fft_size={self.fft_size}.")
        if self.n_alias_x >= self.fft_size:
            raise ValueError(f"n_alias_x={self.n_alias_x} must be < fft_size={self.fft_size}.")

    @property
    def dk(self) -> float:
        """Wavenumber step in rad / arcsec."""
        return 2 * math.pi / (self.fft_size * self.pixel_scale)

    @property
    def x_indices(self) -> np.ndarray:
        """kx indices evaluated: the aliased negative columns first, then 0..N/2."""
        half = self.fft_size // 2
        base = np.arange(0, half + 1)
        if self.n_alias_x > half:
            return np.concatenate([np.arange(-self.n_alias_x, -half + 1), base])
        return base

    @property
    def n_folded_x(self) -> int:
        """Number of aliased columns evaluated before the base ones."""
        half = self.fft_size // 2
        return self.n_alias_x - half + 1 if self.n_alias_x > half else 0

    @property
    def y_extent(self) -> int:
        return max(self.n_alias_y, self.fft_size // 2)

    @property
    def y_indices(self) -> np.ndarray:
        """ky indices evaluated, ascending from -I to I."""
        extent = self.y_extent
        return np.arange(-extent, extent + 1)


def kgrid(spec: RenderSpec, dtype=None):
    """The (kx, ky) wavenumbers in rad/arcsec on which the renderer evaluates profiles.

    Returns:
        kx: [Cx] and ky: [Ry] 1-D arrays.
    """
    dtype = dtype or jnp.result_type(float)
    kx = jnp.asarray(spec.x_indices * spec.dk, dtype=dtype)
    ky = jnp.asarray(spec.y_indices * spec.dk, dtype=dtype)
    return kx, ky


def to_stamp(kimage: jax.Array, spec: RenderSpec) -> jax.Array:
    """Inverse FFT of folded k-images [.., N, N/2+1] and cut-out of the stamp [.., S, S].

    The phases put stamp pixel 0 at FFT sample 0 (see `_galaxy_kvalues`), so the stamp is the
    first S rows and columns. The k-values are samples of the continuous transform; the image
    is their inverse DFT times dk^2 / (2 pi)^2 = 1 / (N p)^2 per unit area, times p^2 for the
    pixel, i.e. / N^2: irfft2's normalization.
    """
    n, s = spec.fft_size, spec.stamp_pixels
    image = jnp.fft.irfft2(kimage, s=(n, n), axes=(-2, -1))
    return image[..., :s, :s]


def grid_blocks(spec: RenderSpec):
    """The evaluation grid cut into four blocks that land directly on the rfft grid.

    Block 0 holds, for every rfft row and column, the primary alias (ky index r for r <= N/2,
    r - N above; kx index 0 .. N/2), so it IS the rfft layout [N, N/2 + 1] and needs no copy.
    The other blocks hold the remaining aliases (ky indices beyond, kx indices -Mx .. -N/2) and
    are added onto contiguous row / column ranges of block 0 (sampling at pixel centres sums
    the transform over k + 2 pi m / p), without materializing the extended grid.

    Returns:
        list of (y_pos, x_pos, row_slice, col_slice): positions of the block's rows and columns
        in the evaluation grid (`RenderSpec.y_indices`, `x_indices`), and where it is added.
    """
    n = spec.fft_size
    half = n // 2
    e = spec.y_extent
    nf = spec.n_folded_x
    prim_rows = np.r_[0 : half + 1, -half + 1 : 0]  # ky indices in rfft row order
    extra_rows = np.r_[n - e - n : half + 1 - n, half + 1 : e + 1]  # target rows N - E .. E
    base_cols = np.arange(half + 1)
    rows = (slice(None), slice(n - e, e + 1))
    y_prim, y_extra = prim_rows + e, extra_rows + e
    x_base = base_cols + nf
    blocks = [(y_prim, x_base, slice(None), slice(None)), (y_extra, x_base, rows[1], slice(None))]
    if nf:
        x_extra = np.arange(nf)  # kx indices -Mx .. -N/2, target columns N - Mx .. N/2
        cols = slice(half + 1 - nf, half + 1)
        blocks += [(y_prim, x_extra, slice(None), cols), (y_extra, x_extra, rows[1], cols)]
    return blocks


def split_psf(psf_k, spec: RenderSpec):
    """`psf_k` [..., Ry, Cx] on the evaluation grid, cut into the `grid_blocks`."""
    return [psf_k[..., yp, :][..., xp] for yp, xp, _, _ in grid_blocks(spec)]


def assemble(block_values, spec: RenderSpec):
    """Sums the per-block (re, im) pairs onto the rfft grid and returns the complex k-image.

    The alias blocks are zero-padded to the grid and added (XLA fuses the pads, the sums and
    the complex assembly into one pass over the grid)."""
    blocks = grid_blocks(spec)
    n, half = spec.fft_size, spec.fft_size // 2
    re, im = block_values(0)
    for b in range(1, len(blocks)):
        _, _, rs, cs = blocks[b]
        rb, ib = block_values(b)
        r0, r1 = (0, n) if rs == slice(None) else (rs.start, rs.stop)
        c0, c1 = (0, half + 1) if cs == slice(None) else (cs.start, cs.stop)
        pad = [(0, 0)] * (rb.ndim - 2) + [(r0, n - r1), (c0, half + 1 - c1)]
        re = re + jnp.pad(rb, pad)
        im = im + jnp.pad(ib, pad)
    return jax.lax.complex(re, im)


def _galaxy_geometry(sources: Sources):
    """Per-galaxy component quadratic forms and sanitized radii (one blend, [slot, ...]).

    Returns:
        (mxx, mxy, myy [slot, comp]: |A^T k|^2 = mxx kx^2 + 2 mxy kx ky + myy ky^2;
        hlr, n [slot, comp] safe to evaluate on absent components).
    """
    safe = sources.mask[:, None] & (sources.flux.sum(axis=1) != 0)  # [slot, comp]
    # Sanitize parameters of absent components so that values and gradients stay finite.
    hlr = jnp.where(safe, sources.hlr, 1.0)
    q = jnp.where(safe, sources.q, 1.0)
    n = jnp.where(safe, sources.n, 1.0)
    g1 = jnp.where(sources.mask, sources.g1, 0.0)
    g2 = jnp.where(sources.mask, sources.g2, 0.0)
    whole = profiles.shear_matrix(g1, g2) @ profiles.rotation_matrix(sources.rotation)  # [slot, 2, 2]
    a_mat = whole[:, None] @ profiles.shear_matrix_q_beta(q, sources.beta)  # [slot, comp, 2, 2]
    m = a_mat @ jnp.swapaxes(a_mat, -1, -2)
    return m[..., 0, 0], m[..., 0, 1], m[..., 1, 1], hlr, n


def shift_phases(dx, dy, kx, ky, spec: RenderSpec):
    """cos and sin of k.(x0 - origin) for sources at (dx, dy) arcsec ([slot]) on a (ky x kx)
    grid: [slot, Ry, Cx] each; the transform of the shifted source is ``F(k) (cos - i sin)``.

    FFT sample 0 is stamp pixel 0, at -(S - 1) / 2 pixels from the stamp's true center. The 2-D
    grids are outer products contracted over (cos, sin) pairs: as dots they are computed once,
    where elementwise products let XLA fuse the 1-D sines and cosines into the 2-D loops that
    use them and recompute them at every k point (3x the cost of a whole render).
    """
    origin = -(spec.stamp_pixels - 1) / 2 * spec.pixel_scale
    ax = kx[None, :] * (dx[:, None] - origin)  # [slot, Cx]
    ay = ky[None, :] * (dy[:, None] - origin)  # [slot, Ry]
    tx = jnp.stack([jnp.cos(ax), jnp.sin(ax)], axis=1)  # [slot, 2, Cx]
    ty_cos = jnp.stack([jnp.cos(ay), -jnp.sin(ay)], axis=2)  # [slot, Ry, 2]
    ty_sin = jnp.stack([jnp.sin(ay), jnp.cos(ay)], axis=2)
    return jnp.einsum("syt,stx->syx", ty_cos, tx), jnp.einsum("syt,stx->syx", ty_sin, tx)


def _galaxy_kvalues(sources: Sources, spec: RenderSpec, kx, ky, geometry=None):
    """Per-galaxy component transforms of one blend on a (ky x kx) grid, in real arithmetic.

    XLA's CPU code for complex arrays is several times slower than for pairs of real arrays, so
    the phase exp(-i k.x0) is carried as its cosine and sine.

    Args:
        sources: fields of ONE blend ([slot, ...]).
        kx, ky: 1-D wavenumbers (rad/arcsec) of the grid's columns and rows.
        geometry: `_galaxy_geometry(sources)`, when already computed.

    Returns:
        (shape [slot, comp, Ry, Cx], cos [slot, Ry, Cx], sin [slot, Ry, Cx]): the component
        transforms (real: the profiles are centered and symmetric) and the shift phases, with
        transform = shape * (cos - i sin).
    """
    dtype = kx.dtype
    mxx, mxy, myy, hlr, n = geometry if geometry is not None else _galaxy_geometry(sources)
    kx2 = (kx * kx)[None, :]
    ky2 = (ky * ky)[:, None]
    kxy = ky[:, None] * kx[None, :]
    comps = []
    for c, kind in enumerate(spec.kinds):
        if get_kind(kind).is_point:
            comps.append(jnp.ones((sources.flux.shape[0], ky.shape[0], kx.shape[0]), dtype))
            continue
        ksq = (
            mxx[:, c, None, None] * kx2
            + 2 * mxy[:, c, None, None] * kxy
            + myy[:, c, None, None] * ky2
        )
        value = get_kind(kind).kvalue(ksq, hlr[:, c, None, None], n[:, c, None, None])
        comps.append(value.astype(dtype))
    shape_k = jnp.stack(comps, axis=1)  # [slot, comp, Ry, Cx] real
    cos, sin = shift_phases(sources.dx, sources.dy, kx, ky, spec)
    return shape_k, cos, sin


def _band_fluxes(sources: Sources, dtype):
    return jnp.where(sources.mask[:, None, None], sources.flux, 0.0).astype(dtype)


def _times_psf(re, im, psf_k):
    """(re - i im) x psf_k as a (real, imag) pair; psf_k real (symmetric PSF) or complex."""
    if jnp.iscomplexobj(psf_k):
        pr, pi = psf_k.real, psf_k.imag
        return re * pr + im * pi, re * pi - im * pr
    return re * psf_k, -im * psf_k


def _render_one(sources: Sources, psf_blocks, spec: RenderSpec, isolated: bool):
    """One blend: [band, S, S] and, if isolated, [slot, band, S, S].

    `psf_blocks`: the PSF x pixel transfer function cut by `split_psf`.
    """
    dtype = sources.flux.dtype
    flux = _band_fluxes(sources, dtype)  # [slot, band, comp]
    geometry = _galaxy_geometry(sources)
    blocks = grid_blocks(spec)
    n_slot, n_band, n_comp = flux.shape
    # Sum over galaxies and components as real matrix products:
    # [band, slot * comp] x [slot * comp, Ry * Cx], no [slot, band, k] intermediate.
    w = jnp.transpose(flux, (1, 0, 2)).reshape(n_band, n_slot * n_comp)

    def block_values(b):
        yp, xp = blocks[b][:2]
        kx = jnp.asarray(spec.x_indices[xp] * spec.dk, dtype)
        ky = jnp.asarray(spec.y_indices[yp] * spec.dk, dtype)
        shape_k, cos, sin = _galaxy_kvalues(sources, spec, kx, ky, geometry)
        grid = shape_k.shape[2:]
        if n_slot == 1 and not isolated:
            # One galaxy (the generators' galaxy-by-galaxy path): sum the components per band
            # first, then one pass applies the phase and the PSF.
            band_k = (w @ shape_k.reshape(n_comp, -1)).reshape((n_band,) + grid)
            return _times_psf(band_k * cos, band_k * sin, psf_blocks[b])
        t_cos = shape_k * cos[:, None]  # [slot, comp, Ry, Cx]
        t_sin = shape_k * sin[:, None]
        if isolated:
            re = jnp.einsum("sbc,scyx->sbyx", flux, t_cos)
            im = jnp.einsum("sbc,scyx->sbyx", flux, t_sin)
            return _times_psf(re, im, psf_blocks[b][None])
        re = (w @ t_cos.reshape(n_slot * n_comp, -1)).reshape((n_band,) + grid)
        im = (w @ t_sin.reshape(n_slot * n_comp, -1)).reshape((n_band,) + grid)
        return _times_psf(re, im, psf_blocks[b])

    kimage = assemble(block_values, spec)
    if not isolated:
        return to_stamp(kimage, spec), None
    # One transform per galaxy and band; the blend is their sum (linearity of the FFT).
    iso = to_stamp(kimage, spec)
    iso = jnp.where(sources.mask[:, None, None, None], iso, 0.0)
    return iso.sum(axis=0), iso


@partial(jax.jit, static_argnames=("spec", "isolated", "chunk"))
def render(
    sources: Sources,
    psf_k: jax.Array,
    spec: RenderSpec,
    isolated: bool = False,
    chunk: int = 16,
):
    """Renders noiseless blends.

    Args:
        sources: `Sources` with a leading blend axis.
        psf_k: [band, Ry, Cx] the PSF x pixel transfer function on the evaluation grid
            (`psf_kimage_from_galsim` or `default_psf_kimage`), or [blend, band, Ry, Cx] for a
            PSF per blend.
        spec: the static `RenderSpec`.
        isolated: also return each galaxy alone.
        chunk: blends processed at once (bounds memory; does not change the result).

    Returns:
        (blend_images [blend, band, S, S], isolated_images [blend, slot, band, S, S] or None).
    """
    per_blend_psf = psf_k.ndim == 4

    if per_blend_psf:
        def one(args):
            src, psf = args
            return _render_one(src, split_psf(psf, spec), spec, isolated)

        return jax.lax.map(one, (sources, psf_k), batch_size=chunk)
    psf_blocks = split_psf(psf_k, spec)
    return jax.lax.map(lambda src: _render_one(src, psf_blocks, spec, isolated), sources,
                       batch_size=chunk)


def render_blends(sources, psf_k, spec, isolated=False, chunk=16):
    """Alias of `render` (BTK-style name)."""
    return render(sources, psf_k, spec, isolated=isolated, chunk=chunk)


# ------------------------------------------------------------------------------------------
# PSF x pixel transfer functions on the evaluation grid


def pixel_kimage(spec: RenderSpec, dtype=None):
    """The square pixel's transfer function on the evaluation grid [Ry, Cx]."""
    kx, ky = kgrid(spec, dtype)
    return profiles.pixel_kvalue(kx[None, :], ky[:, None], spec.pixel_scale)


def psf_kimage_from_galsim(psf, spec: RenderSpec, include_pixel: bool = True) -> np.ndarray:
    """Evaluates a GalSim (or JAX-GalSim) PSF on the renderer's grid, on the host.

    Returns:
        complex128 numpy array [Ry, Cx] (PSF transform, times the pixel's if `include_pixel`).
    """
    xi, yi = spec.x_indices, spec.y_indices
    m = int(max(np.abs(xi).max(), np.abs(yi).max()))
    kimage = psf.drawKImage(nx=2 * m + 1, ny=2 * m + 1, scale=spec.dk)
    arr = np.asarray(kimage.array)[np.ix_(yi + m, xi + m)]
    if include_pixel:
        kx, ky = xi * spec.dk, yi * spec.dk
        p = spec.pixel_scale
        arr = arr * np.sinc(ky * p / (2 * np.pi))[:, None] * np.sinc(kx * p / (2 * np.pi))[None, :]
    return arr.astype(np.complex128)


def default_psf_kimage(spec: RenderSpec, fwhm, lam_over_diam, obscuration, include_pixel=True):
    """BTK's default PSF (Kolmogorov x obscured Airy) x pixel on the grid, in JAX.

    Differentiable in ``fwhm``, ``lam_over_diam`` and ``obscuration`` (scalars or [band]).

    Returns:
        complex array [Ry, Cx], or [band, Ry, Cx] for [band] parameters.
    """
    fwhm = jnp.asarray(fwhm)
    kx, ky = kgrid(spec, dtype=jnp.result_type(fwhm.dtype, float))
    ksq = kx[None, :] ** 2 + ky[:, None] ** 2
    expand = (...,) + (None,) * 2
    lam = jnp.asarray(lam_over_diam)
    out = profiles.kolmogorov_kvalue(ksq, fwhm[expand])
    # lam_over_diam = 0 means no optics (no mirror); a tiny positive value keeps gradients finite.
    safe_lam = jnp.where(lam > 0, lam, 1.0)
    airy = profiles.airy_kvalue(ksq, safe_lam[expand], jnp.asarray(obscuration)[expand])
    out = jnp.where((lam > 0)[expand], out * airy, out)
    if include_pixel:
        out = out * profiles.pixel_kvalue(kx[None, :], ky[:, None], spec.pixel_scale)
    return out.astype(jnp.result_type(out.dtype, jnp.complex64))


def _maxk_index(psf, pixel_scale: float, fft_size: int, threshold: float) -> int:
    """The largest |k| index where |PSF x pixel| exceeds `threshold`, searched up to 2 pi / p."""
    dk = 2 * math.pi / (fft_size * pixel_scale)
    m = fft_size - 1
    kimage = psf.drawKImage(nx=2 * m + 1, ny=2 * m + 1, scale=dk)
    k = np.arange(-m, m + 1) * dk
    sinc = np.sinc(k * pixel_scale / (2 * np.pi))
    amp = np.abs(np.asarray(kimage.array)) * np.abs(sinc)[:, None] * np.abs(sinc)[None, :]
    above = np.argwhere(amp > threshold * np.abs(kimage.array[m, m]))
    if len(above) == 0:
        return 0
    return int(np.abs(above - m).max())


def sersic_extent(hlr, n, core_radius: float, threshold: float = FOLDING_THRESHOLD):
    """Radius (arcsec) beyond which a Sersic profile is below `threshold` of its core brightness.

    The core brightness is the profile at ``core_radius`` (half the PSF FWHM: the PSF smooths the
    cusp, so the convolved peak is about the profile there). Solves
    ``exp(-b ((R / hlr)^(1/n) - (core / hlr)^(1/n))) = threshold``.

    Args:
        hlr: half-light radii (arcsec), any shape.
        n: Sersic indices, broadcastable to `hlr`.
        core_radius: arcsec.
        threshold: the brightness ratio (FOLDING_THRESHOLD by default).

    Returns:
        numpy array of radii, the shape of `hlr`.
    """
    from scipy.special import gammaincinv

    hlr = np.asarray(hlr, dtype=float)
    n = np.broadcast_to(np.asarray(n, dtype=float), hlr.shape)
    b = gammaincinv(2 * n, 0.5)
    with np.errstate(divide="ignore"):
        x = (core_radius / hlr) ** (1 / n) + math.log(1 / threshold) / b
    return hlr * x**n


def row_extents(kinds, hlr, q, n, has_flux, psf_fwhm: float, threshold=FOLDING_THRESHOLD):
    """How far (arcsec) each catalog row's galaxy stays above `threshold` of its core brightness.

    The largest `sersic_extent` of its components that have flux (major axis: hlr / sqrt(q)),
    plus a PSF FWHM; 0 for a galaxy of point sources only (the PSF's wings are counted apart).

    Args:
        kinds: component kinds.
        hlr, q, n: [row, comp] component half-light radii, axis ratios, Sersic indices.
        has_flux: [row, comp] bool, components with flux.
        psf_fwhm: the widest PSF FWHM (arcsec).
    """
    hlr = np.asarray(hlr, dtype=float) / np.sqrt(np.asarray(q, dtype=float))
    n = np.asarray(n, dtype=float)
    has_flux = np.asarray(has_flux, bool)
    out = np.zeros(hlr.shape[0])
    for c, name in enumerate(kinds):
        kind = get_kind(name)
        if kind.is_point:
            continue
        if kind.extent == "gaussian":
            sigma = hlr[:, c] / math.sqrt(2 * math.log(2))
            ext = sigma * math.sqrt(2 * math.log(1 / threshold))
        else:
            index = n[:, c] if kind.sersic_index is None else kind.sersic_index
            ext = sersic_extent(hlr[:, c], index, psf_fwhm / 2, threshold)
        out = np.maximum(out, np.where(has_flux[:, c], ext + psf_fwhm, 0.0))
    return out


def psf_wings(psfs, pixel_scale: float, threshold: float = FOLDING_THRESHOLD) -> float:
    """Extent (arcsec) of the PSFs' wings: where each falls below `threshold` of its peak."""
    return max(psf_extent(p, pixel_scale, threshold) for p in psfs)


def psf_fold_box(psfs, stamp_pixels: int, pixel_scale: float, max_shift: float,
                 threshold: float = FOLDING_THRESHOLD) -> int:
    """The smallest fast FFT size at which a point source's folded PSF wings stay below
    `threshold` of its peak anywhere in the stamp.

    The folded light at a stamp pixel x is the sum over the periodic copies m != 0 of the PSF
    at x - s + m L (L = N p the box, s the source's shift): computed from the PSF image, for a
    source at the largest shift, summing the 24 nearest copies (power-law wings such as the
    Airy's r^-3 fold in from all directions).
    """
    shift = int(math.ceil(max_shift / pixel_scale))
    s = stamp_pixels
    n = s
    while True:
        n = good_fft_size(n)
        worst = 0.0
        for psf in psfs:
            half = 2 * n + s
            image = psf.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=pixel_scale).array
            peak = image.max()
            folded = np.zeros((s, s))
            # stamp pixel j sits at j - (S - 1) / 2 from the center; the source at +shift
            lo = half - (s - 1) // 2 - shift
            for my in range(-2, 3):
                for mx in range(-2, 3):
                    if mx == my == 0:
                        continue
                    y0, x0 = lo + my * n, lo + mx * n
                    if y0 < 0 or x0 < 0 or y0 + s > image.shape[0] or x0 + s > image.shape[1]:
                        continue
                    folded += image[y0 : y0 + s, x0 : x0 + s]
            worst = max(worst, float(np.abs(folded).max() / peak))
        if worst <= threshold:
            return n
        n += 2


def box_size(reach_arcsec: float, stamp_pixels: int, pixel_scale: float) -> int:
    """The smallest fast even FFT size whose box keeps light from `reach_arcsec` off the stamp.

    In a periodic box of side L = N p, the copy of light at distance R from the stamp center
    lands at least L - R - S p / 2 from any stamp pixel... i.e. L >= R + S p / 2.
    """
    box = max(stamp_pixels * pixel_scale, reach_arcsec + stamp_pixels * pixel_scale / 2)
    return good_fft_size(int(math.ceil(box / pixel_scale - 1e-9)))


def make_render_spec(
    stamp_pixels: int,
    pixel_scale: float,
    psfs,
    kinds=CATSIM_KINDS,
    fft_size: int | None = None,
    reach_arcsec: float | None = None,
    maxk_threshold: float = MAXK_THRESHOLD,
) -> RenderSpec:
    """Chooses the FFT size and aliasing range for a survey's PSFs and its galaxies' extent.

    Args:
        stamp_pixels: side of the stamp in pixels.
        pixel_scale: arcsec per pixel.
        psfs: the PSF objects (GalSim or JAX-GalSim) of every band, to find how far in k the
            PSF x pixel transfer function stays above `maxk_threshold`.
        kinds: component kinds of the sources.
        fft_size: force the FFT box size (even, >= stamp_pixels).
        reach_arcsec: how far from the stamp center galaxy light stays above FOLDING_THRESHOLD
            of its peak (`source_reach` computes it from a catalog). In a periodic box of side
            L the copy of a galaxy lands at least L - S p / 2 - |shift| from any stamp pixel, so
            L >= reach + S p / 2 keeps folded light below the threshold. Default: the stamp's
            side (a box 1.5 times the stamp).
    """
    if fft_size is None:
        reach = stamp_pixels * pixel_scale if reach_arcsec is None else float(reach_arcsec)
        fft_size = box_size(reach, stamp_pixels, pixel_scale)
    half = fft_size // 2
    m = max(_maxk_index(p, pixel_scale, fft_size, maxk_threshold) for p in psfs)
    return RenderSpec(
        stamp_pixels=int(stamp_pixels),
        fft_size=int(fft_size),
        pixel_scale=float(pixel_scale),
        kinds=tuple(kinds),
        n_alias_x=int(m) if m > half else 0,
        n_alias_y=int(max(m, half)),
    )


def psf_extent(psf, pixel_scale: float, threshold: float = FOLDING_THRESHOLD) -> float:
    """Radius (arcsec) beyond which a PSF's image stays below `threshold` of its peak.

    The PSF is drawn (pixel included) on a grid of 2 x 48 FWHM-equivalents (its half-light
    radius times 100), and the largest radius of a pixel above ``threshold * peak`` is returned.
    """
    hlr = float(psf.calculateHLR(scale=pixel_scale / 4, size=256))
    half = int(math.ceil(50 * hlr / pixel_scale))
    image = psf.drawImage(nx=2 * half + 1, ny=2 * half + 1, scale=pixel_scale).array
    y, x = np.indices(image.shape) - half
    above = np.abs(image) > threshold * image.max()
    return float(np.hypot(x[above], y[above]).max() * pixel_scale) + pixel_scale


def source_reach(
    kinds,
    hlr,
    n,
    max_shift: float,
    psf_fwhm: float,
    q=None,
    max_shear: float = 0.0,
    psfs=(),
    pixel_scale: float | None = None,
    has_flux=None,
    threshold: float = FOLDING_THRESHOLD,
) -> float:
    """How far (arcsec) from the stamp center light of these galaxies stays above `threshold`.

    The largest `row_extents` (stretched by a lensing shear of up to `max_shear`) or the PSFs'
    wings (`psf_wings`; 20 FWHMs when no PSF object is given), plus the largest shift.

    Args:
        kinds: the component kinds.
        hlr: [row, comp] half-light radii of every catalog row that may be drawn.
        n: [row, comp] Sersic indices (used for "sersic" components).
        max_shift: largest |dx|, |dy| (arcsec).
        psf_fwhm: the widest PSF FWHM (arcsec).
        q: [row, comp] axis ratios (default 1).
        max_shear: largest lensing |g|, stretching by (1 + |g|) / sqrt(1 - |g|^2).
        psfs: PSF objects (GalSim) whose wings to measure, with `pixel_scale`.
        pixel_scale: arcsec per pixel, for `psf_wings`.
        has_flux: [row, comp] components that have flux (default all).
    """
    hlr = np.asarray(hlr, dtype=float)
    q = np.ones_like(hlr) if q is None else q
    has_flux = np.ones(hlr.shape, bool) if has_flux is None else has_flux
    stretch = (1 + max_shear) / math.sqrt(1 - max_shear**2)
    extent = row_extents(kinds, hlr * stretch, q, n, has_flux, psf_fwhm, threshold).max()
    # Power-law wings (Kolmogorov r^-11/3, Airy r^-3) fold in from all eight neighbouring
    # copies of the box: their extent is taken at a tenth of the threshold (`psf_fold_box`
    # computes the folded sum itself, for a tighter box).
    wings = psf_wings(psfs, pixel_scale, threshold / 10) if len(psfs) else 20.0 * psf_fwhm
    return max(extent, wings) + max_shift


_ = FOLDING_THRESHOLD  # documented in make_render_spec; the margin rule is tested for it
