"""RunInputs: what a run has been told so far, and whether its input is over.

Why apart: a session's thread takes documents and stream messages in whatever
order they come. Whether the documents say enough to configure the run, and
whether its input is over (its ``stop`` came and both streams ended, or it was
given up on without its ``stop``), are questions about what arrived, not about
the reconstruction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from hxn_liveptycho.config.scan import ScanConfig, scan_config_from_documents
from hxn_liveptycho.errors import NotPtychographyError

#: The streams a run's data come on: the detector's frames and the encoders' positions.
STREAMS = ("eiger", "panda")


class RunInputs:
    """A run's documents and the state of its streams. Written on the session's thread,
    except :meth:`end_without_stop`, which any thread may call."""

    def __init__(self, start: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
        self._start = start
        self._overrides = overrides
        self._descriptors: dict[str, Mapping[str, Any]] = {}
        self.baseline: dict[str, Any] = {}
        #: The documents that configure the run again (descriptors, the baseline page), in
        #: arrival order: what a checkpoint saves beside the ``start`` and ``stop``.
        self.kept_documents: list[tuple[str, Mapping[str, Any]]] = []
        self.stop_doc: Mapping[str, Any] | None = None
        self._stop_seen_at: float | None = None
        #: Whether each stream's series is open now, and whether one was ever armed.
        self.streams_open = dict.fromkeys(STREAMS, False)
        self.streams_seen = dict.fromkeys(STREAMS, False)
        #: time.monotonic() of the newest input (document, frame, samples, series message):
        #: a run without its ``stop`` ends once it has been idle for its bound.
        self.last_input = time.monotonic()
        #: Why the run ends without (or before) its ``stop``; set from any thread.
        self.forced_end: str | None = None
        self._forced_end_at: float | None = None

    def take_document(self, name: str, doc: Mapping[str, Any]) -> None:
        """Keep what configuration needs (descriptors, the baseline's first reading) and
        the ``stop``."""
        if name == "descriptor":
            self._descriptors[doc["uid"]] = doc
            self.kept_documents.append((name, doc))
        elif name == "event_page":
            descriptor = self._descriptors.get(doc.get("descriptor", ""), {})
            if descriptor.get("name") == "baseline" and not self.baseline:
                self.baseline = {k: v[0] for k, v in doc.get("data", {}).items() if v}
                self.kept_documents.append((name, doc))
        elif name == "stop":
            self.stop_doc = doc
            self._stop_seen_at = time.monotonic()

    def scan_config(self, *, final: bool) -> ScanConfig | None:
        """The run's ScanConfig once the documents say enough; None while the baseline
        (it carries the energy) may still come. ``final``: no more documents will come.
        Raises NotPtychographyError only once the documents are all there to say so."""
        waiting_for_baseline = (
            not self.baseline and not final and "energy_kev" not in self._overrides
        )
        if waiting_for_baseline:
            return None
        try:
            return scan_config_from_documents(
                self._start,
                descriptors=list(self._descriptors.values()),
                baseline=self.baseline,
                overrides=self._overrides,
            )
        except NotPtychographyError:
            if not (final or self.baseline):
                return None
            raise

    def series_started(self, source: str) -> None:
        self.streams_open[source] = True
        self.streams_seen[source] = True

    def series_ended(self, source: str) -> None:
        self.streams_open[source] = False

    @property
    def open(self) -> bool:
        """Whether the run may still take a newly armed series (no ``stop``, not given up)."""
        return self.stop_doc is None and self.forced_end is None

    def end_without_stop(self, reason: str) -> bool:
        """Give the run up without its ``stop`` (any thread); False if it already ended."""
        if self.forced_end is not None or self.stop_doc is not None:
            return False
        self.forced_end = reason
        return True

    def end_seen(self) -> None:
        """The session's thread took the end that :meth:`end_without_stop` sent."""
        self._forced_end_at = time.monotonic()

    def give_up_if_idle(self, bound_s: float) -> str | None:
        """A run whose ``stop`` is lost would otherwise never end (nor free its memory):
        past ``bound_s`` without input it is given up; returns why (None if not)."""
        if not self.open or time.monotonic() - self.last_input <= bound_s:
            return None
        self.forced_end = f"no 'stop' document within {bound_s:g} s of the run's last input"
        self._forced_end_at = time.monotonic()
        return self.forced_end

    def complete(self, stream_timeout_s: float) -> bool:
        """No more frames will come: the run stopped and both streams ended (or timed out).

        An aborted or failed run waits only a second for stragglers; a successful
        one waits up to ``stream_timeout_s`` for the detectors' end-of-series.
        """
        if self.forced_end is not None:
            waited = time.monotonic() - (self._forced_end_at or time.monotonic())
            return not any(self.streams_open.values()) or waited > 1.0
        if self.stop_doc is None:
            return False
        if not any(self.streams_open.values()):
            return True
        waited = time.monotonic() - (self._stop_seen_at or 0.0)
        limit = 1.0 if self.stop_doc.get("exit_status") != "success" else None
        return waited > (limit or stream_timeout_s)
