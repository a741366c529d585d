"""The registry of galaxy profile kinds: what a component kind is, in one place.

A component of a galaxy (a disk, a bulge, an AGN...) has a kind. Everything the core needs to
know about a kind lives in its `ProfileKind`: its unit-flux Fourier transform, how far its light
reaches (for the FFT box) and whether it is costly to evaluate (table lookups, which renderers
run apart). The GalSim reference backend keeps the matching GalSim constructor per kind
(``btkjax.galsim_backend.GALSIM_PROFILES``; a test checks that both registries name the same
kinds), and the deblender its own parameterization per fitted model.

Adding a kind: write its k-space profile in ``btkjax.core.profiles`` (tested against GalSim's
``kValue``), add one `register` call below, its GalSim constructor to ``GALSIM_PROFILES``, and a
parity test in tests/test_render.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp

from btkjax.core import profiles

__all__ = ["ProfileKind", "KINDS", "register", "get_kind"]


@dataclass(frozen=True)
class ProfileKind:
    """One component kind.

    Attributes:
        name: the kind's name (``Sources`` components and ``RenderSpec.kinds`` use it).
        kvalue: ``kvalue(ksq, hlr, n)``: the unit-flux transform at squared wavenumber ``ksq``
            (rad^2/arcsec^2) of a round profile of half-light radius ``hlr`` (arcsec) and Sersic
            index ``n`` (ignored by kinds of fixed shape).
        extent: how its light's reach is computed: "sersic" (`btkjax.core.boxes.sersic_extent`
            with ``sersic_index``, or the component's own ``n`` when that is None), "gaussian"
            (analytic) or "point" (no extent of its own: the PSF's).
        sersic_index: the fixed Sersic index of the kind, None for a free index.
        costly: evaluated through table lookups (the renderers run such components apart, so
            that galaxies without them do not pay for them).
    """

    name: str
    kvalue: Callable
    extent: str = "sersic"
    sersic_index: float | None = None
    costly: bool = False

    @property
    def is_point(self) -> bool:
        return self.extent == "point"


KINDS: dict[str, ProfileKind] = {}
"""Every registered kind by name, in registration order."""


def register(kind: ProfileKind) -> ProfileKind:
    """Adds a kind to `KINDS` (ValueError if the name is taken or its extent rule unknown)."""
    if kind.name in KINDS:
        raise ValueError(f"profile kind {kind.name!r} is already registered.")
    if kind.extent not in ("sersic", "gaussian", "point"):
        raise ValueError(f"extent of kind {kind.name!r} must be 'sersic', 'gaussian' or "
                         f"'point', got {kind.extent!r}.")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> ProfileKind:
    """The registered kind called ``name``; ValueError naming the known kinds otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"Unknown component kind {name!r}; expected one of {tuple(KINDS)}.") \
            from None


_GAUSSIAN_SIGMA_PER_HLR = 1 / math.sqrt(2 * math.log(2))  # a Gaussian's hlr is sigma sqrt(2 ln 2)

register(ProfileKind("exponential", lambda ksq, hlr, n: profiles.exponential_kvalue(ksq, hlr),
                     sersic_index=1.0))
register(ProfileKind("devaucouleurs",
                     lambda ksq, hlr, n: profiles.devaucouleurs_kvalue(ksq, hlr),
                     sersic_index=4.0, costly=True))
register(ProfileKind("sersic", lambda ksq, hlr, n: profiles.sersic_kvalue(ksq, n, hlr),
                     costly=True))
register(ProfileKind("point", lambda ksq, hlr, n: jnp.ones_like(ksq), extent="point"))
register(ProfileKind(
    "gaussian",
    lambda ksq, hlr, n: profiles.gaussian_kvalue(ksq, hlr * _GAUSSIAN_SIGMA_PER_HLR),
    extent="gaussian"))
