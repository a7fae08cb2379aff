"""A stand-in for CuPy on a machine without a GPU: NumPy arrays, kernels that only record
their launches, allocations served from a cache as CuPy's pool serves them.

With it in ``sys.modules`` the solver takes the fused path it takes on a GPU, so
the host side of that path (which kernels, in which order, with which grids and
arguments) runs and is checked in the test suite and by
``benchmarks/host_launches.py``; the kernels' arithmetic is checked on a GPU
(``pytest -m gpu``).
"""

from __future__ import annotations

import sys
import time
import types
from dataclasses import replace
from typing import Any

import numpy as np
import scipy.fft

__all__ = ["Launch", "describe", "install", "run", "stand_in_cupy", "stand_in_modules"]

Launch = tuple[str, tuple, tuple, tuple]


def stand_in_cupy(launches: list[Launch]) -> types.ModuleType:
    """NumPy under CuPy's name, with kernels that only append to ``launches``."""
    cp: Any = types.ModuleType("cupy")
    for name in dir(np):
        if not name.startswith("__"):
            setattr(cp, name, getattr(np, name))
    cp.__version__ = "stand-in"

    class NotAnArray:  # NumPy's arrays must not look like CuPy's to array_namespace
        pass

    cp.ndarray = NotAnArray
    pool: dict[tuple, np.ndarray] = {}

    def pooled(make: Any) -> Any:
        def allocate(shape: Any, dtype: Any = float, *_: Any, **__: Any) -> np.ndarray:
            key = (make.__name__, tuple(np.atleast_1d(shape)), np.dtype(dtype).str)
            if key not in pool:
                pool[key] = make(shape, dtype)
            return pool[key]

        return allocate

    cp.empty, cp.zeros = pooled(np.empty), pooled(np.zeros)

    def kernel(name: str) -> Any:
        def launch(grid: tuple, block: tuple, args: tuple, **_: Any) -> None:
            launches.append((name, tuple(grid), tuple(block), tuple(args)))

        return launch

    class Module:
        def __init__(self, **_: Any) -> None:
            pass

        def get_function(self, name: str) -> Any:
            return kernel(name)

    class Elementwise:
        def __init__(self, in_params: str, _out: str, _body: str, name: str, **__: Any):
            self.name, self.inputs = name, len([p for p in in_params.split(",") if p.strip()])

        def __call__(self, *args: Any, **_: Any) -> Any:
            launches.append((self.name, (), (), args))
            return args[-1] if len(args) > self.inputs else np.empty_like(args[0])

    class Device:
        mem_info = (100 * 2**30, 141 * 2**30)

        def __init__(self, *_: Any) -> None:
            pass

        def __enter__(self) -> Device:
            return self

        def __exit__(self, *_: Any) -> None:
            pass

        def synchronize(self) -> None:
            pass

    cp.RawKernel = lambda _code, name, **__: kernel(name)
    cp.RawModule = Module
    cp.ElementwiseKernel = Elementwise
    cp.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0), Device=Device
    )
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(
        free_bytes=lambda: 0, used_bytes=lambda: 0, total_bytes=lambda: 0
    )
    return cp


def stand_in_modules(launches: list[Launch]) -> dict[str, types.ModuleType]:
    """The modules to put in ``sys.modules``: the stand-in as ``cupy`` and SciPy's FFT as
    ``cupyx.scipy.fft``."""
    cupyx: Any = types.ModuleType("cupyx")
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.fft = scipy.fft
    return {
        "cupy": stand_in_cupy(launches),
        "cupyx": cupyx,
        "cupyx.scipy": cupyx.scipy,
        "cupyx.scipy.fft": scipy.fft,
    }


def install(launches: list[Launch]) -> types.ModuleType:
    """Put :func:`stand_in_modules` in ``sys.modules`` (for this process); returns the
    stand-in CuPy."""
    modules = stand_in_modules(launches)
    sys.modules.update(modules)
    return modules["cupy"]


def run(
    cp: types.ModuleType,
    launches: list[Launch],
    algorithm: str,
    modes: int,
    subpixel: bool,
    iterations: int,
    side: int = 32,
    batch: int = 128,
) -> tuple[float, int]:
    """Seconds per iteration after the warm-up (``launches`` then holds just these
    iterations' launches) and the batches of one iteration."""
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
    from hxn_liveptycho.recon.probe import initial_probe
    from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

    beamline = replace(SimulatedBeamline(), window=64, step_px=5.0, x_num=side, y_num=side)
    sample = SimulatedSample(beamline)
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    params = IterativeParams(
        algorithm=algorithm, probe_modes=modes, batch_size=batch, subpixel_positions=subpixel
    )
    probe = initial_probe(amplitudes, footprint_px=3 * beamline.step_px)
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(probe=cp.asarray(probe), canvas_shape=canvas, params=params, xp=cp)
    if not solver._fused:
        raise RuntimeError("the stand-in did not put the solver on its fused path")
    solver.add(cp.asarray(amplitudes), sample.positions_px + 4)
    solver.iterate(params.probe_update_start + params.orthogonalize_every + 1)
    launches.clear()
    began = time.perf_counter()
    solver.iterate(iterations)
    return (time.perf_counter() - began) / iterations, -(-sample.num_points // batch)


def describe(arg: Any) -> str:
    if isinstance(arg, np.ndarray):
        return f"array{arg.shape}{arg.dtype}"
    if isinstance(arg, np.generic):
        value = arg.item() if np.isfinite(arg) else "non-finite"
        return f"{type(arg).__name__}({value!r})"
    return f"{type(arg).__name__}({arg!r})"
