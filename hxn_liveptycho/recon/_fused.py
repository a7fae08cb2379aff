"""Fused CuPy kernels for the hot steps of a batch (the GPU fast path of the solver).

At 256² frames an element-wise CuPy expression over a batch costs a kernel
launch plus a full read and write of 25-50 MB; the solver's xp expressions
chain a dozen of them per step, and a pass over a 4,096-position scan runs
~40 batches. These kernels do each step in one pass with the same
arithmetic as the xp code in :mod:`hxn_liveptycho.recon.iterative`, which
stays the reference (and the NumPy path): the GPU parity check
(``benchmarks/recon_gpu.py``) compares the two paths. Steps that end in a
per-position or per-batch sum are in :mod:`hxn_liveptycho.recon._fused_sums`.

Object windows are read straight from the canvas at each window's corner
(no (B, n, n) copy of them is made), and the FFT pair of the fast path is
unnormalised both ways (:func:`~hxn_liveptycho.recon.backend.ifft2_unscaled`):
the 1/n² of the inverse is folded into the kernel that feeds it, so no FFT
is followed by a separate scaling pass.

Layouts: far fields and exit-wave changes (B, K, n, n) complex64, C-order;
probes (K, n, n) shared or (B, K, n, n) per position; amplitudes stored
(rows, n, n) float32, addressed through the batch's active-set ``rows``;
shift tables (B, 2, n) complex64: each position's phase ramp along y and
along x (the ramp is separable, so a pixel's factor is one product).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np

from hxn_liveptycho.recon.kernels import source as kernel_source

__all__ = [
    "SLOT_FLOATS",
    "SLOT_MAX_CUDA",
    "add_scaled",
    "add_window_ratio",
    "batch_sum",
    "divide_regularised",
    "exit_waves",
    "max_slots",
    "mix_modes",
    "mode_unitary",
    "momentum_step",
    "pass_tail",
    "ramp_table",
    "regularised_step",
    "regularising",
    "scaled_copy",
    "shift_spectra",
    "step_sums_arrays",
    "tile_step_sums",
    "unshift_sum_spectra",
    "window_sums",
]

#: The Fourier frequency (cycles/px, NumPy's fftfreq order) of index ``j`` of an n-point axis.
_FREQ = "((j) < (n + 1) / 2 ? (float)(j) : (float)((j) - n)) / (float)n"

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


def _split_index(outer: str, count: str) -> str:
    """CUDA that splits element ``i`` of an (outer, ``count``, n, n) array into ``outer``,
    ``rest`` (its place within that outer entry), mode ``k`` and pixel ``r`` = (y, x)."""
    return f"""
    const long long nn = (long long)n * n;
    const long long {outer} = i / ({count} * nn);
    const long long rest = i - {outer} * {count} * nn;
    const long long k = rest / nn;
    const long long r = rest - k * nn;
    const long long y = r / n;
    const long long x = r - y * n;
"""


#: Batch index ``b``, mode ``k`` and in-window pixel ``r`` = (y, x) of element ``i`` of a
#: (B, K, n, n) array.
_WAVE_INDEX = _split_index("b", "k_modes")


@functools.cache
def _kernels() -> dict[str, Any]:
    import cupy as cp

    waves = cp.ElementwiseKernel(
        "raw T canvas, raw T probes, raw int32 corners, int32 n, int32 width, int32 k_modes, "
        "bool per_position",
        "T out",
        _WAVE_INDEX
        + """
        const T o = canvas[(corners[2 * b] + y) * (long long)width + corners[2 * b + 1] + x];
        out = o * probes[(per_position ? b * k_modes + k : k) * nn + r];
        """,
        "liveptycho_exit_waves",
    )
    table = cp.ElementwiseKernel(
        "raw float32 frac, int32 n",
        "T out",
        """
        const long long b = i / (2 * n);
        const int axis = (i / n) % 2;
        const int j = i % n;
        const float k = """
        + _FREQ
        + """;
        float s, c;
        sincosf(-6.283185307179586f * frac[2 * b + axis] * k, &s, &c);
        out = T(c, s);
        """,
        "liveptycho_ramp_table",
    )
    shift = cp.ElementwiseKernel(
        "raw T ft, raw T table, int32 n, int32 k_modes, float32 scale",
        "T out",
        _WAVE_INDEX
        + """
        out = ft[k * nn + r] * (table[2 * b * n + y] * table[(2 * b + 1) * n + x] * scale);
        """,
        "liveptycho_shift_spectra",
    )
    # Sum over the batch, in chunks of positions (one thread per chunk and pixel, so the
    # grid stays large for one mode), each chunk's part added atomically.
    unshift = cp.ElementwiseKernel(
        "raw T f, raw T table, int32 n, int32 channels, int32 batch, int32 chunk, "
        "bool has_table, float32 scale",
        "raw float32 out",
        _split_index("c", "channels")
        + """
        const int stop = min(batch, (int)(c + 1) * chunk);
        T acc = T(0, 0);
        for (int b = c * chunk; b < stop; ++b) {
            const T v = f[(b * channels + k) * nn + r];
            acc += has_table ? v * conj(table[2 * b * n + y] * table[(2 * b + 1) * n + x]) : v;
        }
        atomicAdd(&out[2 * rest], acc.real() * scale);
        atomicAdd(&out[2 * rest + 1], acc.imag() * scale);
        """,
        "liveptycho_unshift_sum_spectra",
    )
    scaled = cp.ElementwiseKernel(
        "T x, float32 scale", "T out", "out = x * scale", "liveptycho_scale"
    )
    return {
        "waves": waves,
        "table": table,
        "shift": shift,
        "unshift": unshift,
        "scaled": scaled,
    }


#: Positions one thread of :func:`window_sums` takes in turn: the sums over the batch
#: (object power, summed probe terms) are made in registers over them, so a pixel gets
#: one atomic add per chunk instead of one per position (128 positions of a batch all
#: add into the same (n, n) pixels).
_WINDOW_CHUNK = 8
#: Positions one thread of ``liveptycho_probe_sums`` takes (``PROBE_CHUNK`` in its source).
_PROBE_CHUNK = 8


class TileShape(NamedTuple):
    """The blocks of the tile kernel (:func:`_tile_launch`): a tile of ``rows`` x 32 canvas
    pixels (one column per lane), ``threads`` a block (whole warps, ``threads / 32`` tile
    rows per pass, so ``rows / (threads / 32)`` pixels a thread; a tile's positions are
    listed this many at a time), ``group`` windows whose loads a thread issues together,
    and ``min_blocks`` a block's SM must hold at once (a register cap; 1: none)."""

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
#: ratio into the object and leaves the object sums as they were; no other shape of
#: ``benchmarks/tile_sums.py`` did better on all three (figures: docs/benchmarks-history.md).
_TILE_SHAPE = TileShape(min_blocks=4)
#: Most modes for which the solver gathers the object sums and LSQ-ML's ratio into the
#: object by tile (see :func:`window_sums`): up to three modes the tiles beat the atomics,
#: and whole iterations of the dense scans got faster with them, the sparse ones no slower
#: (``benchmarks/recon_gpu.py --tile-modes 3``; figures: docs/benchmarks-history.md).
_TILE_MODES = 3
#: Most modes for which LSQ-ML's step-fit sums are gathered by tile
#: (:func:`tile_step_sums`). At three modes they lost to the per-position kernel at the
#: 1,024 scan's density and tied at the 4,096 one.
_TILE_STEP_MODES = 1

#: The kernels called on every batch, as raw CUDA: a RawKernel call costs the host far less
#: than an ElementwiseKernel's argument checks, and the ePIE and
#: LSQ-ML passes are bound by that host time (``benchmarks/recon_host.py``). One thread
#: per element (blocks of :data:`_BLOCK`, as CuPy's element-wise launches); flags are
#: ``int``; ``target`` arrays are rows of ``width`` elements ``stride`` apart (a box of the
#: canvas, or any C-contiguous array); ``den`` repeats every ``den_size`` elements (the
#: probe's ``(n, n)`` power under its ``(K, n, n)`` modes).
_RAW_SOURCE = kernel_source(
    "fused.cu",
    SLOT_MAX=SLOT_MAX_CUDA,
    PROBE_CHUNK=f"#define PROBE_CHUNK {_PROBE_CHUNK}\n",
    TILE_SHAPE="".join(
        f"#ifndef TILE_{name.upper()}\n#define TILE_{name.upper()} {value}\n#endif\n"
        for name, value in _TILE_SHAPE._asdict().items()
    ),
)

#: Threads per block of the raw element-wise kernels.
_BLOCK = 128
#: Most modes :func:`mix_modes` holds (``MIX_MAX_MODES`` of the source; the configuration
#: allows 12).
_MIX_MAX_MODES = 12


@functools.cache
def _raw(name: str, options: tuple[str, ...] = ()) -> Any:
    """Raw kernel ``liveptycho_<name>`` of :data:`_RAW_SOURCE` built with the extra compiler
    ``options`` (CuPy compiles and loads it once per device)."""
    import cupy as cp

    return cp.RawKernel(_RAW_SOURCE, f"liveptycho_{name}", options=("-std=c++17", *options))


def _launch(name: str, size: int, args: tuple) -> None:
    """Run raw kernel ``name`` with one thread per element of ``size``."""
    if size:
        blocks = min(-(-size // _BLOCK), 2**31 - 1)
        _raw(name)((blocks,), (_BLOCK,), (*args, np.int64(size)))


def _contiguous(*arrays: Any) -> None:
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(f"a raw kernel needs C-contiguous arrays, got strides {a.strides}")


def _rows(target: Any, size: int) -> tuple[Any, Any]:
    """``(width, stride)`` of ``target`` as rows (see :data:`_RAW_SOURCE`): any C-contiguous
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


def _dummy(dtype: Any) -> Any:
    import cupy as cp

    # ``.str`` ('<f4'), not ``.name``: NumPy computes the name in Python, and a batch
    # takes a placeholder four or five times.
    return _placeholder(cp.cuda.runtime.getDevice(), np.dtype(dtype).str)


def exit_waves(canvas: Any, corners: Any, probes: Any) -> Any:
    """``O[window_b] * P_bk`` (B, K, n, n), the windows read from ``canvas`` at ``corners``
    (B, 2) int32; ``probes`` shared (K, n, n) or per position (B, K, n, n)."""
    import cupy as cp

    k, n = probes.shape[-3], probes.shape[-1]
    out = cp.empty((corners.shape[0], k, n, n), dtype=canvas.dtype)
    if out.size:
        _kernels()["waves"](canvas, probes, corners, n, canvas.shape[1], k, probes.ndim == 4, out)
    return out


def ramp_table(frac: Any, n: int) -> Any:
    """Phase ramps (B, 2, n) complex64, ``exp(-2 pi i f k)`` along y and x, for the
    sub-pixel fractions ``frac`` (B, 2) float32: the table of :func:`shift_spectra`."""
    import cupy as cp

    out = cp.empty((frac.shape[0], 2, n), dtype=cp.complex64)
    _kernels()["table"](frac, n, out)
    return out


def shift_spectra(ft: Any, table: Any, scale: float) -> Any:
    """``scale ft`` (K, n, n) times each position's ramp: (B, K, n, n) spectra whose
    inverse FFTs are the modes shifted by the positions' fractions (pass ``1/n²`` with
    an unscaled inverse FFT)."""
    import cupy as cp

    k, n = ft.shape[0], ft.shape[-1]
    out = cp.empty((table.shape[0], k, n, n), dtype=ft.dtype)
    _kernels()["shift"](ft, table, n, k, cp.float32(scale), out)
    return out


def _sum_over_batch(f: Any, table: Any | None, scale: float, chunk: int = 16) -> Any:
    import cupy as cp

    b, c, n = f.shape[0], f.shape[1], f.shape[-1]
    out = cp.zeros((c, n, n), dtype=f.dtype)
    chunks = max(1, -(-b // chunk))
    has_table = table is not None
    _kernels()["unshift"](
        f,
        table if has_table else _dummy(cp.complex64),
        n,
        c,
        b,
        chunk,
        has_table,
        cp.float32(scale),
        out.view(cp.float32),
        size=chunks * c * n * n,
    )
    return out


def unshift_sum_spectra(f: Any, table: Any, scale: float = 1.0) -> Any:
    """``scale sum_b f_b conj(ramp_b)`` (C, n, n) of spectra ``f`` (B, C, n, n): the adjoint
    of :func:`shift_spectra`, summed over the batch."""
    return _sum_over_batch(f, table, scale)


def batch_sum(f: Any) -> Any:
    """``sum_b f_b`` (C, n, n) of ``f`` (B, C, n, n) complex64."""
    return _sum_over_batch(f, None, 1.0)


def window_sums(
    dpsi: Any,
    probes: Any,
    canvas: Any,
    corners: Any,
    *,
    origin: tuple[int, int] = (0, 0),
    num: Any | None = None,
    den: Any | None = None,
    weights: Any | None = None,
    terms_channels: int = 0,
    power: Any | None = None,
    den_max: Any | None = None,
    power_max: Any | None = None,
    terms_sum: Any | None = None,
    box: tuple[int, int, int, int] | None = None,
    overwrite: bool = False,
) -> Any | None:
    """The sums of an update, from exit-wave changes ``dpsi`` (B, K, n, n), in one pass
    (two with ``box``).

    * ``num`` (complex64) / ``den`` (float32) canvases covering the box at ``origin``:
      ``num += w_b sum_k conj(P_k) dpsi_k`` and ``den += sum_k |P_k|^2`` at each window
      (``w_b``: ``weights`` (B,) float32, or 1); ``den`` None skips the illumination;
    * ``terms_channels`` K: returns the probe terms ``conj(O_b) dpsi_bk`` (B, K, n, n);
      K + 1: plus ``|O_b|^2`` as channel K (B, K + 1, n, n);
    * ``terms_sum`` (K, n, n) complex64, with ``terms_channels`` K: the probe terms are
      added into it over the batch (atomics) instead of returned per position: the
      whole-pixel probe update, which needs only their sum;
    * ``power`` (n, n) float32: ``power += sum_b |O_b|^2``;
    * ``den_max`` / ``power_max``: zeroed slots (:func:`max_slots`) that receive the
      maximum of ``den`` / ``power`` after the sums (both or neither). The sums only
      grow, so the largest partial sum is the largest total: no separate reduction.

    ``box`` ``(y0, x0, y1, x1)``, the canvas pixels the windows cover: with up to
    :data:`_TILE_MODES` modes the object sums are gathered by canvas tile (:func:`_tile_launch`,
    no atomics, a fixed order), and a second pass makes the probe-side sums, if any were
    asked for (the summed ones, with ``power``, in a kernel of their own that issues a
    chunk of positions' reads at once, as with no ``num`` at all). Otherwise every
    position adds its window with atomics (one per pixel and sum); the tiles are the
    faster of the two on the solver's scans (``benchmarks/tile_sums.py``).

    ``overwrite``: ``num`` and ``den`` cover exactly ``box`` (``origin`` its corner) and
    become the sums, whatever they held (empty arrays will do): the tiles write them
    without reading them, the atomics zero them first.

    ``O_b`` is the window of ``canvas`` at ``corners`` (the object before this update).
    """
    import cupy as cp

    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    summed = terms_sum is not None
    if summed and terms_channels != k:
        raise ValueError(f"terms_sum takes the {k} probe terms, not {terms_channels} channels")
    track = den_max is not None
    if track != (power_max is not None):
        raise ValueError("den_max and power_max go together")
    per_term = terms_channels and not summed
    terms = cp.empty((b, terms_channels, n, n), dtype=dpsi.dtype) if per_term else None
    given = [a for a in (num, den, power, den_max, power_max, terms_sum) if a is not None]
    _contiguous(dpsi, probes, canvas, corners, *given)
    absent = _dummy(cp.float32)
    i32 = np.int32
    if box is not None and num is not None and k <= _TILE_MODES:
        _tile_launch(
            dpsi,
            probes,
            corners,
            box,
            weights,
            num=num,
            den=den,
            origin=origin,
            overwrite=overwrite,
            den_slots=den_max if den is not None else None,
        )
        num = den = weights = None
        if not (terms_channels or power is not None):
            return None
    elif overwrite:
        for accumulator in (a for a in (num, den) if a is not None):
            accumulator.fill(0)
    if num is None and summed and power is not None:
        _probe_sums(dpsi, canvas, corners, terms_sum, power, power_max)
        return None
    chunks = -(-b // _WINDOW_CHUNK)
    _launch(
        "window_sums",
        chunks * n * n,
        (
            dpsi,
            probes,
            canvas,
            corners,
            i32(origin[0]),
            i32(origin[1]),
            i32(n),
            i32(num.shape[1] if num is not None else 0),
            i32(canvas.shape[1]),
            i32(k),
            i32(probes.ndim == 4),
            weights if weights is not None else absent,
            i32(weights is not None),
            i32(num is not None),
            i32(den is not None),
            i32(terms_channels),
            i32(power is not None),
            i32(track),
            i32(summed),
            num if num is not None else absent,
            den if den is not None else absent,
            terms if per_term else absent,
            power if power is not None else absent,
            den_max if track else absent,
            power_max if track else absent,
            terms_sum if summed else absent,
            i32(b),
            i32(_WINDOW_CHUNK),
        ),
    )
    return terms


def _probe_sums(
    dpsi: Any, canvas: Any, corners: Any, terms_sum: Any, power: Any, power_max: Any | None
) -> None:
    """The whole-pixel probe-side sums of :func:`window_sums` (``terms_sum``, ``power``,
    ``power_max``) alone: for a batch whose object sums were gathered by tile, and DM's
    probe pass."""
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    chunks = -(-b // _PROBE_CHUNK)
    track = power_max is not None
    i32 = np.int32
    args = (dpsi, canvas, corners, i32(n), i32(canvas.shape[1]), i32(k), i32(b), i32(track))
    slots = power_max if track else _dummy(np.float32)
    _launch("probe_sums", chunks * n * n, (*args, terms_sum, power, slots))


def _tile_grid(box: tuple[int, int, int, int], shape: TileShape) -> tuple[int, int, int, int]:
    """``(height, width, tiles_x, tiles)`` of ``box`` ``(y0, x0, y1, x1)``: the tile
    kernels' grid, one block per ``shape.rows`` x 32 tile, ``tiles_x`` across (no tiles for
    an empty box)."""
    height, width = box[2] - box[0], box[3] - box[1]
    tiles_x = -(-width // 32)
    if height <= 0 or width <= 0:
        return height, width, tiles_x, 0
    return height, width, tiles_x, -(-height // shape.rows) * tiles_x


def _tile_launch(
    dpsi: Any,
    probes: Any,
    corners: Any,
    box: tuple[int, int, int, int],
    weights: Any | None,
    *,
    num: Any | None = None,
    den: Any,
    origin: tuple[int, int],
    overwrite: bool = False,
    den_slots: Any | None = None,
    canvas: Any | None = None,
    reg_args: tuple = (),
    shape: TileShape = _TILE_SHAPE,
) -> None:
    """Launch ``liveptycho_tile_sums`` over the tiles of ``box``: ``num`` and ``den`` (rows
    from ``origin``; ``den`` None: no illumination; ``den_slots``: track its maximum)
    gain the sums (``overwrite``: become them, on exactly the box), or (``canvas``) the
    canvas gains their ratio, ``den`` regularised as ``reg_args`` (from
    :func:`regularising`; none: taken as it is) say."""
    b, k, n = dpsi.shape[0], dpsi.shape[1], dpsi.shape[-1]
    _contiguous(dpsi, probes, corners, *(a for a in (weights, den_slots) if a is not None))
    height, width, tiles_x, tiles = _tile_grid(box, shape)
    if b == 0 or tiles == 0:
        return
    ratio = canvas is not None
    accumulator = num if num is not None else den
    assert accumulator is not None, "tile sums need num or den"
    if overwrite and (tuple(origin) != tuple(box[:2]) or accumulator.shape != (height, width)):
        raise ValueError(f"overwritten sums {accumulator.shape} at {origin} are not the box {box}")
    absent = _dummy(np.float32)
    i32 = np.int32
    args = (
        dpsi,
        probes,
        corners,
        i32(b),
        i32(n),
        i32(k),
        i32(probes.ndim == 4),
        weights if weights is not None else absent,
        i32(weights is not None),
        *(i32(v) for v in (box[0], box[1], height, width, tiles_x, origin[0], origin[1])),
        i32(accumulator.shape[-1]),
        num if num is not None else absent,
        den if den is not None else absent,
        i32(den is not None and not ratio),
        i32(den_slots is not None),
        den_slots if den_slots is not None else absent,
        i32(2 if ratio else int(overwrite)),
        canvas if ratio else _dummy(np.complex64),
        i32(canvas.shape[1] if canvas is not None else 0),
        *(reg_args or regularising(den, 0.0, None)),
    )
    _raw("tile_sums", shape.options())((tiles,), (shape.threads,), args)


def regularising(den: Any, reg: float, den_max: Any | None) -> tuple[Any, Any, Any]:
    """The kernels' ``(den_max, has_slots, reg)`` arguments for regularising ``den`` as it
    is read, as :func:`divide_regularised` does (reg 0: ``den`` taken as it is)."""
    if not reg:
        return _dummy(np.float32), np.int32(0), np.float32(0)
    return (*max_of(den, den_max), np.float32(reg))


def add_window_ratio(
    canvas: Any,
    dpsi: Any,
    probes: Any,
    corners: Any,
    den: Any,
    *,
    box: tuple[int, int, int, int],
    weights: Any | None = None,
    reg: float = 0.0,
    den_max: Any | None = None,
) -> None:
    """``canvas += (sum_b w_b sum_k conj(P_k) dpsi_bk over the windows) / den`` in place,
    ``den`` covering ``box`` ``(y0, x0, y1, x1)`` and regularised on the way as
    :func:`divide_regularised` does with ``reg`` and ``den_max`` (reg 0: ``den`` already
    regularised). Up to :data:`_TILE_MODES` modes: :func:`window_sums`,
    :func:`regularising` and a ``num / den`` add in one pass, with no ``num`` array (the
    sums gathered by canvas tile); with more, the atomic sums into a ``num`` array, then
    one pass that adds the ratio."""
    import cupy as cp

    _contiguous(canvas, den)
    if den.shape != (box[2] - box[0], box[3] - box[1]):
        raise ValueError(f"den {den.shape} does not cover the box {box}")
    reg_args = regularising(den, reg, den_max)
    if dpsi.shape[1] > _TILE_MODES:
        num = cp.zeros(den.shape, dtype=cp.complex64)
        window_sums(dpsi, probes, canvas, corners, origin=box[:2], num=num, weights=weights)
        target = canvas[box[0] : box[2], box[1] : box[3]]
        width, stride = _rows(target, num.size)
        _launch("add_ratio", num.size, (num, den, *reg_args, target, width, stride))
        return
    _tile_launch(
        dpsi,
        probes,
        corners,
        box,
        weights,
        den=den,
        origin=box[:2],
        canvas=canvas,
        reg_args=reg_args,
    )


def step_sums_arrays(
    chi: Any, probes: Any, dprobes: Any | None, canvas: Any, num: Any, den: Any, corners: Any
) -> tuple[tuple, int]:
    """The arrays both step-fit kernels take first (an absent probe step stands in as the
    probes, never read), and the probe step's mode: 0 none, 1 shared, 2 per position."""
    mode = 0 if dprobes is None else (2 if dprobes.ndim == 4 else 1)
    step = dprobes if dprobes is not None else probes
    return (chi, probes, step, canvas, num, den, corners), mode


def tile_step_sums(
    chi: Any,
    probes: Any,
    dprobes: Any | None,
    canvas: Any,
    num: Any,
    den: Any,
    corners: Any,
    box: tuple[int, int, int, int],
    reg_args: tuple,
    out: Any,
    shape: TileShape = _TILE_SHAPE,
) -> None:
    """LSQ-ML's step-fit sums (B, 5) added into ``out``, gathered by canvas tile: as
    :func:`~hxn_liveptycho.recon._fused_sums.lsqml_step_sums`, whose arguments these are
    (``num`` and ``den`` covering exactly ``box``, ``reg_args`` from :func:`regularising`),
    with ``dO`` and ``O`` read once per canvas pixel instead of once per window pixel."""
    b, k, n = chi.shape[0], chi.shape[1], chi.shape[-1]
    height, width, tiles_x, tiles = _tile_grid(box, shape)
    if num.shape != (height, width) or den.shape != num.shape:
        raise ValueError(f"step sums {num.shape} / {den.shape} do not cover the box {box}")
    if b == 0 or tiles == 0:
        return
    _contiguous(chi, probes, canvas, num, den, corners, out)
    arrays, mode = step_sums_arrays(chi, probes, dprobes, canvas, num, den, corners)
    i32 = np.int32
    args = (
        *arrays,
        *(i32(v) for v in (b, n, k, probes.ndim == 4, mode, box[0], box[1], height, width)),
        i32(tiles_x),
        i32(canvas.shape[1]),
        *reg_args,
        out,
    )
    _raw("tile_step_sums", shape.options())((tiles,), (shape.threads,), args)


def max_slots(buffer: Any) -> Any:
    """The slots of a running maximum, as a view of a zeroed float32 ``buffer`` of at
    least :data:`SLOT_FLOATS` elements (allocate them with the sums they track: one
    memset for both)."""
    return buffer[:SLOT_FLOATS]


def max_of(den: Any, slots: Any | None) -> tuple[Any, Any]:
    """``(den_max, has_slots)`` as the kernels take ``max(den)``: the tracked slots, else
    a reduction's 0-d result."""
    import cupy as cp

    return (slots, np.int32(1)) if slots is not None else (cp.max(den), np.int32(0))


def regularised_step(
    target: Any, num: Any, den: Any, reg: float, weight: float, slots: Any | None = None
) -> None:
    """``target += weight num / max((1 - reg) (den + reg max(den)), 1e-30)`` in place: the
    same regularised denominator as the xp path's ``_regularised`` (scale, then add the
    scaled maximum). ``den`` is the shape of ``num`` or of its last axes (repeated over
    the leading ones); ``target`` may be a box of a larger canvas. ``slots``:
    ``max(den)`` as :func:`window_sums` tracked it (else a reduction finds it)."""
    _contiguous(num, den)
    width, stride = _rows(target, num.size)
    if num.size % den.size:
        raise ValueError(f"den {den.shape} does not repeat over num {num.shape}")
    m, from_slots = max_of(den, slots)
    args = (np.float32(reg), np.float32(weight), target, width, stride)
    _launch("regularised_step", num.size, (num, den, np.int64(den.size), m, from_slots, *args))


def divide_regularised(x: Any, den: Any, reg: float, slots: Any | None = None) -> Any:
    """``x /= max((1 - reg) (den + reg max(den)), 1e-30)`` (the xp path's ``_regularised``;
    ``den`` itself unchanged), in place, in one launch; ``den`` is the shape of ``x`` or of
    its last axes. Returns ``x``. ``slots`` as :func:`regularised_step`."""
    _contiguous(x, den)
    if x.size % den.size:
        raise ValueError(f"den {den.shape} does not repeat over {x.shape}")
    m, from_slots = max_of(den, slots)
    args = (den, np.int64(den.size), m, from_slots, np.float32(reg), x)
    _launch("divide_regularised", x.size, args)
    return x


def add_scaled(target: Any, x: Any, scale: Any) -> None:
    """``target += x * scale`` in place, ``scale`` a 0-d float32 device array."""
    _contiguous(x)
    width, stride = _rows(target, x.size)
    _launch("add_scaled", x.size, (x, scale, target, width, stride))


#: Threads of :func:`pass_tail`'s one-block power total (a power of two, at most 1024).
_TOTAL_THREADS = 1024


def momentum_step(
    x: Any, stage: int, previous: Any, velocity: Any, friction: float, gain: float
) -> None:
    """``Momentum.step`` (``recon._momentum``) on ``x`` in one pass, with the ``(stage,
    previous, velocity)`` that ``Momentum.buffers_for`` gives."""
    _contiguous(x, previous, velocity)
    f32 = np.float32
    _launch("momentum", x.size, (x, previous, velocity, np.int32(stage), f32(friction), f32(gain)))


def pass_tail(
    objects: Any,
    probes: Any,
    *,
    momentum: tuple[int, Any, Any],
    friction: float,
    gain: float,
    power: Any | None,
    amax: float | None,
) -> None:
    """The end of a pass over ``objects`` and ``probes`` in place, in two launches (one
    without the gauge): the objects' momentum step (``momentum`` as
    :meth:`~hxn_liveptycho.recon._momentum.Momentum.buffers_for` gives it; stage 0: none),
    then with ``power`` (the probes' target ``sum |P|^2``, 0-d float32) the gauge, objects
    divided and probes multiplied by ``sqrt(power / sum |P|^2)``, then the objects'
    amplitude clamp at ``amax`` (None: none). The xp path's ``_fix_gauge`` and
    ``_clamp_object`` in order, with the probes' sum in a fixed order."""
    import cupy as cp

    stage, previous, velocity = momentum
    _contiguous(objects, probes, previous, velocity)
    gauge = power is not None
    total = _dummy(np.float32)
    if gauge:
        power = cp.asarray(power, dtype=cp.float32)  # a pointer to it (no copy if it is one)
        total = cp.empty((), dtype=cp.float32)
        _raw("power_total")((1,), (_TOTAL_THREADS,), (probes, np.int64(probes.size), total))
    size = objects.size + (probes.size if gauge else 0)
    f32 = np.float32
    args: tuple[Any, ...] = (objects, previous, velocity, np.int32(stage), f32(friction), f32(gain))
    args += (power if gauge else _dummy(np.float32), total, np.int32(gauge), f32(amax or 0.0))
    _launch("pass_tail", size, (*args, probes, np.int64(objects.size)))


def mix_modes(waves: Any, u: Any) -> None:
    """``waves[b] <- u @ waves[b]`` over the mode axis of (B, K, n, n), in place: the
    stored exit waves following the orthogonalised probe modes, in one read and one write
    (CuPy's batched GEMM for K = 3 took several times the copy time)."""
    import cupy as cp

    _contiguous(waves)
    k = waves.shape[1]
    if not 1 <= k <= _MIX_MAX_MODES:
        raise ValueError(f"mix_modes takes 1 to {_MIX_MAX_MODES} modes, got {k}")
    if u.shape != (k, k):
        raise ValueError(f"a mixing of {k} modes is ({k}, {k}), got {u.shape}")
    nn = waves.shape[-2] * waves.shape[-1]
    mixing = cp.ascontiguousarray(u, dtype=cp.complex64)
    _launch("mix_modes", waves.shape[0] * nn, (mixing, np.int32(k), np.int64(nn), waves))


#: Most modes for which :func:`mode_unitary`'s block takes 1,024 threads (beyond, 256: the
#: Gram's K (K + 1) / 2 complex sums a thread holds would pass the 64 registers of 1,024).
_GRAM_WIDE_MODES = 4


@functools.cache
def _gram_build(k: int) -> tuple[int, tuple[str, ...]]:
    """Threads of :func:`mode_unitary`'s block for ``k`` modes and the options that build
    its kernel (one build per mode count)."""
    threads = 1024 if k <= _GRAM_WIDE_MODES else 256
    return threads, (f"-DGRAM_MODES={k}", f"-DGRAM_THREADS={threads}")


def mode_unitary(modes: Any) -> Any:
    """The (K, K) complex64 unitary that orthogonalises and sorts ``modes`` (K, ...), as
    :func:`~hxn_liveptycho.recon._modes.orthogonalize_modes` makes it, in one launch that
    leaves the host free (no eigen-solver round trip); :func:`mix_modes` applies it."""
    import cupy as cp

    _contiguous(modes)
    k = modes.shape[0]
    if not 1 <= k <= _MIX_MAX_MODES:
        raise ValueError(f"mode_unitary takes 1 to {_MIX_MAX_MODES} modes, got {k}")
    threads, options = _gram_build(k)
    u = cp.empty((k, k), dtype=cp.complex64)
    _raw("mode_unitary", options)((1,), (threads,), (modes, np.int64(modes.size // k), u))
    return u


def scaled_copy(x: Any, scale: float) -> Any:
    """``scale * x`` as a new array (one pass)."""
    import cupy as cp

    return _kernels()["scaled"](x, cp.float32(scale))
