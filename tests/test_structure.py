"""The package's shape, read from its source with ast (nothing imported), so that it cannot slip again:

- layers that only point down: cli -> workflow -> steps -> backends (local, azureml) -> foundations, and the two
  backends never import each other;
- no import circle among runner's modules (imports inside functions count: they are imports all the same);
- no module importing another module's private (`_name`) names;
- no function over 80 lines, no source file over 600 lines.
README "Architecture" draws the same picture.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

from tests.conftest import REPO

PACKAGE = REPO / "runner"
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600

# Top to bottom. A module belongs to the first layer one of whose prefixes it starts with; the rest are foundations.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("cli", ("runner.cli", "runner.sweep.callback", "runner.sweep.context")),
    ("workflow", ("runner.workflow", "runner.backends", "runner.sweep")),
    ("steps", ("runner.steps",)),
    ("backends", ("runner.local", "runner.azureml")),
    ("foundations", ("runner",)),
]
BACKENDS = ("runner.local", "runner.azureml")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int:
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if any(_within(module, p) for p in prefixes))


def imports(modules: Dict[str, Path]) -> Tuple[Dict[str, Set[str]], List[Tuple[str, str]]]:
    """{module: the runner modules it imports} and [(module, private name it imports from another module)]."""
    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    private: List[Tuple[str, str]] = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if not _within(base, "runner"):
                    continue
                for alias in node.names:
                    target = resolve(f"{base}.{alias.name}")
                    if target and target != module:
                        edges[module].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((module, f"{base}.{alias.name}"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    target = resolve(alias.name) if _within(alias.name, "runner") else ""
                    if target and target != module:
                        edges[module].add(target)
    return edges, private


def circles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    edges, _ = imports(_modules())
    assert circles(edges) == []


def test_imports_only_point_down_the_layers():
    edges, _ = imports(_modules())
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in edges.items() for t in sorted(targets) if layer_of(t) < layer_of(m)]
    assert upward == []


def test_the_backends_never_import_each_other():
    edges, _ = imports(_modules())
    across = [f"{m} imports {t}" for m, targets in edges.items() for t in sorted(targets)
              for a, b in (BACKENDS, BACKENDS[::-1]) if _within(m, a) and _within(t, b)]
    assert across == []


def test_no_module_imports_another_modules_private_names():
    _, private = imports(_modules())
    assert private == []


def test_no_function_over_80_lines_and_no_file_over_600():
    long_functions, long_files = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO)
        if len(source.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert long_files == []
    assert long_functions == []


def test_the_checks_see_a_circle_an_upward_import_and_a_private_import(tmp_path, monkeypatch):
    """The checks themselves can fail: a made-up package with one of each is caught."""
    import tests.test_structure as structure

    pkg = tmp_path / "runner"
    (pkg / "steps").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "steps" / "__init__.py").write_text("")
    (pkg / "steps" / "a.py").write_text("from runner.workflow import go\n")
    (pkg / "workflow.py").write_text("def go():\n    from runner.steps.a import x\n")
    (pkg / "atomic.py").write_text("from runner.steps.a import _helper\n")
    monkeypatch.setattr(structure, "REPO", tmp_path)
    monkeypatch.setattr(structure, "PACKAGE", pkg)
    edges, private = imports(_modules())
    assert circles(edges) == [["runner.steps.a", "runner.workflow"]]
    assert private == [("runner.atomic", "runner.steps.a._helper")]
    assert layer_of("runner.atomic") > layer_of("runner.steps.a") > layer_of("runner.workflow")
