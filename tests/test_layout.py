"""The layout's rules, read from the imports (AST), so a violation fails here.

- `reproduce` may import `latentlens` and `molmo`; nothing else imports `reproduce`;
- the core (`latentlens`) never imports `molmo`;
- `molmo` uses only public `latentlens` names (no `_private` module or name);
- no import circles between our modules (imports under `if TYPE_CHECKING:` are for
  type checkers only and do not count);
- entry points never import each other;
- function-local imports only for heavy or optional third-party packages (and, in the
  `latentlens` command, the library itself, so that `--help` stays fast).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("latentlens", "molmo", "reproduce")
ENTRY_POINTS = {
    "latentlens.cli",
    "latentlens.__main__",
    "reproduce.__main__",
    "reproduce.judge.__main__",
    "quickstart",
}
# Modules holding commands: they import the library inside the command, so --help is fast.
FACES = ENTRY_POINTS | {"latentlens.cli_explain", "reproduce.judge.cli"}
# Third-party packages imported inside functions on purpose: heavy (torch and friends),
# optional extras, or only needed by one command.
LOCAL_OK = {
    "torch",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "numpy",
    "PIL",
    "matplotlib",
    "tokenizers",
    "torchvision",
    "faiss",
    "pyarrow",
    "openai",
    "datasets",
    "gguf",
    "accelerate",
    "selenium",
    "tqdm",
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module (absolute)
    names: tuple[str, ...]
    local: bool  # inside a function
    typing_only: bool  # under `if TYPE_CHECKING:`
    line: int


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> Iterator[tuple[str, Path]]:
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            yield _module_name(path), path
    yield "quickstart", ROOT / "quickstart.py"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, local: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.body:
                    visit_stmt(stmt, local, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, local, typing_only)
            else:
                visit_stmt(child, local, typing_only)

    def visit_stmt(node: ast.AST, local: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append(Import(module, alias.name, (), local, typing_only, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = tuple(a.name for a in node.names)
            out.append(Import(module, target, names, local, typing_only, node.lineno))
            # `from pkg import submodule` imports the submodule
            for name in names:
                if _is_our_module(f"{target}.{name}"):
                    out.append(
                        Import(module, f"{target}.{name}", (), local, typing_only, node.lineno)
                    )
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            visit(
                node,
                local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)),
                typing_only,
            )

    visit(tree, False, False)
    return out


_MODULES = {name for name, _ in _sources()}


def _is_our_module(name: str) -> bool:
    return name in _MODULES


def _all_imports() -> list[Import]:
    return [imp for module, path in _sources() for imp in _imports(module, path)]


def _top(name: str) -> str:
    return name.split(".")[0]


def test_reproduce_is_imported_by_nobody_and_core_never_imports_molmo():
    bad = []
    for imp in _all_imports():
        src, dst = _top(imp.module), _top(imp.target)
        if dst == "reproduce" and src != "reproduce":
            bad.append(f"{imp.module}:{imp.line} imports {imp.target}")
        if src == "latentlens" and dst == "molmo":
            bad.append(f"{imp.module}:{imp.line} (core) imports {imp.target}")
    assert not bad, "\n".join(bad)


def test_molmo_uses_only_public_latentlens_names():
    bad = []
    for imp in _all_imports():
        if _top(imp.module) != "molmo" or _top(imp.target) != "latentlens":
            continue
        private = [p for p in imp.target.split(".") if p.startswith("_") and p != "__init__"]
        private += [n for n in imp.names if n.startswith("_")]
        if private:
            bad.append(f"{imp.module}:{imp.line} uses {private} of {imp.target}")
    assert not bad, "\n".join(bad)


def test_entry_points_never_import_each_other():
    bad = [
        f"{imp.module}:{imp.line} imports {imp.target}"
        for imp in _all_imports()
        if imp.module in ENTRY_POINTS and imp.target in ENTRY_POINTS and imp.target != imp.module
    ]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for imp in _all_imports():
        if imp.typing_only or not _is_our_module(imp.target) or imp.target == imp.module:
            continue
        # a package's __init__ importing its own submodules is how packages work
        if imp.target.startswith(imp.module + "."):
            continue
        graph.setdefault(imp.module, set()).add(imp.target)
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_only_for_heavy_or_optional_packages():
    bad = []
    for imp in _all_imports():
        if not imp.local or imp.typing_only:
            continue
        top = _top(imp.target)
        if top in LOCAL_OK:
            continue
        if imp.module in FACES and top in PACKAGES:
            continue  # commands import the library when they run: --help stays fast
        if top in PACKAGES or top in {"click", "json", "os", "sys", "re", "math", "time"}:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target} inside a function")
    assert not bad, f"{len(bad)} needless function-local imports:\n" + "\n".join(bad)
