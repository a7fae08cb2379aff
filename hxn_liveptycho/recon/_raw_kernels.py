"""Building, loading and launching the solver's raw CUDA kernels (``kernels/fused.cu``).

One place compiles the raw kernels (once per name, compiler options and device), turns
a launcher's arguments into a launch (one thread per element, or a tile grid) and holds
what the launchers share with the kernels: the running-maximum slots and their CUDA
helpers (also compiled into ``kernels/fused_sums.cu``), the tile kernels' shape, and
the small placeholder arrays that stand in for absent arguments.

The launchers themselves are beside the steps they make:
:mod:`~hxn_liveptycho.recon._exit_waves` (exit waves, sub-pixel shifts, batch sums),
:mod:`~hxn_liveptycho.recon._update_sums` (an update's object and probe sums),
:mod:`~hxn_liveptycho.recon._regularised` (the regularised divides and adds) and
:mod:`~hxn_liveptycho.recon._pass_end_kernels` (momentum, the end of a pass, the probe
modes' orthogonalisation).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from hxn_liveptycho.recon.kernels import source as kernel_source

__all__ = [
    "BLOCK",
    "MAX_SLOTS",
    "PROBE_CHUNK",
    "RAW_SOURCE",
    "SLOT_FLOATS",
    "SLOT_MAX_CUDA",
    "SUMS_SOURCE",
    "SUMS_THREADS",
    "TILE_SHAPE",
    "TileShape",
    "launch",
    "launch_per_position",
    "max_slots",
    "placeholder_for",
    "raw_kernel",
    "require_contiguous",
    "row_layout",
    "sums_kernel",
]

#: Slots of a running maximum (:func:`max_slots`): one per 128-byte line, so the warps'
#: atomics spread over L2 instead of queueing on one address.
MAX_SLOTS = 32
_SLOT_STRIDE = 32
#: Floats of a buffer that holds one set of slots.
SLOT_FLOATS = MAX_SLOTS * _SLOT_STRIDE

#: ``slot_max(slots, v)``: this warp's maximum of ``v`` >= 0 into one of the slots (its
#: float bits compare as unsigned ints); the readers take the maximum over the slots
#: with a whole warp (``den_maximum``, which also takes a plain ``max(den)``), and
#: ``regularised`` makes the regularised illumination from it, ``max((1 - reg) (den + reg
#: max(den)), 1e-30)`` (the xp path's ``_regularised``), where the kernels read ``den``:
#: no pass of its own.
SLOT_MAX_CUDA = f"""
__device__ __forceinline__ void slot_max(unsigned int* slots, float v) {{
    const unsigned int bits = __float_as_uint(v);
#if __CUDA_ARCH__ >= 800
    const unsigned int mask = __activemask();
    const unsigned int top = __reduce_max_sync(mask, bits);
    if ((threadIdx.x & 31) == __ffs(mask) - 1)
        atomicMax(&slots[(blockIdx.x % {MAX_SLOTS}) * {_SLOT_STRIDE}], top);
#else
    atomicMax(&slots[(blockIdx.x % {MAX_SLOTS}) * {_SLOT_STRIDE}], bits);
#endif
}}
// The maximum over the slots, read by a whole warp at once (lane j reads slot j; every
// lane gets the maximum).
__device__ __forceinline__ float warp_slots_max(const float* slots) {{
    float m = slots[(threadIdx.x % {MAX_SLOTS}) * {_SLOT_STRIDE}];
    for (int off = {MAX_SLOTS} / 2; off > 0; off /= 2)
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    return m;
}}
// max(den) from den_max, the slots (has_slots) or the maximum itself; every lane of the
// calling warp must call it.
__device__ __forceinline__ float den_maximum(const float* den_max, int has_slots) {{
    return has_slots ? warp_slots_max(den_max) : den_max[0];
}}
__device__ __forceinline__ float regularised(float den, float reg, float m) {{
    return fmaxf((1.f - reg) * (den + reg * m), 1e-30f);
}}
"""

#: Positions one thread of ``liveptycho_probe_sums`` takes (``PROBE_CHUNK`` in its source).
PROBE_CHUNK = 8


class TileShape(NamedTuple):
    """The blocks of the tile kernels (``liveptycho_tile_sums``, ``_tile_step_sums``): a
    tile of ``rows`` x 32 canvas pixels (one column per lane), ``threads`` a block (whole
    warps, ``threads / 32`` tile rows per pass, so ``rows / (threads / 32)`` pixels a
    thread; a tile's positions are listed this many at a time), ``group`` windows whose
    loads a thread issues together, and ``min_blocks`` a block's SM must hold at once (a
    register cap; 1: none)."""

    rows: int = 32
    threads: int = 256
    group: int = 2
    min_blocks: int = 1

    def options(self) -> tuple[str, ...]:
        """The compiler's ``-D`` options that build the kernel for this shape (made once
        per shape: every tile launch looks its kernel up by them)."""
        return _shape_options(self)


@functools.cache
def _shape_options(shape: TileShape) -> tuple[str, ...]:
    return tuple(f"-DTILE_{name.upper()}={value}" for name, value in shape._asdict().items())


#: The tile kernels' shape on the solver's path: 32 x 32 tiles of 256 threads, two windows
#: loaded together, registers capped at 64 for four blocks an SM (the object-sum kernel
#: takes 80 uncapped, the step-fit one 118). The cap speeds LSQ-ML's step-fit sums and its
#: ratio into the object and leaves the object sums as they were; no other shape tried did
#: better on all three (figures: docs/benchmarks-history.md).
TILE_SHAPE = TileShape(min_blocks=4)

#: The kernels called on every batch, as raw CUDA: a RawKernel call costs the host far less
#: than an ElementwiseKernel's argument checks, and the ePIE and
#: LSQ-ML passes are bound by that host time (``benchmarks/host_launches.py``). One thread
#: per element (blocks of :data:`BLOCK`, as CuPy's element-wise launches); flags are
#: ``int``; ``target`` arrays are rows of ``width`` elements ``stride`` apart (a box of the
#: canvas, or any C-contiguous array); ``den`` repeats every ``den_size`` elements (the
#: probe's ``(n, n)`` power under its ``(K, n, n)`` modes).
RAW_SOURCE = kernel_source(
    "fused.cu",
    SLOT_MAX=SLOT_MAX_CUDA,
    PROBE_CHUNK=f"#define PROBE_CHUNK {PROBE_CHUNK}\n",
    TILE_SHAPE="".join(
        f"#ifndef TILE_{name.upper()}\n#define TILE_{name.upper()} {value}\n#endif\n"
        for name, value in TILE_SHAPE._asdict().items()
    ),
)

#: Threads per block of the raw element-wise kernels.
BLOCK = 128


@functools.cache
def raw_kernel(name: str, options: tuple[str, ...] = ()) -> Any:
    """Raw kernel ``liveptycho_<name>`` of :data:`RAW_SOURCE` built with the extra compiler
    ``options`` (CuPy compiles and loads it once per device)."""
    import cupy as cp

    return cp.RawKernel(RAW_SOURCE, f"liveptycho_{name}", options=("-std=c++17", *options))


def launch(name: str, size: int, args: tuple) -> None:
    """Run raw kernel ``name`` with one thread per element of ``size``."""
    if size:
        blocks = min(-(-size // BLOCK), 2**31 - 1)
        raw_kernel(name)((blocks,), (BLOCK,), (*args, np.int64(size)))


def require_contiguous(*arrays: Any) -> None:
    """Refuse strided arrays: the raw kernels index every array as C-contiguous."""
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"a raw kernel needs C-contiguous arrays, got strides {a.strides}")


def row_layout(target: Any, size: int) -> tuple[Any, Any]:
    """``(width, stride)`` of ``target`` as rows (see :data:`RAW_SOURCE`): any C-contiguous
    array of ``size`` elements, or a 2-D view whose rows are contiguous."""
    width = target.shape[-1]
    if target.size != size:
        raise ValueError(f"target has {target.size} elements, the update {size}")
    if target.flags.c_contiguous:
        return np.int64(width), np.int64(width)
    if target.ndim == 2 and target.strides[1] == target.itemsize:
        return np.int64(width), np.int64(target.strides[0] // target.itemsize)
    raise ValueError(f"target of strides {target.strides} is not a set of contiguous rows")


@functools.cache
def _placeholder(device: int, dtype: str) -> Any:
    """A small zeroed array on ``device`` that stands in for an absent array argument
    (never read: the kernel's flag says it is absent)."""
    import cupy as cp

    with cp.cuda.Device(device):
        return cp.zeros(SLOT_FLOATS, dtype=dtype)


def placeholder_for(dtype: Any) -> Any:
    """The placeholder of ``dtype`` on the current device (see :func:`_placeholder`)."""
    import cupy as cp

    # ``.str`` ('<f4'), not ``.name``: NumPy computes the name in Python, and a batch
    # takes a placeholder four or five times.
    return _placeholder(cp.cuda.runtime.getDevice(), np.dtype(dtype).str)


def max_slots(buffer: Any) -> Any:
    """The slots of a running maximum, as a view of a zeroed float32 ``buffer`` of at
    least :data:`SLOT_FLOATS` elements (allocate them with the sums they track: one
    memset for both)."""
    return buffer[:SLOT_FLOATS]


#: The kernels whose step ends in a per-position or per-batch sum (a block-wide
#: reduction, one atomic add per block and sum), one module of them: grids are (blocks
#: per position, positions) of :data:`SUMS_THREADS` threads.
SUMS_SOURCE = kernel_source("fused_sums.cu", SLOT_MAX=SLOT_MAX_CUDA)
SUMS_THREADS = 256
#: Blocks per position: enough to fill the GPU at batch 32+ with 256² frames.
_BLOCKS_PER_POSITION = 32


@functools.cache
def _sums_module() -> Any:
    import cupy as cp

    return cp.RawModule(code=SUMS_SOURCE, options=("-std=c++17",))


@functools.cache
def _sums_function(name: str, device: int) -> Any:
    """Kernel ``name`` of :data:`SUMS_SOURCE` loaded on ``device``, looked up once (the hot
    path calls these per batch)."""
    import cupy as cp

    with cp.cuda.Device(device):
        return _sums_module().get_function(name)


def sums_kernel(name: str) -> Any:
    """Kernel ``name`` of :data:`SUMS_SOURCE` on the current device."""
    import cupy as cp

    return _sums_function(name, cp.cuda.runtime.getDevice())


def launch_per_position(name: str, positions: int, nn: int, args: tuple) -> None:
    """Run kernel ``name`` of :data:`SUMS_SOURCE` on a (blocks, positions) grid; ``args`` as
    the kernel takes them (``np.int32`` / ``np.float32`` scalars: CuPy would pass Python's
    as 64-bit)."""
    blocks = min(_BLOCKS_PER_POSITION, -(-nn // SUMS_THREADS))
    if positions:
        sums_kernel(name)((blocks, positions), (SUMS_THREADS,), args)
