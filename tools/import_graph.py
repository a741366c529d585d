"""The import graph of btkjax, checked: floors, cycles, private names.

Reads every module of the package with ``ast`` (imports at any depth, function-level ones
included: they run too, only later) and reports:

- cycles between modules;
- imports against the floors: ``btkjax.core`` imports only ``btkjax.core`` (and no astropy,
  GalSim, files or plotting), ``btkjax.engine`` only ``btkjax.core`` and ``btkjax.engine``;
  the interface (the package root) and ``btkjax.deblend`` may import anything below them;
- a module using another module's private (``_name``) attribute.

Usage: ``python tools/import_graph.py [--dot]``; exits 1 and lists the problems if there are
any. ``tests/test_layers.py`` runs it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "btkjax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

FLOORS = {"core": 1, "engine": 2}
"""Floor of each subpackage of btkjax; every other module is on floor 3 (the interface)."""

CORE_FORBIDDEN = ("astropy", "galsim", "jax_galsim", "matplotlib", "h5py", "sep", "tqdm",
                  "galcheat", "surveycodex", "optax")
"""Third-party packages the pure-JAX core must not import (tables, GalSim objects, files,
plots, survey databases, optimizers belong above it)."""


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def floor(mod: str) -> int:
    parts = mod.split(".")
    return FLOORS.get(parts[1], 3) if len(parts) > 1 else 3


def _resolve(name: str, known: dict) -> str | None:
    """The btkjax module an import of ``name`` loads (the longest known prefix)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


class _Imports(ast.NodeVisitor):
    def __init__(self, mod: str, known: dict, is_package: bool):
        self.mod, self.known, self.is_package = mod, known, is_package
        self.edges: set[str] = set()
        self.third_party: set[str] = set()
        self.private: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> btkjax module

    def _base(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        pkg = self.mod.split(".") if self.is_package else self.mod.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        return ".".join(pkg + ([node.module] if node.module else []))

    def visit_Import(self, node):
        for a in node.names:
            if a.name.split(".")[0] == PACKAGE:
                target = _resolve(a.name, self.known)
                if target:
                    self.edges.add(target)
                    if a.asname:
                        self.aliases[a.asname] = target
            else:
                self.third_party.add(a.name.split(".")[0])

    def visit_ImportFrom(self, node):
        base = self._base(node)
        if base.split(".")[0] != PACKAGE:
            self.third_party.add(base.split(".")[0])
            return
        for a in node.names:
            sub = f"{base}.{a.name}"
            if sub in self.known:  # a submodule
                self.edges.add(sub)
                self.aliases[a.asname or a.name] = sub
                continue
            target = _resolve(base, self.known)
            if target:
                self.edges.add(target)
                if a.name.startswith("_") and not a.name.startswith("__") and target != self.mod:
                    self.private.append(f"{self.mod}:{node.lineno} imports {target}.{a.name}")

    def visit_Attribute(self, node):
        if (isinstance(node.value, ast.Name) and node.value.id in self.aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            target = self.aliases[node.value.id]
            if target != self.mod:
                self.private.append(f"{self.mod}:{node.lineno} uses {target}.{node.attr}")
        self.generic_visit(node)


def graph(root: Path = ROOT):
    """(edges {module: set of modules}, problems [str]) of the package at ``root``."""
    known = modules(root)
    edges, problems = {}, []
    for mod, path in known.items():
        v = _Imports(mod, known, path.name == "__init__.py")
        v.visit(ast.parse(path.read_text(), str(path)))
        v.edges.discard(mod)
        edges[mod] = v.edges
        problems += v.private
        for dep in sorted(v.edges):
            if floor(dep) > floor(mod):
                problems.append(f"{mod} (floor {floor(mod)}) imports {dep} (floor {floor(dep)})")
        if floor(mod) == 1:
            for pkg in sorted(v.third_party & set(CORE_FORBIDDEN)):
                problems.append(f"{mod} (core) imports {pkg}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return edges, problems


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), as cycles."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    edges, problems = graph()
    if "--dot" in argv:
        print("digraph btkjax {")
        for mod in sorted(edges):
            for dep in sorted(edges[mod]):
                print(f'  "{mod}" -> "{dep}";')
        print("}")
    for p in problems:
        print(p)
    n_edges = sum(len(e) for e in edges.values())
    print(f"{len(edges)} modules, {n_edges} imports, {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
