"""The solver's own 2-D FFT for n = 64 and 256, with the modulus step folded into it.

Why not cuFFT alone: the profile of the fused solver (docs/benchmarks-history.md)
showed cuFFT taking each 256² transform in two passes at under half the copy
bandwidth, and the exit wave, the forward FFT, the modulus step and the inverse
FFT as five full passes over the batch. Here one n = P² point transform is done
by the P threads of a *line* (a row or a column): each holds P values, does a
P-point DFT in registers, a twiddle, one exchange through shared memory and a
second P-point DFT (the four-step algorithm). A row pass and a column pass make
the 2-D transform, and the steps between them ride along:

* :func:`modulus_update`: exit waves read from the canvas and row-transformed
  (one kernel); column transform, modulus step with its error, inverse column
  transform (one kernel, the far field never leaves registers); inverse row
  transform (one kernel). Three passes where the cuFFT path made seven.
* :func:`fft2` / :func:`ifft2_unscaled`: plain transforms in place, two passes.

The arithmetic is that of :func:`~hxn_liveptycho.recon._fourier_steps.modulus_residual`
between unnormalised transforms, so the results match the cuFFT path to float32
rounding (``tests/test_gpu_parity.py`` checks it against ``cupy.fft``). Other
frame sizes, and more than :data:`MAX_MODES` modes, keep the cuFFT path.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from hxn_liveptycho.recon.kernels import source as kernel_source

__all__ = [
    "MAX_MODES",
    "exit_wave_spectra",
    "fft2",
    "ifft2_unscaled",
    "modulus_update",
    "scaled_ifft2_unscaled",
    "shifted_modes",
    "supports",
    "unshift_sum",
]

#: Line length n -> P (n = P²): the sizes this module transforms.
_FACTOR = {64: 8, 256: 16}
#: The column kernel of :func:`modulus_update` keeps every mode's column in registers.
MAX_MODES = 4
#: Threads per block in every kernel here.
_THREADS = 256
#: Positions each block of the unshift sum adds up before its atomics.
_UNSHIFT_CHUNK = 4
#: CUDA's limit on a grid's y extent (planes per column launch).
_MAX_GRID_Y = 65535

_SOURCE = kernel_source("fft_lines.cu")


def _codelet(p: int, inverse: bool) -> str:
    """CUDA for ``v[j] <- sum_m v[m] exp(-+2 pi i m j / p)``: radix-2 decimation in time,
    the bit reversal and every twiddle resolved here, so the code has literal indices."""
    bits = p.bit_length() - 1
    rev = [int(f"{i:0{bits}b}"[::-1], 2) for i in range(p)]
    body = [f"    const cf x{i} = v[{rev[i]}];" for i in range(p)]
    names = [f"x{i}" for i in range(p)]
    sign = 1 if inverse else -1
    half, stage = 1, 0
    while half < p:
        new = list(names)
        for i in range(0, p, 2 * half):
            for j in range(half):
                a, b = names[i + j], names[i + j + half]
                w = np.exp(sign * 2j * np.pi * j / (2 * half))
                if j == 0:
                    t = b
                elif np.isclose(w, 1j):
                    t = f"cf(-{b}.imag(), {b}.real())"
                elif np.isclose(w, -1j):
                    t = f"cf({b}.imag(), -{b}.real())"
                else:
                    t = f"{b} * cf({w.real:.9e}f, {w.imag:.9e}f)"
                lo, hi = f"s{stage}_{i + j}", f"s{stage}_{i + j + half}"
                body.append(f"    const cf t{stage}_{i + j} = {t};")
                body.append(f"    const cf {lo} = {a} + t{stage}_{i + j};")
                body.append(f"    const cf {hi} = {a} - t{stage}_{i + j};")
                new[i + j], new[i + j + half] = lo, hi
        names, half, stage = new, 2 * half, stage + 1
    body += [f"    v[{i}] = {names[i]};" for i in range(p)]
    flag = "true" if inverse else "false"
    head = f"template <> __device__ __forceinline__ void dft<{p}, {flag}>(cf* v) {{"
    return "\n".join([head, *body, "}"])


def _codelets() -> str:
    parts = ["template <int P, bool INV> __device__ __forceinline__ void dft(cf* v);"]
    for p in sorted(set(_FACTOR.values())):
        parts.extend(_codelet(p, inverse) for inverse in (False, True))
    return "\n\n".join(parts)


def _names() -> list[str]:
    names = []
    for p in sorted(set(_FACTOR.values())):
        log = p.bit_length() - 1
        names.append(f"liveptycho_exit_rows<{p}, {log}>")
        names.append(f"liveptycho_shifted_columns<{p}, {log}>")
        names.append(f"liveptycho_unshift_columns<{p}, {log}>")
        for inv in ("false", "true"):
            names.append(f"liveptycho_rows<{p}, {log}, {inv}>")
            names.append(f"liveptycho_rows_scaled<{p}, {log}, {inv}>")
            names.append(f"liveptycho_columns<{p}, {log}, {inv}>")
        modes = range(1, MAX_MODES + 1)
        names.extend(f"liveptycho_modulus_columns<{p}, {log}, {k}>" for k in modes)
    return names


@functools.cache
def _module() -> Any:
    import cupy as cp

    source = _SOURCE.replace("DFT_CODELETS", _codelets())
    return cp.RawModule(code=source, options=("-std=c++17",), name_expressions=_names())


@functools.cache
def _kernel(name: str, p: int, *params: Any) -> Any:
    """A compiled kernel, looked up once (the hot path calls these per batch)."""
    log = p.bit_length() - 1
    tail = "".join(f", {x}" for x in params)
    return _module().get_function(f"liveptycho_{name}<{p}, {log}{tail}>")


@functools.cache
def _twiddles(n: int, device: int) -> Any:
    """``exp(-2 pi i m / n)`` (n,) complex64 on ``device`` (one per size and GPU)."""
    import cupy as cp

    with cp.cuda.Device(device):
        return cp.asarray(np.exp(-2j * np.pi * np.arange(n) / n).astype(np.complex64))


def _tw(n: int) -> Any:
    import cupy as cp

    return _twiddles(n, cp.cuda.runtime.getDevice())


@functools.cache
def _ones(device: int) -> Any:
    """A one-element float32 1, the stand-in for an absent valid-pixel mask."""
    import cupy as cp

    with cp.cuda.Device(device):
        return cp.ones(1, dtype=cp.float32)


def supports(n: int, k_modes: int = 1) -> bool:
    """Whether :func:`modulus_update` takes frames of n² with ``k_modes`` modes
    (:func:`fft2` needs only the size)."""
    return n in _FACTOR and 1 <= k_modes <= MAX_MODES


def _planes(x: Any) -> tuple[int, int]:
    n = x.shape[-1]
    if n not in _FACTOR or x.shape[-2] != n:
        raise ValueError(f"frames of {x.shape[-2:]} are not among the sizes {sorted(_FACTOR)}")
    if not x.flags.c_contiguous:
        raise ValueError("the lines FFT works on C-contiguous arrays in place")
    return n, x.size // (n * n)


def _flag(inverse: bool) -> str:
    return "true" if inverse else "false"


def _rows_pass(x: Any, inverse: bool) -> None:
    """Transform every row of ``x`` (…, n, n) in place."""
    n, planes = _planes(x)
    if planes:
        p = _FACTOR[n]
        lines_per_block = _THREADS // p
        grid = (planes * n // lines_per_block,)
        _kernel("rows", p, _flag(inverse))(grid, (p, lines_per_block), (x, _tw(n)))


def _columns_pass(x: Any, inverse: bool) -> None:
    """Transform every column of ``x`` (…, n, n) in place."""
    n, planes = _planes(x)
    p = _FACTOR[n]
    lines_per_block = _THREADS // p
    flat = x.reshape(planes, n, n)
    for start in range(0, planes, _MAX_GRID_Y):  # a grid's y extent is at most 65,535
        part = flat[start : start + _MAX_GRID_Y]
        grid = (n // lines_per_block, part.shape[0])
        _kernel("columns", p, _flag(inverse))(grid, (lines_per_block, p), (part, _tw(n)))


def fft2(x: Any) -> Any:
    """Unnormalised forward 2-D FFT over the last two axes of ``x`` (…, n, n) complex64,
    in place; returns ``x``."""
    _rows_pass(x, inverse=False)
    _columns_pass(x, inverse=False)
    return x


def ifft2_unscaled(x: Any) -> Any:
    """Inverse 2-D FFT without the 1/n² (``n² ifft2``), in place; returns ``x``."""
    _rows_pass(x, inverse=True)
    _columns_pass(x, inverse=True)
    return x


def exit_wave_spectra(canvas: Any, corners: Any, probes: Any) -> Any:
    """``fft2(exit_waves(canvas, corners, probes))`` (B, K, n, n), unnormalised, in two
    passes: the exit waves never exist in real space outside registers."""
    out = _exit_rows(canvas, corners, probes)
    _columns_pass(out, inverse=False)
    return out


def _exit_rows(canvas: Any, corners: Any, probes: Any) -> Any:
    """The row transforms of the exit waves (B, K, n, n)."""
    import cupy as cp

    k, n = probes.shape[-3], probes.shape[-1]
    b = corners.shape[0]
    out = cp.empty((b, k, n, n), dtype=cp.complex64)
    if b:
        p = _FACTOR[n]
        lines_per_block = _THREADS // p
        args = (canvas, probes, corners, np.int32(canvas.shape[1]), np.int32(k))
        _kernel("exit_rows", p)(
            (n // lines_per_block, b * k),
            (p, lines_per_block),
            (*args, np.int32(probes.ndim == 4), _tw(n), out),
        )
    return out


def scaled_ifft2_unscaled(x: Any, scale: float) -> Any:
    """``n² ifft2(scale x)`` as a new array (``x`` (…, n, n) complex64 C-contiguous is
    left as it is): two passes, the scaled copy made by the first."""
    import cupy as cp

    n, planes = _planes(x)
    out = cp.empty(x.shape, dtype=cp.complex64)
    if planes:
        p = _FACTOR[n]
        lines_per_block = _THREADS // p
        args = (x, out, np.float32(scale), _tw(n))
        grid = (planes * n // lines_per_block,)
        _kernel("rows_scaled", p, "true")(grid, (p, lines_per_block), args)
        _columns_pass(out, inverse=True)
    return out


def shifted_modes(spectra: Any, table: Any, scale: float) -> Any:
    """``ifft2_unscaled(scale spectra_k ramp_b)`` (B, K, n, n): the modes, given by their
    spectra (K, n, n), shifted by each position's fraction (``table`` (B, 2, n), as
    :func:`~hxn_liveptycho.recon._exit_waves.shift_spectra`). Two passes, the first reading
    only the shared spectra."""
    import cupy as cp

    k, n = spectra.shape[0], spectra.shape[-1]
    b = table.shape[0]
    out = cp.empty((b, k, n, n), dtype=cp.complex64)
    if b:
        p = _FACTOR[n]
        lines_per_block = _THREADS // p
        args = (spectra, table, np.int32(k), np.float32(scale), _tw(n), out)
        _kernel("shifted_columns", p)((n // lines_per_block, b * k), (lines_per_block, p), args)
        _rows_pass(out, inverse=True)
    return out


def unshift_sum(f: Any, table: Any, scale: float, out: Any | None = None) -> Any:
    """``out += scale sum_b fft2(f_b) conj(ramp_b)`` (C, n, n) for ``f`` (B, C, n, n)
    (consumed: its rows are transformed in place); a new ``out`` when None. The adjoint
    of :func:`shifted_modes` before its inverse FFT, summed over the batch."""
    import cupy as cp

    b, c, n = f.shape[0], f.shape[1], f.shape[-1]
    if out is None:
        out = cp.zeros((c, n, n), dtype=cp.complex64)
    if b:
        p = _FACTOR[n]
        lines_per_block = _THREADS // p
        _rows_pass(f, inverse=False)
        chunks = -(-b // _UNSHIFT_CHUNK)
        args = (f, table, np.int32(b), np.int32(c), np.int32(_UNSHIFT_CHUNK), np.float32(scale))
        grid = (n // lines_per_block, c, chunks)
        _kernel("unshift_columns", p)(
            grid, (lines_per_block, p), (*args, _tw(n), out.view(cp.float32))
        )
    return out


def modulus_update(
    canvas: Any,
    corners: Any,
    probes: Any,
    amps: Any,
    rows: Any,
    valid: Any | None,
    floor: float,
    scale: float,
    err: Any | None = None,
) -> tuple[Any, Any]:
    """``(err, dpsi)``: the batch's squared amplitude error and the exit-wave update
    ``ifft2_unscaled(modulus_residual(fft2(exit_waves(...))))`` (B, K, n, n), in three
    passes. ``err``: a 0-d float32 array to add the error into (a pass's running total:
    no array made and no add launched per batch), else a new one. ``canvas`` (H, W)
    complex64; ``corners`` (B, 2) int32; ``probes`` (K, n, n)
    or (B, K, n, n); ``amps`` (rows, n, n) float32 in FFT order, read at ``rows`` (B,)
    int64; ``valid`` (n, n) float32 or None. Requires :func:`supports`."""
    import cupy as cp

    k, n = probes.shape[-3], probes.shape[-1]
    if not supports(n, k):
        raise ValueError(f"{n}² frames with {k} modes are not supported here; use the cuFFT path")
    b = corners.shape[0]
    out = _exit_rows(canvas, corners, probes)
    if err is None:
        err = cp.zeros((), dtype=cp.float32)
    if not b:
        return err, out
    p, tw = _FACTOR[n], _tw(n)
    lines_per_block = _THREADS // p
    mask, has_valid = (valid, 1) if valid is not None else (_ones(cp.cuda.runtime.getDevice()), 0)
    i32, f32 = np.int32, np.float32
    _kernel("modulus_columns", p, k)(
        (n // lines_per_block, b),
        (lines_per_block, p),
        (out, amps, rows, mask, i32(has_valid), f32(floor), f32(scale), tw, err),
    )
    _rows_pass(out, inverse=True)
    return err, out
