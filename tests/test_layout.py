"""The layout: one package per stage, no import from a lower stage into a higher one, no import loops.

Imports are read with ``ast`` from every module of ``decapflow/`` and ``flows/``, lazy ones inside functions
included (and ``importlib.import_module("...")`` with a literal name), so nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The stages, lowest first: the one place their order is written. A module belongs to the stage of the longest
#: prefix below that names it; it may import its own stage and the ones before it.
STAGES: list[tuple[str, ...]] = [
    ("decapflow._version", "decapflow.config", "decapflow.cpu", "decapflow.errors", "decapflow.encoders",
     "decapflow.progress"),
    ("decapflow.bank",),
    ("decapflow.decoder",),
    ("decapflow.caption",),
    ("decapflow.evaluation",),
    ("decapflow.lifecycle",),
    ("decapflow.serve", "decapflow.cli", "flows", "decapflow"),  # the shells; "decapflow" is the package's API
]
MAX_LOOSE_MODULES = 6


def module_files(root: Path, packages: tuple[str, ...] = ("decapflow", "flows")) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the top-level ``packages`` of ``root``."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules (keys of ``modules``) that module ``name`` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str, names: list[str]) -> None:
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
        found.update(subs)
        if len(subs) < len(names) or not names:  # something defined in the package (or module) itself
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            add(target, [alias.name for alias in node.names])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, [])
    return found - {name}  # add() keeps only modules of ``modules``


def stage_of(module: str, stages: list[tuple[str, ...]] = STAGES) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, stage)
    for index, prefixes in enumerate(stages):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def graph(root: Path, packages: tuple[str, ...] = ("decapflow", "flows")) -> dict[str, set[str]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(edges: dict[str, set[str]], stages: list[tuple[str, ...]] = STAGES) -> list[str]:
    """``a -> b`` for every import of a higher stage's module ``b`` by ``a`` (and modules with no stage)."""
    problems = [f"{m}: in no stage (add it to STAGES or move it into a stage's package)"
                for m in sorted(edges) if stage_of(m, stages) is None]
    for module, targets in sorted(edges.items()):
        here = stage_of(module, stages)
        for target in sorted(targets):
            there = stage_of(target, stages)
            if here is not None and there is not None and there > here:
                problems.append(f"{module} (stage {here}) imports {target} (stage {there})")
    return problems


def loops(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


@pytest.fixture(scope="module")
def project() -> dict[str, set[str]]:
    """The import graph of ``decapflow/`` and ``flows/``, read once for this module's tests."""
    return graph(ROOT)


def test_no_import_goes_up_a_stage(project: dict[str, set[str]]) -> None:
    assert upward_imports(project) == []


def test_no_import_loops(project: dict[str, set[str]]) -> None:
    assert loops(project) == []


def test_each_stage_is_a_package_with_a_docstring_and_few_loose_modules(project: dict[str, set[str]]) -> None:
    pkg = ROOT / "decapflow"
    loose = sorted(p.name for p in pkg.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= MAX_LOOSE_MODULES, loose
    for prefixes in STAGES[1:]:
        for prefix in prefixes:
            parts = prefix.split(".")
            if parts[0] != "decapflow" or len(parts) != 2:
                continue
            init = pkg / parts[1] / "__init__.py"
            assert init.is_file(), f"{prefix} is not a package"
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc.splitlines()) >= 2, f"{init} needs a docstring saying what the stage does"
    # the layering check sees the whole tree: the stage packages are all there and hold modules
    for stage, prefixes in enumerate(STAGES):
        assert any(stage_of(m) == stage for m in project), f"stage {stage} {prefixes} has no modules"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_catch_an_upward_import_and_a_loop_even_when_lazy(tmp_path: Path) -> None:
    """The checker itself, on a small tree with one lazy upward import that closes a loop."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "def f():\n    from pkg.high import b\n",   # lazy, upward
        "pkg/high/__init__.py": "",
        "pkg/high/b.py": "from ..low.a import f\n",                     # relative, downward
        "pkg/high/c.py": "import importlib\nimportlib.import_module('pkg.high.b')\n",
    })
    stages = [("pkg.low",), ("pkg.high", "pkg")]
    edges = graph(tmp_path, ("pkg",))
    assert edges["pkg.low.a"] == {"pkg.high.b"} and edges["pkg.high.b"] == {"pkg.low.a"}
    assert edges["pkg.high.c"] == {"pkg.high.b"}
    assert upward_imports(edges, stages) == ["pkg.low.a (stage 0) imports pkg.high.b (stage 1)"]
    assert loops(edges) == [["pkg.high.b", "pkg.low.a"]]
    assert any("in no stage" in p for p in upward_imports(edges, [("pkg.high",)]))


def test_public_api_all_lists_exactly_the_lazy_names() -> None:
    import decapflow

    assert set(decapflow.__all__) == set(decapflow._API) | {"__version__"}


@pytest.mark.parametrize("name", ["open_bank", "ingest", "train_bank", "caption_images", "delete_bank", "Captioner"])
def test_public_api_names_resolve(name: str) -> None:
    import decapflow

    assert name in decapflow.__all__ and callable(getattr(decapflow, name))
