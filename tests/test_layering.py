"""The import rules (no circles, nothing imported from a higher layer) hold, and the check bites."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from textwrap import dedent

from hxn_liveptycho.devtools import layering

PACKAGE_DIR = Path(layering.__file__).resolve().parents[1]

#: A small rule table for the synthetic packages: top, middle, bottom.
LAYERS = (("top", ("top",)), ("middle", ("middle",)), ("bottom", ("bottom", "")))


def make_package(root: Path, files: dict[str, str]) -> Path:
    """A package ``pkg`` under ``root`` with the given modules (relative path -> source)."""
    package = root / "pkg"
    for name, source in {"__init__.py": "", **files}.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(source), encoding="utf-8")
    return package


def test_the_package_keeps_its_import_rules() -> None:
    """`python -m hxn_liveptycho.devtools.layering` finds nothing and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "hxn_liveptycho.devtools.layering"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout == ""
    assert done.returncode == 0, done.stderr


def test_every_module_of_the_package_has_a_layer() -> None:
    """A new module must be placed in the rule table, so the table stays the whole map."""
    modules = layering.find_modules(PACKAGE_DIR)
    assert "hxn_liveptycho.recon.backend" in modules
    unplaced = [
        m for m in modules if layering.layer_index(m, "hxn_liveptycho", layering.LAYERS) < 0
    ]
    assert unplaced == []


def test_a_planted_circle_is_found_even_through_a_deferred_import(tmp_path: Path) -> None:
    """Two modules that import each other, one inside a function, make one circle line."""
    package = make_package(
        tmp_path,
        {
            "middle/__init__.py": "",
            "middle/a.py": "from pkg.middle.b import thing\n",
            "middle/b.py": """\
                def thing():
                    from pkg.middle import a

                    return a
                """,
        },
    )
    violations = layering.check(package, LAYERS)
    assert [v.rule for v in violations] == ["circle"]
    line = str(violations[0])
    circle = "pkg.middle.a -> pkg.middle.b -> pkg.middle.a"
    assert line.startswith(f"pkg/middle/a.py:1: circle: {circle}")
    assert "pkg/middle/b.py:2 (inside a function)" in line


def test_an_upward_import_and_an_unplaced_module_are_found(tmp_path: Path) -> None:
    """A bottom module importing the top is named with both layers; a stray module is named."""
    package = make_package(
        tmp_path,
        {
            "top.py": "import pkg.bottom\n",
            "bottom.py": "from pkg import top\n",
            "stray.py": "",
        },
    )
    lines = [str(v) for v in layering.check(package, LAYERS)]
    table = "LAYERS in hxn_liveptycho.devtools.layering"
    assert f"pkg/stray.py:1: unplaced: pkg.stray is in no layer of the table ({table})" in lines
    assert "pkg/bottom.py:1: upward: pkg.bottom (bottom) imports pkg.top (top)" in lines
    assert any(line.startswith("pkg/bottom.py:1: circle: pkg.bottom -> pkg.top") for line in lines)


def test_typing_only_imports_and_lazy_reexports_follow_what_runs(tmp_path: Path) -> None:
    """TYPE_CHECKING imports are skipped; a lazy re-export from __getattr__ binds its user."""
    package = make_package(
        tmp_path,
        {
            "__init__.py": """\
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from pkg.top import Face

                VERSION = "1"


                def __getattr__(name):
                    from pkg.top import Face

                    return Face
                """,
            "top.py": "from pkg.bottom import helper\nclass Face: ...\n",
            "bottom.py": """\
                from typing import TYPE_CHECKING

                from pkg import VERSION

                if TYPE_CHECKING:
                    from pkg.top import Face
                """,
            "middle.py": "from pkg import Face\n",
        },
    )
    imports = layering.import_graph(layering.find_modules(package))
    assert layering.Import("pkg.middle", "pkg.top", 1) in imports
    assert layering.Import("pkg.bottom", "pkg", 3) in imports
    assert all(i.typing_only for i in imports if i.importer == "pkg.bottom" and i.target != "pkg")
    lines = [str(v) for v in layering.check(package, LAYERS)]
    assert lines == ["pkg/middle.py:1: upward: pkg.middle (middle) imports pkg.top (top)"]


def test_the_command_exits_nonzero_with_one_line_per_violation(tmp_path: Path) -> None:
    """The entry point prints each violation on its own line and returns 1."""
    package = make_package(tmp_path, {"a.py": "import pkg.b\n", "b.py": "import pkg.a\n"})
    done = subprocess.run(
        [sys.executable, "-m", "hxn_liveptycho.devtools.layering", "--path", str(package)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    # a and b are in no layer of the package's table, and they import each other.
    assert sorted(line.split(": ")[1] for line in done.stdout.splitlines()) == [
        "circle",
        "unplaced",
        "unplaced",
    ]
