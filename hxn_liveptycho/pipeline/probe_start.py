"""The first probe of a run's solver, as ``ScanConfig.probe.initial`` chooses it.

- ``estimate`` (the default): from the data alone
  (:func:`~hxn_liveptycho.recon.probe_estimate.estimate_probe`): the mean
  pattern's bright-field disc, and a short search over the defocus size and
  sign. It needs no scan grid, but it needs frames: a live run's solver opens
  once ``probe.estimate_frames`` have arrived (or the scan ended with fewer);
  :class:`ProbeStart` holds them until then.
- ``guess``: the disc with the defocus of the configured footprint and sign
  (:func:`~hxn_liveptycho.recon.probe.initial_probe`).
- ``file``: a probe read from ``probe.file`` (:func:`read_probe_file`).

A file that cannot be used, or data with no disc to fit, fall back to the
estimate or the guess with a log line saying why: a live run keeps going.
:func:`starting_probe` is the same choice for frames at hand (offline).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.recon.probe_estimate import FarFieldGeometry, estimate_probe

__all__ = ["CXI_PROBE_PATHS", "ProbeStart", "read_probe_file", "starting_probe"]

logger = logging.getLogger(__name__)

#: Seconds without a new frame after which a live estimate starts on the frames it has
#: (at least :data:`PAUSE_MIN_FRAMES`), rather than wait for ``estimate_frames``.
PAUSE_S = 2.0
PAUSE_MIN_FRAMES = 8

#: Where a CXI / HDF5 file's probe is looked for, in order (the first is the CXI
#: convention that ptychodus reads and this project's export links).
CXI_PROBE_PATHS = ("entry_1/instrument_1/source_1/illumination", "entry_1/probe")


def _probe_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.keys())
            if "probe" in names:
                return np.asarray(archive["probe"])
            if len(names) == 1:
                return np.asarray(archive[names[0]])
            raise ValueError(f"{path} holds {names}: name the probe's array 'probe'")
    import h5py

    with h5py.File(path, "r") as f:
        for name in CXI_PROBE_PATHS:
            node = f.get(name)
            if isinstance(node, h5py.Group) and "data" in node:
                node = node["data"]
            if isinstance(node, h5py.Dataset):
                return np.asarray(node[()])
    raise ValueError(f"{path} has no probe at {' or '.join('/' + p for p in CXI_PROBE_PATHS)}")


def read_probe_file(path: str | Path, n: int) -> np.ndarray:
    """The probe in ``path`` as complex64, (n, n) or (k, n, n) modes: .npy, .npz or CXI/HDF5
    (see :data:`CXI_PROBE_PATHS`). Refuses a file that holds no square probe of edge ``n``
    (the reconstruction's window, ``roi.size``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"probe file {path} does not exist")
    array = _probe_array(path)
    if array.ndim == 4 and array.shape[0] == 1:  # (1, k, n, n): one shared probe's modes
        array = array[0]
    if array.ndim not in (2, 3) or array.shape[-2:] != (n, n):
        raise ValueError(
            f"probe file {path} holds an array of shape {array.shape}; the reconstruction "
            f"needs ({n}, {n}) or (modes, {n}, {n}) (roi.size is {n})"
        )
    probe = array.astype(np.complex64)
    if not np.all(np.isfinite(probe)) or not np.any(probe):
        raise ValueError(f"probe file {path} holds a probe that is zero or not finite")
    return probe


def starting_probe(
    amplitudes: np.ndarray,
    positions_px: np.ndarray,
    config: ScanConfig,
    *,
    log: logging.Logger | logging.LoggerAdapter[Any] = logger,
) -> np.ndarray:
    """The first probe for these frames (N, n, n) at these positions (N, 2), as
    ``config.probe.initial`` chooses; what cannot be used falls back (file → estimate →
    guess) with a log line."""
    choice = config.probe
    n = int(amplitudes.shape[-1])
    initial = choice.initial
    if initial == "file":
        try:
            probe = read_probe_file(str(choice.file), n)
        except (OSError, ValueError) as exc:
            log.error("probe file not used (%s); estimating the probe from the data", exc)
            initial = "estimate"
        else:
            log.info("probe from %s, shape %s", choice.file, probe.shape)
            return probe
    if initial == "estimate":
        geometry = FarFieldGeometry(
            wavelength_m=config.wavelength_m,
            distance_m=config.distance_m,
            detector_pixel_m=config.detector_pixel_m,
        )
        try:
            estimate = estimate_probe(
                amplitudes, positions_px, frames=choice.estimate_frames, geometry=geometry
            )
        except ValueError as exc:
            log.warning("probe not estimated (%s); guessing it from footprint and sign", exc)
        else:
            log.info("probe estimated from the data: %s", estimate.summary(geometry))
            return to_host(estimate.probe)
    return initial_probe(
        amplitudes, footprint_px=config.probe_footprint_px, defocus_sign=choice.defocus_sign
    )


class ProbeStart:
    """A live run's frames before its solver opens, and the probe it opens with.

    :meth:`take` returns ``(probe, amplitudes, positions_px)``, every frame held so
    far with the probe chosen from them, once the probe is known; until then None,
    and the frames wait here. A probe from elsewhere (a resumed run's, a series'
    previous projection's) is taken as it is; 'guess' and 'file' are chosen at the
    first frames. An estimate starts once ``probe.estimate_frames`` are in (or
    :data:`PAUSE_S` passed without a new frame, with at least
    :data:`PAUSE_MIN_FRAMES`: a scan held mid-way), on a thread of its own (the
    session's thread keeps reading documents and frames: a run's ``stop`` must not
    wait behind it), and is taken at the first call after it ends; ``final`` (no
    more frames will come) estimates from what came, or
    waits for the estimate under way.
    """

    def __init__(self, *, log: logging.Logger | logging.LoggerAdapter[Any] = logger) -> None:
        self.log = log
        self._amplitudes: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._search: threading.Thread | None = None
        self._last_frame = time.monotonic()
        self._found: Any | None = None

    @property
    def held(self) -> int:
        """Frames waiting for the probe."""
        return sum(len(a) for a in self._amplitudes)

    def take(
        self,
        amplitudes: np.ndarray | None,
        positions_px: np.ndarray | None,
        config: ScanConfig,
        probe: Any | None = None,
        *,
        final: bool = False,
    ) -> tuple[Any, np.ndarray, np.ndarray] | None:
        if amplitudes is not None and positions_px is not None and len(amplitudes):
            self._amplitudes.append(np.asarray(amplitudes))
            self._positions.append(np.asarray(positions_px, dtype=np.float64).reshape(-1, 2))
            self._last_frame = time.monotonic()
        if self.held == 0:
            return None
        if probe is None and config.probe.initial == "estimate":
            waiting, probe = self._estimate(config, final=final)
            if waiting:
                return None
        amps = np.concatenate(self._amplitudes)
        pos = np.concatenate(self._positions)
        self._amplitudes.clear()
        self._positions.clear()
        if probe is None:
            probe = starting_probe(amps, pos, config, log=self.log)
        return probe, amps, pos

    def _estimate(self, config: ScanConfig, *, final: bool) -> tuple[bool, Any | None]:
        """``(waiting, probe)``: whether the estimate waits for frames or runs, and the
        probe once it ended (None: none came, and the choice is made again)."""
        if self._search is None:
            paused = time.monotonic() - self._last_frame > PAUSE_S
            enough = self.held >= config.probe.estimate_frames
            if not (final or enough or (paused and self.held >= PAUSE_MIN_FRAMES)):
                return True, None
            amps = np.concatenate(self._amplitudes)
            pos = np.concatenate(self._positions)
            if final:
                return False, starting_probe(amps, pos, config, log=self.log)
            self._search = threading.Thread(
                target=self._run, args=(amps, pos, config), name="liveptycho-probe-estimate"
            )
            self._search.start()
        if final:
            self._search.join()
        return self._search.is_alive(), self._found

    def _run(self, amplitudes: np.ndarray, positions_px: np.ndarray, config: ScanConfig) -> None:
        try:
            self._found = starting_probe(amplitudes, positions_px, config, log=self.log)
        except Exception:  # never lose the run to the estimate: the guess it is
            self.log.exception("probe estimate failed; guessing it from footprint and sign")
            self._found = initial_probe(
                amplitudes,
                footprint_px=config.probe_footprint_px,
                defocus_sign=config.probe.defocus_sign,
            )
