"""The NN mosaic as the iterative solver's starting object, where the solver has no answer yet.

A flat object is the solver's usual start: every pixel must be pulled from
transmission 1, phase 0 to the sample by the data alone, which takes the
early passes. The live mosaic already holds a low-resolution picture of the
same region (amplitude and phase at the canvas pixel, :mod:`~hxn_liveptycho.nn.mosaic`),
so starting there leaves the solver only the detail the network smooths away.
Whether it helps is measured, not assumed: ``benchmarks/nn_seed.py``, and the
figures in docs/nn.md.

Three things make the mosaic a usable start:

- **Only where it is reliable.** The mosaic's coverage (summed blending
  weight) says how much of the probe's footprint stands behind each pixel;
  its rim, lit by a patch's tail only, is poor. The seed's weight rises
  linearly from 0 to 1 as coverage reaches ``full_coverage`` and the flat
  value (or the solver's own object) stays outside, so the seed has no edge
  the solver must first erase.
- **At the solver's scale.** The network's amplitude is relative and its
  phase has an arbitrary offset. Before the solver has its own object, the
  mosaic is scaled so its footprint-weighted mean power equals the flat
  guess's (the solver sets the probe's power from the data assuming that
  power, so the first passes' data error starts consistent) and its weighted
  mean phase equals the flat's, so it joins the flat value outside without
  a phase step. Once the solver holds an object, the scale is the
  least-squares complex factor onto that object where both are reliable,
  as the mosaic joins its own patches.
- **Never over what the solver already knows.** With ``current`` and the
  solver's own illumination, the seed goes where the solver has not yet
  got far (the region a new chunk of the scan brings): weight
  ``nn * (1 - solver)``. A live mosaic arrives after the solver has started
  on the frames it was made from, so each position's light counts in
  proportion to the passes it has had (:func:`maturity`,
  :func:`reseed_young_region`); counting only whether a position is lit
  would leave nothing to seed.

It sits in ``recon``, not ``nn``, because a live run applies it in the
solver's process (:mod:`~hxn_liveptycho.recon.worker_child`), on the
solver's own object, and ``recon`` imports nothing of ``nn``: all it needs of
the branch is the mosaic and coverage arrays of its snapshot.

Pure and over ``xp``: NumPy or CuPy arrays in; the result is CuPy when any input is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hxn_liveptycho.recon._windows import scatter_add_windows
from hxn_liveptycho.recon.backend import array_namespace

__all__ = [
    "MATURE_PASSES",
    "illumination",
    "maturity",
    "reliability",
    "reseed_young_region",
    "seed_object",
]

#: Passes over a position after which the solver's object there is kept over a newer
#: mosaic (benchmarks/nn_seed.py compares the choices).
MATURE_PASSES = 4

#: Summed weight below which a fit has nothing to go on (in the weights' own units).
_MIN_FIT_WEIGHT = 1e-6


def reliability(coverage: Any, full: float) -> Any:
    """Weight in [0, 1]: ``coverage / full``, clipped (``full`` > 0)."""
    if full <= 0:
        raise ValueError(f"full coverage must be > 0, got {full}")
    xp = array_namespace(coverage)
    return xp.clip(xp.asarray(coverage, dtype=xp.float32) / xp.float32(full), 0.0, 1.0)


def illumination(
    positions_px: Any,
    probe: Any,
    canvas_shape: tuple[int, int],
    weights: Any | None = None,
) -> Any:
    """Summed probe intensity over the windows at ``positions_px`` (k, 2) (y, x) top-left,
    rounded and clipped into the canvas as the solver does; divided by the probe's peak
    intensity, so 1 is one probe centre's worth of light. ``weights`` (k,) scales each
    position's share (:func:`maturity`: how far the solver has got with it)."""
    xp = array_namespace(probe)
    intensity = xp.abs(xp.asarray(probe)) ** 2
    intensity = (intensity / xp.maximum(intensity.max(), 1e-30)).astype(xp.float32)
    n = intensity.shape[-1]
    h, w = int(canvas_shape[0]), int(canvas_shape[1])
    out = xp.zeros((h, w), dtype=xp.float32)
    corners = np.rint(np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)).astype(int)
    corners[:, 0] = np.clip(corners[:, 0], 0, h - n)
    corners[:, 1] = np.clip(corners[:, 1], 0, w - n)
    shares = np.ones(len(corners)) if weights is None else np.asarray(weights, np.float64)
    if shares.shape != (len(corners),):
        raise ValueError(f"weights {shares.shape} must have one value per position")
    # Shares take few values (maturity steps): one scatter of one window per value, a
    # single kernel each on CuPy rather than a launch per position.
    shares32 = shares.astype(np.float32)
    for share in np.unique(shares32[shares32 > 0]):
        group = corners[shares32 == share].astype(np.int32)
        scatter_add_windows(out, xp.asarray(group), share * intensity, xp)
    return out


def maturity(passes_seen: Any, mature_passes: int) -> np.ndarray:
    """Per position, in [0, 1]: the passes the solver has run over it (since it arrived)
    over ``mature_passes``. A region the solver has only just started on is still worse
    than the mosaic, so a seed that arrives after the frames it was made from may still
    replace it, in proportion to what the solver has not yet done."""
    if mature_passes < 1:
        raise ValueError(f"mature_passes must be >= 1, got {mature_passes}")
    seen = np.asarray(passes_seen, np.float64)
    return np.clip(seen / mature_passes, 0.0, 1.0)


def seed_object(
    mosaic: Any,
    coverage: Any,
    canvas_shape: tuple[int, int],
    *,
    flat: complex = 1.0,
    full_coverage: float = 1.0,
    current: Any | None = None,
    solver_light: Any | None = None,
    solver_full: float = 1.0,
) -> Any:
    """The solver's object (complex64, ``canvas_shape``) with the NN mosaic where it helps.

    ``mosaic`` and ``coverage`` are the NN branch's snapshot (``object`` and
    ``coverage``, on the run's canvas). Without ``current``: a start for a new
    solver, ``flat`` outside the mosaic's reliable region, the mosaic scaled to
    the flat guess's power and phase inside. With ``current`` (the solver's
    object) and ``solver_light`` (its :func:`illumination` so far, full at
    ``solver_full``): the mosaic fills in proportion to what the solver has not
    lit, scaled onto ``current`` where both are reliable; ``current`` itself is
    not modified.
    """
    h, w = int(canvas_shape[0]), int(canvas_shape[1])
    # The arrays' module: the solver's object's (a CuPy one takes the host mosaic to it).
    xp = array_namespace(mosaic, coverage, current, solver_light)
    image = xp.asarray(mosaic, dtype=xp.complex64)
    coverage = xp.asarray(coverage, dtype=xp.float32)
    if image.shape != (h, w) or coverage.shape != (h, w):
        raise ValueError(
            f"mosaic {image.shape} and coverage {coverage.shape} must be the canvas {(h, w)}"
        )
    nn = reliability(coverage, full_coverage)
    if current is None:
        base = xp.full((h, w), complex(flat), dtype=xp.complex64)
        seed_weight = nn
        scale = _scale_to_flat(image, nn, complex(flat), xp)
    else:
        base = xp.asarray(current, dtype=xp.complex64)
        if base.shape != (h, w):
            raise ValueError(f"current object {base.shape} is not the canvas {(h, w)}")
        solver = (
            xp.zeros((h, w), xp.float32)
            if solver_light is None
            else reliability(xp.asarray(solver_light), solver_full)
        )
        seed_weight = nn * (1 - solver)
        overlap = nn * solver
        if float(overlap.sum()) > _MIN_FIT_WEIGHT:
            scale = _least_squares_scale(image, base, overlap, xp)
        else:  # nothing lit by both yet: the solver's scale is still the flat guess's
            scale = _scale_to_flat(image, nn, complex(flat), xp)
    if scale == 0:  # an empty or all-zero mosaic: nothing to seed with
        return base.copy()
    seeded = base + seed_weight * (scale * image - base)
    return seeded.astype(xp.complex64)


def _scale_to_flat(image: Any, weight: Any, flat: complex, xp: Any) -> complex:
    """c such that ``c * image`` has the flat guess's weighted mean power and mean phase."""
    total = float(weight.sum())
    if total <= _MIN_FIT_WEIGHT:
        return 0.0j
    power = float((weight * xp.abs(image) ** 2).sum()) / total
    if power <= 0:
        return 0.0j
    mean = complex((weight * image).sum())
    offset = np.angle(flat) - (np.angle(mean) if mean != 0 else 0.0)
    return complex(abs(flat) / np.sqrt(power) * np.exp(1j * offset))


def _least_squares_scale(image: Any, reference: Any, weight: Any, xp: Any) -> complex:
    """argmin_c sum weight |c image - reference|^2."""
    norm = float((weight * xp.abs(image) ** 2).sum())
    if norm <= 0:
        return 0.0j
    return complex((weight * xp.conj(image) * reference).sum()) / norm


def reseed_young_region(
    current: Any,
    mosaic: Any,
    coverage: Any,
    positions_px: Any,
    probe: Any,
    passes_seen: Any,
    *,
    mature_passes: int = MATURE_PASSES,
    full_coverage: float = 1.0,
) -> Any:
    """The solver's object ``current`` with the mosaic where the solver is still young: what
    a live run does when a newer mosaic arrives while the solver runs.

    ``positions_px`` (k, 2) are the solver's active positions, ``passes_seen`` (k,) how many
    passes each has had since it arrived, ``probe`` its current probe. Each position's
    light counts in proportion to its :func:`maturity`, so the region a chunk has just
    brought takes the mosaic even when the mosaic arrives after the solver's first pass
    over it, and what the solver has worked on for ``mature_passes`` is kept.
    """
    shape = (int(current.shape[0]), int(current.shape[1]))
    light = illumination(positions_px, probe, shape, maturity(passes_seen, mature_passes))
    return seed_object(
        mosaic, coverage, shape, full_coverage=full_coverage, current=current, solver_light=light
    )
