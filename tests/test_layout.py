"""The package layout says the architecture (issue #27): the top level of diffusion/ holds the CLIs and at most two
other modules, every folder is a package named for its part, and the import graph has no cycle (every ``import``
counts: module-level, inside functions, under TYPE_CHECKING, and the lazy exports of a package's ``__init__``)."""

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "diffusion"
CLIS = {"train", "sample", "evaluate", "compare", "figures", "report", "export", "app"}
#: the two library modules at the top level: the floor every package builds on (torch-free, importing nothing of ours)
FLOOR = {"checks", "lazy"}
PARTS = {"processes", "samplers", "models", "data", "metrics", "training", "run", "sharing", "plots"}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name imported from a package resolves to its submodule when it is
    one, else to the package); a package's lazy exports (``_LAZY``: name -> module) are edges too."""
    def resolve(name: str) -> str:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in found.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "diffusion"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "diffusion":
                    edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in found else resolve(base) for a in node.names}
            elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
                edges |= {resolve(c.value) for c in ast.walk(node.value)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("diffusion.")}
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = import_graph(modules())
    assert len(graph) > 60 and graph["diffusion.train"], "the graph was not read"
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_the_cycles_the_layout_had(tmp_path):
    """The checker on the import statements of the two cycles issue #27 measured (runtime <-> cluster <-> requeue <->
    sweeps, with imports inside functions; samplers/base <-> samplers/registry, one of them under TYPE_CHECKING) and
    on a lazy export: it must see each of them, and no cycle once they are gone."""
    source = {
        "diffusion.runtime": "def f():\n    from diffusion.cluster import ranks_from_scheduler\n    from diffusion import requeue",
        "diffusion.cluster": "from diffusion.runtime import UsageError",
        "diffusion.requeue": "def g():\n    from diffusion.cluster import slurm_detected",
        "diffusion.sweeps": "from diffusion.runtime import hydra_job",
        "diffusion.samplers.base": "def h():\n    from diffusion.samplers.registry import sampler_names",
        "diffusion.samplers.registry": "if TYPE_CHECKING:\n    from diffusion.samplers.base import Sampler",
        "diffusion.pkg": "_LAZY = {'A': 'diffusion.pkg.a'}",
        "diffusion.pkg.a": "from diffusion.pkg import B",
    }
    found = {}
    for name, text in source.items():
        found[name] = tmp_path / f"{name}.py"
        found[name].write_text(text + "\n")
    assert sorted(cycles(import_graph(found))) == [
        ["diffusion.cluster", "diffusion.requeue", "diffusion.runtime"],  # requeue <- runtime: `from diffusion import requeue`
        ["diffusion.pkg", "diffusion.pkg.a"], ["diffusion.samplers.base", "diffusion.samplers.registry"]]
    found["diffusion.samplers.registry"].write_text("from typing import Any\n")
    found["diffusion.cluster"].write_text("from diffusion.run.errors import UsageError\n")
    found["diffusion.pkg.a"].write_text("B = 1\n")
    assert cycles(import_graph(found)) == []


def test_the_top_level_holds_the_clis_and_the_floor_and_each_folder_is_a_part():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == CLIS | FLOOR, sorted(top ^ (CLIS | FLOOR))
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == PARTS and all((PACKAGE / f / "__init__.py").is_file() for f in folders)
    graph = import_graph(modules())
    for floor in FLOOR:
        assert not graph[f"diffusion.{floor}"], f"diffusion.{floor} imports {graph[f'diffusion.{floor}']}"
    entry_points = {f"diffusion.{c}" for c in CLIS}
    crossing = {(m, e) for m in graph for e in graph[m] & entry_points if m != e}
    assert not crossing, f"entry points are imported by other modules: {sorted(crossing)}"


def test_the_tests_mirror_the_package():
    """tests/<part>/ for each part that has its own tests; none for a part that does not exist."""
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders <= PARTS, sorted(folders - PARTS)
    assert {"processes", "samplers", "models", "data", "metrics", "training", "run", "sharing"} <= folders
