"""Live quality of a reconstruction: where the object is constrained, where the model fails
to explain the data, and whether the solver is still improving.

Pure functions of arrays over ``xp`` (NumPy or CuPy, inferred from the inputs), with no
solver internals: the solver process calls them on its state when it builds a snapshot
(:mod:`~hxn_liveptycho.recon.worker_child`), so the scientist sees with every live picture
how far to trust it. They cost one scatter of the probe per position (the maps) and one
forward pass over the positions (:func:`position_fit`), which is why they run at
snapshot time only, never every pass, and can be turned off (:class:`QualitySettings`).

The forward model is the solver's (:mod:`~hxn_liveptycho.recon.forward`): exit waves
``P_k O_m[window]``, unnormalised FFT, model amplitude ``sqrt(sum_{m,k} |Psi_mk|^2)``
compared with the measured amplitudes on the valid pixels; windows cut at the whole pixel
below a sub-pixel position with the probe shifted by the fraction.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hxn_liveptycho.recon._batch import WHOLE_PIXEL_TOL
from hxn_liveptycho.recon._positions import fraction_ramps, shifted_probes
from hxn_liveptycho.recon._windows import gather_windows, scatter_add_windows
from hxn_liveptycho.recon.backend import array_namespace, fft2, ifft2, to_host

__all__ = [
    "Convergence",
    "PositionFit",
    "QualitySettings",
    "constrained_mask",
    "convergence",
    "coverage",
    "error_map",
    "position_count",
    "position_fit",
    "window_corners",
]


class QualitySettings(BaseModel):
    """The live quality maps and convergence flag sent with every snapshot."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    maps: bool = Field(
        True,
        description="Compute the coverage maps (illumination and positions per pixel) with "
        "every snapshot and write them under live/ and final/.",
    )
    error_map: bool = Field(
        True,
        description="Also compute each position's data error and its map with every "
        "snapshot: one forward pass over all positions in the solver process, at snapshot "
        "time only (off: no error map, no per-position errors).",
    )
    footprint_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="A pixel is inside a position's probe footprint where the probe's "
        "intensity sum_k |P_k|^2 is above this fraction of its maximum (a fraction, 0-1); "
        "the error map leaves out (0) pixels lit by less than this in all.",
    )
    min_positions: int = Field(
        2,
        ge=1,
        description="A pixel is constrained when at least this many positions' footprints "
        "cover it (and its illumination passes `illumination_fraction`).",
    )
    illumination_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="A pixel is constrained only where its summed illumination is above this "
        "fraction of the coverage map's maximum (a fraction, 0-1).",
    )
    convergence_window: int = Field(
        10,
        ge=1,
        description="Iterations over which the error's relative improvement per iteration "
        "is measured for the convergence flag.",
    )
    convergence_tolerance: float = Field(
        1e-3,
        gt=0.0,
        description="The run is flagged converged when the error improved by less than this "
        "fraction per iteration over the last `convergence_window` iterations (a relative "
        "rate per iteration).",
    )
    resolution: bool = Field(
        False,
        description="Estimate the resolution while the scan runs: two more solvers, each "
        "fed one of two interleaved halves of the positions, make one pass each time the main "
        "solver makes one, and every snapshot carries where their Fourier ring correlation "
        "falls below the half-bit threshold (a half-period in nm, or in object pixels when "
        "the pixel size is not known). Off by default: it costs about one more "
        "reconstruction in time per pass and in memory.",
    )


@dataclass(frozen=True)
class Convergence:
    """Whether the error is still falling: see :func:`convergence` for the rule."""

    #: Relative improvement per iteration over the window (negative: the error rose); NaN
    #: while the history is shorter than the window.
    rate: float
    converged: bool
    window: int
    tolerance: float

    def as_dict(self) -> dict[str, float | bool | int | None]:
        """JSON-ready (a rate that is not finite is None), for metadata and the live page."""
        rate = self.rate if math.isfinite(self.rate) else None
        return {
            "rate": rate,
            "converged": self.converged,
            "window": self.window,
            "tolerance": self.tolerance,
        }


def convergence(error_history: Sequence[float], window: int, tolerance: float) -> Convergence:
    """The error's relative improvement per iteration over the last ``window`` iterations.

    Rule: with ``e0`` the error ``window`` iterations ago and ``e1`` the last one,
    ``rate = 1 - (e1 / e0) ** (1 / window)``, the geometric mean of the per-iteration
    relative improvement (0.01: one percent less error per iteration). ``converged`` is
    ``rate < tolerance``: the solver no longer improves the fit by a useful amount per
    iteration (a rising error, ``rate < 0``, is not improving either). Fewer than
    ``window + 1`` finite errors: ``rate`` NaN and not converged (too early to say).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    history = np.asarray(error_history, dtype=np.float64)
    if history.size < window + 1:
        return Convergence(float("nan"), False, window, tolerance)
    first, last = float(history[-window - 1]), float(history[-1])
    if not (math.isfinite(first) and math.isfinite(last)) or first < 0 or last < 0:
        return Convergence(float("nan"), False, window, tolerance)
    if first == 0.0:
        rate = 0.0 if last == 0.0 else -math.inf
    else:
        rate = 1.0 - (last / first) ** (1.0 / window)
    return Convergence(rate, rate < tolerance, window, tolerance)


def window_corners(positions_px: Any, *, subpixel: bool = True) -> np.ndarray:
    """Top-left corners (N, 2) int32 (host) of the windows the solver cuts at ``positions_px``.

    As the solver does: positions within float noise of a whole pixel are that pixel;
    otherwise the window starts at the whole pixel below (``subpixel``: the probe is
    shifted by the rest) or at the nearest one (not ``subpixel``: the solver rounds).
    """
    pos = np.asarray(_host(positions_px), dtype=np.float64).reshape(-1, 2)
    whole = np.rint(pos)
    snapped = np.where(np.abs(pos - whole) < WHOLE_PIXEL_TOL, whole, pos)
    return (np.floor(snapped) if subpixel else whole).astype(np.int32)


def coverage(positions_px: Any, probe_modes: Any, canvas_shape: tuple[int, int]) -> Any:
    """The illumination (dose) map (H, W) float32: ``sum_j sum_k |P_k|^2`` with each
    position's probe intensity placed at its window. Where it is low, the object there
    was barely seen and its value is the initial guess. A position's sub-pixel part is
    not applied (the map is at whole-pixel windows, less than a pixel off)."""
    xp = array_namespace(probe_modes)
    return _scatter_at(positions_px, _intensity(probe_modes, xp), canvas_shape, xp)


def position_count(
    positions_px: Any, probe_modes: Any, canvas_shape: tuple[int, int], fraction: float
) -> Any:
    """How many positions' probe footprints cover each pixel (H, W) int32; a footprint is
    where ``sum_k |P_k|^2`` is above ``fraction`` of its maximum."""
    xp = array_namespace(probe_modes)
    intensity = _intensity(probe_modes, xp)
    footprint = (intensity > fraction * xp.max(intensity)).astype(xp.float32)
    counts = _scatter_at(positions_px, footprint, canvas_shape, xp)
    return xp.rint(counts).astype(xp.int32)


def constrained_mask(counts: Any, illumination: Any, settings: QualitySettings) -> Any:
    """Pixels (H, W) bool the data constrain: covered by at least ``min_positions``
    footprints and lit above ``illumination_fraction`` of the map's maximum."""
    xp = array_namespace(counts, illumination)
    lit = illumination > settings.illumination_fraction * xp.max(illumination)
    return (counts >= settings.min_positions) & lit


@dataclass(frozen=True)
class PositionFit:
    """Each position's error and the sums it is made of (:func:`position_fit`), arrays
    (N,) float32 on the inputs' array module."""

    #: ``misfit / power``: each position's normalised amplitude error.
    errors: Any
    #: ``sum (|Psi_j| - A_j)^2`` over the valid pixels.
    misfit: Any
    #: ``sum A_j^2`` of the cleaned, masked amplitudes.
    power: Any

    def state_error(self, power: Any | None = None) -> float:
        """The error of the whole state, ``sum_j misfit_j / sum_j power_j``: the solver's
        :meth:`~hxn_liveptycho.recon.iterative.StreamingSolver.state_error` from this
        pass. ``power``: the data power to divide by instead of the positions' sum (the
        solver's own running ``sum A^2``, so that the figure is the solver's to the
        rounding of the misfits). NaN with no positions, as the solver's."""
        if int(self.misfit.shape[0]) == 0:
            return float("nan")
        total = float(np.sum(_host(self.misfit), dtype=np.float64))
        if power is None:
            power = np.sum(_host(self.power), dtype=np.float64)
        return total / max(float(_host(power)), 1e-30)


def position_fit(
    object_modes: Any,
    probe_modes: Any,
    positions_px: Any,
    amplitudes: Any,
    *,
    valid: Any | None = None,
    fft_order: bool = False,
    subpixel: bool = True,
    batch_size: int = 64,
    position_probes: Callable[[slice], Any] | Any | None = None,
) -> PositionFit:
    """Each position's normalised amplitude error (N,) float32 of the state as it is:
    ``sum (|Psi_j| - A_j)^2 / sum A_j^2`` over the valid pixels, ``|Psi_j|^2 = sum_{m,k}
    |fft2(P_k O_m[window_j])|^2`` (unnormalised FFT: the solver's scale). One forward
    pass over the positions in batches of ``batch_size``; nothing is changed.

    ``object_modes`` (H, W) or (M, H, W); ``probe_modes`` (n, n) or (K, n, n);
    ``amplitudes`` (N, n, n) with zero frequency at the centre, or in FFT order with
    ``fft_order`` (how the solver stores them). Amplitudes are cleaned as the solver
    cleans them on arrival (non-finite and negative to 0, masked pixels to 0) and
    ``valid`` ((n, n) bool, same order as the amplitudes) masks the difference as the
    solver's does. ``subpixel``: whether the solver shifts the probe by the positions'
    fractions (``subpixel_positions`` or ``position_refinement``); else windows are cut
    at the nearest pixel, as the solver then does. A frame with no signal (``sum A^2``
    0) divides by a tiny floor, as the solver's error does: it shows as a bad frame.

    ``position_probes``: each position's own first probe mode, unshifted, where the probe
    varies from position to position (OPR, :func:`~hxn_liveptycho.recon.opr.position_probes`):
    an (N, n, n) array, or a function of a slice of the positions that gives theirs
    (B, n, n), so that only a batch's probes are made at a time. It replaces mode 0 of
    ``probe_modes`` position by position; the other modes stay shared. Judged by the
    shared mode instead, a position where the probe drifted would show the drift as error.

    Returns the errors with the sums they are made of (:class:`PositionFit`), from which
    the solver's error of the whole state follows without a second forward pass
    (:meth:`PositionFit.state_error`).
    """
    xp = array_namespace(object_modes, probe_modes, amplitudes)
    objects = xp.asarray(object_modes)
    objects = objects[None] if objects.ndim == 2 else objects
    probes = xp.asarray(probe_modes, dtype=xp.complex64)
    probes = probes[None] if probes.ndim == 2 else probes
    n = probes.shape[-1]
    pos = np.asarray(_host(positions_px), dtype=np.float64).reshape(-1, 2)
    corners = window_corners(pos, subpixel=subpixel)
    fractions = (pos - corners).astype(np.float32)
    shifted = subpixel and bool(np.any(np.abs(fractions) >= WHOLE_PIXEL_TOL))
    mask = None
    if valid is not None:
        mask = xp.asarray(valid).astype(bool)
        mask = mask if fft_order else xp.fft.ifftshift(mask)
    probe_ft = fft2(probes, xp=xp) if shifted and position_probes is None else None
    misfits, powers = [], []
    for start in range(0, len(pos), batch_size):
        part = slice(start, min(start + batch_size, len(pos)))
        amps = xp.asarray(amplitudes[part], dtype=xp.float32)
        amps = amps if fft_order else xp.fft.ifftshift(amps, axes=(-2, -1))
        amps = xp.maximum(xp.where(xp.isfinite(amps), amps, 0), 0)
        if mask is not None:
            amps = amps * mask
        if position_probes is not None:
            batch_probes = _own_probes(probes, position_probes, part, xp)  # (B, K, n, n)
            if shifted:
                ramps = fraction_ramps(xp.asarray(fractions[part]), n, xp)
                spectra = fft2(batch_probes, xp=xp, overwrite_x=True)
                spectra *= ramps[:, None]
                batch_probes = ifft2(spectra, xp=xp, overwrite_x=True)
        elif probe_ft is not None:
            ramps = fraction_ramps(xp.asarray(fractions[part]), n, xp)
            batch_probes = shifted_probes(probe_ft, ramps, xp)  # (B, K, n, n)
        else:
            batch_probes = probes[None]
        dev_corners = xp.asarray(corners[part])
        inten = xp.zeros(amps.shape, dtype=xp.float32)
        for obj in objects:
            windows = gather_windows(xp.ascontiguousarray(obj), dev_corners, n, xp)
            far = fft2(windows[:, None] * batch_probes, xp=xp)
            inten += xp.sum(far.real**2 + far.imag**2, axis=1, dtype=xp.float32)
        diff = xp.sqrt(inten) - amps
        if mask is not None:
            diff *= mask
        err = xp.sum(diff**2, axis=(-2, -1))
        power = xp.sum(amps**2, axis=(-2, -1))
        misfits.append(err.astype(xp.float32))
        powers.append(power.astype(xp.float32))
    if not misfits:
        empty = xp.zeros(0, dtype=xp.float32)
        return PositionFit(empty, empty, empty)
    misfit, power = xp.concatenate(misfits), xp.concatenate(powers)
    errors = (misfit / xp.maximum(power, 1e-30)).astype(xp.float32)
    return PositionFit(errors, misfit, power)


def _own_probes(
    probes: Any, position_probes: Callable[[slice], Any] | Any, part: slice, xp: types.ModuleType
) -> Any:
    """The probe modes (B, K, n, n) of the positions ``part``: mode 0 each one's own
    (:func:`position_fit`'s ``position_probes``), the others the shared ``probes``."""
    own = position_probes(part) if callable(position_probes) else position_probes[part]
    own = xp.asarray(own, dtype=xp.complex64)
    out = xp.empty((own.shape[0], *probes.shape), dtype=xp.complex64)
    out[:] = probes[None]
    out[:, 0] = own
    return out


def error_map(
    positions_px: Any,
    errors: Any,
    probe_modes: Any,
    canvas_shape: tuple[int, int],
    *,
    min_weight: float = 0.1,
) -> Any:
    """The per-position ``errors`` spread over the canvas (H, W) float32: at each pixel the
    average of the errors of the positions that light it, weighted by each one's probe
    intensity there, ``sum_j e_j w_j / sum_j w_j`` with ``w = sum_k |P_k|^2 / max``. A bad
    frame or a settling row shows where it is. Pixels lit by less than ``min_weight`` of
    one probe's peak in all (only the probe's faint tails reach them, and their average
    would be noise) are 0."""
    xp = array_namespace(probe_modes, errors)
    intensity = _intensity(probe_modes, xp)
    intensity = intensity / xp.maximum(xp.max(intensity), 1e-30)
    corners = xp.asarray(window_corners(positions_px))
    h, w = int(canvas_shape[0]), int(canvas_shape[1])
    weights = xp.zeros((h, w), dtype=xp.float32)
    weighted = xp.zeros((h, w), dtype=xp.float32)
    scatter_add_windows(weights, corners, intensity, xp)
    values = xp.asarray(errors, dtype=xp.float32)[:, None, None] * intensity[None]
    scatter_add_windows(weighted, corners, xp.ascontiguousarray(values), xp)
    lit = weights >= min_weight
    return xp.where(lit, weighted / xp.maximum(weights, 1e-30), 0).astype(xp.float32)


def _intensity(probe_modes: Any, xp: types.ModuleType) -> Any:
    """``sum_k |P_k|^2`` (n, n) float32 of (n, n) or (K, n, n) probe modes."""
    probes = xp.asarray(probe_modes)
    probes = probes[None] if probes.ndim == 2 else probes
    return xp.sum(probes.real**2 + probes.imag**2, axis=0).astype(xp.float32)


def _scatter_at(
    positions_px: Any, window: Any, canvas_shape: tuple[int, int], xp: types.ModuleType
) -> Any:
    """``window`` (n, n) float32 added onto a zero canvas at every position's window."""
    canvas = xp.zeros((int(canvas_shape[0]), int(canvas_shape[1])), dtype=xp.float32)
    corners = xp.asarray(window_corners(positions_px))
    scatter_add_windows(canvas, corners, xp.ascontiguousarray(window), xp)
    return canvas


def _host(x: Any) -> np.ndarray:
    """Positions as host NumPy (they are small; the corners are cut on the host)."""
    return to_host(x)
