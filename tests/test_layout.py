"""Checks on the shape of the code base, not on what it computes.

* No import cycle between our modules, counting every import statement
  anywhere in a file (module level, inside functions, classes, if-blocks): an
  import hidden inside a function is still a dependency, just a lazy one.
* Ray is imported only by ``privatelora.actors`` and ``privatelora.placement``,
  so the split model, wire format and device side stay usable without Ray.
* No module is over 500 lines, so each one can be read in one sitting.
* No text in the repository cites documents that live outside it, and the
  design document it does cite, ``docs/design.md``, is present.

The import graph is read with ``ast`` only: nothing is imported or executed,
so this file needs neither Ray nor torch and runs in well under a second.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"privatelora": REPO / "privatelora", "privatelora.actors": REPO / "actors",
         "privatelora.placement": REPO / "placement"}
RAY_ALLOWED = ("privatelora.actors", "privatelora.placement")
MAX_LINES = 500


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the roots."""
    found = {}
    for package, folder in roots.items():
        for path in sorted(Path(folder).rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _imports(name: str, path: Path):
    """Yield, for every import in the file, the absolute names it may mean,
    best first: ``from m import x`` may mean module m.x, else module m."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from ([alias.name] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `.` is our package, each extra dot one up
                parts = package.split(".")
                parts = parts[: max(0, len(parts) - node.level + 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield from ([f"{base}.{alias.name}", base] for alias in node.names)


def import_graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules (inside the roots) that it imports anywhere."""
    mods = modules(roots)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for candidates in _imports(name, path):
            target = next((c for c in candidates if c in mods), None)
            if target is not None and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None if the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def ray_imports(roots: dict[str, Path], allowed=RAY_ALLOWED) -> list[tuple[str, int]]:
    """(module, line) of every import of ray outside the allowed packages."""
    found = []
    for name, path in modules(roots).items():
        if any(name == a or name.startswith(a + ".") for a in allowed):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            if any(n == "ray" or n.startswith("ray.") for n in names):
                found.append((name, node.lineno))
    return found


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOTS))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ray_is_imported_only_by_actors_and_placement():
    found = ray_imports(ROOTS)
    assert not found, "ray imported outside actors/placement: " + ", ".join(
        f"{m} line {n}" for m, n in found)


def test_the_cycle_checker_catches_a_cycle(tmp_path):
    # a -> b at module level (relative); b -> a only inside a function,
    # written relative, absolute-from and plain-absolute.
    for i, back in enumerate(["from . import a", "from fake import a", "import fake.a"]):
        _write(tmp_path / f"cyc{i}", {
            "fake/__init__.py": "",
            "fake/a.py": "from .b import x\n",
            "fake/b.py": f"x = 1\ndef f():\n    {back}\n",
        })
        graph = import_graph({"fake": tmp_path / f"cyc{i}" / "fake"})
        assert graph == {"fake": set(), "fake.a": {"fake.b"}, "fake.b": {"fake.a"}}
        assert find_cycle(graph) == ["fake.a", "fake.b", "fake.a"]

    # Same shape without the back edge, plus `..` and __init__-relative
    # imports, an absolute one, and an import of something outside the graph.
    _write(tmp_path / "ok", {
        "fake/__init__.py": "from .model import block\n",
        "fake/a.py": "import os\nfrom .b import x\nif x:\n    import fake.model\n",
        "fake/b.py": "x = 1\ndef f():\n    from fake.model.block import y\n",
        "fake/model/__init__.py": "",
        "fake/model/block.py": "y = 2\nclass C:\n    from ..c import z\n",
        "fake/c.py": "z = 3\n",
    })
    graph = import_graph({"fake": tmp_path / "ok" / "fake"})
    assert graph == {
        "fake": {"fake.model.block"},
        "fake.a": {"fake.b", "fake.model"},
        "fake.b": {"fake.model.block"},
        "fake.model": set(),
        "fake.model.block": {"fake.c"},
        "fake.c": set(),
    }
    assert find_cycle(graph) is None

    # ray outside actors/placement is reported, inside them it is not.
    _write(tmp_path / "ray", {
        "pl/__init__.py": "",
        "pl/a.py": "import os\n\ndef f():\n    import ray.util\n",
        "pl/b.py": "from ray import serve\n",
        "pl/c.py": "from .ray import x\n",
        "pl/ray.py": "x = 1\n",
        "actors/__init__.py": "import ray\n",
    })
    roots = {"privatelora": tmp_path / "ray" / "pl",
             "privatelora.actors": tmp_path / "ray" / "actors"}
    assert ray_imports(roots) == [("privatelora.a", 4), ("privatelora.b", 1)]


def test_no_module_over_500_lines():
    counts = {name: len(path.read_text(encoding="utf-8").splitlines())
              for name, path in modules(ROOTS).items()}
    over = {name: n for name, n in counts.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_no_text_cites_files_outside_the_repository():
    forbidden = ["DESIGN" + ".md", "PAPER_FACTS" + ".md"]
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO,
                            capture_output=True, check=False)
    if listed.returncode:
        pytest.skip("not a git checkout: " + listed.stderr.decode(errors="replace"))
    me = Path(__file__).resolve()
    offenders = []
    for rel in sorted(set(listed.stdout.decode().split("\0")) - {""}):
        path = REPO / rel
        if not path.is_file() or path.resolve() == me or path.stat().st_size > 2_000_000:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if "\0" in text:  # binary
            continue
        offenders += [f"{rel}: {s}" for s in forbidden if s in text]
    assert not offenders, "cites documents outside the repository: " + "; ".join(offenders)


def test_design_doc_exists():
    design = REPO / "docs" / "design.md"
    assert design.is_file(), "docs/design.md is missing"
    assert len(design.read_text(encoding="utf-8")) > 2000, "docs/design.md is too short"


def private_imports(roots: dict[str, Path]) -> list[str]:
    """``from other_module import _name`` across modules of the project: each module's
    public surface is what others may use (``__version__``-style dunders excepted)."""
    mods = modules(roots)
    found = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("privatelora"):
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target not in mods:
                        found.append(f"{name}:{node.lineno} imports {alias.name} from {node.module}")
    return found


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports(ROOTS) == []
    _write(tmp_path / "fake", {"__init__.py": "", "a.py": "def _hidden(): pass\n",
                               "b.py": "def f():\n    from privatelora.a import _hidden\n"})
    assert private_imports({"privatelora": tmp_path / "fake"}) == ["privatelora.b:2 imports _hidden from privatelora.a"]
