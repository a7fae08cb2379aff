"""The RunEngine of the demo/test profile (a beamline profile has its own: skip this file there)."""

from bluesky import RunEngine

RE = RunEngine({})
