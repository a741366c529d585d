"""``btkjax.render``: the path BTK-era code and notebooks use, kept.

The renderer is split by floor: the jitted kernel is :mod:`btkjax.core.render`, array-only FFT
box planning :mod:`btkjax.core.boxes`, and what needs GalSim PSF objects (PSF k-images, k and
real-space PSF extents, render specs) :mod:`btkjax.optics`. Every public name this module had is
re-exported here.
"""

from btkjax.core.boxes import box_size, good_fft_size, row_extents, sersic_extent
from btkjax.core.render import (
    CATSIM_KINDS,
    COMPONENT_KINDS,
    RenderSpec,
    Sources,
    assemble,
    default_psf_kimage,
    grid_blocks,
    render,
    shift_phases,
    split_psf,
    to_stamp,
)
from btkjax.optics import (
    make_render_spec,
    psf_extent,
    psf_fold_box,
    psf_kimage_from_galsim,
    psf_wings,
    source_reach,
)

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
    "psf_kimage_from_galsim",
    "default_psf_kimage",
    "render",
    "good_fft_size",
    "shift_phases",
    "grid_blocks",
    "split_psf",
    "assemble",
    "to_stamp",
]
