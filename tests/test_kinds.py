"""The registry of profile kinds: each kind's transform is GalSim's, and the GalSim backend
knows the same kinds."""

import jax.numpy as jnp
import numpy as np
import pytest

from btkjax.core.kinds import KINDS, ProfileKind, get_kind, register
from btkjax.galsim_backend import GALSIM_PROFILES, tight_gsparams
from btkjax.tolerances import KVALUE_ATOL_F64


def test_galsim_backend_knows_every_kind():
    assert set(GALSIM_PROFILES) == set(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_transform_is_galsims(name, x64):
    hlr, n = 0.7, 2.5
    k = np.array([0.0, 0.3, 1.0, 3.0, 10.0, 30.0])  # rad / arcsec
    ours = np.asarray(get_kind(name).kvalue(jnp.asarray(k**2), hlr, n))
    prof = GALSIM_PROFILES[name](1.0, hlr, n, tight_gsparams())
    ref = np.array([prof.kValue(float(kk), 0.0).real for kk in k])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=KVALUE_ATOL_F64)


def test_unknown_and_duplicate_kinds_are_named():
    with pytest.raises(ValueError, match="Unknown component kind 'disc'.*exponential"):
        get_kind("disc")
    with pytest.raises(ValueError, match="'sersic' is already registered"):
        register(ProfileKind("sersic", lambda ksq, hlr, n: ksq))
    with pytest.raises(ValueError, match="extent of kind 'x'"):
        register(ProfileKind("x", lambda ksq, hlr, n: ksq, extent="box"))
    assert "x" not in KINDS
