"""SessionReport: a run as the outside sees it, for status pages and for its container.

Why apart: ``summary()`` and the container's metadata only read the session's
state and its parts (assembler, solver, sink, NN branch), or the light copies
kept of them once the run is released; they change nothing, and the session's
thread and its final write live elsewhere.
"""

from __future__ import annotations

from typing import Any

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.nn.branch import NNBranch
from hxn_liveptycho.nn.process import NNProcessBranch
from hxn_liveptycho.pipeline.assemble import Assembler
from hxn_liveptycho.pipeline.geometry import CanvasGeometry
from hxn_liveptycho.pipeline.result_sink import ResultSink
from hxn_liveptycho.pipeline.resume import ResumedRun
from hxn_liveptycho.pipeline.run_status import RunStatus
from hxn_liveptycho.pipeline.solver_link import SolverLink
from hxn_liveptycho.recon.placement import Placement
from hxn_liveptycho.util.counters import Counters


class SessionReport:
    """The views of a run. A base of ``RunSession``, which sets the state named here."""

    uid: str
    scan_id: Any
    start_doc: dict[str, Any]
    status: RunStatus
    reason: str | None
    warnings: list[str]
    error: str | None
    config: ScanConfig | None
    placement: Placement | None
    iteration: int
    last_error: float | None
    timeline: dict[str, float]
    counters: Counters
    _solver: SolverLink
    _assembler: Assembler | None
    _sink: ResultSink | None
    _nn: NNBranch | NNProcessBranch | None
    _geometry: CanvasGeometry | None
    #: The checkpoint a run resumed after a restart goes on from (None for every other run).
    _resumed: ResumedRun | None
    #: Light copies of the parts, kept once the heavy state is released.
    _released: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "uid": self.uid,
            "scan_id": self.scan_id,
            "status": str(self.status),
            "iteration": self.iteration,
            "error_metric": self.last_error,
            "positions": self._solver.n_positions,
            "timeline": dict(self.timeline),
            "counters": self._all_counters(),
        }
        pairing = self._pairing_report()
        if pairing is not None:
            info["pairing"] = pairing
        if self.reason:
            info["reason"] = self.reason
        if self.warnings:
            info["warnings"] = list(self.warnings)
        if self.error:
            info["error"] = self.error
        if self.config is not None:
            info["expected_positions"] = self.config.num_points
        released = self._released
        container_path = getattr(self._sink, "container_path", released.get("container_path"))
        if container_path:
            info["container_path"] = container_path
        nn = self._nn
        if nn is not None:
            info["nn"] = nn.counters.snapshot()
        elif "nn" in released:
            info["nn"] = released["nn"]
        backup = getattr(self._sink, "backup_path", released.get("backup_path"))
        if backup is not None:  # Tiled refused the result: say where it is instead
            info["stored_in"] = "local backup"
            info["backup_path"] = str(backup)
        if getattr(self._sink, "write_failure", released.get("write_failure")):
            info["stored_in"] = "memory (until retry-upload writes it)"
        return info

    def _all_counters(self) -> dict[str, int]:
        """The session's counters with the assembler's and what never paired."""
        counters = self.counters.snapshot()
        if self._assembler is not None:
            counters.update(
                {f"assembler_{k}": v for k, v in self._assembler.counters.snapshot().items()}
            )
            counters.update(self._assembler.unpaired_report())
        else:
            counters.update(self._released.get("assembler", {}))
        return counters

    def _pairing_report(self) -> dict[str, Any] | None:
        """The samples-per-frame factor used and what measured it (see Assembler)."""
        if self._assembler is not None:
            return self._assembler.pairing_report()
        return self._released.get("pairing")

    @property
    def solver_passes(self) -> list[tuple[float, int]]:
        """(time.monotonic() at its end, positions covered) of every solver pass so far."""
        return self._solver.pass_ends

    def nn_snapshot(self) -> dict[str, Any] | None:
        """The NN branch's current mosaic (None without an NN branch), for status pages."""
        return None if self._nn is None else self._nn.snapshot()

    def _metadata(self, status: RunStatus) -> dict[str, Any]:
        config = self.config
        md: dict[str, Any] = {
            "raw_uid": self.uid,
            "scan_id": self.scan_id,
            "raw_start_time": self.start_doc.get("time"),
            "plan_name": self.start_doc.get("plan_name"),
            "status": str(status),
            "mode": config.mode if config is not None else "iterative",
            "placement": None if self.placement is None else self.placement.as_metadata(),
            "counters": self._all_counters(),
            "pairing": self._pairing_report(),
            "live_quality": self._solver.quality.model_dump(mode="json"),
        }
        if self.reason:
            md["reason"] = self.reason
        if self.warnings:
            md["warnings"] = list(self.warnings)
        if config is not None:
            md.update(
                energy_kev=config.energy_kev,
                wavelength_m=config.wavelength_m,
                distance_m=config.distance_m,
                pixel_size_m=config.pixel_size_m,
                algorithm=config.recon.algorithm,
                config=config.model_dump(mode="json"),
            )
        if self._geometry is not None:
            md["canvas"] = {
                "origin_um": list(self._geometry.origin_um),
                "pixel_size_m": self._geometry.pixel_size_m,
                "window": self._geometry.window,
                "shape": list(self._geometry.canvas_shape),
            }
        if self._nn is not None:
            md["nn"] = self._nn.describe()
        if self.error:
            md["error"] = self.error
        md["iteration"] = self.iteration
        if self._resumed is not None:
            md["resumed"] = self._resumed.metadata()
        return md
