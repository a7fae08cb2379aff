"""Series (ptycho-tomography): runs sharing a series key, stacked by angle in Tiled."""

from __future__ import annotations

import base64
import logging
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scans import make_live, processed
from test_live_page import DevTools
from test_live_page import _chromium as chromium_path

from hxn_liveptycho.pipeline.series import series_of
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim import (
    SimHXNFlyer,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
    fly2dpd,
)
from hxn_liveptycho.store.series import StackRow, TiledSeriesStore, fit_to, stack_views

#: The data error (the solver's normalised amplitude mismatch) both starts must reach, and
#: the passes the previous projection ran before its probe seeds the next.
TARGET_ERROR = 0.01
PREVIOUS_PASSES = 60
#: A small scan for the series through the live path: 6 x 6 positions, 64-pixel window.
TINY = SimulatedBeamline.for_window(64, step_px=5.0, x_num=6, y_num=6, photons_per_frame=2e5)
#: The simulated projections' angles, in the order they are measured (not sorted, so the
#: stack must put the second before the first).
ANGLES = (30.0, -20.0, 10.0)


def projection(angle_deg: float, beamline: SimulatedBeamline = TINY) -> SimulatedSample:
    """The simulated sample seen at ``angle_deg``: the phantom moved across the beam by
    a few pixels per 10°, a cheap stand-in for a rotation (the sinogram's rows differ)."""
    sample = SimulatedSample(beamline)
    sample.object = np.roll(sample.object, round(angle_deg / 10.0 * 3), axis=1)
    return sample


def fly_projection(
    RE: Any, eiger: Any, panda: Any, sample: SimulatedSample, angle_deg: float, md: dict
) -> str:
    """One fly scan at stage angle ``angle_deg`` (baseline ``zpsth``, as HXN's zone-plate
    stage records it); returns its uid."""
    motors = baseline_motors(sample.beamline.energy_kev)
    zpsth = next(m for m in motors if m.name == "zpsth")
    zpsth.set(angle_deg).wait()
    flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.005)
    result = RE(fly2dpd(flyer, baseline=motors, md=md))
    assert result.exit_status == "success"
    return str(result.run_start_uids[0])


def test_a_series_key_names_the_series_and_nothing_else_does():
    """The start document's series value (text, a number, or a nested uid) names it."""
    assert series_of({"tomo_series": "abc"}, "tomo_series") == "abc"
    assert series_of({"tomo_series": 17}, "tomo_series") == "17"
    assert series_of({"tomo_series": {"uid": "u1", "angle": 3}}, "tomo_series") == "u1"
    assert series_of({"tomo_series": ""}, "tomo_series") is None
    assert series_of({"tomo_series": True}, "tomo_series") is None
    assert series_of({"other": "abc"}, "tomo_series") is None
    assert series_of({"tomo_series": "abc"}, "") is None  # series off


@pytest.mark.slow  # three scans through the live path, one after the other
def test_three_projections_stack_by_angle_in_the_series_container(
    RE, hxn_detectors, tmp_path, tiled_server
):
    """Three scans at different angles: three processed runs, and the series container
    holds their final phases and amplitudes in angle order, the angles, the run uids and
    each one's status; each projection after the first starts from the previous probe."""
    from tiled.client import from_uri

    eiger, panda = hxn_detectors
    series_id = f"tomo-{uuid.uuid4().hex[:8]}"
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        tiled_uri=tiled_server.uri,
        # The simulated stage moves in the sample's own frame: no foreshortening of x.
        overrides={"recon": {"iterations": 10}, "roi": {"size": 64}, "angle_correction": False},
    )
    uids: list[str] = []
    try:
        for angle in ANGLES:
            uid = fly_projection(
                RE, eiger, panda, projection(angle), angle, {"tomo_series": series_id}
            )
            uids.append(uid)
            # One projection after the other, as a tomography plan measures them: each
            # ends (its final probe kept) before the next starts.
            assert live.wait(timeout=120)
        status = live.status()["series"]
    finally:
        live.close()

    client = from_uri(tiled_server.uri)
    runs = {uid: processed(client, uid) for uid in uids}
    for angle, uid in zip(ANGLES, uids, strict=True):
        md = runs[uid].metadata
        assert md["status"] == "complete"
        assert md["series"]["id"] == series_id
        assert md["series"]["angle_deg"] == pytest.approx(angle)
    # The probe of each projection seeds the next, and the run's metadata says so.
    seeds = [runs[uid].metadata["series"]["probe_seed_from"] for uid in uids]
    assert seeds == [None, uids[0], uids[1]]

    node = client["processed"]["liveptycho"]["series"][series_id]
    md = node.metadata
    by_angle = [uid for _, uid in sorted(zip(ANGLES, uids, strict=True))]
    np.testing.assert_allclose(node["angles"].read(), sorted(ANGLES))
    assert [row["raw_uid"] for row in md["stack"]] == by_angle
    assert [p["raw_uid"] for p in md["projections"]] == by_angle
    assert [p["status"] for p in md["projections"]] == ["complete"] * 3
    assert [p["stack_index"] for p in md["projections"]] == [0, 1, 2]
    assert md["series_key"] == "tomo_series" and md["count"] == 3
    phase, amplitude = node["phase"].read(), node["amplitude"].read()
    assert phase.shape == amplitude.shape == (3, *md["shape"])
    for i, uid in enumerate(by_angle):
        final = runs[uid]["final"]
        assert md["projections"][i]["container_path"].endswith(runs[uid].item["id"])
        want_phase, want_amplitude = stack_views(final["object"].read(), final["coverage"].read())
        np.testing.assert_allclose(phase[i], fit_to(want_phase, md["shape"]), atol=1e-6)
        np.testing.assert_allclose(amplitude[i], fit_to(want_amplitude, md["shape"]), atol=1e-6)
    # The rows differ as the phantom moved: a sinogram, not three copies.
    assert not np.allclose(phase[0], phase[2], atol=0.05)
    # serve's status and the live page read the same series from the engine.
    (shown,) = [s for s in status if s["series_id"] == series_id]
    assert [p["raw_uid"] for p in shown["projections"]] == by_angle
    assert shown["stacked"] == 3


def test_projections_of_other_sizes_are_cut_or_padded_about_the_centre(tiled_server):
    """The first stacked projection fixes the shape; a wider one is cut and a narrower one
    padded with NaN, about the centre, each placed by its angle."""
    from tiled.client import from_uri

    store = TiledSeriesStore(
        lambda: from_uri(tiled_server.uri),
        catalog_path="processed/series-shapes",
        series_key="tomo_series",
    )
    series_id = f"shapes-{uuid.uuid4().hex[:6]}"
    first = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
    wide = np.arange(6 * 12, dtype=np.float32).reshape(6, 12) + 100
    small = np.ones((4, 4), dtype=np.float32)
    rows = [("a", 10.0, first), ("b", 30.0, wide), ("c", -5.0, small), ("d", None, first)]
    try:
        for k, (uid, angle, image) in enumerate(rows):
            entry = {"raw_uid": uid, "angle_deg": angle, "arrival": float(k), "status": "complete"}
            store.update(series_id, [entry], StackRow(uid, angle, float(k), image, image))
            assert store.flush(timeout=30)
    finally:
        store.close(timeout=30)
    node = from_uri(tiled_server.uri)["processed"]["series-shapes"]["series"][series_id]
    phase = node["phase"].read()
    assert node.metadata["shape"] == [6, 8]
    assert [r["raw_uid"] for r in node.metadata["stack"]] == ["c", "a", "b", "d"]  # no angle last
    np.testing.assert_array_equal(node["angles"].read()[:3], [-5.0, 10.0, 30.0])
    assert math.isnan(node["angles"].read()[3])
    np.testing.assert_array_equal(phase[1], first)
    np.testing.assert_array_equal(phase[2], wide[:, 2:10])  # cut about the centre
    assert np.isnan(phase[0][0]).all() and np.isnan(phase[0][:, :2]).all()  # padded
    np.testing.assert_array_equal(phase[0][1:5, 2:6], small)
    assert node.metadata["projections"][3]["stack_index"] == 3

    # A writer started later (serve restarted mid-series) continues the same container.
    again = TiledSeriesStore(
        lambda: from_uri(tiled_server.uri),
        catalog_path="processed/series-shapes",
        series_key="tomo_series",
    )
    late = np.full((6, 8), 7.0, dtype=np.float32)
    try:
        entry = {"raw_uid": "e", "angle_deg": 0.0, "arrival": 9.0, "status": "complete"}
        again.update(series_id, [entry], StackRow("e", 0.0, 9.0, late, late))
        assert again.flush(timeout=30)
    finally:
        again.close(timeout=30)
    node = from_uri(tiled_server.uri)["processed"]["series-shapes"]["series"][series_id]
    assert [r["raw_uid"] for r in node.metadata["stack"]] == ["c", "e", "a", "b", "d"]
    phase = node["phase"].read()
    np.testing.assert_array_equal(phase[1], late)
    np.testing.assert_array_equal(phase[2], first)  # the rows after it moved down
    np.testing.assert_array_equal(node["angles"].read()[:4], [-5.0, 0.0, 10.0, 30.0])
    assert [p["raw_uid"] for p in node.metadata["projections"]] == ["c", "e", "a", "b", "d"]


def test_the_previous_probe_reaches_the_same_error_in_fewer_passes():
    """Probe seeding, measured: a projection started from the previous projection's final
    probe reaches the stated data error in fewer ePIE passes than one started from the
    guess the live path makes from the data (footprint three scan steps, defocus +1)."""
    beamline = SimulatedBeamline.for_window(64, step_px=5.0, x_num=8, y_num=8)
    first, second = projection(-20.0, beamline), projection(10.0, beamline)
    params = IterativeParams(algorithm="epie")
    footprint = 3.0 * beamline.step_px

    def solver(sample: SimulatedSample, probe: np.ndarray) -> StreamingSolver:
        s = StreamingSolver(probe=probe, canvas_shape=sample.object.shape, params=params)
        s.add(np.sqrt(sample.intensities), sample.positions_px)
        return s

    def guess(sample: SimulatedSample) -> np.ndarray:
        return initial_probe(np.sqrt(sample.intensities), footprint_px=footprint)

    previous = solver(first, guess(first))
    previous.iterate(PREVIOUS_PASSES)
    seed = np.asarray(previous.snapshot()["probe"])
    assert seed.shape == (64, 64)

    def passes_to_target(probe: np.ndarray, limit: int = 60) -> int:
        s = solver(second, probe)
        for k in range(1, limit + 1):
            if s.iterate(1) <= TARGET_ERROR:
                return k
        return limit + 1

    seeded, unseeded = passes_to_target(seed), passes_to_target(guess(second))
    logging.getLogger(__name__).info(
        "data error %s: seeded %d passes, from the guess %d", TARGET_ERROR, seeded, unseeded
    )
    assert unseeded <= 60, "the unseeded run never reached the stated error"
    assert seeded <= 0.6 * unseeded, (seeded, unseeded)


@pytest.fixture
def page_browser(tmp_path: Path) -> Any:
    """A real headless Chromium, as the live-page test drives it."""
    tools = DevTools(chromium_path(), tmp_path / "chromium-profile")
    yield tools
    tools.close()


#: What the live page shows of the newest series: the sinogram's size in image pixels (a
#: line per stacked projection), the progress line and the projections' table.
_SERIES_STATE = """(() => {
  const img = document.getElementById('sinogram');
  const rows = [...document.querySelectorAll('#projections tbody tr')]
    .map((tr) => [...tr.children].map((td) => td.textContent));
  return {hidden: document.getElementById('series').hidden,
          height: img.complete ? img.naturalHeight : 0, width: img.naturalWidth,
          progress: document.getElementById('series-progress').textContent, rows};
})()"""


@pytest.mark.slow  # three scans through a serve process, the page watched after each
def test_live_page_shows_the_series_stack_growing(
    page_browser, tmp_path, tiled_server, hxn_detectors, RE
):
    """The live page's series section shows a sinogram (one row of the phase stack, a
    line per projection in angle order) that grows as each projection ends, and the
    projections by angle with their status and the probe each started from."""
    import zmq
    from bluesky.callbacks.zmq import Publisher
    from serve_helpers import ServeProcess
    from waiting import wait_for

    eiger, panda = hxn_detectors
    series_id = f"page-{uuid.uuid4().hex[:8]}"
    serve = ServeProcess(tmp_path, tiled_server.uri, eiger, panda, iterations=5)
    publisher = Publisher(serve.proxy_in)
    try:
        serve.wait_ready(eiger, panda)
        serve.connect(publisher)
        RE.subscribe(publisher)
        page_browser.call("Page.navigate", url=serve.url)
        uids: list[str] = []
        seen: list[dict[str, Any]] = []
        for count, angle in enumerate(ANGLES, start=1):
            sample = projection(angle)
            uids.append(fly_projection(RE, eiger, panda, sample, angle, {"tomo_series": series_id}))
            serve.wait_finished(uids[-1])

            def stack_shown(count: int = count) -> bool:
                seen.append(page_browser.evaluate(_SERIES_STATE))
                state = seen[-1]
                return (
                    not state["hidden"]
                    and state["height"] == count
                    and state["progress"].startswith(f"{count} of {count} projections stacked")
                    and len(state["rows"]) == count
                    and all(row[3] == "complete" for row in state["rows"])
                )

            wait_for(stack_shown, timeout=60, interval=0.2, what=lambda: f"page {seen[-1]}")
        state = seen[-1]
        assert [float(row[0]) for row in state["rows"]] == sorted(ANGLES)
        by_angle = [uid[:8] for _, uid in sorted(zip(ANGLES, uids, strict=True))]
        assert [row[2] for row in state["rows"]] == by_angle
        # The first projection started from the guess, the next from the one before.
        seeds = {row[2]: row[4] for row in state["rows"]}
        assert seeds[uids[0][:8]] == "its data"
        assert seeds[uids[1][:8]] == uids[0][:8] and seeds[uids[2][:8]] == uids[1][:8]
        assert state["width"] > 16
        # The API serves the same series, and another row of the stack on request.
        listed = serve.http.get("/api/series").json()
        assert listed[0]["series_id"] == series_id and listed[0]["stacked"] == 3
        top = serve.http.get(f"/api/series/{series_id}/sinogram.png", params={"row": 0.3})
        assert top.status_code == 200 and top.content.startswith(b"\x89PNG")
        assert serve.http.get("/api/series/nothing/sinogram.png").status_code == 404

        page_browser.evaluate("document.getElementById('series').scrollIntoView()")
        shot = page_browser.call("Page.captureScreenshot", format="png")["data"]
        kept = Path(os.environ.get("LIVEPTYCHO_TEST_ARTIFACTS", tempfile.gettempdir()))
        kept.mkdir(parents=True, exist_ok=True)
        (kept / "liveptycho-series-page.png").write_bytes(base64.b64decode(shot))
    finally:
        publisher._socket.setsockopt(zmq.LINGER, 0)  # see tests/test_serve.py
        publisher.close()
        serve.close()


def _as_projection(run: Any, angle_deg: float) -> Any:
    """The archived run as another projection: its own uid, and its angle in the start
    document under ``tomo_angle`` (a plan that records its angle there)."""
    uid = str(uuid.uuid4())
    documents = []
    for name, doc in run.documents:
        if name == "start":
            doc = {**doc, "uid": uid, "tomo_angle": angle_deg}
        elif "run_start" in doc:
            doc = {**doc, "run_start": uid}
        documents.append((name, doc))
    run.documents = documents
    return run


@pytest.mark.slow  # three archived runs replayed and reconstructed one after the other
def test_archived_runs_replay_as_one_series(tmp_path, tiled_server):
    """Three archived runs replayed in order become one series: stamped with the series
    id (recorded without one), angles from the start documents' ``tomo_angle``
    (settings.series_angle_key), stacked by angle, each seeded from the one before."""
    from tiled.client import from_uri

    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.replay import load_archive, replay_series

    archive = Path(__file__).resolve().parents[1] / "archives" / "clean-12x12"
    runs = [_as_projection(load_archive(archive), angle) for angle in ANGLES]
    settings = Settings(
        tiled_uri=tiled_server.uri,
        data_dir=tmp_path / "replayed",
        catalog_path="processed/replayed-series",
        live_interval_s=0.5,
        series_angle_key="tomo_angle",
        overrides={"recon": {"iterations": 5}},
    )
    series_id = f"replay-{uuid.uuid4().hex[:8]}"
    report = replay_series(runs, series_id=series_id, settings=settings, pace="fast")
    uids = [r.uid for r in report.runs]
    assert report.result == {"status": "complete", "statuses": ["complete"] * 3}
    assert report.series is not None and report.series["stacked"] == 3
    by_angle = [uid for _, uid in sorted(zip(ANGLES, uids, strict=True))]
    assert [p["raw_uid"] for p in report.series["projections"]] == by_angle
    seeds = {p["raw_uid"]: p["probe_seed_from"] for p in report.series["projections"]}
    assert [seeds[uid] for uid in uids] == [None, uids[0], uids[1]]
    node = from_uri(tiled_server.uri)["processed"]["replayed-series"]["series"][series_id]
    np.testing.assert_allclose(node["angles"].read(), sorted(ANGLES))
    assert node["phase"].shape[0] == 3
    assert "series " + series_id in report.summary()


class _KeptSink:
    """A result sink that keeps what a run wrote (the ResultSink protocol, no Tiled)."""

    def __init__(self) -> None:
        self.on_stored_later = None
        self.container_path = "processed/liveptycho/kept"
        self.opened: dict[str, Any] = {}
        self.finals: list[dict[str, Any]] = []

    def open(self, config: Any, metadata: Any) -> None:
        self.opened = dict(metadata)

    def live(self, snapshot: Any) -> None:
        pass

    def diffraction(self, indices: Any, amplitudes: Any, positions_m: Any) -> None:
        pass

    def nn(self, snapshot: Any) -> None:
        pass

    def final(self, snapshot: Any, metadata: Any) -> None:
        self.finals.append(dict(metadata))

    def close(self, timeout: float | None = None) -> None:
        pass


def test_a_probe_seeds_only_a_projection_of_the_same_window_and_pixel():
    """The newest probe (a live one while the previous projection finishes) seeds the
    next projection; not one whose detector crop or object pixel differs, and a run
    that never opens its results (skipped) never joins the series."""
    from scans import hxn_start_md, make_scan_run

    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.pipeline.series import SeriesBook

    book = SeriesBook(Settings(series_angle_key="tomo_angle"))
    baseline = {"dcm_th": 9.5, "zpsth": 0.0}

    def run(angle: float, **overrides: Any) -> tuple[Any, Any, Any]:
        scan = make_scan_run(hxn_start_md(tomo_series="s1", tomo_angle=angle), baseline=baseline)
        in_series = book.join(scan.start, _KeptSink)
        assert in_series is not None
        return in_series, in_series.sink_factory(), scan.config(**overrides)

    first, first_sink, config = run(0.0)
    first_sink.open(config, {"raw_uid": first.uid})
    assert first.probe_seed(128) is None  # nothing before it
    probe = np.ones((128, 128), np.complex64)
    first_sink.live({"probe": probe, "iteration": 3})  # still running: its live probe
    second, second_sink, config = run(5.0)
    second_sink.open(config, {"raw_uid": second.uid})
    assert second.probe_seed(128) is probe
    assert second.probe_seed(64) is None  # another window
    third, third_sink, other = run(10.0, roi={"size": 256})
    third_sink.open(other, {"raw_uid": third.uid})
    assert third.probe_seed(128) is None  # same window, another object pixel
    skipped = book.join(make_scan_run(hxn_start_md(tomo_series="s1")).start, _KeptSink)
    assert skipped is not None  # it never opens a sink
    second_sink.final({"probe": probe, "iteration": 9}, {"status": "complete"})
    (series,) = book.status()
    assert [p["angle_deg"] for p in series["projections"]] == [0.0, 5.0, 10.0]
    assert [p["status"] for p in series["projections"]] == ["running", "complete", "running"]
    assert second_sink.finals[0]["series"]["probe_seed_from"] == first.uid
    assert second_sink.opened["series"] == {"key": "tomo_series", "id": "s1", "path": None}


def test_a_series_write_tiled_refused_is_tried_again(tiled_server):
    """While Tiled is unreachable the series waits (flush says so at once); once Tiled
    answers, the writer's next attempt stores the rows that waited."""
    from tiled.client import from_uri

    up = [False]
    store = TiledSeriesStore(
        lambda: from_uri(tiled_server.uri),
        catalog_path="processed/series-retry",
        series_key="tomo_series",
        reachable=lambda: up[0],
        retry_s=0.2,
    )
    series_id = f"retry-{uuid.uuid4().hex[:6]}"
    image = np.ones((4, 5), dtype=np.float32)
    try:
        for k, angle in enumerate((20.0, 10.0)):
            uid = f"r{k}"
            entry = {"raw_uid": uid, "angle_deg": angle, "arrival": float(k), "status": "complete"}
            store.update(series_id, [entry], StackRow(uid, angle, float(k), image * k, image))
        assert not store.flush(timeout=10)  # refused: said at once, not after the timeout
        assert store.counters.get("write_errors") >= 1
        up[0] = True
        assert store.flush(timeout=30)
    finally:
        store.close(timeout=30)
    node = from_uri(tiled_server.uri)["processed"]["series-retry"]["series"][series_id]
    assert [r["raw_uid"] for r in node.metadata["stack"]] == ["r1", "r0"]
    np.testing.assert_array_equal(node["phase"].read()[1], image * 0)


def test_a_run_resumed_after_a_restart_goes_on_in_its_series(tmp_path):
    """A projection taken up again from its checkpoint (serve restarted mid-scan) is
    still a projection of its series: its result is tapped into the series' list."""
    from test_resume import _hxn_run_checkpoint

    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.pipeline.engine import Engine

    checkpoint = _hxn_run_checkpoint(None)
    start = {**checkpoint.documents[0][1], "tomo_series": "after-restart"}
    checkpoint.documents[0] = ("start", start)
    sinks: list[_KeptSink] = []

    def sink() -> _KeptSink:
        sinks.append(_KeptSink())
        return sinks[-1]

    settings = Settings(data_dir=tmp_path, resume_timeout_s=0.5, array_backend="numpy")
    engine = Engine(settings, sink_factory=sink)
    try:
        engine.resume(checkpoint)
        assert engine.wait_idle(60)
        (series,) = engine.status()["series"]
    finally:
        engine.close()
    assert series["series_id"] == "after-restart"
    (projection,) = series["projections"]
    assert projection["raw_uid"] == checkpoint.uid
    assert projection["status"] == "incomplete"  # no more data came after the restart
    assert sinks[0].opened["series"]["id"] == "after-restart"
