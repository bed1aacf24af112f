"""``python -m scripts.import_graph [--root DIR] [--quiet]``: the repository's module import graph, checked.

Reads every ``.py`` file's imports (module level and inside functions alike: an import moved into a function to
dodge a cycle is still a cycle) with ``ast``, keeps the ones that name a module of this repository, prints the
graph (``module -> imported modules``) and exits 1 when

* the graph has a cycle (each strongly connected component of more than one module is named), or
* a module of the pack or the core imports ComfyUI anywhere but the pack's one adapter (``ADAPTER``), or
* a module imports a script by its bare name (``import tiny_assets``: only a path edit makes that work; scripts are
  ``scripts.<name>``), or
* an import runs against the floors (``ALLOWED``): the core (``comfyui_pare``) imports nothing else of the
  repository; ComfyUI-as-a-library (``comfy_library``) nothing at all; ``nodes`` only the core; ``training`` the
  core and ``comfy_library``; ``benchmarks`` and ``scripts`` sit on top; ``tests`` may import anything but test
  modules, and a test group (``tests/core``, ``tests/nodes``, ...) never imports another group (shared pieces live
  in ``tests/``).

Names resolve as the code runs them: absolute imports against the repository root, plus ``tests/`` for test modules
(pytest's ``pythonpath``) and the test's own folder (pytest's prepend import mode); the pack's relative imports against its root, which is a package when ComfyUI loads it
(``nodes/x.py``'s ``..comfyui_pare`` is ``comfyui_pare``). An absolute ``nodes`` is ComfyUI's top-level module
(its tree goes first on the import path wherever ComfyUI is imported), never this repository's ``nodes/``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "venv", "build", "web", "docs", "workflows", "__pycache__"}
PACK = "pack"  # the repository root's __init__.py: the node pack's entry point
COMFYUI_NAMES = {"nodes"}  # absolute names that are ComfyUI's modules, not this repository's
# group -> the groups it may import besides itself (None: any).
ALLOWED: dict[str, set[str] | None] = {
    "comfyui_pare": set(),
    "comfy_library": set(),
    "nodes": {"comfyui_pare"},
    PACK: {"nodes"},
    "training": {"comfyui_pare", "comfy_library"},
    "benchmarks": {"comfyui_pare", "comfy_library", "training"},
    "scripts": {"comfyui_pare", "comfy_library", "training", "benchmarks"},
    "tests": None,
}
TEST_GROUPS = {"core", "nodes", "training", "toyworld"}
# ComfyUI's top-level modules: the pack imports them in its adapter only, the core never.
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "node_helpers",
                   "latent_preview", "server", "execution", "comfyui_version", "nodes"}
ADAPTER = "nodes.comfy_compat.internals"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts == ["__init__"]:
        return PACK
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        if not SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            out[module_name(path, root)] = path
    return out


def group_of(module: str) -> str:
    return module.split(".")[0]


def _package(module: str, path: Path) -> list[str]:
    """The package a module's relative imports start from ([] for the pack's root)."""
    if module == PACK:
        return []
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository modules ``module`` imports."""
    roots = [""]
    if group_of(module) == "tests":  # pytest's pythonpath (tests/) and its prepend import mode (the test's folder);
        # then the other test folders, so that an import of another group's test module is seen (and refused).
        own = ".".join(_package(module, path)) + "."
        roots += ["tests.", own] + [f"tests.{g}." for g in sorted(TEST_GROUPS) if f"tests.{g}." != own]

    def resolve(name: str, absolute: bool) -> str | None:
        if absolute and name.split(".")[0] in COMFYUI_NAMES:
            return None
        for prefix in roots if absolute else [""]:
            candidate = name
            while candidate:  # 'a.b.c' names module a.b.c, else a.b (c a name in it), else a
                if prefix + candidate in modules:
                    return prefix + candidate
                candidate = candidate.rpartition(".")[0]
        return None

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[tuple[str, bool]] = []
        if isinstance(node, ast.Import):
            targets = [(alias.name, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package(module, path)
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                stem = ".".join(base + ([node.module] if node.module else []))
                absolute = False
            else:
                stem, absolute = node.module, True
            targets = [(f"{stem}.{alias.name}" if stem else alias.name, absolute) for alias in node.names]
        for name, absolute in targets:
            target = resolve(name, absolute)
            if target is not None and target != module:
                found.add(target)
    return found


def comfyui_imports(root: Path) -> list[str]:
    """Every import of a ComfyUI module by the core or the pack outside ``ADAPTER``, as 'importer -> module'."""
    out = []
    for module, path in find_modules(root).items():
        if group_of(module) not in ("comfyui_pare", "nodes") or module == ADAPTER:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            out += [f"{module} -> {n}" for n in names if n.split(".")[0] in COMFYUI_MODULES]
    return sorted(out)


def bare_script_imports(root: Path) -> list[str]:
    """Every import of a module of scripts/ by its bare name, as 'importer -> name'."""
    modules = find_modules(root)
    scripts = {m.split(".", 1)[1] for m in modules if m.startswith("scripts.")}
    out = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            out += [f"{module} -> {n}" for n in names if n.split(".")[0] in scripts]
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the floors, as 'importer -> imported (why)'."""
    out = []
    for module, targets in sorted(graph.items()):
        group = group_of(module)
        allowed = ALLOWED.get(group, set())
        for target in sorted(targets):
            other = group_of(target)
            if group == "tests":
                mine, theirs = module.split("."), target.split(".")
                if theirs[-1].startswith("test_"):
                    out.append(f"{module} -> {target} (a test module is no library: shared pieces go to tests/)")
                    continue
                if (other == "tests" and len(mine) > 2 and len(theirs) > 2 and mine[1] in TEST_GROUPS
                        and theirs[1] in TEST_GROUPS and mine[1] != theirs[1]):
                    out.append(f"{module} -> {target} (test group {mine[1]} imports group {theirs[1]})")
            elif other != group and other not in allowed:
                out.append(f"{module} -> {target} ({group} may import only {sorted(allowed) or 'itself'})")
    return out


def build_graph(root: Path) -> dict[str, set[str]]:
    modules = find_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.import_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to read (default: this one)")
    parser.add_argument("--quiet", action="store_true", help="print only the problems and the summary")
    args = parser.parse_args(argv)
    graph = build_graph(args.root.resolve())
    if not args.quiet:
        for module, targets in sorted(graph.items()):
            print(f"{module} -> {', '.join(sorted(targets)) or '-'}")
    root = args.root.resolve()
    loops, wrong, comfyui, bare = cycles(graph), upward(graph), comfyui_imports(root), bare_script_imports(root)
    for loop in loops:
        print("cycle: " + " <-> ".join(loop))
    for line in wrong:
        print("refused import: " + line)
    for line in comfyui:
        print(f"ComfyUI imported outside {ADAPTER}: {line}")
    for line in bare:
        print(f"script imported by its bare name (a path edit; use scripts.<name>): {line}")
    edges = sum(len(t) for t in graph.values())
    print(f"{len(graph)} modules, {edges} imports, {len(loops)} cycles, {len(wrong)} refused imports, "
          f"{len(comfyui)} ComfyUI imports outside the adapter, {len(bare)} bare script imports")
    return 1 if loops or wrong or comfyui or bare else 0


if __name__ == "__main__":
    sys.exit(main())
