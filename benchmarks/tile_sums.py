"""The object sums gathered by canvas tile against the per-position atomic adds.

Run on a CUDA machine, from the repository root:

    PYTHONPATH=. python benchmarks/tile_sums.py [--out tile_sums.json]

``recon._fused.window_sums`` makes the object sums of a batch, ``sum_b w_b
conj(P) dpsi_b`` and ``sum_b |P|^2`` over the windows, in one of two ways:
every position adds its window with atomics (no ``box``), or each canvas tile
of the batch's box gathers the windows that meet it and writes its sums once
(``box``; with ``overwrite`` the sums are written, never read). The solver
takes the tiles up to ``_fused._TILE_MODES`` modes: the object sums alone, or with
the whole-pixel probe-side sums made after them by ``liveptycho_probe_sums``.
``add_window_ratio`` gathers LSQ-ML's weighted sums straight into the object
(``+= sum / den``), and LSQ-ML's step-fit sums go by tile up to
``_fused._TILE_STEP_MODES``. Where the solver takes the atomic adds (or the
per-position step sums), the timings force the tiles (:func:`tiles_at_every_mode`)
to say whether it should take them too.

Checks, on random data (1 and 3 modes, shared and per-position probes,
weights, batches above the 256 positions a tile lists at a time, windows piled
on one another, sums that held NaN before being overwritten): both ways
against a CuPy reference made one window at a time, and so the probe-side sums
(summed and per position) and the tracked maxima. Then times both ways at the
solver's batch of 128 positions of 256², drawn as a pass draws them from a
64 x 64 and a 32 x 32 raster of step 20 px (the 4,096 and 1,024 scans), against
the copy bandwidth of the same run; reports each kernel's registers and spills;
and times the tile kernel's shapes (``_fused.TileShape``) against each other.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.recon_gpu import copy_bandwidth, tile_modes
from benchmarks.recon_profile import event_time
from hxn_liveptycho.recon import _fused
from hxn_liveptycho.recon._fused import (
    SLOT_FLOATS,
    TileShape,
    add_window_ratio,
    max_slots,
    window_sums,
)
from hxn_liveptycho.recon._fused_sums import lsqml_step_sums


def tiles_at_every_mode() -> contextlib.AbstractContextManager[None]:
    """The tile kernels for any number of modes while inside (the solver's bound lifted)."""
    return tile_modes(sys.maxsize)


def forced(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with tiles_at_every_mode():
            fn()

    return run


def rel(a: Any, b: Any) -> float:
    import cupy as cp

    return float(cp.linalg.norm((a - b).ravel()) / max(float(cp.linalg.norm(b.ravel())), 1e-30))


def noise(cp: Any, shape: tuple[int, ...]) -> Any:
    return (cp.random.standard_normal(shape) + 1j * cp.random.standard_normal(shape)).astype(
        cp.complex64
    )


def reference(
    dpsi: Any, probes: Any, corners: np.ndarray, box: tuple, weights: Any | None
) -> tuple[Any, Any]:
    """``num``, ``den`` on ``box``, one window at a time (CuPy, complex128 sums)."""
    import cupy as cp

    n = dpsi.shape[-1]
    num = cp.zeros((box[2] - box[0], box[3] - box[1]), dtype=cp.complex128)
    den = cp.zeros(num.shape, dtype=cp.float64)
    for b, (cy, cx) in enumerate(corners):
        p = probes[b] if probes.ndim == 4 else probes
        w = 1.0 if weights is None else float(weights[b])
        sl = (slice(cy - box[0], cy - box[0] + n), slice(cx - box[1], cx - box[1] + n))
        num[sl] += w * cp.sum(cp.conj(p) * dpsi[b], axis=0)
        den[sl] += cp.sum(cp.abs(p) ** 2, axis=0)
    return num, den


def probe_reference(canvas: Any, dpsi: Any, corners: np.ndarray) -> tuple[Any, Any, Any]:
    """The probe-side sums, one window at a time: per-position terms ``conj(O_b) dpsi_bk``
    (B, K, n, n), their sum over the batch, and ``sum_b |O_b|^2``."""
    import cupy as cp

    n = dpsi.shape[-1]
    windows = cp.stack([canvas[cy : cy + n, cx : cx + n] for cy, cx in corners])
    terms = cp.conj(windows)[:, None] * dpsi
    return terms, terms.sum(axis=0), (cp.abs(windows) ** 2).sum(axis=0)


def box_of(corners: np.ndarray, n: int) -> tuple[int, int, int, int]:
    """The canvas pixels ``(y0, x0, y1, x1)`` that windows of side ``n`` at ``corners`` cover."""
    lo, hi = corners.min(axis=0), corners.max(axis=0) + n
    return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])


def case(
    cp: Any, n: int, b: int, k: int, per_position: bool, spread: int, weighted: bool
) -> dict[str, Any]:
    rng = np.random.default_rng(b * 10 + k)
    corners_h = rng.integers(3, 3 + spread, size=(b, 2)).astype(np.int32)
    box = box_of(corners_h, n)
    canvas = noise(cp, (box[2] + 5, box[3] + 7))
    corners = cp.asarray(corners_h)
    dpsi = noise(cp, (b, k, n, n))
    probes = noise(cp, (b, k, n, n) if per_position else (k, n, n))
    weights = cp.asarray(rng.random(b).astype(np.float32)) if weighted else None
    num_ref, den_ref = reference(dpsi, probes, corners_h, box, weights)
    shape = num_ref.shape
    out: dict[str, Any] = {
        "case": f"n={n} B={b} K={k} {'per-position' if per_position else 'shared'} probes, "
        f"spread {spread} px{', weighted' if weighted else ''}"
    }
    for way, given in (("tiles", box), ("atomics", None)):
        # Overwritten: whatever the sums held is gone (the tiles never read them).
        num = cp.full(shape, cp.nan, cp.complex64)
        den = cp.full(shape, cp.nan, cp.float32)
        slots = [max_slots(cp.zeros(SLOT_FLOATS, cp.float32)) for _ in range(2)]
        power = cp.zeros((n, n), cp.float32)
        summed = cp.zeros((k, n, n), cp.complex64)
        window_sums(
            dpsi,
            probes,
            canvas,
            corners,
            origin=box[:2],
            num=num,
            den=den,
            weights=weights,
            terms_channels=k,
            power=power,
            den_max=slots[0],
            power_max=slots[1],
            terms_sum=summed,
            box=given,
            overwrite=True,
        )
        out[f"{way}_num"] = rel(num, num_ref)
        out[f"{way}_den"] = rel(den, den_ref)
        out[f"{way}_den_max"] = abs(float(cp.max(slots[0])) / float(cp.max(den_ref)) - 1)
        out[f"{way}_power_max"] = abs(float(cp.max(slots[1])) / float(cp.max(power)) - 1)
        out[f"{way}_probe_terms"] = (summed, power)
    terms_ref, summed_ref, power_ref = probe_reference(canvas, dpsi, corners_h)
    for way in ("tiles", "atomics"):
        summed, power = out.pop(f"{way}_probe_terms")
        out[f"{way}_summed_probe_terms"] = rel(summed, summed_ref)
        out[f"{way}_power"] = rel(power, power_ref)
    # Per-position terms and |O|^2 as channel K (the sub-pixel probe update).
    terms = window_sums(dpsi, probes, canvas, corners, terms_channels=k + 1)
    out["per_position_terms"] = rel(terms[:, :k], terms_ref)
    out["per_position_power"] = rel(terms[:, k].real.sum(axis=0), power_ref)
    # LSQ-ML's weighted sum straight into the object, den regularised on the way (its
    # maximum from a reduction; the solver passes window_sums' tracked slots).
    reg = 0.1
    den32 = den_ref.astype(cp.float32)
    den_reg = cp.maximum((1 - reg) * (den_ref + reg * cp.max(den_ref)), 1e-30)
    target = canvas.copy()
    add_window_ratio(target, dpsi, probes, corners, den32, box=box, weights=weights, reg=reg)
    expected = canvas.copy()
    expected[box[0] : box[2], box[1] : box[3]] += (num_ref / den_reg).astype(cp.complex64)
    out["ratio_into_object"] = rel(target - canvas, expected - canvas)
    untouched = cp.ones(canvas.shape, bool)
    untouched[box[0] : box[2], box[1] : box[3]] = False
    out["ratio_outside_box_changed"] = bool(cp.any(target[untouched] != canvas[untouched]))
    return out


def step_sums_case(
    cp: Any, n: int, b: int, spread: int, dprobes_mode: int, k: int = 1
) -> dict[str, Any]:
    """LSQ-ML's step-fit sums gathered by tile against the per-position kernel (no probe
    step, a shared one, one per position; den regularised on the way)."""
    rng = np.random.default_rng(b + dprobes_mode)
    corners_h = rng.integers(3, 3 + spread, size=(b, 2)).astype(np.int32)
    box = box_of(corners_h, n)
    shape = (box[2] - box[0], box[3] - box[1])
    canvas = noise(cp, (box[2] + 5, box[3] + 7))
    chi = noise(cp, (b, k, n, n))
    probes = noise(cp, (k, n, n))
    dprobes = [None, noise(cp, (k, n, n)), noise(cp, (b, k, n, n))][dprobes_mode]
    num = noise(cp, shape)
    den = cp.asarray(rng.random(shape).astype(np.float32) + 0.1)
    corners = cp.asarray(corners_h)
    args = (chi, probes, dprobes, canvas, num, den, corners, box[:2], 0.1, None)
    expected = lsqml_step_sums(*args)
    got = lsqml_step_sums(*args, box=box)
    return {
        "case": f"step sums n={n} B={b} K={k} spread {spread} px, probe step mode {dprobes_mode}",
        "tiles_step_sums": rel(got, expected),
    }


def checks(cp: Any) -> list[dict]:
    """The cases as the solver takes them, then those of several modes by tile."""
    out = [
        case(cp, 256, 128, 1, False, 1200, False),
        case(cp, 256, 128, 3, False, 1200, True),
        case(cp, 64, 300, 2, True, 200, True),  # over 256 positions: two rounds per tile
        case(cp, 64, 40, 1, False, 6, False),  # windows piled on one another
        case(cp, 48, 17, 3, True, 90, True),  # n not a multiple of the tile
        step_sums_case(cp, 256, 128, 1200, 1),
        step_sums_case(cp, 64, 300, 200, 2),
        step_sums_case(cp, 48, 17, 90, 0),
    ]
    with tiles_at_every_mode():
        several = [
            case(cp, 256, 128, 3, False, 1200, True),
            case(cp, 64, 300, 2, True, 200, True),
            case(cp, 48, 17, 3, True, 90, True),
            step_sums_case(cp, 256, 128, 1200, 1, k=3),
            step_sums_case(cp, 64, 300, 200, 2, k=2),
            step_sums_case(cp, 48, 17, 90, 0, k=3),
        ]
    for c in several:
        c["case"] += ", tiles at every mode count"
    return out + several


def raster_batch(n: int, b: int, side: int, step: int) -> tuple[np.ndarray, tuple]:
    """``b`` window corners drawn from a ``side`` x ``side`` raster, and their box."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1)
    picked = rng.permutation(side * side)[:b]
    corners = (grid.reshape(-1, 2)[picked] * step + 4).astype(np.int32)
    return corners, box_of(corners, n)


#: Tile-kernel shapes timed against the solver's (``_fused._TILE_SHAPE``): rows x 32
#: tiles, threads a block, windows loaded together, a register cap (min blocks an SM).
SHAPES = [
    TileShape(32, 256, 1),
    TileShape(32, 256, 2),
    TileShape(32, 256, 4),
    TileShape(16, 256, 2),
    TileShape(16, 256, 4),
    TileShape(8, 256, 4),
    TileShape(32, 512, 2),
    TileShape(32, 512, 4),
    TileShape(64, 512, 2),
    TileShape(32, 256, 2, 4),
]


def batch_data(cp: Any, k: int, side: int) -> dict[str, Any]:
    """One batch as a pass draws it: 128 positions of 256² from a ``side`` x ``side``
    raster of step 20 px (64: the 4,096 scan's density of windows; 32: the 1,024 one's)."""
    n, b, step = 256, 128, 20
    corners_h, box = raster_batch(n, b, side, step)
    shape = (box[2] - box[0], box[3] - box[1])
    return {
        "box": box,
        "canvas": noise(cp, (side * step + n + 8, side * step + n + 8)),
        "corners": cp.asarray(corners_h),
        "num": cp.zeros(shape, cp.complex64),
        "den": cp.ones(shape, cp.float32),
        "weights": cp.asarray(np.random.default_rng(1).random(b).astype(np.float32)),
        "dpsi": noise(cp, (b, k, n, n)),
        "probes": noise(cp, (k, n, n)),
        "power": cp.zeros((n, n), cp.float32),
        "summed": cp.zeros((k, n, n), cp.complex64),
        "wave_bytes": b * k * n * n * 8,  # the changes read once: what every way must move
    }


def timings_for(cp: Any, k: int, bandwidth: float, side: int) -> list[dict]:
    """Both ways of each sum at 128 positions of 256² and ``k`` modes."""
    d = batch_data(cp, k, side)
    box, canvas, corners, num, den = d["box"], d["canvas"], d["corners"], d["num"], d["den"]
    dpsi, probes, weights = d["dpsi"], d["probes"], d["weights"]
    obj = canvas[box[0] : box[2], box[1] : box[3]]

    def sums(given: tuple | None, probe_side: bool) -> None:
        extra: dict[str, Any] = {}
        if probe_side:
            extra = {"terms_channels": k, "power": d["power"], "terms_sum": d["summed"]}
        window_sums(
            dpsi,
            probes,
            canvas,
            corners,
            origin=box[:2],
            num=num,
            den=den,
            box=given,
            overwrite=True,
            **extra,
        )

    def atomics_then_ratio() -> None:
        num.fill(0)
        window_sums(dpsi, probes, canvas, corners, origin=box[:2], num=num, weights=weights)
        obj[...] += num / den

    def tiles_into_object() -> None:
        add_window_ratio(canvas, dpsi, probes, corners, den, box=box, weights=weights)

    def step_sums(given: tuple | None) -> None:
        lsqml_step_sums(
            dpsi, probes, d["probes"], canvas, num, den, corners, box[:2], 0.1, None, box=given
        )

    steps = [
        ("num/den (overwritten)", lambda: sums(box, False), lambda: sums(None, False)),
        (
            "LSQ-ML step-fit sums (the other way: per position)",
            lambda: step_sums(box),
            lambda: step_sums(None),
        ),
        (
            "num/den + probe terms + power",
            lambda: sums(box, True),
            lambda: sums(None, True),
        ),
        ("weighted sums into the object", tiles_into_object, atomics_then_ratio),
    ]
    out = []
    for name, tiles, atomics in steps:
        row: dict[str, Any] = {"step": name, "modes": k, "raster_side": side}
        bound = _fused._TILE_STEP_MODES if name.startswith("LSQ-ML") else _fused._TILE_MODES
        solver_takes_tiles = k <= bound
        row["solver_takes"] = "tiles" if solver_takes_tiles else "atomics"
        if not solver_takes_tiles:  # time the tiles it would take with the bound lifted
            tiles = forced(tiles)
        for way, fn in (("tiles", tiles), ("atomics", atomics)):
            seconds = event_time(cp, fn)
            row[f"{way}_s"] = seconds
            row[f"{way}_fraction_of_copy_bandwidth"] = d["wave_bytes"] / seconds / bandwidth
        row["speedup"] = row["atomics_s"] / row["tiles_s"]
        out.append(row)
    return out


def shape_sweep(cp: Any, bandwidth: float, side: int, rounds: int = 5) -> list[dict]:
    """Each of :data:`SHAPES` on one mode: the overwritten sums (checked against the
    solver's shape), LSQ-ML's ratio into the object and its step-fit sums, timed with the
    shapes taken in turn in each of ``rounds`` rounds (the median kept: one shape timed
    alone moved by 60 % between places in one run)."""
    from hxn_liveptycho.recon import _fused

    d = batch_data(cp, 1, side)
    box, corners, dpsi, probes, den = d["box"], d["corners"], d["dpsi"], d["probes"], d["den"]
    common = (dpsi, probes, corners, box, d["weights"])
    num_s, den_s = cp.empty_like(d["num"]), cp.empty_like(den)
    canvas = d["canvas"].copy()
    rows: list[dict[str, Any]] = []
    calls = []
    expected: tuple[Any, Any] | None = None
    for shape in dict.fromkeys([_fused._TILE_SHAPE, *SHAPES]):  # the solver's first, once
        overwrite = functools.partial(
            _fused._tile_launch,
            *common,
            num=num_s,
            den=den_s,
            origin=box[:2],
            overwrite=True,
            shape=shape,
        )
        ratio = functools.partial(
            _fused._tile_launch, *common, den=den, origin=box[:2], canvas=canvas, shape=shape
        )
        overwrite()
        if expected is None:
            expected = (num_s.copy(), den_s.copy())
        attrs = _fused._raw("tile_sums", shape.options()).attributes
        rows.append(
            {
                "shape": shape._asdict(),
                "raster_side": side,
                "differs_from_solver_shape": max(rel(num_s, expected[0]), rel(den_s, expected[1])),
                "num_regs": attrs.get("num_regs"),
                "local_size_bytes": attrs.get("local_size_bytes"),
            }
        )
        step = functools.partial(
            _fused.tile_step_sums,
            dpsi,
            probes,
            probes,
            canvas,
            num_s,
            den,
            corners,
            box,
            _fused.regularising(den, 0.1, None),
            cp.zeros((dpsi.shape[0], 5), cp.float32),
            shape=shape,
        )
        calls.append({"sums": overwrite, "ratio": ratio, "step": step})
    times: list[dict[str, list[float]]] = [{name: [] for name in calls[0]} for _ in rows]
    for _ in range(rounds):
        for fns, seen in zip(calls, times, strict=True):
            for name, fn in fns.items():
                seen[name].append(event_time(cp, fn))
    for row, seen in zip(rows, times, strict=True):
        for name, values in seen.items():
            row[f"{name}_s"] = float(np.median(values))
            row[f"{name}_s_rounds"] = values
            row[f"{name}_fraction_of_copy_bandwidth"] = (
                d["wave_bytes"] / row[f"{name}_s"] / bandwidth
            )
    return rows


def kernel_resources() -> list[dict]:
    """Registers and local memory (non-zero: spilled registers) of the kernels compared:
    what bounds how many threads, and so how many reads, an SM keeps in flight."""
    from hxn_liveptycho.recon import _fused

    keys = ("num_regs", "local_size_bytes", "shared_size_bytes", "max_threads_per_block")
    out = []
    for name in ("tile_sums", "tile_step_sums", "probe_sums", "window_sums", "add_ratio"):
        options = _fused._TILE_SHAPE.options() if name.startswith("tile") else ()
        attrs = _fused._raw(name, options).attributes
        out.append({"kernel": f"liveptycho_{name}"} | {k: attrs.get(k) for k in keys})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import cupy as cp

    cp.random.seed(0)
    bandwidth = copy_bandwidth(cp)
    print(
        f"device {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s",
        flush=True,
    )
    report: dict[str, Any] = {"copy_bandwidth_bytes_per_s": bandwidth, "checks": checks(cp)}
    report["kernels"] = kernel_resources()
    for k in report["kernels"]:
        print(json.dumps(k), flush=True)
    worst = 0.0
    for c in report["checks"]:
        print(json.dumps(c), flush=True)
        worst = max(worst, *(v for key, v in c.items() if isinstance(v, float)))
    report["worst_relative_difference"] = worst
    print(f"worst relative difference {worst:.2e}", flush=True)
    report["timings"] = [
        row for side in (64, 32) for k in (1, 3) for row in timings_for(cp, k, bandwidth, side)
    ]
    print(
        "| raster | step | modes | tiles ms | atomics ms | speed-up | tiles, of copy bw "
        "| solver takes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for t in report["timings"]:
        print(
            f"| {t['raster_side']}² | {t['step']} | {t['modes']} | {t['tiles_s'] * 1e3:.3f} | "
            f"{t['atomics_s'] * 1e3:.3f} | {t['speedup']:.2f}x | "
            f"{t['tiles_fraction_of_copy_bandwidth']:.2f} | {t['solver_takes']} |"
        )
    report["shapes"] = [row for side in (64, 32) for row in shape_sweep(cp, bandwidth, side)]
    print(
        "| raster | rows | threads | group | min blocks | regs | sums ms | ratio ms "
        "| step sums ms | differs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in report["shapes"]:
        sh = t["shape"]
        print(
            f"| {t['raster_side']}² | {sh['rows']} | {sh['threads']} | {sh['group']} | "
            f"{sh['min_blocks']} | {t['num_regs']} | {t['sums_s'] * 1e3:.3f} | "
            f"{t['ratio_s'] * 1e3:.3f} | {t['step_s'] * 1e3:.3f} | "
            f"{t['differs_from_solver_shape']:.1e} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if worst > 1e-5 or any(c.get("ratio_outside_box_changed") for c in report["checks"]):
        raise SystemExit(f"tile sums disagree: worst relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
