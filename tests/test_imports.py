"""No import circles, and nothing outside widgets/ imports Qt or napari.

Two checks, each first shown to catch what it looks for on a small planted package:
- every module is imported on its own, as the first module of the package in a fresh state (one
  interpreter, the package purged from ``sys.modules`` before each), so a circle of top-level
  imports fails whichever module a user imports first, and any Qt or napari import is seen;
- the graph of the package's imports, including those inside functions (a lazy import that
  closes a circle is still a circle between modules), has no cycle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import napari_concept_discovery

PACKAGE = Path(napari_concept_discovery.__file__).parent
GUI_ROOTS = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "vispy", "superqt")
EXEMPT = ("widgets",)  # the dock widgets are the one place that may import Qt and napari


def module_names(root: Path) -> list[str]:
    """Dotted names of every module below the package folder ``root`` (``__main__`` left out:
    importing it runs the command line)."""
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


_FRESH_IMPORTS = """
import importlib, json, sys
package, modules, exempt, gui_roots = json.loads(sys.argv[1])
def gui_loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in gui_roots)
problems = {}
if gui_loaded():
    problems["<start>"] = "GUI modules loaded before any import: " + ", ".join(gui_loaded())
blamed = False  # once a GUI module is loaded, only the first importer is blamed
for name in modules:
    for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        problems[name] = f"{type(exc).__name__}: {exc}"
        continue
    exempted = any(name.startswith(f"{package}.{e}") for e in exempt)
    if not exempted and not blamed and gui_loaded():
        problems[name] = "imports " + ", ".join(gui_loaded()[:6])
        blamed = True
print(json.dumps(problems))
"""


def import_each_fresh(root: Path) -> dict[str, str]:
    """{module: problem} for the modules of the package at ``root`` imported one at a time."""
    package = root.name
    names = module_names(root)
    exempt = [n for n in names if any(n.startswith(f"{package}.{e}") for e in EXEMPT)]
    ordered = [n for n in names if n not in exempt] + exempt  # GUI modules last
    args = json.dumps([package, ordered, list(EXEMPT), list(GUI_ROOTS)])
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORTS, args],
        capture_output=True,
        text=True,
        cwd=root.parent,
        env={**os.environ, "PYTHONPATH": str(root.parent), "QT_QPA_PLATFORM": "offscreen"},
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import statement in ``tree``, in functions too, except under ``if TYPE_CHECKING``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _type_checking_only(node):
            yield from (n for child in node.orelse for n in _imports_of(child))
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST):
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it), with the packages above an
    imported module that the importer does not already sit in (their ``__init__`` runs too)."""
    names = set(module_names(root))
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        if name in names:
            files[name] = (path, is_pkg)
    graph: dict[str, set[str]] = {n: set() for n in names}
    for name, (path, is_pkg) in files.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" for a in node.names]
                targets = [t if t in names else module for t in targets]
            for target in targets:
                while target and target not in names:  # `import pkg.mod.attr` style
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                graph[name].add(target)
                parts = target.split(".")
                for i in range(1, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in names and not (name == parent or name.startswith(parent + ".")):
                        graph[name].add(parent)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "planted"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checks_catch_a_planted_circle_and_a_gui_import(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .b import g\n\ndef f():\n    return g()\n",
            "b.py": "from .a import f\n\ndef g():\n    return 1\n",
            "lazy/__init__.py": "",
            "lazy/c.py": "def h():\n    from .d import k\n    return k\n",
            "lazy/d.py": "from .c import h\nk = 1\n",
            "clean.py": "from .lazy import d\n",
            "gui.py": "import qtpy\n",
            "widgets/__init__.py": "import qtpy\n",
        },
    )
    problems = import_each_fresh(root)
    assert "ImportError" in problems["planted.a"] and "ImportError" in problems["planted.b"]
    assert problems["planted.gui"].startswith("imports ") and "qtpy" in problems["planted.gui"]
    assert "planted.widgets" not in problems  # the GUI package may import Qt
    assert "planted.clean" not in problems and "planted.lazy.c" not in problems
    assert "planted.lazy.d" not in problems  # a lazy circle passes the import check...
    found = cycles(import_graph(root))
    assert ["planted.a", "planted.b"] in found
    assert ["planted.lazy.c", "planted.lazy.d"] in found  # ...but not the graph
    assert len(found) == 2


def test_every_module_imports_on_its_own_without_qt_or_napari():
    problems = import_each_fresh(PACKAGE)
    assert problems == {}


def test_the_import_graph_has_no_cycle():
    graph = import_graph(PACKAGE)
    assert "napari_concept_discovery.dictionary.applied" in graph  # the graph covers the tree
    assert (
        "napari_concept_discovery.dictionary.base"
        in graph["napari_concept_discovery.dictionary.training"]
    )
    assert cycles(graph) == []


# The data flow, bottom to top: a module imports only from its own layer and those below, so no
# import runs back up the flow. A package counts as a whole; the root's modules count one by one.
LAYERS = (
    ("", "errors", "progress", "settings", "_files", "_lock"),  # shared by every step
    ("synth", "segment"),  # pixels only: synthetic plates, the segmenters
    ("plate",),
    ("models",),
    ("embed",),
    ("dictionary",),
    ("analysis",),
    ("views",),
    ("report",),
    ("widgets", "cli", "demo", "_reader", "_sample_data"),  # the doors
)
MAX_ROOT_MODULES = 12


def layer_of(module: str, package: str) -> int:
    room = module[len(package) + 1 :].split(".")[0] if module != package else ""
    for i, rooms in enumerate(LAYERS):
        if room in rooms:
            return i
    raise AssertionError(f"{module} is in no layer: add its room to LAYERS")


def upward_imports(graph: dict[str, set[str]], package: str) -> list[str]:
    """Every import from a lower layer into a higher one, as 'importer -> imported'."""
    return sorted(
        f"{a} -> {b}"
        for a, deps in graph.items()
        for b in deps
        if layer_of(b, package) > layer_of(a, package)
    )


def test_the_layer_check_catches_an_import_running_back_up(tmp_path):
    root = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "plate/__init__.py": "",
            "plate/model.py": "def f():\n    from ..embed import compute\n",
            "embed/__init__.py": "",
            "embed/compute.py": "from ..plate import model\n",
        },
    )
    found = upward_imports(import_graph(root), "planted")
    assert found == [
        "planted.plate.model -> planted.embed",
        "planted.plate.model -> planted.embed.compute",
    ]


def test_no_import_runs_back_up_the_data_flow():
    assert upward_imports(import_graph(PACKAGE), PACKAGE.name) == []


def test_the_package_root_keeps_at_most_a_dozen_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def _names_imported_from_the_package(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from napari_concept_discovery... import name`` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE.name):
            found += [(node.module, a.name) for a in node.names if a.name != "*"]
    return found


def test_benchmarks_and_scripts_import_names_that_exist(tmp_path):
    """Benchmarks and scripts are run by hand, not by the suite: a name they import from the
    package that was moved or removed would only fail on the day someone runs them."""
    import importlib

    planted = tmp_path / "bench_planted.py"
    planted.write_text(f"from {PACKAGE.name}.errors import NoSuchName\n")
    root = PACKAGE.parents[1]
    files = [planted, *sorted((root / "benchmarks").glob("*.py"))]
    files += sorted((root / "scripts").glob("*.py"))
    assert len(files) > 10, f"no benchmarks or scripts found under {root}"
    missing = []
    for path in files:
        for module, name in _names_imported_from_the_package(path):
            mod = importlib.import_module(module)
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    missing.append(f"{path.name}: {module}.{name}")
    assert missing == [f"bench_planted.py: {PACKAGE.name}.errors.NoSuchName"], missing


def _test_module_imports(path: Path) -> list[str]:
    """Names of test modules (``test_*``) that the file at ``path`` imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1].startswith(
            "test_"
        ):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[-1].startswith("test_")]
    return found


def test_no_test_module_imports_another(tmp_path):
    """Shared test pieces live in helpers modules and conftest fixtures: a test module that
    imports another runs that module's fixtures and tests under a second name."""
    planted = tmp_path / "test_planted.py"
    planted.write_text("def f():\n    from test_widgets_explore import WAIT\n")
    assert _test_module_imports(planted) == ["test_widgets_explore"]
    tests = Path(__file__).parent
    found = {
        str(p.relative_to(tests)): names
        for p in sorted(tests.rglob("*.py"))
        if (names := _test_module_imports(p))
    }
    assert found == {}, found
