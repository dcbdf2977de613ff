"""The import walker of test_architecture.py: every import of a module read from its AST (relative imports made
absolute, function-level ones included), the import graph of a tree of modules and its circles, the private
names one module takes from another, and the test modules a module imports."""

from __future__ import annotations

import ast
import functools
import pathlib
from dataclasses import dataclass
from typing import Dict, List, Set, Tuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
TREES = {"aem_kernels": ROOT / "aem_kernels", "bench": ROOT / "bench", "python_tests": ROOT / "python_tests"}


@dataclass(frozen=True)
class Import:
    """One import statement: `from target import names` or `import target` (names empty; `alias` its binding)."""

    target: str
    names: Tuple[str, ...]
    alias: str
    line: int


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imports_of(source: str, module: str, is_package: bool = False) -> List[Import]:
    """Every import of `source` (the text of `module`), relative ones made absolute; anywhere in the module
    (a function-level import is an import all the same), except under `if TYPE_CHECKING:`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                found.append(Import(a.name, (), a.asname or a.name.partition(".")[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append(Import(base, tuple(a.name for a in node.names), "", node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def module_name(path: pathlib.Path, tree: str) -> str:
    if tree == "python_tests":   # pytest puts each test folder on sys.path: modules go by their file's name
        return path.stem
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(tree: str) -> Dict[str, pathlib.Path]:
    return {module_name(p, tree): p for p in sorted(TREES[tree].rglob("*.py"))}


def targets(imp: Import, known: Set[str]) -> Set[str]:
    """The modules an import loads: `from P import m` loads P.m when that is a module, else P (whose __init__
    re-exports the name, so its own imports count); `import a.b` loads a.b."""
    if not imp.names:
        return {imp.target}
    return {f"{imp.target}.{n}" if f"{imp.target}.{n}" in known else imp.target for n in imp.names}


def import_graph(texts: Dict[str, Tuple[str, bool]], compiled: Set[str] = frozenset()) -> Dict[str, Set[str]]:
    """module -> the modules of `texts` it imports; `texts` maps a module to (source, is_package), `compiled`
    names the tree's compiled extensions (modules without a source: no edge leaves them)."""
    known = set(texts) | set(compiled)
    return {m: {t for imp in imports_of(text, m, pkg) for t in targets(imp, known) if t in known and t != m}
            for m, (text, pkg) in texts.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def private_imports(source: str, module: str, is_package: bool, known: Set[str]) -> List[str]:
    """`_name`s of another module that `module` takes: `from x import _y` (unless x._y is a submodule of a
    package `module` lies in), and `x._y` on a module (or `C._y` on a class or function) bound by an import."""
    own_package = module if is_package else module.rpartition(".")[0]
    found = []
    bound: Dict[str, str] = {}
    for imp in imports_of(source, module, is_package):
        if not imp.target.startswith("aem_kernels"):
            continue
        if not imp.names:
            bound[imp.alias] = imp.target if imp.alias != imp.target.partition(".")[0] else imp.alias
            continue
        for n in imp.names:
            sub = f"{imp.target}.{n}"
            if sub in known:
                bound[n] = sub
                if is_private(n) and not (own_package + ".").startswith(imp.target + "."):
                    found.append(f"line {imp.line}: from {imp.target} import {n}")
            elif is_private(n) and imp.target != module:
                found.append(f"line {imp.line}: from {imp.target} import {n}")
            elif imp.target != module:
                bound[n] = f"{imp.target}:{n}"   # a class or function of another module: its privates too
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Store):
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in bound:
                continue
            owner = bound[base.id]
            for attr in chain:
                if f"{owner}.{attr}" in known:
                    owner = f"{owner}.{attr}"
                    continue
                if is_private(attr) and owner != module:
                    found.append(f"line {node.lineno}: {owner}.{attr}")
                break
    return sorted(set(found))


@functools.lru_cache(maxsize=None)
def sources(tree: str) -> Dict[str, Tuple[str, bool]]:
    return {m: (p.read_text(), p.name == "__init__.py") for m, p in modules(tree).items()}


def compiled_modules(tree: str) -> Set[str]:
    """The tree's compiled extensions (aem_kernels._C): modules too, though they have no source to walk."""
    return {module_name(p, tree).split(".")[0] if tree == "python_tests" else
            module_name(p, tree).split(".cpython")[0] for p in TREES[tree].rglob("*.so")}


def known_package_modules() -> Set[str]:
    return set(modules("aem_kernels")) | compiled_modules("aem_kernels")


def imported_test_modules(source: str, module: str, is_package: bool = False) -> List[str]:
    """The test modules (`test_*`) that `source` imports."""
    imps = imports_of(source, module, is_package)
    return sorted({imp.target for imp in imps if imp.target.rpartition(".")[2].startswith("test_")}
                  | {f"{imp.target}.{n}" for imp in imps for n in imp.names if n.startswith("test_")})
