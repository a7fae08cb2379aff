"""GPU placement rules: what ``auto`` picks for 0, 1, 2 and 4 GPUs, and bad ids."""

from __future__ import annotations

import numpy as np
import pytest
from scans import SMALL, fly, make_live, processed
from tiled.client import from_uri

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon.placement import (
    GpuPlacement,
    on_device,
    resolve_placement,
    visible_gpus,
)
from hxn_liveptycho.sim import SimulatedSample


@pytest.mark.parametrize(
    ("gpus", "iterative", "nn"),
    [(0, None, None), (1, 0, 0), (2, 0, 1), (4, 0, 1)],
)
def test_auto_spreads_the_branches_over_the_gpus(gpus, iterative, nn):
    placed = resolve_placement(GpuPlacement(), gpus)
    assert (placed.iterative, placed.nn, placed.gpus) == (iterative, nn, gpus)
    assert placed.as_metadata() == {"iterative": iterative, "nn": nn, "gpus": gpus}


@pytest.mark.parametrize(
    ("wanted", "gpus", "iterative", "nn"),
    [
        ({"iterative": 1}, 2, 1, 0),  # the auto branch takes the other GPU
        ({"nn": 0}, 2, 1, 0),
        ({"nn": 0}, 1, 0, 0),  # one GPU: nowhere else to go
        ({"iterative": 2, "nn": 3}, 4, 2, 3),
        ({"iterative": 1, "nn": 1}, 2, 1, 1),  # both on one GPU when the user says so
        ({"iterative": 3}, 4, 3, 0),
    ],
)
def test_explicit_ids_are_kept_and_auto_avoids_them(wanted, gpus, iterative, nn):
    placed = resolve_placement(GpuPlacement(**wanted), gpus)
    assert (placed.iterative, placed.nn) == (iterative, nn)


@pytest.mark.parametrize(
    ("wanted", "gpus", "message"),
    [
        ({"iterative": 2}, 2, r"gpu_placement.iterative = 2 .* 2 GPU\(s\) visible \(ids 0-1\)"),
        ({"nn": 1}, 1, r"gpu_placement.nn = 1 .* 1 GPU\(s\) visible \(ids 0-0\)"),
        ({"nn": 0}, 0, r"gpu_placement.nn = 0 .* no GPU visible"),
    ],
)
def test_a_device_that_is_not_there_is_refused_by_name(wanted, gpus, message):
    with pytest.raises(ConfigurationError, match=message):
        resolve_placement(GpuPlacement(**wanted), gpus)


def test_placement_rejects_negative_and_unknown_values():
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        GpuPlacement(iterative=-1)
    with pytest.raises(ValueError, match="auto"):
        GpuPlacement(nn="second")


def test_numpy_sees_no_gpu_and_needs_no_device_context():
    assert visible_gpus(np) == 0
    with on_device(np, 3):  # ignored on the CPU path
        assert np.ones(2).sum() == 2


def test_a_missing_gpu_fails_the_run_at_its_start_not_the_scan(
    RE, hxn_detectors, tmp_path, tiled_server
):
    """An explicit device id this machine lacks: the run fails in Tiled with the reason named,
    the scan itself succeeds (nothing raised into the RunEngine)."""

    eiger, panda = hxn_detectors
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        tiled_uri=tiled_server.uri,
        array_backend="numpy",
        gpu_placement={"iterative": 1},
    )
    try:
        result = fly(RE, eiger, panda, SimulatedSample(SMALL))
        assert result.exit_status == "success"
        assert live.wait(timeout=60)
        node = processed(from_uri(tiled_server.uri), result.run_start_uids[0])
        assert node.metadata["status"] == "failed"
        assert "gpu_placement.iterative = 1" in node.metadata["error"]
        assert "no GPU visible" in node.metadata["error"]
    finally:
        live.close()
