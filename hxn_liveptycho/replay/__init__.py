"""Replay of archived runs: documents and detector streams, from Tiled or files, into the live path.

from hxn_liveptycho.replay import replay_run
report = replay_run("archives/clean-12x12", pace="fast")   # in-process LivePtycho
report = replay_series(["a", "b", "c"], pace="fast")       # several runs, one series
"""

from hxn_liveptycho.replay.files import load_archive, write_archive
from hxn_liveptycho.replay.model import FrameSource, RecordedRun, ReplayError
from hxn_liveptycho.replay.publish import StreamPublishers
from hxn_liveptycho.replay.runner import ReplayOptions, ReplayReport, load_run, replay_run
from hxn_liveptycho.replay.series import SeriesReplayReport, replay_series

__all__ = [
    "FrameSource",
    "RecordedRun",
    "ReplayError",
    "ReplayOptions",
    "ReplayReport",
    "SeriesReplayReport",
    "StreamPublishers",
    "load_archive",
    "load_run",
    "replay_run",
    "replay_series",
    "write_archive",
]
