"""The package's layout holds: the runtime is a leaf, nothing imports in a circle, the top level
stays small, and importing the runtime costs none of the compiler's libraries.

Imports are read from the code (every `import` and `from` statement, at any depth, so lazy
imports inside functions count too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import distill_compiler

PACKAGE = Path(distill_compiler.__file__).parent
RUNTIME_LIBRARIES = {"jsonschema", "llguidance", "numpy", "onnxruntime", "tokenizers"}
HEAVY = ("torch", "transformers", "pydantic", "yaml", "litellm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """(modules of this package it imports, top-level names of other packages it imports)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = internal if alias.name.startswith("distill_compiler") else external
                target.add(alias.name if target is internal else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith("distill_compiler"):
                if node.module != "__future__":
                    external.add(node.module.split(".")[0])
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import x` runs pkg's __init__ first, and imports the module pkg.x when
            # there is one.
            internal.add(base)
            internal |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return internal, external


def test_runtime_is_a_leaf_package():
    """It ships alone: runtime/ imports itself, the standard library and the runtime's
    libraries, and nothing else of distill_compiler."""
    for name in (n for n in MODULES if n.startswith("distill_compiler.runtime")):
        internal, external = imports_of(name)
        assert all(m.startswith("distill_compiler.runtime") for m in internal), (name, internal)
        assert external - RUNTIME_LIBRARIES <= set(sys.stdlib_module_names), (name, external)


def test_no_import_cycles():
    graph = {name: {m for m in imports_of(name)[0] if m in MODULES and m != name}
             for name in MODULES}
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_the_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top


def test_importing_the_runtime_loads_none_of_the_compiler():
    code = ("import sys, distill_compiler.runtime, distill_compiler.runtime.format\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_runtime_extra_installs_what_the_runtime_imports():
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    extra = {req.split(">")[0].split("=")[0].split("[")[0].strip()
             for req in project["optional-dependencies"]["runtime"]}
    imported = set()
    for name in (n for n in MODULES if n.startswith("distill_compiler.runtime")):
        imported |= imports_of(name)[1] - set(sys.stdlib_module_names)
    assert imported <= extra, imported - extra
