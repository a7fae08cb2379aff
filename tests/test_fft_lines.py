"""The parts of the solver's own FFT (recon._fft_lines) that can be checked without a GPU.

The kernels themselves run only on CUDA; ``benchmarks/fft_lines.py`` checks them
against cuFFT there. Here: the generated DFT codelets are executed as Python
(they are straight-line code, so a line-by-line translation runs them as
written) against NumPy's FFT, and every kernel the module launches has a
compiled name.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hxn_liveptycho.recon import _fft_lines as lines


def run_codelet(source: str, values: np.ndarray) -> np.ndarray:
    """Execute a generated codelet's body on ``values`` (complex128)."""
    env: dict = {"v": [complex(x) for x in values]}
    body = source.splitlines()[1:-1]
    for line in body:
        stmt = line.strip().rstrip(";").removeprefix("const cf ")
        stmt = re.sub(r"(\w+)\.(real|imag)\(\)", r"\1.\2", stmt)
        stmt = re.sub(r"cf\(([^,()]+), ([^()]+)\)", r"complex(\1, \2)", stmt)
        stmt = re.sub(r"(\d(?:\.\d*)?(?:e[+-]\d+)?)f\b", r"\1", stmt)
        exec(stmt, env)  # our own generated arithmetic, nothing else
    return np.array(env["v"])


@pytest.mark.parametrize("p", sorted(set(lines._FACTOR.values())))
@pytest.mark.parametrize("inverse", [False, True])
def test_codelets_are_the_dft(p: int, inverse: bool) -> None:
    rng = np.random.default_rng(p + inverse)
    x = rng.normal(size=p) + 1j * rng.normal(size=p)
    got = run_codelet(lines._codelet(p, inverse), x)
    want = np.fft.ifft(x) * p if inverse else np.fft.fft(x)
    # The twiddles are float32 literals: agreement to their 9 significant digits.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7 * np.abs(want).max())


def test_codelets_index_registers_by_literals_only() -> None:
    """The point of generating them: no computed index into the register array."""
    source = lines._codelets()
    assert re.findall(r"v\[([^\]]+)\]", source)
    assert all(i.isdigit() for i in re.findall(r"v\[([^\]]+)\]", source))


def test_every_launched_kernel_is_compiled_by_name() -> None:
    """A kernel launched without a name expression would fail only on the GPU."""
    names = set(lines._names())
    source = Path(lines.__file__).read_text()
    launched = set(re.findall(r'_kernel\("(\w+)"', source))
    assert launched == {"exit_rows", "rows", "columns", "modulus_columns"} | {
        "rows_scaled",
        "shifted_columns",
        "unshift_columns",
    }
    for p in set(lines._FACTOR.values()):
        for kernel in launched:
            assert any(n.startswith(f"liveptycho_{kernel}<{p}, ") for n in names), kernel
    defined = set(re.findall(r"__global__ void liveptycho_(\w+)\(", lines._SOURCE))
    assert defined == launched


def test_supports_the_square_sizes_and_mode_counts() -> None:
    assert lines.supports(256, 1) and lines.supports(64, lines.MAX_MODES)
    assert not lines.supports(128, 1)  # not P², keeps cuFFT
    assert not lines.supports(256, lines.MAX_MODES + 1)
    assert not lines.supports(256, 0)


def test_numpy_solver_keeps_the_reference_path() -> None:
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

    probe = np.ones((256, 256), dtype=np.complex64)
    solver = StreamingSolver(probe=probe, canvas_shape=(300, 300), params=IterativeParams())
    assert not solver._lines and not solver._fused
