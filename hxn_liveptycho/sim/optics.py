"""Simulated HXN optics and THE forward model of the project.

Conventions used everywhere (solver, simulator, NN training):

* Arrays are ``(..., y, x)``; batched over leading axes.
* The far field is the *unnormalised* forward FFT of the exit wave,
  ``Psi = fft2(psi)`` (NumPy default ``norm="backward"``), so
  ``sum |Psi|^2 = n^2 * sum |psi|^2``; :func:`far_field` returns it with the
  zero frequency at the CENTRE of the frame, as a detector sees it.
* Functions take ``xp`` or infer it from their inputs, so the same code runs
  on NumPy and CuPy.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np

from hxn_liveptycho.recon.backend import array_namespace, fft2, ifft2

__all__ = [
    "aperture_probe",
    "energy_from_dcm_theta",
    "far_field",
    "fresnel_propagate",
    "intensity",
    "make_probe",
    "sample_pixel_size_m",
    "wavelength_m",
]

HC_KEV_NM = 1.23984  # h*c in keV*nm (the beamline's rounding)
HC_KEV_A = 12.39842  # h*c in keV*Angstrom, as used by the HXN DCM energy readback
SI111_D_A = 3.1355893  # Si(111) d-spacing, Angstrom


def wavelength_m(energy_kev: float) -> float:
    """X-ray wavelength in metres for a photon energy in keV (lambda[nm] = 1.23984 / E[keV])."""
    if energy_kev <= 0:
        raise ValueError(f"energy must be positive, got {energy_kev} keV")
    return HC_KEV_NM / energy_kev * 1e-9


def energy_from_dcm_theta(theta_deg: float) -> float:
    """Photon energy (keV) passed by the Si(111) double-crystal monochromator at angle theta."""
    s = math.sin(math.radians(theta_deg))
    if s <= 0:
        raise ValueError(f"DCM Bragg angle must be in (0, 180) degrees, got {theta_deg}")
    return HC_KEV_A / (2.0 * SI111_D_A * s)


def sample_pixel_size_m(
    wavelength_m: float, distance_m: float, n_pixels: int, detector_pixel_m: float
) -> float:
    """Real-space pixel of the reconstruction, lambda z / (N p), for an N-pixel detector crop."""
    return wavelength_m * distance_m / (n_pixels * detector_pixel_m)


def _freq_grid(n: int, xp: types.ModuleType) -> tuple[Any, Any]:
    """Integer FFT frequencies (cycles per window) on an (n, n) grid in FFT order."""
    f = xp.fft.fftfreq(n, d=1.0 / n).astype(xp.float32)
    return f[:, None], f[None, :]


def fresnel_propagate(
    field: Any,
    distance_m: float,
    *,
    pixel_size_m: float,
    wavelength_m: float,
    xp: types.ModuleType | None = None,
) -> Any:
    """Paraxial (Fresnel) angular-spectrum propagation of a real-space field over the last two axes.

    Transfer function ``exp(-i pi lambda z (fx^2 + fy^2))``; exact for a
    band-limited field, and it keeps the grid, so the probe stays on the
    reconstruction pixel.
    """
    xp = array_namespace(field) if xp is None else xp
    n_y, n_x = field.shape[-2:]
    fy = xp.fft.fftfreq(n_y, d=pixel_size_m)[:, None]
    fx = xp.fft.fftfreq(n_x, d=pixel_size_m)[None, :]
    h = xp.exp(-1j * math.pi * wavelength_m * distance_m * (fx**2 + fy**2)).astype(xp.complex64)
    out = ifft2(fft2(xp.asarray(field, dtype=xp.complex64), xp=xp) * h, xp=xp)
    return out.astype(xp.complex64, copy=False)


def make_probe(
    n: int,
    *,
    pixel_size_m: float,
    wavelength_m: float,
    outer_radius_px: float | None = None,
    central_stop: float = 0.4,
    defocus_m: float | None = None,
    footprint_px: float | None = None,
    aberration_rms_rad: float = 0.3,
    rng: np.random.Generator | int | None = None,
    xp: types.ModuleType | None = None,
) -> Any:
    """A zone-plate-like probe seen slightly out of focus, complex64 (n, n), sum |P|^2 = 1.

    Built as the optics make it: an annular pupil (zone plate with central
    stop, radius ``outer_radius_px`` in detector pixels of the n-crop, default
    0.22 n, so the bright-field disc fills ~44 % of the detector and dark field
    is measured beyond it), focused, then Fresnel-propagated by ``defocus_m``.
    The defocused beam is a ring (the central stop's shadow) with Fresnel
    fringes, not a Gaussian. If ``defocus_m`` is None it is chosen so the
    geometric beam diameter is ``footprint_px`` (default 0.28 n, ~36 px for
    n = 128): large enough for strong overlap at moderate steps, small enough
    to sit well inside the window, which makes a well-conditioned simulation
    for any energy / pixel size. With ``rng`` given, small random low-order
    aberrations (astigmatism, coma; ``aberration_rms_rad`` rms over the
    pupil) make each probe a little different and realistically imperfect.
    """
    xp = np if xp is None else xp
    if outer_radius_px is None:
        outer_radius_px = 0.22 * n
    if not 0 < outer_radius_px < n / 2:
        raise ValueError(f"outer_radius_px must be in (0, n/2), got {outer_radius_px}")
    if not 0 <= central_stop < 1:
        raise ValueError(f"central_stop must be in [0, 1), got {central_stop}")
    if defocus_m is None:
        if footprint_px is None:
            footprint_px = 0.28 * n
        # Geometric cone: diameter [px] = 2 lambda z R / (n dx^2), R the pupil radius in FFT pixels.
        defocus_m = footprint_px * n * pixel_size_m**2 / (2.0 * wavelength_m * outer_radius_px)

    ky, kx = _freq_grid(n, xp)
    rho = xp.sqrt(ky**2 + kx**2) / outer_radius_px  # 1 at the zone plate's outer edge
    pupil = ((rho <= 1.0) & (rho >= central_stop)).astype(xp.complex64)
    if rng is not None:
        gen = np.random.default_rng(rng)
        # Astigmatism (2) and coma (2) shapes on the unit pupil, each with a random weight.
        u, v = kx / outer_radius_px, ky / outer_radius_px
        shapes = [u**2 - v**2, 2 * u * v, (3 * rho**2 - 2) * u, (3 * rho**2 - 2) * v]
        weights = gen.normal(size=len(shapes))
        phase = sum(float(w) * s for w, s in zip(weights, shapes, strict=True))
        inside = rho <= 1.0
        rms = float(xp.sqrt(xp.mean(phase[inside] ** 2)))
        if rms > 0:
            pupil = pupil * xp.exp(1j * (aberration_rms_rad / rms) * phase).astype(xp.complex64)
    focus = xp.fft.fftshift(ifft2(pupil, xp=xp))  # the focal spot, centred in the window
    probe = fresnel_propagate(
        focus, defocus_m, pixel_size_m=pixel_size_m, wavelength_m=wavelength_m, xp=xp
    )
    probe = probe / xp.sqrt(xp.sum(xp.abs(probe) ** 2))
    return probe.astype(xp.complex64)


def aperture_probe(
    n: int, diameter_px: float, *, edge_px: float = 2.0, xp: types.ModuleType | None = None
) -> Any:
    """A flat, soft-edged disc of ``diameter_px``, sum |P|^2 = 1.

    Beware as an initial guess for a zone-plate probe: its far field is a
    small central spot exactly where the central stop leaves the data dark,
    and ePIE does not recover from it. Prefer :func:`make_probe` with the
    nominal optics (a wrong defocus is fine).
    """
    xp = np if xp is None else xp
    c = (n - 1) / 2.0
    y = xp.arange(n, dtype=xp.float32)[:, None] - c
    x = xp.arange(n, dtype=xp.float32)[None, :] - c
    r = xp.sqrt(x**2 + y**2)
    amp = 0.5 * (1.0 - xp.tanh((r - diameter_px / 2.0) / max(edge_px, 1e-3)))
    probe = amp.astype(xp.complex64)
    return (probe / xp.sqrt(xp.sum(xp.abs(probe) ** 2))).astype(xp.complex64)


def far_field(exit_waves: Any, xp: types.ModuleType | None = None) -> Any:
    """Detector field of exit waves (..., n, n): unnormalised FFT, zero frequency at the CENTRE."""
    xp = array_namespace(exit_waves) if xp is None else xp
    psi = fft2(xp.asarray(exit_waves, dtype=xp.complex64), xp=xp)
    return xp.fft.fftshift(psi, axes=(-2, -1))


def intensity(exit_waves: Any, xp: types.ModuleType | None = None) -> Any:
    """Noise-free detector intensity |far_field|^2, float32, zero frequency at the centre."""
    xp = array_namespace(exit_waves) if xp is None else xp
    f = far_field(exit_waves, xp=xp)
    return (f.real**2 + f.imag**2).astype(xp.float32)
