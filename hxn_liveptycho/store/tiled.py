"""TiledSink: one run's processed container in Tiled, written off the solver's thread.

Layout under ``<catalog_path>/<key>`` (metadata: ``raw_uid``, ``scan_id``,
``status``, parameters, counters)::

    live/          object, object_amplitude, object_phase, probe, error_history
    final/         object, object_amplitude, object_phase, probe, positions_m, error_history
                   (and probe_modes / object_modes when the solver has more than one)
    diffraction/   amplitude (uint8, scale in metadata), positions_m
    nn/            object, object_amplitude, object_phase, coverage (the NN branch's mosaic)

Live snapshots go through a one-slot mailbox: a newer one replaces an older one
not yet written (counted as ``live_superseded``), so a slow server never slows
the solver; the NN branch's mosaic has a mailbox of its own (``nn_superseded``).
The final write goes through Tiled's own retries; if Tiled still
refuses it, everything is saved to ``<backup_dir>/<key>.npz`` (+ ``.json``) and the log says where.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.counters import Counters
from hxn_liveptycho.jsonsafe import json_safe
from hxn_liveptycho.scan import ScanConfig

logger = logging.getLogger(__name__)

ClientFactory = Callable[[], Any]

_OBJECT_KEYS = ("object", "object_amplitude", "object_phase", "probe", "error_history")
_NN_KEYS = ("object", "object_amplitude", "object_phase", "coverage")


def _with_object_views(snapshot: Mapping[str, Any]) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(v) for k, v in snapshot.items() if isinstance(v, np.ndarray)}
    if "object" in arrays:
        arrays["object_amplitude"] = np.abs(arrays["object"]).astype(np.float32)
        arrays["object_phase"] = np.angle(arrays["object"]).astype(np.float32)
    return arrays


class TiledSink:
    """Writes one processed container; every public method returns quickly."""

    def __init__(
        self,
        client_factory: ClientFactory,
        *,
        catalog_path: str,
        backup_dir: Path,
        reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        self._client_factory = client_factory
        self._reachable = reachable
        self._catalog_path = [p for p in catalog_path.split("/") if p]
        self._backup_dir = Path(backup_dir)
        self.counters = Counters(
            ["live_written", "live_superseded", "nn_written", "nn_superseded", "write_errors"]
        )
        self.key: str | None = None
        self.container_path: str | None = None
        self.backup_path: Path | None = None
        self._metadata: dict[str, Any] = {}
        self._container: Any = None
        self._live_arrays: dict[str, Any] = {}
        self._diffraction: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._cond = threading.Condition()
        self._live_slot: Mapping[str, Any] | None = None
        self._nn_slot: Mapping[str, Any] | None = None
        self._nn_latest: Mapping[str, Any] | None = None
        self._nn_arrays: dict[str, Any] = {}
        self._final: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
        self._closing = False
        self._open_requested = False
        self._thread = threading.Thread(target=self._work, name="liveptycho-tiled", daemon=True)

    # ---- ResultSink protocol ---------------------------------------------------------
    def open(self, config: ScanConfig | None, metadata: Mapping[str, Any]) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        raw_uid = str(metadata.get("raw_uid", ""))
        self.key = f"scan{metadata.get('scan_id')}-{raw_uid[:8]}-{stamp}"
        self.container_path = "/".join([*self._catalog_path, self.key])
        self._metadata = {"created": datetime.now(UTC).isoformat(), **json_safe(metadata)}
        self._open_requested = True
        self._thread.start()

    def live(self, snapshot: Mapping[str, Any]) -> None:
        with self._cond:
            if self._live_slot is not None:
                self.counters.add("live_superseded")
            self._live_slot = snapshot
            self._cond.notify()

    def nn(self, snapshot: Mapping[str, Any]) -> None:
        """The NN branch's latest mosaic; like ``live``, a newer one replaces an unwritten one."""
        with self._cond:
            if self._nn_slot is not None:
                self.counters.add("nn_superseded")
            self._nn_slot = snapshot
            self._nn_latest = snapshot
            self._cond.notify()

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None:
        """Keep the measured data of this run; it is written with the final result."""
        with self._cond:
            self._diffraction.append(
                (np.asarray(indices), np.asarray(amplitudes, np.float32), np.asarray(positions_m))
            )

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        with self._cond:
            self._final = (snapshot, metadata)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("Tiled writer for %s did not finish in %s s", self.key, timeout)

    # ---- the writer thread -----------------------------------------------------------
    def _work(self) -> None:
        self._container = self._attempt("create the container", self._create_container)
        while True:
            with self._cond:
                while (
                    self._live_slot is None
                    and self._nn_slot is None
                    and self._final is None
                    and not self._closing
                ):
                    self._cond.wait()
                live, self._live_slot = self._live_slot, None
                nn, self._nn_slot = self._nn_slot, None
                final, self._final = self._final, None
                closing = self._closing
            if nn is not None and self._container is not None:
                try:
                    self._write_nn(nn)
                    self.counters.add("nn_written")
                except Exception as exc:
                    self.counters.add("write_errors")
                    logger.warning("NN mosaic write to %s failed: %s", self.container_path, exc)
            if final is not None:
                self._write_final(*final)
                return
            if live is not None and self._container is None:
                self.counters.add("live_skipped")
            if live is not None and self._container is not None:
                try:
                    self._write_live(live)
                    self.counters.add("live_written")
                except Exception as exc:
                    self.counters.add("write_errors")
                    logger.warning("live write to %s failed: %s", self.container_path, exc)
            if closing:
                return

    def _attempt(self, what: str, action: Callable[[], Any]) -> Any:
        """Run one Tiled operation; None if Tiled is down or refused it (logged, counted).

        Tiled's client already retries connection errors and 5xx replies; a
        quick health probe first keeps an outage from costing those retries.
        """
        if not self._reachable():
            self.counters.add("write_errors")
            logger.warning("Tiled is unreachable: could not %s for %s", what, self.container_path)
            return None
        try:
            return action()
        except Exception as exc:
            self.counters.add("write_errors")
            logger.warning("Tiled: could not %s for %s: %s", what, self.container_path, exc)
            return None

    def _create_container(self) -> Any:
        node = self._client_factory()
        for part in self._catalog_path:
            try:
                node = node[part]
            except KeyError:
                try:
                    node = node.create_container(part)
                except Exception:
                    node = node[part]  # another session created it meanwhile
        container = node.create_container(self.key, metadata=self._metadata)
        logger.info("processed container %s created", self.container_path)
        return container

    def _child(self, name: str) -> Any:
        try:
            return self._container[name]
        except KeyError:
            return self._container.create_container(name)

    def _write_live(self, snapshot: Mapping[str, Any]) -> None:
        arrays = _with_object_views(snapshot)
        live = self._child("live")
        for key in _OBJECT_KEYS:
            if key in arrays:
                self._put_live_array(live, key, arrays[key])
        self._container.update_metadata(
            metadata={"iteration": int(snapshot.get("iteration", 0)), "live_updated": time.time()},
            drop_revision=True,
        )

    def _put_live_array(self, live: Any, key: str, value: np.ndarray) -> None:
        """Overwrite fixed-shape arrays in place; grow the error history by its new tail."""
        client = self._live_arrays.get(key)
        if client is None:
            self._live_arrays[key] = live.write_array(value, key=key)
        elif key == "error_history":
            written = client.shape[0]
            if value.shape[0] > written:
                client.patch(value[written:], offset=(written,), extend=True)
                client.refresh()
        else:
            client.write(value)

    def _write_nn(self, snapshot: Mapping[str, Any]) -> None:
        """Overwrite the mosaic in place under ``nn/`` (its canvas never changes shape)."""
        arrays = _with_object_views(snapshot)
        if not arrays:
            return
        group = self._child("nn")
        for key in _NN_KEYS:
            if key not in arrays:
                continue
            client = self._nn_arrays.get(key)
            if client is None:
                self._nn_arrays[key] = group.write_array(arrays[key], key=key)
            else:
                client.write(arrays[key])
        self._container.update_metadata(
            metadata={"nn_frames": int(snapshot.get("frames", 0)), "nn_updated": time.time()},
            drop_revision=True,
        )

    def _write_final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        metadata = {**json_safe(metadata), "finished": datetime.now(UTC).isoformat()}
        arrays = _with_object_views(snapshot)
        diffraction = self._stacked_diffraction()

        def write() -> None:
            if self._container is None:
                self._container = self._create_container()
            if self._nn_latest is not None and not self._nn_arrays:
                self._write_nn(self._nn_latest)  # Tiled was down while the branch ran
            if arrays:
                self._write_live(snapshot)
                final = self._child("final")
                for key, value in arrays.items():
                    if key not in final:
                        final.write_array(value, key=key)
            if diffraction is not None:
                group = self._child("diffraction")
                amplitude_u8, scale, positions = diffraction
                if "amplitude" not in group:
                    group.write_array(
                        amplitude_u8,
                        key="amplitude",
                        metadata={"scale": scale, "units": "sqrt(counts) = value * scale"},
                    )
                    group.write_array(positions, key="positions_m")
            self._container.update_metadata(metadata=metadata)
            return True

        if self._attempt("write the final result", write) is None:
            nn = _with_object_views(self._nn_latest or {})
            arrays = {**arrays, **{f"nn_{k}": v for k, v in nn.items()}}
            self._backup(arrays, diffraction, metadata)

    def _stacked_diffraction(self) -> tuple[np.ndarray, float, np.ndarray] | None:
        with self._cond:
            parts = list(self._diffraction)
        if not parts:
            return None
        indices = np.concatenate([p[0] for p in parts])
        order = np.argsort(indices, kind="stable")
        amplitudes = np.concatenate([p[1] for p in parts])[order]
        positions = np.concatenate([p[2] for p in parts])[order]
        peak = float(amplitudes.max()) or 1.0
        scale = peak / 255.0
        quantised = np.clip(np.rint(amplitudes / scale), 0, 255).astype(np.uint8)
        return quantised, scale, positions

    def _backup(
        self, arrays: Mapping[str, np.ndarray], diffraction: Any, metadata: Mapping[str, Any]
    ) -> None:
        self._backup_dir.mkdir(parents=True, exist_ok=True)
        path = self._backup_dir / f"{self.key}.npz"
        payload = dict(arrays)
        if diffraction is not None:
            payload["diffraction_amplitude"] = diffraction[0]
            payload["diffraction_positions_m"] = diffraction[2]
        np.savez_compressed(path, **payload)
        path.with_suffix(".json").write_text(
            json.dumps({**metadata, "container_path": self.container_path}, indent=2, default=str)
        )
        self.backup_path = path
        logger.error(
            "Tiled refused the final result of %s; saved to %s instead", self.container_path, path
        )
