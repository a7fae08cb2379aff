"""The package's import rules, checked from source: ``python -m hxn_liveptycho.devtools.layering``.

Why: the package stays readable only while its imports point one way, from
the entry points down to the leaf helpers (docs/architecture.md). An import
that points up, or two modules that import each other, are cheap to add and
expensive to remove later, and nothing at run time complains until an import
order changes. This module reads every module with :mod:`ast` (nothing is
imported, so it runs without the optional GPU stack) and checks two rules:

1. **No circles.** No module reaches itself through the imports that run,
   at module level or inside a function (a deferred import is a real
   dependency that merely runs later).
2. **No upward imports.** Every module belongs to one layer of
   :data:`LAYERS` (from the top down) and imports only its own layer and the
   layers below it. ``recon``, ``streams`` and ``store`` therefore import
   nothing from configuration, the session or the entry points.

Imports under ``if TYPE_CHECKING:`` never run and name a type only for an
annotation; both rules skip them. A package ``__init__`` that re-exports a
name lazily from a module-level ``__getattr__`` gives a dependency to the
modules that import that name, not to the package itself.

It prints one line per violation and exits 1 if there is any, 0 if none.
Imports by a computed name (``importlib.import_module``) are not seen; the
package uses them only for the lazy re-exports of ``nn`` and ``sim`` (their own modules).
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LAYERS",
    "Import",
    "Violation",
    "check",
    "find_modules",
    "import_graph",
    "layer_index",
    "main",
]

#: The rule table, top layer first: (layer name, the modules and packages in it, relative to
#: the package root; "" is the root ``__init__``, which holds only the version and lazy
#: re-exports). A module may import its own layer and the layers below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry points and outside drivers",
        ("cli", "serve", "control", "replay", "reprocess", "demo", "sim", "devtools"),
    ),
    ("callback", ("callback",)),
    ("engine", ("pipeline.engine",)),
    ("session", ("pipeline.session",)),
    # The stages are built from a run's ScanConfig and Settings, so they sit above them.
    ("pipeline stages", ("pipeline", "nn")),
    # The store writes a ScanConfig's record and reads Settings; nothing below knows Tiled.
    ("store", ("store",)),
    # The models of a run and of a process; they hold the solver's and receivers' settings.
    ("configuration", ("config",)),
    # The wire formats and the numerics: reusable without a run, a session or a setting.
    ("streams and recon", ("streams", "recon")),
    ("leaf helpers", ("", "errors", "util")),
)


@dataclass(frozen=True)
class Import:
    """One import of a module of the package by another, where it is written."""

    importer: str
    target: str
    line: int
    #: Written inside a function: it runs when the function is first called.
    deferred: bool = False
    #: Written under ``if TYPE_CHECKING:``: it never runs.
    typing_only: bool = False


@dataclass(frozen=True)
class Violation:
    """One broken rule, printed as ``path:line: rule: message``."""

    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.message}"


def find_modules(package_dir: Path, package: str | None = None) -> dict[str, Path]:
    """Every module under ``package_dir`` by its dotted name (a package by its ``__init__``)."""
    package = package or package_dir.name
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if "__pycache__" in parts or any(not p.isidentifier() for p in parts):
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


class _ImportVisitor(ast.NodeVisitor):
    """Collects a module's imports, noting those inside functions and under TYPE_CHECKING."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.found: list[tuple[str, tuple[str, ...], int, bool, bool]] = []
        self.lazy_exports: dict[str, str] = {}
        self._function_depth = 0
        self._typing_depth = 0
        self._in_module_getattr = False

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        top_getattr = self._function_depth == 0 and node.name == "__getattr__"
        self._function_depth += 1
        self._in_module_getattr = self._in_module_getattr or top_getattr
        self.generic_visit(node)
        self._function_depth -= 1
        if top_getattr:
            self._in_module_getattr = False

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815 (ast's visitor naming)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        is_typing = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        if not is_typing:
            self.generic_visit(node)
            return
        self._typing_depth += 1
        for child in node.body:
            self.visit(child)
        self._typing_depth -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, (), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            # A relative import: level 1 is this module's package (itself, for an __init__).
            parts = self.module.split(".")
            keep = len(parts) - node.level + (1 if self.is_package else 0)
            base = ".".join([*parts[: max(keep, 0)], *([base] if base else [])])
        names = tuple(alias.name for alias in node.names)
        if self._in_module_getattr and self.is_package:
            for name in names:
                self.lazy_exports[name] = base
            return
        self._add(base, names, node.lineno)

    def _add(self, base: str, names: tuple[str, ...], line: int) -> None:
        self.found.append((base, names, line, self._function_depth > 0, self._typing_depth > 0))


def _resolve(base: str, names: Sequence[str], modules: Mapping[str, Path]) -> Iterator[str]:
    """The package's modules an import statement runs (``from a import b`` may name a module)."""
    if not names:  # ``import a.b.c`` runs a.b.c (its parents are implicit, as for every module)
        parts = base.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in modules:
                yield ".".join(parts[:end])
                return
        return
    for name in names:
        if f"{base}.{name}" in modules:
            yield f"{base}.{name}"
        elif base in modules:
            yield base


def import_graph(modules: Mapping[str, Path]) -> list[Import]:
    """Every import of one of ``modules`` by another, in file and line order."""
    visitors: dict[str, _ImportVisitor] = {}
    for module, path in modules.items():
        visitor = _ImportVisitor(module, is_package=path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        visitors[module] = visitor
    imports: list[Import] = []
    for module, visitor in visitors.items():
        for base, names, line, deferred, typing_only in visitor.found:
            targets = set(_resolve(base, names, modules))
            lazy = visitors[base].lazy_exports if base in visitors else {}
            for name in names:  # a name the package re-exports lazily: the module behind it
                if name in lazy:
                    targets.discard(base)
                    targets.update(_resolve(lazy[name], (name,), modules))
            imports.extend(
                Import(module, target, line, deferred, typing_only)
                for target in sorted(targets)
                if target != module
            )
    return imports


def layer_index(module: str, package: str, layers: Sequence[tuple[str, Sequence[str]]]) -> int:
    """The index in ``layers`` of the longest entry that holds ``module``; -1 if none does."""
    relative = module[len(package) + 1 :] if module != package else ""
    best, best_len = -1, -1
    for index, (_, members) in enumerate(layers):
        for member in members:
            holds = (
                relative == member
                if member == ""
                else relative == member or relative.startswith(member + ".")
            )
            if holds and len(member) > best_len:
                best, best_len = index, len(member)
    return best


def _circles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def _shortest_cycle(start: str, members: set[str], edges: Mapping[str, set[str]]) -> list[str]:
    """The shortest path from ``start`` back to itself inside one component."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for child in sorted(edges.get(node, set()) & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


def check(
    package_dir: Path,
    layers: Sequence[tuple[str, Sequence[str]]] = LAYERS,
    *,
    package: str | None = None,
) -> list[Violation]:
    """Every violation of the import rules in the package at ``package_dir``."""
    package = package or package_dir.name
    modules = find_modules(package_dir, package)
    imports = import_graph(modules)
    root = package_dir.parent

    def where(module: str) -> str:
        return modules[module].relative_to(root).as_posix()

    violations: list[Violation] = []
    for module in modules:
        if layer_index(module, package, layers) < 0:
            violations.append(
                Violation(
                    where(module),
                    1,
                    "unplaced",
                    f"{module} is in no layer of the table (LAYERS in {__name__})",
                )
            )
    for imp in imports:
        if imp.typing_only:
            continue
        upper = layer_index(imp.importer, package, layers)
        lower = layer_index(imp.target, package, layers)
        if upper >= 0 and lower >= 0 and lower < upper:
            how = " (inside a function)" if imp.deferred else ""
            violations.append(
                Violation(
                    where(imp.importer),
                    imp.line,
                    "upward",
                    f"{imp.importer} ({layers[upper][0]}) imports {imp.target} "
                    f"({layers[lower][0]}){how}",
                )
            )
    edges: dict[str, set[str]] = {}
    first: dict[tuple[str, str], Import] = {}
    for imp in imports:
        if not imp.typing_only:
            edges.setdefault(imp.importer, set()).add(imp.target)
            first.setdefault((imp.importer, imp.target), imp)
    for component in _circles(edges):
        cycle = _shortest_cycle(component[0], set(component), edges)
        steps = [first[(a, b)] for a, b in itertools.pairwise(cycle)]
        hops = ", ".join(
            f"{where(s.importer)}:{s.line}{' (inside a function)' if s.deferred else ''}"
            for s in steps
        )
        rest = sorted(set(component) - set(cycle))
        also = f"; the same circle also holds {', '.join(rest)}" if rest else ""
        violations.append(
            Violation(
                where(cycle[0]),
                steps[0].line,
                "circle",
                f"{' -> '.join(cycle)} [{hops}]{also}",
            )
        )
    return violations


def _describe(imports: Iterable[Import]) -> list[str]:
    """The import graph as ``importer -> target`` lines, deferred and typing ones marked."""
    lines = []
    for imp in imports:
        mark = " [typing]" if imp.typing_only else " [deferred]" if imp.deferred else ""
        lines.append(f"{imp.importer} -> {imp.target}{mark}")
    return sorted(set(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Check the package (or the one at ``--path``); print the violations; 1 if any."""
    parser = argparse.ArgumentParser(
        prog="python -m hxn_liveptycho.devtools.layering",
        description="Check the import rules: no circles, no import from a higher layer.",
    )
    parser.add_argument(
        "--path",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="the package directory to check (default: the installed hxn_liveptycho)",
    )
    parser.add_argument(
        "--graph", action="store_true", help="print the whole import graph instead of checking"
    )
    args = parser.parse_args(argv)
    if args.graph:
        for line in _describe(import_graph(find_modules(args.path))):
            print(line)  # noqa: T201 (a command-line tool's output)
        return 0
    violations = check(args.path)
    for violation in violations:
        print(violation)  # noqa: T201 (a command-line tool's output)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
