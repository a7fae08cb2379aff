"""The solver's own FFT (``recon/_fft_lines.py``) against cuFFT: agreement and time.

Run on a CUDA machine, from the repository root:

    PYTHONPATH=. python benchmarks/fft_lines.py [--out results.json]

Checks, against ``cupy.fft`` and the cuFFT path of the fused solver, on random
data: the 2-D transforms both ways (n = 64 and 256), the exit-wave spectra
(shared and per-position probes) and the whole modulus update with its error
(1-4 modes, with and without a valid-pixel mask). Then times, at the solver's
batch of 128 positions of 256², each against its cuFFT counterpart and the
copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from benchmarks.recon_gpu import copy_bandwidth, save_report
from benchmarks.recon_profile import event_time
from hxn_liveptycho.recon import _fft_lines as lines
from hxn_liveptycho.recon import backend
from hxn_liveptycho.recon._fused import (
    SLOT_FLOATS,
    batch_sum,
    exit_waves,
    max_slots,
    ramp_table,
    shift_spectra,
    unshift_sum_spectra,
    window_sums,
)
from hxn_liveptycho.recon._fused_sums import modulus_residual


def rel(a: Any, b: Any) -> float:
    import cupy as cp

    return float(cp.linalg.norm((a - b).ravel()) / cp.linalg.norm(b.ravel()))


def complex_noise(cp: Any, shape: tuple[int, ...]) -> Any:
    return (cp.random.standard_normal(shape) + 1j * cp.random.standard_normal(shape)).astype(
        cp.complex64
    )


def scene(cp: Any, n: int, b: int, k: int, per_position: bool) -> dict[str, Any]:
    """A canvas, window corners, probes and measured amplitudes near the model's."""
    canvas = complex_noise(cp, (n + 64, n + 96))
    corners = cp.stack([cp.random.randint(0, 64, b), cp.random.randint(0, 96, b)], axis=1).astype(
        cp.int32
    )
    probes = complex_noise(cp, (b, k, n, n) if per_position else (k, n, n))
    psi = exit_waves(canvas, corners, probes)
    inten = cp.sum(cp.abs(cp.fft.fft2(psi)) ** 2, axis=1)
    amps = (cp.sqrt(inten) * (1 + 0.1 * cp.random.standard_normal(inten.shape))).astype(cp.float32)
    rows = cp.arange(b, dtype=cp.int64)[::-1].copy()  # frames stored in another order
    amps = amps[::-1].copy()
    valid = (cp.random.random((n, n)) > 0.05).astype(cp.float32)
    return {
        "canvas": canvas,
        "corners": corners,
        "probes": probes,
        "amps": amps,
        "rows": rows,
        "valid": valid,
    }


def shift_checks(cp: Any, n: int, b: int, k: int) -> list[dict]:
    """The sub-pixel shift and its adjoint-sum against the cuFFT path's kernels."""
    table = ramp_table(cp.random.random((b, 2)).astype(cp.float32), n)
    spectra = complex_noise(cp, (k, n, n))
    ref = cp.fft.ifft2(shift_spectra(spectra, table, n**-2)) * n * n
    got = lines.shifted_modes(spectra, table, n**-2)
    terms = complex_noise(cp, (b, k + 1, n, n))
    ref_sum = unshift_sum_spectra(cp.fft.fft2(terms), table, n**-2)
    start = complex_noise(cp, (k + 1, n, n))
    got_sum = lines.unshift_sum(terms.copy(), table, n**-2)
    got_acc = lines.unshift_sum(terms.copy(), table, n**-2, out=start.copy())
    return [
        {"check": f"shifted_modes n={n} B={b} K={k}", "rel": rel(got, ref)},
        {"check": f"unshift_sum n={n} B={b} C={k + 1}", "rel": rel(got_sum, ref_sum)},
        {"check": f"unshift_sum into out n={n}", "rel": rel(got_acc, ref_sum + start)},
    ]


def sums_checks(cp: Any, n: int, b: int, k: int) -> list[dict]:
    """window_sums: the probe terms summed in the kernel against the per-position terms
    summed after, and the tracked maxima against a reduction."""
    s = scene(cp, n, b, k, per_position=False)
    dpsi = complex_noise(cp, (b, k, n, n))
    box = (n + 64, n + 96)
    args = (dpsi, s["probes"], s["canvas"], s["corners"])
    num, den = cp.zeros(box, cp.complex64), cp.zeros(box, cp.float32)
    power = cp.zeros((n, n), cp.float32)
    den_max, power_max = (max_slots(cp.zeros(SLOT_FLOATS, cp.float32)) for _ in range(2))
    summed = cp.zeros((k, n, n), cp.complex64)
    window_sums(
        *args,
        num=num,
        den=den,
        terms_channels=k,
        power=power,
        den_max=den_max,
        power_max=power_max,
        terms_sum=summed,
    )
    terms = window_sums(*args, terms_channels=k)
    tag = f"n={n} B={b} K={k}"
    return [
        {"check": f"window_sums terms_sum {tag}", "rel": rel(summed, batch_sum(terms))},
        {
            "check": f"window_sums den max {tag}",
            "rel": abs(float(den_max.max()) - float(den.max())) / float(den.max()),
        },
        {
            "check": f"window_sums power max {tag}",
            "rel": abs(float(power_max.max()) - float(power.max())) / float(power.max()),
        },
    ]


def cufft_update(cp: Any, s: dict, valid: Any, floor: float, scale: float) -> tuple[Any, Any]:
    f = cp.fft.fft2(exit_waves(s["canvas"], s["corners"], s["probes"]))
    err = modulus_residual(f, s["amps"], s["rows"], valid, floor, scale)
    return err, cp.fft.ifft2(f) * f.shape[-1] ** 2


def checks(cp: Any) -> list[dict]:
    out = []
    for n in (64, 256):
        x = complex_noise(cp, (6, 2, n, n))
        out.append({"check": f"fft2 {n}", "rel": rel(lines.fft2(x.copy()), cp.fft.fft2(x))})
        out.append(
            {
                "check": f"ifft2_unscaled {n}",
                "rel": rel(lines.ifft2_unscaled(x.copy()), cp.fft.ifft2(x) * n * n),
            }
        )
        out.extend(shift_checks(cp, n, 37, 1) + shift_checks(cp, n, 24, 3))
        out.extend(sums_checks(cp, n, 37, 1) + sums_checks(cp, n, 24, 3))
        kept = x.copy()
        got = lines.scaled_ifft2_unscaled(x, 0.25)
        out.append(
            {
                "check": f"scaled_ifft2_unscaled {n} (input kept: {bool((x == kept).all())})",
                "rel": rel(got, cp.fft.ifft2(kept) * n * n * 0.25),
            }
        )
        for k in range(1, lines.MAX_MODES + 1):
            for per_position in (False, True):
                s = scene(cp, n, 24, k, per_position)
                ref = cp.fft.fft2(exit_waves(s["canvas"], s["corners"], s["probes"]))
                got = lines.exit_wave_spectra(s["canvas"], s["corners"], s["probes"])
                tag = f"n={n} K={k} {'per-position' if per_position else 'shared'}"
                out.append({"check": f"exit_wave_spectra {tag}", "rel": rel(got, ref)})
                for masked in (False, True):
                    valid = s["valid"] if masked else None
                    e_ref, d_ref = cufft_update(cp, s, valid, 1e-24, n**-2)
                    e, d = lines.modulus_update(
                        s["canvas"],
                        s["corners"],
                        s["probes"],
                        s["amps"],
                        s["rows"],
                        valid,
                        1e-24,
                        n**-2,
                    )
                    out.append(
                        {
                            "check": f"modulus_update {tag} mask={masked}",
                            "rel": rel(d, d_ref),
                            "err_rel": abs(float(e) - float(e_ref)) / float(e_ref),
                        }
                    )
    return out


def gpu_ms(cp: Any, fn: Callable[[], Any]) -> float:
    """Milliseconds per call of ``fn`` on the device."""
    return event_time(cp, fn, repeats=20) * 1e3


def timings(cp: Any, bandwidth: float) -> list[dict]:
    n, b = 256, 128
    out = []
    for k in (1, 3):
        x = complex_noise(cp, (b, k, n, n))
        pass_s = 2 * x.nbytes / bandwidth * 1e3  # one read and one write at copy speed
        cufft = gpu_ms(cp, lambda: backend.fft2(x, xp=cp, overwrite_x=True))  # noqa: B023
        own = gpu_ms(cp, lambda: lines.fft2(x))  # noqa: B023
        out.append(
            {
                "timing": f"fft2 {b}x{k}x{n}^2",
                "cufft_ms": cufft,
                "lines_ms": own,
                "one_pass_ms": pass_s,
                "speedup": cufft / own,
            }
        )
        table = ramp_table(cp.random.random((b, 2)).astype(cp.float32), n)
        spectra = complex_noise(cp, (k, n, n))

        def shift_cufft(spectra: Any = spectra, table: Any = table) -> Any:
            spectra = shift_spectra(spectra, table, n**-2)
            return backend.ifft2_unscaled(spectra, xp=cp, overwrite_x=True)

        def unshift_cufft(x: Any = x, table: Any = table) -> Any:
            return unshift_sum_spectra(backend.fft2(x, xp=cp, overwrite_x=True), table, n**-2)

        for name, cufft_fn, own_fn in (
            (
                "shifted modes",
                shift_cufft,
                lambda s=spectra, t=table: lines.shifted_modes(s, t, n**-2),
            ),
            ("unshift sum", unshift_cufft, lambda x=x, t=table: lines.unshift_sum(x, t, n**-2)),
        ):
            cufft, own = gpu_ms(cp, cufft_fn), gpu_ms(cp, own_fn)
            out.append(
                {
                    "timing": f"{name} {b}x{k}x{n}^2",
                    "cufft_path_ms": cufft,
                    "lines_ms": own,
                    "one_pass_ms": pass_s,
                    "speedup": cufft / own,
                }
            )
        for per_position in (False, True):
            s = scene(cp, n, b, k, per_position)
            tag = f"{b}x{k}x{n}^2 {'per-position' if per_position else 'shared'} probes"

            def old(s: dict = s) -> None:
                psi = exit_waves(s["canvas"], s["corners"], s["probes"])
                f = backend.fft2(psi, xp=cp, overwrite_x=True)
                modulus_residual(f, s["amps"], s["rows"], s["valid"], 1e-24, n**-2)
                backend.ifft2_unscaled(f, xp=cp, overwrite_x=True)

            def new(s: dict = s) -> None:
                lines.modulus_update(
                    s["canvas"],
                    s["corners"],
                    s["probes"],
                    s["amps"],
                    s["rows"],
                    s["valid"],
                    1e-24,
                    n**-2,
                )

            cufft, own = gpu_ms(cp, old), gpu_ms(cp, new)
            out.append(
                {
                    "timing": f"modulus update {tag}",
                    "cufft_path_ms": cufft,
                    "lines_ms": own,
                    "one_pass_ms": pass_s,
                    "speedup": cufft / own,
                }
            )
    return out


def kernel_resources(cp: Any) -> list[dict]:
    """Registers, local memory (non-zero: spilled registers) and shared memory per kernel."""
    out = []
    for name in lines._names():
        attrs = lines._module().get_function(name).attributes
        keys = ("num_regs", "local_size_bytes", "shared_size_bytes")
        out.append({"kernel": name} | {k: attrs.get(k) for k in keys})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import cupy as cp

    cp.random.seed(0)
    bandwidth = copy_bandwidth(cp)
    results = kernel_resources(cp) + checks(cp)
    for r in results:
        print(json.dumps(r), flush=True)
    worst = max(r.get("rel", 0.0) for r in results)
    print(f"worst relative difference from cuFFT: {worst:.2e}", flush=True)
    for r in timings(cp, bandwidth):
        print(json.dumps(r), flush=True)
        results.append(r)
    save_report(cp, bandwidth, results, args.out)


if __name__ == "__main__":
    main()
