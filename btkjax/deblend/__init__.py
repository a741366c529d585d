r"""Forward-model deblending: every detected galaxy of a blend fitted jointly, in all bands.

Each detected galaxy is modelled as one elliptical profile (exponential by default in
`fit_spec`, or a Sersic profile of free index, which `ForwardModelMeasure` fits by default with
a prior on the index) with a position, a flux per band, a half-light radius and a reduced-shear
ellipticity, convolved with the band's known PSF by `btkjax.core.render.render`. The parameters of all
galaxies of a blend are fitted at once by minimizing the Gaussian negative log-likelihood of the
background-subtracted image under the Poisson noise model of `btkjax.noise` ("all" mode): half
the Poisson deviance of the counts ``d + sky`` given the rate ``m + sky``,

.. math::

    -\log L = \sum_{band, pix} \left[(m - d) - (d + sky) \log\frac{m + sky}{d + sky}\right]
    \approx \frac12 \sum \frac{(d - m)^2}{sky + m},

i.e. the chi-square with **variance = sky + model**, in its exact Poisson form. Unlike the
Gaussian chi-square with a model-dependent variance it is unbiased (its score has mean zero at
the truth) AND its minimum on a noiseless image is the truth (zero deviance at m = d).
It is evaluated as ``(d + sky) (u - log1p u)`` with ``u = (m - d) / (d + sky)``, which float32
resolves (the form above subtracts two ~1e6 numbers in a bright galaxy's pixels; see
`btkjax.deblend.model.nll_terms`).
``noise="chi2"`` selects the chi-square with variance = sky + data (fixed weights) instead.
``chi2`` in the results is Pearson's sum((d - m)^2 / (sky + m)).

Parameters are fitted in an unconstrained space:

- position: pixel offset from the initial detection ``R tanh(u / R)`` (``R = max_offset``
  pixels), so a fit can never wander off its detection;
- fluxes: ``exp(u)`` per band (always positive);
- half-light radius: ``exp(u)`` arcsec;
- ellipticity: reduced shear ``g = G_MAX * 2 eta / (1 + sqrt(1 + 4 |eta|^2))``, smooth
  everywhere, ``g ~ eta`` near 0, ``|g| < G_MAX``;
- Sersic index (``model="sersic"``): ``N_MIN + (N_MAX - N_MIN) sigmoid(u)``;
- bulge + disk (``model="bulge+disk"``): each band's bulge fraction ``sigmoid(u)``, the
  bulge's half-light radius ``exp(u)`` arcsec (one centre and one shear for both).

The default optimizer is optax's L-BFGS (backtracking line search; the loss and gradient it
stores at the accepted point start the next step); Adam with a decaying schedule is the
alternative (and the one `fit_unrolled` differentiates through).

Execution: the batch is cut into chunks of ``chunk`` blends (`default_chunk`: 1 on CPU, 64 on
accelerators; the last chunk is padded with empty blends), each chunk one call of a jitted
program (vmapped over its blends, with padded, masked slots) compiled once per (`RenderSpec`,
model, optimizer, chunk shape) whatever the number of blends: a second batch, of any size,
does not recompile. With one blend per call each blend runs its own while loop and line
searches; vmapped, every blend steps until the slowest has converged and every line search
runs as long as the longest (2 CPU cores, 20 LSST blends on 24" stamps, float32: 3.7 s one
blend per call, 20.2 s vmapped). Each
blend stops when its loss changes by less than ``rtol |loss| + atol`` for ``patience`` steps in
a row (``rtol`` 1e-7 in float64, `btkjax.deblend.fit.FIT_RTOL_F32` = 2e-7 in float32; or at
``max_steps``), and reports a status (`STATUS_*` bit flags): converged, hit the
step limit, had no detection, dropped a detection outside the stamp, had more detections than
slots, diverged (a non-finite loss or gradient: that blend keeps its last finite parameters,
the others go on), had a Hessian that is not positive definite (NaN errors), or got galaxies
added from its residual.

Initialization (`init_galaxies`, pure JAX): the inverse-sky-weighted band sum is shared among
the detections in proportion to their SDSS-style symmetric templates (``min(I(p), I(2c - p))``
around each detection pixel c: the light of a neighbour on one side of a galaxy is not mirrored
on the other, so it drops out); adaptive Gaussian moments of each share, minus the PSF's, give
its centroid, size and ellipticity; the fluxes per band solve the linear least-squares problem
of the data given the unit-flux models. Then, twice, the data are shared in proportion to these
models instead, and each model's moments (measured the same way) are moved onto those of its
share. Moments of the raw image around each detection, which the fit started from before, mix
the two galaxies of a close pair and led it into wrong minima (13 of 60 random noiseless pairs
1.5 to 4 pixels apart, none with the shared moments; tests/test_deblend.py fits pairs 4.8 and
3.05 pixels apart, 1.3 and 0.8 PSF FWHM, to 1e-3 from this initialization).

Errors (`fisher_errors`): the inverse of the Hessian of -log L with respect to the physical
parameters of all the galaxies of a blend (so blended galaxies' correlations are in), by
default on the fitted model's own image (the Fisher matrix at the fit, i.e. the Cramer-Rao
bound; ``information="observed"`` uses the data). `fit_blends` returns them with the fit.
They count the noise given the model, not light a profile takes from or leaves to its
neighbours: `ForwardModelMeasure`'s flux errors add that by `FluxErrorModel` (a floor and a
term in the galaxy's blendedness in the fitted models, `model_blendedness`), calibrated on
simulated blends (`FLUX_ERROR_MODEL`).

Galaxies the detection missed (`residual_peaks`, ``add_sources``): a fitted single profile
absorbs the light of an undetected neighbour. The matched-filtered residual, divided by its
noise (Poisson plus a few percent of the model for model mismatch), shows such a neighbour; it
is put in a free slot and the blend fitted again, and the refit is kept when -log L drops by
more than ``penalty`` per new galaxy (Schwarz's criterion by default in `ForwardModelMeasure`,
Akaike's in `fit_blends`). A neighbour hidden in a galaxy whose profile the model
does not quite describe (a bulge and a disk fitted with one Sersic profile) is found in the
antisymmetric part of that galaxy's light about its fitted centre (`asymmetry_peaks`,
``asymmetry_sources``): any point-symmetric galaxy cancels there, whatever its profile.

Galaxies merged into one detection (``split_sources``, `split_candidates`): a single profile
fitted to two merged galaxies leaves an excess of residual chi-square near it rather than a peak;
the galaxy with the largest excess is replaced by two on its major axis and the blend fitted
again, kept by the same criterion.

Where the fit starts (`ForwardModelMeasure`'s ``detection``): by default ("auto") the learned
detector (`detector`: a dilated CNN trained with the simulation step, its heatmap's peaks at
`NETWORK_DEBLEND_THRESHOLD`; its weaker peaks, down to its own threshold, tried as
``candidates`` of `fit_blends`, kept by the likelihood) on images of its bands and pixel scale
(LSST's), and SEP on the
SED-weighted multi-band coadd (`coadd_detections`, ``detection="coadd"``) elsewhere; "sep" is
SEP's i band.

Pure functions and the high-level path:

- `init_galaxies`, `to_unconstrained`, `to_physical`, `to_sources`, `neg_log_likelihood`;
- `fit` (jitted while-loops, cached) and `fit_unrolled` (a fixed number of steps in a
  ``lax.scan``: reverse-mode differentiable, for learning);
- `fisher_errors`, `residual_peaks`;
- `fit_blends(images, detections, psf_k, spec, sky, ...)`: validation, init, fit, added
  galaxies, errors, results;
- `Scarlet2Measure`: scarlet2 (optional extra ``btkjax[scarlet2]``) as a BTK measure function on
  the same detections, for comparisons.

Modules (each public name is importable from ``btkjax.deblend``):

- `btkjax.deblend.model`: parameters, transforms, likelihood, `FitResult`, status flags;
- `btkjax.deblend.init`: `init_galaxies`;
- `btkjax.deblend.fit`: `fit`, `fit_unrolled` (the optimizer loops);
- `btkjax.deblend.errors`: `fisher_errors`;
- `btkjax.deblend.residual`: `residual_peaks`, `asymmetry_peaks`, `mirror`, the split and
  merge candidates;
- `btkjax.deblend.detector`: the learned detector (`Detector`, `load_detector`, `detect`,
  `heatmap`, `heatmap_peaks`, the training loss `focal_loss` and its `target`), trained by
  ``benchmarks/train_detector.py``;
- `btkjax.deblend.pipeline`: `pad_detections`, `fit_blends`, `ring_threshold`, `check_penalty`;
- `btkjax.deblend.measure`: `ForwardModelMeasure`, `crop_size`, `crop_sizes`, `crop_origins`;
- `btkjax.deblend.scarlet`: `Scarlet2Measure` (imports scarlet2 only when called);
- `btkjax.deblend.chunks`: the padded-chunk loop (`apply_chunked`) and `default_chunk`.
- `ForwardModelMeasure`: a BTK measure function (``f(batch, idx, **kwargs)``) that fits the
  whole batch once (SEP detections, each blend on its own window around them: `crop_sizes`,
  `crop_origins`; one fit per window size) and serves each blend from a cache.

Gradients for learning. `fit_unrolled` is differentiable in the images, the PSF, the sky and the
`Prior`, so a hyper-parameter can be trained by differentiating a metric of the fitted result.
For example, the mean of a log-normal prior on the half-light radius::

    import jax, jax.numpy as jnp, optax
    from btkjax import deblend

    def metric(log_hlr_mean):  # squared error of the fitted log-radii after 60 Adam steps
        prior = deblend.Prior(log_hlr_mean=log_hlr_mean, log_hlr_width=0.3)
        gal, _ = deblend.fit_unrolled(images, init, anchor, mask, psf_k, spec, sky,
                                      n_steps=60, prior=prior)
        return jnp.mean((jnp.log(gal.hlr) - jnp.log(true_hlr)) ** 2, where=mask)

    opt = optax.adam(0.1); theta = jnp.log(0.2); state = opt.init(theta)
    for _ in range(10):
        g = jax.grad(metric)(theta)
        updates, state = opt.update(g, state); theta = optax.apply_updates(theta, updates)

(``tests/test_deblend.py::test_learn_hlr_prior_through_unrolled_fit`` runs it.)
"""


from btkjax.deblend.chunks import apply_chunked, default_chunk
from btkjax.deblend.detector import (
    DETECTOR_FILE,
    Detector,
    detect,
    focal_loss,
    heatmap,
    heatmap_peaks,
    load_detector,
    save_detector,
    target,
)
from btkjax.deblend.errors import FisherErrors, fisher_errors
from btkjax.deblend.fit import FitOutput, fit, fit_unrolled
from btkjax.deblend.init import init_galaxies
from btkjax.deblend.measure import (
    BULGE_DISK_PRIOR,
    COADD_SEP_KWARGS,
    FLUX_ERROR_MODEL,
    NETWORK_DEBLEND_THRESHOLD,
    SERSIC_INDEX_PRIOR,
    FluxErrorModel,
    ForwardModelMeasure,
    coadd_detections,
    crop_origins,
    crop_size,
    crop_sizes,
    join_concentric,
    model_blendedness,
)
from btkjax.deblend.model import (
    FIT_MAXK_THRESHOLD,
    MODELS,
    STATUS_ADDED,
    STATUS_BAD_ERRORS,
    STATUS_CONVERGED,
    STATUS_MAX_STEPS,
    STATUS_NO_DETECTIONS,
    STATUS_NONFINITE,
    STATUS_OUTSIDE_STAMP,
    STATUS_TOO_MANY,
    FitResult,
    Galaxies,
    NLLTerms,
    Params,
    Prior,
    fit_spec,
    model_images,
    neg_log_likelihood,
    to_physical,
    to_sources,
    to_unconstrained,
    trace_count,
)
from btkjax.deblend.pipeline import (
    PaddedDetections,
    check_penalty,
    fit_blends,
    pad_detections,
    ring_threshold,
)
from btkjax.deblend.priors import catalog_prior, colour_prior
from btkjax.deblend.residual import (
    MergeCandidates,
    ResidualPeaks,
    SplitCandidates,
    asymmetry_peaks,
    merge_candidates,
    mirror,
    residual_peaks,
    split_candidates,
)
from btkjax.deblend.scarlet import Scarlet2Measure, odd_psf_images

__all__ = [
    "Galaxies",
    "Params",
    "Prior",
    "FitResult",
    "FitOutput",
    "FisherErrors",
    "ResidualPeaks",
    "PaddedDetections",
    "NLLTerms",
    "STATUS_CONVERGED",
    "STATUS_MAX_STEPS",
    "STATUS_NO_DETECTIONS",
    "STATUS_OUTSIDE_STAMP",
    "STATUS_NONFINITE",
    "STATUS_TOO_MANY",
    "STATUS_BAD_ERRORS",
    "STATUS_ADDED",
    "MODELS",
    "FIT_MAXK_THRESHOLD",
    "init_galaxies",
    "to_unconstrained",
    "to_physical",
    "to_sources",
    "neg_log_likelihood",
    "model_images",
    "fit",
    "fit_unrolled",
    "fit_blends",
    "fisher_errors",
    "residual_peaks",
    "asymmetry_peaks",
    "mirror",
    "split_candidates",
    "SplitCandidates",
    "merge_candidates",
    "MergeCandidates",
    "catalog_prior",
    "colour_prior",
    "crop_origins",
    "crop_size",
    "crop_sizes",
    "default_chunk",
    "apply_chunked",
    "pad_detections",
    "ring_threshold",
    "check_penalty",
    "fit_spec",
    "ForwardModelMeasure",
    "SERSIC_INDEX_PRIOR", "BULGE_DISK_PRIOR",
    "FluxErrorModel", "FLUX_ERROR_MODEL", "model_blendedness",
    "COADD_SEP_KWARGS", "NETWORK_DEBLEND_THRESHOLD",
    "join_concentric",
    "coadd_detections",
    "Scarlet2Measure",
    "odd_psf_images",
    "trace_count",
    "Detector", "DETECTOR_FILE", "detect", "focal_loss", "heatmap", "heatmap_peaks",
    "load_detector", "save_detector", "target",
]
