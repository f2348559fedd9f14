"""The package's import graph: no circle, no arrow from a lower layer to a higher one, and module-level imports.

Layers, lowest first (a module may import its own layer and those below it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "probekit"
LAYERS = [
    [
        "_version",
        "errors",
        "io",
        "paths",
        "registry",
        "config",
        "fingerprint",
        "results",
        "runs",
        "cpu",
        "metrics",
        "plugins",
    ],
    ["data"],
    ["backbone", "encoding", "cache", "distributed", "extraction"],
    ["probes", "mlm", "offramp", "finetune"],
    ["analysis", "stats", "plot", "report", "senteval"],
    ["suite"],
    ["cli", "__init__", "__main__"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# the analyses may use each other's building blocks in this order (fine-tuning variants use the MLM kernels,
# off-ramps use the fine-tuning loaders); never the other way round
ANALYSES = ["probes", "mlm", "finetune", "offramp"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> tuple[list[str], list[tuple[int, int, str]]]:
    """probekit modules imported (anywhere but under TYPE_CHECKING), and function-local imports (line, module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, local = [], []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            return [f"{base}.{a.name}" if base.startswith("probekit") else base for a in node.names]
        return []

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, True, in_type_checking)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, in_function, True)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    local.append((child.lineno, child.end_lineno or child.lineno, ",".join(targets(child))))
                if not in_type_checking:  # function-local imports are arrows too, only hidden
                    found.extend(t for t in targets(child) if t.startswith("probekit"))
            else:
                visit(child, in_function, in_type_checking)

    visit(tree, False, False)
    return found, local


def resolve(name: str, modules: set[str]) -> str | None:
    """The probekit module an import target names (``probekit.a.b`` may be module a.b or name b of a)."""
    while name:
        if name in modules:
            return name
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return None


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for mod, path in files.items():
        found, _ = imports(path)
        edges[mod] = {r for t in found if (r := resolve(t, set(files))) is not None and r != mod}
    return edges


def test_every_module_is_in_a_layer() -> None:
    missing = sorted({top(m) for m in graph()} - set(RANK))
    assert not missing, f"modules without a layer (add them to LAYERS): {missing}"


def test_no_arrow_runs_up() -> None:
    bad = []
    for mod, deps in graph().items():
        for dep in deps:
            a, b = top(mod), top(dep)
            if dep == "probekit" and mod != "probekit":
                bad.append(f"{mod} -> probekit (the package face)")
            elif RANK[b] > RANK[a]:
                bad.append(f"{mod} -> {dep}")
            elif RANK[a] == RANK[b] == 3 and a != b and ANALYSES.index(b) > ANALYSES.index(a):
                bad.append(f"{mod} -> {dep} (analyses: {' < '.join(ANALYSES)})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt, [*stack, nxt])
        state[node] = 2

    for n in sorted(edges):
        if n not in state:
            dfs(n, [n])
    # a package importing its own submodules (to export them) is not a circle unless a submodule imports back
    real = [
        c
        for c in cycles
        if not all(c[i + 1].startswith(c[i] + ".") or c[i].startswith(c[i + 1] + ".") for i in range(len(c) - 1))
    ]
    assert not real, "import circles:\n" + "\n".join(" -> ".join(c) for c in real)


DEFERRED = (
    "transformers",
    "torch",
    "accelerate",
    "matplotlib",
    "seaborn",
    "pyarrow",
    "scipy",
    "sklearn",
    "safetensors",
)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_are_at_module_level(path: Path) -> None:
    """Function-local imports only where a heavy optional import is deferred on purpose, with a comment (on the
    import or the line above it)."""
    _, local = imports(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = [
        f"{path.relative_to(ROOT)}:{n}: {what}"
        for n, end, what in local
        if not (
            all(w.split(".")[0] in DEFERRED for w in what.split(","))
            and any("#" in line for line in lines[max(n - 2, 0) : end])
        )
    ]
    assert not bad, "function-local imports (move them to the top, or defer a heavy one with a comment):\n" + "\n".join(
        bad
    )
