"""A global model of how the stage put the probe where it did: affine map plus slow drift.

Stage errors at a scanning microscope are mostly global: an encoder's scale,
the angle between the stage axes and the detector (rotation), the axes not
being square (shear), and thermal drift that moves the whole scan slowly in
time. Per-position refinement estimates each position alone and is weak where
the object is flat; a model with a handful of parameters pools every
position's evidence. The displacement of the positions ``p`` (N, 2) (y, x)
from the measured ones ``p0`` is modelled as

    p - p0 = (A - I) (p0 - c) + t + d(tau),   d(tau) = sum_k c_k tau^k, k = 1..degree,

``c`` the mean measured position, ``A`` a 2 x 2 matrix, ``t`` an offset and
``tau = frame / (n_frames - 1)`` the acquisition time (frames in the order they
were recorded) in [0, 1]; ``d(0) = 0``, so ``t`` is the offset at the first
frame.

The fit is robust: iteratively reweighted least squares with Huber weights on
each position's 2-D residual length ``e_i``. The scale is ``sigma = 1.4826 x
median(e)`` (at least :data:`MIN_SCALE_PX`); a position with ``e_i <= 1.345
sigma`` weighs 1, one beyond weighs ``1.345 sigma / e_i``, so a few bad positions
(a frame taken while the stage was still settling, a wrong encoder read) pull
on the fit with a bounded force instead of their squared distance.

On a raster scan read in row order, time is very nearly a linear function of
the position (``tau ~ row / rows``): a linear drift and the slow axis' scale and
shear then predict the same positions and the data cannot tell them apart. The
fit still predicts the positions; :attr:`PositionModel.separable` says whether
the split between affine and drift is determined (a spiral scan, a snake
scan, or a drift of degree >= 2 make it so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_SCALE_PX", "PositionModel", "affine_matrix", "fit_position_model"]

#: Floor of the robust residual scale (px): exact synthetic positions have a zero median
#: residual, and the Huber weights need a positive scale.
MIN_SCALE_PX = 1e-9
#: Huber's tuning constant (95 % efficiency for Gaussian residuals), in units of the scale.
HUBER_K = 1.345
#: Most reweighting rounds of the robust fit; it stops earlier once the weights settle.
MAX_ROUNDS = 50
#: Smallest ratio of the design's singular values (columns standardised) for which the
#: split between affine and drift counts as determined: below it, a position error is
#: amplified by more than ten in that split (a jittered raster read in row order sits far
#: below, a spiral well above).
SEPARABLE_RATIO = 0.1


def affine_matrix(
    scale_y: float = 1.0, scale_x: float = 1.0, rotation_deg: float = 0.0, shear: float = 0.0
) -> np.ndarray:
    """The (y, x) matrix ``A`` of named distortions; :class:`PositionModel` reports the inverse.

    In (x, y) order ``A = R(rotation) diag(scale_x, scale_y) [[1, shear], [0, 1]]``:
    the shear moves x by ``shear`` per unit of y, then the axes are scaled, then
    rotated from the x axis towards the y axis.
    """
    th = math.radians(rotation_deg)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m_xy = rot @ np.diag([scale_x, scale_y]) @ np.array([[1.0, shear], [0.0, 1.0]])
    return m_xy[::-1, ::-1].copy()  # (x, y) -> (y, x): reverse both axes


@dataclass(frozen=True)
class PositionModel:
    """A fitted global position model (see the module docstring); positions in pixels (y, x)."""

    matrix: np.ndarray  # A (2, 2), (y, x) order
    offset: np.ndarray  # t (2,) px
    drift: np.ndarray  # c_k (degree, 2) px, coefficient of tau^k for k = 1..degree
    centre: np.ndarray  # c (2,) px
    n_frames: int  # frames the time axis was normalised by (tau = frame / (n_frames - 1))
    separable: bool
    downweighted: int  # positions the robust fit gave less than full weight
    rms_residual_px: float  # RMS of the 2-D residual length over the inliers

    def displacement(self, measured: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Model displacement ``p - p0`` (N, 2) at measured positions and frame indices."""
        d = (np.asarray(measured, np.float64) - self.centre) @ (self.matrix - np.eye(2)).T
        tau = np.asarray(frames, np.float64) / max(self.n_frames - 1, 1)
        for k, coeff in enumerate(self.drift, start=1):
            d = d + tau[:, None] ** k * coeff[None, :]
        return d + self.offset[None, :]

    def predict(self, measured: np.ndarray, frames: np.ndarray) -> np.ndarray:
        """Model positions (N, 2) for measured positions taken at ``frames``."""
        return np.asarray(measured, np.float64) + self.displacement(measured, frames)

    def _decomposed(self) -> tuple[float, float, float, float]:
        """(scale_y, scale_x, rotation_deg, shear): the inverse of :func:`affine_matrix`."""
        q, r = np.linalg.qr(self.matrix[::-1, ::-1])  # (x, y) order
        signs = np.where(np.diag(r) < 0, -1.0, 1.0)
        q, r = q * signs[None, :], r * signs[:, None]
        if np.linalg.det(q) < 0:  # a mirror: report it as a negative y scale
            q[:, 1] *= -1
            r[1] *= -1
        rotation = math.degrees(math.atan2(q[1, 0], q[0, 0]))
        return float(r[1, 1]), float(r[0, 0]), rotation, float(r[0, 1] / r[0, 0])

    @property
    def drift_total_px(self) -> np.ndarray:
        """Drift (y, x) px from the first frame to the last."""
        return self.drift.sum(axis=0) if len(self.drift) else np.zeros(2)

    def summary(self, pixel_size_m: float | None = None) -> dict[str, float]:
        """Named quantities, flat floats (for a snapshot, a log line or Tiled metadata).

        Scales are dimensionless (1 = the encoders are right), rotation in degrees,
        shear dimensionless, offsets and drift in pixels and, with ``pixel_size_m``,
        metres; the drift per frame is the mean rate over the scan.
        """
        scale_y, scale_x, rotation, shear = self._decomposed()
        total = self.drift_total_px
        per_frame = total / max(self.n_frames - 1, 1)
        out = {
            "scale_y": scale_y,
            "scale_x": scale_x,
            "rotation_deg": rotation,
            "shear": shear,
            "offset_y_px": float(self.offset[0]),
            "offset_x_px": float(self.offset[1]),
            "drift_total_y_px": float(total[0]),
            "drift_total_x_px": float(total[1]),
            "drift_per_frame_y_px": float(per_frame[0]),
            "drift_per_frame_x_px": float(per_frame[1]),
            "separable": float(self.separable),
            "downweighted": float(self.downweighted),
            "rms_residual_px": self.rms_residual_px,
        }
        if pixel_size_m is not None:
            for key in [k for k in out if k.endswith("_px") and not k.startswith("rms")]:
                out[key[:-3] + "_m"] = out[key] * pixel_size_m
        return out


def _design(measured: np.ndarray, tau: np.ndarray, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Columns ``[p0y - cy, p0x - cx, 1, tau, ..., tau^degree]`` and the centre ``c``."""
    centre = measured.mean(axis=0)
    cols = [measured[:, 0] - centre[0], measured[:, 1] - centre[1], np.ones(len(tau))]
    cols += [tau**k for k in range(1, degree + 1)]
    return np.stack(cols, axis=1), centre


def _is_separable(x: np.ndarray) -> bool:
    """Whether the columns are far from dependent (each standardised; the constant dropped)."""
    cols = np.delete(x, 2, axis=1)
    cols = cols - cols.mean(axis=0)
    norms = np.linalg.norm(cols, axis=0)
    if np.any(norms <= 0):
        return False
    sv = np.linalg.svd(cols / norms, compute_uv=False)
    return bool(sv[-1] >= SEPARABLE_RATIO * sv[0])


def fit_position_model(
    measured: np.ndarray,
    positions: np.ndarray,
    frames: np.ndarray | None = None,
    *,
    drift_degree: int = 1,
    weights: np.ndarray | None = None,
) -> PositionModel:
    """Robust least-squares fit of ``positions ~ model(measured, frames)`` (module docstring).

    ``measured`` and ``positions`` (N, 2) (y, x) px; ``frames`` (N,) the acquisition
    index of each position (default ``0..N-1``, the order given); ``drift_degree``
    0 fits the affine map alone; ``weights`` (N,) >= 0 leaves positions out
    (0) or trusts them less. Needs more positions than parameters per axis
    (``3 + drift_degree``).
    """
    p0 = np.asarray(measured, dtype=np.float64).reshape(-1, 2)
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    if p0.shape != p.shape:
        raise ValueError(f"measured {p0.shape} and positions {p.shape} differ in shape")
    if drift_degree < 0:
        raise ValueError(f"drift_degree must be >= 0, got {drift_degree}")
    n = len(p0)
    f = np.arange(n, dtype=np.float64) if frames is None else np.asarray(frames, np.float64)
    if f.shape != (n,):
        raise ValueError(f"frames must have shape ({n},), got {f.shape}")
    prior = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    used = prior > 0
    if int(used.sum()) <= 3 + drift_degree:
        raise ValueError(
            f"{int(used.sum())} positions cannot fit {3 + drift_degree} parameters per axis"
        )
    n_frames = int(f[used].max()) + 1 if used.any() else 1
    x, centre = _design(p0, f / max(n_frames - 1, 1), drift_degree)
    target = p - p0
    robust = np.ones(n)
    coeffs = np.zeros((x.shape[1], 2))
    for _ in range(MAX_ROUNDS):
        w = np.sqrt(prior * robust)
        coeffs, *_ = np.linalg.lstsq(x * w[:, None], target * w[:, None], rcond=None)
        e = np.linalg.norm(target - x @ coeffs, axis=1)
        scale = max(1.4826 * float(np.median(e[used])), MIN_SCALE_PX)
        limit = HUBER_K * scale
        new = np.where(e <= limit, 1.0, limit / np.maximum(e, 1e-300))
        if np.max(np.abs(new - robust)) < 1e-6:
            robust = new
            break
        robust = new
    inliers = used & (robust >= 1.0)
    residual = np.linalg.norm(target - x @ coeffs, axis=1)
    return PositionModel(
        matrix=np.eye(2) + coeffs[:2].T,
        offset=coeffs[2].copy(),
        drift=coeffs[3:].copy(),
        centre=centre,
        n_frames=n_frames,
        separable=_is_separable(x[used]) if drift_degree else True,
        downweighted=int(used.sum() - inliers.sum()),
        rms_residual_px=float(np.sqrt(np.mean(residual[inliers] ** 2))) if inliers.any() else 0.0,
    )
