"""The import rules of the repository, checked statically with `ast`.

The core (pbft/, and every module of this repository it imports, transitively) must never
import I/O, clocks, randomness or concurrency: the simulator replays it deterministically
and the trio runtime drives it. It must also build no sets: a set of str iterates in
hash-randomized order, which would make replicas diverge between processes.

Between packages, imports run one way: crypto <- pbft <- sim, runtime <- cli (sim and
runtime never import each other), and no module imports itself through others.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE_DIRECTORY = ROOT / "pbft"

FORBIDDEN_MODULES = frozenset(
    {
        "trio",
        "socket",
        "time",
        "os",
        "random",
        "asyncio",
        "threading",
        "subprocess",
        "pathlib",
        "select",
        "selectors",
        "secrets",
        # Dynamic imports would get around every other entry of this list.
        "importlib",
    }
)


@dataclass(frozen=True)
class ImportedName:
    module: str  # absolute dotted name of the module imported (or imported from)
    line: int
    # For `from package import name`: the dotted name `package.name`, which may be a module.
    submodule: str | None = None


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.what}"


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module_name: str, is_package: bool, level: int, target: str | None) -> str:
    package = module_name.split(".") if is_package else module_name.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, target] if target else base)


def imported_names(
    source: str, module_name: str = "<source>", is_package: bool = False
) -> list[ImportedName]:
    """Every import anywhere in `source` (also inside functions and `if` blocks)."""
    names: list[ImportedName] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(ImportedName(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module_name, is_package, node.level, node.module)
            else:
                base = node.module or ""
            names.extend(
                ImportedName(base, node.lineno, f"{base}.{alias.name}") for alias in node.names
            )
    return names


def find_violations(source: str, module_name: str = "<source>") -> list[Violation]:
    """The sans-I/O rule for one module's source: forbidden imports and dynamic imports."""
    violations: list[Violation] = []
    for name in imported_names(source, module_name):
        top = name.module.split(".")[0]
        if top in FORBIDDEN_MODULES:
            violations.append(Violation(module_name, name.line, f"imports {name.module}"))
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            violations.append(Violation(module_name, node.lineno, "calls __import__"))
    return violations


def _local_file(dotted: str) -> Path | None:
    """The file of this repository that defines module `dotted`, if any."""
    if not dotted:
        return None
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and ".venv" not in candidate.parts:
            return candidate
    return None


def _with_parent_packages(dotted: str) -> list[str]:
    """Importing a.b.c also runs a/__init__.py and a/b/__init__.py."""
    parts = dotted.split(".")
    return [".".join(parts[: index + 1]) for index in range(len(parts))]


def _python_files(directory: Path) -> list[Path]:
    """Every module of a package, its subpackages' included."""
    return sorted(directory.rglob("*.py"))


def core_entry_points() -> list[Path]:
    return _python_files(CORE_DIRECTORY)


def reachable_modules(entry_points: list[Path]) -> dict[Path, list[str]]:
    """Every repository module the entry points import transitively, with an import chain."""
    chains: dict[Path, list[str]] = {path: [_module_name(path)] for path in entry_points}
    queue = list(entry_points)
    while queue:
        path = queue.pop(0)
        module_name = _module_name(path)
        source = path.read_text()
        for name in imported_names(source, module_name, path.name == "__init__.py"):
            candidates = [name.module] + ([name.submodule] if name.submodule else [])
            for candidate in candidates:
                for dotted in _with_parent_packages(candidate):
                    target = _local_file(dotted)
                    if target is not None and target not in chains:
                        chains[target] = [*chains[path], _module_name(target)]
                        queue.append(target)
    return chains


CORE = reachable_modules(core_entry_points())


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the rule ------------------------------------------------------------------------------


def rule_report(chains: dict[Path, list[str]]) -> list[str]:
    """One line per violation: file, line, what it imports, and how the core reached it."""
    return [
        f"{_relative(path)}:{violation.line}: {violation.what} (import chain: {' -> '.join(chain)})"
        for path, chain in sorted(chains.items())
        for violation in find_violations(path.read_text(), _module_name(path))
    ]


def test_core_and_everything_it_imports_never_imports_io_clock_or_randomness() -> None:
    problems = rule_report(CORE)
    assert not problems, "sans-I/O rule broken:\n" + "\n".join(problems)


def test_rule_report_names_the_module_the_import_and_the_chain() -> None:
    # Starting from the command line instead of the core, the report must point into the
    # simulator, through the module of the scenario commands.
    report = rule_report(reachable_modules([ROOT / "cli" / "main.py"]))
    assert any(line.startswith("cli/scenarios.py:") and "imports time" in line for line in report)
    assert any(
        line.startswith("sim/")
        and "imports random" in line
        and "(import chain: cli.main -> cli.scenarios -> sim." in line
        for line in report
    ), report


def test_core_closure_covers_the_sans_io_crypto_modules() -> None:
    reached = {_relative(path) for path in CORE}
    for expected in (
        "crypto/__init__.py",
        "crypto/keys.py",
        "crypto/signing.py",
        "crypto/merkle.py",
        "pbft/replica.py",
        "pbft/ledger.py",
    ):
        assert expected in reached, f"{expected} not reached from the core: {sorted(reached)}"


def test_key_files_and_the_shell_are_not_reachable_from_the_core() -> None:
    reached = {_relative(path): chain for path, chain in CORE.items()}
    assert "crypto/keyfiles.py" not in reached, reached["crypto/keyfiles.py"]
    for package in ("sim/", "runtime/", "cli/"):
        above = sorted(name for name in reached if name.startswith(package))
        assert not above, f"the core imports {package}: {above}"


def test_the_checker_finds_the_io_in_key_files_and_the_shell() -> None:
    # The checker works on real files, not only on toy strings.
    keyfiles = find_violations((ROOT / "crypto" / "keyfiles.py").read_text(), "crypto.keyfiles")
    assert {violation.what for violation in keyfiles} >= {"imports os", "imports pathlib"}
    cli = find_violations((ROOT / "cli" / "scenarios.py").read_text(), "cli.scenarios")
    assert "imports time" in {violation.what for violation in cli}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import time\n", "imports time"),
        ("import random as r\n", "imports random"),
        ("from random import Random\n", "imports random"),
        ("from os import path as p\n", "imports os"),
        ("import os.path\n", "imports os.path"),
        ("from time import monotonic as now\n", "imports time"),
        ("import trio.lowlevel\n", "imports trio.lowlevel"),
        ("def f():\n    import socket\n    return socket\n", "imports socket"),
        ("try:\n    import asyncio\nexcept ImportError:\n    pass\n", "imports asyncio"),
        ("import hashlib, secrets\n", "imports secrets"),
        ("import importlib\n", "imports importlib"),
        ("m = __import__('subprocess')\n", "calls __import__"),
    ],
)
def test_checker_catches_a_violation(source: str, expected: str) -> None:
    violations = find_violations(source, "example")
    assert expected in {violation.what for violation in violations}, violations
    assert all(violation.module == "example" for violation in violations)


def test_checker_reports_the_line_of_the_violation() -> None:
    violations = find_violations("import hashlib\n\nimport time\n", "example")
    assert [str(violation) for violation in violations] == ["example:3: imports time"]


def test_checker_accepts_pure_imports() -> None:
    source = (
        "from __future__ import annotations\n"
        "import hashlib\nimport heapq\nimport msgpack\n"
        "from collections import Counter\nfrom crypto.keys import KeyRing\n"
        "from .codec import pack\nimport timeit_is_not_time\n"
    )
    assert find_violations(source, "pbft.example") == []


def test_relative_imports_resolve_to_repository_modules() -> None:
    names = imported_names("from .codec import pack\nfrom . import ledger\n", "pbft.x")
    assert [(name.module, name.submodule) for name in names] == [
        ("pbft.codec", "pbft.codec.pack"),
        ("pbft", "pbft.ledger"),
    ]


# --- no sets in the core ---------------------------------------------------------------------


def set_constructions(source: str) -> list[tuple[int, str]]:
    """Set literals, set comprehensions and set()/frozenset() calls, with their line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Set | ast.SetComp) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("set", "frozenset")
        ):
            found.append((node.lineno, ast.unparse(node)[:60]))
    return found


def test_core_modules_build_no_sets() -> None:
    problems = [
        f"{_relative(path)}:{line}: {text}"
        for path in core_entry_points()
        for line, text in set_constructions(path.read_text())
    ]
    assert not problems, "sets iterate in hash order; use dicts or sorted lists:\n" + "\n".join(
        problems
    )


def test_simulator_modules_build_no_mutable_sets() -> None:
    # frozensets of replica ids (ints, whose hash order is fixed) are allowed in sim/.
    problems = [
        f"{_relative(path)}:{line}: {text}"
        for path in _python_files(ROOT / "sim")
        for line, text in set_constructions(path.read_text())
        if not text.startswith("frozenset(")
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "names = set()\n",
        "names = {'a', 'b'}\n",
        "names = {name for name in ('a', 'b')}\n",
        "names = frozenset(['a'])\n",
        "def f(xs):\n    return sorted(set(xs))\n",
    ],
)
def test_set_checker_catches_sets(source: str) -> None:
    assert len(set_constructions(source)) == 1


def test_set_checker_ignores_dicts_and_annotations() -> None:
    source = "seen: set[str] = {}\nd = {'a': 1}\nc = {k: 1 for k in 'ab'}\nsettle = len\n"
    assert set_constructions(source) == []


# --- no cycles, and imports run one way ------------------------------------------------------

# Each package and the packages it may import (besides itself): crypto <- pbft <- sim,
# runtime <- gateway <- cli. Every import counts, also inside functions and
# `if TYPE_CHECKING:` blocks.
ALLOWED_IMPORTS: dict[str, frozenset[str]] = {
    "crypto": frozenset(),
    "pbft": frozenset({"crypto"}),
    "sim": frozenset({"pbft", "crypto"}),
    "runtime": frozenset({"pbft", "crypto"}),
    "gateway": frozenset({"runtime", "pbft", "crypto"}),
    "cli": frozenset({"crypto", "pbft", "sim", "runtime", "gateway"}),
}
PACKAGES = tuple(ALLOWED_IMPORTS)


@dataclass(frozen=True)
class Edge:
    module: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: imports {self.target}"


def import_edges() -> list[Edge]:
    """Every import of one repository module by another, anywhere in its source (also inside
    functions and `if TYPE_CHECKING:` blocks: a cycle hidden there is a cycle all the same)."""
    edges: list[Edge] = []
    for package in PACKAGES:
        for path in _python_files(ROOT / package):
            name = _module_name(path)
            for imported in imported_names(path.read_text(), name, path.name == "__init__.py"):
                for dotted in [imported.module] + (
                    [imported.submodule] if imported.submodule else []
                ):
                    local = _local_file(dotted)
                    if local is not None and local != path:
                        edges.append(Edge(name, _module_name(local), imported.line))
    return edges


def import_graph() -> dict[str, set[str]]:
    """Module -> the repository modules it imports."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in _python_files(ROOT / package):
            graph.setdefault(_module_name(path), set())
    for edge in import_edges():
        graph[edge.module].add(edge.target)
    return graph


def direction_violations(edges: list[Edge]) -> list[str]:
    """The imports that run the wrong way between packages, one line each."""
    problems = []
    for edge in edges:
        source, target = edge.module.split(".")[0], edge.target.split(".")[0]
        allowed = ALLOWED_IMPORTS.get(source)
        if target == source:
            continue
        if allowed is None or target not in allowed:
            problems.append(f"{edge} ({source} may import only: {sorted(allowed or ())})")
    return problems


def test_imports_run_one_way_between_packages() -> None:
    problems = direction_violations(import_edges())
    assert not problems, (
        "imports against crypto <- pbft <- sim, runtime <- gateway <- cli:\n" + "\n".join(problems)
    )


def test_every_package_has_a_direction_rule() -> None:
    # A new top-level package must be placed in the order, not silently left out of it.
    packages = sorted(
        path.parent.name
        for path in ROOT.glob("*/__init__.py")
        if path.parent.name not in ("tests", ".venv")
    )
    assert packages == sorted(PACKAGES)


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("crypto.keys", "pbft.codec"),
        ("pbft.replica", "sim.network"),
        ("pbft.replica", "cli.main"),
        ("sim.simulator", "runtime.node"),
        ("runtime.node", "sim.scenario"),
        ("runtime.node", "cli.exits"),
        ("sim.fuzz", "cli.scenarios"),
        ("gateway.server", "cli.exits"),
        ("gateway.app", "sim.simulator"),
        ("runtime.node", "gateway.app"),
        ("elsewhere.module", "pbft.codec"),
    ],
)
def test_direction_check_catches_an_upward_import(module: str, target: str) -> None:
    assert direction_violations([Edge(module, target, 7)]) == [
        f"{module}:7: imports {target} "
        f"({module.split('.')[0]} may import only: "
        f"{sorted(ALLOWED_IMPORTS.get(module.split('.')[0], ()))})"
    ]


def test_direction_check_accepts_downward_and_own_package_imports() -> None:
    edges = [
        Edge("crypto.keys", "crypto.signing", 1),
        Edge("pbft.replica", "crypto.keys", 2),
        Edge("sim.simulator", "pbft.replica", 3),
        Edge("runtime.node", "pbft.replica", 4),
        Edge("cli.main", "sim.simulator", 5),
        Edge("cli.main", "runtime.node", 6),
        Edge("gateway.server", "runtime.node", 7),
        Edge("cli.gateway", "gateway.server", 8),
    ]
    assert direction_violations(edges) == []


def test_the_direction_check_sees_lazy_imports() -> None:
    # cli/scenarios.py imports the simulator only inside its functions.
    edges = {(edge.module, edge.target) for edge in import_edges()}
    assert ("cli.scenarios", "sim.simulator") in edges
    assert ("cli.main", "runtime.cluster") in edges


def test_no_module_imports_itself_through_others() -> None:
    import networkx

    graph = networkx.DiGraph()
    for module, targets in import_graph().items():
        graph.add_node(module)
        graph.add_edges_from((module, target) for target in targets)
    cycles = sorted(" -> ".join([*cycle, cycle[0]]) for cycle in networkx.simple_cycles(graph))
    assert cycles == [], "\n".join(cycles)


def test_the_cycle_check_sees_imports_inside_functions() -> None:
    """The graph has the edges a cycle would be made of even where the import is lazy."""
    graph = import_graph()
    assert "sim.shrink" in graph["sim.fuzz"]  # imported inside functions of sim/fuzz.py
    assert "crypto.signing" in graph["crypto.keys"]
