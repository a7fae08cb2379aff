"""The raw-kernel launches of the solver's fused kernels, checked without a GPU.

A raw CUDA kernel takes its arguments as the launch gives them: one too few,
a Python int where the kernel has ``int`` (CuPy passes 64 bits), or a scalar
where it expects a pointer is not an error CuPy can report; the kernel just
reads garbage. CI has no GPU, so these tests put a recording stand-in for
CuPy in place, call the launchers as the solver does (and run the solver itself
on the stand-in of ``benchmarks/host_launches.py``), and check every launch
against the kernel's own signature in the CUDA source: the count, and
pointer / ``int`` / ``float`` / ``long long`` per argument.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
from collections.abc import Iterator

import numpy as np
import pytest
from recon_helpers import use_cupy_stand_in

from hxn_liveptycho.recon import (
    _exit_waves,
    _fourier_steps,
    _lsqml_step_fit,
    _pass_end_kernels,
    _raw_kernels,
    _regularised,
    _update_sums,
)

_SCALARS = {"int": np.int32, "float": np.float32, "long long": np.int64}


def signatures(source: str) -> dict[str, list[str]]:
    """Kernel name -> its parameters' kinds ("pointer" or the scalar's C type)."""
    found = {}
    for name, params in re.findall(
        r'extern "C" __global__ void\s+(?:__launch_bounds__\([^)]*\)\s+)?(liveptycho_\w+)'
        r"\((.*?)\)\s*\{",
        source,
        re.S,
    ):
        kinds = []
        for param in " ".join(params.split()).split(","):
            words = param.strip().replace("const ", "").rsplit(" ", 1)[0].strip()
            kinds.append("pointer" if "*" in param else words)
        found[name] = kinds
    return found


class Recorder:
    def __init__(self) -> None:
        self.launches: list[tuple[str, tuple, tuple, tuple]] = []

    def kernel(self, name: str) -> object:
        def launch(grid: tuple, block: tuple, args: tuple) -> None:
            self.launches.append((name, grid, block, args))

        return launch


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    rec = Recorder()
    cp = types.ModuleType("cupy")
    cp.float32, cp.complex64, cp.uint32 = np.float32, np.complex64, np.uint32
    cp.zeros, cp.empty, cp.ones, cp.sum = np.zeros, np.empty, np.ones, np.sum
    cp.ascontiguousarray, cp.asarray = np.ascontiguousarray, np.asarray
    cp.max = lambda a: np.asarray(np.max(a))  # CuPy reductions give 0-d arrays
    cp.RawKernel = lambda code, name, **_: rec.kernel(name)

    class Module:
        def __init__(self, **_: object) -> None:
            pass

        def get_function(self, name: str) -> object:
            return rec.kernel(name)

    cp.RawModule = Module
    cp.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDevice=lambda: 0),
        Device=lambda _: contextlib.nullcontext(),
    )
    monkeypatch.setitem(sys.modules, "cupy", cp)
    caches = (_raw_kernels.raw_kernel, _raw_kernels._placeholder, _raw_kernels._sums_module)
    caches += (_raw_kernels._sums_function, _fourier_steps._ones)
    for cache in caches:
        cache.cache_clear()
    yield rec
    for cache in caches:
        cache.cache_clear()


def check(launches: list, source: str) -> set[str]:
    sigs = signatures(source)
    for name, grid, block, args in launches:
        assert name in sigs, f"{name} is launched but not defined"
        kinds = sigs[name]
        assert len(args) == len(kinds), f"{name}: {len(args)} arguments for {len(kinds)}"
        for i, (arg, kind) in enumerate(zip(args, kinds, strict=True)):
            if kind == "pointer":
                assert isinstance(arg, np.ndarray), f"{name} argument {i}: {arg!r} for a pointer"
            else:
                assert type(arg) is _SCALARS[kind], f"{name} argument {i}: {type(arg)} for {kind}"
        assert all(g >= 1 for g in grid) and np.prod(block) <= 1024
    return {name for name, *_ in launches}


def test_signature_parser_reads_the_kinds() -> None:
    sigs = signatures(_raw_kernels.RAW_SOURCE)
    assert sigs["liveptycho_add_scaled"] == [
        "pointer",
        "pointer",
        "pointer",
        "long long",
        "long long",
        "long long",
    ]


def test_every_raw_kernel_of_the_fused_module_is_launched_as_declared(
    recorder: Recorder,
) -> None:
    rng = np.random.default_rng(0)
    b, k, n = 3, 2, 8
    c64 = np.complex64
    dpsi = rng.normal(size=(b, k, n, n)).astype(c64)
    probes = np.ones((k, n, n), c64)
    canvas = np.ones((20, 24), c64)
    corners = np.array([[0, 0], [4, 6], [9, 12]], np.int32)
    box = np.zeros((17, 20), c64)
    den = np.zeros((17, 20), np.float32)
    power = np.zeros((n, n), np.float32)
    slots = [np.zeros(_raw_kernels.SLOT_FLOATS, np.float32) for _ in range(2)]
    weights = np.ones(b, np.float32)
    plain = _update_sums.ObjectSums(box, den)
    tracked = _update_sums.ObjectSums(box, den, (0, 0), slots[0])
    # Two modes, no box: the object sums with atomics (weighted; den tracked), one launch.
    assert _update_sums.object_sums(dpsi, probes, canvas, corners, plain) is None
    _update_sums.object_sums(dpsi, probes, canvas, corners, tracked, weights=weights)
    sums = recorder.launches[-1][3]
    assert sums[12] == 1 and sums[13] == 1 and sums[14] == 1 and sums[17] == 1  # w, num, den
    assert sums[15] == 0 and sums[16] == 0 and sums[18] == 0  # no probe-side sums
    # With the probe terms per position (K channels) and the object power, one pass.
    summed = np.zeros((k, n, n), c64)
    terms = _update_sums.object_sums_and_probe_terms(
        dpsi, probes, canvas, corners, tracked, power=power, power_max=slots[1]
    )
    assert terms.shape == (b, k, n, n) and recorder.launches[-1][3][21] is terms
    assert recorder.launches[-1][3][15] == k and recorder.launches[-1][3][16] == 1
    # The probe terms with |O|^2 as channel K (DM's sub-pixel probe pass): no object sums.
    terms = _update_sums.probe_terms_with_power(dpsi, probes, canvas, corners)
    assert terms.shape == (b, k + 1, n, n)
    alone = recorder.launches[-1][3]
    assert alone[13] == 0 and alone[14] == 0 and alone[15] == k + 1 and alone[16] == 0
    # The summed probe-side sums alone (DM's whole-pixel probe pass): their own kernel.
    _update_sums.add_probe_terms(dpsi, canvas, corners, into=summed, power=power)
    assert recorder.launches[-1][0] == "liveptycho_probe_sums"
    assert recorder.launches[-1][3][5] == k and recorder.launches[-1][3][7] == 0
    # One mode: gathered by canvas tile, the object sums alone (added; overwritten), then
    # with the summed probe-side sums (their own kernel).
    box_of = (0, 0, 17, 20)
    one, one_probe, one_summed = dpsi[:, :1].copy(), probes[:1].copy(), summed[:1].copy()
    assert _update_sums.object_sums(one, one_probe, canvas, corners, plain, box=box_of) is None
    assert recorder.launches[-1][3][-6] == 0  # mode 0: added
    _update_sums.object_sums(one, one_probe, canvas, corners, plain, box=box_of, overwrite=True)
    assert recorder.launches[-1][3][-6] == 1  # mode 1: overwritten, nothing zeroed first
    with pytest.raises(ValueError, match="are not the box"):
        _update_sums.object_sums(
            one, one_probe, canvas, corners, plain, box=(1, 0, 18, 20), overwrite=True
        )
    n_before = len(recorder.launches)
    _update_sums.object_sums_and_probe_sum(
        one,
        one_probe,
        canvas,
        corners,
        tracked,
        into=one_summed,
        power=power,
        power_max=slots[1],
        box=box_of,
    )
    gathered, rest = recorder.launches[n_before:]
    assert gathered[0] == "liveptycho_tile_sums" and gathered[1] == (1,)  # 17 x 20: one tile
    assert gathered[3][-7] is slots[0]  # den's maximum tracked by the tiles
    assert rest[0] == "liveptycho_probe_sums" and rest[3][-4] is one_summed
    assert rest[3][7] == 1 and rest[3][-2] is slots[1]
    _update_sums.add_window_ratio(canvas, one, one_probe, corners, den, box=box_of, weights=None)
    ratio = recorder.launches[-1][3]
    assert ratio[-6] == 2 and ratio[-4] == canvas.shape[1]  # ratio mode, the canvas's rows
    assert ratio[-1] == 0  # den taken as regularised already
    # den regularised on the way, its maximum from the tracked slots.
    _update_sums.add_window_ratio(
        canvas, one, one_probe, corners, den, box=box_of, reg=0.1, den_max=slots[0]
    )
    ratio = recorder.launches[-1][3]
    assert ratio[-3] is slots[0] and ratio[-2] == 1 and ratio[-1] == np.float32(0.1)
    # LSQ-ML's step-fit sums of one mode, gathered by tile: a shared probe step, and none.
    for step in (one_probe, None):
        sums = _lsqml_step_fit.lsqml_step_sums(
            one, one_probe, step, canvas, box, den, corners, (0, 0), 0.1, slots[0], box=box_of
        )
        name, grid, _, args = recorder.launches[-1]
        assert name == "liveptycho_tile_step_sums" and grid == (1,) and args[-1] is sums
        assert args[11] == (0 if step is None else 1) and args[-4] is slots[0]
    with pytest.raises(ValueError, match="do not cover the box"):
        _lsqml_step_fit.lsqml_step_sums(
            one, one_probe, None, canvas, box[1:], den[1:], corners, (0, 0), box=box_of
        )
    # Two modes: the object sums by tile; the step-fit sums per position (TILE_STEP_MODES).
    _update_sums.object_sums(dpsi, probes, canvas, corners, plain, box=box_of, overwrite=True)
    assert recorder.launches[-1][0] == "liveptycho_tile_sums"
    _lsqml_step_fit.lsqml_step_sums(
        dpsi, probes, None, canvas, box, den, corners, (0, 0), box=box_of
    )
    assert recorder.launches.pop()[0] == "liveptycho_lsqml_sums"  # checked with its module
    # More modes than the tiles take: the atomic sums (overwritten: zeroed first), alone and
    # with the summed probe-side sums in the same pass; then the ratio added in one pass.
    many = rng.normal(size=(b, _update_sums.TILE_MODES + 1, n, n)).astype(c64)
    many_probes = np.ones(many.shape[1:], c64)
    n_before = len(recorder.launches)
    box[...], den[...] = 1, 1
    _update_sums.object_sums(many, many_probes, canvas, corners, plain, box=box_of, overwrite=True)
    assert [name for name, *_ in recorder.launches[n_before:]] == ["liveptycho_window_sums"]
    assert not box.any() and not den.any()
    many_summed = np.zeros(many.shape[1:], c64)
    box[...], den[...] = 1, 1
    _update_sums.object_sums_and_probe_sum(
        many,
        many_probes,
        canvas,
        corners,
        tracked,
        into=many_summed,
        power=power,
        power_max=slots[1],
        box=box_of,
        overwrite=True,
    )
    (both,) = recorder.launches[-1:]
    assert both[0] == "liveptycho_window_sums" and not box.any() and not den.any()
    assert both[3][15] == many.shape[1] and both[3][18] == 1 and both[3][-4] is many_summed
    _update_sums.add_window_ratio(
        canvas, many, many_probes, corners, den, box=box_of, reg=0.1, den_max=slots[0]
    )
    sums, added = recorder.launches[-2:]
    assert sums[0] == "liveptycho_window_sums" and added[0] == "liveptycho_add_ratio"
    assert added[3][2] is slots[0] and added[3][-2] == canvas.shape[1]  # the box row stride
    # A box of the canvas (strided rows), the probe modes over one power map.
    target = canvas[2:19, 3:23]
    _regularised.regularised_step(target, box, den, 0.1, 1.0, slots[0])
    _regularised.regularised_step(probes, summed, power, 0.1, 1.0)
    assert _regularised.divide_regularised(summed, power, 0.1, slots[1]) is summed
    assert recorder.launches[-1][3][1] == n * n and recorder.launches[-1][3][-1] == summed.size
    with pytest.raises(ValueError, match="does not repeat"):
        _regularised.divide_regularised(summed, den, 0.1)
    _regularised.add_scaled(probes, summed, np.ones((), np.float32))
    # DM's stored waves follow the orthogonalised modes: K x K, up to the source's bound.
    _pass_end_kernels.mix_modes(dpsi, np.eye(k, dtype=c64))
    assert recorder.launches[-1][3][1] == k and recorder.launches[-1][3][-1] == b * n * n
    with pytest.raises(ValueError, match="a mixing of 2 modes"):
        _pass_end_kernels.mix_modes(dpsi, np.eye(3, dtype=c64))
    assert f"MIX_MAX_MODES {_pass_end_kernels._MIX_MAX_MODES}" in _raw_kernels.RAW_SOURCE
    # The probe modes' orthogonalising unitary: one block, built for its mode count with
    # the block's width the kernel was built for.
    for modes in (probes, np.ones((6, n, n), c64)):
        u = _pass_end_kernels.mode_unitary(modes)
        name, grid, block, args = recorder.launches[-1]
        threads, options = _pass_end_kernels._gram_build(len(modes))
        assert name == "liveptycho_mode_unitary" and grid == (1,) and block == (threads,)
        assert f"-DGRAM_THREADS={threads}" in options and f"-DGRAM_MODES={len(modes)}" in options
        assert (
            args[0] is modes and args[1] == n * n and args[2] is u and u.shape == (len(modes),) * 2
        )
    assert (
        _pass_end_kernels._gram_build(4)[0] == 1024 and _pass_end_kernels._gram_build(5)[0] == 256
    )
    with pytest.raises(ValueError, match="1 to 12 modes"):
        _pass_end_kernels.mode_unitary(np.ones((13, n, n), c64))
    # The end of a pass: the probes' momentum, then the probes' power total (one block, a
    # fixed order) and the object's momentum, gauge and clamp with the probes' scaling.
    previous, velocity = np.zeros_like(canvas), np.zeros_like(canvas)
    _pass_end_kernels.momentum_step(probes, 3, probes.copy(), probes.copy(), 0.75, 0.1)
    assert recorder.launches[-1][3][3] == 3 and recorder.launches[-1][3][-1] == probes.size
    power = np.ones((), np.float32)
    _pass_end_kernels.pass_tail(
        canvas,
        probes,
        momentum=(2, previous, velocity),
        friction=0.75,
        gain=0.1,
        power=power,
        amax=1.0,
    )
    total, tail = recorder.launches[-2:]
    assert total[0] == "liveptycho_power_total" and total[2] == (_pass_end_kernels._TOTAL_THREADS,)
    assert tail[0] == "liveptycho_pass_tail" and tail[3][3] == 2 and tail[3][6] is power
    assert tail[3][7] is total[3][-1] and tail[3][8] == 1 and tail[3][9] == np.float32(1.0)
    assert tail[3][-2] == canvas.size and tail[3][-1] == canvas.size + probes.size
    n_before = len(recorder.launches)  # no gauge: no total, the object's elements only
    _pass_end_kernels.pass_tail(
        canvas, probes, momentum=(0, canvas, canvas), friction=0.75, gain=0.1, power=None, amax=None
    )
    (tail,) = recorder.launches[n_before:]
    assert tail[3][8] == 0 and tail[3][9] == 0 and tail[3][-1] == canvas.size
    launched = check(recorder.launches, _raw_kernels.RAW_SOURCE)
    assert launched == set(signatures(_raw_kernels.RAW_SOURCE))
    steps = [a for name, _, _, a in recorder.launches if name.endswith("regularised_step")]
    assert steps[0][-2] == canvas.shape[1]  # the box's row stride is the canvas width
    assert steps[1][2] == n * n  # the power map repeats under each mode


def test_launchers_refuse_what_the_kernels_cannot_address(recorder: Recorder) -> None:
    num = np.zeros((4, 6), np.complex64)
    den = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match="contiguous rows"):
        _regularised.add_scaled(np.zeros((4, 12), np.complex64)[:, ::2], num, den[0, 0])
    with pytest.raises(ValueError, match="elements"):
        _regularised.add_scaled(np.zeros((4, 5), np.complex64), num, den[0, 0])
    with pytest.raises(ValueError, match="C-contiguous"):
        _regularised.divide_regularised(num, np.ones((6, 4), np.float32).T, 0.1)
    with pytest.raises(ValueError, match="does not cover the box"):
        _update_sums.add_window_ratio(
            np.zeros((20, 24), np.complex64),
            np.zeros((1, 1, 8, 8), np.complex64),
            np.zeros((1, 8, 8), np.complex64),
            np.zeros((1, 2), np.int32),
            den,
            box=(0, 0, 8, 8),
        )
    with pytest.raises(ValueError, match="repeat"):
        _regularised.regularised_step(num.copy(), num, np.ones(5, np.float32), 0.1, 1.0)
    with pytest.raises(ValueError, match="power_max is tracked with"):  # both maxima or none
        _update_sums.object_sums_and_probe_terms(
            np.zeros((1, 1, 8, 8), np.complex64),
            np.zeros((1, 8, 8), np.complex64),
            np.zeros((20, 24), np.complex64),
            np.zeros((1, 2), np.int32),
            _update_sums.ObjectSums(num, den),
            power=np.zeros((8, 8), np.float32),
            power_max=np.zeros(_raw_kernels.SLOT_FLOATS, np.float32),
        )
    assert recorder.launches == []


def test_every_kernel_of_the_sums_module_is_launched_as_declared(recorder: Recorder) -> None:
    rng = np.random.default_rng(1)
    b, k, n = 3, 2, 8
    c64 = np.complex64
    f = rng.normal(size=(b, k, n, n)).astype(c64)
    amps = np.ones((5, n, n), np.float32)
    rows = np.array([0, 2, 4], np.int64)
    err = np.zeros((), np.float32)
    assert _fourier_steps.modulus_residual(f, amps, rows, None, 1e-12, 1.0, err=err) is err
    _fourier_steps.modulus_residual(f, amps, rows, np.ones((n, n), np.float32), 1e-12)
    probes = np.ones((k, n, n), c64)
    canvas = np.ones((20, 24), c64)
    corners = np.array([[0, 0], [4, 6], [9, 12]], np.int32)
    num = np.zeros((17, 20), c64)
    den = np.ones((17, 20), np.float32)
    sums = _lsqml_step_fit.lsqml_step_sums(f, probes, probes, canvas, num, den, corners, (0, 0))
    slots = np.zeros(_raw_kernels.SLOT_FLOATS, np.float32)
    _lsqml_step_fit.lsqml_step_sums(f, probes, None, canvas, num, den, corners, (0, 0), 0.1, slots)
    regularised = recorder.launches[-1][3]
    assert regularised[-4] is slots and regularised[-3] == 1 and regularised[-2] == np.float32(0.1)
    _lsqml_step_fit.lsqml_steps(sums, 0.1, 1.0, 1.0, True)
    _fourier_steps.dm_fourier_step(f, f.copy(), amps, rows, None, 0.9, 1.0, n**-2)
    # The pass's error sums given: the batch's rows of them, nothing summed here.
    pass_sums = np.zeros((f.shape[0] + 5, 3), np.float32)
    batch_rows = pass_sums[5:]
    assert (
        _fourier_steps.dm_fourier_step(f, f.copy(), amps, rows, None, 0.9, 1.0, 1.0, batch_rows)
        is None
    )
    assert recorder.launches[-1][3][6] is batch_rows
    with pytest.raises(ValueError, match="contiguous"):
        _fourier_steps.dm_fourier_step(
            f, f.copy(), amps, rows, None, 0.9, 1.0, 1.0, pass_sums[:, :2]
        )
    launched = check(recorder.launches, _raw_kernels.SUMS_SOURCE)
    assert launched == set(signatures(_raw_kernels.SUMS_SOURCE))


#: Kernels each algorithm's fused path must reach over 1 and 3 modes, whole-pixel and
#: sub-pixel (beside the FFT's own), so the test cannot pass by launching nothing.
_REACHED = {
    "epie": {"tile_sums", "probe_sums", "window_sums", "regularised_step", "mode_unitary"},
    "lsqml": {"tile_sums", "tile_step_sums", "lsqml_sums", "lsqml_steps", "add_scaled"}
    | {"mode_unitary", "mix_modes"},
    "dm": {"dm_sums", "dm_update", "mix_modes", "tile_sums", "probe_sums", "mode_unitary"},
}


@pytest.mark.parametrize("algorithm", sorted(_REACHED))
def test_the_solver_launches_every_kernel_as_declared(
    algorithm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every launch of two iterations of the solver's fused path, made at its real call
    sites (a stand-in CuPy whose kernels are recorded no-ops), against the kernels' own
    signatures; the solver's FFT kernels also by their compiled, instantiated names."""
    from hxn_liveptycho.recon import _fft_lines, _windows

    host_launches, cp, launches = use_cupy_stand_in(monkeypatch)
    caches = [_raw_kernels.raw_kernel, _raw_kernels._placeholder, _exit_waves._kernels]
    caches += [_windows._kernels, _raw_kernels._sums_module, _raw_kernels._sums_function]
    caches += [_fourier_steps._ones]
    caches += [_fft_lines._module, _fft_lines._kernel, _fft_lines._twiddles, _fft_lines._ones]
    for cache in caches:
        cache.cache_clear()
    raw_source = _raw_kernels.RAW_SOURCE + _raw_kernels.SUMS_SOURCE
    raw = signatures(raw_source)
    # The FFT's kernels are templates, not extern "C": same parameter lists.
    fft_source = re.sub(r"(?m)^__global__ void", 'extern "C" __global__ void', _fft_lines._SOURCE)
    compiled = set(_fft_lines._names())
    reached: set[str] = set()
    try:
        with np.errstate(all="ignore"):  # no-op kernels leave garbage in the arrays
            for modes in (1, 3):
                for subpixel in (False, True):
                    host_launches.run(cp, launches, algorithm, modes, subpixel, 2, 6, 16)
                    reached |= check([x for x in launches if x[0] in raw], raw_source)
                    fft = [x for x in launches if "<" in x[0]]
                    assert fft and all(x[0] in compiled for x in fft)
                    reached |= check([(x[0].split("<")[0], *x[1:]) for x in fft], fft_source)
    finally:
        for cache in caches:
            cache.cache_clear()
    assert {f"liveptycho_{k}" for k in _REACHED[algorithm]} <= reached
