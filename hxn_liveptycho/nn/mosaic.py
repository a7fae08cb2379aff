"""The live mosaic: single-shot predictions placed at their measured positions and blended.

One frame tells the object only up to a constant phase (the far field does not
see it) and, after the network's normalisation, up to a scale. Each new patch
is therefore matched to what the mosaic already holds where they overlap (the
least-squares complex factor, weighted by both footprints) before it is added,
so the patches join into one object instead of a quilt of offsets. Blending
weights are the probe footprint's intensity on the patch.
"""

from __future__ import annotations

import numpy as np

#: Overlap (as a fraction of a patch's total weight) below which a patch is not matched.
_MIN_OVERLAP = 0.05


class Mosaic:
    """A growing, weighted blend of complex patches on a fixed canvas (not thread-safe).

    With ``scale`` s > 1 the patches are at s times the canvas pixel (a model run
    at a larger crop than its own, :mod:`hxn_liveptycho.nn.resample`): they are
    blended on a grid s times coarser, at positions rounded to its pixel (half
    a network pixel at most, below what the network resolves), and the result
    is interpolated onto the canvas when read. Interpolating each patch instead
    gave the same picture at several times the cost per frame.
    """

    def __init__(
        self,
        canvas_shape: tuple[int, int],
        window: int,
        weight: np.ndarray,
        *,
        scale: int = 1,
    ) -> None:
        weight = np.asarray(weight, dtype=np.float32)
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"weight must be a square patch, got {weight.shape}")
        if weight.shape[0] * scale > window:
            raise ValueError(f"patch {weight.shape} x {scale} is larger than the window {window}")
        self.canvas_shape = (int(canvas_shape[0]), int(canvas_shape[1]))
        self.window = int(window)
        self.scale = int(scale)
        self.patch = weight.shape[0]
        #: Patch offset inside the probe window (canvas pixels): the network predicts the
        #: window's centre.
        self.inset = (self.window - self.patch * self.scale) // 2
        self.weight = self._normalised(weight)
        s = self.scale
        self._grid = (-(-self.canvas_shape[0] // s), -(-self.canvas_shape[1] // s))
        self._num = np.zeros(self._grid, np.complex64)
        self._den = np.zeros(self._grid, np.float32)
        self.placed = 0
        self.outside = 0

    @staticmethod
    def _normalised(weight: np.ndarray) -> np.ndarray:
        return weight / max(float(weight.max()), 1e-12)

    def set_weight(self, weight: np.ndarray) -> None:
        """Blend the patches added from now on with ``weight`` (same shape as before): the
        run's probe became known after the first patches, which keep the weight they had."""
        weight = np.asarray(weight, dtype=np.float32)
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight must be {self.weight.shape}, got {weight.shape}")
        self.weight = self._normalised(weight)

    def add(self, amplitude: np.ndarray, phase: np.ndarray, top_left_px: np.ndarray) -> None:
        """Blend patches (k, m, m) whose probe windows start at ``top_left_px`` (k, 2) (y, x)
        in canvas pixels."""
        self.add_complex(to_complex(amplitude, phase), top_left_px)

    def add_complex(self, patches: np.ndarray, top_left_px: np.ndarray) -> None:
        """Blend complex patches (k, m, m); see :meth:`add`."""
        pos = np.asarray(top_left_px, dtype=np.float64).reshape(-1, 2) + self.inset
        pos = np.rint(pos / self.scale).astype(int)
        m = self.patch
        h, w = self._grid
        for patch, (y, x) in zip(np.asarray(patches, np.complex64), pos, strict=True):
            if y < 0 or x < 0 or y + m > h or x + m > w:
                self.outside += 1
                continue
            num = self._num[y : y + m, x : x + m]
            den = self._den[y : y + m, x : x + m]
            overlap = self.weight * den
            if overlap.sum() > _MIN_OVERLAP * self.weight.sum():
                current = num / np.maximum(den, 1e-12)
                match = np.vdot(overlap * patch, current)  # sum(ov conj(p) c)
                norm = float(np.sum(overlap * np.abs(patch) ** 2))
                if norm > 0 and abs(match) > 0:
                    patch = patch * np.complex64(match / norm)
            num += self.weight * patch
            den += self.weight
            self.placed += 1

    @property
    def coverage(self) -> np.ndarray:
        """Summed blending weight per canvas pixel (0 where no patch landed)."""
        return self._on_canvas(self._den)

    def image(self, min_weight: float = 1e-3) -> np.ndarray:
        """The blended object, complex64; 0 where the summed weight is below ``min_weight``."""
        out = np.zeros(self._grid, np.complex64)
        lit = self._den >= min_weight
        out[lit] = self._num[lit] / self._den[lit]
        return self._on_canvas(out)

    def _on_canvas(self, grid: np.ndarray) -> np.ndarray:
        if self.scale == 1:
            return grid.copy()
        h, w = self.canvas_shape
        return upsample_linear(grid[None], self.scale)[0, :h, :w].copy()


def to_complex(amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """amplitude * exp(i phase) as complex64 (cos and sin: several times cheaper than exp)."""
    amplitude = np.asarray(amplitude, np.float32)
    phase = np.asarray(phase, np.float32)
    out = np.empty(np.broadcast_shapes(amplitude.shape, phase.shape), np.complex64)
    out.real = amplitude * np.cos(phase)
    out.imag = amplitude * np.sin(phase)
    return out


def upsample_linear(z: np.ndarray, s: int) -> np.ndarray:
    """(B, h, w) -> (B, s h, s w) by linear interpolation: sample ``j`` lands on pixel ``s j``
    (a Fourier crop keeps sample points, not cell centres); the last sample is held for
    the ``s - 1`` pixels after it."""
    return _upsample_axis(_upsample_axis(np.asarray(z), s, 1), s, 2)


def _upsample_axis(z: np.ndarray, s: int, axis: int) -> np.ndarray:
    if s == 1:
        return z
    z = np.moveaxis(z, axis, -1)
    n = z.shape[-1]
    out = np.empty((*z.shape[:-1], n * s), z.dtype)
    out[..., 0::s] = z
    step = z[..., 1:] - z[..., :-1]
    for r in range(1, s):
        out[..., r : (n - 1) * s : s] = z[..., :-1] + np.asarray(r / s, z.real.dtype) * step
        out[..., (n - 1) * s + r] = z[..., -1]
    return np.moveaxis(out, -1, axis)


def beam_modulus(probe: np.ndarray) -> np.ndarray:
    """The beam's modulus (n, n) float32: of ``probe`` (n, n), or of its modes (k, n, n)
    together (their intensities summed). Its footprint is the probe's."""
    intensity = np.abs(np.asarray(probe)) ** 2
    if intensity.ndim == 3:
        intensity = intensity.sum(axis=0)
    return np.sqrt(intensity).astype(np.float32)


def probe_weight(probe: np.ndarray, patch: int, scale: int = 1) -> np.ndarray:
    """Blending weight (patch, patch) at the network's pixel, ``scale`` canvas pixels: the
    footprint of ``probe`` (n, n) or its modes (k, n, n) on the window's centre."""
    return footprint_weight(beam_modulus(probe), patch * scale)[::scale, ::scale]


def footprint_weight(probe: np.ndarray, patch: int, blur_px: float = 2.0) -> np.ndarray:
    """Blending weight (patch, patch): the probe's intensity, smoothed, on the window's centre.

    The smoothing fills the Fresnel fringes and the central-stop shadow of a
    defocused zone-plate beam, which the network reconstructs from the light
    around them.
    """
    from scipy import ndimage

    intensity = np.abs(np.asarray(probe)) ** 2
    n = intensity.shape[-1]
    lo = (n - patch) // 2
    smooth = ndimage.gaussian_filter(intensity.astype(np.float64), blur_px)
    crop = smooth[lo : lo + patch, lo : lo + patch]
    return (crop / max(float(crop.max()), 1e-30)).astype(np.float32)
