"""The pure-JAX core: arrays in, arrays out.

Floor 1 of btkjax. Modules here import only jax, numpy, scipy and each other: no astropy, no
GalSim objects, no files, no Python loops over blends. See docs/ARCHITECTURE.md.

- ``keys``: seeds -> per-blend keys (the one randomness rule)
- ``tolerances``: every numerical tolerance, with its source
- ``profiles``: Fourier-space galaxy and PSF profiles
- ``render``: the batched renderer (Sources + PSF k-images -> images)
- ``sources``: catalog arrays + Blends -> renderer Sources
- ``realgal``: the real-galaxy (interpolated COSMOS image) kernel
- ``noise``: BTK's noise modes, keyed per global blend index
- ``samplers``: the built-in samplers as pure functions of a key and blend ids
- ``metrics``: differentiable image metrics
- ``step``: the simulation step (keys + blend ids -> images and truth, one compiled program)
"""
